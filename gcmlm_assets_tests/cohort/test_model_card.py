"""The TRIPOD+AI model card: participant flow, limitations and the markdown, from real parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gcmlm_assets.catalogue import RADIOMICS_TABLE
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets.cohort.card import card_context
from gcmlm_assets.cohort.tables import clinical, fusion
from gcmlm_assets.cohort.model import crossval
from gcmlm_assets.cohort.explain import importance
from gcmlm_assets.cohort.model import metrics as model_metrics
from gcmlm_assets.cohort.card import model_card as MC
from gcmlm_assets.cohort.model import modelling as M
from gcmlm_assets.cohort.model import training
from gcmlm_assets.cohort.tables.cohort_data import CohortData
from gcmlm_assets_tests.support.cohort.synthetic import make_cohort, write_cohort_files, write_radiomics_row

SETTINGS = M.ModelSettings(n_splits=4, n_repeats=2, n_bootstrap=200)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A cohort run end to end through the real modules: clinical.csv with a bad row and a patient
    without files, a damaged radiomics file, a patient with features but no clinical row, an
    unknown label; the training table, CV, metrics, the final model, its permutation importance and
    the card's context as risk_model builds them."""
    root = tmp_path_factory.mktemp("card")
    (root / "landing").mkdir()
    ids, _ = write_cohort_files(root, 40, seed=2, without_pathology={"P003", "P004"}, unknown_labels={"P005"})
    artifacts = root / "artifacts"
    RADIOMICS_TABLE.path(ArtifactStore(artifacts), "P007").write_bytes(b"not a parquet file")
    write_radiomics_row(artifacts, "P600", make_cohort(1, seed=9)[2][0])
    csv_path = root / "landing" / "clinical.csv"
    with csv_path.open("a") as handle:
        handle.write("P500,1,61,12.5\nP501,7,70,3.0\n")  # P500: no files yet; P501: an impossible label

    parsed, problems = clinical.read_clinical_csv(csv_path)
    table, report = fusion.build_fused_table(artifacts, parsed.table)
    rows_used = training.training_table(table, SETTINGS.blocks())
    data = CohortData.from_table(rows_used, SETTINGS.blocks())
    cv = crossval.cross_validate(data, SETTINGS)
    metrics, _ = model_metrics.evaluate_cross_validation(cv, SETTINGS)
    # a row evaluate() cannot score: one positive patient
    metrics["radiology_small"], _ = model_metrics.evaluate(np.array([0, 0, 1]), np.full((1, 3), 0.4), 10, 0)
    model, fitted = training.fit_risk_model(data, SETTINGS, metrics["fused"]["youden_threshold"])
    rows = importance.permutation_importance(importance.model_predictor(model), model.cohort_data(rows_used),
                                             model.blocks, n_repeats=2)
    records = card_context.CohortRecords(clinical_manifest={"source": {"path": str(csv_path)}},
                                         fusion_report=json.loads(fusion.report_json(report)),
                                         fused_path=root / "fused.parquet", encoder=None)
    digest = training.training_data_sha256(rows_used)
    card = MC.model_card(
        model, settings=SETTINGS, fitted=fitted, metrics=metrics, cv=cv,
        data_versions={"training_data_sha256": digest, "fused_table": str(root / "fused.parquet")},
        **card_context.card_context(records, data, cv, SETTINGS, model, metrics,
                                    {"sha256": digest, "patch_features_sha256": None}),
        permutation_importance=rows)
    stored = json.loads(json.dumps(MC.json_safe(card)))  # as model_card.json holds it
    (root / "model_card.md").write_text(MC.model_card_markdown(stored))
    return {"card": stored, "markdown": MC.model_card_markdown(stored), "metrics": stored["metrics"],
            "flow": card["flow"], "problems": problems, "labels": card["model_labels"], "digest": digest}


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


def test_the_flow_counts_and_names_the_labelled_patients_left_out(realistic):
    flow, md = realistic["flow"], realistic["markdown"]
    # 39 labelled of P000-P039 (P005 has no label) and P500; P500 has no features yet
    assert [s["patients"] for s in flow] == [40, 39, 39]
    [p007] = [line for line in md.splitlines() if "P007" in line]
    assert "P007: radiology file rejected: unreadable parquet" in p007
    assert p007.endswith("(patient kept with the data left)")
    assert "P500: clinical row but no feature file yet" in md
    # Patients who are not training data are not named: they come and go without changing the card.
    for outside in ("P005", "P600", "P501"):
        assert outside not in md
    assert MC.NOT_TRAINING_DATA in md and MC.NOT_IN_TABLE in md
    assert "| radiology | 1 | 39 |" in md and "| pathology | 2 | 39 |" in md  # P007; P003, P004


def test_development_explanations_and_limitations(realistic):
    md = realistic["markdown"]
    assert "mean of the logits" in md and "combiner: rule = mean of the logits of the blocks" in md
    assert "radiology: 38 training patients" in md
    assert "| block | radiology | (whole block) |" in md and "| block | pathology | (whole block) |" in md
    assert "Internal validation only" in md and "Small cohort: 39 patients" in md
    assert "- scikit-learn: 1." in md and "- n_bootstrap: 200" in md and "- risk_threshold: null" in md
    assert f"- training data sha256: {realistic['digest']}" in md
    assert "- training data: the labelled rows of the fused table, sorted by patient id: 40 patients" in md
    assert "- patients added later: without a label: scored by this model as it is, no refit" in md
    assert "- model trained: the time of this materialization in Dagster" in md


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


def test_the_training_flow_gives_why_a_labelled_patient_lost_a_modality_or_every_block():
    report = {"file_problems": [{"patient_id": "P9", "modality": "radiology", "file": "f", "reason": "no rows"}],
              "excluded_results": [{"patient_id": "P2", "modality": "pathology", "file": "g",
                                    "reason": "failed check"},
                                   {"patient_id": "P7", "modality": "radiology", "file": "h",
                                    "reason": "failed check"}]}
    labelled = [("P1", 1, True), ("P2", 0, True), ("P3", 1, False), ("P9", 0, False)]
    flow = MC.training_flow(labelled, report, 2)
    assert [s["patients"] for s in flow] == [4, 2, 2]
    assert flow[0]["step"] == "labelled patients in the fused table (2 MLM, 2 no MLM)"
    assert flow[0]["excluded"] == [{"patient_id": "P2", "reason": "pathology result left out: failed check "
                                                                   "(patient kept with the data left)"}]
    assert flow[1]["step"] == "labelled patients with features (1 MLM, 1 no MLM)"
    assert flow[1]["excluded"] == [{"patient_id": "P3", "reason": "clinical row but no feature file yet"},
                                   {"patient_id": "P9", "reason": "radiology file rejected: no rows"}]
    assert flow[2]["excluded"] == []  # P7 is not labelled: not in the flow
    assert MC.training_flow(labelled, report, 1)[-1]["excluded"] == [
        {"patient_id": None, "reason": "1 labelled patients not cross-validated"}]


def test_a_card_written_before_the_training_data_was_hashed_still_renders_its_sources():
    md = MC.model_card_markdown({"data": {"clinical_csv": {"path": "/l/clinical.csv", "sha256": "c0ffee",
                                                           "modified": "2025-03-01T10:00:00"},
                                          "fused_table": {"path": "/a/fused.parquet", "sha256": "abc123"}}})
    for line in ("- clinical.csv sha256: c0ffee", "- clinical.csv modified: 2025-03-01T10:00:00",
                 "- fused table sha256: abc123", "- training data: not recorded"):
        assert line in md


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
