"""The MLM risk model: per-modality scikit-learn pipelines, late fusion, cross-validation, metrics.

Plain Python (no Dagster).

Modality blocks and their pipelines (every step is fitted on training patients only):
- radiology (`rad_*`, PyRadiomics features): median imputation -> standardisation -> drop constant
  features -> correlation filter (|r| above a threshold with an already kept feature) -> L1
  logistic selection (`SelectFromModel`, at most `max_radiomics_features`) -> classifier;
- pathology (`path_feat_*`, the pooled 1024-D slide embedding): median imputation ->
  standardisation -> PCA (`pca_components`, at most n_train - 1) -> classifier;
- clinical (`clin_*` covariates; only with `use_clinical`): imputation -> standardisation -> classifier.
The classifier is L2 logistic regression by default, its penalty strength chosen on inner folds of
the training patients (log loss); `svm` (RBF SVC with Platt scaling through
`CalibratedClassifierCV(method="sigmoid")`) and `random_forest` are options. All of them weight
the classes inversely to their frequency (`class_weight="balanced"`), so the minority class is not
ignored; the price is that probabilities are shifted towards 0.5 relative to the prevalence, which
shows in the calibration curve and the Brier score.

Missing modalities (late fusion): each block's model is trained on the labelled patients that have
that block. A patient's fused probability is the inverse logit of the MEAN LOGIT of the blocks the
patient has: with both radiology and pathology it combines both, with one of them it is exactly
that block's probability. No combiner is fitted, so nothing extra can overfit or leak, and a
missing modality needs no imputation of a whole block. The "fused" model in the cross-validation
is this rule applied to out-of-fold block predictions, so the reported fused metrics include the
patients who lack a modality (a separate row reports the patients who have every modality).

Cross-validation: repeated stratified k-fold over the labelled patients that have at least one
block, at patient level (one row per patient, so no patient is ever in both parts of a fold).
All models of the ablation (each block alone, fused) are fitted and evaluated in the SAME folds.
Reported per model, on the out-of-fold predictions:
- AUC: the mean over repeats of the per-repeat AUC, with a 95 % percentile bootstrap CI
  (patients resampled within each class, the same resample used for every repeat);
- on the per-patient mean of the out-of-fold probabilities over repeats: sensitivity and
  specificity at the Youden threshold (chosen on these same predictions, hence optimistic), the
  Brier score, a calibration curve (quantile bins) and decision-curve analysis (net benefit
  against threshold probability, with treat-all and treat-none).

The final model fits each block on every labelled patient that has it. Its risk groups split at
`risk_threshold`, by default the Youden threshold of the fused out-of-fold probabilities.
The fitted model is saved with skops (never pickle) and loaded only with the explicit list of
types in `TRUSTED_TYPES`.
"""

from __future__ import annotations

import json
import math
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.stats
import sklearn
import skops
import skops.io as sio
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV, calibration_curve
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectFromModel, SelectorMixin, VarianceThreshold
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import brier_score_loss, roc_curve
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from gcmlm_assets.cohort.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.fusion import AVAILABILITY, CLINICAL, PATHOLOGY, PREFIX, RADIOLOGY
from gcmlm_assets.storage import atomic_path

CLASSIFIERS = ("logistic", "svm", "random_forest")
FUSED = "fused"
FUSED_COMPLETE = "fused_all_modalities"
MODEL_LABELS = {RADIOLOGY: "radiology only", PATHOLOGY: "pathology only", CLINICAL: "clinical only",
                FUSED: "fused (all patients)", FUSED_COMPLETE: "fused (patients with every modality)"}
FUSION_STRATEGY = ("late fusion: mean of the logits of the per-modality models the patient has "
                   "(one modality present: that model's probability)")
LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried on inner folds
PROBABILITY_CLIP = 1e-6  # keeps logits finite for a forest's 0/1 votes


