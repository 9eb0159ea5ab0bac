"""ct_mask_seg and radiomics_sr through Dagster: a real instance, the real CT as a DICOM series, real
highdicom files read back; a NIfTI drop says why it has neither; a shifted mask fails by name."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pydicom
import SimpleITK as sitk

from gcmlm_assets.catalogue import MASK_SEG_FILE, MASK_VOLUME, RADIOMICS_SR_FILE, RADIOMICS_TABLE
from gcmlm_assets.radiology import ct_io, dicom_seg, dicom_sr
from gcmlm_assets.radiology.assets import ct_image, ct_mask, radiomics_row
from gcmlm_assets.radiology.dicom_assets import ct_mask_seg, radiomics_sr
from gcmlm_assets.radiology.resources import RadiomicsSettings
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.radiology.ct import ct_crop, write_dicom_series
from gcmlm_assets_tests.support.radiology.dicom_results import SERIES_TAGS, ball_mask
from gcmlm_assets_tests.support.run_results import metadata_of, step_failure_text

CHAIN = [ct_image, ct_mask, radiomics_row, ct_mask_seg, radiomics_sr]
DATA_ASSETS = ("ct_image", "ct_mask", "radiomics_row", "ct_mask_seg", "radiomics_sr")
# The ball mask is a few millilitres of whatever lies in the middle of the crop: the stomach's
# plausibility limits are not what these tests are about.
LENIENT = RadiomicsSettings(mask_volume_min_ml=0.1, mask_volume_max_ml=5000.0, mask_bone_fraction_max=1.0,
                            mask_outside_air_fraction_max=1.0)


def _drop(landing: Path, patient_id: str, real_ct: Path, *, as_dicom: bool) -> Path:
    """`ct/` as a DICOM series or one NIfTI file, `ct_label/` a ball mask on the canonical grid, READY."""
    folder = landing / patient_id / "ct"
    crop = ct_crop(real_ct)
    if as_dicom:
        write_dicom_series(crop, folder, tags=SERIES_TAGS)
    else:
        folder.mkdir(parents=True)
        sitk.WriteImage(sitk.Cast(crop, sitk.sitkInt16), str(folder / "ct.nii.gz"))
    canonical, _ = ct_io.load_ct(folder)
    (folder.parent / "ct_label").mkdir()
    sitk.WriteImage(ball_mask(canonical), str(folder.parent / "ct_label" / "stomach.nii.gz"))
    (folder.parent / "READY").write_text("")
    return folder


def _materialize(instance, resources: dict, patient_id: str, assets=CHAIN) -> dg.ExecuteInProcessResult:
    if patient_id not in instance.get_dynamic_partitions("ct_scans"):
        instance.add_dynamic_partitions("ct_scans", [patient_id])
    return dg.materialize(assets, partition_key=patient_id, instance=instance,
                          resources={**resources, "radiomics": LENIENT}, raise_on_error=False)


def _checks(result: dg.ExecuteInProcessResult) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _data_versions(instance, patient_id: str) -> dict[str, str]:
    return {name: instance.get_latest_data_version_record(dg.AssetKey(name), partition_key=patient_id)
            .asset_materialization.tags["dagster/data_version"] for name in DATA_ASSETS}


def test_dicom_drop_gets_a_seg_and_an_sr_that_read_back_and_are_reused(instance, data_root, radiology_resources,
                                                                        real_ct):
    folder = _drop(data_root / "landing", "DCM001", real_ct, as_dicom=True)
    store = ArtifactStore(data_root / "artifacts")
    result = _materialize(instance, radiology_resources, "DCM001")
    assert result.success, [step_failure_text(result, step) for step in result.get_failed_step_keys()]
    checks = _checks(result)
    assert all(e.passed for e in checks.values()), {n: e.description for n, e in checks.items() if not e.passed}
    assert checks["seg_matches_mask"].metadata["found"].value.endswith("voxels, all equal")
    assert checks["seg_matches_mask"].metadata["differing_voxels"].value == 0
    assert checks["sr_matches_row"].metadata["found"].value == "107 measurements, all equal to the row"

    seg_meta = metadata_of(result, "ct_mask_seg")
    seg_path = MASK_SEG_FILE.path(store, "DCM001")
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    assert seg_meta["seg"] == "written" and seg_meta["path"] == str(seg_path)
    assert seg_meta["referenced_series_uid"] == source[0].SeriesInstanceUID
    assert seg_meta["study_instance_uid"] == source[0].StudyInstanceUID
    assert seg_meta["referenced_instances"] == len(source) == 12
    assert seg_meta["algorithm_type"] == "MANUAL" and "stomach.nii.gz" in seg_meta["algorithm"]
    assert set(dicom_seg.frame_source_instances(seg_path)) <= {str(h.SOPInstanceUID) for h in source}
    assert seg_meta["input_mask_sha256"] == metadata_of(result, "ct_mask")["sha256"]

    sr_meta = metadata_of(result, "radiomics_sr")
    sr_path = RADIOMICS_SR_FILE.path(store, "DCM001")
    assert sr_meta["sr"] == "written" and sr_meta["path"] == str(sr_path)
    assert dicom_sr.referenced_seg_uid(sr_path) == sr_meta["referenced_seg_uid"] == seg_meta["sop_instance_uid"]
    _, row, _ = dicom_sr.read_feature_row(RADIOMICS_TABLE.path(store, "DCM001"))
    assert sr_meta["measurements"] == len(row) == 107
    assert dicom_sr.read_sr_measurements(sr_path, features=list(row)) == row

    # Unchanged inputs: both files are reused byte for byte, under the same data versions.
    versions, seg_bytes, sr_bytes = _data_versions(instance, "DCM001"), seg_path.read_bytes(), sr_path.read_bytes()
    again = _materialize(instance, radiology_resources, "DCM001")
    assert again.success and all(e.passed for e in _checks(again).values())
    assert metadata_of(again, "ct_mask_seg")["reused"] is True and metadata_of(again, "radiomics_sr")["reused"] is True
    assert _data_versions(instance, "DCM001") == versions
    assert (seg_path.read_bytes(), sr_path.read_bytes()) == (seg_bytes, sr_bytes)

    # A mask moved off the series' voxel lattice (by half a voxel) is refused, naming the file.
    mask_path = MASK_VOLUME.path(store, "DCM001")
    shifted = sitk.ReadImage(str(mask_path))
    shifted.SetOrigin([o + s / 2 for o, s in zip(shifted.GetOrigin(), shifted.GetSpacing(), strict=True)])
    sitk.WriteImage(shifted, str(mask_path))
    refused = _materialize(instance, radiology_resources, "DCM001", [ct_mask_seg])
    assert not refused.success
    message = step_failure_text(refused, "ct_mask_seg")
    assert str(mask_path) in message and "do not fall on the mask's voxel grid" in message


def test_nifti_drop_says_why_there_is_no_seg_or_sr(instance, data_root, radiology_resources, real_ct):
    _drop(data_root / "landing", "NII001", real_ct, as_dicom=False)
    result = _materialize(instance, radiology_resources, "NII001")
    assert result.success
    checks = _checks(result)
    assert all(e.passed for e in checks.values())
    seg_meta, sr_meta = metadata_of(result, "ct_mask_seg"), metadata_of(result, "radiomics_sr")
    assert seg_meta["seg"] == "none" and "came in as a NIfTI file (ct.nii.gz)" in seg_meta["reason"]
    assert sr_meta["sr"] == "none" and sr_meta["reason"] == f"no SEG to reference: {seg_meta['reason']}"
    assert checks["seg_matches_mask"].metadata["found"].value == f"no SEG: {seg_meta['reason']}"
    assert checks["sr_matches_row"].metadata["found"].value == f"no SR: {sr_meta['reason']}"
    store = ArtifactStore(data_root / "artifacts")
    assert not MASK_SEG_FILE.path(store, "NII001").exists() and not RADIOMICS_SR_FILE.path(store, "NII001").exists()
    again = _materialize(instance, radiology_resources, "NII001", [ct_mask_seg, radiomics_sr])
    assert again.success and metadata_of(again, "radiomics_sr")["reused"] is True


def test_the_demo_drops_dicom_series_that_get_a_seg_and_an_sr(instance, data_root, radiology_resources, test_data):
    """The demo's real patient and a synthetic one with a reference mask, as the demo writes them."""
    from gcmlm_assets.demo import synthetic
    from gcmlm_assets.demo.synthetic_plan import CohortSpec

    cohort = synthetic.write_cohort(data_root / "landing", CohortSpec.small(2, slide_width=(600, 700)),
                                    real=synthetic.RealFiles.find(test_data))
    with_mask = next(p.patient_id for p in cohort.patients if p.has_reference_mask)
    for patient_id in (synthetic.REAL_PATIENT_ID, with_mask):
        result = _materialize(instance, radiology_resources, patient_id)
        assert result.success, [step_failure_text(result, step) for step in result.get_failed_step_keys()]
        checks = _checks(result)
        assert checks["seg_matches_mask"].passed and checks["sr_matches_row"].passed
        assert metadata_of(result, "ct_mask_seg")["seg"] == "written"
        assert metadata_of(result, "radiomics_sr")["sr"] == "written"
