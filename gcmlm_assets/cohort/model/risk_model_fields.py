"""The risk model's settings, declared once (plain Python: no Dagster, nothing heavy imported).

The `risk_model` resource (RiskModelSettings) and `ModelSettings` both derive from these fields, so
a new setting is one field here (and its use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from gcmlm_assets.setting_fields import setting

Classifier = Literal["logistic", "svm", "random_forest"]
Fusion = Literal["mean", "stacked"]  # combiners.FUSIONS (a test keeps them equal)
Pooling = Literal["mean", "abmil"]
CLASSIFIERS, POOLINGS = get_args(Classifier), get_args(Pooling)


@dataclass(frozen=True)
class ModelSettingFields:
    """The risk model's settings, each declared once: its type, default, description and checks.

    `risk_model` (RiskModelSettings in cohort/resources.py) inherits these fields, so the
    Launchpad shows these defaults and descriptions; ModelSettings (model_settings.py) adds what
    follows from them. Changing any of them retrains the model.
    """

    classifier: Annotated[Classifier, setting(
        "L2 logistic regression (penalty chosen on inner folds), RBF SVM with Platt scaling, or a "
        "random forest; all class-balanced.")] = "logistic"
    n_splits: Annotated[int, setting("Folds of the stratified CV (lowered to the smaller class size).")] = 5
    n_repeats: Annotated[int, setting("Repeats of the stratified k-fold CV.")] = 5
    n_bootstrap: Annotated[int, setting("Bootstrap resamples for the AUC's 95 % CI.")] = 1000
    pca_components: Annotated[int, setting("PCA components of the pathology block.")] = 8
    correlation_threshold: Annotated[float, setting(
        "Radiomics: drop a feature whose |r| with a kept one exceeds this.")] = 0.9
    l1_c: Annotated[float, setting("Radiomics: inverse strength of the L1 selection.")] = 0.2
    max_radiomics_features: Annotated[int, setting("Radiomics: most features the L1 step keeps.")] = 10
    min_labelled_per_class: Annotated[int, setting(
        "Fewest labelled patients (with features) of each class needed to train; at least 2, as the "
        "cross-validation needs two of each class.", ge=2)] = 5
    use_clinical: Annotated[bool, setting("Add the clinical covariates as a third block.")] = False
    risk_threshold: Annotated[float | None, setting(
        "Probability at or above which a patient is 'high' risk; empty: the fused CV Youden threshold.")] = None
    fusion: Annotated[Fusion, setting(
        "How the blocks' logits combine: their mean (mean), or a non-negative logistic combiner fitted "
        "on inner-CV out-of-fold logits (stacked). README \"Fusion\": why mean is the default.")] = "mean"
    inner_splits: Annotated[int, setting(
        "Folds of the inner CV whose out-of-fold logits train the stacked combiner "
        "(lowered to the smaller class size).")] = 10
    pathology_pooling: Annotated[Pooling, setting(
        "The fused model's pathology block: the mean-pooled slide vector (exact per-patch "
        "explanations), or gated-attention MIL over the patch features (attention maps).")] = "mean"
    abmil_in_ablation: Annotated[bool, setting(
        "Cross-validate ABMIL beside mean pooling (and fit it for attention "
        "maps) when patch features are at hand.")] = True
    abmil_max_epochs: Annotated[int, setting(
        "ABMIL: most training epochs (early stopping on an inner split usually "
        "stops it sooner).")] = 60
    seed: Annotated[int, setting("Seed of the splits, bootstrap and stochastic estimators.")] = 0

    def __post_init__(self):
        from gcmlm_assets.cohort.model.combiners import FUSIONS

        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.pathology_pooling not in POOLINGS:
            raise ValueError(f"pathology_pooling must be one of {', '.join(POOLINGS)}, got {self.pathology_pooling!r}")
        if self.n_splits < 2 or self.n_repeats < 1 or self.n_bootstrap < 1 or self.inner_splits < 2:
            raise ValueError("n_splits and inner_splits must be >= 2, n_repeats and n_bootstrap >= 1")
        if self.abmil_max_epochs < 1:
            raise ValueError(f"abmil_max_epochs must be >= 1, got {self.abmil_max_epochs}")
        if self.risk_threshold is not None and not 0 < self.risk_threshold < 1:
            raise ValueError(f"risk_threshold must lie in (0, 1), got {self.risk_threshold}")
