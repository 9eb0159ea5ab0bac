"""cohort_refresh_sensor: the cohort assets refresh once per-patient work has settled.
(risk_explanations_sensor is in explanation_sensors.py.)"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.catalogue import PATIENT_FEATURES
from gcmlm_assets.cohort.refresh import decide_refresh
from gcmlm_assets.landing.scan import CLINICAL_CSV
from gcmlm_assets.patient_steps import patients_in_between
from gcmlm_assets.resources import AutomationSettings, LandingZone

PATIENT_FEATURE_ASSETS = tuple(file.asset.key for file in PATIENT_FEATURES.values())


def _inputs_fingerprint(event_marks: dict[str, int], landing: LandingZone) -> str:
    """Changes whenever a run is planned for, materializes or checks a per-patient asset the cohort
    reads (a later failed attempt excludes a patient, so its plan counts), or clinical.csv changes;
    it is made of storage ids, so it stays right whatever the length of the history."""
    try:
        st = (landing.path() / CLINICAL_CSV).stat()
        clinical = [st.st_size, st.st_mtime_ns]
    except FileNotFoundError:
        clinical = None
    return json.dumps({"events": event_marks, "clinical": clinical}, sort_keys=True)


def _last_refresh(instance: dg.DagsterInstance, cohort_keys: list[dg.AssetKey]) -> int:
    """The storage id of the latest run planned for the cohort assets (0 before the first)."""
    planned = [instance.event_log_storage.get_latest_planned_materialization_info(key) for key in cohort_keys]
    return max((info.storage_id for info in planned if info is not None), default=0)


def build_cohort_refresh_sensor(interval_s: int, cohort_keys: list[dg.AssetKey],
                                input_check_keys: list[dg.AssetCheckKey] = (),
                                patient_chains: list[list[dg.AssetKey]] = (),
                                training_pending: Callable[[dg.SensorEvaluationContext], bool] | None = None,
                                training_resource_keys: Iterable[str] = ()) -> dg.SensorDefinition:
    """`input_check_keys`: the blocking checks of the per-patient assets the cohort reads (their
    outcomes decide which patients fused_table may use). `patient_chains`: the per-patient chains
    the steps sensors carry batches through; a patient between two of their runs counts as busy.
    `training_pending(context)`: whether a model training the cohort's inputs wait for is due or
    running (radiology's segmentation training); it reads the resources `training_resource_keys`."""
    check_keys = list(input_check_keys)
    chains = [list(chain) for chain in patient_chains]

    @dg.sensor(
        name="cohort_refresh_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=cohort_keys,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"landing", "automation", *training_resource_keys},
        description=f"Refreshes the cohort assets ({', '.join(key.to_user_string() for key in cohort_keys)}) "
                    "in one run "
                    "once no run is queued or running, no segmentation training is due, nothing finished for "
                    "`automation.cohort_quiet_s`, and radiomics_row, slide_vector (a run planned, a result or a "
                    "check) or clinical.csv changed since the last refresh.",
    )
    def cohort_refresh_sensor(context: dg.SensorEvaluationContext, **_resources):
        # The resources are read from the context (which ones depends on `training_resource_keys`);
        # a direct call (tests) also passes them by name, hence the catch-all.
        instance = context.instance
        landing: LandingZone = context.resources.landing
        automation: AutomationSettings = context.resources.automation
        marks = runs.latest_event_ids(instance, PATIENT_FEATURE_ASSETS, check_keys)
        fingerprint = _inputs_fingerprint(marks, landing)
        features_exist = any(marks[f"{name}:materialized"] for name in PATIENT_FEATURE_ASSETS)
        busy_runs = runs.in_flight_count(instance)
        # between two batched runs of a chain nothing is in flight for a moment: those patients count
        between = (len(patients_in_between(instance, chains, _last_refresh(instance, cohort_keys)))
                   if chains and not busy_runs and fingerprint != context.cursor else 0)
        # The training status scans every CT scan's reference folder (ct_label/ or ct_label/<timepoint>/):
        # only worth it when nothing else holds
        # the refresh back (decide_refresh looks at it after these).
        training_due = (features_exist and fingerprint != context.cursor and not busy_runs and not between
                        and training_pending is not None and training_pending(context))
        decision = decide_refresh(
            features_exist=features_exist, busy_runs=busy_runs, training_pending=training_due,
            last_activity=runs.latest_run_end(instance), now=time.time(), quiet_s=automation.cohort_quiet_s,
            inputs_fingerprint=fingerprint, refreshed_fingerprint=context.cursor, patients_between_steps=between)
        if not decision.request:
            return dg.SkipReason(decision.reason)
        context.log.info(decision.reason)
        key = "cohort:" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=key, asset_selection=cohort_keys,
                                        tags={"gcmlm/reason": decision.reason, **runs.work_tags(runs.COHORT)})],
            cursor=fingerprint)

    return cohort_refresh_sensor
