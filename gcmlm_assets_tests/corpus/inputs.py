"""Bad inputs of the corpus, each made from the shared real files (`../shared/data`).

Every maker writes into a folder it is given and returns nothing; the real files are only read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import tifffile
from pydicom.uid import generate_uid

from gcmlm_assets_tests.support.pathology.slide_fixtures import real_slide, write_pyramid_tiff
from gcmlm_assets_tests.support.radiology.ct import ct_crop, write_dicom_series

TS = ("ct", "totalsegmentator")
CT_SMALL = ("ct", "pydicom", "CT_small.dcm")
OTHER_PATIENT_MASK = ("ct", "pyradiomics", "breast1_label.nrrd")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def real_ct(data: Path) -> Path:
    return data.joinpath(*TS, "example_ct_sm.nii.gz")


def real_stomach(data: Path) -> Path:
    return data.joinpath(*TS, "example_ct_sm_stomach.nii.gz")


# ---------------------------------------------------------------- CT folders (`<patient>/ct/`)


def dicom_missing_slice(data: Path, ct: Path) -> None:
    write_dicom_series(ct_crop(real_ct(data)), ct)[6].unlink()


def dicom_uneven_spacing(data: Path, ct: Path) -> None:
    write_dicom_series(ct_crop(real_ct(data)), ct, z_offsets={6: 1.2})


def dicom_two_series(data: Path, ct: Path) -> None:
    crop = ct_crop(real_ct(data))
    write_dicom_series(crop, ct)
    # A second reconstruction of the same slab, exported into the same folder under its own series UID.
    other = ct.parent / "second_series"
    series_uid = generate_uid()
    for path in write_dicom_series(crop, other):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(ct / f"recon2_{path.name}")
    shutil.rmtree(other)


def dicom_truncated_file(data: Path, ct: Path) -> None:
    paths = write_dicom_series(ct_crop(real_ct(data)), ct)
    paths[5].write_bytes(paths[5].read_bytes()[: paths[5].stat().st_size // 2])


def dicom_structured_report(data: Path, ct: Path) -> None:
    """A good series plus the scanner's dose report: the real CT_small.dcm turned into a Basic Text
    SR (its pixels removed), as PACS exports put one beside the slices."""
    write_dicom_series(ct_crop(real_ct(data)), ct)
    report = pydicom.dcmread(data.joinpath(*CT_SMALL))
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient"):
        if keyword in report:
            delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.SeriesInstanceUID = generate_uid()
    report.Modality = "SR"
    report.ValueType = "CONTAINER"
    report.save_as(ct / "dose_report.dcm")


def dicom_single_slice(data: Path, ct: Path) -> None:
    shutil.copyfile(data.joinpath(*CT_SMALL), ct / "CT_small.dcm")


def _float_ct_with(value: float, data: Path) -> sitk.Image:
    """The real CT (cropped) as float32 HU with one voxel inside the body set to `value`."""
    image = sitk.Cast(ct_crop(real_ct(data)), sitk.sitkFloat32)
    image[32, 32, 6] = value
    return image


def nifti_nan_voxel(data: Path, ct: Path) -> None:
    sitk.WriteImage(_float_ct_with(float("nan"), data), str(ct / "ct.nii.gz"))


def nifti_inf_voxel(data: Path, ct: Path) -> None:
    sitk.WriteImage(_float_ct_with(float("inf"), data), str(ct / "ct.nii"))


def nifti_zero_bytes(data: Path, ct: Path) -> None:
    (ct / "ct.nii.gz").write_bytes(b"")


# ---------------------------------------------------------------- reference masks (`<patient>/ct_label/`)


def mask_empty(data: Path, label: Path) -> None:
    sitk.WriteImage(sitk.ReadImage(str(real_stomach(data))) * 0, str(label / "stomach.nii.gz"))


def mask_outside_ct(data: Path, label: Path) -> None:
    """The real stomach mask with its origin moved 1 m away (a wrong header)."""
    far = sitk.ReadImage(str(real_stomach(data)))
    far.SetOrigin(tuple(o + 1000.0 for o in far.GetOrigin()))
    sitk.WriteImage(far, str(label / "stomach.nii.gz"))


def mask_other_patients_grid(data: Path, label: Path) -> None:
    """Another patient's lesion mask, on that patient's own grid: nowhere near this CT."""
    shutil.copyfile(data.joinpath(*OTHER_PATIENT_MASK), label / "breast1_label.nrrd")


# ---------------------------------------------------------------- slides (`<patient>/wsi/`)


def slide_zero_bytes(data: Path, wsi: Path) -> None:
    (wsi / "empty.svs").write_bytes(b"")


def slide_renamed_text(data: Path, wsi: Path) -> None:
    (wsi / "notes.svs").write_text("Gross description: stomach, partial gastrectomy.\nNo slide here.\n")


def slide_truncated_mid_tile(data: Path, wsi: Path) -> None:
    """The real SVS cut in the middle of the middle tile of level 0."""
    source = real_slide(data)
    with tifffile.TiffFile(source) as tiff:
        page = tiff.pages[0]
        middle = len(page.dataoffsets) // 2
        cut = page.dataoffsets[middle] + page.databytecounts[middle] // 2
    (wsi / "cut.svs").write_bytes(source.read_bytes()[:cut])


def slide_all_glass(data: Path, wsi: Path) -> None:
    """A real slide's empty background (its top-left corner, glass) tiled up to a 2048 px slide."""
    import openslide

    with openslide.OpenSlide(str(real_slide(data))) as slide:
        glass = np.asarray(slide.read_region((0, 0), 0, (64, 64)).convert("RGB"))
    write_pyramid_tiff(wsi / "glass.tiff", np.tile(glass, (32, 32, 1)), mpp=0.5, downsamples=(1, 4))


def slide_one_pixel(data: Path, wsi: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(real_slide(data))) as slide:
        pixel = np.asarray(slide.read_region((1100, 1500), 0, (1, 1)).convert("RGB"))
    write_pyramid_tiff(wsi / "dot.tiff", pixel, mpp=0.5, downsamples=(1,))


def _svs_with_mpp(data: Path, path: Path, mpp: bytes) -> None:
    """The real SVS with the MPP of its description rewritten in place (same length, so every
    offset in the file stays valid)."""
    original = b"MPP = 0.4990"
    replacement = b"MPP = " + mpp.ljust(len(original) - 6)
    raw = real_slide(data).read_bytes()
    assert raw.count(original) >= 1 and len(replacement) == len(original)
    path.write_bytes(raw.replace(original, replacement))


def slide_mpp_tiny(data: Path, wsi: Path) -> None:
    _svs_with_mpp(data, wsi / "mpp_tiny.svs", b"1e-6")


def slide_mpp_huge(data: Path, wsi: Path) -> None:
    _svs_with_mpp(data, wsi / "mpp_huge.svs", b"1000.0")
