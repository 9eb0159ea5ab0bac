"""Batched runs from the sensors, on a real instance with the real radiology assets.

A landing tick of several patients is one run of ct_image over their range of CT scans (`ct_scans`,
one per drop here: a drop's only scan is keyed by its patient id); radiology_steps_sensor
then carries the patients it materialized on to ct_mask, radiomics_row, ct_mask_seg and
radiomics_sr, one run per asset and bucket. Each patient's results, checks and failures stay its
own: a bad CT fails its patient (the run is red and names it), and the patient goes no further;
the others go on.
"""

from __future__ import annotations

import dagster as dg
import SimpleITK as sitk

from gcmlm_assets import runs
from gcmlm_assets.definitions import MODALITY_ASSETS
from gcmlm_assets.partitions import ct_scans_partitions
from gcmlm_assets.patient_batches import BUCKET_TAG, PATIENTS_TAG
from gcmlm_assets.patient_steps import build_patient_steps_sensor
from gcmlm_assets.radiology import assets, dicom_assets
from gcmlm_assets.radiology.segmentation_model import segmentation_model
from gcmlm_assets_tests.support.landing.drops import Ticker
from gcmlm_assets_tests.support.radiology.ct import make_drop

BATCH = 8
GOOD = ["TS001", "TS002", "TS003"]


def _patients(request: dg.RunRequest, order: list[str]) -> list[str]:
    if request.partition_key is not None:
        return [request.partition_key]
    span = order[order.index(request.tags[runs.RANGE_START_TAG]):order.index(request.tags[runs.RANGE_END_TAG]) + 1]
    named = request.tags.get(PATIENTS_TAG)
    return span if named is None else [p for p in span if p in named.split(",")]


def _execute(instance, resources, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    return dg.materialize([*assets.ASSETS, *dicom_assets.ASSETS, segmentation_model], instance=instance,
                          resources=resources, selection=request.asset_selection, partition_key=request.partition_key,
                          tags=request.tags, raise_on_error=False)


def _checked_patients(instance, run_id: str, evaluated: bool = True) -> dict[str, set[str]]:
    """{patient: names of the checks evaluated for it} in a run (evaluated=False: the checks recorded
    as not evaluated because the patient failed, batching.py)."""
    found: dict[str, set[str]] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.asset_check_evaluation_data
        if ("evaluated" not in evaluation.metadata) == evaluated:
            found.setdefault(evaluation.partition, set()).add(evaluation.check_name)
    return found


def test_a_landing_batch_goes_through_the_chain_patient_by_patient(instance, data_root, radiology_resources,
                                                                   real_ct, real_stomach, tmp_path, monkeypatch):
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", str(BATCH))
    landing = data_root / "landing"
    for patient_id in GOOD:
        make_drop(landing, patient_id, [real_ct], real_stomach)
    zero = make_drop(landing, "ZERO")
    (zero / "ct" / "ct.nii.gz").write_bytes(b"")  # fails ct_image
    far = sitk.ReadImage(str(real_stomach))
    far.SetOrigin(tuple(o + 1000.0 for o in far.GetOrigin()))
    sitk.WriteImage(far, str(tmp_path / "far_mask.nii.gz"))
    make_drop(landing, "FAR", [real_ct], tmp_path / "far_mask.nii.gz")  # fails ct_mask

    steps = build_patient_steps_sensor("radiology_steps_sensor", MODALITY_ASSETS["radiology"], runs.RADIOLOGY, 10)
    cursor = None

    def step_tick() -> dg.SensorResult:
        nonlocal cursor
        with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
            result = steps(context)
        cursor = result.cursor
        return result

    assert not step_tick().run_requests  # the daemon ticks it before any drop

    # One landing tick: one run of ct_image over the five new scans, tagged with their bucket of scans.
    [request] = Ticker(instance, landing).tick().run_requests
    order = list(instance.get_dynamic_partitions(ct_scans_partitions.name))
    assert sorted(order) == sorted([*GOOD, "ZERO", "FAR"])
    assert request.asset_selection == [dg.AssetKey("ct_image")] and request.partition_key is None
    assert _patients(request, order) == order and PATIENTS_TAG not in request.tags
    assert request.tags[BUCKET_TAG] == f"ct_scans:{BATCH}:0" and request.tags[runs.WORK_TAG] == runs.RADIOLOGY
    result = _execute(instance, radiology_resources, request)
    assert not result.success  # red, naming the bad patient only
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "1 of 5 patients failed" in failure.step_failure_data.error.message
    assert "ZERO" in failure.step_failure_data.error.message
    assert instance.get_materialized_partitions(dg.AssetKey("ct_image")) == {*GOOD, "FAR"}
    status = instance.get_status_by_partition(dg.AssetKey("ct_image"), order, ct_scans_partitions)
    assert {p for p, s in status.items() if str(s.value) == "FAILED"} == {"ZERO"}
    assert set(_checked_patients(instance, result.run_id)) == {*GOOD, "FAR"}
    assert set(_checked_patients(instance, result.run_id, evaluated=False)) == {"ZERO"}  # named, not checked

    # The steps sensor: ct_mask for the four whose CT is good, one run, the bad one left out.
    [request] = step_tick().run_requests
    assert request.asset_selection == [dg.AssetKey("ct_mask")] and request.tags[BUCKET_TAG] == f"ct_scans:{BATCH}:0"
    assert sorted(_patients(request, order)) == sorted([*GOOD, "FAR"])
    result = _execute(instance, radiology_resources, request)
    assert not result.success
    assert instance.get_materialized_partitions(dg.AssetKey("ct_mask")) == set(GOOD)
    for patient_id in GOOD:  # each patient's own materialization, metadata and checks
        [record] = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("ct_mask"), asset_partitions=[patient_id]), limit=1).records
        assert f"/ct_mask/{patient_id}/" in record.asset_materialization.metadata["path"].value
    checked = _checked_patients(instance, result.run_id)
    assert set(checked) == set(GOOD) and all("mask_not_empty" in names for names in checked.values()), checked
    assert set(_checked_patients(instance, result.run_id, evaluated=False)) == {"FAR"}

    # radiomics_row, then the SEG and SR (none: NIfTI CTs), for the three whose mask is good; then
    # nothing is left to carry on.
    for asset in ("radiomics_row", "ct_mask_seg", "radiomics_sr"):
        [request] = step_tick().run_requests
        assert request.asset_selection == [dg.AssetKey(asset)]
        assert sorted(_patients(request, order)) == GOOD
        result = _execute(instance, radiology_resources, request)
        assert result.success
        assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(GOOD)
        assert set(_checked_patients(instance, result.run_id)) == set(GOOD)
    result = step_tick()
    assert not result.run_requests and "nothing to carry on" in result.skip_reason.skip_message
