"""risk_scores' preview: the newly scored and the changed patients first, counted, from the previous
file's id and probability columns only."""

import pyarrow as pa
import pyarrow.parquet as pq

from gcmlm_assets.cohort.tables import score_changes as S


def scores_table(rows: dict[str, float]) -> pa.Table:
    ids = sorted(rows)
    return pa.table({"patient_id": pa.array(ids, pa.string()),
                     "probability": pa.array([rows[p] for p in ids], pa.float64()),
                     "risk_group": pa.array(["high" if rows[p] >= 0.5 else "low" for p in ids], pa.string())})


def test_new_and_changed_patients_come_first_and_are_counted(tmp_path):
    previous = {f"P{i:03d}": 0.1 + i / 100 for i in range(20)}
    path = tmp_path / "scores.parquet"
    # the previous file has more columns than are read; a column it lacks must not matter
    pq.write_table(scores_table(previous).append_column("extra", pa.array([b"x"] * 20, pa.binary())), path)
    now = dict(previous)
    now["P003"] += 0.05
    now["P017"] -= 0.2
    now["P019"] += 1e-12  # float noise is no change
    now.update({"P900": 0.9, "P500": 0.4})
    table = scores_table(now)

    changes = S.score_changes(path, table)
    assert changes["previous"] and (changes["new"], changes["changed"]) == (2, 2)
    assert changes["shown"] == ["P500", "P900", "P017", "P003"]  # new by id, then the largest move

    preview = S.preview_table(table, changes, ["patient_id", "probability"], rows=6)
    assert preview.column("patient_id").to_pylist() == ["P500", "P900", "P017", "P003", "P000", "P001"]
    assert preview.column("change").to_pylist() == ["new", "new", "changed (-0.2000)", "changed (+0.0500)", "", ""]
    assert S.changes_line(changes, table.num_rows).startswith("2 newly scored and 2 with a changed score")


def test_first_scores_are_all_new_and_the_preview_is_bounded(tmp_path):
    table = scores_table({f"P{i:05d}": 0.5 for i in range(10_000)})
    changes = S.score_changes(tmp_path / "none.parquet", table)
    assert not changes["previous"] and changes["new"] == 10_000 and len(changes["shown"]) == S.PREVIEW_ROWS
    assert S.changes_line(changes, 10_000) == "First scores: all 10000 patients are newly scored."
    assert S.preview_table(table, changes, ["patient_id"]).num_rows == S.PREVIEW_ROWS

    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1 not a parquet file")
    changes = S.score_changes(damaged, table)  # the new scores are not held up by the old file
    assert changes["new"] == 10_000 and str(damaged) in S.changes_line(changes, 10_000)
