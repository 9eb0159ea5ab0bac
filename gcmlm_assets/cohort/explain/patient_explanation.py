"""Why one patient got their score: per-block, per-feature and per-patch parts of the fused logit.

Plain Python (no Dagster). The fused logit is `intercept + sum_k w_k * logit_k + indicator terms`
(combiners.py). With the default linear blocks each block logit splits exactly:
- radiology, clinical, lymph_node and delta: coefficient x the patient's standardised value, per
  feature that reaches the classifier, plus the classifier's intercept (the lymph-node block's T/MLN
  indicator, 1 = no metastatic node, is one of its features; the delta block's features are the
  changes between the patient's first and last CT scan);
- pathology (mean pooling): the logit is affine in the slide vector, which is the mean of every
  patch embedding of every slide, so each patch contributes `weights @ embedding / N` and the rest
  is one constant. The parts are checked to add up to the model's own logit (`EXACT_TOLERANCE`);
  a patient whose patch features no longer match the slide vector the model scored is refused.
A patch's share of the FUSED logit is its share of the pathology logit times the block's weight.

Every part is stated against one reference, the training cohort's average patient with the same
modalities (each block's input at its training mean, explanations.training_mean_input): a block's
logit is split into the average patient's logit plus the patient's differences from it, and the
fused logit into the average patient's fused logit plus weight x (block logit - average block
logit). A patch is red when it raises the patient's risk above the average patient's. The
explanation states the reference, the patient's probability and the decision threshold.

What is not linear gets no contribution: an SVM or random-forest block says so (the risk model's
permutation importance is the cohort-level alternative), and an ABMIL block gives attention
weights, which show where the model looked, not how much each patch added to the score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gcmlm_assets.catalogue import SLIDE_VECTOR
from gcmlm_assets.cohort.explain import explanations
from gcmlm_assets.cohort.tables.cohort_data import PATHOLOGY_ABMIL, CohortData
from gcmlm_assets.cohort.model.combiners import sigmoid
from gcmlm_assets.cohort.tables.fusion import CLINICAL, DELTA, LYMPH_NODE, PATHOLOGY, PREFIX, RADIOLOGY, T_MLN

EXACT_TOLERANCE = 1e-6  # |sum of the parts - the model's logit| allowed per block


class ExplanationError(ValueError):
    """The patient cannot be explained truthfully (names the patient and why)."""


@dataclass
class SlidePatches:
    """One slide's patches as the pathology block saw them."""

    name: str
    slide_path: str | None
    patch_side_level0: float
    coords: np.ndarray  # (N, 2) level-0 px
    features: np.ndarray  # (N, D) as stored


