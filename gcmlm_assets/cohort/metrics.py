"""Metrics of the cross-validated risk models and the ablation table.

Plain Python (no Dagster). Per model, on the out-of-fold predictions (n_repeats, n_patients):
- AUC: the mean over repeats of the per-repeat AUC, with a 95 % percentile bootstrap CI
  (patients resampled within each class, the same resample used for every repeat);
- on the per-patient mean of the out-of-fold probabilities over repeats: sensitivity and
  specificity at the Youden threshold (chosen on these same predictions, hence optimistic), the
  Brier score, a calibration curve (quantile bins) and decision-curve analysis (net benefit
  against threshold probability, with treat-all and treat-none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_curve

from gcmlm_assets.cohort.cohort_data import class_counts
from gcmlm_assets.cohort.modelling import ModelSettings

if TYPE_CHECKING:
    from gcmlm_assets.cohort.crossval import CrossValidation


def _rank_auc(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUC (Mann-Whitney, ties count half) along the last axis; inputs (..., n1) and (..., n0)."""
    n1, n0 = positive.shape[-1], negative.shape[-1]
    ranks = scipy.stats.rankdata(np.concatenate([positive, negative], axis=-1), axis=-1)
    return (ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auc_with_bootstrap(labels: np.ndarray, predictions: np.ndarray, n_bootstrap: int,
                       rng: np.random.Generator) -> dict:
    """Mean per-repeat AUC and its 95 % CI (stratified bootstrap over patients)."""
    positive, negative = labels == 1, labels == 0
    per_repeat = _rank_auc(predictions[:, positive], predictions[:, negative])
    pos_draw = rng.integers(0, positive.sum(), size=(n_bootstrap, positive.sum()))
    neg_draw = rng.integers(0, negative.sum(), size=(n_bootstrap, negative.sum()))
    boot = np.zeros(n_bootstrap)
    for repeat in range(predictions.shape[0]):
        boot += _rank_auc(predictions[repeat, positive][pos_draw], predictions[repeat, negative][neg_draw])
    boot /= predictions.shape[0]
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"auc": float(per_repeat.mean()), "auc_ci_low": float(low), "auc_ci_high": float(high),
            "auc_repeat_sd": float(per_repeat.std()), "auc_per_repeat": [round(float(a), 4) for a in per_repeat]}


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def net_benefit(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    n = len(labels)
    treated = probabilities[None, :] >= thresholds[:, None]
    true_pos = (treated & (labels[None, :] == 1)).sum(axis=1) / n
    false_pos = (treated & (labels[None, :] == 0)).sum(axis=1) / n
    return true_pos - false_pos * thresholds / (1 - thresholds)


# Net benefit beyond 0.8 rests on a handful of patients and no one treats at such odds; not shown.
DCA_THRESHOLDS = np.round(np.arange(0.01, 0.81, 0.01), 2)


def evaluate(labels: np.ndarray, predictions: np.ndarray, n_bootstrap: int, seed: int) -> tuple[dict, dict]:
    """(metrics, curves) of one model's out-of-fold predictions (n_repeats, n_patients)."""
    counts = class_counts(labels)
    metrics: dict = {"patients": int(len(labels)), **counts}
    if min(counts.values()) < 2:
        metrics["note"] = "fewer than 2 patients of a class have predictions: no metrics"
        return metrics, {}
    rng = np.random.default_rng(seed)
    metrics.update(auc_with_bootstrap(labels, predictions, n_bootstrap, rng))
    mean_probability = predictions.mean(axis=0)
    threshold = youden_threshold(labels, mean_probability)
    predicted_positive = mean_probability >= threshold
    metrics.update({
        "youden_threshold": threshold,
        "sensitivity": float(predicted_positive[labels == 1].mean()),
        "specificity": float((~predicted_positive[labels == 0]).mean()),
        "brier": float(brier_score_loss(labels, mean_probability)),
    })
    fpr, tpr, _ = roc_curve(labels, mean_probability)
    n_bins = int(max(2, min(10, len(labels) // 10)))
    observed, predicted = calibration_curve(labels, mean_probability, n_bins=n_bins, strategy="quantile")
    prevalence = float(labels.mean())
    curves = {
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "calibration": {"predicted": predicted.tolist(), "observed": observed.tolist()},
        "decision_curve": {
            "thresholds": DCA_THRESHOLDS.tolist(),
            "model": net_benefit(labels, mean_probability, DCA_THRESHOLDS).tolist(),
            "treat_all": (prevalence - (1 - prevalence) * DCA_THRESHOLDS / (1 - DCA_THRESHOLDS)).tolist(),
        },
    }
    metrics["net_benefit"] = {f"{t:.1f}": round(float(curves["decision_curve"]["model"][int(round(t * 100)) - 1]), 4)
                              for t in (0.1, 0.2, 0.3, 0.5)}
    return metrics, curves


def evaluate_cross_validation(cv: CrossValidation, settings: ModelSettings) -> tuple[dict, dict]:
    """Metrics and curves of every model of the ablation, keyed by model name."""
    metrics, curves = {}, {}
    for model in cv.models():
        labels, predictions = cv.model_predictions(model)
        metrics[model], curves[model] = evaluate(labels, predictions, settings.n_bootstrap, settings.seed)
    return metrics, curves


def ablation_markdown(metrics: dict, labels: dict[str, str] | None = None) -> str:
    lines = ["| model | patients (+/−) | AUC [95 % CI] | sensitivity | specificity | Brier |",
             "|---|---|---|---|---|---|"]
    for model, m in metrics.items():
        name = (labels or {}).get(model, model)
        if "auc" not in m:
            lines.append(f"| {name} | {m['patients']} ({m['positive']}/{m['negative']}) | – | – | – | – |")
            continue
        lines.append(f"| {name} | {m['patients']} ({m['positive']}/{m['negative']}) | "
                     f"{m['auc']:.3f} [{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}] | "
                     f"{m['sensitivity']:.2f} | {m['specificity']:.2f} | {m['brier']:.3f} |")
    return "\n".join(lines)

