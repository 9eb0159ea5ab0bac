"""The MLM risk model: per-modality scikit-learn pipelines, late fusion, the fitted model and its file.

Plain Python (no Dagster).

Modality blocks and their pipelines (every step is fitted on training patients only):
- radiology (`rad_*`, PyRadiomics features): median imputation -> standardisation -> drop constant
  features -> correlation filter (|r| above a threshold with an already kept feature) -> L1
  logistic selection (`SelectFromModel`, at most `max_radiomics_features`) -> classifier;
- pathology (`path_feat_*`, the pooled 1024-D slide embedding): median imputation ->
  standardisation -> PCA (`pca_components`, at most n_train - 1) -> classifier;
- clinical (`clin_*` covariates; only with `use_clinical`): imputation -> standardisation -> classifier;
- lymph_node (`ln_n_nodes`, `ln_n_metastatic_nodes`, `ln_tumour_area_mm2`, `ln_metastatic_node_area_mm2`,
  `ln_t_mln`; only the patients with lymph-node slides): T/MLN, undefined (null) without a
  metastatic node, becomes 0 plus an indicator column (`missingindicator_ln_t_mln`, 1 = no
  metastatic node; present when some training patient had none), never the median; the other
  four get median imputation -> standardisation -> classifier;
- delta (`delta_*`: each radiomics feature's change from the first CT scan to the last, absolute and
  relative, the days between the scans and their similarity; only the patients with two or more scans):
  the radiology block's pipeline (imputation, standardisation, constant and correlated features
  dropped, logistic selection of at most `max_radiomics_features`) -> classifier.
The classifier is L2 logistic regression by default, its penalty strength chosen on inner folds of
the training patients (log loss); `svm` (RBF SVC with Platt scaling through
`CalibratedClassifierCV(method="sigmoid")`) and `random_forest` are options. All of them weight
the classes inversely to their frequency (`class_weight="balanced"`), so the minority class is not
ignored; the price is that probabilities are shifted towards 0.5 relative to the prevalence, which
shows in the calibration curve and the Brier score.

Pathology pooling (`pathology_pooling`): "mean" uses the slide vector above; "abmil" replaces it by a
gated-attention MIL model over the patient's patch features (`abmil.py`, block `pathology_abmil`),
trained inside the same folds. With `abmil_in_ablation` (the default) the cross-validation reports
both as ablation rows when the patch features are at hand.

Fusion (`fusion`, see combiners.py): each block's model is trained on the labelled patients that
have that block, and gives a logit. "mean" (the default) takes the mean of the logits the patient
has; "stacked" fits a non-negative logistic combiner on the blocks' out-of-fold logits, obtained
by an inner cross-validation of the training patients only. A patient who lacks a block is
scored from the blocks they have (mean: the mean of those; stacked: a missing block's logit counts as
0, with an availability indicator; see combiners.py).

The final model fits each block on every labelled patient that has it (and a stacked combiner on
the out-of-fold logits of an inner cross-validation of all of them). Its risk groups split at
`risk_threshold`, by default the Youden threshold of the fused out-of-fold probabilities.
The fitted model is saved with skops (never pickle) and loaded only with the explicit list of
types in `TRUSTED_TYPES`; the classes a model file names (`FusedRiskModel`, `CorrelationFilter`,
`L1Selection`; the combiners and `AbmilModel` in theirs) are recorded in the file by module path:
a module moved since a file was written is named in `MOVED_MODULES`, so the file still loads
(`FORMER_TRUSTED_TYPES`).

Elsewhere: the settings and the ablation's names (model_settings), fitting the whole model
(training), the fused table as matrices (cohort_data), the fusion rules (combiners), ABMIL
(abmil), cross-validation (crossval), its metrics and ablation table (metrics), figures (plots),
the model card and strict JSON (model_card).
"""

from __future__ import annotations

import importlib
import sys
import warnings

from pathlib import Path

import numpy as np
import pyarrow as pa
import skops.io as sio
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
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

from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.tables.cohort_data import LYMPH_NODE_COLUMNS, PATHOLOGY_ABMIL, CohortData
from gcmlm_assets.cohort.model.combiners import MeanLogitCombiner, probability_to_logit, sigmoid
from gcmlm_assets.cohort.tables.fusion import DELTA, LYMPH_NODE, PATHOLOGY, PREFIX, RADIOLOGY, T_MLN
from gcmlm_assets.cohort.model.model_settings import LOGISTIC_CS, ModelSettings
from gcmlm_assets.storage import DigestMismatch, atomic_path, read_pinned_bytes

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


