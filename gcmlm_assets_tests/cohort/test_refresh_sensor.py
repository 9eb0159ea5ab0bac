"""cohort_refresh_sensor over a real instance with a long history: it refreshes after every change
of what the cohort reads, never without one, whatever the number of runs before.

The history is written as Dagster's own events (runs, run ends, planned and recorded
materializations), so the sensor's queries see what a daemon's instance holds after thousands of
runs, without running them.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import AssetMaterializationPlannedData, DagsterEvent, DagsterEventType
from dagster._core.events.log import EventLogEntry

from gcmlm_assets import runs
from gcmlm_assets.definitions import build_definitions
from gcmlm_assets.patient_steps import patients_in_between

JOB = "__ASSET_JOB"
HOUR = 3600.0


def _store(instance: dg.DagsterInstance, run_id: str, event: DagsterEvent, timestamp: float) -> None:
    instance.event_log_storage.store_event(EventLogEntry(
        error_info=None, level="DEBUG", user_message="", run_id=run_id, timestamp=timestamp,
        job_name=JOB, dagster_event=event))


def add_run(instance: dg.DagsterInstance, *, status: dg.DagsterRunStatus = dg.DagsterRunStatus.SUCCESS,
            plans: tuple[str, str] | None = None, materializes: bool = False, ended_at: float | None = None,
            tags: dict | None = None, events: bool = True) -> str:
    """A run as the history holds it: optionally planning (and recording) one asset partition, and
    its end event when it ended (`events=False`: the run's record only, for a cheap long history;
    SQLite keeps each run's events in a file of its own)."""
    run_id = str(uuid.uuid4())
    selection = frozenset({dg.AssetKey(plans[0])}) if plans else None
    instance.add_run(dg.DagsterRun(job_name=JOB, run_id=run_id, status=status, tags=tags or {},
                                   asset_selection=selection))
    if not events:
        return run_id
    when = time.time() - HOUR if ended_at is None else ended_at
    if plans is not None:
        asset, partition = plans
        _store(instance, run_id, DagsterEvent.build_asset_materialization_planned_event(
            JOB, "step", AssetMaterializationPlannedData(dg.AssetKey(asset), partition=partition)), when - 1)
        if materializes:
            _store(instance, run_id, DagsterEvent(
                event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value, job_name=JOB, step_key="step",
                event_specific_data=_materialization_data(asset, partition)), when - 0.5)
    end = {dg.DagsterRunStatus.SUCCESS: DagsterEventType.RUN_SUCCESS,
           dg.DagsterRunStatus.FAILURE: DagsterEventType.RUN_FAILURE,
           dg.DagsterRunStatus.CANCELED: DagsterEventType.RUN_CANCELED}.get(status)
    if end is not None:
        _store(instance, run_id, DagsterEvent(event_type_value=end.value, job_name=JOB), when)
    return run_id


def _materialization_data(asset: str, partition: str):
    from dagster._core.events import StepMaterializationData

    return StepMaterializationData(dg.AssetMaterialization(asset_key=asset, partition=partition))


class RefreshTicker:
    """Evaluates the real definitions' cohort_refresh_sensor as the daemon does, cursor carried over."""

    def __init__(self, instance: dg.DagsterInstance):
        self.defs = build_definitions(profile="demo")
        self.sensor = self.defs.get_sensor_def("cohort_refresh_sensor")
        self.instance, self.cursor = instance, None

    def tick(self):
        resources = self.defs.resources
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources={k: resources[k] for k in ("landing", "storage", "segmentation",
                                                                          "automation")}) as context:
            result = self.sensor(context)
        if isinstance(result, dg.SensorResult) and result.run_requests:
            self.cursor = result.cursor
            return result.run_requests
        return getattr(result, "skip_message", None) or getattr(result, "skip_reason", None) or result


@pytest.fixture
def ticker(instance, data_root: Path) -> RefreshTicker:
    (data_root / "landing" / "clinical.csv").write_text("patient_id,mlm\nGC0001,1\nGC0002,0\n")
    return RefreshTicker(instance)


