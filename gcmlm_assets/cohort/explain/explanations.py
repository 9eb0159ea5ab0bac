"""Exact explanations of a block model: per-feature and per-patch contributions to its logit.

Plain Python (no Dagster).

With the default classifier (L2 logistic regression) every step of a block pipeline is affine on
finite inputs: imputation only fills NaN (and drops the columns that were empty in training),
standardisation and PCA are affine maps, the selectors keep a subset of columns. The block's
logit (`decision_function`) is therefore exactly `weights @ x + constant` in the raw inputs, and
two exact decompositions follow:

- per feature: the classifier's coefficient times the patient's transformed value of each feature
  that reaches it (standardised radiomic or clinical values, PCA scores for pathology), plus the
  intercept, sums to the patient's logit;
- per patch: the pathology input is the MEAN of the patch embeddings of all of the patient's
  slides, so `weights @ mean + constant` splits into `weights @ patch / N` per patch plus the
  constant. These are contributions, not saliencies: they add up to the model's output.

Both are stated against a reference, the training cohort's average patient: the block's input at
the training mean (`training_mean_input`: the standardiser's mean, which every block has). A
standardised feature is already its distance from that mean, so the intercept of the feature split
is the average patient's logit; a patch's part is `weights @ (patch - mean) / N`, and the parts sum
to the patient's logit minus the average patient's. Red therefore means "raises this patient's
logit above an average patient's", not merely "adds to a logit that starts far below zero".

The per-feature split needs less than an affine pipeline: whatever the steps before a binary
logistic regression compute, its decision function IS coefficient x transformed value summed, plus
the intercept. So a block whose imputer adds missingness indicators (the lymph-node block: T/MLN
undefined without a metastatic node is 0 plus an indicator) still splits exactly per feature, the
indicator being one more standardised feature (`feature_split_available`); its per-patch map does not
exist and is never asked for. Its reference is the classifier's logit where every standardised
feature, the indicator included, is at its training mean (`standardised_reference_logit`): the
split's intercept.

An SVM or a random forest is not linear: no such decomposition exists, and the functions here say
so (`exact_contributions_available`) instead of approximating; permutation importance is the
honest summary for those.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectorMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

PATCH_CHUNK_ROWS = 65_536  # rows cast to float64 at a time: memory bounded by the chunk

_CLASSIFIER_NAMES = {"CalibratedClassifierCV": "svm", "RandomForestClassifier": "random_forest"}


class NotExactlyExplainable(ValueError):
    """The pipeline is not affine up to a logistic regression: exact contributions do not exist."""


def exact_contributions_available(pipeline: Pipeline) -> tuple[bool, str]:
    """(True, "") when the logit is exactly affine in the inputs: a binary logistic regression
    after imputation, standardisation, column selectors and PCA only; else (False, why)."""
    return _check(pipeline, _why_not_affine)


def feature_split_available(pipeline: Pipeline) -> tuple[bool, str]:
    """(True, "") when the logit splits exactly per transformed feature: a binary logistic
    regression after imputers (missingness indicators allowed, also as a ColumnTransformer of
    imputers), standardisation, selectors and PCA; else (False, why). Not enough for per-patch
    parts, which need `exact_contributions_available`."""
    return _check(pipeline, _why_not_a_feature_step)


def _why_not_a_feature_step(step) -> str:
    if isinstance(step, ColumnTransformer):
        inner = [t for _, t, _ in step.transformers_ if not (isinstance(t, str) and t == "drop")]
        if all(isinstance(t, SimpleImputer) for t in inner):
            return ""
        return "combines steps other than imputers"
    if isinstance(step, SimpleImputer):
        return ""
    return _why_not_affine(step)


def _check(pipeline: Pipeline, why_not) -> tuple[bool, str]:
    classifier = pipeline.steps[-1][1]
    if not isinstance(classifier, LogisticRegression):
        kind = _CLASSIFIER_NAMES.get(type(classifier).__name__, type(classifier).__name__)
        return False, (f"{kind} is not linear: exact contributions do not exist; "
                       "see permutation importance")
    if np.ndim(classifier.coef_) != 2 or classifier.coef_.shape[0] != 1:
        return False, "the logistic regression is not binary: there is no single logit to split"
    for name, step in pipeline.steps[:-1]:
        reason = why_not(step)
        if reason:
            return False, f"step {name!r} ({type(step).__name__}) {reason}: exact contributions do not exist"
    return True, ""


def _why_not_affine(step) -> str:
    if isinstance(step, SimpleImputer):
        # The missingness indicator is a step function of the input, not an affine one.
        return "adds missingness indicators" if step.add_indicator else ""
    if isinstance(step, (StandardScaler, PCA, SelectorMixin)):
        return ""
    return "is not one of the affine steps (imputer, scaler, selector, PCA)"


def _require_exact(pipeline: Pipeline, affine: bool = True) -> LogisticRegression:
    available, reason = exact_contributions_available(pipeline) if affine else feature_split_available(pipeline)
    if not available:
        raise NotExactlyExplainable(reason)
    return pipeline.steps[-1][1]


def _transform(pipeline: Pipeline, X) -> np.ndarray:
    Z = np.asarray(X, dtype=np.float64)
    for _, step in pipeline.steps[:-1]:
        Z = step.transform(Z)
    return np.asarray(Z, dtype=np.float64)


def block_logit(pipeline: Pipeline, X) -> np.ndarray:
    """The block's logit per row of X (n, D), exactly as the risk model computes it
    (modelling.block_logits: the decision function of a linear classifier, else the log-odds of the
    clipped probability)."""
    from gcmlm_assets.cohort.model.modelling import block_logits

    return block_logits(pipeline, np.atleast_2d(np.asarray(X, dtype=np.float64)))


# ---------------------------------------------------------------- per feature


@dataclass(frozen=True)
class FeatureContributions:
    """One patient's logit split over the features that reach the classifier."""

    names: list[str]
    values: np.ndarray  # the patient's transformed values (standardised features or PCA scores)
    coefficients: np.ndarray
    contributions: np.ndarray  # coefficients * values
    intercept: float

    @property
    def logit(self) -> float:
        return float(self.contributions.sum() + self.intercept)

    def top(self, n: int = 10) -> list[tuple[str, float, float, float]]:
        """(name, value, coefficient, contribution) of the n largest |contribution|, largest first."""
        order = np.argsort(-np.abs(self.contributions), kind="stable")[:n]
        return [(self.names[i], float(self.values[i]), float(self.coefficients[i]), float(self.contributions[i]))
                for i in order]

    def markdown(self, n: int = 10, digits: int = 3) -> str:
        """The top-n features as a markdown table, with the intercept and the logit they sum to."""
        lines = ["| feature | value | coefficient | contribution |", "|---|---:|---:|---:|"]
        for name, value, coefficient, contribution in self.top(n):
            lines.append(f"| {name} | {value:.{digits}f} | {coefficient:.{digits}f} | {contribution:+.{digits}f} |")
        rest = len(self.names) - min(n, len(self.names))
        if rest:
            shown = {name for name, *_ in self.top(n)}
            others = sum(c for name, c in zip(self.names, self.contributions) if name not in shown)
            lines.append(f"| ({rest} other features) | | | {others:+.{digits}f} |")
        # with a standardised input the intercept is the logit of the training cohort's average patient,
        # and each contribution the patient's difference from that patient in one feature
        lines.append(f"| intercept (the average training patient's logit) | | | {self.intercept:+.{digits}f} |")
        lines.append(f"| **logit** | | | **{self.logit:+.{digits}f}** |")
        return "\n".join(lines)


