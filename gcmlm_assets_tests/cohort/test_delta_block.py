"""Several CT scans per patient: the delta row, which scans feed fused_table, and the delta block."""

import json
import math

import dagster as dg
import numpy as np
import pytest

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort.resources import FusedTableSettings, RiskModelSettings
from gcmlm_assets.cohort.tables import deltas
from gcmlm_assets.cohort.tables.clinical import parse_clinical_csv
from gcmlm_assets.cohort.tables.fusion import build_fused_table, fused_stats, report_json
from gcmlm_assets.cohort.tables.scan_choice import choose_scans
from gcmlm_assets_tests.support.cohort.synthetic import (
    RADIOMICS_NAMES, make_cohort, write_clinical_csv, write_radiomics_row, write_slide_vector)
from gcmlm_assets_tests.support.cohort.upstream import (
    StandInConfig, add_patients, materialize_patients, report_sound_results)

FIRST, LAST = "P001@2024-01-10", "P001@2024-03-10"


def test_delta_row_diff_rel_days_and_similarity():
    row = deltas.delta_row(["a", "b", "c", "z"], {"a": 2.0, "b": -4.0, "c": 1e-15, "z": 0.0},
                           {"a": 3.0, "b": -2.0, "c": 1.0, "z": 0.0}, "2024-01-10", "2024-03-10")
    assert list(row) == deltas.delta_names(["a", "b", "c", "z"])
    assert row["a_diff"] == 1.0 and row["a_rel"] == 0.5
    assert row["b_diff"] == 2.0 and row["b_rel"] == 0.5  # relative to |first|
    assert row["c_diff"] == pytest.approx(1.0) and math.isnan(row["c_rel"])  # |first| < 1e-12: no scale
    assert row["z_diff"] == 0.0 and math.isnan(row["z_rel"])
    assert row["days"] == 60.0
    # per feature |diff| / (|first| + |last|): 1/5, 2/6, ~1, 0 (0/0 counts as no change)
    assert row["similarity"] == pytest.approx(1 - (1 / 5 + 2 / 6 + 1.0 + 0.0) / 4)
    same = deltas.delta_row(["a"], {"a": 7.0}, {"a": 7.0}, "baseline", "post_nact")
    assert same["similarity"] == 1.0 and math.isnan(same["days"])  # labels carry no date


def test_delta_row_is_robust_to_nan_features():
    row = deltas.delta_row(["a", "b", "c"], {"a": float("nan"), "b": 1.0, "c": 2.0},
                           {"a": 1.0, "b": None, "c": 4.0}, None, None)
    assert math.isnan(row["a_diff"]) and math.isnan(row["a_rel"]) and math.isnan(row["b_diff"])
    assert row["c_diff"] == 2.0 and row["c_rel"] == 1.0
    assert row["similarity"] == pytest.approx(1 - 2 / 6)  # only c is finite in both
    nothing = deltas.delta_row(["a"], {"a": float("nan")}, {}, None, None)
    assert math.isnan(nothing["similarity"])


def test_choose_scans_baseline_first_last_and_a_named_timepoint():
    keys = ["P002", "P001@post_nact", "P001@baseline", "P003@2024-05-01", "P003@2023-12-01", "bad@@"]
    choices = choose_scans(keys)
    assert set(choices) == {"P001", "P002", "P003"}
    assert str(choices["P001"].radiology) == "P001@baseline"
    assert [str(s) for s in choices["P001"].delta] == ["P001@baseline", "P001@post_nact"]
    assert str(choices["P002"].radiology) == "P002" and choices["P002"].delta is None
    assert str(choices["P003"].radiology) == "P003@2023-12-01"  # no baseline label: the oldest
    assert str(choose_scans(keys, "last")["P003"].radiology) == "P003@2024-05-01"
    named = choose_scans(keys, "post_nact")
    assert str(named["P001"].radiology) == "P001@post_nact" and named["P003"].radiology is None


