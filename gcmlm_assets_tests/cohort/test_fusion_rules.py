"""Stacked fusion and the ABMIL block inside the cross-validation: no leakage, no dilution."""

import dataclasses

import numpy as np
import pytest

from gcmlm_assets.cohort.tables import cohort_data
from gcmlm_assets.cohort.model import crossval
from gcmlm_assets.cohort.model import metrics as model_metrics
from gcmlm_assets.cohort.model import modelling as M
from gcmlm_assets.cohort.model import model_settings
from gcmlm_assets.cohort.model import training
from gcmlm_assets.cohort.explain.patient_explanation import SlidePatches, explain_patient
from gcmlm_assets_tests.support.cohort.synthetic import cohort_table, make_cohort

SETTINGS = M.ModelSettings(n_splits=5, n_repeats=2, n_bootstrap=300, abmil_max_epochs=25)
BAG_DIM = 32
BAG_SIZE = 12


def patch_bags(ids, pathology: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bags of patches scattered around each patient's (first BAG_DIM) pathology features; returns the
    bags' exact means (float64) as the slide vectors, as mean pooling would."""
    rng = np.random.default_rng(seed)
    bags = {p: (pathology[i, :BAG_DIM] + rng.normal(0, 1.0, size=(BAG_SIZE, BAG_DIM))).astype(np.float32)
            for i, p in enumerate(ids)}
    return np.array([bags[p].astype(np.float64).mean(axis=0) for p in ids]), bags


def evaluate(table, settings, bags=None) -> dict:
    data = cohort_data.CohortData.from_table(table, settings.blocks(), bags=bags)
    metrics, _ = model_metrics.evaluate_cross_validation(crossval.cross_validate(data, settings), settings)
    return metrics


def test_stacking_is_not_diluted_by_a_weak_block():
    """Radiology carries a strong signal, pathology almost none: the mean logit is dragged towards
    the weak block, the stacked combiner must stay within the CI half-width of the strong one."""
    ids, labels, radiomics, _ = make_cohort(80, seed=3, signal=2.0)
    _, same_labels, _, pathology = make_cohort(80, seed=3, signal=0.1)
    assert (labels == same_labels).all()
    settings = dataclasses.replace(SETTINGS, abmil_in_ablation=False, fusion="stacked")  # "fused" is stacked
    metrics = evaluate(cohort_table(ids, labels, radiomics, pathology), settings)
    table = model_metrics.ablation_markdown(metrics, model_settings.model_labels(settings))
    best = max(("radiology", "pathology"), key=lambda b: metrics[b]["auc"])
    assert best == "radiology", table
    half_width = (metrics[best]["auc_ci_high"] - metrics[best]["auc_ci_low"]) / 2
    assert metrics["fused"]["auc"] >= metrics[best]["auc"] - half_width, table
    assert metrics["fused"]["auc"] >= metrics["fused_mean"]["auc"] - 0.02, table  # learning the weights pays


def test_permuted_labels_give_chance_auc_on_every_row_abmil_and_stacking_included():
    """Shuffled labels: no row of the ablation, ABMIL and both fusions included, beats chance."""
    ids, labels, radiomics, pathology = make_cohort(60, seed=12)
    vectors, bags = patch_bags(ids, pathology)
    for permutation_seed in (1, 2):
        permuted = np.random.default_rng(permutation_seed).permutation(labels)
        metrics = evaluate(cohort_table(ids, permuted, radiomics, vectors), SETTINGS, bags)
        table = model_metrics.ablation_markdown(metrics, model_settings.model_labels(SETTINGS))
        assert {"radiology", "pathology", "pathology_abmil", "fused", "fused_stacked"} <= set(metrics), table
        for model, values in metrics.items():
            # within 0.2 of chance and never significantly above it (what leakage would give); CV AUC
            # of shrunk models under the null is known to fall somewhat BELOW 0.5 (test_modelling)
            assert abs(values["auc"] - 0.5) <= 0.2 and values["auc_ci_low"] < 0.5, (model, table)


def test_abmil_as_the_pathology_block_scores_from_the_bags_and_survives_skops(tmp_path):
    ids, labels, radiomics, pathology = make_cohort(50, seed=6)
    vectors, bags = patch_bags(ids, pathology * 2)
    settings = dataclasses.replace(SETTINGS, pathology_pooling="abmil")
    table = cohort_table(ids, labels, radiomics, vectors, without_pathology={"P004"})
    del bags["P004"]
    metrics = evaluate(table, settings, bags)
    assert metrics["pathology_abmil"]["patients"] == 49 and metrics["fused"]["patients"] == 50
    assert metrics["pathology_abmil"]["auc"] > 0.7, model_metrics.ablation_markdown(metrics)

    data = cohort_data.CohortData.from_table(table, settings.blocks(), bags=bags)
    model, fitted = training.fit_risk_model(data, settings, 0.5)
    assert model.blocks == ("radiology", "pathology_abmil") and model.needs_bags()
    assert fitted["pathology_abmil"]["fitted"] and not model.side_models
    scores = model.score_table(table, bags)
    assert scores.column("modalities_used").to_pylist()[4] == "radiology"
    assert "radiology+pathology_abmil" in scores.column("modalities_used").to_pylist()
    with pytest.raises(ValueError, match="ABMIL"):  # never silently scored without the patch features
        model.score_table(table)
    # its explanation is attention, labelled as such; the radiology block still splits exactly
    row = 0
    slides = [SlidePatches("s1", None, 256.0, np.zeros((BAG_SIZE, 2), np.int64), bags[ids[row]])]
    explanation = explain_patient(model, data, row, slides)
    assert explanation.attention_role == "in the score" and not explanation.patch_contributions
    assert explanation.attention["s1"].sum() == pytest.approx(1.0, abs=1e-9)
    assert any("attention weights are shown, not contributions" in note for note in explanation.notes)
    assert sum(r["contribution"] for r in explanation.combination) == pytest.approx(explanation.fused_logit, abs=1e-9)
    no_bag = explain_patient(model, cohort_data.CohortData.from_table(table, settings.blocks(), bags={}), row, [])
    assert [r["term"] for r in no_bag.combination if r["block_logit"] is not None] == ["radiology"]
    M.save_model(model, tmp_path / "model.skops")
    loaded = M.load_model(tmp_path / "model.skops")
    assert loaded.score_table(table, bags).column("probability").to_pylist() == pytest.approx(
        scores.column("probability").to_pylist(), abs=1e-12)
