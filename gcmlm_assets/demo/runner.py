"""`make demo`: a synthetic cohort through the real Dagster instance, from landing zone to risk scores.

What happens, in order (each step prints a line with its time):

1. The synthetic cohort is written into the landing zone (`synthetic.write_cohort`; files whose
   bytes would not change are left alone, so a second demo sees no change).
2. The real `landing_sensor` of `gcmlm_assets.definitions.defs` is evaluated once against the
   instance, with the cursor the previous demo left in the instance's key-value store. Its
   dynamic-partition requests are applied to the instance, and its run requests are launched as
   the daemon would launch them: tagged with the sensor name and run key, and skipped when a run
   with that key exists already.
3. The runs go in dependency order: pathology runs and the radiology runs of patients with a
   reference mask; then `segmentation_model` (trained on those reference masks); then the radiology
   runs of patients whose mask the model predicts; then the cohort assets (`clinical_table`,
   `fused_table`, `risk_model`, `risk_scores`) in one run, when anything they read changed.
   Partitions that are not materialized although their drop did not change (a run that failed or
   was interrupted last time) are launched again ("catch-up"), so a re-run completes a cohort.
4. A summary read back from the instance: partitions, materialization status per asset, the
   latest check result per check and partition, the risk model's ablation table, and where
   everything lives.

Runs execute in this process (`in_process`, the default) or with the definitions' own executor
through `dagster.execute_job` (`multiprocess`: one subprocess per step). Both write the same runs,
events and check evaluations into the instance; see `python -m benchmarks.demo_executors` for why
the default is in-process on a small machine.

The demo's compute settings (an untrained ViT-Ti encoder instead of UNI, a tiny nnU-Net trained for
a few epochs on CPU, fewer CV repeats) are passed as run config of the resources, never by changing
the resources' production defaults; they are printed at the start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dagster as dg

from gcmlm_assets import settings
from gcmlm_assets.demo import synthetic
from gcmlm_assets.landing.sensors import MODALITY_ASSETS

SENSOR_NAME = "landing_sensor"
# Where the demo keeps the sensor cursor between invocations (the instance's key-value store).
CURSOR_KEY = "gcmlm/demo/landing_sensor_cursor"
LAUNCHED_BY_TAG = "gcmlm/launched_by"
REASON_TAG = "gcmlm/reason"
RUN_KEY_TAG = "dagster/run_key"
SENSOR_NAME_TAG = "dagster/sensor_name"
PARTITION_TAG = "dagster/partition"

# The sensor's own modality -> assets map, as asset names.
MODALITY_ASSET_NAMES = {modality: tuple(key.to_user_string() for key in keys)
                        for modality, keys in MODALITY_ASSETS.items()}
RADIOLOGY_ASSETS = MODALITY_ASSET_NAMES["radiology"]
PATHOLOGY_ASSETS = MODALITY_ASSET_NAMES["pathology"]
PER_PATIENT_ASSETS = RADIOLOGY_ASSETS + PATHOLOGY_ASSETS
SEGMENTATION_ASSET = "segmentation_model"
COHORT_ASSETS = ("clinical_table", "fused_table", "risk_model", "risk_scores")
EXECUTORS = ("in_process", "multiprocess")

# Demo compute settings, per resource key: small and fast on a CPU-only laptop. Production
# defaults stay untouched; these go into every demo run's run config.
DEMO_RESOURCE_CONFIG: dict[str, dict[str, Any]] = {
    "encoder": {"name": "vit-tiny-random", "batch_size": 32, "num_workers": 0},
    # The radiology group's `SegmentationModelResource.cpu_demo()` settings, trained a little
    # longer: the demo's 12 reference CTs are larger than the tests' phantoms.
    "segmentation": {"trainer": "nnUNetTrainerAdam", "epochs": 20, "iterations_per_epoch": 15,
                     "val_iterations": 2, "tiny_plans": True, "device": "cpu",
                     "preprocessing_workers": 1, "augmentation_workers": 0, "torch_threads": 2},
}
DEMO_SETTING_NOTES: dict[str, str] = {
    "encoder": "untrained ViT-Ti/16 (fixed-seed random weights) instead of UNI ViT-L/16: no weights to "
               "download, ~60x less compute; its pooled features still carry the slides' tissue composition",
    "segmentation": "a tiny nnU-Net v2 (4 stages, 4..32 features, patch <= 32x64x64, AdamW) trained for "
                    "20 x 15 iterations on CPU instead of nnU-Net's 1000 x 250 full-size training on a GPU",
}
# Smaller cohorts (tests, --small) have fewer labelled patients per class than production requires.
SMALL_COHORT_RISK_MODEL = {"n_repeats": 3, "n_bootstrap": 300, "min_labelled_per_class": 3}


@dataclasses.dataclass
class DemoRun:
    """One run to launch: a sensor request, a catch-up, the segmentation model or the cohort."""

    label: str
    assets: tuple[str, ...]
    partition: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    run_key: str | None = None


@dataclasses.dataclass
class RunOutcome:
    run: DemoRun
    run_id: str
    success: bool
    seconds: float
    step_seconds: dict[str, float]
    failed_steps: list[str]
    checks_passed: int
    checks_failed: list[str]
    error: str = ""


# Model names of risk_model's metrics, as its ablation table labels them.
MODEL_LABELS = {"radiology": "radiology only", "pathology": "pathology only", "clinical": "clinical only",
                "fused": "fused (all patients)", "fused_all_modalities": "fused (patients with both modalities)"}
# The planted signal is strong enough that a pipeline keeping its information reaches this.
DEMO_AUC_TARGET = 0.8


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- instance


def prepare_dagster_home(home: Path) -> Path:
    """Create DAGSTER_HOME and give it the local instance config (as `make ui` does) if it has none."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    template = Path(__file__).resolve().parents[2] / "deploy" / "local" / "dagster.yaml"
    if not config.exists() and template.is_file():
        shutil.copyfile(template, config)
    return home


