"""Lymph nodes and tumour regions of a real (small) slide: three discs of tissue on glass, tumour
discs in two, a speck of debris; written as a pyramidal TIFF, tiled by the real tiling, and given a
perfect classifier's probabilities. The nodes, areas, T/MLN and files are compared with the planted
truth."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.catalogue import LYMPH_NODE_REGIONS, LYMPH_NODE_TABLE
from gcmlm_assets.pathology.coords_h5 import read_coords_h5
from gcmlm_assets.pathology.lymph_nodes.patient import (
    LymphNodeInputError, analyse_patient, node_problems, read_regions, slide_files, tissue_problems)
from gcmlm_assets.pathology.lymph_nodes.patient_row import (
    lymph_node_row_problems, read_row, row_schema, row_table, write_row_table)
from gcmlm_assets.pathology.lymph_nodes.regions import analyse_slide, tumour_regions_on_grid
from gcmlm_assets.pathology.lymph_nodes.settings import LymphNodeFields
from gcmlm_assets.pathology.lymph_nodes.slide_outputs import CLEAN_COLOUR, METASTATIC_COLOUR, NODE_CLASS, TUMOUR_CLASS
from gcmlm_assets.pathology.qupath_geojson import geojson_problems
from gcmlm_assets_tests.support.pathology.lymph_node_slides import (
    DEBRIS, NODES, perfect_probabilities, tiled_patient, write_lymph_node_slide)

SLIDE = "ln1"
# The test slide's nodes are 0.05-0.09 mm²; the debris (0.0016 mm²) stays under this.
SETTINGS = LymphNodeFields(min_node_area_mm2=0.02)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ln")
    slide = write_lymph_node_slide(root / "ln_wsi" / f"{SLIDE}.tiff")
    listing = tiled_patient(root / "ln_patch_coords", [slide])
    entry = listing["slides"][0]
    return listing, read_coords_h5(entry["h5"]).coords, float(entry["patch_size_level0"])


def lone_false_positive(grid, side):
    """A patch well inside the clean node, called tumour: a one-patch region, dropped as noise."""
    centres = grid + side / 2
    clean = NODES[0].disc
    return int(np.argmin((centres[:, 0] - clean.x) ** 2 + (centres[:, 1] - clean.y) ** 2))


@pytest.fixture(scope="module")
def analysed(tiled, tmp_path_factory):
    listing, grid, side = tiled
    probabilities = perfect_probabilities(grid, side)
    probabilities[lone_false_positive(grid, side)] = 0.9
    out = tmp_path_factory.mktemp("lymph_nodes")
    # Given in reverse order: the analysis puts them in the HDF5's order by position.
    summary = analyse_patient(listing, {SLIDE: (grid[::-1], probabilities[::-1])}, out, SETTINGS,
                              classifier={"version": "v1", "fingerprint": "abc"})
    return out, summary, probabilities


def relative_error(found: float, truth: float) -> float:
    return abs(found - truth) / truth


def test_nodes_areas_and_t_mln_match_the_planted_truth(analysed):
    out, summary, _ = analysed
    regions = read_regions(out)
    nodes = regions["slides"][0]["nodes"]
    assert [node["id"] for node in nodes] == [1, 2, 3]  # the debris is not a node
    for node, planted in zip(nodes, NODES):
        assert relative_error(node["area_mm2"], planted.disc.area_mm2()) < 0.03
        assert node["metastatic"] is (planted.tumour is not None)
        truth = planted.tumour.area_mm2() if planted.tumour else 0.0
        assert node["tumour_area_mm2"] == 0.0 if not truth else relative_error(node["tumour_area_mm2"], truth) < 0.1
    assert nodes[0]["n_tumour_patches"] == 0 and regions["slides"][0]["n_above_threshold"] > \
        regions["slides"][0]["n_tumour_patches"]  # the lone false positive is counted, then dropped

    tumour = sum(p.tumour.area_mm2() for p in NODES if p.tumour)
    metastatic = sum(p.disc.area_mm2() for p in NODES if p.tumour)
    row = read_row(LYMPH_NODE_TABLE.in_folder(out))
    assert (row["n_slides"], row["n_nodes"], row["n_metastatic_nodes"]) == (1, 3, 2)
    assert relative_error(row["tumour_area_mm2"], tumour) < 0.1
    assert relative_error(row["metastatic_node_area_mm2"], metastatic) < 0.03
    assert relative_error(row["t_mln"], tumour / metastatic) < 0.1
    assert row["t_mln"] == pytest.approx(row["tumour_area_mm2"] / row["metastatic_node_area_mm2"])
    assert regions["totals"] == row and {k: summary[k] for k in row} == row
    assert regions["classifier"] == {"version": "v1", "fingerprint": "abc"}
    assert lymph_node_row_problems(LYMPH_NODE_TABLE.in_folder(out)) == []
    assert node_problems(regions, SETTINGS) == []
    assert sorted(summary["files"]) == sorted([*slide_files(SLIDE).values(), LYMPH_NODE_TABLE.name,
                                               LYMPH_NODE_REGIONS.name])


def test_geojson_outlines_lie_on_the_planted_discs(analysed, tiled):
    out, _, _ = analysed
    _, _, side = tiled
    collection = json.loads((out / slide_files(SLIDE)["geojson"]).read_text(encoding="utf-8"))
    assert geojson_problems(collection, 2048, 1536) == []
    by_class = {}
    for feature in collection["features"]:
        by_class.setdefault(feature["properties"]["classification"]["name"], []).append(feature)
    assert [f["properties"]["name"] for f in by_class[NODE_CLASS]] == ["Node 1", "Node 2", "Node 3"]
    for feature, planted in zip(by_class[NODE_CLASS], NODES):
        ring = np.asarray(feature["geometry"]["coordinates"][0], np.float64)
        distance = np.hypot(ring[:, 0] - planted.disc.x, ring[:, 1] - planted.disc.y)
        assert np.all(np.abs(distance - planted.disc.r) <= side)
        assert feature["properties"]["measurements"]["metastatic"] == int(planted.tumour is not None)
    tumours = by_class[TUMOUR_CLASS]
    assert sorted(f["properties"]["measurements"]["node_id"] for f in tumours) == [2, 3]
    for feature in tumours:
        planted = NODES[feature["properties"]["measurements"]["node_id"] - 1].tumour
        ring = np.asarray(feature["geometry"]["coordinates"][0], np.float64)
        distance = np.hypot(ring[:, 0] - planted.x, ring[:, 1] - planted.y)
        assert np.all(np.abs(distance - planted.r) <= side * math.sqrt(2))  # squares' corners reach further
        assert relative_error(feature["properties"]["measurements"]["area_mm2"], planted.area_mm2()) < 0.1


def test_patches_table_gives_each_patch_its_probability_and_node(analysed, tiled):
    out, _, probabilities = analysed
    _, grid, side = tiled
    table = pq.read_table(out / slide_files(SLIDE)["patches"])
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("slide", "string"), ("x", "int64"), ("y", "int64"), ("tumour_probability", "double"), ("node_id", "int64")]
    assert np.array_equal(np.stack([table["x"].to_numpy(), table["y"].to_numpy()], axis=1), grid)
    assert np.array_equal(table["tumour_probability"].to_numpy(), probabilities)
    node_ids = table["node_id"].to_numpy()
    centres = grid + side / 2
    for node_id, planted in enumerate(NODES, start=1):
        well_inside = dataclasses.replace(planted.disc, r=planted.disc.r - side).contains(centres)
        assert well_inside.any() and np.all(node_ids[well_inside] == node_id)
    assert np.all(node_ids[DEBRIS.contains(centres)] == 0)


def test_picture_outlines_metastatic_nodes_red_and_clean_green(analysed):
    import cv2

    out, _, _ = analysed
    image = cv2.cvtColor(cv2.imread(str(out / slide_files(SLIDE)["picture"])), cv2.COLOR_BGR2RGB)
    assert image.shape[1] >= 1000
    for colour in (METASTATIC_COLOUR, CLEAN_COLOUR):
        assert np.all(image == np.asarray(colour, np.uint8), axis=2).sum() > 100


def test_without_a_metastatic_node_t_mln_is_null_not_zero(tiled, tmp_path):
    listing, grid, _ = tiled
    summary = analyse_patient(listing, {SLIDE: (grid, np.full(len(grid), 0.05))}, tmp_path, SETTINGS)
    assert summary["n_nodes"] == 3 and summary["n_metastatic_nodes"] == 0 and summary["t_mln"] is None
    path = LYMPH_NODE_TABLE.in_folder(tmp_path)
    assert pq.read_table(path).column("t_mln").null_count == 1
    assert lymph_node_row_problems(path) == []
    collection = json.loads((tmp_path / slide_files(SLIDE)["geojson"]).read_text(encoding="utf-8"))
    assert {f["properties"]["classification"]["name"] for f in collection["features"]} == {NODE_CLASS}


GOOD_ROW = {"patient_id": "P1", "n_slides": 1, "n_nodes": 3, "n_metastatic_nodes": 1, "tumour_area_mm2": 0.02,
            "metastatic_node_area_mm2": 0.08, "t_mln": 0.25}


@pytest.mark.parametrize("change, expected", [
    ({"n_metastatic_nodes": 0, "tumour_area_mm2": 0.0, "metastatic_node_area_mm2": 0.0, "t_mln": 0.0}, "null"),
    ({"n_metastatic_nodes": 0, "tumour_area_mm2": 0.0, "metastatic_node_area_mm2": 0.0, "t_mln": float("nan")},
     "null"),
    ({"t_mln": 1.5, "tumour_area_mm2": 0.12}, "outside [0, 1]"),
    ({"t_mln": None}, "null with 1 metastatic"),
    ({"t_mln": 0.5}, "not tumour_area_mm2 / metastatic_node_area_mm2"),
    ({"tumour_area_mm2": -0.01}, "not an area"),
    ({"n_metastatic_nodes": 4}, "exceeds n_nodes"),
])
def test_row_validator_catches_a_bad_row(tmp_path, change, expected):
    path = tmp_path / LYMPH_NODE_TABLE.name
    assert lymph_node_row_problems(write_row_table(path, GOOD_ROW)) == []
    pq.write_table(row_table({**GOOD_ROW, **change}), path)  # written past write_row_table's own check
    problems = lymph_node_row_problems(path)
    assert problems and any(expected in problem for problem in problems), problems
    with pytest.raises(ValueError, match="would be invalid"):
        write_row_table(tmp_path / "again" / LYMPH_NODE_TABLE.name, {**GOOD_ROW, **change})
    assert not (tmp_path / "again" / LYMPH_NODE_TABLE.name).exists()


def test_row_validator_checks_the_schema_and_one_row(tmp_path):
    path = tmp_path / LYMPH_NODE_TABLE.name
    pq.write_table(pa.Table.from_pylist([GOOD_ROW, GOOD_ROW], schema=row_schema()), path)
    assert "2 rows" in lymph_node_row_problems(path)[0]
    narrow = pa.schema([pa.field(f.name, pa.int32()) if f.name == "n_nodes" else f for f in row_schema()])
    pq.write_table(pa.Table.from_pylist([GOOD_ROW], schema=narrow), path)
    assert "columns" in lymph_node_row_problems(path)[0]
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in GOOD_ROW.items() if k != "t_mln"}]), path)
    assert "columns" in lymph_node_row_problems(path)[0]
    path.write_bytes(b"not parquet")
    assert "cannot be read" in lymph_node_row_problems(path)[0]


def test_node_and_tissue_checks_catch_tampered_outputs(analysed, tiled, tmp_path):
    listing, _, _ = tiled
    out = tmp_path / "copy"
    shutil.copytree(analysed[0], out)
    assert tissue_problems(listing, out) == []
    regions = read_regions(out)
    assert any("more than the plausible" in p for p in node_problems(regions, LymphNodeFields(max_nodes_per_slide=2)))
    assert any("outside (0, 0.06]" in p for p in node_problems(regions, LymphNodeFields(max_node_area_mm2=0.06)))
    regions["slides"][0]["nodes"][1]["metastatic"] = False
    regions["totals"]["n_nodes"] = 4
    problems = node_problems(regions, SETTINGS)
    assert any("node 2: metastatic is False" in p for p in problems) and any("n_nodes is 4" in p for p in problems)

    geojson = out / slide_files(SLIDE)["geojson"]
    collection = json.loads(geojson.read_text(encoding="utf-8"))
    node = next(f for f in collection["features"] if f["properties"]["name"] == "Node 1")
    node["geometry"]["coordinates"] = [[[x, y + 700] for x, y in ring] for ring in node["geometry"]["coordinates"]]
    geojson.write_text(json.dumps(collection), encoding="utf-8")
    assert any("Node 1 lies" in p and "outside the slide's tissue" in p for p in tissue_problems(listing, out))


def test_bad_inputs_are_refused_and_leave_the_output_as_it_was(analysed, tiled, tmp_path):
    listing, grid, side = tiled
    out = tmp_path / "copy"
    shutil.copytree(analysed[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    good = perfect_probabilities(grid, side)
    shifted = grid.copy()
    shifted[0] += 1
    for probabilities, message in [
        ({SLIDE: (shifted, good)}, "not its patch grid's"),
        ({SLIDE: (grid[:-1], good[:-1])}, "another tiling"),
        ({SLIDE: (grid, np.where(good > 0.5, np.nan, good))}, "finite and in"),
        ({SLIDE: (grid, good), "other": (grid, good)}, "does not list"),
        ({}, "no probabilities"),
    ]:
        with pytest.raises(LymphNodeInputError, match=message):
            analyse_patient(listing, probabilities, out, SETTINGS)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing half-written, no temporary left


def test_bad_inputs_name_the_listing_and_the_probabilities_file_when_given(tiled, tmp_path):
    listing, grid, side = tiled
    good = perfect_probabilities(grid, side)
    listing_path, source = tmp_path / "ln_patch_coords" / "slides.json", tmp_path / "ln_features" / f"{SLIDE}.h5"
    named = dict(listing_path=listing_path, sources={SLIDE: source, "other": tmp_path / "other.h5"})
    with pytest.raises(LymphNodeInputError) as unlisted:
        analyse_patient(listing, {SLIDE: (grid, good), "other": (grid, good)}, tmp_path / "out", SETTINGS, **named)
    assert str(unlisted.value).startswith(f"{listing_path}: lists the slide(s) {SLIDE};")
    assert f"other ({tmp_path / 'other.h5'})" in str(unlisted.value)
    with pytest.raises(LymphNodeInputError, match="slides.json.*no probabilities"):
        analyse_patient(listing, {}, tmp_path / "out", SETTINGS, **named)
    with pytest.raises(LymphNodeInputError) as misaligned:
        analyse_patient(listing, {SLIDE: (grid[:-1], good[:-1])}, tmp_path / "out", SETTINGS, **named)
    assert str(misaligned.value).startswith(f"{source}: slide {SLIDE!r}: probabilities for")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_tumour_regions_join_diagonal_neighbours_and_drop_small_ones():
    side = 10
    coords = np.array([[0, 0], [10, 10], [20, 20], [100, 100], [200, 0], [210, 0]])
    tumour = np.array([True, True, True, True, True, False])
    regions = tumour_regions_on_grid(coords, side, tumour, min_patches=2)
    assert regions.tolist() == [1, 1, 1, 0, 0, 0]
    # numbered in the grid's reading order
    assert tumour_regions_on_grid(coords, side, tumour, min_patches=1).tolist() == [1, 1, 1, 3, 2, 0]


def test_settings_are_a_plain_frozen_dataclass_with_the_design_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(LymphNodeFields)}
    assert fields["tumour_threshold"] == 0.5 and fields["min_tumour_patches"] == 2
    assert {"min_node_area_mm2", "max_node_area_mm2", "max_nodes_per_slide"} <= set(fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LymphNodeFields().tumour_threshold = 0.3  # type: ignore[misc]


def test_a_slide_without_patches_still_has_its_nodes_and_no_tumour():
    square = np.array([[100.0, 100.0], [700.0, 100.0], [700.0, 500.0], [100.0, 500.0]])
    hole = np.array([[300.0, 200.0], [400.0, 200.0], [400.0, 300.0], [300.0, 300.0]])
    slide = analyse_slide("empty", [(square, [hole])], np.zeros((0, 2)), np.zeros(0), mpp=(0.5, 0.5),
                          dimensions=(1000, 800), side_level0=32, tumour_threshold=0.5, min_tumour_patches=2,
                          min_node_area_mm2=0.0)
    assert slide.n_nodes == 1 and slide.n_metastatic_nodes == 0 and slide.tumour_regions == []
    assert slide.nodes[0].area_mm2 == pytest.approx((600 * 400 - 100 * 100) * 0.25e-6, rel=0.01)


def rectangle(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def test_tumour_patches_reaching_over_a_neighbouring_node_leave_it_clean():
    side = 32
    # Two nodes 4 px apart; 32 px patches on a 32 px grid, 2 px raster cells.
    metastatic, clean = rectangle(32, 32, 310, 320), rectangle(314, 20, 640, 320)
    coords = np.array([[x, y] for y in range(0, 352, side) for x in range(0, 672, side)], np.int64)
    probabilities = np.zeros(len(coords))
    # A tumour region at the metastatic node's edge: centres at x = 304 (inside it), squares reaching
    # x = 320, over the clean node's edge at 314.
    at_edge = (coords[:, 0] == 288) & np.isin(coords[:, 1], [64, 96, 128])
    # A tumour region outside both nodes (centres at y = 16), its squares reaching over the clean
    # node's top edge at y = 20.
    above = (coords[:, 1] == 0) & np.isin(coords[:, 0], [384, 416])
    probabilities[at_edge | above] = 0.9
    slide = analyse_slide("touching", [(metastatic, []), (clean, [])], coords, probabilities, mpp=(0.5, 0.5),
                          dimensions=(700, 400), side_level0=side, tumour_threshold=0.5, min_tumour_patches=2,
                          min_node_area_mm2=0.0)
    second, first = slide.nodes  # ordered by their tops: the clean node's (y = 20) comes first
    assert first.bbox[:2] == (32, 32) and second.bbox[:2] == (314, 20)
    assert slide.tumour_patch.sum() == 5  # both regions are kept...
    assert second.tumour_area_mm2 == 0.0 and not second.metastatic and second.n_tumour_patches == 0
    assert first.metastatic and first.n_tumour_patches == 3
    # ...and the metastatic node's tumour is its own cells under its squares: y 64-160, x 288 to its
    # edge at 310, give or take the column of 2 px cells on the outline (the clean node starts at 314).
    width = first.tumour_area_mm2 / (96 * 0.25e-6)
    assert 22 - 1e-6 <= width <= 24 + 1e-6
    assert slide.n_metastatic_nodes == 1 and [region.node_id for region in slide.tumour_regions] == [first.id]
    assert slide.tumour_area_mm2 / slide.metastatic_node_area_mm2 <= 1.0