@dataclass
class PatientExplanation:
    patient_id: str
    probability: float
    fused_logit: float
    combination: list[dict]  # one row per term of the fused logit
    risk_threshold: float = 0.5  # the model's decision threshold (a probability)
    # the training cohort's average patient with this patient's modalities (None: a block has no
    # training mean, as ABMIL, so there is no reference)
    reference_fused_logit: float | None = None
    modalities_missing: list[str] = field(default_factory=list)  # the model's blocks scored without
    feature_contributions: dict[str, explanations.FeatureContributions] = field(default_factory=dict)
    patch_contributions: dict[str, np.ndarray] = field(default_factory=dict)  # slide -> (N,) to the block logit
    pathology_weight: float = 0.0  # the pathology block's weight in the fused logit
    pathology_constant: float | None = None
    pathology_reference_logit: float | None = None  # the average patient's pathology logit
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # slide -> (N,), sums to 1 over all slides
    attention_role: str = ""  # "in the score" or "explanation model only"
    residuals: dict[str, float] = field(default_factory=dict)  # block -> parts - logit
    notes: list[str] = field(default_factory=list)

    @property
    def risk_group(self) -> str:
        return "high" if self.probability >= self.risk_threshold else "low"

    @property
    def reference_probability(self) -> float | None:
        return None if self.reference_fused_logit is None else float(sigmoid(self.reference_fused_logit))

    def reading(self) -> str:
        """One line to read every part by: the patient's probability, the threshold, the reference."""
        line = (f"This patient: probability {self.probability:.3f}, {self.risk_group} risk (decision threshold "
                f"{self.risk_threshold:.3f}).")
        if self.modalities_missing:
            line = f"**Scored WITHOUT {' and '.join(self.modalities_missing)}.** " + line
        if self.reference_probability is None:
            return line + " No reference: a block of the model (ABMIL) has no training-average input."
        return (line + f" Reference: the training cohort's average patient with the same modalities, probability "
                f"{self.reference_probability:.3f}; parts are relative to that patient (positive/red raises the "
                "risk above it).")

    def combination_markdown(self) -> str:
        lines = [f"**Scored WITHOUT {' and '.join(self.modalities_missing)}**: the fused logit is made from the "
                 "other blocks.\n"] if self.modalities_missing else []
        lines += ["| term | block logit | average patient's | weight | part of the fused logit | "
                  "part vs. the average patient |", "|---|---|---|---|---|---|"]
        for row in self.combination:
            logit = "–" if row["block_logit"] is None else f"{row['block_logit']:+.4f}"
            reference = "–" if row.get("reference_logit") is None else f"{row['reference_logit']:+.4f}"
            weight = "–" if row["weight"] is None else f"{row['weight']:.4f}"
            relative = "–" if row.get("relative") is None else f"{row['relative']:+.4f}"
            lines.append(f"| {row['term']} | {logit} | {reference} | {weight} | {row['contribution']:+.4f} | "
                         f"{relative} |")
        reference = "–" if self.reference_fused_logit is None else f"**{self.reference_fused_logit:+.4f}**"
        lines.append(f"| **fused logit** | | {reference} | | **{self.fused_logit:+.4f}** | |")
        lines.append(f"\nProbability = 1 / (1 + exp(−fused logit)) = **{self.probability:.4f}**; decision "
                     f"threshold {self.risk_threshold:.4f}: **{self.risk_group} risk**.")
        if self.reference_probability is not None:
            lines.append(f"Reference: the training cohort's average patient with the same modalities (each block's "
                         f"input at its training mean), fused logit {self.reference_fused_logit:+.4f}, probability "
                         f"{self.reference_probability:.4f}; the last column (patient − average, weighted) sums to "
                         f"{self.fused_logit - self.reference_fused_logit:+.4f}.")
        return "\n".join(lines)


def explain_patient(model, data: CohortData, row: int, slides: list[SlidePatches]) -> PatientExplanation:
    """The explanation of `data`'s patient at `row`, with their slides' patches (for pathology)."""
    patient_id = str(data.patient_ids[row])
    logits = model.block_logits(data)[row:row + 1]
    terms = model.combiner.terms(logits)
    fused_logit = float(model.combiner.fused_logit(logits)[0])
    if not np.isfinite(fused_logit):
        raise ExplanationError(f"patient {patient_id}: no block of the model has inputs for this patient")
    explanation = PatientExplanation(patient_id, float(sigmoid(fused_logit)), fused_logit, [],
                                     risk_threshold=float(model.risk_threshold))
    # the same terms (weights, indicators) apply to the average patient with the same blocks, so the
    # intercept and indicators cancel in "patient - average"
    reference_logits = np.full_like(logits, np.nan)
    combination = [{"term": "intercept", "block_logit": None, "weight": None,
                    "contribution": float(terms["intercept"][0]), "reference_logit": None, "relative": 0.0}]
    for k, (block, block_model) in enumerate(model.pipelines.items()):
        logit = float(logits[0, k])
        if not np.isfinite(logit):
            explanation.modalities_missing.append(block)
            combination.append({"term": f"{block} (missing: logit taken as 0)", "block_logit": None,
                                "weight": None, "contribution": 0.0, "reference_logit": None, "relative": 0.0})
            continue
        weight = float(terms["weights"][0, k])
        reference = _reference_logit(block_model, len(model.columns.get(block, [])))
        reference_logits[0, k] = np.nan if reference is None else reference
        combination.append({"term": block, "block_logit": logit, "weight": weight, "contribution": weight * logit,
                            "reference_logit": reference,
                            "relative": None if reference is None else weight * (logit - reference)})
        indicator = float(terms["indicator_weights"][0, k])
        if indicator:
            combination.append({"term": f"{block} present (indicator)", "block_logit": None, "weight": None,
                                "contribution": indicator, "reference_logit": None, "relative": 0.0})
        _explain_block(explanation, block, block_model, model.columns.get(block, []), data, row, logit, weight,
                       slides)
    explanation.combination = combination
    if np.array_equal(np.isfinite(reference_logits), np.isfinite(logits)):
        explanation.reference_fused_logit = float(model.combiner.fused_logit(reference_logits)[0])
    for block, side_model in getattr(model, "side_models", {}).items():
        if block == PATHOLOGY_ABMIL and slides:
            _attention(explanation, side_model, slides, "explanation model only: not in the score")
    return explanation


