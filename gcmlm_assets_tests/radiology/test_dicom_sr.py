"""The radiomics row as a TID 1500 SR (no Dagster), and both DICOM objects through dciodvfy."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gcmlm_assets.radiology import dicom_seg, dicom_sr, features
from gcmlm_assets_tests.support.radiology.dicom_results import (
    IDENTIFYING_TAGS,
    assert_pseudonymised,
    dicom_case,
    radiomics_case,
    single_slice_case,
)
from gcmlm_assets_tests.support.dicom_tools import dciodvfy_report

PATIENT = "P001"  # radiomics_case's row
MODEL_ID = "Dataset501_GastricMask__nnUNetTrainer__nnUNetPlans__3d_fullres__fold_0__0123456789ab"


@pytest.fixture(scope="module")
def written(real_ct: Path, tmp_path_factory) -> dict:
    """One real case: SEG, radiomics row (PyRadiomics, default params) and SR, written once."""
    tmp_path = tmp_path_factory.mktemp("sr")
    case, row_path, params = radiomics_case(real_ct, tmp_path)
    seg_path, sr_path = tmp_path / "mask.seg.dcm", tmp_path / "radiomics.sr.dcm"
    seg = dicom_seg.write_seg(case.ct_folder, case.mask_path, seg_path, dicom_seg.model_origin(MODEL_ID), PATIENT)
    sr = dicom_sr.write_sr(seg_path, row_path, sr_path, params, PATIENT)
    return {"seg_path": seg_path, "sr_path": sr_path, "row_path": row_path, "params": params, "seg": seg, "sr": sr}


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_sr_read_back_equals_the_parquet_row(written: dict):
    _, row, _ = dicom_sr.read_feature_row(written["row_path"])
    assert len(row) == 107
    back = dicom_sr.read_sr_measurements(written["sr_path"])
    assert list(back) == list(row)
    for name, value in row.items():
        assert back[name] == value, name  # stored as float64 (Floating Point Value): exact
    assert written["sr"]["measurements"] == 107 and written["sr"]["features_not_finite"] == ""
    assert written["sr"]["standard_codes"] + written["sr"]["private_codes"] == 107


def test_sr_references_the_seg_segment(written: dict):
    seg_uid = written["seg"]["sop_instance_uid"]
    assert dicom_sr.referenced_seg_uid(written["sr_path"]) == seg_uid == written["sr"]["referenced_seg_uid"]
    sr = pydicom.dcmread(written["sr_path"])
    seg = pydicom.dcmread(written["seg_path"], stop_before_pixels=True)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg_uid in evidence
    segment_numbers = [item.ReferencedSOPSequence[0].ReferencedSegmentNumber for item in _content_items(sr)
                       if item.ValueType == "IMAGE" and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]]
    assert segment_numbers == [1]


def test_concepts_units_and_algorithm_are_recorded(written: dict):
    sr = pydicom.dcmread(written["sr_path"])
    numbers = {}
    for item in _content_items(sr):
        if item.ValueType == "NUM":
            name = item.ConceptNameCodeSequence[0]
            derivations = [c.ConceptCodeSequence[0].CodeMeaning for c in item.get("ContentSequence", [])
                           if c.ConceptNameCodeSequence[0].CodeValue == "121401"]
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            numbers[(name.CodingSchemeDesignator, name.CodeMeaning, *derivations)] = unit.CodeValue
    assert numbers[("IBSI", "Volume from Voxel Summation")] == "mm3"
    assert numbers[("IBSI", "Surface Area of Mesh")] == "mm2"
    assert numbers[("IBSI", "Maximum 3D Diameter of a Mesh")] == "mm"
    assert numbers[("DCM", "Attenuation Coefficient", "Mean")] == "[hnsf'U]"
    assert numbers[("DCM", "Attenuation Coefficient", "Variance")] == "[hnsf'U]2"
    assert numbers[("IBSI", "Contrast of GLCM")] == "1"
    assert numbers[(dicom_sr.PRIVATE_SCHEME, "original_firstorder_10Percentile")] == "[hnsf'U]"
    assert numbers[(dicom_sr.PRIVATE_SCHEME, "original_glcm_MCC")] == "1"
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == dicom_sr.PRIVATE_SCHEME
    texts = [item.TextValue for item in _content_items(sr) if item.ValueType == "TEXT"]
    assert any(text.startswith("settings=") and '"binWidth":25' in text for text in texts)
    assert f"settings_sha256={features.settings_hash(written['params'])}" in texts
    versions = [item.TextValue for item in _content_items(sr)
                if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Version"]
    assert versions == [features.pyradiomics_version()]


def test_every_feature_name_has_its_own_concept():
    """Filtered image types (rich params) get private codes, so no two features share a concept."""
    suffixes = [name.removeprefix("original_")
                for name in dicom_sr._candidate_features([]) if name.startswith("original_")]
    names = [f"{image_type}_{suffix}" for image_type in ("original", "log-sigma-3-0-mm-3D", "wavelet-HLH")
             for suffix in suffixes]
    keys = {}
    for name in names:
        concept, derivation, unit = dicom_sr.feature_concept(name)
        key = (concept[0], concept[1], derivation)
        assert key not in keys, (name, keys.get(key))
        keys[key] = name
        assert unit[1] == "UCUM"
        if not name.startswith("original_"):
            assert concept[1] == dicom_sr.PRIVATE_SCHEME and unit[0] != "[hnsf'U]"


def test_a_non_finite_feature_is_left_out_and_named(written: dict, tmp_path: Path):
    patient_id, row, metadata = dicom_sr.read_feature_row(written["row_path"])
    row["original_glcm_MCC"] = float("nan")
    row_path = features.write_row(tmp_path / "row.parquet", patient_id, row, metadata)
    result = dicom_sr.write_sr(written["seg_path"], row_path, tmp_path / "sr.dcm", written["params"], PATIENT)
    assert result["features_not_finite"] == "original_glcm_MCC" and result["measurements"] == 106
    assert "original_glcm_MCC" not in dicom_sr.read_sr_measurements(tmp_path / "sr.dcm")


def test_a_row_without_its_pyradiomics_version_is_refused(written: dict, tmp_path: Path):
    patient_id, row, _ = dicom_sr.read_feature_row(written["row_path"])
    row_path = features.write_row(tmp_path / "row.parquet", patient_id, row, {"params": "default"})
    with pytest.raises(dicom_sr.SRInputError, match=r"row\.parquet: the row does not record its pyradiomics_version"):
        dicom_sr.write_sr(written["seg_path"], row_path, tmp_path / "sr.dcm", written["params"], PATIENT)


@pytest.mark.parametrize("which", ["seg_path", "sr_path", "real_slice_seg"])
def test_dciodvfy_finds_no_error(written: dict, which: str, test_data: Path, tmp_path: Path):
    if which == "real_slice_seg":  # a reference (MANUAL) SEG of a real scanner's slice
        case = single_slice_case(test_data, tmp_path)
        path = tmp_path / "mask.seg.dcm"
        dicom_seg.write_seg(case.ct_folder, case.mask_path, path, dicom_seg.reference_origin("stomach.nii.gz"), PATIENT)
    else:
        path = written[which]
    lines = dciodvfy_report(path)
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(lines)


def test_the_sr_carries_the_platforms_patient_id_and_no_identity_of_the_source(written: dict, real_ct: Path,
                                                                               tmp_path: Path):
    case = dicom_case(real_ct, tmp_path, tags=IDENTIFYING_TAGS)
    seg_path, sr_path = tmp_path / "mask.seg.dcm", tmp_path / "radiomics.sr.dcm"
    dicom_seg.write_seg(case.ct_folder, case.mask_path, seg_path, dicom_seg.model_origin(MODEL_ID), PATIENT)
    dicom_sr.write_sr(seg_path, written["row_path"], sr_path, written["params"], PATIENT)
    assert_pseudonymised(sr_path, PATIENT, sorted(case.ct_folder.iterdir())[0])
    lines = dciodvfy_report(sr_path)
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)


def test_a_row_of_another_patient_is_refused(written: dict, tmp_path: Path):
    with pytest.raises(dicom_sr.SRInputError, match=r"radiomics\.parquet: the row is patient P001's, not GC999's"):
        dicom_sr.write_sr(written["seg_path"], written["row_path"], tmp_path / "sr.dcm", written["params"], "GC999")
