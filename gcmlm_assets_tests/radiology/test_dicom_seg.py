"""The gastric mask as DICOM SEG (no Dagster): round trips on the source grid, references, refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from gcmlm_assets.radiology import dicom_seg
from gcmlm_assets_tests.support.dicom_tools import dciodvfy_report
from gcmlm_assets_tests.support.radiology.dicom_results import (
    GEOMETRIES,
    IDENTIFYING_TAGS,
    DicomCase,
    assert_pseudonymised,
    dicom_case,
    single_slice_case,
)

PATIENT = "GC007"  # the platform's pseudonymous id, the only patient id a SEG may carry
MODEL_ID = "Dataset501_GastricMask__nnUNetTrainer__nnUNetPlans__3d_fullres__fold_0__0123456789ab"


def _source_headers(folder: Path) -> dict[str, pydicom.Dataset]:
    headers = (pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir()))
    return {str(h.SOPInstanceUID): h for h in headers}


def _assert_round_trip(case: DicomCase, seg_path: Path) -> None:
    mask = sitk.ReadImage(str(case.mask_path))
    back = dicom_seg.read_seg_mask(seg_path, mask)
    expected = sitk.GetArrayFromImage(mask)
    assert expected.any()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)
    assert back.GetDirection() == mask.GetDirection() and back.GetOrigin() == mask.GetOrigin()


def _assert_references(case: DicomCase, seg_path: Path, metadata: dict) -> None:
    sources = _source_headers(case.ct_folder)
    any_source = next(iter(sources.values()))
    seg = pydicom.dcmread(seg_path)
    assert seg.StudyInstanceUID == any_source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == any_source.FrameOfReferenceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == any_source.SeriesInstanceUID == metadata["referenced_series_uid"]
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == set(sources)
    # Each frame comes from the source slice at its own position (empty slices have no frame).
    per_frame = dicom_seg.frame_source_instances(seg_path)
    assert len(per_frame) == seg.NumberOfFrames == metadata["frames"]
    for uid, item in zip(per_frame, seg.PerFrameFunctionalGroupsSequence, strict=True):
        frame_position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(frame_position, np.array(sources[uid].ImagePositionPatient, dtype=float),
                                   atol=1e-3)
    assert metadata["sop_instance_uid"] == seg.SOPInstanceUID


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_seg_read_back_equals_the_mask_voxel_for_voxel(real_ct: Path, tmp_path: Path, geometry: str):
    case = dicom_case(real_ct, tmp_path, geometry)
    seg_path = tmp_path / "out" / "mask.seg.dcm"
    metadata = dicom_seg.write_seg(case.ct_folder, case.mask_path, seg_path, dicom_seg.model_origin(MODEL_ID),
                                   PATIENT)
    _assert_round_trip(case, seg_path)
    _assert_references(case, seg_path, metadata)
    assert sorted(p.name for p in seg_path.parent.iterdir()) == ["mask.seg.dcm"]  # no temporary left


def test_the_real_one_slice_series_round_trips(test_data: Path, tmp_path: Path):
    case = single_slice_case(test_data, tmp_path)
    seg_path = tmp_path / "mask.seg.dcm"
    metadata = dicom_seg.write_seg(case.ct_folder, case.mask_path, seg_path,
                                   dicom_seg.reference_origin("CT_small_mask.nii.gz"), PATIENT)
    _assert_round_trip(case, seg_path)
    _assert_references(case, seg_path, metadata)
    assert metadata["frames"] == 1 and metadata["referenced_instances"] == 1


def _without_times(dataset) -> list:
    """The dataset's elements, recursively, with its date and time values blanked."""
    out = []
    for element in dataset:
        if element.VR == "SQ":
            out.append((element.tag, [_without_times(item) for item in element.value]))
        elif element.VR not in ("DA", "TM", "DT"):
            out.append((element.tag, element.value))
    return out


def test_the_same_inputs_give_the_same_seg_but_for_its_creation_times(test_data: Path, tmp_path: Path):
    case = single_slice_case(test_data, tmp_path)
    origin = dicom_seg.reference_origin("CT_small_mask.nii.gz")
    first, second = tmp_path / "first.seg.dcm", tmp_path / "second.seg.dcm"
    dicom_seg.write_seg(case.ct_folder, case.mask_path, first, origin, PATIENT)
    dicom_seg.write_seg(case.ct_folder, case.mask_path, second, origin, PATIENT)
    assert _without_times(pydicom.dcmread(first)) == _without_times(pydicom.dcmread(second))


