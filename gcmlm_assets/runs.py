"""What the automation sensors ask the Dagster instance about runs and events (thin wiring, no decisions).

Every question is a count or an indexed "latest" lookup: a sensor tick must cost the same with ten
thousand runs queued or in the history as with ten.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg

from gcmlm_assets import catalogue
# Dagster's tags for a run's partition, or its range of partitions (as Dagster's backfills write them).
from gcmlm_assets.dagster_internals import ASSET_PARTITION_RANGE_END_TAG as RANGE_END_TAG
from gcmlm_assets.dagster_internals import ASSET_PARTITION_RANGE_START_TAG as RANGE_START_TAG
from gcmlm_assets.dagster_internals import PARTITION_NAME_TAG as PARTITION_TAG
from gcmlm_assets.dagster_internals import RUN_KEY_TAG
from gcmlm_assets.patient_batches import (
    BUCKET_TAG, PATIENTS, PATIENTS_TAG, PatientBatch, bucket_name, parse_patients_tag)

IN_FLIGHT_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED_STATUSES = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
RUN_END_EVENTS = (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED)
# What a run requested by one of our sensors does, so that the others can count such runs without
# loading them. A run launched by hand (the UI, a backfill) has no such tag and may touch anything.
WORK_TAG = "gcmlm/work"
RADIOLOGY, PATHOLOGY, TRAINING, COHORT, EXPLANATIONS = "radiology", "pathology", "training", "cohort", "explanations"
# The lymph-node chain (the landing and steps sensors tag a modality's runs with its name) and the
# tumour classifier's training: a kind of its own, not pathology's nor training's, so that the
# classifier waits only on lymph-node work and segmentation training (radiology and training work)
# never waits on it; listed here, it is not counted as an untagged run that may be anything.
LYMPH_NODE = catalogue.LYMPH_NODE
WORK_KINDS = (RADIOLOGY, PATHOLOGY, LYMPH_NODE, TRAINING, COHORT, EXPLANATIONS)
# One segmentation training at a time: the instance's tag concurrency limit on this tag.
TRAINING_TAG = "gcmlm/training"
# Partitions queried per in-flight lookup (an IN (...) list).
PARTITIONS_PER_QUERY = 500


def work_tags(work: str) -> dict[str, str]:
    assert work in WORK_KINDS, work
    return {WORK_TAG: work}


def in_flight_count(instance: dg.DagsterInstance, tags: dict | None = None) -> int:
    """How many runs are queued, starting or running (with `tags`, when given): one COUNT query."""
    return instance.get_runs_count(filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES, tags=tags or {}))


def in_flight_doing(instance: dg.DagsterInstance, work: Iterable[str]) -> int:
    """Runs in flight whose work is one of `work`, counting every untagged run too (it may be any)."""
    total = in_flight_count(instance)
    if not total:
        return 0
    tagged = in_flight_count(instance, {WORK_TAG: list(WORK_KINDS)})
    wanted = in_flight_count(instance, {WORK_TAG: list(work)})
    return wanted + (total - tagged)


def in_flight_partitions(instance: dg.DagsterInstance, candidates: Iterable[str], assets: Iterable[str],
                         order: Sequence[str] = (), batch_size: int | None = None, *,
                         partition_set: str = PATIENTS) -> set[str]:
    """Which of `candidates` a queued or running run that materializes any of `assets` covers.

    Single-partition runs are found by their partition tag; with the partitions' `order` (that of
    the partition set `partition_set`, which `assets` are partitioned by), the range runs our
    sensors requested are found too, by the bucket tag of each candidate's bucket (every run of a
    bucket holds only that bucket's patients). Only those runs are loaded, in chunks."""
    wanted, ordered = set(assets), sorted(set(candidates))
    covered: set[str] = set()
    for start in range(0, len(ordered), PARTITIONS_PER_QUERY):
        chunk = ordered[start:start + PARTITIONS_PER_QUERY]
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES, tags={PARTITION_TAG: chunk})):
            if _selects(run, wanted):
                covered.add(run.tags[PARTITION_TAG])
    if order and ordered:
        from gcmlm_assets.batching import batch_patients

        size = batch_size or batch_patients()
        position = {patient_id: i for i, patient_id in enumerate(order)}
        buckets = sorted({bucket_name(position[p] // size, size, partition_set)
                          for p in ordered if p in position})
        for start in range(0, len(buckets), PARTITIONS_PER_QUERY):
            chunk = buckets[start:start + PARTITIONS_PER_QUERY]
            for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES, tags={BUCKET_TAG: chunk})):
                if _selects(run, wanted) and RANGE_START_TAG in run.tags:
                    covered |= set(ordered) & range_run_patients(run.tags, order, position)
    return covered