@dataclass(frozen=True)
class ModelSettings:
    classifier: str = "logistic"
    n_splits: int = 5
    n_repeats: int = 5
    n_bootstrap: int = 1000
    pca_components: int = 8
    correlation_threshold: float = 0.9
    l1_c: float = 0.2
    max_radiomics_features: int = 10
    min_labelled_per_class: int = 5
    use_clinical: bool = False
    risk_threshold: float | None = None  # None: the fused model's Youden threshold from the CV
    seed: int = 0

    def __post_init__(self):
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.n_splits < 2 or self.n_repeats < 1 or self.n_bootstrap < 1:
            raise ValueError("n_splits must be >= 2, n_repeats and n_bootstrap >= 1")
        if self.risk_threshold is not None and not 0 < self.risk_threshold < 1:
            raise ValueError(f"risk_threshold must lie in (0, 1), got {self.risk_threshold}")

    def blocks(self) -> tuple[str, ...]:
        return (RADIOLOGY, PATHOLOGY, CLINICAL) if self.use_clinical else (RADIOLOGY, PATHOLOGY)


class InsufficientLabels(ValueError):
    """Too few labelled patients of a class to train or cross-validate."""


# ---------------------------------------------------------------- data


def block_columns(column_names: list[str], block: str) -> list[str]:
    if block == PATHOLOGY:
        return [c for c in column_names if c.startswith(PREFIX[PATHOLOGY] + "feat")]
    return [c for c in column_names if c.startswith(PREFIX[block])]


@dataclass
class BlockData:
    columns: list[str]
    X: np.ndarray  # (patients, features) float64; NaN where missing
    available: np.ndarray  # (patients,) bool


@dataclass
class CohortData:
    patient_ids: np.ndarray
    labels: np.ndarray  # float: 0, 1, or NaN for unknown
    blocks: dict[str, BlockData]

    @classmethod
    def from_table(cls, table: pa.Table, blocks: tuple[str, ...],
                   columns: dict[str, list[str]] | None = None) -> CohortData:
        """Matrices of the fused table; `columns` fixes each block's columns (a fitted model's)."""
        patient_ids = np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=object)
        labels = np.asarray([np.nan if v is None else float(v)
                             for v in table.column(LABEL_COLUMN).to_pylist()])
        data: dict[str, BlockData] = {}
        for block in blocks:
            names = columns[block] if columns is not None else block_columns(table.column_names, block)
            X = np.full((table.num_rows, len(names)), np.nan)
            for j, name in enumerate(names):
                if name in table.column_names:
                    X[:, j] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            flag = AVAILABILITY[block]
            available = (np.asarray(table.column(flag).to_pylist(), dtype=bool)
                         if flag in table.column_names else np.zeros(table.num_rows, bool))
            if names:
                available &= np.isfinite(X).any(axis=1)
            else:
                available[:] = False
            data[block] = BlockData(list(names), X, available)
        return cls(patient_ids, labels, data)

    @property
    def labelled(self) -> np.ndarray:
        return np.isfinite(self.labels)

    def any_block(self) -> np.ndarray:
        mask = np.zeros(len(self.patient_ids), bool)
        for block in self.blocks.values():
            mask |= block.available
        return mask


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {"positive": int(np.sum(labels == 1)), "negative": int(np.sum(labels == 0))}


# ---------------------------------------------------------------- transformers


