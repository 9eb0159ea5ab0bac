"""The platform runs itself: the real `dagster-daemon` over the real definitions (demo profile) takes
a landing zone of 8 patients to risk scores with no run launched by the test.

Four patients have no reference mask: their ct_mask waits (skipped, not failed) until
segmentation_training_sensor has trained the tiny nnU-Net on the other four, then
predicted_mask_sensor predicts them. Two drops are broken on purpose: GC0004's CT is a DICOM
series with a truncated slice, GC0003's slide has zero bytes. Those two fail with their reasons,
the others complete, and the cohort refresh scores everyone that has features. Once the test
fixes the two drops (files replaced, READY touched), only those two patients run again.
"""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from gcmlm_assets import runs
from gcmlm_assets.catalogue import ASSETS
from gcmlm_assets.cohort.exchange import fhir_risk
from gcmlm_assets.demo.synthetic import write_cohort
from gcmlm_assets.demo.synthetic_plan import CohortSpec, plan_cohort
from gcmlm_assets.demo.daemon import prepare_dagster_home, start_daemon
from gcmlm_assets.demo.watch import failed_runs, wait_until_settled
from gcmlm_assets.partitions import ct_scans_partitions, patients_partitions
from gcmlm_assets.profiles import PROFILE_ENV

N_PATIENTS = 8
BROKEN_CT, BROKEN_SLIDE = "GC0004", "GC0003"
BROKEN_SLICE = "IM00006.dcm"  # of GC0004's DICOM series (demo/synthetic_dicom.py)
SENSOR_TAG, PARTITION_TAG = "dagster/sensor_name", "dagster/partition"


EXPLANATIONS_SENSOR = "risk_explanations_sensor"
# What follows each new explanation (a new model re-explains everyone): not a run of patients' data.
AFTER_EXPLANATIONS = (EXPLANATIONS_SENSOR, "qupath_geojson_after_risk_explanations_sensor")


def partition_set_of(run: dg.DagsterRun) -> str:
    """The partition set a run's partition (or range) is of: `ct_scans` for the radiology assets'."""
    selected = {key.to_user_string() for key in (run.asset_selection or ())}
    per_scan = any(ASSETS[key].per_scan for key in selected if key in ASSETS)
    return ct_scans_partitions.name if per_scan else patients_partitions.name


def run_partitions(instance: dg.DagsterInstance) -> list[tuple[object, str, set[str]]]:
    """(run record, its partition set, the partitions it works on) of every run of one partition or
    a batch's range (each patient in this cohort has one CT scan, keyed by its patient id)."""
    orders = {name: list(instance.get_dynamic_partitions(name))
              for name in (patients_partitions.name, ct_scans_partitions.name)}
    positions = {name: {p: i for i, p in enumerate(order)} for name, order in orders.items()}
    found = []
    for record in instance.get_run_records():
        tags, partition_set = record.dagster_run.tags, partition_set_of(record.dagster_run)
        if PARTITION_TAG in tags:
            found.append((record, partition_set, {tags[PARTITION_TAG]}))
        elif runs.RANGE_START_TAG in tags:
            found.append((record, partition_set, runs.range_run_patients(tags, orders[partition_set],
                                                                         positions[partition_set])))
    return found


def patient_runs_since(instance: dg.DagsterInstance, since: float) -> dict[str, set[str]]:
    """{run id: its patients} of the runs of patients' data since `since` (one patient's, or a
    batch's range; not the explanations each new risk_scores asks for, nor their GeoJSON)."""
    return {record.dagster_run.run_id: partitions for record, _, partitions in run_partitions(instance)
            if record.create_timestamp.timestamp() >= since
            and record.dagster_run.tags.get(SENSOR_TAG) not in AFTER_EXPLANATIONS}


def explained_since(instance: dg.DagsterInstance, since: float) -> set[str]:
    """Patients whose risk_explanations was materialized since `since`."""
    records = instance.fetch_materializations(dg.AssetKey("risk_explanations"), limit=1000).records
    return {r.partition_key for r in records if r.timestamp >= since}


def scored_explanation_keys(instance: dg.DagsterInstance) -> dict[str, str]:
    """patient -> the explanation key its latest risk score names."""
    event = instance.get_latest_materialization_event(dg.AssetKey("risk_scores"))
    assert event is not None, "risk_scores was never materialized"
    table = pq.read_table(event.asset_materialization.metadata["path"].value, columns=["patient_id", "explanation_key"])
    return dict(zip(table.column("patient_id").to_pylist(), table.column("explanation_key").to_pylist()))


def latest_ct_mask_source(instance: dg.DagsterInstance, patient_id: str) -> str:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("ct_mask"), asset_partitions=[patient_id]), limit=1).records
    return records[0].asset_materialization.metadata["source"].value if records else "none"


