"""The radiology group's automation: the segmentation model trains itself, and masks follow it.

- `segmentation_training_sensor` requests `segmentation_model` when enough CT scans have a
  reference mask and no model is installed, or when that set changed by what the retraining
  policy asks since the last training (`segmentation.retrain_min_new_cases` /
  `retrain_min_growth_fraction`), once it has settled.
- `predicted_mask_sensor` requests `ct_mask` and what follows it (`radiomics_row`, `ct_mask_seg`,
  `radiomics_sr`) for the scans without a reference mask once a model is installed (they waited,
  skipped), and again for all of them when a new model is installed. Scans with a reference mask
  are left alone.

Both go over the `ct_scans` partitions (one per scan: a patient's timepoints are scans of their
own, gcmlm_assets/scans.py), and the mask runs are batched in that set's order and buckets.

The rules live in `model_lifecycle.py`; here is only what the instance and the disk say.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.batching import batch_patients
from gcmlm_assets.partitions import ct_scans_partitions, ensure_ct_scans
from gcmlm_assets.patient_batches import plan_batches
from gcmlm_assets.radiology import model_lifecycle
from gcmlm_assets.catalogue import (
    CT_IMAGE, CT_MASK, CT_MASK_SEG, CT_VOLUME, RADIOMICS_ROW, RADIOMICS_SR, SEGMENTATION_MODEL)
from gcmlm_assets.radiology.resources import SegmentationModelResource
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone

SEGMENTATION_MODEL_KEY = dg.AssetKey(SEGMENTATION_MODEL.key)
MASK_ASSET = dg.AssetKey(CT_MASK.key)
# The mask and what is made from it, in the radiology chain's order.
PREDICTED_MASK_ASSETS = [MASK_ASSET, *(dg.AssetKey(a.key) for a in (RADIOMICS_ROW, CT_MASK_SEG, RADIOMICS_SR))]
# Runs that can change the training set or the model: while one is queued or running, wait
# (counted by their work tag; a run without one, launched by hand, counts too).
TRAINING_INPUT_WORK = (runs.RADIOLOGY, runs.TRAINING)
MAX_MASK_RUNS_PER_TICK = 200


@dataclass(frozen=True)
class TrainingStatus:
    decision: model_lifecycle.TrainingDecision
    pending: bool  # a training is due or running: cohort-wide results should wait for it


def training_status(instance: dg.DagsterInstance, landing: LandingZone, storage: ArtifactStorage,
                    segmentation: SegmentationModelResource, automation_settings: AutomationSettings, cursor: dict,
                    now: float | None = None) -> TrainingStatus:
    """Whether segmentation_model should train now, and whether a training is pending at all."""
    if segmentation.trained_model_folder:
        decision = model_lifecycle.TrainingDecision(False, "the segmentation resource points at a trained model "
                                                      f"({segmentation.trained_model_folder}): nothing to train", {})
        return TrainingStatus(decision, False)
    from gcmlm_assets.radiology.nnunet import read_current_model

    store = storage.store()
    scans = ensure_ct_scans(instance)
    cases = model_lifecycle.reference_set(landing.path(), {key: CT_VOLUME.path(store, key) for key in scans})
    pointer = read_current_model(SEGMENTATION_MODEL.folder(store, create=False)) or {}
    busy = runs.in_flight_doing(instance, TRAINING_INPUT_WORK)
    fingerprint = model_lifecycle.reference_set_fingerprint(cases) if cases else ""
    requested = bool(fingerprint) and runs.run_key_exists(instance, model_lifecycle.training_run_key(fingerprint))
    decision = model_lifecycle.decide_training(
        cases=cases, trained=model_lifecycle.trained_case_stamps(pointer),
        trained_fingerprint=pointer.get("reference_set"), policy=segmentation.retrain_policy(),
        min_cases=segmentation.min_training_cases, busy_runs=busy, cursor=cursor,
        now=time.time() if now is None else now, debounce_s=automation_settings.training_debounce_s,
        requested_before=requested)
    training_running = bool(busy) and bool(runs.in_flight_count(instance, {runs.TRAINING_TAG: "nnunet"}))
    # Due (or settling) but not yet requested, or requested and still running.
    pending = training_running or (decision.due and not requested)
    return TrainingStatus(decision, pending)


# The resources `training_pending` reads.
TRAINING_STATUS_RESOURCES = frozenset({"landing", "storage", "segmentation", "automation"})


def training_pending(context: dg.SensorEvaluationContext) -> bool:
    """Whether a segmentation training is due or running (the cohort refresh waits for it); reads
    the sensor's resources `TRAINING_STATUS_RESOURCES`."""
    resources = context.resources
    return training_status(context.instance, resources.landing, resources.storage, resources.segmentation,
                           resources.automation, {}).pending


