"""tumour_classifier_sensor and lymph_nodes_after_classifier_sensor on a real instance, without a daemon.

The sensors are evaluated as the daemon does (a sensor context on the instance, the cursor carried
from tick to tick); what they request is run with dg.materialize on the real assets. That a patient's
ln_features was materialized is reported to the instance as a runless materialization, after its
files were written (support/pathology/ln_cohort.py): the sensors read the event, the assets the files.
"""

from __future__ import annotations

import json
import uuid

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.catalogue import LN_FEATURES, TUMOUR_CLASSIFIER
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.pathology.ln_sensors import (
    CLASSIFIER_KEY, LYMPH_NODES_KEY, build_lymph_nodes_after_classifier_sensor, build_tumour_classifier_sensor,
    training_decision)
from gcmlm_assets.pathology.lymph_node_assets import lymph_nodes, tumour_classifier
from gcmlm_assets.patient_batches import BUCKET_TAG, PATIENTS_TAG
from gcmlm_assets.resources import AutomationSettings
from gcmlm_assets.storage import read_version_pointer
from gcmlm_assets_tests.support.pathology.ln_cohort import (
    ANNOTATED, PATIENTS, annotation_file, build_cohort, ln_resources, write_planted_annotations)

NOW = 1_000_000.0
SETTLE = 60.0
JOB = "__ASSET_JOB"


# ---------------------------------------------------------------- training_decision (no Dagster)


def test_a_change_makes_a_training_due_that_waits_for_the_set_to_settle_then_is_requested_once():
    request, cursor, why = training_decision({"after": 7}, False, 0, NOW, SETTLE)
    assert not request and cursor == {"after": 7} and "no annotated lymph-node slide changed" in why

    request, cursor, why = training_decision({"after": 7}, True, 0, NOW, SETTLE)
    assert not request and cursor == {"after": 7, "due_since": NOW} and "settle (0 of 60 s)" in why
    request, cursor, why = training_decision(cursor, False, 0, NOW + 30, SETTLE)
    assert not request and cursor["due_since"] == NOW and "settle (30 of 60 s)" in why
    # Another change while settling: the wait starts again.
    request, cursor, _ = training_decision(cursor, True, 0, NOW + 50, SETTLE)
    assert not request and cursor["due_since"] == NOW + 50

    request, cursor, why = training_decision(cursor, False, 0, NOW + 110, SETTLE)
    assert request and cursor == {"after": 7} and "training the tumour classifier" in why
    # Requested once: the due training is cleared.
    request, cursor, _ = training_decision(cursor, False, 0, NOW + 500, SETTLE)
    assert not request and cursor == {"after": 7}


def test_a_due_training_waits_while_lymph_node_runs_or_trainings_are_in_flight():
    due = {"due_since": NOW - 600}
    request, cursor, why = training_decision(due, False, 2, NOW, SETTLE)
    assert not request and cursor == due and "waiting for 2 lymph-node run(s) or training(s)" in why
    request, cursor, _ = training_decision(cursor, False, 0, NOW, SETTLE)
    assert request and "due_since" not in cursor


# ---------------------------------------------------------------- tumour_classifier_sensor


class ClassifierTicker:
    """Evaluates the real tumour_classifier_sensor, its cursor carried from tick to tick."""

    def __init__(self, instance: dg.DagsterInstance, base_resources: dict):
        self.sensor = build_tumour_classifier_sensor(30)
        self.instance, self.resources, self.cursor = instance, base_resources, None

    def tick(self, debounce_s: float) -> dg.SensorResult:
        resources = {"landing": self.resources["landing"], "storage": self.resources["storage"],
                     "automation": AutomationSettings(training_debounce_s=debounce_s)}
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor, resources=resources) as context:
            result = self.sensor(context)
        assert isinstance(result, dg.SensorResult)
        self.cursor = result.cursor
        return result

    @property
    def state(self) -> dict:
        return json.loads(self.cursor)


def features_materialized(instance: dg.DagsterInstance, patient_id: str) -> int:
    """Reports a new ln_features materialization of the patient; its storage id."""
    instance.report_runless_asset_event(dg.AssetMaterialization(LN_FEATURES.key, partition=patient_id))
    return instance.fetch_materializations(dg.AssetKey(LN_FEATURES.key), limit=1).records[0].storage_id


def skip_message(result) -> str:
    reason = result.skip_reason if isinstance(result, dg.SensorResult) else result
    return reason.skip_message


