"""One patient's slides as QuPath GeoJSON: tissue contours, the patch grid, per-patch values (no Dagster).

Reads what `patch_coords` wrote (`slides.json` and one CLAM-layout HDF5 per slide) and, when
given, risk_explanations' `patch_contributions.parquet`; writes `<slide>.geojson` per listed
slide (qupath_geojson.py builds the features).

patch_coords keeps the patch grid but not the tissue contours it was chosen from (its HDF5 holds
`coords` and their attributes only). Storing them would change patch_coords' output, so its code
version. Instead the contours are made again here: the slide is tiled once more with the
parameters `slides.json` recorded, by the same code, and the result is used only if its grid
equals the stored one exactly, so the contours drawn are the ones that grid was chosen from.
(Keeping them in patch_coords would be the cheaper design at the next bump of its code version:
an `outlines` group in each HDF5, read here instead of tiling again.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gcmlm_assets.catalogue import QUPATH_GEOJSON, SLIDE_LISTING
from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.slides import opened
from gcmlm_assets.pathology.coords_h5 import read_coords_h5
from gcmlm_assets.pathology.tiling import tile_slide
from gcmlm_assets.pathology.tiling_params import TILING_VERSION, ClamParams, TilingParams, TilingResult
from gcmlm_assets.pathology.tissue import SegmentationParams
from gcmlm_assets.pathology.qupath_geojson import (
    GeoJsonInputError, StaleValuesError, feature_collection, geojson_problems, patch_measurements, patch_tiles,
    slides_in, tissue_annotations, write_geojson)
from gcmlm_assets.storage import atomic_write_bytes, sha256_file, sha256_text

np = lazy("numpy")

# Bump it in catalogue.py when a change here or in qupath_geojson.py changes the files written for
# the same inputs.
GEOJSON_VERSION = QUPATH_GEOJSON.code_version
GEOJSON_SUFFIX = ".geojson"
# Each slide's tissue outlines, beside the files, keyed by what they are made from: new values (a new
# model explains everyone again) redraw the tiles without tiling every slide again.
OUTLINES_FOLDER = ".tissue_outlines"


def tiling_params_from_listing(recorded: dict) -> TilingParams:
    """The TilingParams whose `as_dict()` is `recorded` (slides.json's `params`)."""
    values = json.loads(json.dumps(recorded))  # a copy, nested lists and all
    try:
        if values.get("mode") == "clam":
            params = TilingParams(mode="clam", default_mpp=values["default_mpp"],
                                  plausible_mpp=tuple(values["plausible_mpp"]), clam=ClamParams(**values["clam"]))
        else:
            segmentation = SegmentationParams(**values.pop("segmentation"))
            values["plausible_mpp"] = tuple(values["plausible_mpp"])
            params = TilingParams(**values, segmentation=segmentation)
    except (KeyError, TypeError, ValueError) as error:
        raise GeoJsonInputError(f"the recorded tiling parameters cannot be read back: {type(error).__name__}: "
                                f"{error}") from error
    if json.loads(json.dumps(params.as_dict())) != json.loads(json.dumps(recorded)):
        raise GeoJsonInputError("the recorded tiling parameters do not read back to the same parameters")
    return params


def tissue_polygons_level0(result: TilingResult, dimensions: tuple[int, int]) -> list[tuple]:
    """Each tissue region as (outer (K, 2), [holes]) in level-0 px. A contour vertex is a pixel of
    the image segmented; it is placed at that pixel's centre at level 0 ((p + 0.5) x scale), within
    the slide's `dimensions`."""
    scale = np.asarray(result.preview_scale, dtype=np.float64)
    limit = np.asarray(dimensions, dtype=np.float64)

    def level0(points):
        return np.clip((np.asarray(points, np.float64).reshape(-1, 2) + 0.5) * scale, 0.0, limit)

    return [(level0(region.outer), [level0(hole) for hole in region.holes]) for region in result.regions]


def slide_tissue_polygons(entry: dict, params: TilingParams, stored_coords) -> list[tuple]:
    """The tissue contours of one `slides.json` entry, by tiling the slide again with `params`;
    refused when that grid differs from `stored_coords` (the HDF5's): the slide or the code changed."""
    with opened(entry["slide_path"], default_mpp=params.default_mpp, plausible_mpp=params.plausible_mpp) as slide:
        result = tile_slide(slide, params)
        dimensions = slide.info.dimensions
    stored = np.asarray(stored_coords, np.int64).reshape(-1, 2)
    if not np.array_equal(result.coords, stored):
        raise GeoJsonInputError(f"{entry['slide_path']}: tiling it again gives {result.n_patches} patches, not the "
                                f"{len(stored)} patch_coords stored: the slide or the tiling changed since; "
                                "re-materialize patch_coords")
    return tissue_polygons_level0(result, dimensions)


def _outlines_key(entry: dict, params: TilingParams) -> str:
    return sha256_text(TILING_VERSION, GEOJSON_VERSION, json.dumps(entry, sort_keys=True, default=str), repr(params))


def cached_tissue_polygons(entry: dict, params: TilingParams, stored_coords, cache: Path | None,
                           to_keep: dict[Path, bytes] | None = None) -> list[tuple]:
    """`slide_tissue_polygons`, kept in `cache`/<slide>.json under a key of the listing entry (its
    slide, HDF5 and grid) and the parameters; read back while that key holds. New outlines go into
    `to_keep` (path -> bytes) for the caller to write once everything is checked (None: now)."""
    path = cache / f"{entry['name']}.json" if cache is not None else None
    key = _outlines_key(entry, params)
    if path is not None and path.is_file():
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            if kept["key"] == key:
                return [(np.asarray(outer, np.float64).reshape(-1, 2),
                         [np.asarray(hole, np.float64).reshape(-1, 2) for hole in holes])
                        for outer, holes in kept["polygons"]]
        except (OSError, ValueError, KeyError, TypeError):  # unreadable or damaged: made again
            pass
    polygons = slide_tissue_polygons(entry, params, stored_coords)
    if path is not None:
        data = json.dumps({"key": key, "polygons": [(outer.tolist(), [hole.tolist() for hole in holes])
                                                    for outer, holes in polygons]}).encode()
        if to_keep is None:
            atomic_write_bytes(path, data)
        else:
            to_keep[path] = data
    return polygons


def slide_feature_collection(entry: dict, params: TilingParams, patch_values: str | os.PathLike | None,
                             outlines: Path | None = None, to_keep: dict[Path, bytes] | None = None) -> dict:
    """One listed slide's FeatureCollection: tissue annotations, then one tile per patch with the
    patch file's values of that slide (if any) as measurements. `outlines`, `to_keep`: the folder
    keeping the slides' tissue outlines (None: tile the slide again), see cached_tissue_polygons."""
    if entry.get("h5"):
        grid = read_coords_h5(entry["h5"])
        coords, side = grid.coords, int(grid.attrs["patch_size_level0"])
    else:  # no patch on this slide: its tissue (if any) is still drawn
        coords, side = np.zeros((0, 2), np.int64), int(entry["patch_size_level0"])
    polygons = cached_tissue_polygons(entry, params, coords, outlines, to_keep)
    measurements = patch_measurements(patch_values, entry["name"], coords) if patch_values else None
    return feature_collection(tissue_annotations(polygons) + patch_tiles(coords, side, measurements))


def write_patient_geojson(patch_coords_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          patch_values: str | os.PathLike | None = None) -> dict:
    """`<slide>.geojson` in `out_dir` for every slide of patch_coords' listing in `patch_coords_dir`,
    with the per-patch values of `patch_values` (risk_explanations' patch_contributions.parquet;
    None: the grid alone). Every file is checked before it is written (geojson_problems), each is
    written atomically, and files of slides no longer listed are removed. Returns what the asset
    shows: per slide its file, tissue regions, tiles, tiles with values and the measurement names,
    and `files` {name: sha256}."""
    patch_coords_dir, out_dir = Path(patch_coords_dir), Path(out_dir)
    listing_path = SLIDE_LISTING.in_folder(patch_coords_dir)
    try:
        listing = json.loads(listing_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise GeoJsonInputError(f"{listing_path}: cannot read the slide listing: {error}") from error
    if listing.get("tiling_version") != TILING_VERSION:
        raise GeoJsonInputError(f"{listing_path}: made by tiling version {listing.get('tiling_version')!r}, this code "
                                f"tiles as version {TILING_VERSION!r}: re-materialize patch_coords")
    params = tiling_params_from_listing(listing["params"])
    if patch_values is not None:
        unknown = slides_in(patch_values) - {entry["name"] for entry in listing["slides"]}
        if unknown:
            raise StaleValuesError(f"{patch_values}: values for slide(s) {', '.join(sorted(unknown))} that "
                                    f"{listing_path} does not list: explain the patient again")
    slides, files, collections, outlines = [], {}, [], {}
    for entry in listing["slides"]:  # all made and checked before any is written
        collection = slide_feature_collection(entry, params, patch_values, out_dir / OUTLINES_FOLDER, outlines)
        width, height = entry["dimensions"]
        overhang = float(entry["patch_size_level0"]) if params.mode == "clam" and params.clam.use_padding else 0.0
        problems = geojson_problems(collection, width, height, tile_overhang=overhang)
        if problems:
            raise GeoJsonInputError(f"{entry['slide_path']}: the GeoJSON would be invalid: {'; '.join(problems[:5])}")
        collections.append((entry, collection))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in outlines.items():
        atomic_write_bytes(path, data)
    for entry, collection in collections:
        path = write_geojson(out_dir / f"{entry['name']}{GEOJSON_SUFFIX}", collection)
        files[path.name] = sha256_file(path)
        tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
        names = sorted({name for f in tiles for name in f["properties"].get("measurements", {})})
        slides.append({"slide": entry["name"], "file": path.name, "path": str(path),
                       "tissue_regions": len(collection["features"]) - len(tiles), "tiles": len(tiles),
                       "tiles_with_values": sum(1 for f in tiles if f["properties"].get("measurements")),
                       "measurements": names})
    listed = {entry["name"] for entry in listing["slides"]}
    for stale in out_dir.glob(f"*{GEOJSON_SUFFIX}"):
        if stale.name not in files:
            stale.unlink(missing_ok=True)
    for stale in (out_dir / OUTLINES_FOLDER).glob("*.json"):
        if stale.stem not in listed:
            stale.unlink(missing_ok=True)
    return {"n_slides": len(slides), "n_tiles": sum(s["tiles"] for s in slides), "slides": slides, "files": files}


def inputs_fingerprint(listing: dict, patch_values_sha256: str | None) -> str:
    """What the files are made from: this code's and the tiling's versions, the tiling parameters,
    each slide's identity and HDF5 hash, and the patch file's hash (None: no values)."""
    parts = [f"geojson={GEOJSON_VERSION}", f"tiling={TILING_VERSION}",
             json.dumps(listing.get("params"), sort_keys=True, default=str), f"values={patch_values_sha256}"]
    for entry in sorted(listing["slides"], key=lambda e: e["name"]):
        parts.append("|".join(str(entry.get(key)) for key in
                              ("name", "size_bytes", "mtime_ns", "quickhash1", "h5_file", "h5_sha256")))
    return sha256_text(*parts)


def grid_mismatches(listing: dict, out_dir: str | os.PathLike) -> list[str]:
    """How the written files differ from patch_coords' grid: per listed slide, its file must hold
    one tile per HDF5 `coords` row, in order, each tile's first corner that row. [] when they agree."""
    problems = []
    for entry in listing["slides"]:
        path = Path(out_dir) / f"{entry['name']}{GEOJSON_SUFFIX}"
        try:
            collection = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: cannot be read back: {error}")
            continue
        grid = read_coords_h5(entry["h5"]).coords if entry.get("h5") else np.zeros((0, 2), np.int64)
        corners = [f["geometry"]["coordinates"][0][0] for f in collection.get("features", [])
                   if (f.get("properties") or {}).get("objectType") == "tile"]
        corners = np.asarray(corners, np.float64).reshape(-1, 2)
        if len(corners) != len(grid):
            problems.append(f"{path.name}: {len(corners)} tiles for {len(grid)} patches in the HDF5")
        elif not np.array_equal(corners, grid):
            first = int(np.flatnonzero(np.any(corners != grid, axis=1))[0])
            problems.append(f"{path.name}: tile {first} starts at {corners[first].tolist()}, the HDF5's patch at "
                            f"{grid[first].tolist()}")
    return problems