def dicom_results_written(instance: dg.DagsterInstance, patient_id: str) -> tuple[str, str]:
    """What the patient's latest ct_mask_seg and radiomics_sr say of their file ("written", "none", or
    "missing" before the first)."""
    said = []
    for asset, key in (("ct_mask_seg", "seg"), ("radiomics_sr", "sr")):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[patient_id]), limit=1).records
        said.append(records[0].asset_materialization.metadata[key].value if records else "missing")
    return said[0], said[1]


def geojson_tiles_with_values(instance: dg.DagsterInstance, patient_id: str) -> int:
    """How many patch tiles of the patient's latest qupath_geojson carry values (-1 before the first)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("qupath_geojson"), asset_partitions=[patient_id]), limit=1).records
    return records[0].asset_materialization.metadata["tiles_with_values"].value if records else -1


def assessed_patients(instance: dg.DagsterInstance) -> set[str]:
    """The patients of the latest risk_assessments, each Bundle read back with fhir.resources."""
    event = instance.get_latest_materialization_event(dg.AssetKey("risk_assessments"))
    assert event is not None, "risk_assessments was never materialized"
    index_path = Path(event.asset_materialization.metadata["path"].value)
    index = fhir_risk.read_index(index_path)
    for entry in index["patients"].values():
        fhir_risk.read_bundle(index_path.parent / entry["file"])
    return set(index["patients"])


def overlapping_runs_of_one_patient(instance: dg.DagsterInstance) -> list[tuple[str, str, str]]:
    """(partition, run, run) for every two runs touching one partition of one set (its own run, or a
    batch over a range that holds it) whose run times overlap. A patient's radiology (its CT scan's
    partition) and its pathology (its patient partition) touch no common asset and may overlap."""
    by_partition: dict[tuple[str, str], list] = {}
    for record, partition_set, partitions in run_partitions(instance):
        if record.start_time is None:
            continue
        for partition in partitions:
            by_partition.setdefault((partition_set, partition), []).append(record)
    overlaps = []
    for (_, patient_id), records in by_partition.items():
        records.sort(key=lambda r: r.start_time)
        for earlier, later in zip(records, records[1:]):
            if earlier.end_time is None or later.start_time < earlier.end_time:
                overlaps.append((patient_id, earlier.dagster_run.run_id, later.dagster_run.run_id))
    return overlaps


def modalities_used(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """patient -> the modalities its latest risk score used."""
    event = instance.get_latest_materialization_event(dg.AssetKey("risk_scores"))
    assert event is not None, "risk_scores was never materialized"
    table = pq.read_table(event.asset_materialization.metadata["path"].value)
    return {row["patient_id"]: set(row["modalities_used"].split("+")) for row in table.to_pylist()}


def alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def break_drops(landing: Path) -> tuple[bytes, bytes]:
    """GC0004's DICOM series gets one truncated slice; GC0003's first slide 0 bytes. Returns what
    the fix puts back: the slice's bytes and the slide's bytes."""
    broken_slice = landing / BROKEN_CT / "ct" / BROKEN_SLICE
    ct_bytes = broken_slice.read_bytes()
    broken_slice.write_bytes(ct_bytes[: len(ct_bytes) // 3])
    slide = sorted((landing / BROKEN_SLIDE / "wsi").iterdir())[0]
    slide_bytes = slide.read_bytes()
    slide.write_bytes(b"")
    return ct_bytes, slide_bytes


def fix_drops(landing: Path, ct_bytes: bytes, slide_bytes: bytes) -> None:
    """What an uploader does: replace the files, then touch READY (the commit point)."""
    (landing / BROKEN_CT / "ct" / BROKEN_SLICE).write_bytes(ct_bytes)
    slide = sorted((landing / BROKEN_SLIDE / "wsi").iterdir())[0]
    slide.write_bytes(slide_bytes)
    for patient_id in (BROKEN_CT, BROKEN_SLIDE):
        (landing / patient_id / "READY").touch()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_daemon_takes_drops_to_risk_scores_and_reruns_only_fixed_patients(tmp_path, monkeypatch):
    root = tmp_path / "data"
    landing, home = root / "landing", root / "dagster_home"
    monkeypatch.setenv("GCMLM_DATA_ROOT", str(root))
    for name in ("GCMLM_LANDING_ROOT", "GCMLM_ARTIFACTS_ROOT", "GCMLM_NNUNET_MODEL_FOLDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(prepare_dagster_home(home)))
    monkeypatch.setenv(PROFILE_ENV, "demo")

    spec = CohortSpec.small(N_PATIENTS)
    plans = {plan.patient_id: plan for plan in plan_cohort(spec)}
    assert not plans[BROKEN_CT].has_reference_mask and not plans[BROKEN_SLIDE].has_reference_mask
    write_cohort(landing, spec)
    ct_bytes, slide_bytes = break_drops(landing)
    patients = sorted(plans)

    daemon = start_daemon(home, home / "daemon.log")
    try:
        with dg.DagsterInstance.get() as instance:
            log: list[str] = []
            assert wait_until_settled(instance, since=0.0, timeout_s=1200, say=log.append, alive=daemon.alive,
                                      min_wait_s=30), "\n".join(log) + "\n" + daemon.log_tail()
            all_runs = instance.get_runs()
            # Every run was launched by a sensor of the definitions (or is a retry of one): none by the test.
            assert all(SENSOR_TAG in run.tags or "dagster/parent_run_id" in run.tags for run in all_runs)
            assert {run.tags.get(SENSOR_TAG) for run in all_runs} >= {
                "landing_sensor", "segmentation_training_sensor", "predicted_mask_sensor", "cohort_refresh_sensor",
                EXPLANATIONS_SENSOR}
            assert len([r for r in all_runs if r.tags.get(SENSOR_TAG) == "segmentation_training_sensor"]) == 1
            # The eight drops came in batches: one run per asset of each chain for all of them (plus
            # one-patient reruns), run one after the other by the queue's per-partition and per-bucket
            # limits, never two touching one patient at once.
            batched = [r for r in all_runs if runs.RANGE_START_TAG in r.tags and r.tags.get(SENSOR_TAG) in (
                "landing_sensor", "radiology_steps_sensor", "pathology_steps_sensor")]
            assert {r.tags[SENSOR_TAG] for r in batched} == {"landing_sensor", "radiology_steps_sensor",
                                                              "pathology_steps_sensor"}
            assert overlapping_runs_of_one_patient(instance) == []

            # The two broken drops failed once each, with the file and the problem named.
            failures = {partition: reasons for partition, _, reasons in failed_runs(instance)}
            assert set(failures) == {BROKEN_CT, BROKEN_SLIDE}, failures
            assert any(r.startswith("ct_image") and f"{BROKEN_SLICE}: damaged or truncated" in r
                       for r in failures[BROKEN_CT]), failures
            assert any(r.startswith("patch_coords") and "GC0003_slide1.tiff" in r and "empty" in r
                       for r in failures[BROKEN_SLIDE]), failures

            # Masks: reference where the drop has one, predicted by the trained model elsewhere.
            for pid in patients:
                expected = "reference" if plans[pid].has_reference_mask else "predicted"
                assert latest_ct_mask_source(instance, pid) == ("none" if pid == BROKEN_CT else expected), pid
            # Everyone with features is scored, the broken modality left out.
            used = modalities_used(instance)
            assert sorted(used) == patients, "\n".join(log)
            assert used[BROKEN_CT] == {"pathology"} and used[BROKEN_SLIDE] == {"radiology"}
            assert all(used[pid] == {"radiology", "pathology"} for pid in patients
                       if pid not in (BROKEN_CT, BROKEN_SLIDE))
            # ... and every scored patient's score is explained, after the scores it explains.
            assert explained_since(instance, 0.0) == set(patients)
            keys_before = scored_explanation_keys(instance)

            # The uploader fixes both drops; only those two patients run again.
            fixed_at = time.time()
            fix_drops(landing, ct_bytes, slide_bytes)
            log.clear()
            assert wait_until_settled(instance, since=fixed_at, timeout_s=600, say=log.append,
                                      alive=daemon.alive), "\n".join(log) + "\n" + daemon.log_tail()
            rerun = patient_runs_since(instance, fixed_at)
            assert set().union(*rerun.values()) == {BROKEN_CT, BROKEN_SLIDE}
            assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in instance.get_runs(
                filters=dg.RunsFilter(run_ids=list(rerun))))
            assert latest_ct_mask_source(instance, BROKEN_CT) == "predicted"
            # Every patient's mask and features went back as a DICOM SEG and SR of its CT series.
            assert {pid: dicom_results_written(instance, pid) for pid in patients} == {
                pid: ("written", "written") for pid in patients}
            used = modalities_used(instance)
            assert sorted(used) == patients and all(used[pid] == {"radiology", "pathology"} for pid in patients)
            # ...each slide's QuPath GeoJSON carries the explanation's patch values, and each score is
            # a FHIR RiskAssessment.
            assert {pid: geojson_tiles_with_values(instance, pid) > 0 for pid in patients} == {
                pid: True for pid in patients}
            assert assessed_patients(instance) == set(patients)
            # Explained again: exactly the patients whose explanation key changed (the two fixed ones,
            # and everyone if the model changed); the others keep their explanation, with no run.
            keys_after = scored_explanation_keys(instance)
            rekeyed = {pid for pid in patients if keys_after[pid] != keys_before.get(pid)}
            assert {BROKEN_CT, BROKEN_SLIDE} <= rekeyed
            assert explained_since(instance, fixed_at) == rekeyed
            assert overlapping_runs_of_one_patient(instance) == []

            # Settled means settled: the sensors' next ticks request nothing.
            runs_before = len(instance.get_runs())
            time.sleep(35)
            assert len(instance.get_runs()) == runs_before
    finally:
        family = daemon.family()
        daemon.stop()
    # The daemon, its code server and every run worker are gone.
    assert not [proc for proc in family if alive(proc)]