def feature_contributions(pipeline: Pipeline, columns: list[str], x_row) -> FeatureContributions:
    """The exact split of one patient's block logit (x_row: the raw inputs, NaN allowed: the
    imputer fills them) into coefficient x transformed value per feature reaching the classifier.
    Names follow the columns through the imputer (empty training columns dropped) and the
    selectors; after PCA they are the components (pca0, pca1, ...); a missingness indicator is
    `missingindicator_<column>`."""
    classifier = _require_exact(pipeline, affine=False)
    row = np.asarray(x_row, dtype=np.float64).reshape(1, -1)
    if row.shape[1] != len(columns):
        raise ValueError(f"x_row has {row.shape[1]} values for {len(columns)} columns")
    names = [str(n) for n in pipeline[:-1].get_feature_names_out(np.asarray(columns, dtype=object))]
    with threadpool_limits(1):
        values = _transform(pipeline, row)[0]
    coefficients = np.asarray(classifier.coef_[0], dtype=np.float64)
    return FeatureContributions(names, values, coefficients, coefficients * values,
                                float(np.asarray(classifier.intercept_).reshape(-1)[0]))


# ---------------------------------------------------------------- per patch


def affine_map(pipeline: Pipeline, n_features: int) -> tuple[np.ndarray, float]:
    """(weights (D,), constant) with block_logit(x) == weights @ x + constant for finite x.

    Read off the fitted steps by pushing the zero vector and the unit vectors through them: for
    an affine f, f(0) is the constant and f(e_i) - f(0) the i-th weight (no fitting involved).
    A column the imputer dropped gets weight 0."""
    _require_exact(pipeline)
    probes = np.vstack([np.zeros((1, n_features)), np.eye(n_features)])
    logits = block_logit(pipeline, probes)
    constant = float(logits[0])
    return logits[1:] - constant, constant


