"""One patient's lymph-node analysis: every slide of ln_patch_coords' listing, its files, and the
helpers of the asset's checks (plain Python, no Dagster).

`analyse_patient` takes the listing (`slides.json`, same format as patch_coords') and each
slide's patch probabilities, finds each slide's nodes and tumour regions (regions.py), and writes
into the asset's folder, per slide `<slide>.png`, `<slide>.geojson` and `<slide>.patches.parquet`,
and for the patient the one-row `lymph_nodes.parquet` and `regions.json` (what was found, slide by
slide and node by node). Everything is computed and checked before anything is written; the files
are staged under temporary names and renamed together at the end (storage.files_replaced_together),
so a failure leaves the previous output as it was.

The tissue outlines are made again by the tiling's own code (slide_geojson.cached_tissue_polygons:
refused when the grid differs from the stored one) and kept in `.tissue_outlines/` beside the files,
so the check "every node inside its tissue" reads them without tiling again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from gcmlm_assets.catalogue import LN_SLIDE_LISTING, LYMPH_NODE_REGIONS, LYMPH_NODE_TABLE
from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.coords_h5 import read_coords_h5
from gcmlm_assets.pathology.lymph_nodes.patient_row import patient_row, row_table, row_value_problems, t_mln
from gcmlm_assets.pathology.lymph_nodes.regions import (
    SlideNodes, SlideRaster, analyse_slide, polygon_area, slide_raster)
from gcmlm_assets.pathology.lymph_nodes.settings import LYMPH_NODE_DEFAULTS, LymphNodeFields
from gcmlm_assets.pathology.lymph_nodes.slide_outputs import (
    NODE_CLASS, TUMOUR_CLASS, draw_slide_picture, patches_table, slide_geojson, slide_thumbnail)
from gcmlm_assets.pathology.qupath_geojson import geojson_problems
from gcmlm_assets.pathology.slide_geojson import (
    GEOJSON_SUFFIX, OUTLINES_FOLDER, cached_tissue_polygons, tiling_params_from_listing)
from gcmlm_assets.pathology.tiling_params import TILING_VERSION
from gcmlm_assets.pictures import rgb_png
from gcmlm_assets.storage import atomic_write_bytes, files_replaced_together, sha256_file

np = lazy("numpy")
pq = lazy("pyarrow.parquet")

PICTURE_SUFFIX = ".png"
PATCHES_SUFFIX = ".patches.parquet"
SLIDE_SUFFIXES = (PICTURE_SUFFIX, GEOJSON_SUFFIX, PATCHES_SUFFIX)
# Node cells outside the tissue raster tolerated by the check: the outlines are the same polygons
# drawn again, so only cells grazed by an edge may differ.
OUTSIDE_TISSUE_TOLERANCE = 0.01


class LymphNodeInputError(ValueError):
    """The inputs do not fit together (names the file or slide and the problem)."""


def slide_files(name: str) -> dict[str, str]:
    """A slide's file names in the asset's folder, keyed as regions.json keys them."""
    return {"picture": f"{name}{PICTURE_SUFFIX}", "geojson": f"{name}{GEOJSON_SUFFIX}",
            "patches": f"{name}{PATCHES_SUFFIX}"}


def aligned_probabilities(slide: str, grid, coords, probabilities, *, source: str | os.PathLike | None = None):
    """`probabilities` (given at `coords`, any order) in the order of the HDF5 `grid`. Refused
    unless both hold the same positions once each, and every value is a probability. `source`: the
    file they were read from (the slide's ln_features HDF5), named in the messages with the slide."""
    where = f"{source}: slide {slide!r}" if source is not None else f"slide {slide!r}"
    grid = np.asarray(grid, np.int64).reshape(-1, 2)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    values = np.asarray(probabilities, np.float64).reshape(-1)
    if len(values) != len(coords):
        raise LymphNodeInputError(f"{where}: {len(values)} probabilities for {len(coords)} positions")
    if len(coords) != len(grid):
        raise LymphNodeInputError(f"{where}: probabilities for {len(coords)} patches, its patch grid has "
                                  f"{len(grid)}: the features were made from another tiling; extract them again")
    if not np.all(np.isfinite(values)) or values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
        raise LymphNodeInputError(f"{where}: tumour probabilities must be finite and in [0, 1]")

    def key(points):  # (x, y) as one sortable integer: level-0 px are far below 2**31
        return (points[:, 0] << 32) | (points[:, 1] & 0xFFFFFFFF)

    grid_keys, given_keys = key(grid), key(coords)
    order = np.argsort(given_keys, kind="stable")
    found = np.clip(np.searchsorted(given_keys[order], grid_keys), 0, max(len(order) - 1, 0))
    if len(np.unique(given_keys)) != len(given_keys) or (len(grid) and not np.array_equal(
            given_keys[order][found], grid_keys)):
        raise LymphNodeInputError(f"{where}: the probabilities' positions are not its patch grid's: the "
                                  "features were made from another tiling; extract them again")
    return values[order][found] if len(grid) else values


def _grid(entry: dict):
    if not entry.get("h5"):
        return np.zeros((0, 2), np.int64)
    path = Path(entry["h5"])
    if not path.is_file():
        raise LymphNodeInputError(f"{path}: the patch coordinates of {entry['file']} are missing: re-materialize "
                                  "ln_patch_coords")
    if entry.get("h5_sha256") and sha256_file(path) != entry["h5_sha256"]:
        raise LymphNodeInputError(f"{path}: changed since the listing was written (sha256 differs): "
                                  "re-materialize ln_patch_coords")
    return read_coords_h5(path).coords


def _slide_record(entry: dict, slide: SlideNodes) -> dict:
    return {
        "name": slide.name, "file": entry["file"], "mpp": list(slide.mpp), "dimensions": list(slide.dimensions),
        "patch_size_level0": slide.patch_side_level0, "raster_cell_level0": slide.raster_cell_level0,
        "n_patches": int(len(slide.coords)), "n_above_threshold": slide.n_above_threshold,
        "n_tumour_patches": int(slide.tumour_patch.sum()), "n_tumour_regions": len(slide.tumour_regions),
        **slide_files(slide.name),
        "nodes": [{"id": node.id, "area_mm2": node.area_mm2, "tumour_area_mm2": node.tumour_area_mm2,
                   "metastatic": node.metastatic, "n_patches": node.n_patches,
                   "n_tumour_patches": node.n_tumour_patches, "bbox_level0": [round(v, 2) for v in node.bbox]}
                  for node in slide.nodes],
    }


def slide_summary(slide: SlideNodes) -> dict:
    """A slide's line of the asset's table."""
    return {"slide": slide.name, "n_patches": int(len(slide.coords)), "n_tumour_patches": int(slide.tumour_patch.sum()),
            "n_nodes": slide.n_nodes, "n_metastatic_nodes": slide.n_metastatic_nodes,
            "tumour_area_mm2": slide.tumour_area_mm2, "metastatic_node_area_mm2": slide.metastatic_node_area_mm2,
            "t_mln": t_mln(slide.tumour_area_mm2, slide.metastatic_node_area_mm2, slide.n_metastatic_nodes)}


def analyse_patient(listing: dict, probabilities: Mapping[str, tuple], out_dir: str | os.PathLike,
                    settings: LymphNodeFields = LYMPH_NODE_DEFAULTS, *, classifier: Mapping | None = None,
                    withdraw: str | os.PathLike | None = None, listing_path: str | os.PathLike | None = None,
                    sources: Mapping[str, str | os.PathLike] | None = None) -> dict:
    """Analyse every slide of `listing` (ln_patch_coords' slides.json, as read) with
    `probabilities` {slide name: (coords (N, 2) level-0, tumour probability (N,))} (a slide without
    patches may be left out) and write all of the patient's files into `out_dir`. `classifier`: what
    regions.json records of the model (version id, fingerprint); `withdraw`: the output's manifest,
    removed before the first rename (storage.files_replaced_together); `listing_path` (the
    slides.json read) and `sources` {slide name: the file its probabilities came from}: named in
    the error messages. Returns the row, a summary line per slide (`slides`) and `files`
    {name: sha256}."""
    out_dir = Path(out_dir)
    listing_name = str(listing_path) if listing_path is not None else f"the slide listing ({LN_SLIDE_LISTING.name})"
    sources = sources or {}
    if listing.get("tiling_version") != TILING_VERSION:
        raise LymphNodeInputError(f"{listing_name}: made by tiling version {listing.get('tiling_version')!r}, "
                                  f"this code tiles as version {TILING_VERSION!r}: re-materialize ln_patch_coords")
    params = tiling_params_from_listing(listing["params"])
    names = {entry["name"] for entry in listing["slides"]}
    unknown = sorted(set(probabilities) - names)
    if unknown:
        given = ", ".join(f"{name} ({sources[name]})" if name in sources else name for name in unknown)
        listed = ", ".join(sorted(names)[:10]) + (", ..." if len(names) > 10 else "") if names else "none"
        raise LymphNodeInputError(f"{listing_name}: lists the slide(s) {listed}; probabilities were given for "
                                  f"slide(s) {given} that it does not list: re-materialize ln_features")
    slides, staged, outlines = [], {}, {}
    for entry in listing["slides"]:  # all computed and checked before anything is written
        name = entry["name"]
        grid = _grid(entry)
        if name in probabilities:
            coords, values = probabilities[name]
            values = aligned_probabilities(name, grid, coords, values, source=sources.get(name))
        elif len(grid):
            raise LymphNodeInputError(f"{listing_name}: slide {name!r} has {len(grid)} patches but no "
                                      "probabilities were given for it")
        else:
            values = np.zeros(0, np.float64)
        polygons = cached_tissue_polygons(entry, params, grid, out_dir / OUTLINES_FOLDER, outlines)
        slide = analyse_slide(name, polygons, grid, values, mpp=entry["mpp"], dimensions=entry["dimensions"],
                              side_level0=float(entry["patch_size_level0"]),
                              tumour_threshold=settings.tumour_threshold,
                              min_tumour_patches=settings.min_tumour_patches,
                              min_node_area_mm2=settings.min_node_area_mm2)
        collection = slide_geojson(slide)
        problems = geojson_problems(collection, *slide.dimensions)
        if problems:
            raise LymphNodeInputError(f"{entry['slide_path']}: the GeoJSON would be invalid: {'; '.join(problems[:5])}")
        thumbnail, scale = slide_thumbnail(entry["slide_path"], default_mpp=params.default_mpp,
                                           plausible_mpp=params.plausible_mpp)
        files = slide_files(name)
        staged[files["picture"]] = rgb_png(draw_slide_picture(thumbnail, scale, slide))
        staged[files["geojson"]] = json.dumps(collection, separators=(",", ":"), allow_nan=False).encode("utf-8")
        staged[files["patches"]] = patches_table(slide)
        slides.append((entry, slide))
    row = patient_row(listing["patient_id"], [slide for _, slide in slides])
    problems = row_value_problems(row)
    if problems:
        raise LymphNodeInputError(f"the lymph-node row would be invalid: {'; '.join(problems)}")
    regions = {
        "patient_id": listing["patient_id"], "classifier": dict(classifier or {}),
        "threshold": settings.tumour_threshold, "min_tumour_patches": settings.min_tumour_patches,
        "min_node_area_mm2": settings.min_node_area_mm2,
        "slides": [_slide_record(entry, slide) for entry, slide in slides], "totals": row,
    }
    staged[LYMPH_NODE_TABLE.name] = row_table(row)
    staged[LYMPH_NODE_REGIONS.name] = json.dumps(regions, indent=2, sort_keys=True, allow_nan=False).encode()

    for path, data in outlines.items():  # a cache keyed by its inputs: safe to keep even if the rest fails
        atomic_write_bytes(path, data)
    with files_replaced_together(out_dir, list(staged), withdraw=withdraw) as paths:
        for file_name, content in staged.items():
            if isinstance(content, bytes):
                paths[file_name].write_bytes(content)
            else:
                pq.write_table(content, paths[file_name])
    _remove_stale(out_dir, set(staged), names)
    return {**row, "slides": [slide_summary(slide) for _, slide in slides],
            "files": {file_name: sha256_file(out_dir / file_name) for file_name in staged}}


def _remove_stale(out_dir: Path, current: set[str], names: set[str]) -> None:
    """Files of slides that are no longer listed."""
    for path in out_dir.iterdir():
        if path.is_file() and path.name not in current and path.name.endswith(SLIDE_SUFFIXES):
            path.unlink(missing_ok=True)
    for path in (out_dir / OUTLINES_FOLDER).glob("*.json"):
        if path.stem not in names:
            path.unlink(missing_ok=True)


def read_regions(out_dir: str | os.PathLike) -> dict:
    path = LYMPH_NODE_REGIONS.in_folder(Path(out_dir))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LymphNodeInputError(f"{path}: cannot be read: {error}") from error


# ---------------------------------------------------------------- the checks' helpers


def node_problems(regions: dict, settings: LymphNodeFields = LYMPH_NODE_DEFAULTS) -> list[str]:
    """"Node count and areas plausible": per slide at least one node and at most
    `max_nodes_per_slide`, ids 1..K, each node's area in (0, max_node_area_mm2], its tumour area
    within it, `metastatic` exactly when it has tumour; and the totals the sums of the slides."""
    problems = []
    sums = {"n_slides": 0, "n_nodes": 0, "n_metastatic_nodes": 0, "tumour_area_mm2": 0.0,
            "metastatic_node_area_mm2": 0.0}
    for slide in regions.get("slides", []):
        where, nodes = f"slide {slide.get('name')!r}", slide.get("nodes", [])
        sums["n_slides"] += 1
        if not nodes:
            problems.append(f"{where}: no lymph node found")
        if len(nodes) > settings.max_nodes_per_slide:
            problems.append(f"{where}: {len(nodes)} nodes, more than the plausible {settings.max_nodes_per_slide}")
        if [node.get("id") for node in nodes] != list(range(1, len(nodes) + 1)):
            problems.append(f"{where}: node ids are not 1..{len(nodes)}")
        for node in nodes:
            area, tumour = node.get("area_mm2", -1.0), node.get("tumour_area_mm2", -1.0)
            label = f"{where} node {node.get('id')}"
            if not 0.0 < area <= settings.max_node_area_mm2:
                problems.append(f"{label}: area {area} mm² outside (0, {settings.max_node_area_mm2}]")
            if not 0.0 <= tumour <= max(area, 0.0):
                problems.append(f"{label}: tumour area {tumour} mm² not within the node's {area} mm²")
            if bool(node.get("metastatic")) != (tumour > 0):
                problems.append(f"{label}: metastatic is {node.get('metastatic')} with tumour area {tumour} mm²")
            sums["n_nodes"] += 1
            if tumour > 0:
                sums["n_metastatic_nodes"] += 1
                sums["tumour_area_mm2"] += tumour
                sums["metastatic_node_area_mm2"] += area
    totals = regions.get("totals", {})
    for name, value in sums.items():
        recorded = totals.get(name)
        if recorded is None or not math.isclose(recorded, value, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"totals: {name} is {recorded}, the slides sum to {value}")
    return problems


def _rings(collection: dict, class_name: str) -> list[tuple[str, list]]:
    found = []
    for feature in collection.get("features", []):
        properties = feature.get("properties") or {}
        if (properties.get("classification") or {}).get("name") == class_name:
            found.append((properties.get("name", class_name), feature["geometry"]["coordinates"]))
    return found


def _cells(raster: SlideRaster, polygons) -> np.ndarray:
    """bool cells inside the (outer, holes) polygons, largest first, each with its holes cut."""
    image = np.zeros(raster.shape, np.uint8)
    for outer, holes in sorted(polygons, key=lambda p: polygon_area(p[0]), reverse=True):
        raster.fill(image, [outer], 1)
        if holes:
            raster.fill(image, list(holes), 0)
    return image.astype(bool)


def slide_tissue_problems(slide: dict, collection: dict, tissue_polygons) -> list[str]:
    """"Every node of a slide inside its tissue": `slide` (regions.json's record) has every node's
    bbox within the slide, and each "Lymph node" and "Tumor" polygon of its GeoJSON `collection`
    has its cells inside the slide's tissue (`tissue_polygons` [(outer, holes)], level-0 px), up to
    the cells an edge grazes."""
    where = f"slide {slide['name']!r}"
    width, height = slide["dimensions"]
    problems = [f"{where} node {node['id']}: bbox {node['bbox_level0']} outside the slide ({width} x {height})"
                for node in slide["nodes"] if not (0 <= node["bbox_level0"][0] <= node["bbox_level0"][2] <= width
                                                   and 0 <= node["bbox_level0"][1] <= node["bbox_level0"][3] <= height)]
    raster = slide_raster((width, height), slide["patch_size_level0"])
    tissue = _cells(raster, tissue_polygons)
    for class_name in (NODE_CLASS, TUMOUR_CLASS):
        for label, rings in _rings(collection, class_name):
            cells = _cells(raster, [(rings[0], rings[1:])])
            if not cells.any():
                continue
            outside = float((cells & ~tissue).sum()) / float(cells.sum())
            if outside > OUTSIDE_TISSUE_TOLERANCE:
                problems.append(f"{where}: {label} lies {outside:.1%} outside the slide's tissue")
    return problems


def tissue_problems(listing: dict, out_dir: str | os.PathLike) -> list[str]:
    """slide_tissue_problems for every slide of a written output: regions.json, each slide's GeoJSON
    and its tissue outlines (kept beside them; tiled again only if they are gone)."""
    out_dir = Path(out_dir)
    regions = read_regions(out_dir)
    params = tiling_params_from_listing(listing["params"])
    entries = {entry["name"]: entry for entry in listing["slides"]}
    problems = []
    for slide in regions["slides"]:
        entry = entries.get(slide["name"])
        if entry is None:
            problems.append(f"slide {slide['name']!r}: not in the slide listing")
            continue
        path = out_dir / slide["geojson"]
        try:
            collection = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            problems.append(f"{path}: cannot be read: {error}")
            continue
        polygons = cached_tissue_polygons(entry, params, _grid(entry), out_dir / OUTLINES_FOLDER)
        problems.extend(slide_tissue_problems(slide, collection, polygons))
    return problems