def add_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus, tags: dict) -> dg.DagsterRun:
    return instance.add_run(dg.DagsterRun(job_name=JOB, run_id=str(uuid.uuid4()), status=status, tags=tags))


def test_annotated_patients_new_features_request_one_training_after_the_debounce(instance, base_resources, data_root):
    instance.add_dynamic_partitions(patients_partitions.name, ["P1", "P4"])
    write_planted_annotations(annotation_file(data_root / "landing", "P1"))  # P4 has no annotations
    ticker = ClassifierTicker(instance, base_resources)
    first = ticker.tick(debounce_s=0)
    assert not first.run_requests and "no annotated lymph-node slide changed" in skip_message(first)

    p4 = features_materialized(instance, "P4")
    unannotated = ticker.tick(debounce_s=0)
    assert not unannotated.run_requests and "no annotated lymph-node slide changed" in skip_message(unannotated)
    assert ticker.state == {"after": p4}  # read past, by storage id

    p1 = features_materialized(instance, "P1")
    settling = ticker.tick(debounce_s=3600)
    assert not settling.run_requests and "waiting for the annotated set to settle" in skip_message(settling)
    assert ticker.state["after"] == p1 and "due_since" in ticker.state
    assert not ticker.tick(debounce_s=3600).run_requests  # nothing new: still settling

    due = ticker.tick(debounce_s=0)
    [request] = due.run_requests
    assert request.asset_selection == [CLASSIFIER_KEY]
    assert request.tags[runs.WORK_TAG] == runs.LYMPH_NODE and request.run_key == f"tumour_classifier:{p1}"
    assert ticker.state == {"after": p1}
    # Requested once: a tick without new materializations requests nothing.
    again = ticker.tick(debounce_s=0)
    assert not again.run_requests and "no annotated lymph-node slide changed" in skip_message(again)


def test_the_classifier_sensor_counts_trained_patients_and_waits_for_lymph_node_runs(instance, base_resources,
                                                                                      data_root):
    cohort = build_cohort(instance, data_root)
    resources = ln_resources(base_resources)
    ticker = ClassifierTicker(instance, base_resources)
    for patient_id in PATIENTS:
        features_materialized(instance, patient_id)
    [request] = ticker.tick(debounce_s=0).run_requests
    # The sensor's request, run on the real asset: the classifier is trained on the annotated patients.
    trained = dg.materialize([tumour_classifier], instance=instance, resources=resources,
                             selection=request.asset_selection, tags=request.tags)
    assert trained.success and trained.get_asset_materialization_events()
    assert read_version_pointer(TUMOUR_CLASSIFIER.folder(cohort))["patients"] == list(ANNOTATED)
    assert not ticker.tick(debounce_s=0).run_requests

    # P3's annotations are withdrawn; the classifier was trained on them, so its new features count.
    annotation_file(data_root / "landing", "P3").unlink()
    features_materialized(instance, "P3")
    [retrain] = ticker.tick(debounce_s=0).run_requests
    assert retrain.asset_selection == [CLASSIFIER_KEY] and retrain.run_key != request.run_key

    # A lymph-node run in flight (it may write new features): the due training waits for it.
    # (NOT_STARTED: a run created but not yet launched; the instance takes QUEUED ones only with an origin.)
    queued = add_run(instance, dg.DagsterRunStatus.NOT_STARTED, runs.work_tags(runs.LYMPH_NODE))
    p1 = features_materialized(instance, "P1")
    waiting = ticker.tick(debounce_s=0)
    assert not waiting.run_requests and "waiting for 1 lymph-node run(s) or training(s)" in skip_message(waiting)
    # A pathology run (the primary-tumour slides) does not hold it back, nor nnU-Net's training; a
    # classifier training (lymph-node work) does.
    add_run(instance, dg.DagsterRunStatus.STARTED, runs.work_tags(runs.PATHOLOGY))
    add_run(instance, dg.DagsterRunStatus.STARTED, runs.work_tags(runs.TRAINING))
    training = add_run(instance, dg.DagsterRunStatus.STARTED, runs.work_tags(runs.LYMPH_NODE))
    assert "waiting for 2 lymph-node run(s)" in skip_message(ticker.tick(debounce_s=0))
    assert set(ticker.state) == {"after", "due_since"} and ticker.state["after"] == p1
    for run in (queued, training):
        instance.report_run_canceled(run)
    [after_runs] = ticker.tick(debounce_s=0).run_requests
    assert after_runs.asset_selection == [CLASSIFIER_KEY] and ticker.state == {"after": p1}


# ---------------------------------------------------------------- lymph_nodes_after_classifier_sensor


