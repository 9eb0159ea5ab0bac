"""The MLM risk model: per-modality scikit-learn pipelines, late fusion, the fitted model and its file.

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

The final model fits each block on every labelled patient that has it. Its risk groups split at
`risk_threshold`, by default the Youden threshold of the fused out-of-fold probabilities.
The fitted model is saved with skops (never pickle) and loaded only with the explicit list of
types in `TRUSTED_TYPES`; the classes a model file names (`FusedRiskModel`, `CorrelationFilter`,
`L1Selection`) must stay in this module, as the file records their module path.

Elsewhere: the fused table as matrices (cohort_data), cross-validation (crossval), its metrics
and ablation table (metrics), figures (plots), the model card and strict JSON (model_card).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import skops.io as sio
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectFromModel, SelectorMixin, VarianceThreshold
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from gcmlm_assets.cohort.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.cohort_data import CohortData, class_counts
from gcmlm_assets.cohort.fusion import CLINICAL, PATHOLOGY, RADIOLOGY
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