def _two_scan_cohort(artifacts):
    """P000 and P002: one scan each (key = patient id); P001: two dated scans, its row naming the
    patient id in the second (the radiology assets may write either)."""
    ids, _, radiomics, pathology = make_cohort(3, seed=4)
    write_radiomics_row(artifacts, "P000", radiomics[0])
    write_radiomics_row(artifacts, "P002", radiomics[2])
    later = radiomics[1] * 1.5
    later[3] = np.nan
    write_radiomics_row(artifacts, FIRST, radiomics[1])
    write_radiomics_row(artifacts, LAST, later, row_id="P001")
    for i, patient_id in enumerate(ids):
        write_slide_vector(artifacts, patient_id, pathology[i])
    parsed, problems = parse_clinical_csv("patient_id,mlm\nP000,1\nP001,0\nP002,1\n")
    assert problems == []
    return radiomics, later, parsed.table


def test_fused_table_from_two_scans(tmp_path):
    artifacts = tmp_path / "artifacts"
    radiomics, later, clinical = _two_scan_cohort(artifacts)
    known = {"P000", "P002", FIRST, LAST}

    table, report = build_fused_table(artifacts, clinical, known_patients={"P000", "P001", "P002"},
                                      known_scans=known)
    rows = {r["patient_id"]: r for r in table.to_pylist()}
    rad = ["rad_" + n for n in RADIOMICS_NAMES]
    # the radiology block from the baseline (the oldest scan) by default
    assert [rows["P001"][c] for c in rad] == list(radiomics[1])
    assert [rows["P000"][c] for c in rad] == list(radiomics[0])
    # the delta block, after every other column, only for the patient with two scans
    assert table.column_names.index("has_delta") > table.column_names.index("has_lymph_node")
    assert [rows[p]["has_delta"] for p in ("P000", "P001", "P002")] == [False, True, False]
    name = RADIOMICS_NAMES[0]
    assert rows["P001"][f"delta_{name}_diff"] == pytest.approx(later[0] - radiomics[1, 0])
    assert rows["P001"][f"delta_{name}_rel"] == pytest.approx((later[0] - radiomics[1, 0]) / abs(radiomics[1, 0]))
    assert math.isnan(rows["P001"][f"delta_{RADIOMICS_NAMES[3]}_diff"])  # a NaN feature stays NaN
    assert rows["P001"]["delta_days"] == 60.0
    assert 0 < rows["P001"]["delta_similarity"] < 1
    assert rows["P000"][f"delta_{name}_diff"] is None and rows["P000"]["delta_days"] is None  # absent: null
    assert fused_stats(table)["with_delta"] == 1
    assert report.file_problems == [] and report.stale_folders == []
    written = json.loads(report_json(report))["scans"]
    assert written["P001"] == {"scans": [FIRST, LAST], "radiology": FIRST, "delta": [FIRST, LAST]}
    assert written["P000"] == {"scans": ["P000"], "radiology": "P000", "delta": None}

    last, _ = build_fused_table(artifacts, clinical, known_scans=known, radiology_timepoint="last")
    last_rows = {r["patient_id"]: r for r in last.to_pylist()}
    assert last_rows["P001"][rad[0]] == later[0] and last_rows["P000"][rad[0]] == radiomics[0, 0]
    assert last.column("delta_days").to_pylist() == table.column("delta_days").to_pylist()


def test_single_scan_patients_read_as_before(tmp_path):
    artifacts = tmp_path / "artifacts"
    radiomics, _, clinical = _two_scan_cohort(artifacts)
    # without P001's scans known, P001's folders are stale and the table is that of single scans
    table, report = build_fused_table(artifacts, clinical, known_scans={"P000", "P002"})
    assert {s["folder"].rsplit("/", 1)[-1] for s in report.stale_folders} == {FIRST, LAST}
    assert not any(c.startswith("delta_") for c in table.column_names)
    assert table.column("has_delta").to_pylist() == [False, False, False]
    assert sorted(report.input_files) == ["radiomics_row/P000/radiomics.parquet", "radiomics_row/P002/radiomics.parquet",
                                          *(f"slide_vector/P00{i}/slide_vector.parquet" for i in range(3))]
    before = table.drop_columns(["has_delta"])
    assert before.column_names[:5] == ["patient_id", "has_radiology", "has_pathology", "has_clinical", "mlm"]
    assert before.column_names[-1] == "has_lymph_node"


