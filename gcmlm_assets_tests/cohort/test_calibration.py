"""Calibration slope and intercept (metrics.calibration_slope_intercept) and where they are reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gcmlm_assets.cohort.model import metrics as M
from gcmlm_assets.cohort.card.model_card import json_safe


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def drawn():
    """True logits and outcomes drawn from them (y ~ Bernoulli(p)), n = 20000."""
    rng = np.random.default_rng(14)
    true_logit = rng.normal(-0.5, 1.3, size=20000)
    labels = (rng.random(20000) < _expit(true_logit)).astype(int)
    return true_logit, labels


def test_predictions_from_the_true_model_are_calibrated(drawn):
    true_logit, labels = drawn
    result = M.calibration_slope_intercept(labels, _expit(true_logit))
    assert result["slope"] == pytest.approx(1.0, abs=0.05)
    assert result["intercept"] == pytest.approx(0.0, abs=0.05)


def test_doubled_logits_give_half_the_slope(drawn):
    true_logit, labels = drawn
    result = M.calibration_slope_intercept(labels, _expit(2 * true_logit))
    assert result["slope"] == pytest.approx(0.5, abs=0.03)


def test_a_shifted_logit_gives_the_opposite_intercept(drawn):
    true_logit, labels = drawn
    result = M.calibration_slope_intercept(labels, _expit(true_logit + 1.0))
    assert result["intercept"] == pytest.approx(-1.0, abs=0.05)
    # a shift leaves the spread alone: the slope stays ~1
    assert result["slope"] == pytest.approx(1.0, abs=0.05)


def test_newton_matches_a_direct_likelihood_maximum():
    """On a small sample the slope/intercept maximise the likelihood (the score equations are 0)."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 0.95, size=60)
    y = (rng.random(60) < p ** 1.5).astype(float)
    result = M.calibration_slope_intercept(y, p)
    z = np.log(p / (1 - p))
    fitted = _expit(z + result["intercept"])
    assert abs(np.sum(y - fitted)) < 1e-6  # calibration-in-the-large: mean prediction = prevalence
    # refit the slope model's score equations at the returned slope and its own intercept
    a_grid = np.linspace(-3, 3, 6001)
    scores = [np.sum(y - _expit(a + result["slope"] * z)) for a in a_grid]
    a_hat = a_grid[int(np.argmin(np.abs(scores)))]
    assert abs(np.sum((y - _expit(a_hat + result["slope"] * z)) * z)) < 0.05


def test_one_class_or_separation_gives_nan():
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    one_class = M.calibration_slope_intercept(np.ones(6), p)
    assert np.isnan(one_class["slope"]) and np.isnan(one_class["intercept"])
    separated = M.calibration_slope_intercept(np.array([0, 0, 0, 1, 1, 1]), p)
    assert np.isnan(separated["slope"])
    assert np.isfinite(separated["intercept"])  # calibration-in-the-large still exists
    constant = M.calibration_slope_intercept(np.array([0, 1, 0, 1, 0, 1]), np.full(6, 0.4))
    assert np.isnan(constant["slope"])
    assert constant["intercept"] == pytest.approx(np.log(0.5 / 0.5) - np.log(0.4 / 0.6))
    # probabilities of exactly 0 and 1 are clipped, not turned into infinite logits
    clipped = M.calibration_slope_intercept(np.array([0, 1, 0, 1, 1, 0]), np.array([0.0, 1.0, 0.2, 0.6, 0.3, 0.7]))
    assert np.isfinite(clipped["slope"]) and np.isfinite(clipped["intercept"])


def test_evaluate_and_the_ablation_table_report_them():
    rng = np.random.default_rng(5)
    labels = np.array([0] * 40 + [1] * 30)
    logits = rng.normal(size=(3, 70)) + 1.5 * labels
    metrics, _ = M.evaluate(labels, _expit(logits), n_bootstrap=50, seed=0)
    expected = M.calibration_slope_intercept(labels, _expit(logits).mean(axis=0))
    assert metrics["calibration_slope"] == pytest.approx(expected["slope"])
    assert metrics["calibration_intercept"] == pytest.approx(expected["intercept"])
    table = M.ablation_markdown({"fused": metrics})
    assert "calibration slope / intercept" in table.splitlines()[0]
    assert f"{expected['slope']:.2f} / {expected['intercept']:.2f}" in table
    # stored metrics (NaN -> null in JSON) and metrics written before these keys still render
    stored = json.loads(json.dumps(json_safe({**metrics, "calibration_slope": float("nan")})))
    older = {k: v for k, v in metrics.items() if not k.startswith("calibration_")}
    assert f"– / {expected['intercept']:.2f}" in M.ablation_markdown({"fused": stored})
    assert "| – / – |" in M.ablation_markdown({"fused": older})
