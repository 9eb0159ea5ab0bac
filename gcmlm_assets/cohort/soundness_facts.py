"""Which per-patient results fused_table may use: what the Dagster instance says about each one.

Facts are read in a few bulk queries per asset (never one per partition) and decided in the
plain `soundness.py`: the partition's latest materialization, a later attempt that failed or is
still running, and each blocking check's outcome on that latest materialization.
"""

from collections.abc import Callable
from pathlib import Path

import dagster as dg
# not exported by dagster: the data version tag, the status filter of the check-execution history
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as CheckStatus

from gcmlm_assets.cohort import soundness
from gcmlm_assets.lazy import lazy
from gcmlm_assets.patients import patient_id_problem
from gcmlm_assets.storage import ArtifactStore, sha256_file

fusion = lazy("gcmlm_assets.cohort.fusion")  # pyarrow only when a fused table is built

RUN_BATCH = 100  # run ids per get_runs query
CHECK_HISTORY_PAGE = 1000  # check executions per history query


def declared_blocking_checks() -> dict[str, list[str]]:
    """{asset: blocking check names} of the per-patient assets fused_table reads, from their
    check_specs. (A run's own definitions cannot tell: an in-process run has no repository and its
    job's asset graph holds only the selected assets.)"""
    from gcmlm_assets.pathology.checks import SLIDE_VECTOR_CHECK_SPECS
    from gcmlm_assets.radiology.checks import RADIOMICS_ROW_CHECK_SPECS  # loads PyRadiomics: only here

    declared: dict[str, list[str]] = {source.asset: [] for source in fusion.SOURCES}
    for spec in (*RADIOMICS_ROW_CHECK_SPECS, *SLIDE_VECTOR_CHECK_SPECS):
        if spec.blocking and spec.asset_key.to_user_string() in declared:
            declared[spec.asset_key.to_user_string()].append(spec.name)
    return declared


def unsound_results(instance: dg.DagsterInstance, patients: list[str], blocking_checks: dict[str, list[str]],
                    store: ArtifactStore) -> dict[str, dict[str, str]]:
    """{modality: {patient: reason}} for each per-patient result fused_table must leave out."""
    unsound = {}
    for source in fusion.SOURCES:
        key = dg.AssetKey(source.asset)
        check_keys = [dg.AssetCheckKey(key, name) for name in blocking_checks.get(source.asset, [])]
        folder, filename = store.root / source.asset, source.filename
        facts = partition_facts(instance, key, check_keys, lambda p, d=folder, f=filename: d / p / f)
        unsound[source.modality] = soundness.unsound_partitions(source.asset, facts, patients)
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
    outcomes = {k.name: _check_outcomes(events, k, latest) for k in check_keys}
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
        path = None if patient_id_problem(partition) else file_of(partition)
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


def _check_outcomes(events, check_key: dg.AssetCheckKey,
                    latest: dict[str, int]) -> dict[str, soundness.CheckOutcome]:
    """{partition: the check's newest outcome on the partition's latest materialization}.

    Checks declared with a partitions_def are answered per partition by one query
    (`get_asset_check_partition_info`). Checks without one (check_specs of our partitioned assets)
    are stored with partition None, one row for all partitions; each evaluation still names the
    materialization it checked, so the history is read newest first, in pages, until every
    latest materialization is found (failed ones always come from there, with their description).
    """
    outcomes = _passed_per_partition(events, check_key, latest)
    waiting = {storage_id: partition for partition, storage_id in latest.items() if partition not in outcomes}
    cursor = None
    while waiting:
        records = events.get_asset_check_execution_history(
            check_key, limit=CHECK_HISTORY_PAGE, cursor=cursor, status={CheckStatus.SUCCEEDED, CheckStatus.FAILED})
        for record in records:
            evaluation = record.evaluation
            target = evaluation.target_materialization_data if evaluation else None
            partition = waiting.pop(target.storage_id, None) if target else None
            if partition is not None:
                outcomes[partition] = soundness.CheckOutcome(evaluation.passed, evaluation.severity.value,
                                                             evaluation.description or "")
        if len(records) < CHECK_HISTORY_PAGE:
            break
        cursor = records[-1].id
    return outcomes


def _passed_per_partition(events, check_key: dg.AssetCheckKey,
                          latest: dict[str, int]) -> dict[str, soundness.CheckOutcome]:
    passed = {}
    for info in events.get_asset_check_partition_info([check_key]):
        partition = info.partition_key
        if (partition in latest and info.latest_execution_status == CheckStatus.SUCCEEDED
                and info.latest_target_materialization_storage_id == latest[partition]):
            passed[partition] = soundness.CheckOutcome(passed=True)
    return passed
