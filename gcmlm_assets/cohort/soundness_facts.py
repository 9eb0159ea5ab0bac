"""Which per-patient results fused_table may use: what the Dagster instance says about each one.

A per-scan asset (radiomics_row, partitioned by `ct_scans`) is decided per scan: each of a
patient's CT scans is sound or not on its own (fusion/scan_choice.py decide what an unsound
scan leaves out of the patient's blocks).

Facts are read in a few bulk queries per asset (never one per partition, never the whole check
history) and decided in the plain `tables/soundness.py`: the partition's latest materialization, a later
attempt that failed or is still running, and each blocking check's outcome on that latest
materialization (one query per check, plus one per failed outcome; see `check_outcomes`).
"""

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from gcmlm_assets.cohort.tables import fusion, soundness
from gcmlm_assets.dagster_internals import DATA_VERSION_TAG, PartitionKeyFilter
from gcmlm_assets.dagster_internals import AssetCheckExecutionRecordStatus as CheckStatus
from gcmlm_assets.scans import scan_key_problem
from gcmlm_assets.storage import ArtifactStore, sha256_file

RUN_BATCH = 100  # run ids per get_runs query
CHECK_HISTORY_PAGE = 1000  # check executions per history query (evaluations stored with partition None)
EVALUATED = {CheckStatus.SUCCEEDED, CheckStatus.FAILED}
EVENT_ID_BATCH = 500  # storage ids per event query (SQLite allows 999 parameters at least)


def unsound_results(instance: dg.DagsterInstance, patients: list[str], blocking_checks: dict[str, list[str]],
                    store: ArtifactStore, scans: list[str] | None = None) -> dict[str, dict[str, str]]:
    """{modality: {partition: reason}} for each per-patient result fused_table must leave out: keyed by
    patient, by scan key for a per-scan asset's (`scans`: the ct_scans partitions; None: `patients`,
    whose single scans have the patient's id as their key).
    `blocking_checks`: {asset: its blocking check names} (the `patient_result_checks` resource)."""
    unsound = {}
    for source in fusion.SOURCES:
        partitions = scans if source.file.asset.per_scan and scans is not None else patients
        key = dg.AssetKey(source.asset)
        check_keys = [dg.AssetCheckKey(key, name) for name in blocking_checks.get(source.asset, [])]
        folder, filename = store.root / source.asset, source.filename
        facts = partition_facts(instance, key, check_keys, lambda p, d=folder, f=filename: d / p / f)
        unsound[source.modality] = soundness.unsound_partitions(source.asset, facts, partitions)
    return unsound


def partition_facts(instance: dg.DagsterInstance, key: dg.AssetKey, check_keys: list[dg.AssetCheckKey],
                    file_of: Callable[[str], Path]) -> dict[str, soundness.PartitionFacts]:
    """Per partition of `key`: materialized?, a later attempt that failed or is running (and then
    whether the file is still the latest materialization's), each blocking check's outcome on
    the latest materialization."""
    events = instance.event_log_storage
    latest = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)
    # partition -> (run id, planned event id) of planned materializations newer than the latest one
    attempts = events.get_latest_asset_partition_materialization_attempts_without_materializations(key)
    states = _unfinished_or_failed_runs(instance, {run_id for run_id, _ in attempts.values()})
    running = [p for p, (run, _) in attempts.items() if states.get(run) == soundness.IN_PROGRESS and p in latest]
    unchanged = _files_still_latest(events, key, running, file_of)
    outcomes = {k.name: check_outcomes(events, k, latest) for k in check_keys}
    facts = {}
    for partition in set(latest) | set(attempts):
        run_id = attempts[partition][0] if partition in attempts else None
        state = states.get(run_id)
        facts[partition] = soundness.PartitionFacts(
            materialized=partition in latest,
            later_attempt=(state, run_id) if state else None,
            checks={name: by_partition.get(partition) for name, by_partition in outcomes.items()},
            file_is_latest=partition in unchanged)
    return facts


def _files_still_latest(events, key: dg.AssetKey, partitions: list[str],
                        file_of: Callable[[str], Path]) -> set[str]:
    """The partitions whose file is still the one their latest materialization recorded (the
    per-patient assets' data version is their file's sha256): a run now re-making it has not
    replaced it yet."""
    if not partitions:
        return set()
    tags = events.get_latest_tags_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG],
                                               asset_partitions=partitions)
    still = set()
    for partition in partitions:
        path = None if scan_key_problem(partition) else file_of(partition)  # a patient id is a scan key too
        recorded = tags.get(partition, {}).get(DATA_VERSION_TAG)
        if path is not None and path.is_file() and recorded == sha256_file(path):
            still.add(partition)
    return still


def _unfinished_or_failed_runs(instance: dg.DagsterInstance, run_ids: set[str]) -> dict[str, str]:
    """{run id: soundness state} of the runs that failed, were canceled or have not finished. A
    successful run (a skipped step) or a deleted one leaves the latest materialization standing."""
    states = {}
    ordered = sorted(run_ids)
    for start in range(0, len(ordered), RUN_BATCH):
        for run in instance.get_runs(filters=dg.RunsFilter(run_ids=ordered[start:start + RUN_BATCH])):
            if run.status == dg.DagsterRunStatus.FAILURE:
                states[run.run_id] = soundness.FAILED
            elif run.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.CANCELING):
                states[run.run_id] = soundness.CANCELED
            elif not run.is_finished:
                states[run.run_id] = soundness.IN_PROGRESS
    return states


