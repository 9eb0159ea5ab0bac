"""Putting reference masks on the CT grid (no Dagster): same grid, other grid, refusals, stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gcmlm_assets.radiology import ct_io, masks


@pytest.fixture(scope="module")
def ct(real_ct: Path) -> sitk.Image:
    return ct_io.canonicalise(sitk.ReadImage(str(real_ct)))


@pytest.fixture(scope="module")
def stomach(real_stomach: Path) -> sitk.Image:
    return sitk.ReadImage(str(real_stomach))


def test_same_grid_in_other_axis_order_is_reoriented_not_resampled(ct, stomach, real_stomach):
    conformed = masks.conform_mask(stomach, ct, real_stomach)
    assert not conformed.resampled and conformed.reoriented_from == "RAS"
    assert masks.geometry_identical(conformed.image, ct)
    assert conformed.image.GetPixelID() == sitk.sitkUInt8
    original = sitk.GetArrayViewFromImage(stomach)
    assert conformed.source_voxels == int(original.sum())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(conformed.image),
                                  sitk.GetArrayFromImage(sitk.DICOMOrient(stomach, "LPS")))


def test_stats_volume_is_voxels_times_voxel_volume(ct, stomach, real_stomach):
    conformed = masks.conform_mask(stomach, ct, real_stomach)
    stats = masks.mask_stats(conformed.image)
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(stomach)))
    assert stats.voxels == voxels
    assert stats.voxel_volume_ml == pytest.approx(3.0 * 3.0 * 3.0 / 1000.0)
    assert stats.volume_ml == pytest.approx(voxels * 0.027)
    assert stats.components >= 1 and 0 < stats.largest_component_voxels <= voxels


def test_components_are_counted(ct):
    mask = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(ct)
    mask[10:14, 10:14, 5:8] = 1
    mask[40:50, 40:45, 5:8] = 1
    mask[20, 20, 20] = 1
    stats = masks.mask_stats(mask)
    assert (stats.components, stats.largest_component_voxels, stats.voxels) == (3, 150, 48 + 150 + 1)


def test_mask_on_other_overlapping_grid_is_resampled_with_nearest_neighbour(ct, stomach, tmp_path):
    # The reference mask at 2 mm on a shifted grid, as another tool might have exported it.
    fine = sitk.Image([150, 130, 44], sitk.sitkUInt8)
    fine.SetSpacing((2.0, 2.0, 2.0))
    fine.SetOrigin(tuple(o + 0.7 for o in ct.GetOrigin()))
    fine = sitk.Resample(sitk.DICOMOrient(stomach, "LPS"), fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    labelled = fine * 3  # a label value other than 1 still counts as foreground
    path = tmp_path / "mask_2mm.nrrd"
    conformed = masks.conform_mask(labelled, ct, path)
    assert conformed.resampled
    assert conformed.provenance()["resampling"] == "nearest neighbour"
    assert masks.geometry_identical(conformed.image, ct)
    values = sitk.GetArrayViewFromImage(conformed.image)
    assert set(np.unique(values)) == {0, 1}
    # Nearest neighbour keeps the shape: the volume stays within a few percent of the reference.
    reference_ml = np.count_nonzero(sitk.GetArrayViewFromImage(stomach)) * 0.027
    assert masks.mask_stats(conformed.image).volume_ml == pytest.approx(reference_ml, rel=0.1)


def test_mask_outside_the_ct_is_refused(ct, stomach, tmp_path):
    far = sitk.Image(stomach)
    far.SetOrigin(tuple(o + 1000.0 for o in stomach.GetOrigin()))
    path = tmp_path / "far_mask.nii.gz"
    with pytest.raises(masks.MaskInputError) as caught:
        masks.conform_mask(far, ct, path)
    assert str(path) in str(caught.value)
    assert "does not overlap the CT in physical space" in str(caught.value)


def test_empty_mask_is_refused(ct, stomach, tmp_path):
    path = tmp_path / "empty.nii.gz"
    with pytest.raises(masks.MaskInputError, match=r"empty\.nii\.gz: mask is empty"):
        masks.conform_mask(stomach * 0, ct, path)


def test_reference_mask_discovery(tmp_path, real_stomach):
    label_dir = tmp_path / "ct_label"
    assert masks.find_reference_mask(label_dir) is None
    label_dir.mkdir()
    assert masks.find_reference_mask(label_dir) is None
    (label_dir / "stomach.nii.gz").write_bytes(real_stomach.read_bytes())
    assert masks.find_reference_mask(label_dir) == label_dir / "stomach.nii.gz"
    (label_dir / "notes.txt").write_text("x")
    with pytest.raises(masks.MaskInputError, match="expected exactly one mask volume file"):
        masks.find_reference_mask(label_dir)


def test_zero_byte_mask_file_is_refused(tmp_path):
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(masks.MaskInputError, match=r"mask .*mask\.nii\.gz: file is empty \(0 bytes\)"):
        masks.load_mask(path)


def test_overlay_picture(ct, stomach, real_stomach):
    conformed = masks.conform_mask(stomach, ct, real_stomach)
    png = masks.mask_overlay_png(ct, conformed.image)
    assert png.startswith(b"\x89PNG") and len(png) > 2000
