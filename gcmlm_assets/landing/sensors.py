"""landing_sensor: new or changed patient drops become partitions and runs.

The drops of one tick are grouped per modality into batches of `GCMLM_GPU_BATCH_PATIENTS`
(patient_batches.py). A batch of one patient is one run of its modality's whole chain; a larger
batch is one run of the chain's first asset over the batch's range, and `patient_steps_sensor`s
carry its patients on through the chain in batched runs (one model load per batch).

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
from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.resources import LandingZone

# Patient ids named in a tick's log line; more are counted.
NAMED_IN_LOG = 5


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
        plan = plan_tick(scan, context.cursor, landing.max_runs_per_tick, held=frozenset(held_because))
        for folder, reason in scan.invalid:
            context.log.warning(f"landing zone: folder {folder!r} ignored: {reason}")
        for patient_id, modality, reason in plan.refused:
            context.log.warning(f"landing zone: {patient_id} {modality} not requested: {reason}")
        for folder, error in scan.unreadable:
            context.log.warning(f"landing zone: folder {folder!r} could not be scanned this tick ({error})")

        order = list(context.instance.get_dynamic_partitions(patients_partitions.name))
        known = set(order)
        new_patients = [d.patient_id for d in scan.drops if d.patient_id not in known]
        run_requests = batched_run_requests(plan.runs, order + new_patients, batch_patients(), chains)
        if plan.deferred:
            context.log.info(f"{plan.deferred} changed drops wait for the next tick "
                             f"(cap {landing.max_runs_per_tick} runs per tick)")
        held_by_modality = {m: [p.patient_id for p in plan.held if p.modality == m] for m in held_because}
        for modality, patient_ids in held_by_modality.items():
            if patient_ids:
                context.log.warning(f"{modality} held for {_named(patient_ids)}: {held_because[modality]} "
                                    "Their runs start on the first tick after that is fixed.")
        by_modality = {m: [r.patient_id for r in plan.runs if r.modality == m] for m in chains}
        context.log.info(
            f"landing zone: {len(new_patients)} new patient(s){_names(new_patients)}; runs requested: "
            + ", ".join(f"{m} {_named(ids)}" for m, ids in by_modality.items())
            + f"; {len(scan.not_ready)} drop(s) waiting for READY{_names(scan.not_ready)}; "
            f"{len(scan.drops)} ready ({plan.walked} walked), {len(scan.invalid)} invalid")
        if not run_requests and not new_patients:
            # A skipped tick: the UI's tick list can hide these, so the ticks that did something stand out.
            held_note = "".join(f"; {m} held for {_named(ids)}" for m, ids in held_by_modality.items() if ids)
            return dg.SensorResult(skip_reason=f"no new or changed drop with READY ({len(scan.drops)} ready, "
                                               f"{len(scan.not_ready)} waiting for READY{held_note})",
                                   cursor=plan.cursor)
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [patients_partitions.build_add_request(new_patients)] if new_patients else []
            ),
            cursor=plan.cursor,
        )

    return landing_sensor


def batched_run_requests(planned: list, order: list[str], batch_size: int,
                         modality_assets: Mapping[str, Sequence[dg.AssetKey]]) -> list[dg.RunRequest]:
    """The tick's runs: per modality, one per bucket batch of its patients (see the module's docstring)."""
    requests = []
    for modality, assets in modality_assets.items():
        mine = {run.patient_id: run for run in planned if run.modality == modality}
        for batch in plan_batches(order, mine, batch_size):
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