def check_outcomes(events, check_key: dg.AssetCheckKey, latest: dict[str, int]) -> dict[str, soundness.CheckOutcome]:
    """{partition: the check's newest outcome on the partition's latest materialization}.

    Our assets store each evaluation under its patient's partition, naming the materialization it
    checked (batching.py). So one query per check (`get_asset_check_partition_info`) gives each
    partition's newest evaluation: passed or failed, and on which materialization. Only what that
    cannot say is read beyond it, each in a query whose size does not depend on the history:
    - a failed one's severity (WARN does not block) and description: its evaluation event, by the
      storage id the row names (one query for all of them);
    - a partition whose newest row is only planned (a check spec with a partitions_def plans per
      partition): its newest evaluated row;
    - evaluations stored before they were stored per partition (partition None, one history for
      all patients): read newest first, in pages, only for partitions without a per-partition
      evaluation naming a materialization, until each is found. That history stopped growing with
      the change; a patient run since then no longer needs it.
    """
    outcomes: dict[str, soundness.CheckOutcome] = {}
    failed: dict[str, int] = {}  # partition -> storage id of its newest (failed) evaluation
    planned: list[str] = []
    stored_per_partition: set[str] = set()  # by batching.py: the evaluation names its materialization
    for info in events.get_asset_check_partition_info([check_key]):
        partition = info.partition_key
        if partition is None or partition not in latest:
            continue
        if info.latest_execution_status == CheckStatus.PLANNED:
            stored_per_partition.add(partition)
            planned.append(partition)
        elif info.latest_target_materialization_storage_id is not None:
            stored_per_partition.add(partition)
        if info.latest_target_materialization_storage_id == latest[partition]:
            if info.latest_execution_status == CheckStatus.SUCCEEDED:
                outcomes[partition] = soundness.CheckOutcome(passed=True)
            else:
                failed[partition] = info.latest_check_event_storage_id
    evaluations = _evaluations_by_id(events, sorted(failed.values()))
    for partition, storage_id in failed.items():
        evaluation = evaluations.get(storage_id)
        outcome = _outcome(evaluation) if evaluation else _newest_outcome(events, check_key, partition,
                                                                           latest[partition])
        if outcome is not None:
            outcomes[partition] = outcome
    for partition in planned:
        outcome = _newest_outcome(events, check_key, partition, latest[partition])
        if outcome is not None:
            outcomes[partition] = outcome
    unpartitioned = {latest[p]: p for p in latest if p not in stored_per_partition}
    outcomes.update(_unpartitioned_outcomes(events, check_key, unpartitioned))
    return outcomes


def _outcome(evaluation) -> soundness.CheckOutcome:
    return soundness.CheckOutcome(evaluation.passed, evaluation.severity.value, evaluation.description or "")


def _evaluations_by_id(events, storage_ids: list[int]) -> dict[int, dg.AssetCheckEvaluation]:
    """{storage id: the check evaluation event stored under it}, in one query per EVENT_ID_BATCH.

    By primary key. The run-sharded SQLite storage answers its public `get_event_records` for
    anything but asset events by opening every run's shard; its `_get_event_records` reads the
    index shard, where check evaluations are mirrored under the very ids the check rows name (it is
    the only implementation on the other SQL storages)."""
    read = getattr(events, "_get_event_records", events.get_event_records)
    found = {}
    for start in range(0, len(storage_ids), EVENT_ID_BATCH):
        ids = storage_ids[start:start + EVENT_ID_BATCH]
        for record in read(dg.EventRecordsFilter(dg.DagsterEventType.ASSET_CHECK_EVALUATION, storage_ids=ids),
                           limit=len(ids)):
            found[record.storage_id] = record.event_log_entry.dagster_event.event_specific_data
    return found


def _newest_outcome(events, check_key: dg.AssetCheckKey, partition: str,
                    materialization: int) -> soundness.CheckOutcome | None:
    """The partition's newest evaluated row, if it checked `materialization`."""
    records = events.get_asset_check_execution_history(
        check_key, limit=1, status=EVALUATED, partition_filter=PartitionKeyFilter(key=partition))
    evaluation = records[0].evaluation if records else None
    target = evaluation.target_materialization_data if evaluation else None
    return _outcome(evaluation) if target and target.storage_id == materialization else None


def _unpartitioned_outcomes(events, check_key: dg.AssetCheckKey,
                            waiting: dict[int, str]) -> dict[str, soundness.CheckOutcome]:
    """{partition: outcome} from evaluations stored with partition None (before batching.py stored
    them per partition), for the partitions whose latest materialization's storage id is in
    `waiting`: newest first, in pages, until each is found or that history ends."""
    outcomes = {}
    cursor = None
    while waiting:
        records = events.get_asset_check_execution_history(
            check_key, limit=CHECK_HISTORY_PAGE, cursor=cursor, status=EVALUATED,
            partition_filter=PartitionKeyFilter(key=None))
        for record in records:
            evaluation = record.evaluation
            target = evaluation.target_materialization_data if evaluation else None
            partition = waiting.pop(target.storage_id, None) if target else None
            if partition is not None:
                outcomes[partition] = _outcome(evaluation)
        if len(records) < CHECK_HISTORY_PAGE:
            break
        cursor = records[-1].id
    return outcomes
