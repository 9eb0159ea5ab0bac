"""The lymph-node slides' automation: the tumour classifier trains itself, and lymph_nodes follows it.

- `tumour_classifier_sensor` reads the new `ln_features` materializations (by storage id after its
  cursor, so a tick costs the same at any history); when one is of a patient with annotations
  (`<landing>/<patient>/ln_annotations/`) or of a patient the installed classifier trained on (its
  annotations may be gone), a training is due. It is requested once the annotated set has settled
  (`automation.training_debounce_s`) and no lymph-node run or training is queued or running. The
  asset retrains only when its training set's fingerprint changed, so a due training whose
  annotations did not change is a cheap no-op.
- `lymph_nodes_after_classifier_sensor` requests `lymph_nodes` for the patients whose ln_features is
  materialized once a classifier is installed (they waited, skipped), and again for all of them when
  a new version is installed (model_sweeps.py), in bucket batches.
"""


import json
import time

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.batching import batch_patients
from gcmlm_assets.catalogue import LN_FEATURES, LYMPH_NODES, TUMOUR_CLASSIFIER
from gcmlm_assets.landing.scan import LN_ANNOTATIONS_FOLDER
from gcmlm_assets.model_sweeps import patients_to_rerun
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.patient_batches import plan_batches
from gcmlm_assets.pathology.lymph_node_assets import installed_classifier
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone

CLASSIFIER_KEY = dg.AssetKey(TUMOUR_CLASSIFIER.key)
FEATURES_KEY = dg.AssetKey(LN_FEATURES.key)
LYMPH_NODES_KEY = dg.AssetKey(LYMPH_NODES.key)
RECORDS_PER_TICK = 1000
MAX_LYMPH_NODE_RUNS_PER_TICK = 200
# Runs that can change the training set or the classifier (the lymph-node chains, and the classifier's
# own training, tagged as lymph-node work too): while one is queued or running, wait. Not nnU-Net's
# training: a minute of logistic regression does not wait hours behind it.
TRAINING_INPUT_WORK = (runs.LYMPH_NODE,)


def has_annotations(landing: LandingZone, patient_id: str) -> bool:
    folder = landing.patient_dir(patient_id) / LN_ANNOTATIONS_FOLDER
    try:
        return any(entry.is_file() and not entry.name.startswith(".") for entry in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def training_decision(cursor: dict, changed: bool, busy: int, now: float, debounce_s: float) -> tuple[bool, dict, str]:
    """(request now, next cursor, why) from whether annotated features changed this tick."""
    cursor = dict(cursor)
    if changed:
        cursor["due_since"] = now  # the set changed: it settles from now
    due_since = cursor.get("due_since")
    if due_since is None:
        return False, cursor, "no annotated lymph-node slide changed since the last training"
    if busy:
        return False, cursor, f"a training is due; waiting for {busy} lymph-node run(s) or training(s) in flight"
    if now - float(due_since) < debounce_s:
        return False, cursor, (f"a training is due; waiting for the annotated set to settle "
                               f"({now - float(due_since):.0f} of {debounce_s:.0f} s)")
    cursor.pop("due_since")
    return True, cursor, "annotated lymph-node slides changed: training the tumour classifier"


def build_tumour_classifier_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="tumour_classifier_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=[CLASSIFIER_KEY],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Trains tumour_classifier when the ln_features of a patient with lymph-node annotations "
                    "(`ln_annotations/`), or of one the installed classifier trained on, is materialized anew; "
                    "once that set stayed unchanged for `automation.training_debounce_s` and no lymph-node "
                    "run or training is queued or running. The asset keeps the installed version when its "
                    "training set did not change.",
    )
    def tumour_classifier_sensor(context: dg.SensorEvaluationContext, landing: LandingZone,
                                 storage: ArtifactStorage, automation: AutomationSettings):
        instance = context.instance
        cursor = json.loads(context.cursor) if context.cursor else {}
        after = int(cursor.get("after", 0))
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=FEATURES_KEY, after_storage_id=after),
            limit=RECORDS_PER_TICK, ascending=True).records
        installed = installed_classifier(storage.store())
        trained = set(installed[0].get("patients", [])) if installed else set()
        changed = sorted({r.partition_key for r in records
                          if r.partition_key in trained or has_annotations(landing, r.partition_key)})
        if records:
            cursor["after"] = records[-1].storage_id
        busy = runs.in_flight_doing(instance, TRAINING_INPUT_WORK)
        request, cursor, why = training_decision(cursor, bool(changed), busy, time.time(),
                                                 automation.training_debounce_s)
        new_cursor = json.dumps(cursor, sort_keys=True)
        if not request:
            return dg.SensorResult(skip_reason=why, cursor=new_cursor)
        context.log.info(why)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"tumour_classifier:{cursor.get('after', 0)}",
                                        asset_selection=[CLASSIFIER_KEY],
                                        tags={"gcmlm/reason": why, **runs.work_tags(runs.LYMPH_NODE)})],
            cursor=new_cursor)

    return tumour_classifier_sensor