def test_refresh_decision_is_right_after_thousands_of_runs(instance, ticker):
    add_run(instance, plans=("radiomics_row", "GC0001"), materializes=True, tags=runs.work_tags(runs.RADIOLOGY))
    add_run(instance, plans=("slide_vector", "GC0001"), materializes=True, tags=runs.work_tags(runs.PATHOLOGY))
    first = ticker.tick()
    assert isinstance(first, list) and len(first) == 1, first
    assert first[0].tags[runs.WORK_TAG] == runs.COHORT

    # thousands of runs that touch nothing the cohort reads (explanations, CT-only re-runs): no refresh
    # (more than the 2,000 newest runs the sensor once looked back over, after which it lost track)
    for i in range(2500):
        add_run(instance, plans=("risk_explanations", f"GC{i:04d}"), tags=runs.work_tags(runs.EXPLANATIONS),
                events=i >= 2490)
    for i in range(20):
        add_run(instance, plans=("ct_image", f"GC{i:04d}"), status=dg.DagsterRunStatus.FAILURE)
    assert "nothing changed" in str(ticker.tick())

    # a new patient's features after all that history: refreshed once, then nothing
    add_run(instance, plans=("radiomics_row", "GC0002"), materializes=True, tags=runs.work_tags(runs.RADIOLOGY))
    assert len(ticker.tick()) == 1
    assert "nothing changed" in str(ticker.tick())

    # a failed later attempt changes what fused_table may use (the patient is left out): a refresh
    add_run(instance, plans=("slide_vector", "GC0001"), status=dg.DagsterRunStatus.FAILURE)
    assert len(ticker.tick()) == 1

    # clinical.csv edited: a refresh
    csv = Path(ticker.defs.resources["landing"].path()) / "clinical.csv"
    csv.write_text("patient_id,mlm\nGC0001,1\nGC0002,1\n")
    assert len(ticker.tick()) == 1
    assert "nothing changed" in str(ticker.tick())


def test_refresh_waits_for_runs_in_flight_and_for_the_quiet_period(instance, ticker):
    add_run(instance, plans=("radiomics_row", "GC0001"), materializes=True)
    running = add_run(instance, status=dg.DagsterRunStatus.STARTED, tags=runs.work_tags(runs.PATHOLOGY))
    assert "1 queued or running" in str(ticker.tick())
    instance.delete_run(running)
    add_run(instance, ended_at=time.time())  # a run that ended just now
    assert "without finished runs" in str(ticker.tick())


def test_in_flight_counts_and_partitions_load_only_what_they_ask_for(instance):
    for i in range(30):
        add_run(instance, status=dg.DagsterRunStatus.NOT_STARTED, tags=runs.work_tags(runs.EXPLANATIONS))
    add_run(instance, status=dg.DagsterRunStatus.STARTING, tags=runs.work_tags(runs.RADIOLOGY))
    add_run(instance, status=dg.DagsterRunStatus.STARTED)  # launched by hand: may be anything
    assert runs.in_flight_count(instance) == 32
    assert runs.in_flight_doing(instance, [runs.RADIOLOGY, runs.TRAINING]) == 2
    assert runs.in_flight_doing(instance, [runs.TRAINING]) == 1

    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name=JOB, run_id=run_id, status=dg.DagsterRunStatus.STARTED,
                                   asset_selection=frozenset({dg.AssetKey("ct_image"), dg.AssetKey("ct_mask")}),
                                   tags={runs.PARTITION_TAG: "GC0007"}))
    other = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name=JOB, run_id=other, status=dg.DagsterRunStatus.NOT_STARTED,
                                   asset_selection=frozenset({dg.AssetKey("patch_coords")}),
                                   tags={runs.PARTITION_TAG: "GC0008"}))
    assert runs.in_flight_partitions(instance, ["GC0007", "GC0008", "GC0009"], ["ct_mask"]) == {"GC0007"}


def test_refresh_waits_for_patients_between_two_batched_runs(instance, ticker):
    add_run(instance, plans=("slide_vector", "GC0001"), materializes=True, tags=runs.work_tags(runs.PATHOLOGY))
    # GC0002's uni_features came from a batched run; its slide_vector is not yet requested
    add_run(instance, plans=("uni_features", "GC0002"), materializes=True, tags=runs.work_tags(runs.PATHOLOGY))
    assert "1 patient(s) between two batched runs" in str(ticker.tick())
    # the steps sensor's run plans its slide_vector (and then ends): the refresh goes ahead
    add_run(instance, plans=("slide_vector", "GC0002"), materializes=True, tags=runs.work_tags(runs.PATHOLOGY))
    assert len(ticker.tick()) == 1


def test_a_run_of_a_whole_chain_leaves_no_patient_between(instance, ticker):
    # one run plans slide_vector before it materializes uni_features, then slide_vector
    run_id = add_run(instance, tags=runs.work_tags(runs.PATHOLOGY), events=False)
    when = time.time() - HOUR
    _store(instance, run_id, DagsterEvent.build_asset_materialization_planned_event(
        JOB, "step", AssetMaterializationPlannedData(dg.AssetKey("slide_vector"), partition="GC0001")), when - 2)
    for offset, asset in ((1.5, "uni_features"), (1, "slide_vector")):
        _store(instance, run_id, DagsterEvent(
            event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value, job_name=JOB, step_key="step",
            event_specific_data=_materialization_data(asset, "GC0001")), when - offset)
    _store(instance, run_id, DagsterEvent(event_type_value=DagsterEventType.RUN_SUCCESS.value, job_name=JOB), when)
    chain = [dg.AssetKey("uni_features"), dg.AssetKey("slide_vector")]
    assert patients_in_between(instance, [chain]) == set()
    assert len(ticker.tick()) == 1