def lymph_node_imputer() -> ColumnTransformer:
    """The lymph-node block's imputation: T/MLN null (no metastatic node) -> 0 plus an indicator,
    the counts and areas -> their training medians. Columns by position in LYMPH_NODE_COLUMNS
    (cohort_data fixes that order); output: the four, then ln_t_mln and its indicator."""
    t_mln = LYMPH_NODE_COLUMNS.index(PREFIX[LYMPH_NODE] + T_MLN)
    others = [j for j in range(len(LYMPH_NODE_COLUMNS)) if j != t_mln]
    return ColumnTransformer(
        [("counts_and_areas", SimpleImputer(strategy="median"), others),
         ("t_mln", SimpleImputer(strategy="constant", fill_value=0.0, add_indicator=True), [t_mln])],
        verbose_feature_names_out=False)


def build_block_pipeline(block: str, settings: ModelSettings, n_train: int, min_class_count: int) -> Pipeline:
    imputer = lymph_node_imputer() if block == LYMPH_NODE else SimpleImputer(strategy="median")
    steps: list = [("impute", imputer), ("scale", StandardScaler())]
    if block in (RADIOLOGY, DELTA):  # both: many correlated radiomics-derived features, few patients
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


def fit_block(block: str, X, y: np.ndarray, settings: ModelSettings):
    """The block's model fitted on (X, y), or None when a class has fewer than 2 patients.

    X is a matrix (patients x features) for a pipeline block, a list of bags for `pathology_abmil`."""
    counts = np.bincount(y.astype(int), minlength=2)
    if counts.min() < 2:
        return None
    if block == PATHOLOGY_ABMIL:
        from gcmlm_assets.cohort.model.abmil import fit_abmil

        return fit_abmil(list(X), y.astype(int), settings.abmil_settings())
    pipeline = build_block_pipeline(block, settings, len(y), int(counts.min()))
    # The matrices are tiny: BLAS threads only add start-up and contention (8x slower on 2 busy cores).
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(X, y.astype(int))
    return pipeline


def block_logits(model, X) -> np.ndarray:
    """The block model's logit per patient: the linear classifier's decision function where it has one
    (exactly what the explanations split up), else the logit of its probability."""
    if len(X) == 0:
        return np.zeros(0)
    with threadpool_limits(1):
        if not isinstance(model, Pipeline):  # AbmilModel
            return np.asarray(model.logits(list(X)), dtype=np.float64)
        if isinstance(model.steps[-1][1], LogisticRegression):
            return np.asarray(model.decision_function(X), dtype=np.float64)
        return probability_to_logit(model.predict_proba(X)[:, 1])


# ---------------------------------------------------------------- the model


class FusedRiskModel:
    """Fitted block models, the combiner that fuses their logits, and the risk-group threshold.

    `side_models` are fitted for explanation only (the ABMIL block when the score uses mean pooling:
    its attention maps); they never enter the score."""

    def __init__(self, pipelines: dict, columns: dict[str, list[str]], risk_threshold: float, settings: dict,
                 combiner=None, side_models: dict | None = None):
        self.pipelines = pipelines
        self.columns = columns
        self.risk_threshold = risk_threshold
        self.settings = settings
        self.combiner = combiner if combiner is not None else MeanLogitCombiner(list(pipelines))
        self.side_models = side_models or {}

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(self.pipelines)

    def block_logits(self, data: CohortData) -> np.ndarray:
        """(patients, blocks) logits; NaN where the patient lacks the block."""
        return np.column_stack([self.block_column(block, data) for block in self.blocks])

    def block_column(self, block: str, data: CohortData) -> np.ndarray:
        """One block's logits (patients,); NaN where the patient lacks the block."""
        out = np.full(len(data.patient_ids), np.nan)
        rows = data.blocks[block].available
        if rows.any():
            out[rows] = block_logits(self.pipelines[block], data.inputs(block, rows))
        return out

    def cohort_data(self, table: pa.Table, bags=None) -> CohortData:
        if bags is None and self.needs_bags():
            raise ValueError("this model's pathology block is ABMIL: its scores need the patients' patch "
                             "features (bags), not only the fused table")
        return CohortData.from_table(table, self.blocks, self.columns, bags)

    def needs_bags(self) -> bool:
        return PATHOLOGY_ABMIL in self.pipelines

    def predict_proba(self, table: pa.Table, bags=None) -> np.ndarray:
        """Fused MLM probability per row of a fused table; NaN where the patient has no usable block."""
        return sigmoid(self.combiner.fused_logit(self.block_logits(self.cohort_data(table, bags))))

    def score_table(self, table: pa.Table, bags=None) -> pa.Table:
        """Scores of every patient that has at least one block the model uses."""
        data = self.cohort_data(table, bags)
        logits = self.block_logits(data)
        fused = sigmoid(self.combiner.fused_logit(logits))
        rows = np.isfinite(fused)
        used = ["+".join(b for k, b in enumerate(self.blocks) if np.isfinite(logits[i, k])) for i in range(len(fused))]
        # the model's blocks the patient was scored without ("" when none): a failed CT must show
        missing = ["+".join(b for k, b in enumerate(self.blocks) if not np.isfinite(logits[i, k]))
                   for i in range(len(fused))]
        columns: dict[str, pa.Array] = {
            ID_COLUMN: pa.array(data.patient_ids[rows].tolist(), pa.string()),
            "probability": pa.array(fused[rows], pa.float64()),
            "risk_group": pa.array(np.where(fused[rows] >= self.risk_threshold, "high", "low").tolist(),
                                   pa.string()),
            "modalities_used": pa.array([u for u, r in zip(used, rows) if r], pa.string()),
            "modalities_missing": pa.array([m for m, r in zip(missing, rows) if r], pa.string()),
        }
        for k, block in enumerate(self.blocks):
            values = sigmoid(logits[rows, k])
            columns[f"probability_{block}"] = pa.array(values, pa.float64(), mask=~np.isfinite(values))
        labels = data.labels[rows]
        columns[LABEL_COLUMN] = pa.array([None if np.isnan(v) else int(v) for v in labels], pa.int8())
        return pa.table(columns)


