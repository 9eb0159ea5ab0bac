"""Putting reference masks on the CT grid (no Dagster): same grid, other grid, refusals, stats."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------- label maps


@pytest.fixture(scope="module")
def label_map(test_data: Path) -> Path:
    return test_data / "ct" / "totalsegmentator" / "example_seg_fast.nii.gz"


def test_a_label_map_without_a_label_is_refused_listing_its_labels(ct, label_map):
    with pytest.raises(masks.MaskInputError) as caught:
        masks.conform_mask(sitk.ReadImage(str(label_map)), ct, label_map)
    message = str(caught.value)
    assert message.startswith(f"{label_map}: mask holds 40 different labels, not one: 1 (9630 voxels), ")
    counts = masks.label_counts(sitk.ReadImage(str(label_map)))
    assert len(counts) == 40 and counts[6.0] == 4748
    for value, voxels in counts.items():
        assert f"{value:g} ({voxels} voxels)" in message


def test_label_six_is_the_totalsegmentator_stomach_voxel_for_voxel(ct, stomach, label_map, real_stomach):
    chosen = masks.conform_mask(sitk.ReadImage(str(label_map)), ct, label_map, "6")
    reference = masks.conform_mask(stomach, ct, real_stomach)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(chosen.image),
                                  sitk.GetArrayViewFromImage(reference.image))
    assert chosen.provenance()["label"] == "label 6" and chosen.provenance()["label_value"] == 6.0
    assert reference.provenance()["label"] == "binary mask (every non-zero voxel)"


def test_a_label_name_is_looked_up_in_the_sidecar(tmp_path, label_map, stomach):
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(label_map.read_bytes())
    mask = sitk.ReadImage(str(path))
    with pytest.raises(masks.MaskInputError, match=r"set by name \('stomach'\) but there is no label sidecar"):
        masks.select_stomach(mask, path, "stomach")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 5, "stomach": 6}}))
    selected, choice = masks.select_stomach(mask, path, "stomach")
    assert (choice.value, choice.name, choice.sidecar) == (6.0, "stomach", str(tmp_path / "dataset.json"))
    assert choice.describe() == f"label 6 (stomach, from {tmp_path / 'dataset.json'})"
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(selected), sitk.GetArrayViewFromImage(stomach))
    # `<mask>.json` beside the mask comes first; a name it lacks is refused with the names it has.
    (tmp_path / "seg.json").write_text(json.dumps({"labels": {"background": 0, "liver": 5}}))
    with pytest.raises(masks.MaskInputError, match=r"label 'stomach' is not named in .*seg\.json \(names: "
                                                   r"background, liver\)"):
        masks.select_stomach(mask, path, "stomach")
    # The refusal of an unlabelled map names the labels it knows.
    with pytest.raises(masks.MaskInputError, match=r"5 liver \(39350 voxels\)"):
        masks.select_stomach(mask, path, None)
    (tmp_path / "seg.json").write_text(json.dumps({"labels": {"stomach": [6, 7]}}))
    with pytest.raises(masks.MaskInputError, match=r"one number per name"):
        masks.select_stomach(mask, path, "stomach")


def test_a_label_the_mask_lacks_is_refused(tmp_path, stomach):
    path = tmp_path / "stomach.nii.gz"
    with pytest.raises(masks.MaskInputError, match=r"stomach\.nii\.gz: label 6 is not in the mask; its labels are "
                                                   r"1 \(4748 voxels\)"):
        masks.select_stomach(stomach, path, "6")
    # A binary mask whose one value is not 1 is still a binary mask.
    selected, choice = masks.select_stomach(stomach * 3, path, None)
    assert choice.value is None and int(sitk.GetArrayViewFromImage(selected).max()) == 1


def test_reference_mask_discovery_allows_a_label_sidecar(tmp_path, real_stomach):
    label_dir = tmp_path / "ct_label"
    label_dir.mkdir()
    (label_dir / "seg.nii.gz").write_bytes(real_stomach.read_bytes())
    for sidecar in ("dataset.json", "seg.json"):
        (label_dir / sidecar).write_text("{}")
        assert masks.find_reference_mask(label_dir) == label_dir / "seg.nii.gz"
    (label_dir / "other.json").write_text("{}")
    with pytest.raises(masks.MaskInputError, match="optionally with a label sidecar"):
        masks.find_reference_mask(label_dir)


# ---------------------------------------------------------------- what a mask holds


def shifted(mask: sitk.Image, shift_mm: tuple[float, float, float]) -> sitk.Image:
    moved = sitk.Image(mask)
    moved.SetOrigin(tuple(o + d for o, d in zip(mask.GetOrigin(), shift_mm, strict=True)))
    return moved


def test_the_real_stomach_holds_no_bone_and_no_outside_air(ct, stomach, real_stomach):
    content = masks.mask_content(ct, masks.conform_mask(stomach, ct, real_stomach).image)
    assert (content.voxels, content.bone_voxels, content.outside_air_voxels) == (4748, 0, 0)


def test_a_mask_moved_onto_the_spine_or_out_of_the_body_holds_bone_or_outside_air(ct, stomach, tmp_path):
    on_spine = masks.conform_mask(shifted(stomach, (-39.0, 90.0, 0.0)), ct, tmp_path / "spine.nii.gz").image
    content = masks.mask_content(ct, on_spine)
    # The count is that of the CT's voxels above 300 HU under the moved mask.
    values = sitk.GetArrayViewFromImage(ct)[sitk.GetArrayViewFromImage(on_spine) > 0]
    assert content.bone_voxels == int((values > masks.BONE_HU).sum()) and content.bone_fraction > 0.02
    assert content.outside_air_fraction == 0.0
    in_front = masks.conform_mask(shifted(stomach, (0.0, -100.0, 0.0)), ct, tmp_path / "front.nii.gz").image
    assert masks.mask_content(ct, in_front).outside_air_fraction > 0.3


def test_outside_air_is_air_joined_to_the_slice_edge_not_gas_inside_the_body():
    values = np.full((4, 20, 20), -1000.0)
    values[:, 3:17, 3:17] = 40.0  # the body
    values[:, 8:12, 8:12] = -900.0  # gas inside it, through every slice (also the first and last)
    outside = masks.outside_body_air(values)
    assert not outside[:, 8:12, 8:12].any() and not outside[:, 3:17, 3:17][values[:, 3:17, 3:17] > 0].any()
    assert outside[:, 0, :].all() and outside[:, :3, :].all()
    # A channel from the gas to the edge in one slice makes that slice's gas outside, only there.
    values[2, 10, 12:] = -900.0
    outside = masks.outside_body_air(values)
    assert outside[2, 8:12, 8:12].all() and not outside[1, 8:12, 8:12].any()


def test_dice():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros_like(a)
    a[0, :2] = 1  # 8 voxels
    b[0, 1:3] = 1  # 8 voxels, 4 shared
    assert masks.dice(a, b) == pytest.approx(0.5)
    assert masks.dice(a, a) == 1.0 and masks.dice(a, np.zeros_like(a)) == 0.0
    assert masks.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    with pytest.raises(ValueError, match="different shapes"):
        masks.dice(a, a[:2])


def test_checks_name_the_thresholds_the_computation_uses():
    from gcmlm_assets.radiology import checks

    assert (checks.BONE_HU, checks.AIR_HU) == (masks.BONE_HU, masks.AIR_HU)


def test_dice_of_images_read_inline_is_right_every_time(tmp_path):
    """The array views borrow the images' buffers: images passed as temporaries must stay alive
    (they were freed mid-computation once, and Dice came out 1.0)."""
    import numpy as np
    import SimpleITK as sitk

    from gcmlm_assets.radiology.masks import dice

    paths = []
    for extra, name in ((0, "a.nii.gz"), (10, "b.nii.gz")):
        array = np.zeros((40, 40, 40), np.uint8)
        array[5:10 + extra, 5:20, 5:20] = 1
        paths.append(tmp_path / name)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(paths[-1]))
    expected = 2 * 5 * 15 * 15 / (5 * 15 * 15 + 15 * 15 * 15)
    values = {round(dice(sitk.ReadImage(str(paths[0])), sitk.ReadImage(str(paths[1]))), 9) for _ in range(30)}
    assert values == {round(expected, 9)}
