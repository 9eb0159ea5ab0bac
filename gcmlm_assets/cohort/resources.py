"""Resources of the cohort group, keyed by resource name."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from gcmlm_assets.profiles import PRODUCTION, Profile


class RiskModelSettings(dg.ConfigurableResource):
    """Settings of `risk_model` (key "risk_model"); changing any of them retrains the model."""

    classifier: Literal["logistic", "svm", "random_forest"] = Field(
        default="logistic", description="L2 logistic regression (penalty chosen on inner folds), "
        "RBF SVM with Platt scaling, or a random forest; all class-balanced.")
    n_splits: int = Field(default=5, description="Folds of the stratified CV (lowered to the smaller class size).")
    n_repeats: int = Field(default=5, description="Repeats of the stratified k-fold CV.")
    n_bootstrap: int = Field(default=1000, description="Bootstrap resamples for the AUC's 95 % CI.")
    pca_components: int = Field(default=8, description="PCA components of the pathology block.")
    correlation_threshold: float = Field(default=0.9, description="Radiomics: drop a feature whose |r| "
                                         "with a kept one exceeds this.")
    l1_c: float = Field(default=0.2, description="Radiomics: inverse strength of the L1 selection.")
    max_radiomics_features: int = Field(default=10, description="Radiomics: most features the L1 step keeps.")
    min_labelled_per_class: int = Field(default=5, ge=2, description="Fewest labelled patients (with "
                                        "features) of each class needed to train; at least 2, as the "
                                        "cross-validation needs two of each class.")
    use_clinical: bool = Field(default=False, description="Add the clinical covariates as a third block.")
    risk_threshold: float | None = Field(default=None, description="Probability at or above which a "
                                         "patient is 'high' risk; empty: the fused CV Youden threshold.")
    fusion: Literal["mean", "stacked"] = Field(
        default="mean", description="How the blocks' logits combine: their mean (mean), or a non-negative "
        "logistic combiner fitted on inner-CV out-of-fold logits (stacked). README \"Fusion\": why mean is the "
        "default.")
    inner_splits: int = Field(default=10, description="Folds of the inner CV whose out-of-fold logits train the "
                              "stacked combiner (lowered to the smaller class size).")
    pathology_pooling: Literal["mean", "abmil"] = Field(
        default="mean", description="The fused model's pathology block: the mean-pooled slide vector (exact "
        "per-patch explanations), or gated-attention MIL over the patch features (attention maps).")
    abmil_in_ablation: bool = Field(default=True, description="Cross-validate ABMIL beside mean pooling (and fit "
                                    "it for attention maps) when patch features are at hand.")
    abmil_max_epochs: int = Field(default=60, description="ABMIL: most training epochs (early stopping on an "
                                  "inner split usually stops it sooner).")
    seed: int = Field(default=0, description="Seed of the splits, bootstrap and stochastic estimators.")

    def model_settings(self):
        from gcmlm_assets.cohort.model.model_settings import ModelSettings

        return ModelSettings(**{name: getattr(self, name) for name in ModelSettings.__dataclass_fields__})


def resources(env: str, profile: Profile = PRODUCTION) -> dict[str, dg.ConfigurableResource]:
    return {"risk_model": RiskModelSettings(**profile.resource_settings("risk_model"))}
