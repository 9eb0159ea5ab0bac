"""Watching the daemon work: per-asset progress, run failures with their reasons, and when the
cohort has settled (read from the instance only; nothing here launches a run)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.catalogue import (
    ASSETS, COHORT, FOLLOW_ONS, FUSED_TABLE, LN_FEATURES, LYMPH_NODES, MODALITY_CHAINS, RISK_EXPLANATIONS, RISK_SCORES,
    TUMOUR_CLASSIFIER)
from gcmlm_assets.cohort.sensors import PATIENT_FEATURE_ASSETS
from gcmlm_assets.dagster_internals import SENSOR_NAME_TAG
from gcmlm_assets.patient_steps import patients_in_between

PER_PATIENT_ASSETS = tuple(key for key, asset in ASSETS.items() if asset.per_patient)
# The cohort refresh's assets (risk_explanations, per patient, is requested by its own sensor).
COHORT_ASSETS = tuple(key for key, asset in ASSETS.items() if asset.group == COHORT and not asset.per_patient)
EXPLANATIONS = RISK_EXPLANATIONS.key
COHORT_SENSOR = "cohort_refresh_sensor"


class ScoresUnreadable(RuntimeError):
    """risk_scores' latest materialization names a scores file that cannot be read: the watcher
    cannot tell whether every patient is explained, so it must not report the cohort as settled."""


@dataclass(frozen=True)
class Progress:
    patients: int
    per_asset: dict[str, dict[str, int]]  # asset -> done / failed / in progress (queued or running) / waiting
    runs_queued: int
    runs_running: int
    cohort: dict[str, bool]  # cohort asset -> materialized at least once
    training: bool  # a segmentation_model run is queued or running
    scans: int = 0  # CT scans (`ct_scans` partitions), which the radiology assets' counts are of

    def line(self) -> str:
        parts = []
        for name, counts in self.per_asset.items():
            of = f"{self.scans} scans" if ASSETS[name].per_scan else str(self.patients)
            text = f"{name} {counts['done']}/{of}"
            extra = [f"{counts[k]} {k}" for k in ("failed", "in progress") if counts[k]]
            parts.append(text + (f" ({', '.join(extra)})" if extra else ""))
        cohort = " ".join(name for name, done in self.cohort.items() if done) or "none yet"
        training = " | training segmentation_model" if self.training else ""
        return (f"runs {self.runs_running} running, {self.runs_queued} queued{training} | " + " | ".join(parts)
                + f" | cohort: {cohort}")


def progress(instance: dg.DagsterInstance) -> Progress:
    """Each partitioned asset's counts over its own partitions: the radiology assets' over every CT
    scan (a patient's timepoints each count), the others' over the patients."""
    from gcmlm_assets.partitions import partitions_of

    keys: dict[str, list[str]] = {}
    per_asset: dict[str, dict[str, int]] = {}
    for name in PER_PATIENT_ASSETS:
        partitions = partitions_of(ASSETS[name])
        if partitions.name not in keys:
            keys[partitions.name] = list(instance.get_dynamic_partitions(partitions.name))
        known = keys[partitions.name]
        statuses = instance.get_status_by_partition(dg.AssetKey(name), known, partitions) or {}
        values = list(statuses.values())
        done = values.count(dg.AssetPartitionStatus.MATERIALIZED)
        failed = values.count(dg.AssetPartitionStatus.FAILED)
        in_progress = values.count(dg.AssetPartitionStatus.IN_PROGRESS)
        per_asset[name] = {"done": done, "failed": failed, "in progress": in_progress,
                           "waiting": len(known) - done - failed - in_progress}
    in_flight = runs.in_flight_count(instance)
    queued = instance.get_runs_count(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
    cohort = {name: instance.get_latest_materialization_event(dg.AssetKey(name)) is not None
              for name in COHORT_ASSETS}
    training = bool(runs.in_flight_count(instance, {runs.TRAINING_TAG: "nnunet"}))
    from gcmlm_assets.partitions import ct_scans_partitions, patients_partitions

    patients = len(keys.get(patients_partitions.name, ()))
    scans = len(keys.get(ct_scans_partitions.name, ()))
    return Progress(patients, per_asset, queued, in_flight - queued, cohort, training, scans)


def settled(instance: dg.DagsterInstance, since: float) -> bool:
    """Nothing is queued or running, and a cohort refresh ran after every other run that ended
    (and after `since`): the daemon has nothing left to do until new data arrive."""
    if runs.in_flight_count(instance):
        return False
    refreshes = instance.get_run_records(
        filters=dg.RunsFilter(tags={SENSOR_NAME_TAG: COHORT_SENSOR}, statuses=runs.FINISHED_STATUSES), limit=1)
    if not refreshes or refreshes[0].create_timestamp.timestamp() < since:
        return False
    # the latest refresh was planned after every run that planned or recorded the features it reads
    refreshed = instance.event_log_storage.get_latest_planned_materialization_info(dg.AssetKey(FUSED_TABLE.key))
    feature_marks = runs.latest_event_ids(instance, PATIENT_FEATURE_ASSETS)
    if refreshed is None or max(feature_marks.values(), default=0) > refreshed.storage_id:
        return False
    # ... and no patient went on since then to the middle of its chain (its next batched run is due)
    chains = [[dg.AssetKey(asset.key) for asset in chain] for chain in MODALITY_CHAINS.values()]
    if patients_in_between(instance, chains, refreshed.storage_id):
        return False
    # ... nor to a follow-on whose run is due (its upstream may be older than the refresh)
    if patients_in_between(instance, [[dg.AssetKey(up.key), dg.AssetKey(down.key)] for up, down in FOLLOW_ONS]):
        return False
    if waiting_for_classifier(instance):
        return False
    return not unexplained(instance)


def waiting_for_classifier(instance: dg.DagsterInstance) -> bool:
    """Patients whose lymph_nodes waits for a tumour classifier (ln_features made, lymph_nodes neither
    made nor failed), while one may still come: none has been trained yet but some patient has annotations,
    or the newest attempt found too few annotations before these patients' features existed.
    tumour_classifier_sensor trains it after its debounce, with no run in flight: a moment when everything
    else looks settled."""
    from gcmlm_assets.landing.scan import LN_ANNOTATIONS_FOLDER
    from gcmlm_assets.partitions import patients_partitions
    from gcmlm_assets.settings import landing_root

    features = instance.get_materialized_partitions(dg.AssetKey(LN_FEATURES.key))
    if not features:
        return False
    statuses = instance.get_status_by_partition(dg.AssetKey(LYMPH_NODES.key), sorted(features), patients_partitions) or {}
    done = (dg.AssetPartitionStatus.MATERIALIZED, dg.AssetPartitionStatus.FAILED)
    if all(statuses.get(patient) in done for patient in features):
        return False
    classifier = dg.AssetKey(TUMOUR_CLASSIFIER.key)
    trained = instance.fetch_materializations(classifier, limit=1).records
    if trained:
        return True  # installed: lymph_nodes_after_classifier_sensor requests the waiting patients
    newest_features = instance.fetch_materializations(dg.AssetKey(LN_FEATURES.key), limit=1).records
    attempt = instance.event_log_storage.get_latest_planned_materialization_info(classifier)
    if attempt is None:  # never tried: it will be once a patient with annotations has features
        return any((landing_root() / patient / LN_ANNOTATIONS_FOLDER).is_dir() for patient in features)
    # tried before the newest features (their annotations may make it enough)
    return bool(newest_features) and attempt.storage_id < newest_features[0].storage_id


def unexplained(instance: dg.DagsterInstance) -> set[str]:
    """Scored patients whose latest explanation was not made for the key their latest score names
    (never explained, or explained for other inputs), unless their explanation's latest attempt
    since those scores failed (or was canceled): the explanations sensor has not asked for it yet,
    or its run has not ended. A patient whose key did not change counts as explained."""
    import pyarrow.parquet as pq

    from gcmlm_assets.cohort.explanation_sensors import KEY_COLUMN, recorded_explanation_keys

    records = instance.fetch_materializations(dg.AssetKey(RISK_SCORES.key), limit=1).records
    if not records or records[0].asset_materialization is None:
        return set()
    scores = records[0]
    path = scores.asset_materialization.metadata.get("path")
    if path is None:
        raise ScoresUnreadable(f"risk_scores' latest materialization (run {scores.run_id}) names no scores file "
                               "(no 'path' metadata): the explanations cannot be checked against it")
    try:
        keyed = KEY_COLUMN in pq.read_schema(str(path.value)).names  # scores written before keys have none
        table = pq.read_table(str(path.value), columns=["patient_id", *([KEY_COLUMN] if keyed else [])])
    except (OSError, ValueError) as error:
        raise ScoresUnreadable(f"{path.value}: risk_scores' latest file (run {scores.run_id}) cannot be read "
                               f"({type(error).__name__}: {error}); the explanations cannot be checked "
                               "against it") from error
    ids = table.column("patient_id").to_pylist()
    keys = table.column(KEY_COLUMN).to_pylist() if keyed else [None] * len(ids)
    recorded = recorded_explanation_keys(instance, EXPLANATIONS)
    behind = {patient_id for patient_id, key in zip(ids, keys) if key is None or recorded.get(patient_id) != key}
    if not behind:
        return set()
    # {patient: (run, event)} of the latest attempts since the scores that materialized nothing
    attempts = instance.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(
        dg.AssetKey(EXPLANATIONS), after_storage_id=scores.storage_id)
    run_ids = sorted({attempts[p][0] for p in behind if p in attempts})
    ended_badly = {run.run_id for run in instance.get_runs(filters=dg.RunsFilter(
        run_ids=run_ids, statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]))} if run_ids else set()
    return {p for p in behind if p not in attempts or attempts[p][0] not in ended_badly}


def failure_reasons(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """'step: message' for each failed step of a run (what the UI shows as the failure)."""
    reasons = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        data = entry.dagster_event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        error = getattr(data, "error", None)
        if user is not None and user.description:
            message = user.description
        elif error is not None and error.message:
            message = error.message.strip().splitlines()[0]
        else:
            message = "failed (see the run's logs)"
        reasons.append(f"{entry.step_key}: {message}")
    return reasons


def failed_runs(instance: dg.DagsterInstance, since: float = 0.0) -> list[tuple[str, str, list[str]]]:
    """(patient or '-', run id, failure reasons) of every failed run created after `since`; a
    batched run gives one entry per patient that failed in it, with that patient's reasons."""
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    found = []
    for record in records:
        if record.create_timestamp.timestamp() < since:
            continue
        run = record.dagster_run
        if runs.RANGE_START_TAG in run.tags:
            for patient_id, reasons in failed_patients(instance, run.run_id).items():
                found.append((patient_id, run.run_id, reasons))
        else:
            found.append((run.tags.get(runs.PARTITION_TAG, "-"), run.run_id, failure_reasons(instance, run.run_id)))
    return found


def failed_patients(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[str]]:
    """{patient: ['step: reason']} of a batched run, from its steps' failure metadata (batching.py)."""
    found: dict[str, list[str]] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        user = getattr(entry.dagster_event.event_specific_data, "user_failure_data", None)
        failed = user.metadata.get("failed_patients") if user is not None else None
        if failed is None:
            found.setdefault("-", []).append(f"{entry.step_key}: {user.description if user else 'failed'}")
            continue
        for patient_id, reason in failed.value.items():
            found.setdefault(patient_id, []).append(f"{entry.step_key}: {reason}")
    return found


def wait_until_settled(instance: dg.DagsterInstance, *, since: float, timeout_s: float, say=print,
                       poll_s: float = 3.0, alive=lambda: True, min_wait_s: float = 0.0) -> bool:
    """Print a progress line whenever it changes until the cohort settles; False on time-out.
    Raises ScoresUnreadable when the latest scores cannot be read (never "settled" then).

    `min_wait_s` gives the sensors time for their first ticks: without it, an instance that settled
    before (a second demo) would count as settled before the landing sensor looked at the drops.
    """
    started = time.monotonic()
    last_line = ""
    while time.monotonic() - started < timeout_s:
        if not alive():
            raise RuntimeError("the Dagster daemon stopped while the demo was waiting for it")
        line = progress(instance).line()
        if line != last_line:
            elapsed = time.monotonic() - started
            say(f"  {int(elapsed // 60):02d}:{int(elapsed % 60):02d}  {line}")
            last_line = line
        if time.monotonic() - started >= min_wait_s and settled(instance, since):
            return True
        time.sleep(poll_s)
    return False
