"""Reading CTs from landing folders (no Dagster): DICOM series, volume files, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gcmlm_assets.radiology import ct_io
from gcmlm_assets_tests.support.radiology.ct import ct_crop, write_dicom_series


def test_good_dicom_series_matches_source_volume(real_ct: Path, tmp_path: Path):
    source = ct_crop(real_ct)
    write_dicom_series(source, tmp_path / "ct")
    image, origin = ct_io.load_ct(tmp_path / "ct")
    assert origin.kind == "dicom" and len(origin.files) == source.GetDepth()
    assert image.GetSize() == source.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), source.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), source.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))


def test_dicom_files_in_shuffled_names_are_ordered_by_position(real_ct: Path, tmp_path: Path):
    source = ct_crop(real_ct)
    paths = write_dicom_series(source, tmp_path / "ct")
    # Names no longer follow the slice order: sorting must come from the positions.
    for i, path in enumerate(reversed(paths)):
        path.rename(path.with_name(f"img_{i:03d}.dcm"))
    image, _ = ct_io.load_ct(tmp_path / "ct")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))


def test_dicom_series_with_missing_slice_is_refused(real_ct: Path, tmp_path: Path):
    paths = write_dicom_series(ct_crop(real_ct), tmp_path / "ct")
    paths[5].unlink()
    with pytest.raises(ct_io.CTInputError) as caught:
        ct_io.load_ct(tmp_path / "ct")
    message = str(caught.value)
    assert str(tmp_path / "ct") in message
    assert "1 missing slice between slice004.dcm and slice006.dcm" in message
    assert "gap 6.000 mm, slice spacing 3.000 mm" in message


def test_dicom_series_with_uneven_spacing_is_refused(real_ct: Path, tmp_path: Path):
    write_dicom_series(ct_crop(real_ct), tmp_path / "ct", z_offsets={7: 1.2})
    with pytest.raises(ct_io.CTInputError, match=r"inconsistent slice spacing: 4\.200 mm between "
                                                 r"slice006\.dcm and slice007\.dcm, 3\.000 mm elsewhere"):
        ct_io.load_ct(tmp_path / "ct")


def test_single_slice_dicom_is_refused(test_data: Path, tmp_path: Path):
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(test_data / "ct" / "pydicom" / "CT_small.dcm", folder)
    with pytest.raises(ct_io.CTInputError) as caught:
        ct_io.load_ct(folder)
    assert str(folder / "CT_small.dcm") in str(caught.value)
    assert "single slice" in str(caught.value)


def test_zero_byte_nifti_is_refused(tmp_path: Path):
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(ct_io.CTInputError, match=r"ct\.nii\.gz: file is empty \(0 bytes\)"):
        ct_io.load_ct(folder)


def test_unreadable_and_ambiguous_folders_are_refused(real_ct: Path, tmp_path: Path):
    garbage = tmp_path / "garbage" / "ct.nrrd"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not an NRRD header\n" * 10)
    with pytest.raises(ct_io.CTInputError, match=r"garbage/ct\.nrrd: cannot be read"):
        ct_io.load_ct(garbage.parent)

    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(real_ct, two / "a.nii.gz")
    shutil.copy(real_ct, two / "b.nii.gz")
    with pytest.raises(ct_io.CTInputError, match="expected exactly one CT volume file, found 2"):
        ct_io.load_ct(two)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ct_io.CTInputError, match="no CT found"):
        ct_io.load_ct(empty)


def test_nifti_is_reoriented_to_lps_without_resampling(real_ct: Path, tmp_path: Path):
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(real_ct, folder)
    original = sitk.ReadImage(str(real_ct))
    image, source = ct_io.load_ct(folder)
    summary = ct_io.summarise(image, source)
    assert source.original_orientation == "RAS" and summary.orientation == "LPS"
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
    # Same voxels, same place: the physical point of every corner voxel holds the same value.
    for index in [(0, 0, 0), (121, 100, 29), (60, 50, 15)]:
        point = original.TransformIndexToPhysicalPoint(index)
        assert image[image.TransformPhysicalPointToIndex(point)] == original[index]
    values = sitk.GetArrayViewFromImage(original)
    assert (summary.hu_min, summary.hu_max) == (float(values.min()), float(values.max())) == (-1100.0, 1207.0)
    assert summary.size == (122, 101, 30) and summary.spacing == (3.0, 3.0, 3.0)


def test_written_ct_is_atomic_and_byte_identical_on_rewrite(real_ct: Path, tmp_path: Path):
    image = ct_io.canonicalise(sitk.ReadImage(str(real_ct)))
    first = ct_io.write_volume(image, tmp_path / "a" / "ct.nii.gz").read_bytes()
    second = ct_io.write_volume(image, tmp_path / "b" / "ct.nii.gz").read_bytes()
    assert first == second
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ct.nii.gz"]


def test_thumbnail_is_a_png(real_ct: Path):
    png = ct_io.ct_thumbnail_png(ct_io.canonicalise(sitk.ReadImage(str(real_ct))))
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_a_truncated_dicom_slice_is_named(real_ct, tmp_path):
    """GDCM drops a damaged slice from the series silently; the error names that file, not a gap."""
    slices = write_dicom_series(ct_crop(real_ct), tmp_path / "ct")
    data = slices[5].read_bytes()
    slices[5].write_bytes(data[: len(data) // 3])
    with pytest.raises(ct_io.CTInputError, match=r"slice005\.dcm: damaged or truncated DICOM file"):
        ct_io.load_ct(tmp_path / "ct")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_volume_file_is_refused_not_padded_with_zeros(tmp_path: Path, suffix: str):
    # ITK reads both cut-short files "successfully", with the missing voxels set to 0.
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (20, 32, 32)).astype(np.int16))
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(image, str(whole))
    folder = tmp_path / "ct"
    folder.mkdir()
    cut = folder / f"ct{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(ct_io.CTInputError, match=rf"{cut}: truncated"):
        ct_io.load_ct(folder)
    assert ct_io.read_volume_file(whole).GetSize() == (32, 32, 20)


def test_a_scaled_integer_nifti_and_a_misnamed_gz_are_read_not_refused(tmp_path: Path):
    # int16 voxels with a rescale intercept: ITK holds them as float32 in memory, the file stores 2 bytes.
    values = np.random.default_rng(1).integers(0, 2000, (20, 32, 32)).astype(np.int16)
    header = bytearray(348)
    header[0:4] = (348).to_bytes(4, "little")
    for i, n in enumerate((3, 32, 32, 20, 1, 1, 1, 1)):
        header[40 + 2 * i:42 + 2 * i] = n.to_bytes(2, "little")
    header[70:72] = (4).to_bytes(2, "little")  # datatype: int16
    header[72:74] = (16).to_bytes(2, "little")  # bitpix
    header[76:108] = np.array([1, 1, 1, 1, 1, 1, 1, 1], "<f4").tobytes()  # pixdim
    header[108:112] = np.array([352], "<f4").tobytes()  # vox_offset
    header[112:120] = np.array([1, -1024], "<f4").tobytes()  # scl_slope, scl_inter
    header[344:348] = b"n+1\0"
    folder = tmp_path / "ct"
    folder.mkdir()
    scaled = folder / "ct.nii"
    scaled.write_bytes(bytes(header) + b"\0" * 4 + values.tobytes())
    image = ct_io.read_volume_file(scaled)
    assert image.GetSize() == (32, 32, 20)
    assert float(sitk.GetArrayViewFromImage(image).min()) == float(values.min()) - 1024
    # Cut short by one slice, the same file is refused.
    cut = tmp_path / "cut" / "ct.nii"
    cut.parent.mkdir()
    cut.write_bytes(scaled.read_bytes()[: -32 * 32 * 2])
    with pytest.raises(ct_io.CTInputError, match="truncated NIfTI"):
        ct_io.read_volume_file(cut)
    # An uncompressed NIfTI named .nii.gz is read as ITK reads it, not refused as damaged gzip.
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes(scaled.read_bytes())
    assert ct_io.read_volume_file(misnamed).GetSize() == (32, 32, 20)
