"""landing_sensor: new or changed patient drops become partitions and runs.

The drops of one tick are grouped per modality into batches of `GCMLM_GPU_BATCH_PATIENTS`
(patient_batches.py). A batch of one patient is one run of its modality's whole chain; a larger
batch is one run of the chain's first asset over the batch's range, and `patient_steps_sensor`s
carry its patients on through the chain in batched runs (one model load per batch).

Radiology runs once per CT scan: its runs are batched over the `ct_scans` partitions (one key per
scan, gcmlm_assets/scans.py), the other modalities' over `patients`. A walked drop's new scans are
added to `ct_scans`, and its scans that are gone from the drop are deleted from it. A cursor written
before `ct_scans` existed migrates once (`partitions.migrate_ct_scans`, which the other readers of
an empty `ct_scans` run too): every partition `ct_image` has materialized becomes a scan, so
single-scan patients keep their radiology partitions.

Which of a recommitted drop's units run (scan.py: only those whose content changed, or all when READY
was touched alone) is decided against the content fingerprint each unit was last requested with. That
memory lives in Dagster's own key-value store (`kvs`, in the instance's run storage: SQLite or
PostgreSQL), one row per patient and unit, so it outlives the cursor's short memory of recent drops:
one query per tick reads the walked drops' units, one or two writes store the units requested.

The landing zone knows no domain: definitions.py passes each modality's chain of assets and what
holds a modality back (`build_landing_sensor`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.batching import batch_patients
from gcmlm_assets.patient_batches import plan_batches
from gcmlm_assets.storage import sha256_text
from gcmlm_assets.landing.scan import PER_SCAN_MODALITIES, plan_tick, scan_landing_zone, scans_migrated, walk_tick
from gcmlm_assets.partitions import ct_scans_partitions, migrate_ct_scans, patients_partitions
from gcmlm_assets.resources import LandingZone
from gcmlm_assets.scans import SEPARATOR

# Patient ids named in a tick's log line; more are counted.
NAMED_IN_LOG = 5
# Prefix of the landing memory's keys in Dagster's key-value store: `gcmlm/landing/<patient>|<unit>`.
MEMORY_PREFIX = "gcmlm/landing/"


@dataclass(frozen=True)
class ModalityHold:
    """A modality whose runs would all fail for a reason of the platform's, not the drops': while
    `reason(resource)` names one, its runs wait (unremembered, so a later tick requests them)."""

    modality: str
    resource_key: str  # the resource `reason` reads (e.g. the encoder's settings)
    reason: Callable[[Any], str | None]


def build_landing_sensor(modality_assets: Mapping[str, Sequence[dg.AssetKey]],
                         holds: Sequence[ModalityHold] = ()) -> dg.SensorDefinition:
    """`modality_assets`: what a change of each modality re-materializes for that patient, in order."""
    chains = {modality: list(keys) for modality, keys in modality_assets.items()}

    @dg.sensor(
        name="landing_sensor",
        minimum_interval_seconds=30,
        asset_selection=[key for keys in chains.values() for key in keys],
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"landing", *(hold.resource_key for hold in holds)},
        description="Scans the landing zone (names, sizes, times only) and requests runs "
        "for new or changed patient drops that carry a READY marker. Pathology and lymph-node runs are held "
        "while the encoder has no weights (the tick says why); a tick that requests nothing is skipped.",
    )
    def landing_sensor(context: dg.SensorEvaluationContext, **_resources) -> dg.SensorResult:
        # The resources are read from the context (which ones depends on `holds`); a direct call
        # (tests) also passes them by name, hence the catch-all.
        landing: LandingZone = context.resources.landing
        # Held modalities' runs would all fail: they wait and the tick says why, until the setting is fixed.
        held_because = {hold.modality: reason for hold in holds
                        if (reason := hold.reason(getattr(context.resources, hold.resource_key)))}
        # Lists READY and the folder of each patient; plan_tick walks only the drops whose READY
        # (or folder) is at or above the cursor's watermark.
        scan = scan_landing_zone(landing.path())
        held = frozenset(held_because)
        walk = walk_tick(scan, context.cursor, landing.max_runs_per_tick, held)
        memory = recall_units(context.instance, walk.memory_keys)
        plan = plan_tick(scan, context.cursor, landing.max_runs_per_tick, held=held, memory=memory)
        for folder, reason in scan.invalid:
            context.log.warning(f"landing zone: folder {folder!r} ignored: {reason}")
        for patient_id, modality, reason in plan.refused:
            context.log.warning(f"landing zone: {patient_id} {modality} not requested: {reason}")
        for folder, error in scan.unreadable:
            context.log.warning(f"landing zone: folder {folder!r} could not be scanned this tick ({error})")
        for patient_id, folder, reason in plan.scan_problems:
            context.log.warning(f"landing zone: {patient_id} {folder}/ refused: {reason}")

        order = list(context.instance.get_dynamic_partitions(patients_partitions.name))
        known = set(order)
        new_patients = [d.patient_id for d in scan.drops if d.patient_id not in known]
        scan_changes = _scan_partition_changes(context, plan.drop_scans, [d.patient_id for d in scan.drops])
        if scan_changes.migrated:
            context.log.info(f"ct_scans: {len(scan_changes.migrated)} scan(s) that ct_image has materialized added "
                             f"once, as the scans of their patients{_names(scan_changes.migrated)}")
        if scan_changes.removed:
            context.log.warning(f"ct_scans: {len(scan_changes.removed)} scan(s) no longer in their drops removed"
                                f"{_names(scan_changes.removed)}")
        run_requests = batched_run_requests(plan.runs, order + new_patients, batch_patients(), chains,
                                            scan_order=scan_changes.order)
        if plan.deferred:
            context.log.info(f"{plan.deferred} changed drops wait for the next tick "
                             f"(cap {landing.max_runs_per_tick} runs per tick)")
        held_by_modality = {m: [p.patient_id for p in plan.held if p.modality == m] for m in held_because}
        for modality, patient_ids in held_by_modality.items():
            if patient_ids:
                context.log.warning(f"{modality} held for {_named(patient_ids)}: {held_because[modality]} "
                                    "Their runs start on the first tick after that is fixed.")
        by_modality = {m: [r.partition for r in plan.runs if r.modality == m] for m in chains}
        context.log.info(
            f"landing zone: {len(new_patients)} new patient(s){_names(new_patients)}; runs requested: "
            + ", ".join(f"{m} {_named(ids)}" for m, ids in by_modality.items())
            + (f"; {plan.unchanged} unchanged unit(s) of recommitted drops not re-run" if plan.unchanged else "")
            + f"; {len(scan.not_ready)} drop(s) waiting for READY{_names(scan.not_ready)}; "
            f"{len(scan.drops)} ready ({plan.walked} walked), {len(scan.invalid)} invalid")
        partition_requests = ([patients_partitions.build_add_request(new_patients)] if new_patients else []) + \
            scan_changes.requests()
        # Stored before the daemon launches the runs, as the sensor's last act. Should the tick then fail,
        # its cursor is not kept: the next tick finds these units fresh again with no change against
        # the memory, and requests all of their drops' fresh units (a re-run, nothing lost). A write
        # that is lost leaves an older memory: the units look changed and run again, no more.
        remember_units(context.instance, plan.remember, memory)
        if not run_requests and not partition_requests:
            # A skipped tick: the UI's tick list can hide these, so the ticks that did something stand out.
            held_note = "".join(f"; {m} held for {_named(ids)}" for m, ids in held_by_modality.items() if ids)
            return dg.SensorResult(skip_reason=f"no new or changed drop with READY ({len(scan.drops)} ready, "
                                               f"{len(scan.not_ready)} waiting for READY{held_note})",
                                   cursor=plan.cursor)
        return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=partition_requests,
                               cursor=plan.cursor)

    return landing_sensor


def recall_units(instance: dg.DagsterInstance, units: set[str]) -> dict[str, str]:
    """"<patient>|<unit>" -> the content fingerprint it was last requested with (one query)."""
    if not units:
        return {}
    stored = instance.run_storage.get_cursor_values({MEMORY_PREFIX + unit for unit in units})
    return {key[len(MEMORY_PREFIX):]: value for key, value in stored.items()}


def remember_units(instance: dg.DagsterInstance, contents: Mapping[str, str], recalled: Mapping[str, str]) -> None:
    """Store each unit's content fingerprint. New keys and known ones (`recalled`: what this tick read)
    go in separate calls: `set_cursor_values` inserts a batch, and on a key already there updates
    only the keys already there, dropping the batch's new ones."""
    new = {MEMORY_PREFIX + unit: value for unit, value in contents.items() if unit not in recalled}
    known = {MEMORY_PREFIX + unit: value for unit, value in contents.items() if unit in recalled}
    for pairs in (new, known):
        if pairs:
            instance.run_storage.set_cursor_values(pairs)