def _reference_logit(block_model, n_columns: int) -> float | None:
    """The block logit of the training cohort's average patient; None for a block without a
    training-mean input (ABMIL, or a pipeline that standardises nothing)."""
    if not hasattr(block_model, "steps"):
        return None
    try:
        return explanations.reference_logit(block_model, n_columns)
    except ValueError:
        pass
    try:  # an imputer with indicators (the lymph-node block): the standardised features' training mean
        return explanations.standardised_reference_logit(block_model)
    except ValueError:
        return None


def _explain_block(explanation: PatientExplanation, block: str, block_model, columns: list[str], data: CohortData,
                   row: int, logit: float, weight: float, slides: list[SlidePatches]) -> None:
    patient_id = explanation.patient_id
    if block == PATHOLOGY_ABMIL:
        if slides:
            _attention(explanation, block_model, slides, "in the score")
        explanation.notes.append("pathology (ABMIL): attention weights are shown, not contributions; attention "
                                 "is where the model looked, not a share of the score")
        return
    per_feature = block in (RADIOLOGY, CLINICAL, LYMPH_NODE, DELTA)
    exact, reason = (explanations.feature_split_available(block_model) if block == LYMPH_NODE
                     else explanations.exact_contributions_available(block_model))
    if not exact:
        explanation.notes.append(f"{block}: {reason}")
        return
    x_row = data.blocks[block].X[row]
    missing = int(np.sum(~np.isfinite(x_row)))
    if block == LYMPH_NODE:
        t_mln = PREFIX[LYMPH_NODE] + T_MLN
        if t_mln in columns and not np.isfinite(x_row[columns.index(t_mln)]):
            missing -= 1
            explanation.notes.append("lymph_node: T/MLN is undefined (no metastatic node): counted as 0 with its "
                                     "indicator (missingindicator_ln_t_mln) at 1, not as a missing value")
    if missing and per_feature:
        explanation.notes.append(f"{block}: {missing} of the patient's {len(x_row)} features are missing and "
                                 "counted at the training median (a standardised value near 0)")
    if per_feature:
        parts = explanations.feature_contributions(block_model, columns, x_row)
        explanation.feature_contributions[block] = parts
        explanation.residuals[block] = float(np.sum(parts.contributions) + parts.intercept - logit)
    elif block == PATHOLOGY:
        if not slides:
            explanation.notes.append("pathology: no patch features at hand, so no per-patch contributions")
            return
        weights, constant = explanations.affine_map(block_model, len(columns))
        average = explanations.training_mean_input(block_model, len(columns))
        reference = float(weights @ average + constant)  # the average patient's pathology logit
        n_total = sum(len(s.features) for s in slides)
        total = 0.0
        for slide in slides:
            parts = explanations.patch_contributions(weights, constant, slide.features,
                                                     np.full(len(slide.features), 1.0 / n_total), average)
            explanation.patch_contributions[slide.name] = parts
            total += float(np.sum(parts))
        explanation.pathology_constant = float(constant)
        explanation.pathology_reference_logit = reference
        explanation.pathology_weight = weight
        explanation.residuals[block] = total + reference - logit
    residual = explanation.residuals.get(block)
    if residual is not None and abs(residual) > EXACT_TOLERANCE:
        source = ("its patch features differ from the slide vector the model scored: re-materialize "
                  f"{SLIDE_VECTOR.key}" if block == PATHOLOGY else "the parts do not reproduce the model's logit")
        raise ExplanationError(f"patient {patient_id}: {block} contributions add up to {logit + residual:.9f}, "
                               f"not the model's logit {logit:.9f}: {source}")


def _attention(explanation: PatientExplanation, abmil_model, slides: list[SlidePatches], role: str) -> None:
    bag = np.concatenate([s.features for s in slides]).astype(np.float32)
    attention = np.asarray(abmil_model.attention(bag), dtype=np.float64)
    start = 0
    for slide in slides:
        explanation.attention[slide.name] = attention[start:start + len(slide.features)]
        start += len(slide.features)
    explanation.attention_role = role

