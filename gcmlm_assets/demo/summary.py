"""What `make demo` reads back from the Dagster instance when the daemon is done: partitions,
materialization status per asset, the latest check result per check and partition, the risk
model's ablation table, the predicted masks' Dice, and where everything lives."""

from __future__ import annotations

import json
import resource
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg

from gcmlm_assets.catalogue import (
    LYMPH_NODE_REGIONS, MASK_VOLUME, METRICS_FILE, MODEL_CARD, RISK_EXPLANATIONS, RISK_MODEL, RISK_SCORES)
from gcmlm_assets.dagster_internals import PARTITION_NAME_TAG as PARTITION_TAG
from gcmlm_assets.demo.synthetic_ct import true_stomach_lps
from gcmlm_assets.demo.synthetic_plan import CohortSpec, plan_cohort
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets.demo.watch import unexplained
from gcmlm_assets.partitions import ct_scans_partitions, patients_partitions

# The risk model's ablation row of the delta radiomics block (cohort/tables/deltas.py).
DELTA_BLOCK = "delta"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def latest_check_results(instance: dg.DagsterInstance, run_ids: Iterable[str]) -> dict[tuple[str, str, str], Any]:
    """(asset, check, partition) -> the newest evaluation, over the given runs (oldest first)."""
    latest: dict[tuple[str, str, str], Any] = {}
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        # A per-patient asset's check results carry their patient (batching.py); one stored without
        # (an older instance's) belongs to its run's patient.
        run_partition = (run.tags.get(PARTITION_TAG, "") if run else "")
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
            evaluation = entry.dagster_event.event_specific_data
            partition = evaluation.partition or run_partition
            key = (evaluation.asset_key.to_user_string(), evaluation.check_name, partition)
            latest[key] = evaluation
    return latest


def predicted_mask_dice(spec: CohortSpec, artifacts: Path) -> dict[str, float]:
    """Dice of each nnU-Net-predicted ct_mask against the generator's true stomach, per scan key
    (synthetic patients without reference masks, each of their CTs; the generator knows what the
    network had to find)."""
    import numpy as np
    import SimpleITK as sitk

    from gcmlm_assets.scans import scan_key

    scores = {}
    for plan in plan_cohort(spec):
        if plan.has_reference_mask:
            continue
        for k, timepoint in enumerate(plan.scan_dates or (None,)):
            key = scan_key(plan.patient_id, timepoint)
            path = MASK_VOLUME.path(ArtifactStore(artifacts), key)
            if not path.is_file():
                continue
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)
            truth = sitk.GetArrayFromImage(true_stomach_lps(plan, spec, followup=k > 0)).astype(bool)
            if predicted.shape != truth.shape:
                continue
            total = int(predicted.sum() + truth.sum())
            scores[key] = float(2 * np.logical_and(predicted, truth).sum() / total) if total else 1.0
    return scores


def lymph_nodes_against_truth(landing: Path, artifacts: Path) -> dict[str, Any] | None:
    """The lymph_nodes outputs against the generator's planted nodes (demo/lymph_node_truth.py):
    the figures on the held-out patients (the headline, the targets judged there) and on the tumour
    classifier's annotated training patients, apart, and the text with a table per patient; None
    when the landing zone holds no planted truth (not a demo cohort)."""
    from gcmlm_assets.demo.lymph_node_truth import split_by_training
    from gcmlm_assets.demo.synthetic import LYMPH_NODE_TRUTH, read_lymph_node_truth

    if not (Path(landing) / LYMPH_NODE_TRUTH).is_file():
        return None
    truth = read_lymph_node_truth(landing)
    store = ArtifactStore(artifacts)
    regions = {}
    for patient_id in truth:
        path = LYMPH_NODE_REGIONS.path(store, patient_id)
        try:
            regions[patient_id] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            regions[patient_id] = None  # not made: counts against every figure
    report = split_by_training(truth, regions)
    return {"figures": report.figures(), "targets_met": report.targets_met(), "text": report.markdown()}


