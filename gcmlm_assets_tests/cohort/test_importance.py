"""Permutation importance (cohort/explain/importance.py) on a known predictor and on a fitted risk model."""

from __future__ import annotations

import numpy as np
import pytest

from gcmlm_assets.cohort.explain import importance as I
from gcmlm_assets.cohort.model import modelling as M
from gcmlm_assets.cohort.model import training
from gcmlm_assets.cohort.tables.cohort_data import BlockData, CohortData


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def _cohort(n=120, seed=0):
    """Radiology (5 features, feature 2 carries the label) and pathology (4 features, feature 0
    carries it too), some patients without pathology, a few unlabelled."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(float)
    rad = rng.normal(size=(n, 5))
    rad[:, 2] += 1.5 * labels
    path = rng.normal(size=(n, 4))
    path[:, 0] += 1.5 * labels
    path_available = rng.random(n) > 0.2
    path[~path_available] = np.nan
    labels[:6] = np.nan
    return CohortData(np.array([f"P{i:03d}" for i in range(n)], dtype=object), labels, {
        "radiology": BlockData([f"rad_f{j}" for j in range(5)], rad, np.ones(n, bool)),
        "pathology": BlockData([f"path_feat_{j}" for j in range(4)], path, path_available),
    })


def _uses_radiology_feature_2(data: CohortData) -> np.ndarray:
    block = data.blocks["radiology"]
    return np.where(block.available, _expit(block.X[:, 2]), np.nan)


def test_only_the_used_feature_matters():
    rows = I.permutation_importance(_uses_radiology_feature_2, _cohort(), ("radiology", "pathology"),
                                    n_repeats=8, seed=1)
    by_name = {(r["block"], r["feature"]): r for r in rows}
    assert [r["block"] for r in rows if r["level"] == "block"] == ["radiology", "pathology"]
    used = by_name[("radiology", "rad_f2")]
    assert used["importance_mean"] > 0.2
    assert used["importance_mean"] > 3 * used["importance_sd"]
    assert used["baseline_auc"] > 0.75
    for (block, feature), r in by_name.items():
        if feature not in (None, "rad_f2"):
            assert r["importance_mean"] == 0.0, (block, feature)
    # the unused block, though it carries signal of its own, is worth nothing to this predictor
    assert by_name[("pathology", None)]["importance_mean"] == 0.0
    assert by_name[("radiology", None)]["importance_mean"] > 0.2
    assert by_name[("radiology", None)]["patients_compared_min"] == 114  # the labelled patients


def test_same_seed_same_numbers_and_large_blocks_stay_at_block_level():
    data = _cohort()
    first = I.permutation_importance(_uses_radiology_feature_2, data, ("radiology", "pathology"), n_repeats=3, seed=7)
    again = I.permutation_importance(_uses_radiology_feature_2, data, ("radiology", "pathology"), n_repeats=3, seed=7)
    other = I.permutation_importance(_uses_radiology_feature_2, data, ("radiology", "pathology"), n_repeats=3, seed=8)
    assert first == again
    assert first != other
    limited = I.permutation_importance(_uses_radiology_feature_2, data, ("radiology", "pathology"),
                                       n_repeats=2, max_features_per_block=4)
    assert {r["block"] for r in limited if r["level"] == "feature"} == {"pathology"}
    table = I.importance_markdown(first, top=2)
    assert "rad_f2" in table and "(whole block)" in table
    assert "7 more features not shown" in table


def test_a_fitted_fused_model_relies_on_its_informative_features():
    """The real late-fusion model: the radiology block and a planted radiology feature stand out;
    block-level shuffles that leave a patient without any block shrink the compared set."""
    data = _cohort(n=100, seed=3)
    settings = M.ModelSettings(n_splits=3, n_repeats=1, max_radiomics_features=3, pca_components=2)
    model, _ = training.fit_risk_model(data, settings, risk_threshold=0.5)
    rows = I.permutation_importance(I.model_predictor(model), data, model.blocks, n_repeats=5, seed=0)
    features = sorted((r for r in rows if r["block"] == "radiology" and r["level"] == "feature"),
                      key=lambda r: -r["importance_mean"])
    assert features[0]["feature"] == "rad_f2"
    blocks = {r["block"]: r for r in rows if r["level"] == "block"}
    assert blocks["radiology"]["importance_mean"] > 0.05
    assert blocks["pathology"]["importance_mean"] > 0.0
    # patients with radiology only who receive a patient's missing pathology still have radiology;
    # nobody lacks both here, so everyone stays comparable
    assert blocks["pathology"]["patients_compared_min"] == int(data.labelled.sum())


def test_no_scored_patients_of_both_classes_is_a_clear_error():
    data = _cohort()
    data.labels[np.isfinite(data.labels)] = 1.0
    with pytest.raises(ValueError, match="both classes"):
        I.permutation_importance(_uses_radiology_feature_2, data, ("radiology",))
