"""QuPath GeoJSON of a real slide: patch_coords' own tiling of cmu-1-small-region, and a patch file
written by risk_explanations' own writer; the GeoJSON is read back with json and compared."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gcmlm_assets.pathology.patch_coords import tile_patient, write_patient_outputs
from gcmlm_assets.pathology.slide_geojson import (
    GEOJSON_SUFFIX, OUTLINES_FOLDER, inputs_fingerprint, tiling_params_from_listing, write_patient_geojson)
from gcmlm_assets.pathology.coords_h5 import read_coords_h5
from gcmlm_assets.pathology.slide_error import SlideError
from gcmlm_assets.pathology.tiling_params import ClamParams, TilingParams
from gcmlm_assets.pathology.qupath_geojson import (
    GeoJsonInputError, closed_ring, geojson_problems, patch_tiles, write_geojson)
from gcmlm_assets_tests.support.pathology.patch_values import write_patch_values
from gcmlm_assets_tests.support.pathology.slide_fixtures import real_slide

SLIDE = "cmu-1-small-region"
VALUE_COLUMNS = ("contribution_pathology_logit", "contribution_fused_logit", "attention")


def tiled(folder: Path, slide: Path, params: TilingParams) -> Path:
    """patch_coords' outputs (slides.json + HDF5) of one slide, as the asset writes them."""
    write_patient_outputs(folder, "P1", tile_patient([slide], params), params)
    return folder


@pytest.fixture(scope="module")
def patch_coords_dir(tmp_path_factory, test_data: Path) -> Path:
    return tiled(tmp_path_factory.mktemp("patch_coords"), real_slide(test_data), TilingParams())


def parquet_rows(path: Path) -> dict[tuple[int, int], dict]:
    import pyarrow.parquet as pq

    return {(row["x"], row["y"]): row for row in pq.read_table(path).to_pylist()}