def materialization_metadata(instance: dg.DagsterInstance, asset: str) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def timepoint_counts(scan_keys: Iterable[str]) -> dict[str, int]:
    """{"scans", "patients", "with_two_or_more"}: the scans of `ct_scans` and the patients with at least
    two timepoints (the delta block's patients, if their scans are sound)."""
    from gcmlm_assets.scans import patient_scans

    keys = list(scan_keys)
    by_patient = patient_scans(keys)
    return {"scans": len(keys), "patients": len(by_patient),
            "with_two_or_more": sum(len(scans) >= 2 for scans in by_patient.values())}


def planted_change_auc(spec: CohortSpec) -> dict[str, Any] | None:
    """The generator's truth for the delta block: the patients planned with a second CT and the AUC
    of their planted change itself against the label (the ceiling for what the delta block can
    find on them); None when no patient has a second CT."""
    plans = [p for p in plan_cohort(spec) if p.scan_dates]
    positives = [p.radiology_change for p in plans if p.mlm == 1]
    negatives = [p.radiology_change for p in plans if p.mlm == 0]
    if not positives or not negatives:
        return None if not plans else {"patients": len(plans), "auc": None}
    # Mann-Whitney: the share of (positive, negative) pairs ranked right, ties counting half.
    wins = sum((a > b) + 0.5 * (a == b) for a in positives for b in negatives)
    return {"patients": len(plans), "auc": round(wins / (len(positives) * len(negatives)), 6)}


def summarise(instance: dg.DagsterInstance, defs: dg.Definitions, landing: Path, artifacts: Path,
              home: Path, spec: CohortSpec | None = None) -> dict[str, Any]:
    graph = defs.resolve_asset_graph()
    patients = sorted(instance.get_dynamic_partitions(patients_partitions.name))
    scan_keys = sorted(instance.get_dynamic_partitions(ct_scans_partitions.name))
    assets: dict[str, dict[str, int]] = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        name = key.to_user_string()
        node = graph.get(key)
        if node.partitions_def is not None:
            # Per-scan assets (partition set ct_scans) count scans, the others patients.
            partition_set = getattr(node.partitions_def, "name", None)
            keys = scan_keys if partition_set == ct_scans_partitions.name else patients
            statuses = instance.get_status_by_partition(key, keys, node.partitions_def) or {}
            counts = {"materialized": 0, "failed": 0, "missing": 0}
            for pid in keys:
                status = statuses.get(pid)
                value = getattr(status, "value", str(status)) if status is not None else "missing"
                bucket = {"MATERIALIZED": "materialized", "FAILED": "failed"}.get(str(value).upper(), "missing")
                counts[bucket] += 1
            assets[name] = counts
        else:
            event = instance.get_latest_materialization_event(key)
            assets[name] = {"materialized": int(event is not None), "failed": 0, "missing": int(event is None)}
    records = sorted(instance.get_run_records(), key=lambda record: record.create_timestamp)
    checks = latest_check_results(instance, [record.dagster_run.run_id for record in records])
    check_counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    for (asset, check, partition), evaluation in sorted(checks.items()):
        counts = check_counts.setdefault(f"{asset}:{check}", {"passed": 0, "warn": 0, "error": 0})
        if evaluation.passed:
            counts["passed"] += 1
        else:
            severity = evaluation.severity.value.lower()
            counts["warn" if severity == "warn" else "error"] += 1
            failures.append(f"{asset}{'[' + partition + ']' if partition else ''}:{check} ({severity})")
    return {
        "patients": patients,
        "timepoints": timepoint_counts(scan_keys),
        "planted_change": planted_change_auc(spec) if spec else None,
        "assets": assets,
        "checks": check_counts,
        "check_failures": failures,
        RISK_MODEL.key: materialization_metadata(instance, RISK_MODEL.key),
        "segmentation_dice": predicted_mask_dice(spec, artifacts) if spec else {},
        "lymph_nodes_against_truth": lymph_nodes_against_truth(landing, artifacts) if spec else None,
        RISK_SCORES.key: materialization_metadata(instance, RISK_SCORES.key),
        "explanations": explanation_pictures(artifacts),
        # scored patients whose explanation was not made for their latest score's key (a patient whose
        # key did not change keeps its explanation and counts as explained)
        "explanations_pending": sorted(unexplained(instance)),
        "landing": str(landing),
        "artifacts": str(artifacts),
        "dagster_home": str(home),
        "runs": len(records),
    }