def test_a_first_or_last_scan_without_a_usable_row_drops_the_delta_block_and_says_which(tmp_path):
    artifacts = tmp_path / "artifacts"
    radiomics, _, clinical = _two_scan_cohort(artifacts)
    middle = "P001@2024-02-10"  # a scan between: the pair is still the first and the last of all scans
    write_radiomics_row(artifacts, middle, radiomics[1] * 1.1)
    (artifacts / "radiomics_row" / LAST / "radiomics.parquet").unlink()  # its CT failed: no row was written
    known = {"P000", "P002", FIRST, middle, LAST}
    table, report = build_fused_table(artifacts, clinical, known_scans=known)
    assert table.column("has_delta").to_pylist() == [False, False, False]  # never the first with the middle one
    assert table.column("has_radiology").to_pylist() == [True, True, True]  # the baseline scan is intact
    entry = next(e for e in report.excluded_results if e["modality"] == "delta")
    assert entry["patient_id"] == "P001" and entry["file"].endswith(f"radiomics_row/{LAST}/radiomics.parquet")
    assert report.excluded_patients() == {"P001": {"delta": f"the last scan {LAST} has no radiomics_row (its CT "
                                                            "steps failed or have not finished)"}}
    # an unreadable first scan: file_problems says why, the delta's reason names the scan
    (artifacts / "radiomics_row" / FIRST / "radiomics.parquet").write_text("not parquet")
    write_radiomics_row(artifacts, LAST, radiomics[1])
    _, report = build_fused_table(artifacts, clinical, known_scans=known)
    assert [p["reason"].split(":")[0] for p in report.file_problems] == [f"scan {FIRST}"]
    assert report.excluded_patients()["P001"]["delta"] == (f"the first scan {FIRST}'s radiomics_row cannot be used "
                                                           "(file_problems says why)")


def test_an_unsound_second_scan_drops_only_the_delta_block(data_root, instance, base_resources):
    artifacts = data_root / "artifacts"
    _two_scan_cohort(artifacts)
    write_clinical_csv(data_root / "landing", ["P000", "P001", "P002"], [1, 0, 1])
    add_patients(instance, ["P000", "P001", "P002"], scans=["P000", FIRST, LAST, "P002"])
    report_sound_results(instance, artifacts, ["P000", "P002", FIRST])
    report_sound_results(instance, artifacts, ["P001"])  # its slide vector
    (failed,) = materialize_patients(instance, artifacts, [LAST], config={
        "radiomics_row": StandInConfig(failing_check="radiomics_row_finite")})
    assert not failed.success

    def fused(settings):
        result = dg.materialize([*cohort_assets.ASSETS, *cohort_checks.CHECKS], instance=instance,
                                resources={**base_resources, "risk_model": RiskModelSettings(), "fused_table": settings},
                                raise_on_error=False, selection=["clinical_table", "fused_table"])
        assert result.success
        (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "fused_table"]
        return {k: v.value for k, v in event.materialization.metadata.items()}

    baseline = fused(FusedTableSettings())
    assert baseline["with_delta"] == 0 and baseline["with_radiology"] == 3  # the baseline scan is sound
    reason = baseline["excluded_patients"]["P001"]["delta"]
    assert reason.startswith(f"the last scan {LAST} is left out: blocking check radiomics_row_finite failed")
    assert baseline["radiology_timepoint"] == "baseline" and baseline["patients_with_several_scans"] == 1
    last = fused(FusedTableSettings(radiology_timepoint="last"))
    assert last["with_radiology"] == 2  # the chosen scan is the unsound one: no radiology block
    assert last["excluded_patients"]["P001"]["radiology"].startswith(f"scan {LAST}: blocking check")
    assert last["input_fingerprint"] != baseline["input_fingerprint"]


def test_a_bad_radiology_timepoint_setting_fails_with_its_reason():
    assert FusedTableSettings(radiology_timepoint="post_nact").timepoint_problem() is None
    assert FusedTableSettings(radiology_timepoint="2024-02-30").timepoint_problem() is not None
    assert "neither one of baseline, first, last" in FusedTableSettings(radiology_timepoint="Post NACT").timepoint_problem()
