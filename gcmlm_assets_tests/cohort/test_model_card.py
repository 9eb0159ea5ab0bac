"""The TRIPOD+AI model card: participant flow, limitations and the markdown, from real parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gcmlm_assets.cohort import clinical, crossval, fusion, importance
from gcmlm_assets.cohort import metrics as model_metrics
from gcmlm_assets.cohort import model_card as MC
from gcmlm_assets.cohort import modelling as M
from gcmlm_assets.cohort import model_settings
from gcmlm_assets.cohort import training
from gcmlm_assets.cohort.cohort_data import CohortData
from gcmlm_assets_tests.cohort.synthetic import make_cohort, write_cohort_files, write_radiomics_row

SETTINGS = M.ModelSettings(n_splits=4, n_repeats=2, n_bootstrap=200)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A cohort run end to end through the real modules: clinical.csv with a bad row and a patient
    without files, a damaged radiomics file, a patient with features but no clinical row, an
    unknown label; CV, metrics, the final model and its permutation importance."""
    root = tmp_path_factory.mktemp("card")
    (root / "landing").mkdir()
    ids, _ = write_cohort_files(root, 40, seed=2, without_pathology={"P003", "P004"}, unknown_labels={"P005"})
    artifacts = root / "artifacts"
    (artifacts / "radiomics_row" / "P007" / "radiomics.parquet").write_bytes(b"not a parquet file")
    write_radiomics_row(artifacts, "P600", make_cohort(1, seed=9)[2][0])
    csv_path = root / "landing" / "clinical.csv"
    with csv_path.open("a") as handle:
        handle.write("P500,1,61,12.5\nP501,7,70,3.0\n")  # P500: no files yet; P501: an impossible label

    parsed, problems = clinical.read_clinical_csv(csv_path)
    summary = {"rows_read": parsed.rows_read, "patients": parsed.table.num_rows, "bad_rows": len(problems),
               "covariates": parsed.covariates, "labels": clinical.label_counts(parsed.table)}
    table, report = fusion.build_fused_table(artifacts, parsed.table)
    stats = fusion.fused_stats(table)
    data = CohortData.from_table(table, SETTINGS.blocks())
    cv = crossval.cross_validate(data, SETTINGS)
    metrics, _ = model_metrics.evaluate_cross_validation(cv, SETTINGS)
    # a row evaluate() cannot score: one positive patient
    metrics["radiology_small"], _ = model_metrics.evaluate(np.array([0, 0, 1]), np.full((1, 3), 0.4), 10, 0)
    model, fitted = training.fit_risk_model(data, SETTINGS, metrics["fused"]["youden_threshold"])
    rows = importance.permutation_importance(importance.model_predictor(model), model.cohort_data(table),
                                             model.blocks, n_repeats=2)
    flow = MC.cohort_flow(summary, json.loads(fusion.report_json(report)), stats,
                          stats["labelled_with_features"], len(cv.labels),
                          clinical_problems=[p.as_dict() for p in problems],
                          unlabelled=[str(p) for p in data.patient_ids[data.any_block() & ~data.labelled]])
    assert {"patient_id": "P005", "reason": "no MLM label yet (mlm empty): scored, not trained on"} in flow[4][
        "excluded"]
    card = MC.model_card(
        model, settings=SETTINGS, fitted=fitted, metrics=metrics, cv=cv,
        data_versions={"fused_table_sha256": "abc123", "fused_table": str(root / "fused.parquet")},
        data={"landing_zone": str(root / "landing"),
              "clinical_csv": {"path": str(csv_path), "sha256": "c0ffee", "modified": "2025-03-01T10:00:00"},
              "fused_table": {"path": str(root / "fused.parquet"), "sha256": "abc123", "built": "2025-03-02T09:00:00"},
              "trained_at": "2025-03-02T09:30:00"},
        flow=flow,
        fusion={"rule": model_settings.fusion_strategy(M.ModelSettings()), "default": "mean logit", "why": "no fitted combiner can overfit",
                "combiner": {"kind": "none"}},
        explanation={"method": "permutation importance on the final model", "notes": "training patients"},
        permutation_importance=rows)
    stored = json.loads(json.dumps(MC.json_safe(card)))  # as model_card.json holds it
    (root / "model_card.md").write_text(MC.model_card_markdown(stored))
    return {"card": stored, "markdown": MC.model_card_markdown(stored), "metrics": stored["metrics"],
            "flow": flow, "problems": problems, "labels": card["model_labels"]}


def test_every_tripod_section_is_headed(realistic):
    md = realistic["markdown"]
    positions = [md.index(f"## {i}. {title}\n") for i, title in enumerate(MC.TRIPOD_SECTIONS, start=1)]
    assert positions == sorted(positions)
    assert md.startswith("# Model card: MLM risk")
    assert MC.NOT_RECORDED not in md  # every key was given


def test_every_row_shows_discrimination_calibration_and_net_benefit(realistic):
    md, labels = realistic["markdown"], realistic["labels"]
    scored = [k for k, m in realistic["metrics"].items() if "auc" in m]
    assert set(scored) >= {"radiology", "pathology", "fused", "fused_all_modalities"}
    for key in scored:
        m = realistic["metrics"][key]
        assert f"| {labels[key]} | {m['patients']} ({m['positive']}/{m['negative']}) | {m['auc']:.3f} " \
               f"[{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}] |" in md
        slope = "not estimable" if m["calibration_slope"] is None else f"{m['calibration_slope']:.3f}"
        assert f"| {labels[key]} | {slope} | {m['calibration_intercept']:.3f} | {m['brier']:.3f} |" in md
        assert all(f"{v:.4f}" in md for v in m["net_benefit"].values())
    assert "fewer than 2 patients of a class have predictions" in md  # the unscored row says why
    fused = realistic["metrics"]["fused"]
    prevalence = fused["positive"] / fused["patients"]
    assert f"{prevalence - (1 - prevalence) * 0.2 / 0.8:.4f}" in md  # treat all at 0.2


