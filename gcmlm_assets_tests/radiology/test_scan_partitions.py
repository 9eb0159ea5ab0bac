"""The radiology assets per CT scan: each timepoint of a patient is a `ct_scans` partition of its own.

A run over two timepoints of one patient (batched as the sensors batch them) where one timepoint's CT
is broken: only that partition fails, naming the file; the other materializes, from its own
timepoint folder and reference mask, with whose scan it is in its metadata.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from gcmlm_assets import runs
from gcmlm_assets.definitions import MODALITY_ASSETS
from gcmlm_assets.landing_input import LandingInputError
from gcmlm_assets.patient_batches import BUCKET_TAG, bucket_name, plan_batches
from gcmlm_assets.patient_steps import build_patient_steps_sensor
from gcmlm_assets.radiology.assets import ct_image, ct_mask, radiomics_row, scan_metadata
from gcmlm_assets.resources import LandingZone
from gcmlm_assets_tests.support.run_results import metadata_of, step_failure_text

BRANCH = [ct_image, ct_mask, radiomics_row]
BATCH = 8


def timepoint(drop: Path, name: str, ct_files: list[Path], mask: Path | None = None) -> None:
    """A timepoint folder `ct/<name>/` of a drop, and its reference mask in `ct_label/<name>/`."""
    (drop / "ct" / name).mkdir(parents=True)
    for path in ct_files:
        shutil.copy(path, drop / "ct" / name / path.name)
    if mask is not None:
        (drop / "ct_label" / name).mkdir(parents=True)
        shutil.copy(mask, drop / "ct_label" / name / mask.name)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_broken_timepoint_fails_alone_in_a_run_over_the_patients_scans(instance, data_root, radiology_resources,
                                                                        real_ct, real_stomach, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", str(BATCH))
    landing, artifacts = data_root / "landing", data_root / "artifacts"
    drop = landing / "TP001"
    timepoint(drop, "2024-01-15", [real_ct], real_stomach)
    empty = tmp_path / "ct.nii.gz"
    empty.write_bytes(b"")
    timepoint(drop, "2024-04-20", [empty])
    (drop / "READY").write_text("")
    good, broken = "TP001@2024-01-15", "TP001@2024-04-20"
    instance.add_dynamic_partitions("ct_scans", [good, broken])
    steps = build_patient_steps_sensor("radiology_steps_sensor", MODALITY_ASSETS["radiology"], runs.RADIOLOGY, 10)
    with dg.build_sensor_context(instance=instance) as context:
        cursor = steps(context).cursor  # its first tick, before any run

    # One run of ct_image over both scans, batched in the ct_scans order with a bucket of its own.
    [batch] = plan_batches([good, broken], [good, broken], BATCH, partition_set="ct_scans")
    request = runs.batch_run_request(batch, BATCH, run_key="scans", asset_selection=[dg.AssetKey("ct_image")],
                                     tags={})
    assert request.tags[BUCKET_TAG] == "ct_scans:8:0" != bucket_name(0, BATCH)  # never a patients bucket's
    result = dg.materialize(BRANCH, instance=instance, resources=radiology_resources,
                            selection=request.asset_selection, tags=request.tags, raise_on_error=False)

    assert not result.success  # red, naming the broken timepoint and its file only
    message = step_failure_text(result, "ct_image")
    assert "1 of 2 patients failed" in message
    assert broken in message and str(drop / "ct" / "2024-04-20" / "ct.nii.gz") in message
    assert "file is empty (0 bytes)" in message and good not in message
    assert instance.get_materialized_partitions(dg.AssetKey("ct_image")) == {good}
    status = instance.get_status_by_partition(dg.AssetKey("ct_image"), [good, broken],
                                              dg.DynamicPartitionsDefinition(name="ct_scans"))
    assert {key: str(value.value) for key, value in status.items()} == {good: "MATERIALIZED", broken: "FAILED"}
    assert files_under(artifacts / "ct_image" / broken) == []
    [record] = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("ct_image"), asset_partitions=[good]), limit=1).records
    meta = record.asset_materialization.metadata
    assert (meta["patient_id"].value, meta["timepoint"].value, meta["scan_date"].value) == (
        "TP001", "2024-01-15", "2024-01-15")
    assert meta["input_folder"].value == str(drop / "ct" / "2024-01-15")
    assert (artifacts / "ct_image" / good / "ct.nii.gz").is_file()

    # The steps sensor carries the good timepoint on (in the ct_scans order and buckets), not the broken one.
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        [request] = steps(context).run_requests
    assert request.partition_key == good and request.tags[BUCKET_TAG] == "ct_scans:8:0"
    assert request.asset_selection[0] == dg.AssetKey("ct_mask")
    # Its mask is the reference of its own folder in ct_label/.
    result = dg.materialize(BRANCH, instance=instance, resources=radiology_resources, partition_key=good,
                            selection=[ct_mask], tags=request.tags, raise_on_error=False)
    assert result.success, step_failure_text(result, "ct_mask")
    mask_meta = metadata_of(result, "ct_mask")
    assert mask_meta["source"] == "reference"
    assert mask_meta["reference_file"] == str(drop / "ct_label" / "2024-01-15" / real_stomach.name)
    assert files_under(artifacts / "ct_mask" / good) == ["_manifest.json", "mask.nii.gz", "mask_overlay.png"]


def test_scan_metadata_names_the_patient_timepoint_and_date():
    assert scan_metadata("P001") == {"patient_id": "P001", "timepoint": "only scan"}
    assert scan_metadata("P001@baseline") == {"patient_id": "P001", "timepoint": "baseline"}
    assert scan_metadata("P001@2024-03-15") == {"patient_id": "P001", "timepoint": "2024-03-15",
                                                 "scan_date": "2024-03-15"}


def test_links_are_refused_on_the_scans_own_folders_only(tmp_path):
    landing, outside = tmp_path / "landing", tmp_path / "outside"
    (outside / "2024-01-15").mkdir(parents=True)
    zone = LandingZone(root=str(landing))
    # ct/ itself a link leading outside: its timepoint folder lies outside too, and is refused.
    (landing / "P1").mkdir(parents=True)
    os.symlink(outside, landing / "P1" / "ct")
    with pytest.raises(LandingInputError, match="P1/ct"):
        zone.refuse_links_leaving("P1", "ct/2024-01-15")
    # A link leaving in another timepoint's folder is that scan's problem, not this one's.
    (landing / "P2" / "ct" / "2024-01-15").mkdir(parents=True)
    (landing / "P2" / "ct" / "2024-06-01").mkdir(parents=True)
    os.symlink(outside / "2024-01-15", landing / "P2" / "ct" / "2024-06-01" / "series")
    zone.refuse_links_leaving("P2", "ct/2024-01-15", "ct_label/2024-01-15")
    with pytest.raises(LandingInputError, match="2024-06-01/series"):
        zone.refuse_links_leaving("P2", "ct/2024-06-01", "ct_label/2024-06-01")


def test_the_artifact_store_keeps_a_folder_per_scan_and_refuses_a_bad_key(tmp_path):
    from gcmlm_assets.patients import InvalidPatientId
    from gcmlm_assets.scans import InvalidScanKey
    from gcmlm_assets.storage import ArtifactStore

    store = ArtifactStore(tmp_path)
    assert store.asset_dir("ct_image", "P001") == tmp_path.resolve() / "ct_image" / "P001"
    assert store.asset_dir("ct_image", "P001@2024-05-01") == tmp_path.resolve() / "ct_image" / "P001@2024-05-01"
    with pytest.raises(InvalidScanKey, match=r"'2024-13-01' is not a calendar date \(artifact folder of ct_image\)"):
        store.asset_dir("ct_image", "P001@2024-13-01")
    with pytest.raises(InvalidPatientId):
        store.asset_dir("ct_image", "../P001")
