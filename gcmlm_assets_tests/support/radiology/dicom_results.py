"""DICOM CT series with their canonical `ct.nii.gz` and a mask on it, as ct_image and ct_mask write them."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.radiology import ct_io, masks
from gcmlm_assets_tests.support.phi_search import PATIENT_KEYWORDS, found_in
from gcmlm_assets_tests.support.radiology.ct import ct_crop, write_dicom_series

# Tags a scanner always sets that write_dicom_series leaves out.
SERIES_TAGS = {"0020|0052": "1.2.826.0.1.3680043.2.1125.5.1", "0020|0011": "3", "0020|0010": "1"}
GEOMETRIES = ("normal", "flipped", "oblique")
# A series straight from a hospital: the identifying values phi_search looks for, more names of
# the patient's, the site's and its staff's, and the patient's sex and age (which a SEG keeps).
IDENTIFYING_TAGS = {
    "0010|0010": PATIENT_KEYWORDS["PatientName"], "0010|0020": PATIENT_KEYWORDS["PatientID"],
    "0010|0030": PATIENT_KEYWORDS["PatientBirthDate"], "0008|0050": PATIENT_KEYWORDS["AccessionNumber"],
    "0008|0080": PATIENT_KEYWORDS["InstitutionName"], "0008|0081": "ZZ HOSPITAL STREET 1",
    "0008|0090": "ZZREFERRING^DOCTOR", "0020|0010": "ZZSTUDY7", "0008|1010": "ZZSTATION",
    "0008|1070": "ZZOPERATOR^ONE", "0010|1030": "77", "0010|4000": "ZZ patient comment", "0010|0040": "F",
    "0010|1010": "061Y", "0008|1030": "ZZ STUDY OF SECRETNAME", "0008|009C": "ZZCONSULTING^DOCTOR",
    "0008|1048": "ZZRECORD^DOCTOR", "0008|1060": "ZZREADING^DOCTOR", "0038|0010": "ZZADMISSION42",
    "0012|0040": "ZZTRIALSUBJECT9", "0012|0031": "ZZ TRIAL SITE",
}


@dataclasses.dataclass(frozen=True)
class DicomCase:
    ct_folder: Path  # the landing drop's ct/ folder
    ct_path: Path  # the canonical ct.nii.gz
    mask_path: Path  # mask.nii.gz on ct.nii.gz's grid


def _rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    a, b = math.radians(z_degrees), math.radians(x_degrees)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return about_z @ about_x


def source_volume(real_ct: Path, geometry: str) -> sitk.Image:
    """The CT crop as a scanner would store it: LPS, flipped (rows mirrored, slices stored from the
    top down), or oblique (rotated 25 degrees about z and 10 about x)."""
    crop = ct_crop(real_ct)
    if geometry == "flipped":
        return sitk.Flip(crop, [True, False, True])
    if geometry == "oblique":
        crop.SetDirection(_rotation(25.0, 10.0).ravel().tolist())
    return crop


def soft_tissue_mask(ct: sitk.Image) -> sitk.Image:
    """An irregular, asymmetric mask on `ct`'s grid (a wrong flip or permutation cannot hide)."""
    mask = sitk.Cast((ct > 0) & (ct < 80), sitk.sitkUInt8)
    mask.CopyInformation(ct)
    return mask


def canonical_case(ct_folder: Path, out: Path, image: sitk.Image | None = None) -> DicomCase:
    """Write ct.nii.gz (from `image`, else `ct_io.load_ct(ct_folder)`) and a mask on it into `out`."""
    if image is None:
        image, _ = ct_io.load_ct(ct_folder)
    ct_path = ct_io.write_volume(image, out / "ct.nii.gz")
    mask_path = masks.write_mask(soft_tissue_mask(sitk.ReadImage(str(ct_path))), out / "mask.nii.gz")
    return DicomCase(ct_folder, ct_path, mask_path)


