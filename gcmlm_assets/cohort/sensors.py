"""cohort_refresh_sensor: the cohort assets refresh once per-patient work has settled.
(risk_explanations_sensor is in explanation_sensors.py.)"""

from __future__ import annotations

import hashlib
import json
import time

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.cohort.refresh import decide_refresh
from gcmlm_assets.landing.scan import CLINICAL_CSV
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.radiology.resources import SegmentationModelResource
from gcmlm_assets.radiology.sensors import training_status
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone

COHORT_GROUP = "cohort"
PATIENT_FEATURE_ASSETS = ("radiomics_row", "slide_vector")


def _inputs_fingerprint(latest_run_id: str | None, landing: LandingZone) -> str:
    """Changes whenever a non-cohort run finishes (materialized or failed) or clinical.csv changes."""
    try:
        st = (landing.path() / CLINICAL_CSV).stat()
        clinical = [st.st_size, st.st_mtime_ns]
    except FileNotFoundError:
        clinical = None
    return json.dumps({"run": latest_run_id, "clinical": clinical}, sort_keys=True)


def build_cohort_refresh_sensor(interval_s: int, cohort_keys: list[dg.AssetKey],
                                after_refresh: tuple[str, ...] = ()) -> dg.SensorDefinition:
    """`after_refresh`: assets that follow a refresh; their runs are not new per-patient work."""
    cohort_assets = {key.to_user_string() for key in cohort_keys} | set(after_refresh)

    @dg.sensor(
        name="cohort_refresh_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=cohort_keys,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Refreshes the cohort assets (clinical_table, fused_table, risk_model, risk_scores) in one run "
                    "once no run is queued or running, no segmentation training is due, nothing finished for "
                    "`automation.cohort_quiet_s`, and a per-patient run or clinical.csv changed since the last refresh.",
    )
    def cohort_refresh_sensor(context: dg.SensorEvaluationContext, landing: LandingZone, storage: ArtifactStorage,
                              segmentation: SegmentationModelResource, automation: AutomationSettings):
        instance = context.instance
        latest = runs.latest_finished(instance, excluding=cohort_assets)
        fingerprint = _inputs_fingerprint(latest[0] if latest else None, landing)
        features_exist = any(instance.get_latest_materialization_event(dg.AssetKey(name)) is not None
                             for name in PATIENT_FEATURE_ASSETS)
        busy_runs = len(runs.in_flight_runs(instance))
        # The training status scans every patient's ct_label/: only worth it when nothing else holds
        # the refresh back (decide_refresh looks at it after these).
        training_pending = (features_exist and fingerprint != context.cursor and not busy_runs
                            and training_status(instance, landing, storage, segmentation, automation, {}).pending)
        decision = decide_refresh(
            features_exist=features_exist, busy_runs=busy_runs, training_pending=training_pending,
            last_activity=latest[1] if latest else None, now=time.time(), quiet_s=automation.cohort_quiet_s,
            inputs_fingerprint=fingerprint, refreshed_fingerprint=context.cursor)
        if not decision.request:
            return dg.SkipReason(decision.reason)
        context.log.info(decision.reason)
        key = "cohort:" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=key, asset_selection=cohort_keys,
                                        tags={"gcmlm/reason": decision.reason})],
            cursor=fingerprint)

    return cohort_refresh_sensor