def load_cursor(instance: dg.DagsterInstance) -> str | None:
    return instance.run_storage.get_cursor_values({CURSOR_KEY}).get(CURSOR_KEY)


def save_cursor(instance: dg.DagsterInstance, cursor: str | None) -> None:
    if cursor is not None:
        instance.run_storage.set_cursor_values({CURSOR_KEY: cursor})


# ---------------------------------------------------------------- sensor


def tick_landing_sensor(instance: dg.DagsterInstance, defs: dg.Definitions,
                        cursor: str | None) -> tuple[list[str], list[dg.RunRequest], str | None]:
    """Evaluate the real landing_sensor once and apply its partition requests to the instance."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    # The sensor gets the definitions' own resources, as the daemon would give them.
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources,
                                 sensor_name=SENSOR_NAME) as context:
        result = sensor(context)
    added: list[str] = []
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            added.extend(request.partition_keys)
        else:  # the landing sensor never deletes; honour it anyway as the daemon would
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return added, list(result.run_requests or []), result.cursor


def sensor_run(request: dg.RunRequest) -> DemoRun:
    modality = request.tags.get("gcmlm/modality", "")
    assets = tuple(key.to_user_string() for key in (request.asset_selection or []))
    tags = {**request.tags, SENSOR_NAME_TAG: SENSOR_NAME, LAUNCHED_BY_TAG: "demo"}
    if request.run_key:
        tags[RUN_KEY_TAG] = request.run_key
    return DemoRun(f"{request.partition_key} {modality}", assets, request.partition_key, tags, request.run_key)


def already_launched(instance: dg.DagsterInstance, run_key: str | None) -> bool:
    """The daemon's rule: a run key that has a run from this sensor is never launched again."""
    if not run_key:
        return False
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}))
    return any(run.tags.get(SENSOR_NAME_TAG) == SENSOR_NAME for run in runs)


# ---------------------------------------------------------------- launching