def explanation_pictures(artifacts: Path) -> dict[str, list[str]]:
    """{patient: [heatmap files]} of the published explanations (UI-sized pictures)."""
    from gcmlm_assets.storage import read_version_pointer

    root = ArtifactStore(artifacts).asset_dir(RISK_EXPLANATIONS.key, create=False)  # every patient's folder
    found: dict[str, list[str]] = {}
    for patient in sorted(root.iterdir()) if root.is_dir() else []:
        pointer = read_version_pointer(patient) if patient.is_dir() else None
        if pointer:
            folder = patient / pointer["version"]
            found[patient.name] = sorted(str(p) for p in folder.glob("*.png") if not p.stem.endswith("_full"))
    return found


def risk_model_metrics(risk_model_metadata: dict[str, Any]) -> dict[str, dict]:
    """The cross-validation metrics per model that risk_model wrote beside its model file."""
    path = risk_model_metadata.get("path")
    if not path:
        return {}
    metrics_file = METRICS_FILE.in_folder(Path(str(path)).parent)
    try:
        return json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def model_labels(risk_model_metadata: dict[str, Any]) -> dict[str, str]:
    """The ablation rows' names, as the model card records them."""
    path = risk_model_metadata.get("path")
    try:
        card = json.loads(MODEL_CARD.in_folder(Path(str(path)).parent).read_text(encoding="utf-8")) if path else {}
    except (OSError, json.JSONDecodeError):
        card = {}
    return card.get("model_labels") or {}


def ablation_rows(risk_model_metadata: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None, int | None]]:
    """(model, AUC, CI low, CI high, patients) per model of the ablation."""
    from gcmlm_assets.cohort.model.model_settings import in_ablation_order

    rows = []
    metrics = risk_model_metrics(risk_model_metadata)
    for model, values in ((m, metrics[m]) for m in in_ablation_order(metrics)):
        if isinstance(values, dict):
            rows.append((model, values.get("auc"), values.get("auc_ci_low"), values.get("auc_ci_high"),
                         values.get("patients")))
    return rows


def fused_auc(risk_model_metadata: dict[str, Any]) -> tuple[float | None, list | None]:
    return risk_model_metadata.get("fused_auc"), risk_model_metadata.get("fused_auc_ci")


def delta_lines(summary: dict[str, Any]) -> list[str]:
    """The patients with two or more CT timepoints and the delta block's own ablation AUC (n/a when
    the risk model has no such row, e.g. no patient has two sound scans)."""
    counts = summary.get("timepoints") or {}
    row = next((r for r in ablation_rows(summary.get(RISK_MODEL.key) or {}) if r[0] == DELTA_BLOCK), None)
    auc = row[1] if row else None
    auc_text = f"{auc:.3f}" if isinstance(auc, (int, float)) else "n/a"
    if row and isinstance(row[2], (int, float)) and isinstance(row[3], (int, float)):
        auc_text += f" (95% CI {row[2]:.3f}-{row[3]:.3f})"
    patients = f", {row[4]} patients" if row and row[4] is not None else ""
    lines = [f"CT timepoints: {counts.get('scans', 0)} scans of {counts.get('patients', 0)} patients, "
             f"{counts.get('with_two_or_more', 0)} with two or more",
             f"delta radiomics block (change between the first and last CT) CV AUC: {auc_text}{patients}"]
    planted = summary.get("planted_change")
    if planted and isinstance(planted.get("auc"), (int, float)):
        lines.append(f"  the generator's planted change itself on its {planted['patients']} patients with a second "
                     f"CT: AUC {planted['auc']:.3f} (the ceiling; synthetic, not clinical)")
    return lines