def test_the_flow_counts_and_names_who_was_left_out(realistic):
    flow, md = realistic["flow"], realistic["markdown"]
    assert [s["patients"] for s in flow] == [42, 41, 42, 41, 39, 39]
    bad_line = realistic["problems"][0]
    assert bad_line.patient_id == "P501"
    assert f"P501: line {bad_line.line}: {bad_line.reason}" in md
    assert "P007: radiology file rejected: unreadable parquet" in md
    assert "P500: clinical row but no feature file yet" in md
    assert "P600: features but no clinical row" in md
    assert "P005: no MLM label yet (mlm empty)" in md  # named, with the reason
    assert "| radiology | 1 | 39 |" in md and "| pathology | 2 | 39 |" in md  # P007; P003, P004


def test_development_explanations_and_limitations(realistic):
    md = realistic["markdown"]
    assert "mean of the logits" in md and "combiner: kind = none" in md
    assert "radiology: 38 training patients" in md
    assert "| block | radiology | (whole block) |" in md and "| block | pathology | (whole block) |" in md
    assert "Internal validation only" in md and "Small cohort: 39 patients" in md
    assert "- scikit-learn: 1." in md and "- n_bootstrap: 200" in md and "- risk_threshold: null" in md
    assert "2025-03-01T10:00:00" in md and "c0ffee" in md


def test_a_card_with_most_keys_missing_still_renders():
    for card in ({}, {"model": "x", "metrics": {"fused": {"patients": 10, "positive": 1, "negative": 9,
                                                          "note": "too few"}}},
                 {"flow": "garbage", "missing": [], "blocks": {"radiology": None}, "validation": None}):
        md = MC.model_card_markdown(card)
        assert all(f"## {i}. {t}" in md for i, t in enumerate(MC.TRIPOD_SECTIONS, start=1))
        assert "not recorded" in md
    md = MC.model_card_markdown({})
    assert "Participant flow not recorded" in md and "- landing zone: not recorded" in md
    stored = MC.model_card_markdown({"metrics": {"fused": {"patients": 9, "positive": 4, "negative": 5, "auc": 0.7,
                                                           "auc_ci_low": 0.5, "auc_ci_high": 0.9,
                                                           "calibration_slope": None}}})
    assert "| fused | not estimable | not recorded | not recorded |" in stored  # no labels recorded: the key


def test_cohort_flow_names_patients_whose_only_files_were_rejected():
    report = {"file_problems": [{"patient_id": "P9", "modality": "radiology", "file": "f", "reason": "no rows"}],
              "excluded_results": [{"patient_id": "P2", "modality": "pathology", "file": "g",
                                    "reason": "failed check"}],
              "features_without_clinical": [], "clinical_without_features": ["P3"]}
    stats = {"patients": 5, "with_features": 3}
    flow = MC.cohort_flow({"rows_read": 4, "patients": 4, "bad_rows": 0}, {**report, "excluded_results": []},
                          stats, {"positive": 1, "negative": 2}, 3)
    step = flow[3]["excluded"]
    assert {e["patient_id"] for e in step} == {"P3", "P9"}
    assert "no rows; no clinical row" in next(e["reason"] for e in step if e["patient_id"] == "P9")
    # with P2's pathology left out too, the report cannot tell which of P2 and P9 lost every block
    flow = MC.cohort_flow({"rows_read": 4, "patients": 4, "bad_rows": 0}, report, stats,
                          {"positive": 1, "negative": 2}, 3)
    assert [e["patient_id"] for e in flow[3]["excluded"]] == ["P3", None]
    assert "P2" in {e["patient_id"] for e in flow[2]["excluded"]}  # named where its pathology was left out
    # the bad rows are counted when their list is not given
    flow = MC.cohort_flow({"rows_read": 6, "patients": 4, "bad_rows": 2}, report, {**stats, "patients": 6},
                          {"positive": 1, "negative": 2}, 2)
    assert flow[1]["excluded"] == [{"patient_id": None, "reason": "2 rows rejected (listed in clinical_table's "
                                                                  "problems file)"}]
    # 2 patients lost at that step and exactly 2 candidates: both named
    assert [e["patient_id"] for e in flow[3]["excluded"]] == ["P3", "P2", "P9"]
    assert flow[-1]["excluded"][0]["reason"].startswith("1 labelled patients not cross-validated")


def test_default_limitations_follow_the_settings_and_numbers():
    metrics = {"fused": {"patients": 500, "positive": 150, "calibration_slope": 0.6}}
    plain = MC.default_limitations(M.ModelSettings(), metrics)
    assert not any("Small cohort" in item for item in plain)
    assert any("Calibration slope below 0.8 (fused, mean logit (the model) 0.60)" in item for item in plain)
    assert any("class_weight='balanced'" in item for item in plain)
    flagged = MC.default_limitations({"encoder": {"name": "vit-tiny-random", "untrained": True},
                                      "synthetic_data": True}, {"fused": {"patients": 60, "positive": 20}})
    assert any("Small cohort: 60 patients with 20 MLM events" in item for item in flagged)
    assert any("untrained encoder (vit-tiny-random)" in item for item in flagged)
    assert any("synthetic" in item for item in flagged)
