"""The risk model's settings, and the names of the ablation's rows.

Plain Python (no Dagster; nothing heavy imported).
"""

from __future__ import annotations

from dataclasses import dataclass

from gcmlm_assets.cohort.tables.cohort_data import PATHOLOGY_ABMIL
from gcmlm_assets.cohort.tables.fusion import CLINICAL, DELTA, LYMPH_NODE, PATHOLOGY, RADIOLOGY
from gcmlm_assets.cohort.model.risk_model_fields import ModelSettingFields

FUSED = "fused"  # the configured fusion (setting `fusion`)
FUSED_MEAN, FUSED_STACKED = "fused_mean", "fused_stacked"  # the other fusion, reported beside it
# The configured fusion on the patients with every block but the optional ones (lymph-node slides
# exist for only part of a cohort: requiring them would shrink this row to that part).
FUSED_COMPLETE = "fused_all_modalities"
# The configured fusion on the patients with lymph-node slides: the lymph_node row's patients.
FUSED_WITH_LYMPH_NODE = "fused_with_lymph_node"
# The configured fusion on the patients with two or more CT scans: the delta row's patients.
FUSED_WITH_DELTA = "fused_with_delta"
# the ablation's rows in reading order: blocks, then the fusions
ABLATION_ORDER = (RADIOLOGY, PATHOLOGY, PATHOLOGY_ABMIL, CLINICAL, LYMPH_NODE, DELTA, FUSED, FUSED_MEAN,
                  FUSED_STACKED, FUSED_COMPLETE, FUSED_WITH_LYMPH_NODE, FUSED_WITH_DELTA)
# The optional blocks' restricted fusion rows, and what the restriction says.
FUSED_WITH = {LYMPH_NODE: FUSED_WITH_LYMPH_NODE, DELTA: FUSED_WITH_DELTA}
WHERE_PRESENT = {LYMPH_NODE: "where the patient has lymph-node slides",
                 DELTA: "where the patient has two or more CT scans"}


def in_ablation_order(models) -> list:
    """The models (keys) in ABLATION_ORDER, any other after them in their given order (stored JSON sorts keys)."""
    models = list(models)
    return sorted(models, key=lambda m: (ABLATION_ORDER.index(m) if m in ABLATION_ORDER else len(ABLATION_ORDER),
                                         models.index(m)))


LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried on inner folds


@dataclass(frozen=True)
class ModelSettings(ModelSettingFields):
    """The risk model's settings (declared in ModelSettingFields) and what follows from them."""

    def fusion_blocks(self) -> tuple[str, ...]:
        """The blocks the fused model combines (the optional ones, lymph nodes and delta, last: a block
        no patient has is left out, and the others keep their places)."""
        pathology = PATHOLOGY_ABMIL if self.pathology_pooling == "abmil" else PATHOLOGY
        blocks = (RADIOLOGY, pathology, CLINICAL) if self.use_clinical else (RADIOLOGY, pathology)
        return (*blocks, LYMPH_NODE, DELTA)

    def blocks(self) -> tuple[str, ...]:
        """Every block the cross-validation evaluates: the fused model's, plus both poolings."""
        blocks = [RADIOLOGY, PATHOLOGY, *([CLINICAL] if self.use_clinical else [])]
        if self.abmil_in_ablation or self.pathology_pooling == "abmil":
            blocks.append(PATHOLOGY_ABMIL)
        blocks += [LYMPH_NODE, DELTA]
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
            CLINICAL: "clinical", LYMPH_NODE: "lymph nodes (counts, areas, T/MLN)",
            DELTA: "delta radiomics (first to last CT scan)", FUSED: configured,
            settings.other_fusion(): other,
            FUSED_COMPLETE: f"{configured}, patients with every block (lymph-node slides and a second CT scan "
                            "not required)",
            FUSED_WITH_LYMPH_NODE: f"{configured}, patients with lymph-node slides",
            FUSED_WITH_DELTA: f"{configured}, patients with two or more CT scans"}


def fusion_strategy(settings: ModelSettings) -> str:
    blocks = ", ".join(f"{b} ({WHERE_PRESENT[b]})" if b in WHERE_PRESENT else b for b in settings.fusion_blocks())
    if settings.fusion == "stacked":
        return (f"late fusion of {blocks}: a non-negative logistic combiner on the blocks' out-of-fold logits "
                f"(inner {settings.inner_splits}-fold CV of the training patients); a missing block's logit counts "
                "as 0, with an availability indicator")
    return f"late fusion of {blocks}: mean of the logits of the blocks the patient has"


class InsufficientLabels(ValueError):
    """Too few labelled patients of a class to train or cross-validate."""