def test_segment_codes_and_algorithm_are_recorded(real_ct: Path, tmp_path: Path):
    case = dicom_case(real_ct, tmp_path)
    predicted, reference = tmp_path / "predicted.dcm", tmp_path / "reference.dcm"
    dicom_seg.write_seg(case.ct_folder, case.mask_path, predicted, dicom_seg.model_origin(MODEL_ID), PATIENT)
    dicom_seg.write_seg(case.ct_folder, case.mask_path, reference, dicom_seg.reference_origin("stomach.nii.gz"),
                        PATIENT)

    (segment,) = pydicom.dcmread(predicted).SegmentSequence
    assert (segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            segment.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator) == ("91723000", "SCT")
    assert (segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) == ("69695003", "Stomach")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "nnU-Net Dataset501_GastricMask"
    assert algorithm.AlgorithmVersion == "0123456789ab"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert MODEL_ID in algorithm.AlgorithmParameters

    reference_seg = pydicom.dcmread(reference)
    assert reference_seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in reference_seg.SegmentSequence[0]
    assert "stomach.nii.gz" in reference_seg.SeriesDescription
    # Another origin is another SEG instance; the same inputs give the same UIDs.
    assert reference_seg.SOPInstanceUID != pydicom.dcmread(predicted).SOPInstanceUID
    again = dicom_seg.write_seg(case.ct_folder, case.mask_path, tmp_path / "again.dcm",
                                dicom_seg.model_origin(MODEL_ID), PATIENT)
    assert again["sop_instance_uid"] == pydicom.dcmread(predicted).SOPInstanceUID


def test_a_volume_file_ct_says_why_there_is_no_seg(real_ct: Path, tmp_path: Path):
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(real_ct, folder)
    reason = dicom_seg.seg_absent_reason(folder)
    assert reason is not None and "NIfTI file (example_ct_sm.nii.gz)" in reason and "DICOM SEG" in reason
    with pytest.raises(dicom_seg.SegInputError, match="NIfTI file"):
        dicom_seg.read_source_series(folder)
    assert dicom_seg.seg_absent_reason(dicom_case(real_ct, tmp_path).ct_folder) is None


def test_a_series_without_frame_of_reference_says_why(test_data: Path, tmp_path: Path):
    folder = tmp_path / "ct"
    folder.mkdir()
    dataset = pydicom.dcmread(test_data / "ct" / "pydicom" / "CT_small.dcm")
    del dataset.FrameOfReferenceUID
    dataset.save_as(folder / "slice.dcm")
    assert "lacks FrameOfReferenceUID (slice.dcm)" in dicom_seg.seg_absent_reason(folder)


def test_a_mask_on_another_grid_is_refused(real_ct: Path, tmp_path: Path):
    case = dicom_case(real_ct, tmp_path)
    mask = sitk.ReadImage(str(case.mask_path))
    shifted = tmp_path / "shifted.nii.gz"
    mask.SetOrigin(tuple(o + 0.4 * s for o, s in zip(mask.GetOrigin(), mask.GetSpacing(), strict=True)))
    sitk.WriteImage(mask, str(shifted), True)
    with pytest.raises(dicom_seg.SegInputError, match=r"shifted\.nii\.gz.*do not fall on the mask's voxel grid"):
        dicom_seg.write_seg(case.ct_folder, shifted, tmp_path / "seg.dcm", dicom_seg.model_origin(MODEL_ID), PATIENT)
    cropped = tmp_path / "cropped.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(case.mask_path))[:, :, 1:], str(cropped), True)
    with pytest.raises(dicom_seg.SegInputError, match=r"cropped\.nii\.gz.*outside the mask grid"):
        dicom_seg.write_seg(case.ct_folder, cropped, tmp_path / "seg.dcm", dicom_seg.model_origin(MODEL_ID), PATIENT)
    assert not (tmp_path / "seg.dcm").exists()


def test_the_seg_carries_the_platforms_patient_id_and_no_identity_of_the_source(real_ct: Path, tmp_path: Path):
    case = dicom_case(real_ct, tmp_path, tags=IDENTIFYING_TAGS)
    seg_path = tmp_path / "mask.seg.dcm"
    metadata = dicom_seg.write_seg(case.ct_folder, case.mask_path, seg_path, dicom_seg.model_origin(MODEL_ID),
                                   PATIENT)
    source = sorted(case.ct_folder.iterdir())[0]
    assert pydicom.dcmread(source).PatientID == IDENTIFYING_TAGS["0010|0020"]  # the source carries them
    assert_pseudonymised(seg_path, PATIENT, source)
    seg = pydicom.dcmread(seg_path)
    assert seg.FrameOfReferenceUID == pydicom.dcmread(source).FrameOfReferenceUID
    assert metadata["study_instance_uid"] == seg.StudyInstanceUID
    lines = dciodvfy_report(seg_path)
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)


def test_the_seg_uids_follow_the_code_version(test_data: Path, tmp_path: Path, monkeypatch):
    case = single_slice_case(test_data, tmp_path)
    origin = dicom_seg.reference_origin("CT_small_mask.nii.gz")
    before = dicom_seg.write_seg(case.ct_folder, case.mask_path, tmp_path / "a.dcm", origin, PATIENT)
    monkeypatch.setattr(dicom_seg, "CT_MASK_SEG", dataclasses.replace(dicom_seg.CT_MASK_SEG, code_version="next"))
    after = dicom_seg.write_seg(case.ct_folder, case.mask_path, tmp_path / "b.dcm", origin, PATIENT)
    assert before["sop_instance_uid"] != after["sop_instance_uid"]
    assert before["series_instance_uid"] != after["series_instance_uid"]
    assert before["study_instance_uid"] == after["study_instance_uid"]
