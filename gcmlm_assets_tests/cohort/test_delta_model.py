"""The delta block (issue 25) in the risk model: its own ablation row with calibration, a fused row
on the patients with two CT scans, exact per-feature contributions, a risk_scores column, the model
card and the FHIR basis; the other blocks' rows stay as they are."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from gcmlm_assets.cohort.card import card_context
from gcmlm_assets.cohort.card import model_card as MC
from gcmlm_assets.cohort.exchange import fhir_risk
from gcmlm_assets.cohort.explain import patient_explanation
from gcmlm_assets.cohort.model import crossval, metrics, modelling, training
from gcmlm_assets.cohort.model.model_settings import FUSED, FUSED_WITH_DELTA, ModelSettings, model_labels
from gcmlm_assets.cohort.tables.clinical import parse_clinical_csv
from gcmlm_assets.cohort.tables.cohort_data import CohortData
from gcmlm_assets.cohort.tables.fusion import AVAILABILITY, DELTA, PATHOLOGY, RADIOLOGY, build_fused_table
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.cohort.synthetic import (
    RADIOMICS_NAMES, make_cohort, write_radiomics_row, write_slide_vector)

FAST = ModelSettings(n_splits=3, n_repeats=1, n_bootstrap=50, pca_components=4, abmil_in_ablation=False)
CHANGING = ("original_glcm_Idm", "original_glszm_ZoneEntropy", "original_gldm_DependenceEntropy")


@pytest.fixture(scope="module")
def delta_cohort(tmp_path_factory):
    """36 patients, 27 scanned twice; the label shows in how three features change between the scans
    (and barely in either scan)."""
    artifacts = tmp_path_factory.mktemp("cohort") / "artifacts"
    ids, labels, radiomics, pathology = make_cohort(36, seed=5, signal=0.2)
    rng = np.random.default_rng(9)
    for i, patient_id in enumerate(ids):
        write_slide_vector(artifacts, patient_id, pathology[i, :16])
        if i % 4 == 0:
            write_radiomics_row(artifacts, patient_id, radiomics[i])  # one scan, directly in ct/
            continue
        change = 1 + 0.05 * rng.normal(size=len(RADIOMICS_NAMES))
        for name in CHANGING:
            change[RADIOMICS_NAMES.index(name)] += 0.6 * labels[i]
        write_radiomics_row(artifacts, f"{patient_id}@2024-01-10", radiomics[i])
        write_radiomics_row(artifacts, f"{patient_id}@2024-04-10", radiomics[i] * change)
    parsed, problems = parse_clinical_csv("patient_id,mlm\n" + "".join(f"{p},{y}\n" for p, y in zip(ids, labels)))
    assert problems == []
    fused, report = build_fused_table(artifacts, parsed.table)
    assert report.file_problems == [] and sum(fused.column("has_delta").to_pylist()) == 27
    data = CohortData.from_table(training.training_table(fused, FAST.blocks()), FAST.blocks())
    cv = crossval.cross_validate(data, FAST)
    found, _ = metrics.evaluate_cross_validation(cv, FAST)
    model, fitted = training.fit_risk_model(data, FAST, 0.5)
    return fused, data, found, model, fitted, cv, report


def test_the_ablation_has_a_delta_row_and_the_other_rows_are_unchanged(delta_cohort):
    fused, _, found, _, fitted, _, _ = delta_cohort
    assert found[DELTA]["patients"] == 27 and found[DELTA]["auc"] > 0.8  # the change carries the label
    assert "calibration_slope" in found[DELTA] and "brier" in found[DELTA] and "net_benefit" in found[DELTA]
    assert found[FUSED_WITH_DELTA]["patients"] == 27 and found[FUSED]["patients"] == 36
    assert fitted[DELTA]["train_patients"] == 27 and fitted[DELTA]["selected_features"]
    table = metrics.ablation_markdown(found, model_labels(FAST))
    assert "| delta radiomics (first to last CT scan) | 27 (" in table
    assert "patients with two or more CT scans" in table

    # the same cohort without the delta block: its radiology and pathology rows, exactly
    plain = fused.drop_columns([c for c in fused.column_names if c.startswith("delta_") or c == "has_delta"])
    data = CohortData.from_table(training.training_table(plain, FAST.blocks()), FAST.blocks())
    plain_found, _ = metrics.evaluate_cross_validation(crossval.cross_validate(data, FAST), FAST)
    assert DELTA not in plain_found and FUSED_WITH_DELTA not in plain_found
    for block in (RADIOLOGY, PATHOLOGY):
        assert found[block] == plain_found[block]


def test_delta_contributions_add_up_and_scores_name_the_block(delta_cohort, tmp_path):
    fused, model, report = delta_cohort[0], delta_cohort[3], delta_cohort[6]
    loaded = modelling.load_model(modelling.save_model(model, tmp_path / "model.skops"))
    assert loaded.blocks == (RADIOLOGY, PATHOLOGY, DELTA)
    scores = {r["patient_id"]: r for r in loaded.score_table(fused).to_pylist()}
    flags = dict(zip(fused.column("patient_id").to_pylist(), fused.column(AVAILABILITY[DELTA]).to_pylist()))
    for patient_id, row in scores.items():
        if flags[patient_id]:
            assert 0 < row["probability_delta"] < 1 and row["modalities_missing"] == ""
        else:
            assert row["probability_delta"] is None and row["modalities_missing"] == DELTA

    data = loaded.cohort_data(fused)
    logits = loaded.block_logits(data)
    k = loaded.blocks.index(DELTA)
    i = int(np.flatnonzero(data.blocks[DELTA].available)[0])
    explanation = patient_explanation.explain_patient(loaded, data, i, [])
    parts = explanation.feature_contributions[DELTA]
    assert all(name.startswith("delta_") for name in parts.names)
    assert abs(parts.logit - logits[i, k]) <= patient_explanation.EXACT_TOLERANCE
    assert abs(explanation.residuals[DELTA]) <= patient_explanation.EXACT_TOLERANCE
    without = int(np.flatnonzero(~data.blocks[DELTA].available)[0])
    assert patient_explanation.explain_patient(loaded, data, without, []).modalities_missing == [DELTA]

    # the FHIR assessment names the block's inputs, the two scans, and its probability
    rows = loaded.score_table(fused)
    rows = (rows.append_column("model_version", pa.array(["v1"] * rows.num_rows, pa.string()))
            .append_column("explanation_key", pa.array(["k"] * rows.num_rows, pa.string()))).to_pylist()
    identity = fhir_risk.RiskModel(version="v1", sha256=sha256_file(tmp_path / "model.skops"),
                                   risk_threshold=loaded.risk_threshold)
    when = datetime(2026, 12, 7, tzinfo=timezone.utc)
    with_delta = next(r for r in rows if r["probability_delta"] is not None)
    patient_id = with_delta["patient_id"]
    text, missing = fhir_risk.risk_assessment_bundle(with_delta, identity, when, scans=report.scans[patient_id])
    assert missing == [] and "delta model probability" in text and "first CT scan to the last" in text
    inputs = [b["identifier"]["value"] for b in json.loads(text)["entry"][1]["resource"]["basis"]]
    first, last = f"radiomics_row/{patient_id}@2024-01-10", f"radiomics_row/{patient_id}@2024-04-10"
    assert inputs == [f"fused_table/{patient_id}", first, "slide_vector/" + patient_id, first, last]
    with pytest.raises(fhir_risk.RiskAssessmentInputError, match="report names no scan for it"):
        fhir_risk.risk_assessment_bundle(with_delta, identity, when)  # the scans are needed to name them
    single = next(r for r in rows if r["probability_delta"] is None)
    text, missing = fhir_risk.risk_assessment_bundle(single, identity, when, scans=report.scans[single["patient_id"]])
    assert missing == [DELTA] and "Scored without delta (delta: only one CT scan)" in text
    assert f"radiomics_row/{single['patient_id']}\"" in text  # its only scan, keyed by the patient id


def test_the_model_card_names_the_delta_block(delta_cohort, tmp_path):
    _, data, found, model, fitted, cv, _ = delta_cohort
    records = card_context.CohortRecords(clinical_manifest={}, fusion_report={}, fused_path=tmp_path / "fused.parquet",
                                         encoder=None)
    card = MC.model_card(model, FAST, fitted, found, cv, {},
                         **card_context.card_context(records, data, cv, FAST, model, found,
                                                     {"sha256": "x", "patch_features_sha256": None}))
    markdown = MC.model_card_markdown(MC.json_safe(card))
    assert f"- {MC.DELTA_DATA}" in markdown and "not clinical" in MC.DELTA_DATA
    assert "- delta: 27 training patients" in markdown
    assert "| delta radiomics (first to last CT scan) | 27 (" in markdown
    assert "delta (where the patient has two or more CT scans)" in card["strategy"]
