"""The demo summary's CT timepoint counts and the delta block's line, read from a risk model's files."""

from __future__ import annotations

import json

from gcmlm_assets.catalogue import METRICS_FILE, MODEL_FILE, RISK_MODEL
from gcmlm_assets.demo.summary import DELTA_BLOCK, delta_lines, format_summary, planted_change_auc, timepoint_counts
from gcmlm_assets.demo.synthetic_plan import CohortSpec


def summary_with(risk_model_metadata: dict, scan_keys: list[str]) -> dict:
    return {"patients": ["P1", "P2", "P3"], "timepoints": timepoint_counts(scan_keys), "assets": {}, "checks": {},
            "check_failures": [], RISK_MODEL.key: risk_model_metadata, "risk_scores": {}, "landing": "l",
            "artifacts": "a", "dagster_home": "h", "runs": 0}


def test_timepoints_are_counted_per_patient():
    counts = timepoint_counts(["P1", "P2@2024-01-05", "P2@2024-03-01", "P3@baseline", "P3@post_nact", "bad key"])
    assert counts == {"scans": 6, "patients": 3, "with_two_or_more": 2}
    assert timepoint_counts([]) == {"scans": 0, "patients": 0, "with_two_or_more": 0}


def test_the_delta_line_shows_the_delta_row_or_na(tmp_path):
    model_file = MODEL_FILE.in_folder(tmp_path)
    metrics = {"radiology": {"auc": 0.71, "patients": 3},
               DELTA_BLOCK: {"auc": 0.875, "auc_ci_low": 0.6, "auc_ci_high": 1.0, "patients": 2}}
    METRICS_FILE.in_folder(tmp_path).write_text(json.dumps(metrics), encoding="utf-8")
    summary = summary_with({"path": str(model_file)}, ["P1", "P2@2024-01-05", "P2@2024-03-01"])
    assert delta_lines(summary) == [
        "CT timepoints: 3 scans of 2 patients, 1 with two or more",
        "delta radiomics block (change between the first and last CT) CV AUC: 0.875 (95% CI 0.600-1.000), 2 patients"]
    text = format_summary(summary, 60.0)
    assert "0.875" in text and "with two or more" in text

    # No delta row (no patient with two sound scans), no risk model, an older summary: n/a, no error.
    METRICS_FILE.in_folder(tmp_path).write_text(json.dumps({"radiology": metrics["radiology"]}), encoding="utf-8")
    assert delta_lines(summary)[1].endswith("CV AUC: n/a")
    for bare in (summary_with({}, []), {RISK_MODEL.key: {}}):
        assert delta_lines(bare) == ["CT timepoints: 0 scans of 0 patients, 0 with two or more",
                                     "delta radiomics block (change between the first and last CT) CV AUC: n/a"]
    assert "CV AUC: n/a" in format_summary(summary_with({}, ["P1"]), 1.0)


def test_the_planted_change_is_the_delta_blocks_truth():
    assert planted_change_auc(CohortSpec.small(8)) is None  # no second CTs
    truth = planted_change_auc(CohortSpec.small(20, followup_fraction=0.5))
    assert truth["patients"] == 10 and 0.8 <= truth["auc"] <= 1.0
    summary = {"planted_change": truth, RISK_MODEL.key: {}}
    assert delta_lines(summary)[2].startswith("  the generator's planted change itself on its 10 patients")
