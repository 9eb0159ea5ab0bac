"""The risk model's settings, and the names of the ablation's rows.

Plain Python (no Dagster; nothing heavy imported).
"""

from __future__ import annotations

from dataclasses import dataclass

from gcmlm_assets.cohort.tables.cohort_data import PATHOLOGY_ABMIL
from gcmlm_assets.cohort.tables.fusion import CLINICAL, PATHOLOGY, RADIOLOGY

CLASSIFIERS = ("logistic", "svm", "random_forest")
POOLINGS = ("mean", "abmil")
FUSED = "fused"  # the configured fusion (setting `fusion`)
FUSED_MEAN, FUSED_STACKED = "fused_mean", "fused_stacked"  # the other fusion, reported beside it
FUSED_COMPLETE = "fused_all_modalities"
# the ablation's rows in reading order: blocks, then the fusions
ABLATION_ORDER = (RADIOLOGY, PATHOLOGY, PATHOLOGY_ABMIL, CLINICAL, FUSED, FUSED_MEAN, FUSED_STACKED, FUSED_COMPLETE)


def in_ablation_order(models) -> list:
    """The models (keys) in ABLATION_ORDER, any other after them in their given order (stored JSON sorts keys)."""
    models = list(models)
    return sorted(models, key=lambda m: (ABLATION_ORDER.index(m) if m in ABLATION_ORDER else len(ABLATION_ORDER),
                                         models.index(m)))


LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried on inner folds


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
    fusion: str = "mean"  # README "Fusion": why the mean logit is the default
    inner_splits: int = 10  # folds of the inner CV whose out-of-fold logits train the stacked combiner
    pathology_pooling: str = "mean"
    abmil_in_ablation: bool = True  # evaluate ABMIL beside mean pooling when patch features are at hand
    abmil_max_epochs: int = 60
    seed: int = 0

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

    def fusion_blocks(self) -> tuple[str, ...]:
        """The blocks the fused model combines."""
        pathology = PATHOLOGY_ABMIL if self.pathology_pooling == "abmil" else PATHOLOGY
        return (RADIOLOGY, pathology, CLINICAL) if self.use_clinical else (RADIOLOGY, pathology)

    def blocks(self) -> tuple[str, ...]:
        """Every block the cross-validation evaluates: the fused model's, plus both poolings."""
        blocks = [RADIOLOGY, PATHOLOGY, *([CLINICAL] if self.use_clinical else [])]
        if self.abmil_in_ablation or self.pathology_pooling == "abmil":
            blocks.append(PATHOLOGY_ABMIL)
        return tuple(blocks)

    def other_fusion(self) -> str:
        return FUSED_MEAN if self.fusion == "stacked" else FUSED_STACKED

    def abmil_settings(self):
        from gcmlm_assets.cohort.model.abmil import AbmilSettings

        return AbmilSettings(max_epochs=self.abmil_max_epochs, seed=self.seed)


def model_labels(settings: ModelSettings) -> dict[str, str]:
    """The ablation table's row names."""
    configured = f"fused, {settings.fusion}{' logit' if settings.fusion == 'mean' else ''} (the model)"
    other = "fused, mean logit" if settings.fusion == "stacked" else "fused, stacked"
    return {RADIOLOGY: "radiology", PATHOLOGY: "pathology mean", PATHOLOGY_ABMIL: "pathology ABMIL",
            CLINICAL: "clinical", FUSED: configured, settings.other_fusion(): other,
            FUSED_COMPLETE: f"{configured}, patients with every block"}


def fusion_strategy(settings: ModelSettings) -> str:
    blocks = ", ".join(settings.fusion_blocks())
    if settings.fusion == "stacked":
        return (f"late fusion of {blocks}: a non-negative logistic combiner on the blocks' out-of-fold logits "
                f"(inner {settings.inner_splits}-fold CV of the training patients); a missing block's logit counts "
                "as 0, with an availability indicator")
    return f"late fusion of {blocks}: mean of the logits of the blocks the patient has"


class InsufficientLabels(ValueError):
    """Too few labelled patients of a class to train or cross-validate."""
