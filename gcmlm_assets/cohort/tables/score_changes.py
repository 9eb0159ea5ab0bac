"""Which scores are new or changed since the previous risk_scores, for the preview (plain Python).

The preview of 10,000 scores can show ten rows: the ones a reader came for are the patients scored
for the first time and those whose score moved, so they come first, and their counts are said.
Only the previous file's `patient_id` and `probability` columns are read. The result is small
(counts and the ids shown) and goes into risk_scores' manifest, so a reused materialization shows
the same preview.
"""

from __future__ import annotations

from pathlib import Path

from gcmlm_assets.lazy import lazy

pa = lazy("pyarrow")
pc = lazy("pyarrow.compute")
pq = lazy("pyarrow.parquet")

ID_COLUMN = "patient_id"
PROBABILITY = "probability"
CHANGED_BY = 1e-9  # a probability that moved by more is "changed" (a refit's float noise is far below)
PREVIEW_ROWS = 10


def score_changes(previous_path: Path | None, scores, shown: int = PREVIEW_ROWS) -> dict:
    """{"previous": whether there were scores before, "new": count, "changed": count, "shown": the
    ids to show first (new by id, then changed by the largest move), "moves": {id: change}} for
    `scores` (a table with patient_id and probability) against the file at `previous_path`."""
    ids = scores.column(ID_COLUMN).to_pylist()
    probabilities = scores.column(PROBABILITY).to_pylist()
    previous: dict[str, float] = {}
    had_previous = previous_path is not None and Path(previous_path).is_file()
    unreadable = ""
    if had_previous:
        try:
            old = pq.read_table(previous_path, columns=[ID_COLUMN, PROBABILITY])
            previous = dict(zip(old.column(ID_COLUMN).to_pylist(), old.column(PROBABILITY).to_pylist()))
        except (OSError, ValueError, KeyError, pa.ArrowException) as error:  # a damaged file: no comparison
            had_previous, unreadable = False, f"{previous_path}: {type(error).__name__}: {error}"
    new = sorted(p for p in ids if p not in previous)
    moves = {p: value - previous[p] for p, value in zip(ids, probabilities)
             if p in previous and value is not None and previous[p] is not None
             and abs(value - previous[p]) > CHANGED_BY}
    changed = sorted(moves, key=lambda p: (-abs(moves[p]), p))
    first = (new + changed)[:shown]
    return {"previous": had_previous, "new": len(new), "changed": len(changed), "shown": first,
            "moves": {p: moves[p] for p in first if p in moves}, "previous_unreadable": unreadable}


def preview_table(scores, changes: dict, names: list[str], rows: int = PREVIEW_ROWS):
    """The rows to preview: `changes["shown"]` first (with a `change` column: new, or the move),
    then the other patients by the table's order, `rows` in all."""
    first = list(changes.get("shown") or [])[:rows]
    picked = scores.filter(pc.is_in(scores.column(ID_COLUMN), value_set=pa.array(first, pa.string())))
    by_id = {p: i for i, p in enumerate(picked.column(ID_COLUMN).to_pylist())}
    head = picked.take(pa.array([by_id[p] for p in first if p in by_id], pa.int64())).select(names)
    rest = scores.filter(pc.invert(pc.is_in(scores.column(ID_COLUMN), value_set=pa.array(first, pa.string()))))
    table = pa.concat_tables([head, rest.slice(0, max(0, rows - head.num_rows)).select(names)])
    moves = changes.get("moves") or {}
    labels = ["" if i >= head.num_rows else f"changed ({moves[p]:+.4f})" if p in moves else "new"
              for i, p in enumerate(table.column(ID_COLUMN).to_pylist())]
    return table.append_column("change", pa.array(labels, pa.string()))


def changes_line(changes: dict, scored: int) -> str:
    """One sentence saying how many scores are new and changed, and which rows come first."""
    if changes.get("previous_unreadable"):
        return (f"The previous scores could not be read ({changes['previous_unreadable']}): all {scored} patients "
                "are counted as newly scored.")
    if not changes.get("previous"):
        return f"First scores: all {scored} patients are newly scored."
    return (f"{changes['new']} newly scored and {changes['changed']} with a changed score since the previous "
            f"scores (of {scored}); they are shown first (new, then the largest changes).")