class LymphNodesTicker:
    """Evaluates the real lymph_nodes_after_classifier_sensor, its cursor carried from tick to tick."""

    def __init__(self, instance: dg.DagsterInstance, base_resources: dict):
        self.sensor = build_lymph_nodes_after_classifier_sensor(30)
        self.instance, self.storage, self.cursor = instance, base_resources["storage"], None

    def tick(self):
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources={"storage": self.storage}) as context:
            result = self.sensor(context)
            self.cursor = context.cursor
        return result


def requested_patients(request: dg.RunRequest, order: list[str]) -> list[str]:
    if request.partition_key is not None:
        return [request.partition_key]
    span = order[order.index(request.tags[runs.RANGE_START_TAG]):order.index(request.tags[runs.RANGE_END_TAG]) + 1]
    named = request.tags.get(PATIENTS_TAG)
    return span if named is None else [p for p in span if p in named.split(",")]


def test_lymph_nodes_is_made_for_everyone_once_a_classifier_is_installed_and_again_after_a_new_one(
        instance, base_resources, data_root, monkeypatch):
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", "3")
    cohort = build_cohort(instance, data_root)
    instance.add_dynamic_partitions(patients_partitions.name, ["P5"])  # no lymph-node slides
    order = [*PATIENTS, "P5"]
    assert list(instance.get_dynamic_partitions(patients_partitions.name)) == order
    resources = ln_resources(base_resources)
    for patient_id in PATIENTS:
        features_materialized(instance, patient_id)
    ticker = LymphNodesTicker(instance, base_resources)
    assert "no tumour classifier installed yet" in skip_message(ticker.tick())
    # P4's lymph_nodes ran before there was a classifier: it waited (skipped).
    waited = dg.materialize([lymph_nodes], partition_key="P4", instance=instance, resources=resources)
    assert waited.success and not waited.get_asset_materialization_events()

    def sweep(version: str) -> list[dg.RunRequest]:
        requests = ticker.tick()
        assert isinstance(requests, list), requests
        # Buckets of 3 in the partitions' order: a range run P1..P3, and P4 alone; P5 has no ln_features.
        assert [requested_patients(r, order) for r in requests] == [["P1", "P2", "P3"], ["P4"]]
        ranged, single = requests
        assert ranged.partition_key is None and ranged.tags[runs.RANGE_START_TAG] == "P1"
        assert ranged.tags[runs.RANGE_END_TAG] == "P3" and PATIENTS_TAG not in ranged.tags
        assert single.partition_key == "P4" and runs.RANGE_START_TAG not in single.tags
        assert ranged.tags[BUCKET_TAG] != single.tags[BUCKET_TAG]
        for request in requests:
            assert request.asset_selection == [LYMPH_NODES_KEY]
            assert request.tags[runs.WORK_TAG] == runs.LYMPH_NODE and version in request.run_key
        return requests

    def run(requests: list[dg.RunRequest]) -> None:
        for request in requests:
            result = dg.materialize([lymph_nodes], instance=instance, resources=resources,
                                    selection=request.asset_selection, partition_key=request.partition_key,
                                    tags=request.tags)
            assert result.success
            assert {e.partition for e in result.get_asset_materialization_events()} == \
                set(requested_patients(request, order))

    trainer = ClassifierTicker(instance, base_resources)

    def train() -> str:
        """The classifier sensor's request, run: the installed version."""
        [request] = trainer.tick(debounce_s=0).run_requests
        assert dg.materialize([tumour_classifier], instance=instance, resources=resources,
                              selection=request.asset_selection, tags=request.tags).success
        return read_version_pointer(TUMOUR_CLASSIFIER.folder(cohort))["version"]

    first = train()
    run(sweep(first))
    assert instance.get_materialized_partitions(LYMPH_NODES_KEY) == set(PATIENTS)
    done = ticker.tick()
    assert isinstance(done, dg.SkipReason) and f"made with classifier {first}" in done.skip_message
    assert json.loads(ticker.cursor) == {"model": first, "after": "P4", "swept": True}
    assert isinstance(ticker.tick(), dg.SkipReason)

    # A corrected annotation (the landing run makes P1's ln_features again): a new classifier version,
    # and lymph_nodes again for everyone.
    write_planted_annotations(annotation_file(data_root / "landing", "P1"), tumour_scale=0.8)
    features_materialized(instance, "P1")
    second = train()
    assert second != first
    sweep(second)  # (run once above: their runs would be the same, with the new version)
    assert isinstance(ticker.tick(), dg.SkipReason)