def dicom_case(real_ct: Path, tmp_path: Path, geometry: str = "normal", tags: dict | None = None) -> DicomCase:
    """A DICOM series of the CT crop in `geometry` (with `tags` added), its canonical CT and a mask on it."""
    folder = tmp_path / geometry / "ct"
    write_dicom_series(source_volume(real_ct, geometry), folder, tags={**SERIES_TAGS, **(tags or {})})
    return canonical_case(folder, tmp_path / geometry)


def single_slice_case(test_data: Path, tmp_path: Path) -> DicomCase:
    """pydicom's real one-slice CT (ct_image refuses a single slice; its grid is read directly)."""
    folder = tmp_path / "ct_small" / "ct"
    folder.mkdir(parents=True)
    shutil.copy(test_data / "ct" / "pydicom" / "CT_small.dcm", folder)
    image = ct_io.canonicalise(sitk.ReadImage(str(folder / "CT_small.dcm")))
    return canonical_case(folder, tmp_path / "ct_small", image)


def ball_mask(ct: sitk.Image, radius_voxels: float = 2.5) -> sitk.Image:
    """A small ball in the middle of `ct`'s grid: PyRadiomics extracts on it in seconds."""
    zz, yy, xx = np.indices(ct.GetSize()[::-1])
    centre = [s // 2 for s in ct.GetSize()[::-1]]
    inside = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius_voxels ** 2
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(ct)
    return mask


def radiomics_case(real_ct: Path, tmp_path: Path, patient_id: str = "P001") -> tuple[DicomCase, Path, dict]:
    """A DICOM case with a ball mask and its radiomics_row parquet as the asset writes it (default
    params): (case, row path, params)."""
    from gcmlm_assets.radiology import features

    case = dicom_case(real_ct, tmp_path)
    masks.write_mask(ball_mask(sitk.ReadImage(str(case.ct_path))), case.mask_path)
    params = features.load_params("default")
    row = features.extract_features(features.extractor_from_params(params), case.ct_path, case.mask_path)
    row_path = features.write_row(tmp_path / "radiomics.parquet", patient_id, row.features, {
        "pyradiomics_version": features.pyradiomics_version(), "settings_sha256": features.settings_hash(params),
        "params": "default"})
    return case, row_path, params


def assert_pseudonymised(path: Path, patient_id: str, source: Path) -> None:
    """The DICOM file at `path` carries, of the patient in the `source` slice's header, only the
    platform's `patient_id` (as Patient ID and Name), sex and age; it stays in the source's study."""
    import pydicom

    dataset, header = pydicom.dcmread(path), pydicom.dcmread(source, stop_before_pixels=True)
    assert (dataset.PatientID, dataset.PatientName.family_name, dataset.PatientName.given_name) == (
        patient_id, patient_id, "")
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        assert keyword in dataset and not dataset[keyword].value, keyword  # type 2: present, empty
    patient = {e.keyword for e in dataset.iterall() if e.tag.group == 0x0010}
    assert patient <= {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge"}, patient
    assert (dataset.get("PatientSex"), dataset.get("PatientAge")) == (header.get("PatientSex"), header.get("PatientAge"))
    copied = {e.keyword for e in dataset.iterall()} & {"InstitutionName", "InstitutionAddress", "StationName",
                                                       "OperatorsName"}
    assert not copied, copied
    assert dataset.PatientIdentityRemoved == "YES" and dataset.DeidentificationMethod
    assert dataset.StudyInstanceUID == header.StudyInstanceUID
    data = path.read_bytes()
    assert found_in(data) == []
    for value in ("ZZREFERRING", "ZZSTUDY7", "ZZSTATION", "ZZOPERATOR", "ZZ HOSPITAL STREET", "ZZ PATIENT COMMENT",
                  "SECRETNAME", "ZZCONSULTING", "ZZRECORD", "ZZREADING", "ZZADMISSION", "ZZTRIAL"):
        assert value.encode() not in data.upper(), value