class CorrelationFilter(SelectorMixin, BaseEstimator):
    """Keeps a feature unless its |Pearson r| with an already kept (earlier) feature exceeds `threshold`.

    Radiomic features come in near-duplicate families (the same texture at several settings);
    keeping one of each makes the L1 step that follows pick between distinct signals.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold

    def fit(self, X, y=None):
        X = validate_data(self, X, ensure_min_features=1)
        n_features = X.shape[1]
        keep = np.zeros(n_features, bool)
        if X.shape[0] < 3:
            keep[:] = True
        else:
            centred = X - X.mean(axis=0)
            norms = np.linalg.norm(centred, axis=0)
            norms[norms == 0] = 1.0
            unit = centred / norms
            kept: list[int] = []
            for j in range(n_features):
                if not kept or np.max(np.abs(unit[:, kept].T @ unit[:, j])) <= self.threshold:
                    kept.append(j)
            keep[kept] = True
        self.support_ = keep
        return self

    def _get_support_mask(self):
        check_is_fitted(self, "support_")
        return self.support_


class L1Selection(SelectorMixin, BaseEstimator):
    """L1-penalised logistic regression as a feature selector (`SelectFromModel`), never empty.

    With few patients and no signal, an L1 fit can zero every coefficient; an empty selection
    would break the classifier after it. The penalty is then relaxed (C x 4, up to 6 times)
    until at least one feature survives. At most `max_features` features are kept (largest |coef|).
    """

    def __init__(self, C: float = 0.5, max_features: int = 10, random_state: int = 0):
        self.C = C
        self.max_features = max_features
        self.random_state = random_state

    def fit(self, X, y):
        X = validate_data(self, X, ensure_min_features=1)
        C = self.C
        for _ in range(7):
            selector = SelectFromModel(
                LogisticRegression(l1_ratio=1.0, solver="liblinear", C=C, class_weight="balanced",
                                   random_state=self.random_state, max_iter=1000),
                threshold=1e-8, max_features=min(self.max_features, X.shape[1]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                selector.fit(X, y)
            if selector.get_support().any():
                break
            C *= 4
        self.selector_ = selector
        self.C_used_ = C
        return self

    def _get_support_mask(self):
        check_is_fitted(self, "selector_")
        mask = self.selector_.get_support()
        if not mask.any():  # no coefficient survived any penalty: keep the strongest one
            coefficients = np.abs(self.selector_.estimator_.coef_).ravel()
            mask = np.zeros_like(mask)
            mask[int(np.argmax(coefficients))] = True
        return mask


# ---------------------------------------------------------------- pipelines


def build_classifier(settings: ModelSettings, min_class_count: int):
    inner_folds = max(2, min(3, min_class_count))
    if settings.classifier == "logistic":
        # L2 strength chosen on inner folds of the training patients (log loss): a block without
        # signal gets a strong penalty and near-0.5 probabilities, so it cannot drown the other
        # block in the late fusion with overconfident logits.
        return LogisticRegressionCV(Cs=LOGISTIC_CS, l1_ratios=(0.0,), cv=inner_folds, scoring="neg_log_loss",
                                    class_weight="balanced", max_iter=5000, use_legacy_attributes=False)
    if settings.classifier == "svm":
        # Platt scaling on internal folds; never more folds than the smaller class has patients.
        return CalibratedClassifierCV(
            SVC(kernel="rbf", C=1.0, gamma="scale", class_weight="balanced", random_state=settings.seed),
            method="sigmoid", cv=inner_folds)
    return RandomForestClassifier(n_estimators=200, min_samples_leaf=2, class_weight="balanced_subsample",
                                  random_state=settings.seed, n_jobs=1)


def build_block_pipeline(block: str, settings: ModelSettings, n_train: int, min_class_count: int) -> Pipeline:
    steps: list = [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]
    if block == RADIOLOGY:
        steps += [
            ("drop_constant", VarianceThreshold(threshold=1e-12)),
            ("decorrelate", CorrelationFilter(settings.correlation_threshold)),
            ("select_l1", L1Selection(settings.l1_c, settings.max_radiomics_features, settings.seed)),
        ]
    elif block == PATHOLOGY:
        steps.append(("pca", PCA(n_components=max(1, min(settings.pca_components, n_train - 1)),
                                 svd_solver="full")))
    steps.append(("classify", build_classifier(settings, min_class_count)))
    return Pipeline(steps)


def fit_block(block: str, X: np.ndarray, y: np.ndarray, settings: ModelSettings) -> Pipeline | None:
    """The block's pipeline fitted on (X, y), or None when a class has fewer than 2 patients."""
    counts = np.bincount(y.astype(int), minlength=2)
    if counts.min() < 2:
        return None
    pipeline = build_block_pipeline(block, settings, len(y), int(counts.min()))
    # The matrices are tiny: BLAS threads only add start-up and contention (8x slower on 2 busy cores).
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(X, y.astype(int))
    return pipeline


