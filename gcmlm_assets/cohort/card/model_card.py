"""The risk model's card (what was fitted, how it was validated, with what software), its
TRIPOD+AI markdown, and the strict-JSON form of the metrics and settings.

Plain Python (no Dagster).
- `model_card()`: the card as a dict (stored as model_card.json);
- `model_card_markdown(card)`: the card rendered under the TRIPOD+AI headings for development
  and internal validation; any key may be missing (rendered "not recorded"), so cards written by
  older versions render too;
- `training_flow(...)`: the participant flow of the training data (labelled patients at each
  step, who was left out and why), from the labelled rows and the fusion report;
- `default_limitations(settings, metrics)`: the limitations that follow from the design and the
  recorded numbers.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import sklearn
import skops

from gcmlm_assets.catalogue import FUSED_TABLE, PLOTS
from gcmlm_assets.cohort.tables.cohort_data import class_counts
from gcmlm_assets.cohort.model.model_settings import FUSED, ModelSettings, fusion_strategy, in_ablation_order, model_labels
from gcmlm_assets.cohort.model.modelling import FusedRiskModel

if TYPE_CHECKING:
    from gcmlm_assets.cohort.model.crossval import CrossValidation


IMPUTATION = ("single missing feature values: median imputation inside each block's pipeline, "
              "fitted on the training patients of each fold; a missing block's features are never imputed "
              "(mean fusion leaves the block out; stacked fusion counts its logit as 0, with an indicator); "
              "the lymph-node block's T/MLN, undefined without a metastatic node, is not missing: it counts as 0 "
              "with an indicator feature, never as the median")
# Said in every card (issue 24): the lymph-node block has only ever seen synthetic slides.
LYMPH_NODE_DATA = ("No public lymph-node slides with annotations are available offline here: the lymph-node block "
                   "has been exercised on synthetic slides only; its figures are not clinical.")
# Said in every card (issue 25): what the delta block compares, and what it has been tried on.
DELTA_DATA = ("The delta block (change of each radiomics feature from a patient's first CT scan to the last, the "
              "days between them and the scans' similarity) exists only for patients with two or more scans; the "
              "interval between scans is whatever the drops hold (not a fixed protocol), and the block has been "
              "exercised on synthetic scans only; its figures are not clinical.")
MISSING_BLOCK_RULE = ("block model skipped; the fused probability uses the blocks the patient has "
                      "(stacked fusion: the missing block's logit counts as 0, with an availability "
                      "indicator; none: not scored)")


def missing_blocks(cv: CrossValidation) -> dict:
    """Per block: how many cross-validated patients lack it, and what is done about it."""
    n = int(len(cv.labels))
    return {block: {"patients_without": int(n - np.sum(available)), "of": n, "rule": MISSING_BLOCK_RULE}
            for block, available in cv.available.items()}


def model_card(model: FusedRiskModel, settings: ModelSettings, fitted: dict, metrics: dict,
               cv: CrossValidation, data_versions: dict, **extra) -> dict:
    """The card; `extra` adds or replaces keys that model_card_markdown renders (data, flow,
    fusion, explanation, permutation_importance, limitations, ...)."""
    fused = metrics.get(FUSED, {})
    card = {
        "model": "MLM risk (metachronous liver metastasis of gastric cancer)",
        "strategy": fusion_strategy(settings),
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
        "model_labels": {m: model_labels(settings).get(m, m) for m in metrics},
        "missing": missing_blocks(cv),
        "imputation": IMPUTATION,
        "limitations": default_limitations(asdict(settings), metrics),
    }
    card.update(extra)
    return card


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


# ---------------------------------------------------------------- participant flow and limitations


def _reasons_by_patient(fusion_report: dict) -> dict[str, list[str]]:
    """{patient_id: ["<modality> <what>: reason", ...]} of rejected or left-out feature results."""
    reasons: dict[str, list[str]] = {}
    for entry in fusion_report.get("file_problems", []):
        reasons.setdefault(entry["patient_id"], []).append(f"{entry['modality']} file rejected: {entry['reason']}")
    for entry in fusion_report.get("excluded_results", []):
        reasons.setdefault(entry["patient_id"], []).append(f"{entry['modality']} result left out: {entry['reason']}")
    return reasons


# Said in every card: what happens to the patients who are not training data.
NOT_TRAINING_DATA = ("patients without an MLM label (mlm empty), or with features but no clinical row, are not "
                     "training data: the model scores them as it is. Adding such patients, or changing their "
                     "features, does not refit it; a new label, a labelled patient's changed features or a changed "
                     "setting does.")
NOT_IN_TABLE = ("rows of clinical.csv that fail validation are not in the table (the clinical_rows_valid check "
                "names them)")


def training_flow(labelled: list[tuple[str, int, bool]], fusion_report: dict, cv_patients: int) -> list[dict]:
    """Steps {step, patients, excluded: [{patient_id, reason}]} of the training data, from the
    labelled patients of the fused table to the cross-validation.

    `labelled`: (patient_id, label, has a block the model uses) of every labelled patient;
    `fusion_report`: fused_table's report, for why a labelled patient lost a modality. `excluded`
    at a step lists who was lost between the previous step and this one, or (at the first step) a
    modality of a patient that was left out while the patient stayed. Unlabelled patients are not
    in the flow: they are not training data (NOT_TRAINING_DATA).
    """
    reasons = _reasons_by_patient(fusion_report)

    def counted(rows) -> str:
        labels = [label for _, label, _ in rows]
        return f"{labels.count(1)} MLM, {labels.count(0)} no MLM"

    with_features = [row for row in labelled if row[2]]
    steps = [
        {"step": f"labelled patients in the fused table ({counted(labelled)})", "patients": len(labelled),
         "excluded": [{"patient_id": pid, "reason": "; ".join(reasons[pid]) + " (patient kept with the data left)"}
                      for pid, _, has in labelled if has and pid in reasons]},
        {"step": f"labelled patients with features ({counted(with_features)})", "patients": len(with_features),
         "excluded": [{"patient_id": pid, "reason": "; ".join(reasons[pid]) if pid in reasons
                       else "clinical row but no feature file yet"} for pid, _, has in labelled if not has]},
    ]
    cv_lost = [] if cv_patients == len(with_features) else [
        {"patient_id": None, "reason": f"{len(with_features) - cv_patients} labelled patients not cross-validated"}]
    steps.append({"step": "patients in the cross-validation", "patients": int(cv_patients), "excluded": cv_lost})
    return steps


def _untrained_encoder(settings: dict) -> str | None:
    encoder = settings.get("encoder")
    if isinstance(encoder, dict) and encoder.get("untrained"):
        return str(encoder.get("name") or encoder.get("description") or "untrained encoder")
    if settings.get("untrained_encoder") or (isinstance(encoder, str) and "untrained" in encoder.lower()):
        return str(encoder or "untrained encoder")
    return None


def _as_settings(settings: dict | ModelSettings) -> ModelSettings:
    if isinstance(settings, ModelSettings):
        return settings
    known = {k: v for k, v in settings.items() if k in ModelSettings.__dataclass_fields__}
    try:
        return ModelSettings(**known)
    except (TypeError, ValueError):
        return ModelSettings()


def default_limitations(settings: dict | ModelSettings, metrics: dict) -> list[str]:
    """What the design and the recorded numbers limit. `settings` may also record `encoder`
    ({"name", "untrained"} or a description) and `synthetic_data` (bool)."""
    if not isinstance(settings, dict):
        settings = asdict(settings)
    rows = [m for m in metrics.values() if isinstance(m, dict)]
    fused = metrics.get(FUSED) or max(rows, key=lambda m: m.get("patients", 0), default={})
    patients, events = fused.get("patients"), fused.get("positive")
    out: list[str] = []
    if patients is not None and (patients < 200 or (events or 0) < 100):
        out.append(f"Small cohort: {patients} patients with {events} MLM events in the cross-validation; "
                   "estimates are imprecise (see the width of the AUC confidence intervals) and the "
                   "feature selection is unstable.")
    out.append("Internal validation only (repeated cross-validation in one cohort): no external or "
               "temporal validation; performance in other centres, scanners or staining protocols is unknown.")
    out.append("Classes are weighted inversely to their frequency (class_weight='balanced'): predicted "
               "probabilities are shifted towards 0.5 relative to the prevalence, so absolute risks are "
               "miscalibrated (see the calibration intercept) even where ranking is good.")
    out.append("Sensitivity and specificity are at the Youden threshold chosen on the same out-of-fold "
               "predictions, hence optimistic.")
    labels = model_labels(_as_settings(settings))
    steep = [f"{labels.get(key, key)} {m['calibration_slope']:.2f}" for key, m in metrics.items()
             if isinstance(m, dict) and isinstance(m.get("calibration_slope"), int | float)
             and math.isfinite(m["calibration_slope"]) and m["calibration_slope"] < 0.8]
    if steep:
        out.append(f"Calibration slope below 0.8 ({'; '.join(steep)}): those predictions are too extreme "
                   "for the data, a sign of overfitting.")
    encoder = _untrained_encoder(settings)
    if encoder:
        out.append(f"The pathology features come from an untrained encoder ({encoder}): the pathology "
                   "block carries no learned histology, only what random projections keep.")
    out.append(LYMPH_NODE_DATA)
    out.append(DELTA_DATA)
    if settings.get("synthetic_data"):
        out.append("The data are synthetic (generated for tests or a demo): the figures describe the "
                   "pipeline, not gastric cancer.")
    return out


# ---------------------------------------------------------------- TRIPOD+AI markdown

NOT_RECORDED = "not recorded"
NOT_ESTIMABLE = "not estimable"
TRIPOD_SECTIONS = (
    "Source of data and dates", "Participants and flow", "Missing data",
    "Model development", "Validation design", "Performance: discrimination", "Performance: calibration",
    "Performance: clinical utility (decision curve)", "Explanations", "Limitations", "Software and settings",
)


def _text(value) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return NOT_RECORDED
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(metrics: dict, key: str, digits: int = 3) -> str:
    """A recorded metric; absent: not recorded; None/NaN (stored JSON's NaN): not estimable."""
    if key not in metrics:
        return NOT_RECORDED
    value = metrics[key]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NOT_ESTIMABLE
    return f"{value:.{digits}f}" if isinstance(value, int | float) else _text(value)


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _bullets(pairs: list[tuple[str, object]]) -> list[str]:
    return [f"- {name}: {_text(value)}" for name, value in pairs]


def _source_section(card: dict) -> list[str]:
    data = _mapping(card.get("data"))
    versions = _mapping(card.get("data_versions"))
    clinical = _mapping(data.get("clinical_csv"))
    fused = _mapping(data.get(FUSED_TABLE.key)) or {"path": versions.get(FUSED_TABLE.key),
                                                  "sha256": versions.get("fused_table_sha256")}
    training = _mapping(data.get("training_data"))
    lines = _bullets([("landing zone", data.get("landing_zone")), ("clinical.csv", clinical.get("path")),
                      ("fused table", fused.get("path")), ("training data", training.get("rows")),
                      ("training data sha256", training.get("sha256") or versions.get("training_data_sha256")),
                      ("patch features (ABMIL) sha256", training.get("patch_features_sha256")),
                      ("patients added later", data.get("patients_added_later")),
                      ("model trained", data.get("trained_at"))])
    # cards written before the training data was hashed on its own recorded the input files
    lines += _bullets([(name, value) for name, value in (
        ("clinical.csv sha256", clinical.get("sha256")), ("clinical.csv modified", clinical.get("modified")),
        ("fused table sha256", fused.get("sha256")), ("fused table built", fused.get("built"))) if value])
    return lines


def _flow_section(card: dict) -> list[str]:
    flow = card.get("flow")
    if not isinstance(flow, list) or not flow:
        return [f"Participant flow {NOT_RECORDED}."]
    lines = ["| step | patients | left out here (a patient, or a modality of one) |", "|---|---|---|"]
    details: list[str] = []
    for step in flow:
        excluded = step.get("excluded") or []
        lines.append(f"| {_text(step.get('step'))} | {_text(step.get('patients'))} | {len(excluded)} |")
        for entry in excluded:
            who = entry.get("patient_id") or "(unnamed)"
            details.append(f"- {_text(step.get('step'))} — {who}: {_text(entry.get('reason'))}")
    if details:
        lines += ["", "Patients left out (or a modality of theirs) and why:", *details]
    outside = [note for note in _mapping(card.get("data")).get("not_in_flow") or [] if isinstance(note, str)]
    if outside:
        lines += ["", "Not in the flow:", *(f"- {_text(note)}" for note in outside)]
    return lines


def _missing_section(card: dict) -> list[str]:
    missing = _mapping(card.get("missing"))
    lines = []
    if missing:
        lines += ["| block | patients without | of | handling |", "|---|---|---|---|"]
        lines += [f"| {block} | {_text(m.get('patients_without'))} | {_text(m.get('of'))} | {_text(m.get('rule'))} |"
                  for block, m in missing.items() if isinstance(m, dict)]
    else:
        lines.append(f"Missing blocks {NOT_RECORDED}.")
    lines += ["", f"- imputation: {_text(card.get('imputation'))}"]
    return lines


def _development_section(card: dict) -> list[str]:
    fusion = _mapping(card.get("fusion"))
    lines = _bullets([("classifier", card.get("classifier")),
                      ("fusion rule", fusion.get("rule") or card.get("strategy")),
                      ("default fusion", fusion.get("default")), ("why", fusion.get("why")),
                      ("risk threshold", card.get("risk_threshold")),
                      ("risk threshold source", card.get("risk_threshold_source"))])
    combiner = fusion.get("combiner")
    if isinstance(combiner, dict) and combiner:
        lines.append("- combiner: " + "; ".join(f"{k} = {_text(v)}" for k, v in combiner.items()))
    blocks = _mapping(card.get("blocks"))
    lines += ["", "Blocks:" if blocks else f"Blocks {NOT_RECORDED}."]
    for block, info in blocks.items():
        info = _mapping(info)
        if not info.get("fitted", True):
            lines.append(f"- {block}: not fitted ({_text(info.get('reason'))})")
            continue
        parts = [f"{_text(info.get('train_patients'))} training patients "
                 f"({_text(info.get('positive'))}/{_text(info.get('negative'))})",
                 f"{_text(info.get('n_input_features'))} input features",
                 "steps " + " -> ".join(info.get("steps") or [NOT_RECORDED])]
        if info.get("selected_features"):
            parts.append("selected: " + ", ".join(info["selected_features"]))
        if info.get("features"):
            parts.append("features: " + ", ".join(info["features"]))
        if info.get("pca_components") is not None:
            parts.append(f"PCA {info['pca_components']} components "
                         f"({_text(info.get('pca_explained_variance'))} of the variance)")
        lines.append(f"- {block}: " + "; ".join(parts))
    return lines


def _validation_section(card: dict) -> list[str]:
    validation = _mapping(card.get("validation"))
    lines = _bullets([("scheme", validation.get("scheme")), ("patients", validation.get("patients")),
                      ("with MLM (positive)", validation.get("positive")),
                      ("without MLM (negative)", validation.get("negative"))])
    notes = validation.get("notes")
    if isinstance(notes, list):
        lines += [f"- note: {_text(n)}" for n in notes] or ["- notes: none"]
    else:
        lines.append(f"- notes: {_text(notes)}")
    return lines


def _model_rows(card: dict) -> list[tuple[str, dict]]:
    labels = _mapping(card.get("model_labels"))
    metrics = _mapping(card.get("metrics"))
    return [(_text(labels.get(key, key)), metrics[key]) for key in in_ablation_order(metrics)
            if isinstance(metrics[key], dict)]


def _counts(m: dict) -> str:
    return f"{_text(m.get('patients'))} ({_text(m.get('positive'))}/{_text(m.get('negative'))})"


def _discrimination_section(rows: list[tuple[str, dict]]) -> list[str]:
    if not rows:
        return [f"Metrics {NOT_RECORDED}."]
    lines = ["| model | patients (+/−) | AUC [95 % CI] | AUC SD over repeats | sensitivity | specificity |",
             "|---|---|---|---|---|---|"]
    for name, m in rows:
        if "auc" not in m:
            lines.append(f"| {name} | {_counts(m)} | {_text(m.get('note'))} | – | – | – |")
            continue
        lines.append(f"| {name} | {_counts(m)} | {_num(m, 'auc')} [{_num(m, 'auc_ci_low')}, "
                     f"{_num(m, 'auc_ci_high')}] | {_num(m, 'auc_repeat_sd')} | {_num(m, 'sensitivity', 2)} | "
                     f"{_num(m, 'specificity', 2)} |")
    lines += ["", "AUC: mean over the CV repeats of the out-of-fold AUC, 95 % CI by stratified bootstrap over "
                  "patients. Sensitivity/specificity at the Youden threshold of the same predictions (optimistic)."]
    return lines


def _calibration_section(rows: list[tuple[str, dict]]) -> list[str]:
    if not rows:
        return [f"Metrics {NOT_RECORDED}."]
    lines = ["| model | calibration slope | calibration intercept | Brier |", "|---|---|---|---|"]
    lines += [f"| {name} | – | – | – |" if "auc" not in m and "note" in m else  # no metrics; the note is above
              f"| {name} | {_num(m, 'calibration_slope')} | {_num(m, 'calibration_intercept')} | "
              f"{_num(m, 'brier')} |" for name, m in rows]
    lines += ["", "Slope: b of y ~ a + b·logit(p) (ideal 1; below 1: predictions too extreme). Intercept: "
                  "calibration-in-the-large, a of y ~ a + offset(logit(p)) (ideal 0; below 0: risks "
                  "overestimated). Both on the per-patient mean out-of-fold probability."]
    return lines


def _decision_curve_section(rows: list[tuple[str, dict]]) -> list[str]:
    thresholds = sorted({t for _, m in rows for t in _mapping(m.get("net_benefit"))}, key=float)
    if not thresholds:
        return [f"Net benefit {NOT_RECORDED}."]
    lines = ["| model | " + " | ".join(f"NB at {t}" for t in thresholds) + " | treat all at the same thresholds |",
             "|---|" + "---|" * (len(thresholds) + 1)]
    for name, m in rows:
        benefit = _mapping(m.get("net_benefit"))
        if not benefit and "note" in m:
            lines.append(f"| {name} | " + " | ".join("–" for _ in thresholds) + " | – |")
            continue
        cells = [_num(benefit, t, 4) for t in thresholds]
        treat_all = NOT_RECORDED
        if isinstance(m.get("positive"), int) and m.get("patients"):
            prevalence = m["positive"] / m["patients"]
            treat_all = ", ".join(f"{prevalence - (1 - prevalence) * float(t) / (1 - float(t)):.4f}"
                                  for t in thresholds)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {treat_all} |")
    lines += ["", "Net benefit = TP/n − FP/n · t/(1 − t) at threshold probability t; treat none has net "
                  f"benefit 0. The full curve is in {PLOTS['decision_curve'].name}."]
    return lines


def _explanation_section(card: dict) -> list[str]:
    from gcmlm_assets.cohort.explain.importance import importance_markdown

    explanation = _mapping(card.get("explanation"))
    lines = _bullets([("method", explanation.get("method")), ("notes", explanation.get("notes"))])
    rows = card.get("permutation_importance")
    lines += ["", "Permutation importance (AUC drop when shuffled):", "",
              importance_markdown(rows) if isinstance(rows, list) and rows else NOT_RECORDED]
    return lines


def _software_section(card: dict) -> list[str]:
    software, settings = _mapping(card.get("software")), _mapping(card.get("settings"))

    def listed(values: dict) -> list[str]:
        # non-strings in JSON spelling: a setting left at None reads "null", not "not recorded"
        return [f"- {k}: {_text(v if isinstance(v, str) else json.dumps(v, default=str))}"
                for k, v in values.items()] or [f"- {NOT_RECORDED}"]

    return ["Software:", *listed(software), "", "Settings:", *listed(settings)]


def model_card_markdown(card: dict) -> str:
    """The card as markdown under the TRIPOD+AI headings (development and internal validation)."""
    card = card if isinstance(card, dict) else {}
    rows = _model_rows(card)
    limitations = card.get("limitations")
    sections = {
        "Source of data and dates": _source_section(card),
        "Participants and flow": _flow_section(card),
        "Missing data": _missing_section(card),
        "Model development": _development_section(card),
        "Validation design": _validation_section(card),
        "Performance: discrimination": _discrimination_section(rows),
        "Performance: calibration": _calibration_section(rows),
        "Performance: clinical utility (decision curve)": _decision_curve_section(rows),
        "Explanations": _explanation_section(card),
        "Limitations": [f"- {_text(item)}" for item in limitations] if limitations else [f"- {NOT_RECORDED}"],
        "Software and settings": _software_section(card),
    }
    out = [f"# Model card: {_text(card.get('model'))}", "",
           "TRIPOD+AI report: model development and internal validation.", "",
           *_bullets([("intended use", card.get("intended_use")), ("classifier", card.get("classifier"))])]
    for number, title in enumerate(TRIPOD_SECTIONS, start=1):
        out += ["", f"## {number}. {title}", "", *sections[title]]
    return "\n".join(out) + "\n"
