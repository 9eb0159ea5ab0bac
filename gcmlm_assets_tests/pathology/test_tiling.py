"""Plain tiling code: slide opening and resolution, tissue segmentation, patch grids, CLAM parity."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from gcmlm_assets.pathology.slides import (
    MPP_FROM_DEFAULT,
    MPP_FROM_OBJECTIVE_POWER,
    MPP_FROM_OPENSLIDE,
    MPP_FROM_TIFF_RESOLUTION,
    SlideError,
    list_slides,
    open_slide,
    opened,
    resolve_mpp,
)
from gcmlm_assets.pathology.clam_tiling import polygon_point_test
from gcmlm_assets.pathology.coords_h5 import read_coords_h5, write_coords_h5
from gcmlm_assets.pathology.tiling import plan_read, tile_slide, tissue_fractions
from gcmlm_assets.pathology.tiling_params import ClamParams, TilingParams, TilingResult
from gcmlm_assets.pathology.tissue import find_tissue_regions, rasterise

from gcmlm_assets_tests.support.pathology.slide_fixtures import (
    blank_slide,
    png_renamed,
    real_slide,
    real_tissue_rgb,
    truncated_copy,
    write_pyramid_tiff,
    zero_byte,
)


def coordinate_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    first, second = set(map(tuple, a.tolist())), set(map(tuple, b.tolist()))
    return len(first & second) / len(first | second)


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize("properties, source, expected", [
    ({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2529", "openslide.objective-power": "20"},
     MPP_FROM_OPENSLIDE, (0.2527, 0.2529)),
    ({"tiff.XResolution": "40000", "tiff.YResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
     MPP_FROM_TIFF_RESOLUTION, (0.25, 0.25)),
    ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, MPP_FROM_TIFF_RESOLUTION, (0.5, 0.5)),
    # A resolution without a unit says nothing about microns: fall through to the objective.
    ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none", "openslide.objective-power": "40"},
     MPP_FROM_OBJECTIVE_POWER, (0.25, 0.25)),
    ({"openslide.mpp-x": "garbage", "openslide.objective-power": "20"}, MPP_FROM_OBJECTIVE_POWER, (0.5, 0.5)),
    ({}, MPP_FROM_DEFAULT, (0.42, 0.42)),
])
def test_resolution_sources_in_order(properties, source, expected):
    mpp = resolve_mpp(properties, default_mpp=0.42)
    assert mpp.source == source
    assert (mpp.x, mpp.y) == pytest.approx(expected)


def test_real_slide_resolution_and_levels(test_data: Path):
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        assert slide.info.mpp.source == MPP_FROM_OPENSLIDE
        assert slide.info.mpp.x == pytest.approx(0.499)
        assert slide.info.dimensions == (2220, 2967)
        assert slide.info.quickhash


def test_slide_without_resolution_uses_default(tmp_path: Path, test_data: Path):
    rgb = real_tissue_rgb(test_data)[:1024, :1024]
    path = write_pyramid_tiff(tmp_path / "nores.tiff", rgb, mpp=None, downsamples=(1,))
    with opened(path, default_mpp=0.37) as slide:
        assert slide.info.mpp.source == MPP_FROM_DEFAULT
        assert slide.info.mpp.x == pytest.approx(0.37)


# ---------------------------------------------------------------- unusable files


@pytest.mark.parametrize("make, expected", [
    (lambda d, src: zero_byte(d / "empty.svs"), "empty (0 bytes)"),
    (lambda d, src: png_renamed(d / "picture.svs"), "is a PNG image"),
    (lambda d, src: truncated_copy(src, d / "cut.svs", 0.6), "truncated"),
    (lambda d, src: truncated_copy(src, d / "cut_late.svs", 0.97), "truncated"),
    (lambda d, src: (d / "notes.svs").write_text("not a slide") and d / "notes.svs", "does not recognise"),
])
def test_unusable_files_are_named_with_their_problem(tmp_path, test_data, make, expected):
    path = make(tmp_path, real_slide(test_data))
    with pytest.raises(SlideError) as caught:
        open_slide(path, default_mpp=0.5)
    message = str(caught.value)
    assert message.startswith(path.name) and expected in message


def test_file_that_opens_but_cannot_be_decoded_is_caught(tmp_path: Path, test_data: Path):
    rgb = real_tissue_rgb(test_data)[:1024, :1024]
    path = write_pyramid_tiff(tmp_path / "corrupt.tiff", rgb, mpp=0.5, downsamples=(1, 4))
    # Overwrite the tile data of the smallest level (written last) with garbage of the same length:
    # the TIFF structure stays valid, OpenSlide opens the file, decoding fails.
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[-1]
        start, length = page.dataoffsets[0], page.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[start:start + length] = b"\x00" * length
    path.write_bytes(bytes(data))
    import openslide

    openslide.OpenSlide(str(path)).close()  # opening alone does not notice
    with pytest.raises(SlideError, match="cannot be decoded"):
        open_slide(path, default_mpp=0.5)


def test_generic_tiff_with_odd_resolution_is_refused(test_data: Path):
    path = test_data / "wsi" / "boxes.tiff"
    with pytest.raises(SlideError) as caught:
        open_slide(path, default_mpp=0.5)
    assert "boxes.tiff" in str(caught.value) and "352.778" in str(caught.value)
    assert "outside" in str(caught.value)


def test_listing_refuses_same_stem(tmp_path: Path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "a.tiff").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    with pytest.raises(SlideError, match="same name stem"):
        list_slides(tmp_path)
    (tmp_path / "a.tiff").unlink()
    assert [s.path.name for s in list_slides(tmp_path)] == ["a.svs"]


# ---------------------------------------------------------------- geometry


def test_polygon_point_test_matches_opencv():
    rng = np.random.default_rng(1)
    canvas = np.zeros((120, 120), np.uint8)
    cv2.circle(canvas, (60, 60), 40, 255, -1)
    cv2.rectangle(canvas, (20, 20), (50, 100), 255, -1)
    cv2.circle(canvas, (70, 60), 12, 0, -1)
    contours, _ = cv2.findContours(canvas, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    polygons = [c.reshape(-1, 2) * 3 for c in contours]  # level-0 scaled, as CLAM does
    polygons.append(np.array([[0, 0], [30, 0], [30, 30], [15, 45], [0, 30]]))  # with a horizontal edge
    for polygon in polygons:
        points = rng.integers(-5, 370, size=(3000, 2))
        points = np.concatenate([points, polygon[::7]])  # vertices: on the boundary
        expected = np.array([cv2.pointPolygonTest(polygon.reshape(-1, 1, 2).astype(np.int32),
                                                  (int(x), int(y)), False) for x, y in points])
        assert np.array_equal(polygon_point_test(polygon, points), expected.astype(np.int8))


def test_tissue_fractions_match_direct_means():
    rng = np.random.default_rng(2)
    mask = (rng.random((90, 70)) > 0.6).astype(np.uint8)
    scale = (8.0, 8.0)  # one mask px = 8 level-0 px
    xs = np.arange(0, 70 * 8 - 64 + 1, 64)
    ys = np.arange(0, 90 * 8 - 64 + 1, 64)
    fractions = tissue_fractions(mask, xs, ys, 64.0, scale)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            assert fractions[i, j] == pytest.approx(mask[y // 8:(y + 64) // 8, x // 8:(x + 64) // 8].mean())


def test_rasterise_keeps_islands_inside_holes():
    image = np.zeros((100, 100), np.uint8)
    cv2.rectangle(image, (5, 5), (94, 94), 255, -1)
    cv2.rectangle(image, (25, 25), (74, 74), 0, -1)  # a hole
    cv2.rectangle(image, (40, 40), (59, 59), 255, -1)  # tissue island in the hole
    regions = find_tissue_regions(image, min_area=10, min_hole_area=10, max_n_holes=None)
    mask = rasterise(regions, image.shape)
    assert mask[10, 10] == 1 and mask[30, 30] == 0 and mask[50, 50] == 1


# ---------------------------------------------------------------- read planning


def test_read_plan_picks_level_and_read_size(tmp_path: Path, test_data: Path):
    rgb = np.full((2048, 2048, 3), 230, np.uint8)
    path = write_pyramid_tiff(tmp_path / "scan40x.tiff", rgb, mpp=0.25, downsamples=(1, 4, 16))
    with opened(path, default_mpp=0.5) as slide:
        plan = plan_read(slide.info, TilingParams(target_mpp=0.5))
        assert (plan.level, plan.read_size) == (0, 512)  # no 2x level: read 512 at level 0, resize to 256
        plan = plan_read(slide.info, TilingParams(target_mpp=1.0))
        assert (plan.level, plan.read_size, plan.patch_size_level0) == (1, 256, 1024)  # exact level
        plan = plan_read(slide.info, TilingParams(target_mpp=2.5))
        assert (plan.level, plan.read_size) == (1, 640)
        with pytest.raises(SlideError, match="coarser than the target"):
            plan_read(slide.info, TilingParams(target_mpp=0.1))
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        plan = plan_read(slide.info, TilingParams())
        # 0.499 µm/px is 0.5 within tolerance: read 256 px as they are.
        assert (plan.level, plan.read_size) == (0, 256)


# ---------------------------------------------------------------- tiling


def test_default_mode_on_real_slide(test_data: Path):
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        result = tile_slide(slide, TilingParams())
    assert 30 <= result.n_patches <= 88 and result.reason is None
    coords = result.coords
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    assert (coords % 256 == 0).all()  # one grid from the corner, step = 256 level-0 px
    assert (coords[:, 0] + 256 <= 2220).all() and (coords[:, 1] + 256 <= 2967).all()
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert np.array_equal(order, np.arange(len(coords)))  # row-major reading order
    # The top-left corner of this slide is glass.
    assert not ((coords[:, 0] == 0) & (coords[:, 1] == 0)).any()
    stricter = None
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        stricter = tile_slide(slide, TilingParams(min_tissue=0.9))
    assert 0 < stricter.n_patches < result.n_patches


def test_default_mode_reads_a_larger_region_on_a_40x_pyramid(tmp_path: Path, test_data: Path):
    rgb = real_tissue_rgb(test_data)
    # The real tissue, upsampled 2x as if scanned at 0.25 µm/px, levels 1, 4, 16.
    big = cv2.resize(rgb, (rgb.shape[1] * 2, rgb.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    path = write_pyramid_tiff(tmp_path / "scan40x.tiff", big, mpp=0.2495, downsamples=(1, 4, 16))
    with opened(path, default_mpp=0.5) as slide:
        result = tile_slide(slide, TilingParams())
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        reference = tile_slide(slide, TilingParams())
    assert result.attrs["patch_level"] == 0 and result.attrs["read_size"] == 512
    # CLAM reads `patch_size` px at `patch_level`: the 512 px read, which our reader resizes to 256.
    assert result.attrs["patch_size"] == 512 and result.attrs["target_patch_size"] == 256
    assert result.attrs["patch_size_level0"] == 512
    assert round(result.attrs["patch_size"] * result.attrs["level0_magnification"]
                 / result.attrs["target_magnification"]) == 512
    assert result.attrs["seg_source"] != "level 0"  # segmented on a pyramid level, not level 0
    # Same tissue, same physical grid: the same patches, at twice the coordinates.
    assert coordinate_jaccard(result.coords // 2, reference.coords) >= 0.9


def test_tissue_free_and_too_small_slides_have_no_patches(tmp_path: Path, test_data: Path):
    with opened(blank_slide(tmp_path / "blank.tiff"), default_mpp=0.5) as slide:
        blank = tile_slide(slide, TilingParams())
    assert blank.n_patches == 0 and blank.reason == "no tissue found"
    with opened(test_data / "wsi" / "small.svs", default_mpp=0.5) as slide:
        small = tile_slide(slide, TilingParams())
    assert small.n_patches == 0 and "smaller than one patch" in small.reason


def test_clam_mode_matches_clam_coordinates(test_data: Path, clam_reference: Path):
    with h5py.File(clam_reference / "cmu-1-small-region_coords.h5", "r") as handle:
        reference = handle["coords"][:]
        reference_attrs = dict(handle["coords"].attrs)
    params = TilingParams(mode="clam", clam=ClamParams.from_preset_csv(clam_reference / "params.csv"))
    assert (params.clam.a_t, params.clam.a_h, params.clam.sthresh, params.clam.contour_fn) == (1, 1, 8, "four_pt")
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        result = tile_slide(slide, params)
    jaccard = coordinate_jaccard(result.coords, reference)
    print(f"CLAM parity on cmu-1-small-region.svs: Jaccard {jaccard:.4f} "
          f"({result.n_patches} ours vs {len(reference)} CLAM)")
    assert jaccard >= 0.95
    for key in ("patch_size", "patch_level", "name"):
        assert result.attrs[key] == reference_attrs[key]
    for key in ("downsample", "level_dim", "downsampled_level_dim"):
        assert np.array_equal(result.attrs[key], reference_attrs[key])


def test_clam_preset_and_contour_rules(tmp_path: Path, test_data: Path, clam_reference: Path):
    base = ClamParams.from_preset_csv(clam_reference / "params.csv")
    counts = {}
    for rule in ("four_pt", "four_pt_hard", "center", "basic"):
        params = TilingParams(mode="clam", clam=ClamParams(**{**base.__dict__, "contour_fn": rule}))
        with opened(real_slide(test_data), default_mpp=0.5) as slide:
            counts[rule] = tile_slide(slide, params).n_patches
    # four_pt (any of 4 points inside) is the most lenient, four_pt_hard (all 4) the strictest.
    assert counts["four_pt"] >= counts["center"] >= counts["four_pt_hard"] > 0
    # CLAM's own default area filter (a_t=100 reference patches) drops all tissue of this small slide.
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        assert tile_slide(slide, TilingParams(mode="clam")).n_patches == 0


def test_coords_file_round_trip_and_clam_reading(tmp_path: Path, test_data: Path):
    with opened(real_slide(test_data), default_mpp=0.5) as slide:
        result: TilingResult = tile_slide(slide, TilingParams())
    path = write_coords_h5(tmp_path / "out" / "cmu-1-small-region.h5", result)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    loaded = read_coords_h5(path)
    assert np.array_equal(loaded.coords, result.coords)
    assert loaded.read_size == 256 and loaded.patch_level == 0
    for key in ("patch_size", "patch_level", "downsample", "level_dim", "downsampled_level_dim", "name",
                "target_mpp", "read_size", "target_patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                "min_tissue", "seg_sthresh", "mpp_source"):
        assert key in loaded.attrs, key
    # TRIDENT derives the level-0 field of view from the magnifications.
    attrs = loaded.attrs
    assert round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]) \
        == attrs["patch_size_level0"]