def _not_waiting(instance: dg.DagsterInstance, patients: list[str], order: list[str], size: int) -> set[str]:
    """Which of `patients` (ln_features materialized, lymph_nodes not) are not waiting for a classifier:
    a run of their lymph_nodes is queued or running, or none was ever planned (a batch's lymph_nodes
    that the steps sensor has yet to request)."""
    storage = instance.event_log_storage
    never_planned = {p for p in patients
                     if storage.get_latest_planned_materialization_info(LYMPH_NODES_KEY, p) is None}
    rest = [p for p in patients if p not in never_planned]
    return never_planned | runs.in_flight_partitions(instance, rest, [LYMPH_NODES.key], order, size)


def build_lymph_nodes_after_classifier_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="lymph_nodes_after_classifier_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=[LYMPH_NODES_KEY],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Once a tumour classifier is installed, makes lymph_nodes for the patients whose "
                    "ln_features waited for it; after a new version, makes it again for all of them.",
    )
    def lymph_nodes_after_classifier_sensor(context: dg.SensorEvaluationContext, storage: ArtifactStorage):
        installed = installed_classifier(storage.store())
        if installed is None:
            return dg.SkipReason("no tumour classifier installed yet: lymph_nodes waits for it")
        model_key = installed[0]["version"]
        instance = context.instance
        cursor = json.loads(context.cursor) if context.cursor else {}
        order = list(instance.get_dynamic_partitions(patients_partitions.name))
        size = batch_patients()
        chosen, new_cursor = patients_to_rerun(
            model_key=model_key, cursor=cursor,
            # a partition deleted by hand (the UI can) keeps its materializations: only the listed ones
            upstream_done=instance.get_materialized_partitions(FEATURES_KEY) & set(order),
            downstream_done=instance.get_materialized_partitions(LYMPH_NODES_KEY),
            in_flight=lambda patients: _not_waiting(instance, patients, order, size),
            excluded=lambda _patient: False, limit=MAX_LYMPH_NODE_RUNS_PER_TICK)
        context.update_cursor(json.dumps(new_cursor, sort_keys=True))
        if not chosen:
            return dg.SkipReason(f"every patient's lymph_nodes is made with classifier {model_key}")
        batches = plan_batches(order, chosen, size)
        context.log.info(f"classifier {model_key}: lymph_nodes of {len(chosen)} patient(s) in {len(batches)} run(s)")
        return [runs.batch_run_request(
            batch, size, run_key=f"{batch.first}..{batch.last}:lymph_nodes:{model_key}",
            asset_selection=[LYMPH_NODES_KEY],
            tags={"gcmlm/modality": runs.LYMPH_NODE, "gcmlm/reason": f"tumour classifier {model_key}",
                  **runs.work_tags(runs.LYMPH_NODE)})
            for batch in batches]

    return lymph_nodes_after_classifier_sensor