def build_segmentation_training_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="segmentation_training_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=[SEGMENTATION_MODEL_KEY],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Trains segmentation_model when at least `segmentation.min_training_cases` CT scans have "
                    "a reference mask and a materialized ct_image and no model is installed, or when at least "
                    "`segmentation.retrain_min_new_cases` of those cases (or `retrain_min_growth_fraction` of "
                    "the last training's set) were added, changed or removed since the last training; once "
                    "the set stayed unchanged for `automation.training_debounce_s` and no radiology run or "
                    "training is queued or running. A new model is installed only if it predicts held-out "
                    "reference cases at least as well as the installed one.",
    )
    def segmentation_training_sensor(context: dg.SensorEvaluationContext, landing: LandingZone,
                                     storage: ArtifactStorage, segmentation: SegmentationModelResource,
                                     automation: AutomationSettings):
        cursor = json.loads(context.cursor) if context.cursor else {}
        status = training_status(context.instance, landing, storage, segmentation, automation, cursor)
        decision = status.decision
        new_cursor = json.dumps(decision.cursor, sort_keys=True)
        if not decision.request:
            context.update_cursor(new_cursor)
            return dg.SkipReason(decision.reason)
        context.log.info(decision.reason)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=model_lifecycle.training_run_key(decision.fingerprint),
                                        asset_selection=[SEGMENTATION_MODEL_KEY],
                                        # one training at a time: the instance's tag concurrency limit
                                        tags={"gcmlm/reason": decision.reason, runs.TRAINING_TAG: "nnunet",
                                              **runs.work_tags(runs.TRAINING)})],
            cursor=new_cursor)

    return segmentation_training_sensor


def installed_model_key(segmentation: SegmentationModelResource, storage: ArtifactStorage) -> str | None:
    """The installed model's identity (what predicted masks record), or None when there is none."""
    folder = segmentation.model_folder(storage.store())
    return model_lifecycle.model_identity(folder)[:16] if folder is not None else None


def _not_waiting(instance: dg.DagsterInstance, patients: list[str], order: list[str], size: int) -> set[str]:
    """Which of `patients` (scans: CT materialized, no mask) are not waiting for a model: a run of their
    ct_mask is queued or running, or none was ever planned (a batch's ct_mask that radiology_steps_sensor
    has yet to request)."""
    storage = instance.event_log_storage
    never_planned = {p for p in patients if storage.get_latest_planned_materialization_info(MASK_ASSET, p) is None}
    rest = [p for p in patients if p not in never_planned]
    return never_planned | runs.in_flight_partitions(instance, rest, [MASK_ASSET.to_user_string()], order, size,
                                                     partition_set=ct_scans_partitions.name)


def build_predicted_mask_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="predicted_mask_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=PREDICTED_MASK_ASSETS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Once a segmentation model is installed, predicts the masks (ct_mask, then radiomics_row, "
                    "ct_mask_seg and radiomics_sr) of "
                    "the CT scans without a reference mask that waited for it; after a new model, re-predicts "
                    "all of them. Scans with a reference mask are left alone.",
    )
    def predicted_mask_sensor(context: dg.SensorEvaluationContext, landing: LandingZone,
                              storage: ArtifactStorage, segmentation: SegmentationModelResource):
        model_key = installed_model_key(segmentation, storage)
        if model_key is None:
            return dg.SkipReason("no segmentation model installed yet: masks without a reference wait for it")
        instance = context.instance
        cursor = json.loads(context.cursor) if context.cursor else {}
        order = ensure_ct_scans(instance)
        # Materialized partitions include scans deleted from ct_scans since (a patient's only scan that
        # moved into a timepoint folder): only the scans there now are batched over its order.
        scans = set(order)
        ct_done = instance.get_materialized_partitions(dg.AssetKey(CT_IMAGE.key)) & scans
        mask_done = instance.get_materialized_partitions(MASK_ASSET) & scans
        size = batch_patients()
        chosen, new_cursor = model_lifecycle.masks_to_predict(
            model_key=model_key, cursor=cursor, ct_done=ct_done, mask_done=mask_done,
            # asked only for the few waiting patients it could request now: their runs alone are loaded
            in_flight=lambda patients: _not_waiting(instance, patients, order, size),
            has_reference=lambda key: model_lifecycle.has_reference_mask(landing.path(), key),
            limit=MAX_MASK_RUNS_PER_TICK)
        context.update_cursor(json.dumps(new_cursor, sort_keys=True))
        if not chosen:
            return dg.SkipReason(f"every mask without a reference is predicted by model {model_key}")
        batches = plan_batches(order, chosen, size, partition_set=ct_scans_partitions.name)
        context.log.info(f"model {model_key}: predicting the masks of {len(chosen)} scan(s) in {len(batches)} "
                         "run(s): " + ", ".join(chosen[:20]) + (" ..." if len(chosen) > 20 else ""))
        # One patient: ct_mask and what follows it in one run. A batch: ct_mask over its range with one
        # loaded model; radiology_steps_sensor then carries the batch on through the chain.
        return [runs.batch_run_request(
            batch, size, run_key=model_lifecycle.mask_run_key(batch.first if batch.single else
                                                              f"{batch.first}..{batch.last}", model_key),
            asset_selection=PREDICTED_MASK_ASSETS if batch.single else PREDICTED_MASK_ASSETS[:1],
            tags={"gcmlm/modality": "radiology", "gcmlm/reason": f"predicted mask, model {model_key}",
                  **runs.work_tags(runs.RADIOLOGY)})
            for batch in batches]

    return predicted_mask_sensor