def read_geojson(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ring_area(ring) -> float:
    points = np.asarray(ring, np.float64)[:-1]
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def test_tiles_are_the_hdf5_grid_and_carry_the_parquet_values(patch_coords_dir: Path, tmp_path: Path):
    listing = json.loads((patch_coords_dir / "slides.json").read_text(encoding="utf-8"))
    entry = listing["slides"][0]
    grid = read_coords_h5(entry["h5"])
    values = write_patch_values(tmp_path / "patch_contributions.parquet", grid.coords)

    summary = write_patient_geojson(patch_coords_dir, tmp_path / "geojson", values)

    path = tmp_path / "geojson" / f"{SLIDE}{GEOJSON_SUFFIX}"
    collection = read_geojson(path)
    width, height = entry["dimensions"]
    assert geojson_problems(collection, width, height) == []
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        for ring in feature["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            for x, y in ring:
                assert math.isfinite(x) and math.isfinite(y)
                assert 0 <= x <= width and 0 <= y <= height

    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
    side = int(grid.attrs["patch_size_level0"])
    assert side == entry["patch_size_level0"] == 256
    corners = np.array([f["geometry"]["coordinates"][0][0] for f in tiles], np.int64)
    assert np.array_equal(corners, grid.coords)  # exactly the HDF5 rows, in their order
    rows = parquet_rows(values)
    for tile, (x, y) in zip(tiles, grid.coords.tolist()):
        assert tile["geometry"]["coordinates"] == [[[x, y], [x + side, y], [x + side, y + side], [x, y + side],
                                                    [x, y]]]
        expected = {name: rows[(x, y)][name] for name in VALUE_COLUMNS}
        assert tile["properties"]["measurements"] == expected  # exactly, not approximately

    tissue = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    assert tissue and all(f["properties"]["classification"]["name"] == "Tissue" for f in tissue)
    # the outlines, scaled to level 0, enclose the area the tiling measured as tissue
    area = sum(ring_area(f["geometry"]["coordinates"][0]) + sum(ring_area(h) for h in f["geometry"]["coordinates"][1:])
               for f in tissue)
    assert area == pytest.approx(entry["tissue_fraction"] * width * height, rel=0.05)
    for f in tissue:  # outer rings counter-clockwise, holes clockwise (RFC 7946)
        assert ring_area(f["geometry"]["coordinates"][0]) > 0
        assert all(ring_area(hole) < 0 for hole in f["geometry"]["coordinates"][1:])

    assert summary["slides"] == [{
        "slide": SLIDE, "file": path.name, "path": str(path), "tissue_regions": len(tissue), "tiles": len(grid.coords),
        "tiles_with_values": len(grid.coords), "measurements": sorted(VALUE_COLUMNS)}]
    assert summary["files"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_missing_value_is_left_out_and_no_values_give_the_bare_grid(patch_coords_dir: Path, tmp_path: Path):
    grid = read_coords_h5(patch_coords_dir / f"{SLIDE}.h5")
    values = write_patch_values(tmp_path / "patches.parquet", grid.coords, attention=False)
    write_patient_geojson(patch_coords_dir, tmp_path / "with", values)
    tiles = [f for f in read_geojson(tmp_path / "with" / f"{SLIDE}.geojson")["features"]
             if f["properties"]["objectType"] == "tile"]
    assert all(set(t["properties"]["measurements"]) == set(VALUE_COLUMNS) - {"attention"} for t in tiles)

    summary = write_patient_geojson(patch_coords_dir, tmp_path / "without")
    tiles = [f for f in read_geojson(tmp_path / "without" / f"{SLIDE}.geojson")["features"]
             if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(grid.coords) and not any("measurements" in t["properties"] for t in tiles)
    assert summary["slides"][0]["tiles_with_values"] == 0


def test_new_values_redraw_the_tiles_without_tiling_the_slide_again(test_data: Path, tmp_path: Path):
    # A new model re-explains every patient: the tissue outlines are kept, not made again. Shown
    # by taking the slide away after the first file: only the kept outlines can draw the second.
    slide = tmp_path / "slide" / real_slide(test_data).name
    slide.parent.mkdir()
    shutil.copyfile(real_slide(test_data), slide)
    folder = tiled(tmp_path / "patch_coords", slide, TilingParams())
    first = write_patient_geojson(folder, tmp_path / "out")
    slide.unlink()
    grid = read_coords_h5(folder / f"{SLIDE}.h5")
    second = write_patient_geojson(folder, tmp_path / "out", write_patch_values(tmp_path / "v.parquet", grid.coords))

    def tissue(summary):
        collection = read_geojson(Path(summary["slides"][0]["path"]))
        return [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]

    assert second["slides"][0]["tiles_with_values"] == len(grid.coords)
    assert tissue(second) == tissue(first) and tissue(first)
    # kept outlines of another listing entry (or damaged ones) are not used: the slide is tiled again
    kept = tmp_path / "out" / OUTLINES_FOLDER / f"{SLIDE}.json"
    kept.write_text(json.dumps({**json.loads(kept.read_text(encoding="utf-8")), "key": "another"}), encoding="utf-8")
    with pytest.raises(SlideError, match=re.escape(slide.name)):
        write_patient_geojson(folder, tmp_path / "out")


def test_values_from_another_grid_are_refused_and_nothing_is_written(patch_coords_dir: Path, tmp_path: Path):
    grid = read_coords_h5(patch_coords_dir / f"{SLIDE}.h5")
    shifted = write_patch_values(tmp_path / "shifted.parquet", grid.coords + np.array([1, 0]))
    out = tmp_path / "geojson"
    with pytest.raises(GeoJsonInputError, match=r"shifted\.parquet.*not in its patch grid"):
        write_patient_geojson(patch_coords_dir, out, shifted)
    other = write_patch_values(tmp_path / "other.parquet", grid.coords, slide_name="another-slide")
    with pytest.raises(GeoJsonInputError, match=r"other\.parquet: values for slide\(s\) another-slide"):
        write_patient_geojson(patch_coords_dir, out, other)
    assert not out.exists()


def test_a_listing_the_slide_no_longer_tiles_to_is_refused(patch_coords_dir: Path, tmp_path: Path):
    changed = tmp_path / "patch_coords"
    shutil.copytree(patch_coords_dir, changed)
    listing = json.loads((changed / "slides.json").read_text(encoding="utf-8"))
    listing["params"]["min_tissue"] = 0.95  # the grid these parameters give is not the stored one
    (changed / "slides.json").write_text(json.dumps(listing), encoding="utf-8")
    with pytest.raises(GeoJsonInputError, match="re-materialize patch_coords"):
        write_patient_geojson(changed, tmp_path / "geojson")

    listing["tiling_version"] = "0"
    (changed / "slides.json").write_text(json.dumps(listing), encoding="utf-8")
    with pytest.raises(GeoJsonInputError, match=r"slides\.json: made by tiling version '0'"):
        write_patient_geojson(changed, tmp_path / "geojson")


def test_clam_mode_grid_and_recorded_parameters(test_data: Path, tmp_path: Path):
    params = TilingParams(mode="clam", clam=ClamParams(seg_level=0, a_t=1.0, a_h=1.0))
    folder = tiled(tmp_path / "patch_coords", real_slide(test_data), params)
    listing = json.loads((folder / "slides.json").read_text(encoding="utf-8"))
    assert tiling_params_from_listing(listing["params"]) == params
    assert tiling_params_from_listing(TilingParams().as_dict()) == TilingParams()

    write_patient_geojson(folder, tmp_path / "geojson")
    entry = listing["slides"][0]
    collection = read_geojson(tmp_path / "geojson" / f"{SLIDE}.geojson")
    # CLAM pads: its edge patches may reach one patch beyond the slide
    assert geojson_problems(collection, *entry["dimensions"], tile_overhang=entry["patch_size_level0"]) == []
    corners = [f["geometry"]["coordinates"][0][0] for f in collection["features"]
               if f["properties"]["objectType"] == "tile"]
    assert np.array_equal(np.array(corners, np.int64), read_coords_h5(entry["h5"]).coords)


def test_fingerprint_follows_the_grid_and_the_values():
    listing = {"params": {"mode": "default"}, "slides": [{"name": "a", "h5_sha256": "1"}]}
    base = inputs_fingerprint(listing, "v1")
    assert inputs_fingerprint(listing, "v1") == base
    assert inputs_fingerprint(listing, "v2") != base
    assert inputs_fingerprint({**listing, "slides": [{"name": "a", "h5_sha256": "2"}]}, "v1") != base


def test_rings_are_closed_and_wound_and_invalid_numbers_are_refused(tmp_path: Path):
    # a clockwise square with a repeated vertex and a straight-through one
    ring = closed_ring([[0, 0], [0, 10], [0, 10], [10, 10], [10, 5], [10, 0]], counter_clockwise=True)
    assert ring == [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    assert closed_ring([[0, 0], [5, 5], [10, 10]], counter_clockwise=True) is None  # no area
    with pytest.raises(ValueError, match="3 values for 2 patches"):
        patch_tiles([[0, 0], [256, 0]], 256, {"attention": [0.1, 0.2, 0.3]})

    collection = {"type": "FeatureCollection", "features": patch_tiles([[0, 0]], 256)}
    collection["features"][0]["properties"]["measurements"] = {"attention": float("nan")}
    with pytest.raises(ValueError):
        write_geojson(tmp_path / "bad.geojson", collection)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind
    assert geojson_problems(collection, 100, 100) == [
        "feature 0: coordinate (256, 0) lies outside the slide (100 x 100)",
        "feature 0: coordinate (256, 256) lies outside the slide (100 x 100)",
        "feature 0: coordinate (0, 256) lies outside the slide (100 x 100)",
        "feature 0: measurement 'attention' is not a finite number"]
