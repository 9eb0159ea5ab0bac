"""patient_steps sensors: a patient's chain of assets carried on in batched runs, one asset per run.

A run over a range of patients cannot chain two assets in Dagster: a step lets the next one start
only by yielding its output, and an output yielded for a range is recorded as a materialization of
every patient of the range, the failed ones too (batching.py). So a batched run materializes one
asset of a chain (ct_image -> ct_mask -> radiomics_row, patch_coords -> uni_features ->
slide_vector), and this sensor requests the next asset for the patients it materialized, in
bucket batches (patient_batches.py): one model load per batch for the GPU assets, each patient's
result, checks and failure its own. A one-patient run carries its whole chain itself.

Which patients go on: those with a new materialization of the upstream asset (read by storage id
after the cursor, so a tick costs the same at any history), unless its blocking checks failed (the
output was quarantined, as a one-patient run stops there) or the run that made it also planned
the next asset for that patient. While a run of a patient's bucket is queued or running, the
patient waits in the cursor, so a batch is requested once its upstream run has finished.

A chain's partitions are those of its assets (`partitions.partitions_of`): the radiology chain's
are CT scans (`ct_scans`), batched in that set's order and buckets; "patients" above means either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import dagster as dg

from gcmlm_assets import catalogue, runs
from gcmlm_assets.batching import batch_patients
from gcmlm_assets.partitions import ct_scans_partitions, ensure_ct_scans, partitions_of
from gcmlm_assets.patient_batches import BUCKET_TAG, bucket_name, plan_batches
from gcmlm_assets.policies import QUARANTINED_TO

# New upstream materializations read per edge and tick; more wait for the next tick.
RECORDS_PER_TICK = 1000


def _read_cursor(cursor: str | None) -> dict:
    return json.loads(cursor) if cursor else {}


def chain_partitions(chain: Sequence[dg.AssetKey]) -> dg.DynamicPartitionsDefinition:
    """The partition set every asset of the chain is partitioned by (from the catalogue)."""
    found = {}
    for key in chain:
        asset = catalogue.ASSETS.get(key.to_user_string())
        partitions = partitions_of(asset) if asset is not None else None
        if partitions is None:
            raise ValueError(f"{key.to_user_string()} is not a partitioned asset of the catalogue")
        found[partitions.name] = partitions
    if len(found) != 1:
        raise ValueError(f"the chain {[k.to_user_string() for k in chain]} mixes partition sets {sorted(found)}")
    return next(iter(found.values()))


def build_patient_steps_sensor(name: str, chain: Sequence[dg.AssetKey], work: str, interval_s: int,
                               partitions_def: dg.DynamicPartitionsDefinition | None = None) -> dg.SensorDefinition:
    """The steps sensor of `chain`, whose partitions are `partitions_def` (default: the chain's own,
    `chain_partitions`)."""
    edges = list(zip(chain[:-1], chain[1:]))
    partition_set = (partitions_def or chain_partitions(chain)).name

    @dg.sensor(
        name=name,
        minimum_interval_seconds=interval_s,
        asset_selection=list(chain[1:]),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Carries patients on through {' -> '.join(k.to_user_string() for k in chain)}: after a "
                    "batched run materializes one asset of the chain, requests the next one for its patients, "
                    "GCMLM_GPU_BATCH_PATIENTS per run (one run per bucket of patients), once no run of their "
                    "bucket is queued or running. Patients whose blocking checks failed stop there.",
    )
    def patient_steps_sensor(context: dg.SensorEvaluationContext):
        instance = context.instance
        state = _read_cursor(context.cursor)
        order = (ensure_ct_scans(instance) if partition_set == ct_scans_partitions.name
                 else list(instance.get_dynamic_partitions(partition_set)))
        size = batch_patients()
        requests, notes, new_state = [], [], {}
        for upstream, downstream in edges:
            edge = f"{upstream.to_user_string()}>{downstream.to_user_string()}"
            after, waiting = _edge_state(instance, state, edge, upstream)
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=upstream, after_storage_id=after),
                limit=RECORDS_PER_TICK, ascending=True).records
            for record in records:  # the latest of each patient wins
                waiting[record.partition_key] = record.storage_id
                after = record.storage_id
            ready, held = _ready_patients(instance, upstream, downstream, waiting, records, order, size,
                                          partition_set)
            new_state[edge] = {"after": after, "waiting": held}
            if not ready:
                continue
            rest = list(chain[chain.index(downstream):])
            for batch in plan_batches(order, ready, size, partition_set=partition_set):
                last_event = max(waiting[p] for p in batch.patients)
                bucket = bucket_name(batch.bucket, size, partition_set)
                requests.append(runs.batch_run_request(
                    batch, size, run_key=f"{edge}:{last_event}:{bucket}",
                    # one patient carries the rest of its chain itself; a range run one asset
                    asset_selection=rest if batch.single else rest[:1],
                    tags={"gcmlm/reason": f"after {upstream.to_user_string()}", **runs.work_tags(work)}))
            notes.append(f"{downstream.to_user_string()} for {len(ready)} patient(s)")
        cursor = json.dumps(new_state, sort_keys=True)
        if not requests:
            held = sum(len(s["waiting"]) for s in new_state.values())
            why = (f"{held} patient(s) wait until no run of their bucket is queued or running" if held
                   else "nothing to carry on")
            return dg.SensorResult(skip_reason=why, cursor=cursor)
        context.log.info("requested " + "; ".join(notes))
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return patient_steps_sensor


def _edge_state(instance: dg.DagsterInstance, state: dict, edge: str, upstream: dg.AssetKey) -> tuple[int, dict]:
    """(storage id read up to, patients waiting with their upstream event) for one edge. A sensor
    without a cursor starts at the present: the history before it was carried on by the runs of its time."""
    if edge in state:
        return int(state[edge]["after"]), dict(state[edge]["waiting"])
    latest = instance.fetch_materializations(upstream, limit=1).records
    return (latest[0].storage_id if latest else 0), {}


def _ready_patients(instance: dg.DagsterInstance, upstream: dg.AssetKey, downstream: dg.AssetKey,
                    waiting: dict[str, int], records: list, order: list[str], size: int,
                    partition_set: str) -> tuple[list[str], dict]:
    """Which waiting patients go on now, and the ones that still wait. Patients that stop (a failed
    blocking check, or the next asset done by the same run) leave the list."""
    fresh = {record.partition_key: record for record in records}
    storage = instance.event_log_storage
    for patient_id, record in fresh.items():
        if waiting.get(patient_id) != record.storage_id:
            continue  # a later record of the same patient came in this tick
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        planned = storage.get_latest_planned_materialization_info(downstream, patient_id)
        if QUARANTINED_TO in metadata or (planned is not None and planned.run_id == record.run_id):
            del waiting[patient_id]
    known = set(order)
    for patient_id in [p for p in waiting if p not in known]:  # a partition deleted meanwhile
        del waiting[patient_id]
    if not waiting:
        return [], {}
    position = {patient_id: i for i, patient_id in enumerate(order)}
    buckets = {bucket_name(position[p] // size, size, partition_set) for p in waiting}
    busy = set()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=runs.IN_FLIGHT_STATUSES,
                                                       tags={BUCKET_TAG: sorted(buckets)})):
        busy.add(run.tags[BUCKET_TAG])
    ready = [p for p in waiting if bucket_name(position[p] // size, size, partition_set) not in busy]
    held = {p: event for p, event in waiting.items() if p not in set(ready)}
    return ready, held


def patients_in_between(instance: dg.DagsterInstance, chains: Sequence[Sequence[dg.AssetKey]],
                        after_storage_id: int = 0) -> set[str]:
    """Patients between two assets of a chain: a materialization of one asset (after
    `after_storage_id`, e.g. the last cohort refresh) newer than any run planned of the next (other
    than its own run), its checks passed. The steps sensor has yet to request (or the daemon to queue) their next run;
    until then, nothing cohort-wide should count their work as done. Two indexed queries per asset
    pair, whatever the history."""
    storage = instance.event_log_storage
    between: set[str] = set()
    for chain in chains:
        for upstream, downstream in zip(chain[:-1], chain[1:]):
            made = storage.get_latest_storage_id_by_partition(upstream, dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                              after_cursor=after_storage_id or None)
            planned = storage.get_latest_storage_id_by_partition(
                downstream, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
            ahead = [p for p, storage_id in made.items() if storage_id > planned.get(p, 0)]
            if not ahead:
                continue
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=upstream, storage_ids=[made[p] for p in ahead]),
                limit=len(ahead)).records
            for record in records:
                if QUARANTINED_TO in (record.asset_materialization.metadata or {}):
                    continue
                # a run plans all its assets before it materializes any: the next one may be its own
                planned = storage.get_latest_planned_materialization_info(downstream, record.partition_key)
                if planned is None or planned.run_id != record.run_id:
                    between.add(record.partition_key)
    return between