def reconstructable_asset_job(job_name: str) -> Any:
    """A pointer to the definitions' implicit asset job that each step's subprocess can rebuild by
    importing `gcmlm_assets.definitions` (what `dagster job execute -m ... -j` builds)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repository = ReconstructableRepository.for_module("gcmlm_assets.definitions", "defs",
                                                      working_directory=os.getcwd())
    return repository.get_reconstructable_job(job_name)


def demo_run_config(defs: dg.Definitions, resource_config: dict[str, dict[str, Any]]) -> dict:
    """Run config for the demo settings, refusing a setting its resource does not have: a renamed
    field must fail here, not silently run production settings."""
    resources = defs.resources or {}
    config: dict[str, dict] = {}
    for key, values in resource_config.items():
        resource = resources.get(key)
        if resource is None:
            raise KeyError(f"demo setting for resource {key!r}, which the definitions do not have "
                           f"(resources: {', '.join(sorted(resources))})")
        fields = getattr(type(resource), "model_fields", {})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise KeyError(f"demo setting(s) {unknown} are not fields of resource {key!r} "
                           f"({type(resource).__name__}: {', '.join(sorted(fields))})")
        # Run config replaces the resource's whole config: keep its other (production) values.
        current = {name: getattr(resource, name) for name in fields}
        merged = {**{k: v for k, v in current.items() if v is not None}, **values}
        config[key] = {"config": merged}
    # Dagster's console logger prints every event at DEBUG; the demo prints one line per run
    # instead. The instance still records every event (the UI shows them).
    return {"resources": config, "loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _step_summary(events: Iterable[dg.DagsterEvent]) -> tuple[dict[str, float], list[str], int, list[str]]:
    starts: dict[str, float] = {}
    seconds: dict[str, float] = {}
    failed: list[str] = []
    passed, check_failures = 0, []
    for event in events:
        step = event.step_key or ""
        if event.event_type_value == "STEP_START":
            starts[step] = event.timestamp if hasattr(event, "timestamp") else time.time()
        elif event.event_type_value == "STEP_SUCCESS":
            seconds[step] = event.event_specific_data.duration_ms / 1000.0
        elif event.event_type_value == "STEP_FAILURE":
            failed.append(step)
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if evaluation.passed:
                passed += 1
            else:
                part = f"[{evaluation.partition}]" if getattr(evaluation, "partition", None) else ""
                check_failures.append(f"{evaluation.asset_key.to_user_string()}{part}:{evaluation.check_name}"
                                      f" ({evaluation.severity.value})")
    return seconds, failed, passed, check_failures


class Launcher:
    """Launches DemoRuns against one instance with the chosen executor."""

    def __init__(self, instance: dg.DagsterInstance, defs: dg.Definitions, executor: str,
                 run_config: dict):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.instance = instance
        self.defs = defs
        self.executor = executor
        self.run_config = run_config
        self.job = defs.resolve_implicit_global_asset_job_def()

    def launch(self, run: DemoRun) -> RunOutcome:
        selection = [dg.AssetKey(name) for name in run.assets]
        tags = dict(run.tags)
        started = time.perf_counter()
        error = ""
        try:
            if self.executor == "in_process":
                result = self.job.execute_in_process(
                    run_config=self.run_config, instance=self.instance, partition_key=run.partition,
                    asset_selection=selection, tags=tags, raise_on_error=False)
            else:
                if run.partition is not None:
                    tags[PARTITION_TAG] = run.partition
                result = dg.execute_job(reconstructable_asset_job(self.job.name), instance=self.instance,
                                        run_config=self.run_config, tags=tags, asset_selection=selection,
                                        raise_on_error=False)
            success, run_id, events = result.success, result.run_id, result.all_events
        except Exception as exc:  # noqa: BLE001 - one broken run must not stop the others
            success, run_id, events = False, "", []
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        steps, failed, passed, check_failures = _step_summary(events)
        if not success and not error:
            error = _first_failure_message(events)
        return RunOutcome(run, run_id, success, seconds, steps, failed, passed, check_failures, error)


def _first_failure_message(events: Iterable[dg.DagsterEvent]) -> str:
    for event in events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.event_specific_data
            err = getattr(data, "error", None)
            user = getattr(data, "user_failure_data", None)
            if user is not None and user.description:
                return f"{event.step_key}: {user.description}"
            if err is not None:
                return f"{event.step_key}: {err.message.strip().splitlines()[0] if err.message else err}"
    return "run failed (see the run's logs in the UI)"


def format_outcome(index: int, total: int, outcome: RunOutcome) -> str:
    mark = "ok " if outcome.success else "FAIL"
    # Asset steps only; asset checks computed by their own steps take milliseconds.
    steps = ", ".join(f"{name} {sec:.1f}s" for name, sec in outcome.step_seconds.items()
                      if name in outcome.run.assets)
    checks = f"checks {outcome.checks_passed} passed"
    if outcome.checks_failed:
        checks += f", {len(outcome.checks_failed)} failed: {'; '.join(outcome.checks_failed[:3])}"
    line = f"  [{index:>3}/{total}] {mark} {outcome.run.label:<28} {outcome.seconds:6.1f}s  ({steps}) {checks}"
    if outcome.error:
        line += f"\n          error: {outcome.error[:400]}"
    return line


# ---------------------------------------------------------------- planning


def has_reference_mask(landing: Path, patient_id: str) -> bool:
    folder = landing / patient_id / "ct_label"
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


def missing_partitions(instance: dg.DagsterInstance, asset: str, partitions: list[str]) -> list[str]:
    done = instance.get_materialized_partitions(dg.AssetKey(asset))
    return [p for p in partitions if p not in done]


def latest_storage_id(instance: dg.DagsterInstance, asset: str) -> int:
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    return records[0].storage_id if records else 0


def latest_data_version(instance: dg.DagsterInstance, asset: str) -> str | None:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    return event.asset_materialization.tags.get("dagster/data_version")


def cohort_is_current(instance: dg.DagsterInstance, landing: Path) -> bool:
    """Nothing the cohort assets read changed since risk_scores was last materialized."""
    last = instance.fetch_materializations(dg.AssetKey(COHORT_ASSETS[-1]), limit=1).records
    if not last:
        return False
    if any(not instance.get_latest_materialization_event(dg.AssetKey(a)) for a in COHORT_ASSETS):
        return False
    newest_input = max(latest_storage_id(instance, a) for a in ("radiomics_row", "slide_vector"))
    if newest_input > last[0].storage_id:
        return False
    clinical = landing / synthetic.CLINICAL_CSV
    return not clinical.exists() or clinical.stat().st_mtime < last[0].timestamp


# ---------------------------------------------------------------- summary


def latest_check_results(instance: dg.DagsterInstance, run_ids: Iterable[str]) -> dict[tuple[str, str, str], Any]:
    """(asset, check, partition) -> the newest evaluation, over the given runs (oldest first)."""
    latest: dict[tuple[str, str, str], Any] = {}
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        # Checks yielded by a partitioned asset carry no partition of their own; every demo run
        # is for one partition, so the run's partition is theirs.
        run_partition = (run.tags.get(PARTITION_TAG, "") if run else "")
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
            evaluation = entry.dagster_event.event_specific_data
            partition = evaluation.partition or run_partition
            key = (evaluation.asset_key.to_user_string(), evaluation.check_name, partition)
            latest[key] = evaluation
    return latest


def predicted_mask_dice(spec: synthetic.CohortSpec, artifacts: Path) -> dict[str, float]:
    """Dice of each nnU-Net-predicted ct_mask against the generator's true stomach (synthetic
    patients without a reference mask; the generator knows what the network had to find)."""
    import numpy as np
    import SimpleITK as sitk

    scores = {}
    for plan in synthetic.plan_cohort(spec):
        path = artifacts / "ct_mask" / plan.patient_id / "mask.nii.gz"
        if plan.has_reference_mask or not path.is_file():
            continue
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)
        truth = sitk.GetArrayFromImage(synthetic.true_stomach_lps(plan, spec)).astype(bool)
        if predicted.shape != truth.shape:
            continue
        total = int(predicted.sum() + truth.sum())
        scores[plan.patient_id] = float(2 * np.logical_and(predicted, truth).sum() / total) if total else 1.0
    return scores


def materialization_metadata(instance: dg.DagsterInstance, asset: str) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def summarise(instance: dg.DagsterInstance, defs: dg.Definitions, landing: Path, artifacts: Path,
              home: Path, spec: synthetic.CohortSpec | None = None) -> dict[str, Any]:
    graph = defs.resolve_asset_graph()
    patients = sorted(instance.get_dynamic_partitions("patients"))
    assets: dict[str, dict[str, int]] = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        name = key.to_user_string()
        node = graph.get(key)
        if node.partitions_def is not None:
            statuses = instance.get_status_by_partition(key, patients, node.partitions_def) or {}
            counts = {"materialized": 0, "failed": 0, "missing": 0}
            for pid in patients:
                status = statuses.get(pid)
                value = getattr(status, "value", str(status)) if status is not None else "missing"
                bucket = {"MATERIALIZED": "materialized", "FAILED": "failed"}.get(str(value).upper(), "missing")
                counts[bucket] += 1
            assets[name] = counts
        else:
            event = instance.get_latest_materialization_event(key)
            assets[name] = {"materialized": int(event is not None), "failed": 0, "missing": int(event is None)}
    demo_runs = sorted(instance.get_runs(filters=dg.RunsFilter(tags={LAUNCHED_BY_TAG: "demo"})),
                       key=lambda r: r.run_id)
    demo_runs = sorted(demo_runs, key=lambda r: (instance.get_run_record_by_id(r.run_id).create_timestamp))
    checks = latest_check_results(instance, [r.run_id for r in demo_runs])
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
        "assets": assets,
        "checks": check_counts,
        "check_failures": failures,
        "risk_model": materialization_metadata(instance, "risk_model"),
        "segmentation_dice": predicted_mask_dice(spec, artifacts) if spec else {},
        "risk_scores": materialization_metadata(instance, "risk_scores"),
        "landing": str(landing),
        "artifacts": str(artifacts),
        "dagster_home": str(home),
        "runs": len(demo_runs),
    }


def risk_model_metrics(risk_model_metadata: dict[str, Any]) -> dict[str, dict]:
    """The cross-validation metrics per model that risk_model wrote beside its model file."""
    path = risk_model_metadata.get("path")
    if not path:
        return {}
    metrics_file = Path(str(path)).parent / "metrics.json"
    try:
        return json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ablation_rows(risk_model_metadata: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None, int | None]]:
    """(model, AUC, CI low, CI high, patients) per model of the ablation."""
    rows = []
    for model, values in risk_model_metrics(risk_model_metadata).items():
        if isinstance(values, dict):
            rows.append((model, values.get("auc"), values.get("auc_ci_low"), values.get("auc_ci_high"),
                         values.get("patients")))
    return rows


def fused_auc(risk_model_metadata: dict[str, Any]) -> tuple[float | None, list | None]:
    return risk_model_metadata.get("fused_auc"), risk_model_metadata.get("fused_auc_ci")


def format_summary(summary: dict[str, Any], wall_seconds: float) -> str:
    lines = ["", "=" * 78, "Summary (read back from the Dagster instance)", "=" * 78]
    lines.append(f"patients (partitions of 'patients'): {len(summary['patients'])}")
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
        lines.append(f"nnU-Net masks vs the generator's truth ({len(values)} predicted patients): Dice mean "
                     f"{sum(values) / len(values):.2f}, min {values[0]:.2f}, max {values[-1]:.2f}")
    rows = ablation_rows(summary["risk_model"])
    lines.append("")
    auc, ci = fused_auc(summary["risk_model"])
    if isinstance(auc, (int, float)):
        ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if isinstance(ci, list) and None not in ci else ""
        lines.append(f"fused CV AUC: {auc:.3f}{ci_text}")
    if rows:
        lines.append("risk_model cross-validated AUC (same folds for every model)")
        lines.append(f"{'model':<40} {'AUC':>6} {'95% CI':>16} {'n':>4}")
        for model, model_auc, low, high, n in rows:
            ci = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
            auc_text = f"{model_auc:.3f}" if isinstance(model_auc, (int, float)) else "n/a"
            label = MODEL_LABELS.get(model, model)
            lines.append(f"{label:<40} {auc_text:>6} {ci:>16} {n if n is not None else '':>4}")
    else:
        lines.append("risk_model: not materialized")
    lines.append("")
    scores = summary["risk_scores"]
    lines.append(f"landing zone:   {summary['landing']}")
    lines.append(f"artifacts:      {summary['artifacts']}")
    if scores.get("path"):
        lines.append(f"risk scores:    {scores['path']}")
    lines.append(f"Dagster home:   {summary['dagster_home']}  (browse it: make ui -> http://127.0.0.1:3000)")
    lines.append(f"wall time:      {wall_seconds / 60:.1f} min, CPU {cpu_seconds() / 60:.1f} min "
                 f"({summary['runs']} demo runs in the instance)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the demo


@dataclasses.dataclass
class DemoResult:
    summary: dict[str, Any]
    outcomes: list[RunOutcome]
    requested: int
    skipped_run_keys: int
    cohort: synthetic.CohortResult
    seconds: float

    @property
    def failed_runs(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.success]


def run_demo(*, spec: synthetic.CohortSpec, instance: dg.DagsterInstance, defs: dg.Definitions,
             landing: Path, artifacts: Path, home: Path, executor: str = "in_process",
             real: synthetic.RealFiles | None = None,
             resource_config: dict[str, dict[str, Any]] | None = None,
             say: Callable[[str], None] = _say) -> DemoResult:
    started = time.perf_counter()
    resource_config = DEMO_RESOURCE_CONFIG if resource_config is None else resource_config
    run_config = demo_run_config(defs, resource_config)

    say(f"[1/4] writing the synthetic cohort ({spec.n_patients} patients"
        f"{' + 1 real' if real else ''}) into {landing}")
    t0 = time.perf_counter()
    cohort = synthetic.write_cohort(
        landing, spec, real=real,
        progress=lambda plan, changed: say(
            f"      {plan.patient_id} mlm={plan.mlm} reference_mask={'yes' if plan.has_reference_mask else 'no '} "
            f"slides={plan.n_slides} {'written' if changed else 'unchanged'}"))
    say(f"      {len(cohort.written)} files written, {cohort.unchanged} patients unchanged "
        f"({time.perf_counter() - t0:.1f}s)")

    say(f"[2/4] evaluating {SENSOR_NAME} against the instance in {home}")
    t0 = time.perf_counter()
    cursor = load_cursor(instance)
    added, requests, new_cursor = tick_landing_sensor(instance, defs, cursor)
    say(f"      {len(added)} new partitions, {len(requests)} run requests "
        f"({'cursor from the last demo' if cursor else 'first tick'}, {time.perf_counter() - t0:.1f}s)")

    patients = sorted(instance.get_dynamic_partitions("patients"))
    requested_runs = []
    skipped = 0
    for request in requests:
        run = sensor_run(request)
        if already_launched(instance, run.run_key):
            skipped += 1
            continue
        requested_runs.append(run)
    if skipped:
        say(f"      {skipped} requests skipped: a run with the same run key exists (as the daemon does)")
    # Catch-up: partitions whose drop did not change but whose assets are not materialized.
    covered = {(r.partition, r.tags.get("gcmlm/modality")) for r in requested_runs}
    catch_up = []
    for modality, names in MODALITY_ASSET_NAMES.items():
        missing = set()
        for name in names:
            missing.update(missing_partitions(instance, name, patients))
        for pid in sorted(missing):
            if (pid, modality) not in covered and _has_modality(landing, pid, modality):
                catch_up.append(DemoRun(f"{pid} {modality} (catch-up)", names, pid,
                                        {"gcmlm/modality": modality, LAUNCHED_BY_TAG: "demo",
                                         REASON_TAG: "not materialized"}))
    if catch_up:
        say(f"      {len(catch_up)} catch-up runs for partitions left unmaterialized by an earlier demo")
    runs = requested_runs + catch_up

    first = [r for r in runs if r.tags.get("gcmlm/modality") == "pathology"
             or has_reference_mask(landing, r.partition or "")]
    later = [r for r in runs if r not in first]
    # Interleave so radiology and pathology progress together in the log.
    first.sort(key=lambda r: (r.partition or "", r.tags.get("gcmlm/modality", "")))

    say(f"[3/4] launching runs ({executor} executor; DAGSTER_HOME={home})")
    launcher = Launcher(instance, defs, executor, run_config)
    outcomes: list[RunOutcome] = []
    total = len(runs) + 2

    def launch(run: DemoRun) -> RunOutcome:
        outcome = launcher.launch(run)
        outcomes.append(outcome)
        say(format_outcome(len(outcomes), total, outcome))
        return outcome

    for run in first:
        launch(run)

    model_before = latest_data_version(instance, SEGMENTATION_ASSET)
    needs_model = bool(later) or model_before is None or any(
        r.tags.get("gcmlm/modality") == "radiology" for r in first)
    if needs_model:
        launch(DemoRun("segmentation_model", (SEGMENTATION_ASSET,), None,
                       {LAUNCHED_BY_TAG: "demo", REASON_TAG: "train on reference masks"}))
    else:
        total -= 1
    model_after = latest_data_version(instance, SEGMENTATION_ASSET)
    if model_before is not None and model_after != model_before:
        # A retrained model changes every predicted mask: re-run those patients' radiology.
        planned = {r.partition for r in later}
        for pid in patients:
            if pid not in planned and not has_reference_mask(landing, pid) and _has_modality(landing, pid, "radiology"):
                later.append(DemoRun(f"{pid} radiology (new model)", RADIOLOGY_ASSETS, pid,
                                     {"gcmlm/modality": "radiology", LAUNCHED_BY_TAG: "demo",
                                      REASON_TAG: "segmentation model changed"}))
                total += 1
    for run in later:
        launch(run)

    if cohort_is_current(instance, landing):
        total -= 1
        say("      cohort assets are current (no input changed since the last risk_scores): not re-run")
    else:
        launch(DemoRun("cohort", COHORT_ASSETS, None, {LAUNCHED_BY_TAG: "demo", REASON_TAG: "refresh cohort"}))

    save_cursor(instance, new_cursor)
    say("[4/4] summary")
    summary = summarise(instance, defs, landing, artifacts, home, spec)
    seconds = time.perf_counter() - started
    return DemoResult(summary, outcomes, len(requests), skipped, cohort, seconds)


def _has_modality(landing: Path, patient_id: str, modality: str) -> bool:
    folder = landing / patient_id / ("ct" if modality == "radiology" else "wsi")
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


def describe_settings(defs: dg.Definitions, resource_config: dict[str, dict[str, Any]], executor: str) -> list[str]:
    lines = ["demo settings (run config for this demo's runs only; production defaults unchanged):"]
    for key, values in resource_config.items():
        lines.append(f"  resource {key!r}: {', '.join(f'{k}={v!r}' for k, v in values.items())}")
        if key in DEMO_SETTING_NOTES:
            lines.append(f"      why: {DEMO_SETTING_NOTES[key]}")
    lines.append(f"  executor: {executor}")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gcmlm_assets.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=synthetic.CohortSpec.n_patients)
    parser.add_argument("--seed", type=int, default=synthetic.CohortSpec.seed)
    parser.add_argument("--small", action="store_true", help="tiny volumes and slides (a test-sized cohort)")
    parser.add_argument("--executor", choices=EXECUTORS, default=os.environ.get("GCMLM_DEMO_EXECUTOR", "in_process"))
    parser.add_argument("--auc-target", type=float, default=DEMO_AUC_TARGET,
                        help="exit with status 2 when the fused CV AUC is not above this (0: no target)")
    parser.add_argument("--no-real-data", action="store_true",
                        help="do not blend in the real files of GCMLM_TEST_DATA")
    args = parser.parse_args(argv)

    home = prepare_dagster_home(Path(os.environ.get("DAGSTER_HOME") or settings.data_root() / "dagster_home"))
    os.environ["DAGSTER_HOME"] = str(home)
    landing, artifacts = settings.landing_root(), settings.artifacts_root()
    spec = (synthetic.CohortSpec.small(args.patients, seed=args.seed) if args.small
            else synthetic.CohortSpec(n_patients=args.patients, seed=args.seed))
    resource_config = dict(DEMO_RESOURCE_CONFIG)
    if args.small or args.patients < 2 * 5:
        resource_config["risk_model"] = SMALL_COHORT_RISK_MODEL
    real = None if args.no_real_data else synthetic.RealFiles.find(os.environ.get("GCMLM_TEST_DATA"))

    t0 = time.perf_counter()
    from gcmlm_assets.definitions import defs

    _say(f"gcmlm_assets demo: definitions loaded in {time.perf_counter() - t0:.1f}s")
    for line in describe_settings(defs, resource_config, args.executor):
        _say(line)
    if real:
        _say(f"  real patient {synthetic.REAL_PATIENT_ID}: {real.ct.name} + reference stomach mask, "
             f"{real.slide.name}; label unknown (scored, not trained on)")
    with dg.DagsterInstance.get() as instance:
        result = run_demo(spec=spec, instance=instance, defs=defs, landing=landing, artifacts=artifacts,
                          home=home, executor=args.executor, real=real, resource_config=resource_config)
    _say(format_summary(result.summary, time.perf_counter() - t0))
    failed = result.failed_runs
    if failed:
        _say(f"{len(failed)} run(s) failed: " + ", ".join(o.run.label for o in failed))
        return 1
    auc, _ = fused_auc(result.summary["risk_model"])
    if args.auc_target > 0:
        if not isinstance(auc, (int, float)) or auc <= args.auc_target:
            _say(f"fused CV AUC {auc} is not above {args.auc_target}: the pipeline lost the planted signal")
            return 2
        _say(f"fused CV AUC {auc:.3f} > {args.auc_target}: the planted signal was recovered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