# ---------------------------------------------------------------- persistence


TRUSTED_TYPES = [
    "numpy.dtype",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",
    f"{__name__}.CorrelationFilter",
    f"{__name__}.FusedRiskModel",
    f"{__name__}.L1Selection",
    "gcmlm_assets.cohort.model.combiners.MeanLogitCombiner",
    "gcmlm_assets.cohort.model.combiners.StackedCombiner",
    "gcmlm_assets.cohort.model.abmil.AbmilModel",
]
# A file written before cohort/ was split into packages names these classes by their old modules.
# It loads into the same classes, its bytes (and the hash its version pointer pinned) unchanged, so
# an installed model stays usable without a refit.
MOVED_MODULES = {f"gcmlm_assets.cohort.{name}": f"gcmlm_assets.cohort.model.{name}"
                 for name in ("modelling", "combiners", "abmil")}
FORMER_TRUSTED_TYPES = [f"{old}.{name.rpartition('.')[2]}" for name in TRUSTED_TYPES
                        for old, new in MOVED_MODULES.items() if name.rpartition(".")[0] == new]


class UntrustedModelFile(ValueError):
    pass


def save_model(model: FusedRiskModel, path: str | Path) -> Path:
    from gcmlm_assets.skops_bytes import normalise_skops_file

    with atomic_path(path) as tmp:
        sio.dump(model, tmp)
        normalise_skops_file(tmp)  # the same model, the same bytes (skops_bytes.py)
    return Path(path)


def load_model(path: str | Path, sha256: str | None = None, pinned_by: str = "its version pointer") -> FusedRiskModel:
    """Load with skops, refusing any type outside `TRUSTED_TYPES` (skops' own defaults aside).

    With `sha256` (what the pointer `pinned_by` recorded), the file's bytes are read once, checked
    against it and loaded from memory: a file changed after publishing is refused, and nothing can
    swap it between the check and the load."""
    data = None
    if sha256 is not None:
        try:
            data = read_pinned_bytes(path, sha256)
        except DigestMismatch as mismatch:
            raise UntrustedModelFile(f"{path}: SHA-256 {mismatch.found} differs from {sha256} recorded by {pinned_by}; "
                                     "the model file changed after it was published and is not loaded "
                                     "(re-materialize risk_model)") from None
    source = {"file": path} if data is None else {"data": data}
    named = set(sio.get_untrusted_types(**source))
    untrusted = named - set(TRUSTED_TYPES) - set(FORMER_TRUSTED_TYPES)
    if untrusted:
        raise UntrustedModelFile(f"{path}: refusing to load types not on the trusted list: {sorted(untrusted)}")
    trusted = TRUSTED_TYPES
    if named & set(FORMER_TRUSTED_TYPES):
        for old, new in MOVED_MODULES.items():  # skops imports a class by the module its file names
            sys.modules.setdefault(old, importlib.import_module(new))
        trusted = TRUSTED_TYPES + FORMER_TRUSTED_TYPES
    model = sio.load(path, trusted=trusted) if data is None else sio.loads(data, trusted=trusted)
    if not isinstance(model, FusedRiskModel):
        raise UntrustedModelFile(f"{path}: holds a {type(model).__name__}, not a FusedRiskModel")
    # a file written before fusion rules and side models existed fused by the mean logit
    if not hasattr(model, "combiner"):
        model.combiner = MeanLogitCombiner(list(model.pipelines))
    if not hasattr(model, "side_models"):
        model.side_models = {}
    return model