@dataclass
class ScanPartitionChanges:
    order: list[str]  # the `ct_scans` order once the changes are made (removed ones left out, new ones last)
    added: list[str]
    removed: list[str]
    migrated: list[str]  # the keys the one-off migration added (already in the instance, not in `added`)

    def requests(self) -> list:
        return ([ct_scans_partitions.build_add_request(self.added)] if self.added else []) + \
            ([ct_scans_partitions.build_delete_request(self.removed)] if self.removed else [])


def _scan_partition_changes(context: dg.SensorEvaluationContext, drop_scans: Mapping[str, Sequence[str]],
                            listed: Sequence[str]) -> ScanPartitionChanges:
    """The `ct_scans` keys to add (the walked drops' new scans) and to remove (the walked drops' scans
    gone from them): one query for the partition list, the migration's few more once."""
    instance = context.instance
    order = list(instance.get_dynamic_partitions(ct_scans_partitions.name))
    # An old cursor: the instance may be from before ct_scans (partitions.ensure_ct_scans). The keys it
    # adds are in the instance at once; a walked drop's key among them that the drop no longer has is
    # removed below like any other.
    migrated = [] if scans_migrated(context.cursor) else migrate_ct_scans(instance)
    order += migrated
    known = set(order)
    # Walked drops in the landing root's order (as new patients are added), each drop's scans oldest first.
    walked = [p for p in listed if p in drop_scans]
    current = {key for p in walked for key in drop_scans[p]}

    def gone_from_its_drop(key: str) -> bool:
        # a scan key names its patient before the separator; only walked drops say what is gone
        return key.partition(SEPARATOR)[0] in drop_scans and key not in current

    new = [key for p in walked for key in drop_scans[p] if key not in known]
    removed = [key for key in order if gone_from_its_drop(key)] if drop_scans else []
    gone = set(removed)
    return ScanPartitionChanges(order=[key for key in order if key not in gone] + new,
                                added=new, removed=removed, migrated=migrated)


