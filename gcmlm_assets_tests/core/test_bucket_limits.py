"""Two runs touching one patient never overlap, batched runs included (the instance's tag limits).

A batched run over a range of patients has no `dagster/partition` tag; every run our sensors
request carries its bucket's tag instead, and the instances in deploy/ run one run per bucket
value at a time. Here the runs the sensors request are queued on a real instance and put to the
run coordinator's own tag-limit counter, with the limits read from the deployed configurations.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._utils.tags import TagConcurrencyLimitsCounter  # what the QueuedRunCoordinator decides with

from gcmlm_assets import runs
from gcmlm_assets.landing.scan import RunPlan
from gcmlm_assets.definitions import MODALITY_ASSETS
from gcmlm_assets.landing.sensors import batched_run_requests
from gcmlm_assets.partitions import ct_scans_partitions, patients_partitions
from gcmlm_assets.patient_batches import BUCKET_TAG, PATIENTS_TAG, plan_batches

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ORDER = [f"P{i:03d}" for i in range(10)]
BATCH = 4


def _limits(config: str) -> list[dict]:
    instance = yaml.safe_load((DEPLOY / config).read_text(encoding="utf-8"))
    if "concurrency" in instance:
        return instance["concurrency"]["runs"]["tag_concurrency_limits"]
    return instance["run_coordinator"]["config"]["tag_concurrency_limits"]


def _queued(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.DagsterRun:
    tags = dict(request.tags)
    if request.partition_key is not None:
        tags[runs.PARTITION_TAG] = request.partition_key  # as Dagster tags a one-partition run
    # NOT_STARTED: in flight like QUEUED, which the instance accepts only with a code location
    run = dg.DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED,
                        asset_selection=frozenset(request.asset_selection or ()), tags=tags)
    instance.add_run(run)
    return run


@pytest.mark.parametrize("config", ["local/dagster.yaml", "k8s/dagster.yaml"])
def test_a_batched_run_and_a_sensor_run_of_a_patient_in_its_range_never_overlap(instance, config, monkeypatch):
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", str(BATCH))
    instance.add_dynamic_partitions(patients_partitions.name, ORDER)
    instance.add_dynamic_partitions(ct_scans_partitions.name, ORDER)  # each patient's only scan
    # landing_sensor's batch of four new drops (P004-P007): one run over their range
    [batched] = batched_run_requests([RunPlan(p, "radiology", "f") for p in ORDER[4:8]], ORDER, BATCH,
                                     MODALITY_ASSETS)
    assert batched.partition_key is None and runs.PARTITION_TAG not in batched.tags
    # a sensor's one-patient run of P005 (here the predicted-mask kind), and one of P009 in the next bucket
    single, elsewhere = (runs.batch_run_request(batch, BATCH, run_key=f"k{batch.first}",
                                                asset_selection=[dg.AssetKey("ct_mask")], tags={})
                         for batch in plan_batches(ORDER, ["P005", "P009"], BATCH,
                                                   partition_set=ct_scans_partitions.name))
    running = _queued(instance, batched)
    queued = [_queued(instance, single), _queued(instance, elsewhere)]

    counter = TagConcurrencyLimitsCounter(_limits(config), [running])
    assert counter.is_blocked(queued[0])  # P005 waits for the batch over P004-P007 to end
    assert not counter.is_blocked(queued[1])  # another bucket's patient does not
    # ... and the other way round: a queued batch waits for a one-patient run of its bucket
    assert TagConcurrencyLimitsCounter(_limits(config), [queued[0]]).is_blocked(running)

    # predicted_mask_sensor sees the batched run as covering its patients (not just its partition tag)
    assert runs.in_flight_partitions(instance, ["P005", "P006", "P009"], ["ct_image"], ORDER, BATCH,
                                     partition_set=ct_scans_partitions.name) == {"P005", "P006"}
    assert runs.in_flight_partitions(instance, ["P005"], ["ct_image"]) == set()  # without the order: tags only


def test_a_run_that_names_its_patients_covers_only_those(instance):
    instance.add_dynamic_partitions(patients_partitions.name, ORDER)
    [batch] = plan_batches(ORDER, ["P004", "P007"], BATCH, allow_gaps=True)  # as the explanations plan
    request = runs.batch_run_request(batch, BATCH, run_key="k", asset_selection=[dg.AssetKey("ct_mask")], tags={})
    assert request.tags[PATIENTS_TAG] == "P004,P007"
    _queued(instance, request)
    assert runs.in_flight_partitions(instance, ORDER[4:8], ["ct_mask"], ORDER, BATCH) == {"P004", "P007"}


@pytest.mark.parametrize("config", ["local/dagster.yaml", "k8s/dagster.yaml"])
def test_a_bucket_of_ct_scans_is_not_a_bucket_of_patients(instance, config):
    """The radiology assets are partitioned by CT scan, in another order: their buckets carry the set's
    name, so a batch of scans neither waits on nor stands for a batch of patients of the same number."""
    scans = [*ORDER[:4], "P004@2024-01-10", "P004@2024-06-02", *ORDER[5:8]]
    instance.add_dynamic_partitions(patients_partitions.name, ORDER)
    instance.add_dynamic_partitions("ct_scans", scans)
    [scan_batch] = plan_batches(scans, scans[4:7], BATCH, partition_set="ct_scans")
    scan_run = _queued(instance, runs.batch_run_request(scan_batch, BATCH, run_key="scans", tags={},
                                                        asset_selection=[dg.AssetKey("ct_mask")]))
    assert scan_run.tags[BUCKET_TAG] == f"ct_scans:{BATCH}:1"
    [patient_batch] = plan_batches(ORDER, ORDER[4:7], BATCH)
    patient_run = _queued(instance, runs.batch_run_request(patient_batch, BATCH, run_key="patients", tags={},
                                                           asset_selection=[dg.AssetKey("uni_features")]))
    assert patient_run.tags[BUCKET_TAG] == f"{BATCH}:1"
    assert not TagConcurrencyLimitsCounter(_limits(config), [scan_run]).is_blocked(patient_run)
    # The scans' range run covers its scans in the ct_scans order, and is no run of patients' buckets.
    assert runs.in_flight_partitions(instance, scans[4:8], ["ct_mask"], scans, BATCH,
                                     partition_set="ct_scans") == set(scans[4:7])
    assert runs.in_flight_partitions(instance, ORDER[4:8], ["ct_mask"], ORDER, BATCH) == set()