def combine_probabilities(block_probabilities: list[np.ndarray]) -> np.ndarray:
    """Late fusion: inverse logit of the mean logit over the blocks that gave a probability (NaN: absent)."""
    stacked = np.vstack(block_probabilities)
    present = np.isfinite(stacked)
    clipped = np.clip(np.where(present, stacked, 0.5), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    logits = np.where(present, np.log(clipped / (1 - clipped)), 0.0)
    counts = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_logit = logits.sum(axis=0) / counts
    fused = 1.0 / (1.0 + np.exp(-mean_logit))
    fused[counts == 0] = np.nan
    return fused


# ---------------------------------------------------------------- the model


class FusedRiskModel:
    """Fitted per-block pipelines plus the late-fusion rule and the risk-group threshold."""

    def __init__(self, pipelines: dict[str, Pipeline], columns: dict[str, list[str]],
                 risk_threshold: float, settings: dict):
        self.pipelines = pipelines
        self.columns = columns
        self.risk_threshold = risk_threshold
        self.settings = settings

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(self.pipelines)

    def block_probabilities(self, data: CohortData) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for block, pipeline in self.pipelines.items():
            probabilities = np.full(len(data.patient_ids), np.nan)
            rows = data.blocks[block].available
            if rows.any():
                with threadpool_limits(1):
                    probabilities[rows] = pipeline.predict_proba(data.blocks[block].X[rows])[:, 1]
            out[block] = probabilities
        return out

    def cohort_data(self, table: pa.Table) -> CohortData:
        return CohortData.from_table(table, self.blocks, self.columns)

    def predict_proba(self, table: pa.Table) -> np.ndarray:
        """Fused MLM probability per row of a fused table; NaN where the patient has no usable block."""
        return combine_probabilities(list(self.block_probabilities(self.cohort_data(table)).values()))

    def score_table(self, table: pa.Table) -> pa.Table:
        """Scores of every patient that has at least one block the model uses."""
        data = self.cohort_data(table)
        per_block = self.block_probabilities(data)
        fused = combine_probabilities(list(per_block.values()))
        rows = np.isfinite(fused)
        used = ["+".join(b for b in self.blocks if np.isfinite(per_block[b][i])) for i in range(len(fused))]
        columns: dict[str, pa.Array] = {
            ID_COLUMN: pa.array(data.patient_ids[rows].tolist(), pa.string()),
            "probability": pa.array(fused[rows], pa.float64()),
            "risk_group": pa.array(np.where(fused[rows] >= self.risk_threshold, "high", "low").tolist(),
                                   pa.string()),
            "modalities_used": pa.array([u for u, r in zip(used, rows) if r], pa.string()),
        }
        for block in self.blocks:
            values = per_block[block][rows]
            columns[f"probability_{block}"] = pa.array(values, pa.float64(), mask=~np.isfinite(values))
        labels = data.labels[rows]
        columns[LABEL_COLUMN] = pa.array([None if np.isnan(v) else int(v) for v in labels], pa.int8())
        return pa.table(columns)


def fit_risk_model(data: CohortData, settings: ModelSettings, risk_threshold: float) -> tuple[FusedRiskModel, dict]:
    """Each block's pipeline fitted on every labelled patient that has the block."""
    pipelines: dict[str, Pipeline] = {}
    columns: dict[str, list[str]] = {}
    summary: dict[str, dict] = {}
    for block in settings.blocks():
        block_data = data.blocks[block]
        rows = data.labelled & block_data.available
        pipeline = fit_block(block, block_data.X[rows], data.labels[rows], settings) if rows.any() else None
        if pipeline is None:
            summary[block] = {"fitted": False, "reason": f"fewer than 2 labelled patients of a class "
                                                         f"have {block} features ({class_counts(data.labels[rows])})"}
            continue
        pipelines[block] = pipeline
        columns[block] = block_data.columns
        summary[block] = {"fitted": True, "train_patients": int(rows.sum()),
                          **class_counts(data.labels[rows]),
                          **describe_pipeline(block, pipeline, block_data.columns)}
    if not pipelines:
        raise InsufficientLabels("no modality has at least 2 labelled patients of each class: "
                                 + "; ".join(s["reason"] for s in summary.values()))
    return FusedRiskModel(pipelines, columns, risk_threshold, asdict(settings)), summary


def describe_pipeline(block: str, pipeline: Pipeline, columns: list[str]) -> dict:
    info: dict = {"n_input_features": len(columns), "steps": [name for name, _ in pipeline.steps]}
    # the imputer drops columns that were empty in training; follow the names through each selector
    names = np.asarray(pipeline.named_steps["impute"].get_feature_names_out(np.asarray(columns, dtype=object)),
                       dtype=object)
    if block == RADIOLOGY:
        for step in ("drop_constant", "decorrelate", "select_l1"):
            names = names[pipeline.named_steps[step].get_support()]
        info["selected_features"] = [str(n) for n in names]
    elif block == PATHOLOGY:
        pca = pipeline.named_steps["pca"]
        info["pca_components"] = int(pca.n_components_)
        info["pca_explained_variance"] = round(float(pca.explained_variance_ratio_.sum()), 4)
    return info


# ---------------------------------------------------------------- cross-validation


@dataclass
class CrossValidation:
    patient_ids: np.ndarray  # the labelled patients with at least one block, in table order
    labels: np.ndarray
    available: dict[str, np.ndarray]  # block -> bool per patient
    predictions: dict[str, np.ndarray]  # model -> (n_repeats, n_patients), NaN: no prediction
    n_splits: int
    n_repeats: int
    notes: list[str] = field(default_factory=list)

    def models(self) -> list[str]:
        names = [b for b in self.available] + [FUSED]
        complete = np.logical_and.reduce(list(self.available.values()))
        if len(self.available) > 1 and complete.any() and not complete.all():
            names.append(FUSED_COMPLETE)
        return names

    def model_predictions(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, predictions) over the patients the model is evaluated on."""
        source = FUSED if model == FUSED_COMPLETE else model
        predictions = self.predictions[source]
        rows = np.isfinite(predictions).all(axis=0)
        if model == FUSED_COMPLETE:
            rows &= np.logical_and.reduce(list(self.available.values()))
        return self.labels[rows], predictions[:, rows]


def labelled_counts(data: CohortData) -> dict[str, int]:
    """Labelled patients with at least one feature block, per class: what training can use."""
    return class_counts(data.labels[data.labelled & data.any_block()])


def check_enough_labels(data: CohortData, settings: ModelSettings) -> dict[str, int]:
    counts = labelled_counts(data)
    short = {k: v for k, v in counts.items() if v < settings.min_labelled_per_class}
    if short:
        raise InsufficientLabels(
            f"too few labelled patients with features to train: {counts} (each class needs at least "
            f"{settings.min_labelled_per_class}, setting min_labelled_per_class)")
    return counts


def cross_validate(data: CohortData, settings: ModelSettings) -> CrossValidation:
    counts = check_enough_labels(data, settings)
    rows = data.labelled & data.any_block()
    labels = data.labels[rows].astype(int)
    n_splits = min(settings.n_splits, min(counts.values()))
    notes = []
    if n_splits < settings.n_splits:
        notes.append(f"n_splits lowered from {settings.n_splits} to {n_splits}: the smaller class has "
                     f"{min(counts.values())} patients")
    blocks = settings.blocks()
    X = {b: data.blocks[b].X[rows] for b in blocks}
    available = {b: data.blocks[b].available[rows] for b in blocks}
    predictions = {m: np.full((settings.n_repeats, len(labels)), np.nan) for m in (*blocks, FUSED)}
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=settings.n_repeats,
                                       random_state=settings.seed)
    for fold, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        repeat = fold // n_splits
        for block in blocks:
            block_train = train[available[block][train]]
            block_test = test[available[block][test]]
            if len(block_test) == 0:
                continue
            pipeline = fit_block(block, X[block][block_train], labels[block_train].astype(float), settings)
            if pipeline is None:
                notes.append(f"repeat {repeat + 1}, fold {fold % n_splits + 1}: {block} not fitted "
                             f"(fewer than 2 training patients of a class)")
                continue
            with threadpool_limits(1):
                predictions[block][repeat, block_test] = pipeline.predict_proba(X[block][block_test])[:, 1]
        predictions[FUSED][repeat, test] = combine_probabilities([predictions[b][repeat, test] for b in blocks])
    return CrossValidation(data.patient_ids[rows], labels, available, predictions, n_splits,
                           settings.n_repeats, notes)


# ---------------------------------------------------------------- metrics


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


def ablation_markdown(metrics: dict) -> str:
    lines = ["| model | patients (+/−) | AUC [95 % CI] | sensitivity | specificity | Brier |",
             "|---|---|---|---|---|---|"]
    for model, m in metrics.items():
        name = MODEL_LABELS.get(model, model)
        if "auc" not in m:
            lines.append(f"| {name} | {m['patients']} ({m['positive']}/{m['negative']}) | – | – | – | – |")
            continue
        lines.append(f"| {name} | {m['patients']} ({m['positive']}/{m['negative']}) | "
                     f"{m['auc']:.3f} [{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}] | "
                     f"{m['sensitivity']:.2f} | {m['specificity']:.2f} | {m['brier']:.3f} |")
    return "\n".join(lines)


def cv_predictions_table(cv: CrossValidation) -> pa.Table:
    """Out-of-fold probabilities (mean over repeats) per patient and model."""
    columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(cv.patient_ids.tolist(), pa.string()),
                                    LABEL_COLUMN: pa.array(cv.labels, pa.int8())}
    for model, predictions in cv.predictions.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no prediction
            mean = np.nanmean(predictions, axis=0)
        columns[f"oof_probability_{model}"] = pa.array(mean, pa.float64(), mask=~np.isfinite(mean))
    return pa.table(columns)


# ---------------------------------------------------------------- plots


def plot_curves(curves: dict, kind: str) -> bytes:
    """Full-size PNG of one kind of curve ('roc', 'calibration', 'decision_curve') for every model."""
    from gcmlm_assets import pictures

    # 8 in at the pictures' 150 dpi: 1200 px, shown 1:1 in the UI with 10 pt text about 20 px high
    fig, ax = pictures.plt.subplots(figsize=(8, 6), layout="constrained")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC (out-of-fold, mean over repeats)")
    elif kind == "calibration":
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="ideal")
        ax.set(xlabel="predicted probability", ylabel="observed MLM fraction", title="Calibration",
               xlim=(0, 1), ylim=(0, 1))
    else:
        ax.axhline(0, c="black", lw=1, label="treat none")
        ax.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve")
    highest_benefit = 0.0
    for model, curve in curves.items():
        if not curve:
            continue
        label = MODEL_LABELS.get(model, model)
        if kind == "roc":
            ax.plot(curve["roc"]["fpr"], curve["roc"]["tpr"], label=label)
        elif kind == "calibration":
            ax.plot(curve["calibration"]["predicted"], curve["calibration"]["observed"], marker="o", label=label)
        else:
            dca = curve["decision_curve"]
            ax.plot(dca["thresholds"], dca["model"], label=label)
            highest_benefit = max(highest_benefit, max(dca["model"]), dca["treat_all"][0])
            if model == FUSED:
                ax.plot(dca["thresholds"], dca["treat_all"], c="grey", ls="--", label="treat all")
    if kind == "decision_curve":
        # treat-all falls steeply at high thresholds; keep the useful range in view
        ax.set_ylim(-0.05, highest_benefit + 0.05)
    ax.legend(fontsize=10, loc="best")
    return pictures.figure_png(fig)


def plot_score_distribution(probabilities, threshold: float, labels=None) -> bytes:
    """Full-size PNG: histogram of the MLM probabilities, stacked by known label, with the risk
    threshold as a vertical line and the high/low risk counts in the title."""
    from gcmlm_assets import pictures

    probabilities = np.asarray(probabilities, dtype=float)
    labels = np.full(len(probabilities), np.nan) if labels is None else \
        np.array([np.nan if v is None else float(v) for v in labels])
    high = int(np.count_nonzero(probabilities >= threshold))
    groups = [("MLM", labels == 1, "tab:red"), ("no MLM", labels == 0, "tab:blue"),
              ("label unknown", np.isnan(labels), "tab:grey")]
    groups = [(name, probabilities[rows], colour) for name, rows, colour in groups if rows.any()]
    fig, ax = pictures.plt.subplots(figsize=(8, 5), layout="constrained")
    if groups:  # matplotlib refuses a stacked histogram of no data sets
        ax.hist([values for _, values, _ in groups], bins=np.linspace(0, 1, 21), stacked=True,
                color=[colour for *_, colour in groups],
                label=[f"{name} ({len(values)})" for name, values, _ in groups])
    ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.3f}")
    ax.yaxis.get_major_locator().set_params(integer=True)  # patients come whole
    ax.set(xlabel="MLM probability (fused model)", ylabel="patients", xlim=(0, 1),
           title=f"Risk scores of {len(probabilities)} patients: {high} high risk, "
                 f"{len(probabilities) - high} low risk")
    ax.legend(fontsize=10, loc="best")
    return pictures.figure_png(fig)


# ---------------------------------------------------------------- persistence


TRUSTED_TYPES = [
    "numpy.dtype",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",
    f"{__name__}.CorrelationFilter",
    f"{__name__}.FusedRiskModel",
    f"{__name__}.L1Selection",
]


class UntrustedModelFile(ValueError):
    pass


def save_model(model: FusedRiskModel, path: str | Path) -> Path:
    from gcmlm_assets.cohort.skops_bytes import normalise_skops_file

    with atomic_path(path) as tmp:
        sio.dump(model, tmp)
        normalise_skops_file(tmp)  # the same model, the same bytes (skops_bytes.py)
    return Path(path)


def load_model(path: str | Path) -> FusedRiskModel:
    """Load with skops, refusing any type outside `TRUSTED_TYPES` (skops' own defaults aside)."""
    untrusted = set(sio.get_untrusted_types(file=path)) - set(TRUSTED_TYPES)
    if untrusted:
        raise UntrustedModelFile(f"{path}: refusing to load types not on the trusted list: {sorted(untrusted)}")
    model = sio.load(path, trusted=TRUSTED_TYPES)
    if not isinstance(model, FusedRiskModel):
        raise UntrustedModelFile(f"{path}: holds a {type(model).__name__}, not a FusedRiskModel")
    return model


def model_card(model: FusedRiskModel, settings: ModelSettings, fitted: dict, metrics: dict,
               cv: CrossValidation, data_versions: dict) -> dict:
    fused = metrics.get(FUSED, {})
    return {
        "model": "MLM risk (metachronous liver metastasis of gastric cancer)",
        "strategy": FUSION_STRATEGY,
        "classifier": settings.classifier,
        "blocks": fitted,
        "risk_threshold": model.risk_threshold,
        "risk_threshold_source": ("setting risk_threshold" if settings.risk_threshold is not None
                                  else "Youden threshold of the fused model's out-of-fold predictions"),
        "validation": {"scheme": f"repeated stratified {cv.n_splits}-fold CV x {cv.n_repeats} repeats, "
                                 "patient level, all fitting inside the folds",
                       "patients": int(len(cv.labels)), **class_counts(cv.labels), "notes": cv.notes},
        "metrics": {m: {k: v for k, v in values.items() if k != "auc_per_repeat"} for m, values in metrics.items()},
        "fused_auc": fused.get("auc"),
        "settings": asdict(settings),
        "data_versions": data_versions,
        "software": {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
                     "skops": skops.__version__, "numpy": np.__version__},
        "intended_use": "research; not validated for clinical decisions",
    }


def json_safe(obj):
    """Round floats and replace NaN/inf so the metrics can be stored as strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(obj) else round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def settings_json(settings: ModelSettings) -> str:
    return json.dumps(asdict(settings), sort_keys=True)