def batched_run_requests(planned: list, order: list[str], batch_size: int,
                         modality_assets: Mapping[str, Sequence[dg.AssetKey]], *,
                         scan_order: Sequence[str] | None = None) -> list[dg.RunRequest]:
    """The tick's runs: per modality, one per bucket batch of its partitions (see the module's
    docstring): the `patients` `order`, or for the per-scan modalities the `ct_scans` `scan_order`
    (None: `order`, where every scan is a patient's only one)."""
    requests = []
    for modality, assets in modality_assets.items():
        mine = {run.partition: run for run in planned if run.modality == modality}
        per_scan = modality in PER_SCAN_MODALITIES
        partitions = scan_order if per_scan and scan_order is not None else order
        partition_set = ct_scans_partitions.name if per_scan else patients_partitions.name
        for batch in plan_batches(partitions, mine, batch_size, partition_set=partition_set):
            tags = {"gcmlm/modality": modality, **runs.work_tags(modality)}
            if batch.single:
                run = mine[batch.first]
                requests.append(runs.batch_run_request(batch, batch_size, run_key=run.run_key, asset_selection=assets,
                                                       tags={**tags, "gcmlm/fingerprint": run.fingerprint}))
                continue
            # the run key names every patient's drop fingerprint: the same drops are never requested twice
            key = sha256_text(*(f"{p}:{mine[p].fingerprint}" for p in batch.patients))[:24]
            requests.append(runs.batch_run_request(batch, batch_size, run_key=f"landing:{modality}:{key}",
                                                   asset_selection=assets[:1], tags=tags))
    return requests


def _names(patient_ids) -> str:
    ids = list(patient_ids)
    if not ids:
        return ""
    shown = ", ".join(ids[:NAMED_IN_LOG]) + (f", +{len(ids) - NAMED_IN_LOG} more" if len(ids) > NAMED_IN_LOG else "")
    return f" ({shown})"


def _named(patient_ids) -> str:
    ids = list(patient_ids)
    return f"{len(ids)}{_names(ids)}"