def format_summary(summary: dict[str, Any], wall_seconds: float) -> str:
    lines = ["", "=" * 78, "Summary (read back from the Dagster instance)", "=" * 78]
    lines.append(f"patients (partitions of 'patients'): {len(summary['patients'])}; per-scan assets count the "
                 "scans (partitions of 'ct_scans')")
    lines.append("")
    lines.append(f"{'asset':<20} {'materialized':>12} {'failed':>7} {'missing':>8}")
    for name, counts in summary["assets"].items():
        lines.append(f"{name:<20} {counts['materialized']:>12} {counts['failed']:>7} {counts['missing']:>8}")
    lines.append("")
    lines.append(f"{'check (latest result per partition)':<50} {'passed':>6} {'warn':>5} {'error':>5}")
    for name, counts in summary["checks"].items():
        lines.append(f"{name:<50} {counts['passed']:>6} {counts['warn']:>5} {counts['error']:>5}")
    for failure in summary["check_failures"][:20]:
        lines.append(f"  not passed: {failure}")
    dice = summary.get("segmentation_dice") or {}
    if dice:
        values = sorted(dice.values())
        lines.append("")
        lines.append(f"nnU-Net masks vs the generator's truth ({len(values)} predicted scans): Dice mean "
                     f"{sum(values) / len(values):.2f}, min {values[0]:.2f}, max {values[-1]:.2f}")
    nodes = summary.get("lymph_nodes_against_truth")
    if nodes:  # held-out figures first; the annotated (training) patients' apart, then the table
        lines.append("")
        lines.append(nodes["text"])
    rows = ablation_rows(summary[RISK_MODEL.key])
    lines.append("")
    lines += delta_lines(summary)
    auc, ci = fused_auc(summary[RISK_MODEL.key])
    if isinstance(auc, (int, float)):
        ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if isinstance(ci, list) and None not in ci else ""
        lines.append(f"fused CV AUC: {auc:.3f}{ci_text}")
    if rows:
        lines.append("risk_model cross-validated AUC (same folds for every model)")
        lines.append(f"{'model':<40} {'AUC':>6} {'95% CI':>16} {'n':>4}")
        labels = model_labels(summary[RISK_MODEL.key])
        for model, model_auc, low, high, n in rows:
            ci = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
            auc_text = f"{model_auc:.3f}" if isinstance(model_auc, (int, float)) else "n/a"
            label = labels.get(model, model)
            lines.append(f"{label:<40} {auc_text:>6} {ci:>16} {n if n is not None else '':>4}")
    else:
        lines.append("risk_model: not materialized")
    explained = summary.get("explanations") or {}
    if explained:
        lines.append("")
        pictures = sum(len(p) for p in explained.values())
        lines.append(f"risk_explanations: {len(explained)} patients explained, {pictures} heatmaps "
                     "(per-patch contributions; ABMIL attention), e.g.:")
        example = next((p for p in explained.values() if p), [])
        lines += [f"  {path}" for path in example[:4]]
        pending = summary.get("explanations_pending") or []
        lines.append(f"  {len(pending)} scored patient(s) not yet explained for the latest scores: "
                     f"{', '.join(pending[:10])}" if pending
                     else "  every scored patient's explanation matches the latest scores")
    lines.append("")
    scores = summary[RISK_SCORES.key]
    lines.append(f"landing zone:   {summary['landing']}")
    lines.append(f"artifacts:      {summary['artifacts']}")
    if scores.get("path"):
        lines.append(f"risk scores:    {scores['path']}")
    lines.append(f"Dagster home:   {summary['dagster_home']}  (browse it: make ui -> http://127.0.0.1:3000)")
    lines.append(f"wall time:      {wall_seconds / 60:.1f} min, CPU {cpu_seconds() / 60:.1f} min "
                 f"({summary['runs']} runs in the instance)")
    return "\n".join(lines)
