"""Quality checks of the cohort artifacts, as plain functions (no Dagster).

Each returns a `Verdict`; `checks.py` turns it into an `AssetCheckResult`. Keeping the decisions
here lets tests feed them deliberately broken inputs and see them fail.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from gcmlm_assets.cohort.tables import clinical, fusion
from gcmlm_assets.lazy import lazy

# The check steps import numpy when they run; the definitions (which name the checks) do not.
np = lazy("numpy")

PASS, WARN, ERROR = "pass", "warn", "error"
LISTED = 20  # problems spelled out in a description; the metadata table holds them all


@dataclass
class Verdict:
    outcome: str  # PASS, WARN (failed, severity WARN) or ERROR (failed, severity ERROR)
    description: str  # a failure in plain words, naming the file and the patients
    expected: str  # what a sound artifact looks like, in a few words
    found: str  # what this one looks like, in a few words
    metadata: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome == PASS


def _markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:LISTED])
    return shown + (f"; and {len(items) - LISTED} more" if len(items) > LISTED else "")


def clinical_rows_valid(problems: list[dict]) -> Verdict:
    """Every row of clinical.csv parsed; otherwise name each bad line and its reason."""
    expected = "every row of clinical.csv valid"
    if not problems:
        return Verdict(PASS, "Passed: every row of clinical.csv is valid.", expected, "0 bad rows", {"bad_rows": 0})
    described = [f"line {p['line']}" + (f" (patient {p['patient_id']!r})" if p.get("patient_id") else "")
                 + f": {p['reason']}" for p in problems]
    return Verdict(ERROR, f"{len(problems)} row(s) of clinical.csv could not be used and were left out of the "
                          f"analysis: {_listing(described)}",
                   expected, f"{len(problems)} bad row(s): {_listing(described[:5])}",
                   {"bad_rows": len(problems),
                    "bad_lines": [p["line"] for p in problems],
                    "problems": _markdown_table(problems, ["line", "patient_id", "reason"])})


def fused_ids_unique(patient_ids: list[str]) -> Verdict:
    repeated = sorted(pid for pid, n in Counter(patient_ids).items() if n > 1)
    expected = "one row per patient"
    if repeated:
        return Verdict(ERROR, f"{len(repeated)} patient(s) occur on more than one row of the fused table and "
                              f"would count twice in the model: {_listing(repeated)}",
                       expected, f"{len(repeated)} patient(s) on several rows: {_listing(repeated)}",
                       {"repeated_ids": repeated, "repeated": len(repeated), "rows": len(patient_ids)})
    return Verdict(PASS, f"Passed: {len(patient_ids)} rows, one per patient.", expected,
                   f"{len(patient_ids)} rows, {len(patient_ids)} patients", {"rows": len(patient_ids)})


def modalities_aligned(report: dict) -> Verdict:
    """Feature files that could not be used are errors; orphans (either way) are warnings.

    Error: a radiomics or slide-vector file that was rejected (unreadable, wrong patient id, not
    one row, non-numeric or non-finite features, columns unlike the cohort's). Warning: features
    without a clinical row (scored, not trained on), clinical rows without features (not scored),
    stale artifact folders of patients that are no longer partitions, results left out as unsound
    (their latest materialization failed or failed a blocking check: the upstream asset's own
    failure already says so; here it is only named).
    """
    file_problems = report.get("file_problems", [])
    no_clinical = report.get("features_without_clinical", [])
    no_features = report.get("clinical_without_features", [])
    stale = report.get("stale_folders", [])
    excluded = report.get("excluded_results", [])
    metadata = {"rejected_feature_files": len(file_problems), "features_without_clinical": len(no_clinical),
                "clinical_without_features": len(no_features), "stale_folders": len(stale),
                "excluded_results": len(excluded)}
    if file_problems:
        metadata["rejected"] = _markdown_table(file_problems, ["patient_id", "modality", "file", "reason"])
    if no_clinical:
        metadata["features_without_clinical_ids"] = no_clinical[:200]
    if no_features:
        metadata["clinical_without_features_ids"] = no_features[:200]
    if stale:
        metadata["stale"] = _markdown_table(stale, ["folder", "reason"])
    if excluded:
        metadata["excluded"] = _markdown_table(excluded, ["patient_id", "modality", "reason"])
    expected = ("every feature file usable; every patient with features has a clinical row and every clinical "
                "row has features")
    counts = [f"{n} {what}" for n, what in ((len(file_problems), "rejected feature file(s)"),
                                             (len(no_clinical), "patient(s) without a clinical row"),
                                             (len(no_features), "clinical row(s) without features"),
                                             (len(stale), "stale folder(s)"),
                                             (len(excluded), "result(s) left out as unsound")) if n]
    found = ", ".join(counts) if counts else "all aligned"
    if file_problems:
        described = [f"{p['file']}: {p['reason']}" for p in file_problems]
        return Verdict(ERROR, f"{len(file_problems)} feature file(s) could not be used, so that part of the "
                              f"patient's data counts as missing: {_listing(described)}", expected, found, metadata)
    orphans = []
    if no_clinical:
        orphans.append(f"{len(no_clinical)} patient(s) with features but no clinical row "
                       f"(scored, not trained on): {_listing(no_clinical)}")
    if no_features:
        orphans.append(f"{len(no_features)} clinical row(s) without radiology or pathology features "
                       f"(not scored): {_listing(no_features)}")
    if stale:
        orphans.append(f"{len(stale)} stale artifact folder(s) left out: "
                       f"{_listing([s['folder'] for s in stale])}")
    if excluded:
        described = [f"{e['patient_id']} {e['modality']}: {e['reason']}" for e in excluded]
        orphans.append(f"{len(excluded)} result(s) left out as unsound: {_listing(described)}")
    if orphans:
        return Verdict(WARN, " | ".join(orphans), expected, found, metadata)
    return Verdict(PASS, "Passed: every patient's features and clinical row line up.", expected, found, metadata)


def enough_labelled(table, min_per_class: int) -> Verdict:
    """Labelled patients with at least one feature block, per class, against the configured minimum.

    Too few is a WARN, not an error: the cohort is still growing, risk_model waits (and keeps its
    last good model) until enough patients are labelled.
    """
    labels = table.column(clinical.LABEL_COLUMN).to_pylist()
    has_features = np.zeros(table.num_rows, bool)
    for modality, flag in fusion.AVAILABILITY.items():
        if modality != fusion.CLINICAL and flag in table.column_names:
            has_features |= np.asarray(table.column(flag).to_pylist(), bool)
    counts = {"positive": int(sum(1 for v, f in zip(labels, has_features) if f and v == 1)),
              "negative": int(sum(1 for v, f in zip(labels, has_features) if f and v == 0))}
    metadata = {**counts, "min_labelled_per_class": min_per_class}
    expected = f"at least {min_per_class} labelled patients with features with and without MLM"
    found = f"{counts['positive']} with MLM, {counts['negative']} without"
    short = [f"{name}: {n}" for name, n in counts.items() if n < min_per_class]
    if short:
        return Verdict(WARN, f"too few labelled patients with features to train ({', '.join(short)}; "
                             f"each class needs {min_per_class}, setting risk_model.min_labelled_per_class): "
                             "risk_model waits for more", expected, found, metadata)
    return Verdict(PASS, f"Passed: labelled patients with features: {counts['positive']} MLM, "
                         f"{counts['negative']} without.", expected, found, metadata)


def cv_auc_reported(metrics: dict, model: str = "fused") -> Verdict:
    """The model's CV AUC and its 95 % CI exist; a CI that includes 0.5 is a warning."""
    values = metrics.get(model, {})
    auc, low, high = values.get("auc"), values.get("auc_ci_low"), values.get("auc_ci_high")
    expected = "a cross-validated AUC whose 95 % CI lies above 0.5"
    if any(v is None or not math.isfinite(v) for v in (auc, low, high)):
        why = values.get("note", "metrics missing")
        return Verdict(ERROR, f"The {model} model has no cross-validated AUC ({why}), so its accuracy is unknown.",
                       expected, f"no AUC ({why})", {"model": model})
    metadata = {"model": model, "auc": auc, "auc_ci_low": low, "auc_ci_high": high,
                "patients": values.get("patients")}
    text = f"{model} CV AUC {auc:.3f} (95 % CI {low:.3f}-{high:.3f})"
    found = f"AUC {auc:.3f}, 95 % CI {low:.3f}-{high:.3f}"
    if low <= 0.5 <= high:
        return Verdict(WARN, text + ": the CI includes 0.5, no evidence the model beats chance", expected, found,
                       metadata)
    return Verdict(PASS, f"Passed: {text}.", expected, found, metadata)


def scores_valid(scores, expected_ids: list[str]) -> Verdict:
    """Probabilities finite and in [0, 1], risk groups known, every expected patient scored once."""
    probabilities = np.asarray(scores.column("probability").to_numpy(zero_copy_only=False), float)
    ids = scores.column(clinical.ID_COLUMN).to_pylist()
    problems, found = [], []
    bad = ~np.isfinite(probabilities) | (probabilities < 0) | (probabilities > 1)
    if bad.any():
        problems.append(f"{int(bad.sum())} probability(ies) not finite or outside [0, 1]: "
                        + _listing([f"{ids[i]}={probabilities[i]}" for i in np.flatnonzero(bad)]))
        found.append(f"{int(bad.sum())} of {len(ids)} scores outside [0, 1]: "
                     + _listing([f"{ids[i]} ({probabilities[i]:g})" for i in np.flatnonzero(bad)][:5]))
    groups = set(scores.column("risk_group").to_pylist())
    unknown_groups = sorted(map(str, groups - {"high", "low"}))
    if unknown_groups:
        problems.append(f"unknown risk groups {unknown_groups}")
        found.append(f"risk groups {unknown_groups}")
    repeated = sorted(pid for pid, n in Counter(ids).items() if n > 1)
    if repeated:
        problems.append(f"patients scored twice: {_listing(repeated)}")
        found.append(f"{len(repeated)} patient(s) scored twice")
    missing = sorted(set(expected_ids) - set(ids))
    if missing:
        problems.append(f"{len(missing)} patient(s) with features not scored: {_listing(missing)}")
        found.append(f"{len(missing)} of {len(expected_ids)} patient(s) not scored: {_listing(missing[:5])}")
    metadata = {"scored": len(ids), "expected_patients": len(expected_ids),
                "min_probability": float(np.nanmin(probabilities)) if len(ids) else None,
                "max_probability": float(np.nanmax(probabilities)) if len(ids) else None,
                "bad_probabilities": int(bad.sum()), "not_scored": len(missing)}
    expected = (f"{len(expected_ids)} patient(s) scored once each, probabilities finite in [0, 1], "
                "risk group high or low")
    if problems:
        return Verdict(ERROR, "The risk scores are not valid: " + " | ".join(problems), expected, "; ".join(found),
                       metadata)
    return Verdict(PASS, f"Passed: {len(ids)} patients scored, all probabilities in [0, 1].", expected,
                   f"{len(ids)} patient(s) scored, probabilities {metadata['min_probability']:.3g}-"
                   f"{metadata['max_probability']:.3g}" if ids else "no patient to score", metadata)