def _selects(run: dg.DagsterRun, assets: set[str]) -> bool:
    return bool({key.to_user_string() for key in (run.asset_selection or ())} & assets)


def range_run_patients(tags: dict[str, str], order: Sequence[str], position: dict[str, int]) -> set[str]:
    """The patients a range run works on: its range in the partition `order` (`position`: each
    patient's index in it), narrowed to the ones it names."""
    first, last = position.get(tags[RANGE_START_TAG]), position.get(tags[RANGE_END_TAG])
    if first is None or last is None:
        return set()
    in_range = set(order[first:last + 1])
    named = parse_patients_tag(tags.get(PATIENTS_TAG))
    return in_range if named is None else in_range & named


def batch_run_request(batch: PatientBatch, batch_size: int, *, run_key: str, asset_selection: list[dg.AssetKey],
                      tags: dict[str, str]) -> dg.RunRequest:
    """One run for a bucket's batch: an ordinary one-patient run, or a run over the range from its
    first patient to its last that names its patients when others lie between. Either carries the
    bucket's tag (named for the batch's partition set), which the instance runs one at a time."""
    tags = {**tags, **batch.bucket_tag(batch_size)}
    if batch.single:
        return dg.RunRequest(run_key=run_key, partition_key=batch.first, asset_selection=asset_selection, tags=tags)
    tags.update({RANGE_START_TAG: batch.first, RANGE_END_TAG: batch.last})
    if not batch.whole_range:
        tags[PATIENTS_TAG] = ",".join(batch.patients)
    return dg.RunRequest(run_key=run_key, asset_selection=asset_selection, tags=tags)


def run_key_exists(instance: dg.DagsterInstance, run_key: str) -> bool:
    return bool(instance.get_run_ids(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1))


def latest_run_end(instance: dg.DagsterInstance) -> float | None:
    """When the most recent run ended (succeeded, failed or was canceled): one indexed lookup per
    kind of end, whatever the length of the history; None when no run has ended."""
    ends = []
    for event_type in RUN_END_EVENTS:
        records = instance.fetch_run_status_changes(event_type, limit=1).records
        if records:
            ends.append(records[0].timestamp)
    return max(ends) if ends else None


def latest_event_ids(instance: dg.DagsterInstance, assets: Iterable[str],
                     check_keys: Iterable[dg.AssetCheckKey] = ()) -> dict[str, int]:
    """The newest storage id of each asset's planned and recorded materializations and the newest
    execution id of each check: they change whenever a run is planned for, materializes, or
    checks any partition of these assets, and only then."""
    storage = instance.event_log_storage
    marks: dict[str, int] = {}
    for name in sorted(set(assets)):
        key = dg.AssetKey(name)
        planned = storage.get_latest_planned_materialization_info(key)
        materialized = instance.fetch_materializations(key, limit=1).records
        marks[f"{name}:planned"] = planned.storage_id if planned else 0
        marks[f"{name}:materialized"] = materialized[0].storage_id if materialized else 0
    check_keys = sorted(set(check_keys), key=lambda k: k.to_user_string())
    if check_keys:
        latest = storage.get_latest_asset_check_execution_by_key(check_keys)
        for check_key in check_keys:
            record = latest.get(check_key)
            marks[f"{check_key.to_user_string()}:checked"] = record.id if record else 0
    return marks
