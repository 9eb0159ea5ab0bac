"""Metrics of the cross-validated risk models and the ablation table.

Plain Python (no Dagster). Per model, on the out-of-fold predictions (n_repeats, n_patients):
- AUC: the mean over repeats of the per-repeat AUC, with a 95 % percentile bootstrap CI
  (patients resampled within each class, the same resample used for every repeat);
- on the per-patient mean of the out-of-fold probabilities over repeats: sensitivity and
  specificity at the Youden threshold (chosen on these same predictions, hence optimistic), the
  Brier score, a calibration curve (quantile bins), the calibration slope and intercept
  (`calibration_slope_intercept`) and decision-curve analysis (net benefit against threshold
  probability, with treat-all and treat-none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.special
import scipy.stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_curve

from gcmlm_assets.cohort.tables.cohort_data import class_counts
from gcmlm_assets.cohort.model.combiners import probability_to_logit
from gcmlm_assets.cohort.model.model_settings import ModelSettings, in_ablation_order

if TYPE_CHECKING:
    from gcmlm_assets.cohort.model.crossval import CrossValidation


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


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC of one set of scores (ties count half); NaN without both classes."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=float)
    positive, negative = scores[labels == 1], scores[labels == 0]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    return float(_rank_auc(positive, negative))


def _newton_logistic(design: np.ndarray, labels: np.ndarray, offset: np.ndarray,
                     max_iter: int = 100, tol: float = 1e-9) -> np.ndarray | None:
    """Maximum-likelihood coefficients of y ~ design @ beta + offset (logit link), or None.

    Newton-Raphson with step halving (the log-likelihood never decreases); None when the
    Hessian is singular or the iteration does not settle.
    """
    beta = np.zeros(design.shape[1])

    def log_likelihood(b: np.ndarray) -> float:
        eta = design @ b + offset
        return float(np.sum(labels * eta - np.logaddexp(0.0, eta)))

    current = log_likelihood(beta)
    for _ in range(max_iter):
        eta = design @ beta + offset
        fitted = scipy.special.expit(eta)  # no overflow warning for a wild trial step
        gradient = design.T @ (labels - fitted)
        hessian = design.T @ (design * (fitted * (1 - fitted))[:, None])
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(step)):
            return None
        scale = 1.0
        while scale > 1e-8:
            candidate = beta + scale * step
            value = log_likelihood(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        else:
            return None
        beta, current = candidate, value
        if np.max(np.abs(scale * step)) < tol:
            return beta
    return None


def calibration_slope_intercept(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Calibration slope and calibration-in-the-large of predicted probabilities.

    slope: b of the logistic regression y ~ a + b * logit(p) (1 = ideal, < 1 = predictions too
    extreme); intercept: a of y ~ a + offset(logit(p)), the slope fixed at 1 (0 = ideal, < 0 =
    risks overestimated on average). Probabilities are clipped to [1e-6, 1 - 1e-6] first.
    NaN when it cannot be estimated: both are NaN with fewer than one patient of each class; the
    slope alone is NaN when logit(p) separates the classes (every positive at or above every
    negative, or the reverse, constant predictions included), where the maximum-likelihood slope
    is infinite or undefined. The intercept always exists with both classes present.
    """
    labels = np.asarray(labels, dtype=float)
    probabilities = np.asarray(probabilities, dtype=float)
    keep = np.isfinite(labels) & np.isfinite(probabilities)
    labels, probabilities = labels[keep], probabilities[keep]
    out = {"slope": float("nan"), "intercept": float("nan")}
    positive, negative = labels == 1, labels == 0
    if not positive.any() or not negative.any():
        return out
    logit = probability_to_logit(probabilities)  # clipped as the fusion clips them
    ones = np.ones((len(labels), 1))
    intercept_only = _newton_logistic(ones, labels, logit)
    if intercept_only is not None:
        out["intercept"] = float(intercept_only[0])
    separated = (logit[positive].min() >= logit[negative].max()
                 or logit[positive].max() <= logit[negative].min())
    if not separated:
        fit = _newton_logistic(np.column_stack([ones[:, 0], logit]), labels, np.zeros(len(labels)))
        if fit is not None:
            out["slope"] = float(fit[1])
    return out


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
    calibration = calibration_slope_intercept(labels, mean_probability)
    metrics.update({
        "youden_threshold": threshold,
        "sensitivity": float(predicted_positive[labels == 1].mean()),
        "specificity": float((~predicted_positive[labels == 0]).mean()),
        "brier": float(brier_score_loss(labels, mean_probability)),
        "calibration_slope": calibration["slope"],
        "calibration_intercept": calibration["intercept"],
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


def _number(value, digits: int) -> str:
    """A metric for a table cell; "–" when absent or not finite (NaN becomes None in stored JSON)."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def ablation_markdown(metrics: dict, labels: dict[str, str] | None = None) -> str:
    lines = ["| model | patients (+/−) | AUC [95 % CI] | sensitivity | specificity | Brier | "
             "calibration slope / intercept |",
             "|---|---|---|---|---|---|---|"]
    for model, m in ((key, metrics[key]) for key in in_ablation_order(metrics)):
        name = (labels or {}).get(model, model)
        if "auc" not in m:
            lines.append(f"| {name} | {m['patients']} ({m['positive']}/{m['negative']}) | – | – | – | – | – |")
            continue
        calibration = f"{_number(m.get('calibration_slope'), 2)} / {_number(m.get('calibration_intercept'), 2)}"
        lines.append(f"| {name} | {m['patients']} ({m['positive']}/{m['negative']}) | "
                     f"{m['auc']:.3f} [{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}] | "
                     f"{m['sensitivity']:.2f} | {m['specificity']:.2f} | {m['brier']:.3f} | {calibration} |")
    return "\n".join(lines)