def training_mean_input(pipeline: Pipeline, n_features: int) -> np.ndarray:
    """The block's input at the training cohort's mean (n_features,): the standardiser's mean,
    placed back at the columns the imputer kept (a column empty in training gets 0: its weight is 0).

    The training cohort's average patient: its logit is the reference the contributions are stated
    against. Read from the fitted model, so a model file needs no new statistic."""
    _require_exact(pipeline)
    kept = np.ones(n_features, dtype=bool)
    for _, step in pipeline.steps[:-1]:
        if isinstance(step, SimpleImputer):
            # keep_empty_features=False drops the columns whose statistic is NaN
            kept = kept & ~np.isnan(np.asarray(step.statistics_, dtype=np.float64))
        elif isinstance(step, StandardScaler):
            mean = np.zeros(n_features, dtype=np.float64)
            centre = np.zeros(int(kept.sum())) if step.mean_ is None else np.asarray(step.mean_, np.float64)
            if centre.shape[0] != kept.sum():
                raise ValueError(f"the standardiser has {centre.shape[0]} means for {int(kept.sum())} columns")
            mean[kept] = centre
            return mean
        else:
            break  # a selector or PCA before any standardiser: its input is no longer the raw columns
    raise ValueError("the block standardises no raw input: its training mean is not in the model")


def reference_logit(pipeline: Pipeline, n_features: int) -> float:
    """The block logit of the training cohort's average patient (`training_mean_input`)."""
    return float(block_logit(pipeline, training_mean_input(pipeline, n_features)[None, :])[0])


def standardised_reference_logit(pipeline: Pipeline) -> float:
    """The logit where every standardised feature is at its training mean (0 after the scaler), for a
    block whose input has no raw training mean (an indicator of missingness is not a raw column):
    zero pushed through the steps after the standardiser, then the classifier. With only the
    scaler before the classifier it is the classifier's intercept, the feature split's reference."""
    _require_exact(pipeline, affine=False)
    names = [name for name, step in pipeline.steps[:-1] if isinstance(step, StandardScaler)]
    if not names:
        raise ValueError("the block standardises nothing: no training mean to refer to")
    start = [name for name, _ in pipeline.steps].index(names[0])
    scaler = pipeline.steps[start][1]
    Z = np.zeros((1, int(scaler.n_features_in_)))
    for _, step in pipeline.steps[start + 1:-1]:
        Z = step.transform(Z)
    with threadpool_limits(1):
        return float(np.asarray(pipeline.steps[-1][1].decision_function(Z), dtype=np.float64)[0])


def patch_contributions(weights, constant: float, patch_features, patch_weights, reference=None) -> np.ndarray:
    """Each patch's contribution to the block logit: patch_weight * (weights @ (features - reference)).

    `reference` (D,), usually `training_mean_input`: with it, the parts sum to the block logit
    minus the reference's logit (`weights @ reference + constant`), which then stands in for the
    constant below; without it (zeros) they sum to the logit minus the constant.

    `constant` is the affine map's; it is not spread over the patches but stays one term, so that
    with patch_weights = 1 / N_total (mean pooling over all of a patient's slides, possibly one
    call per slide) sum(contributions over every slide) + constant == the block logit of the mean
    vector. Computed in float64 whatever the features' stored dtype, in chunks of rows."""
    if not np.isfinite(constant):  # kept with the weights it belongs to; not shared out per patch
        raise ValueError(f"the affine map's constant is {constant}")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    features = np.asarray(patch_features)
    if features.ndim != 2 or features.shape[1] != w.shape[0]:
        raise ValueError(f"patch_features has shape {features.shape}, expected (N, {w.shape[0]})")
    offset = 0.0 if reference is None else float(np.asarray(reference, dtype=np.float64).reshape(-1) @ w)
    scale = np.broadcast_to(np.asarray(patch_weights, dtype=np.float64), (features.shape[0],))
    out = np.empty(features.shape[0], dtype=np.float64)
    for start in range(0, features.shape[0], PATCH_CHUNK_ROWS):
        stop = start + PATCH_CHUNK_ROWS
        out[start:stop] = np.asarray(features[start:stop], dtype=np.float64) @ w
    return (out - offset) * scale


@dataclass(frozen=True)
class SlidePatchContributions:
    """One slide's patches: level-0 coordinates and their contributions to the patient's logit."""

    name: str
    coords: np.ndarray  # (N, 2)
    contributions: np.ndarray  # (N,) float64


def mean_pooled_patch_contributions(weights, constant: float, slides: Iterable,
                                    reference=None) -> Iterator[SlidePatchContributions]:
    """Per-slide patch contributions for a patient pooled by the mean over all of its slides
    (`slides`: objects with `name`, `shape()` and `chunks()`, as patch_features.SlideFeatures).

    Two passes: the total patch count first (each patch weighs 1 / N_total), then the features in
    chunks; summed over all slides, plus `constant`, they give the logit of the pooled vector
    (plus `weights @ reference + constant` instead when relative to a `reference`)."""
    slides = list(slides)
    total = sum(slide.shape()[0] for slide in slides)
    if total == 0:
        raise ValueError("no patches: nothing to explain")
    for slide in slides:
        coords, values = [], []
        for features, chunk_coords in slide.chunks():
            values.append(patch_contributions(weights, constant, features, 1.0 / total, reference))
            coords.append(np.asarray(chunk_coords).reshape(-1, 2))
        yield SlidePatchContributions(
            slide.name,
            np.concatenate(coords) if coords else np.zeros((0, 2), np.int64),
            np.concatenate(values) if values else np.zeros(0, np.float64),
        )
