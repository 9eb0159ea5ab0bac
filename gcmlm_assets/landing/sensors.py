"""landing_sensor: new or changed patient drops become partitions and runs."""

from __future__ import annotations

import dagster as dg

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.resources import LandingZone

# What a change of each modality re-materializes for that patient.
MODALITY_ASSETS: dict[str, list[dg.AssetKey]] = {
    "radiology": [dg.AssetKey(k) for k in ("ct_image", "ct_mask", "radiomics_row")],
    "pathology": [dg.AssetKey(k) for k in ("patch_coords", "uni_features", "slide_vector")],
}


@dg.sensor(
    name="landing_sensor",
    minimum_interval_seconds=30,
    asset_selection=[key for keys in MODALITY_ASSETS.values() for key in keys],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Scans the landing zone (names, sizes, times only) and requests runs "
    "for new or changed patient drops that carry a READY marker.",
)
def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingZone) -> dg.SensorResult:
    # Lists READY and the folder of each patient; plan_tick walks only the drops whose READY
    # (or folder) is at or above the cursor's watermark.
    scan = scan_landing_zone(landing.path())
    plan = plan_tick(scan, context.cursor, landing.max_runs_per_tick)
    for folder, reason in scan.invalid:
        context.log.warning(f"landing zone: folder {folder!r} ignored: invalid patient id ({reason})")
    for folder, error in scan.unreadable:
        context.log.warning(f"landing zone: folder {folder!r} could not be scanned this tick ({error})")

    known = set(context.instance.get_dynamic_partitions(patients_partitions.name))
    new_patients = [d.patient_id for d in scan.drops if d.patient_id not in known]

    run_requests = [
        dg.RunRequest(
            run_key=run.run_key,
            partition_key=run.patient_id,
            asset_selection=MODALITY_ASSETS[run.modality],
            tags={"gcmlm/modality": run.modality, "gcmlm/fingerprint": run.fingerprint},
        )
        for run in plan.runs
    ]
    if plan.deferred:
        context.log.info(f"{plan.deferred} changed drops wait for the next tick "
                         f"(cap {landing.max_runs_per_tick} runs per tick)")
    context.log.info(f"landing zone: {len(scan.drops)} ready ({plan.walked} walked), "
                     f"{len(scan.not_ready)} without READY, "
                     f"{len(scan.invalid)} invalid, {len(new_patients)} new, "
                     f"{len(run_requests)} runs requested")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=(
            [patients_partitions.build_add_request(new_patients)] if new_patients else []
        ),
        cursor=plan.cursor,
    )
