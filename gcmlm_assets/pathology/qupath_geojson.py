"""QuPath GeoJSON of one slide: tissue annotations and the patch grid with per-patch measurements.

Plain Python (no Dagster). The geometry is pathology's (the tissue contours and patch_coords'
grid); the per-patch values are read from the cohort's file (risk_explanations'
`patch_contributions.parquet`) by its columns only, a file contract: no cohort module is imported.

The file is what QuPath (0.4 and later) writes and reads with File > Export / Import objects:
a GeoJSON FeatureCollection in level-0 pixel coordinates (origin at the slide's top-left corner,
x right, y down), one Feature per object with `properties.objectType` ("annotation" for tissue,
"tile" for patches), `properties.classification` {name, color} and `properties.measurements`
{name: number}. A measurement QuPath would show as NaN (a null in the parquet) is left out of
that tile's map; JSON has no NaN. Rings are closed, outer rings counter-clockwise and holes
clockwise (RFC 7946's winding rule, which QuPath does not need but strict readers check).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from gcmlm_assets.lazy import lazy
from gcmlm_assets.storage import atomic_write_bytes

np = lazy("numpy")
pa = lazy("pyarrow")
pq = lazy("pyarrow.parquet")

ANNOTATION = "annotation"
TILE = "tile"
TISSUE_CLASS = "Tissue"
TISSUE_COLOUR = (0, 170, 0)  # the tiling picture's tissue green
# risk_explanations' patch file: one row per patch of every slide, identified by (slide, x, y).
SLIDE_COLUMN, X_COLUMN, Y_COLUMN = "slide", "x", "y"
KEY_COLUMNS = (SLIDE_COLUMN, X_COLUMN, Y_COLUMN)
COORDINATE_DECIMALS = 2  # tissue outlines: 1/100 level-0 px is far below any visible difference


class GeoJsonInputError(ValueError):
    """The inputs do not describe one consistent slide (names the file and the problem)."""


class StaleValuesError(GeoJsonInputError):
    """The patch values were made from another tiling than the grid's (the patient was tiled again
    since it was explained): the values do not belong to this grid."""


# ---------------------------------------------------------------- geometry


def _signed_area(ring) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def closed_ring(points, *, counter_clockwise: bool) -> list[list[float]] | None:
    """A GeoJSON linear ring from (K, 2) points: repeated and straight-through vertices dropped,
    the winding set, the first position repeated at the end. None when fewer than 3 corners remain
    (a line or a point has no area to draw)."""
    ring = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(ring) and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    ring = ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)] if len(ring) > 1 else ring
    if len(ring) >= 3:
        incoming, outgoing = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
        cross = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
        straight = (cross == 0) & ((incoming * outgoing).sum(axis=1) > 0)
        ring = ring[~straight]
    if len(ring) < 3 or _signed_area(ring) == 0:
        return None
    if (_signed_area(ring) > 0) != counter_clockwise:
        ring = np.roll(ring[::-1], 1, axis=0)  # the other way round, from the same first vertex
    positions = [[_number(x), _number(y)] for x, y in ring]
    return positions + [positions[0]]


def _number(value: float) -> int | float:
    """Whole values as JSON integers (patch corners stay exactly the HDF5's), others rounded."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, COORDINATE_DECIMALS)


def polygon_coordinates(outer, holes: Iterable = ()) -> list | None:
    """GeoJSON Polygon coordinates: the outer ring, then each hole that still has an area."""
    shell = closed_ring(outer, counter_clockwise=True)
    if shell is None:
        return None
    rings = [closed_ring(hole, counter_clockwise=False) for hole in holes]
    return [shell, *(ring for ring in rings if ring is not None)]


# ---------------------------------------------------------------- features


def tissue_annotations(polygons: Sequence[tuple[object, Sequence[object]]]) -> list[dict]:
    """One "Tissue" annotation per (outer, holes) polygon in level-0 px, named Tissue 1, 2, ..."""
    features = []
    for outer, holes in polygons:
        coordinates = polygon_coordinates(outer, holes)
        if coordinates is None:
            continue
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coordinates},
            "properties": {
                "objectType": ANNOTATION,
                "name": f"{TISSUE_CLASS} {len(features) + 1}",
                "classification": {"name": TISSUE_CLASS, "color": list(TISSUE_COLOUR)},
                "isLocked": True,  # made by the tiling: not for editing by hand
            },
        })
    return features


def patch_tiles(coords, side_level0: int, measurements: Mapping[str, object] | None = None) -> list[dict]:
    """One "tile" per patch: the square [x, x + side] x [y, y + side] in level-0 px (x, y: the
    HDF5 `coords` row as stored), with `measurements[name][i]` where finite."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    side = int(side_level0)
    if side <= 0:
        raise ValueError(f"patch side must be a positive number of level-0 px, got {side_level0}")
    columns = {name: np.asarray(values, dtype=np.float64).reshape(-1) for name, values in (measurements or {}).items()}
    for name, values in columns.items():
        if len(values) != len(coords):
            raise ValueError(f"measurement {name!r} has {len(values)} values for {len(coords)} patches")
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        properties: dict = {"objectType": TILE}
        values = {name: float(column[i]) for name, column in columns.items() if math.isfinite(column[i])}
        if values:
            properties["measurements"] = values
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [
                [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]},
            "properties": properties,
        })
    return features


def feature_collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, collection: dict) -> Path:
    """Compact JSON (one slide's grid can hold 10^5 tiles), written under a temporary name and
    renamed; a NaN or infinity anywhere is refused rather than written as invalid JSON."""
    text = json.dumps(collection, separators=(",", ":"), allow_nan=False)
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- per-patch values


def patch_measurements(parquet_path: str | os.PathLike, slide: str, coords,
                       columns: Sequence[str] | None = None) -> dict[str, object]:
    """{column: (N,) float64} of `slide`'s rows of a risk_explanations patch file, in the order of
    `coords` (the patch_coords HDF5 rows), joined on (x, y): feature extraction may store patches
    in another order. `columns`: the numeric columns to take (default: every numeric column but
    x and y). NaN where the file has no row or a null for a patch. A row at a position that is not
    in the grid means the two files were made from different tilings: refused."""
    path = Path(parquet_path)
    try:
        table = pq.read_table(path, filters=[(SLIDE_COLUMN, "=", slide)])
    except (OSError, ValueError) as error:
        raise GeoJsonInputError(f"{path}: cannot read patch values: {type(error).__name__}: {error}") from error
    missing = [name for name in KEY_COLUMNS if name not in table.column_names]
    if missing:
        raise GeoJsonInputError(f"{path}: no column(s) {', '.join(missing)} (expected a risk_explanations "
                                "patch file)")
    if columns is None:
        columns = [field.name for field in table.schema if field.name not in KEY_COLUMNS
                   and (pa.types.is_integer(field.type) or pa.types.is_floating(field.type))]
    else:
        absent = [name for name in columns if name not in table.column_names]
        if absent:
            raise GeoJsonInputError(f"{path}: no column(s) {', '.join(absent)}")
    grid = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    rows = np.stack([np.asarray(table.column(X_COLUMN).to_numpy(zero_copy_only=False), np.int64),
                     np.asarray(table.column(Y_COLUMN).to_numpy(zero_copy_only=False), np.int64)], axis=1) \
        if table.num_rows else np.zeros((0, 2), np.int64)
    position = _positions(grid, rows, path, slide)
    result = {}
    for name in columns:
        values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        aligned = np.full(len(grid), np.nan)
        aligned[position] = values
        result[name] = aligned
    return result


def _positions(grid, rows, path: Path, slide: str):
    """Index into `grid` of each row's (x, y); every row must be in the grid, once."""
    def key(points):  # (x, y) as one sortable int: both are level-0 px, far below 2**31
        return (points[:, 0] << 32) | (points[:, 1] & 0xFFFFFFFF)

    grid_keys, row_keys = key(grid), key(rows)
    if len(np.unique(row_keys)) != len(row_keys):
        raise GeoJsonInputError(f"{path}: slide {slide!r} lists a patch position twice")
    order = np.argsort(grid_keys, kind="stable")
    found = np.clip(np.searchsorted(grid_keys[order], row_keys), 0, max(len(grid_keys) - 1, 0))
    matched = (grid_keys[order][found] == row_keys) if len(grid_keys) else np.zeros(len(row_keys), bool)
    if not matched.all():
        x, y = rows[np.flatnonzero(~matched)[0]].tolist()
        raise StaleValuesError(f"{path}: slide {slide!r} has values for {int((~matched).sum())} patch(es) that "
                                f"are not in its patch grid (first at x={x}, y={y}): the explanation was made "
                                "from another tiling; explain the patient again")
    return order[found]


def slides_in(parquet_path: str | os.PathLike) -> set[str]:
    """The slides a risk_explanations patch file has rows for."""
    path = Path(parquet_path)
    try:
        column = pq.read_table(path, columns=[SLIDE_COLUMN]).column(SLIDE_COLUMN)
    except (OSError, ValueError, KeyError) as error:
        raise GeoJsonInputError(f"{path}: cannot read patch values: {type(error).__name__}: {error}") from error
    return set(column.unique().to_pylist())


# ---------------------------------------------------------------- checking


def geojson_problems(collection: dict, width: int, height: int, *, tile_overhang: float = 0.0) -> list[str]:
    """What a reader would object to: not a FeatureCollection of Polygon features with an
    objectType, an open ring, a coordinate that is not a finite number or lies outside the slide
    (0..width, 0..height level-0 px; tiles may reach `tile_overhang` px further, as CLAM's padded
    patches at the right and bottom edges do). [] when all is well."""
    problems: list[str] = []
    if collection.get("type") != "FeatureCollection" or not isinstance(collection.get("features"), list):
        return ["not a GeoJSON FeatureCollection with a `features` list"]
    for index, feature in enumerate(collection["features"]):
        where = f"feature {index}"
        properties = feature.get("properties") or {}
        geometry = feature.get("geometry") or {}
        if feature.get("type") != "Feature" or properties.get("objectType") not in (ANNOTATION, TILE):
            problems.append(f"{where}: not a Feature with objectType annotation or tile")
            continue
        if geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
            problems.append(f"{where}: geometry is not a Polygon")
            continue
        reach = tile_overhang if properties["objectType"] == TILE else 0.0
        for ring in geometry["coordinates"]:
            if len(ring) < 4 or ring[0] != ring[-1]:
                problems.append(f"{where}: a ring is not closed or has fewer than 4 positions")
            for x, y in ring:
                if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)):
                    problems.append(f"{where}: coordinate ({x}, {y}) is not a finite number")
                elif not (0 <= x <= width + reach and 0 <= y <= height + reach):
                    problems.append(f"{where}: coordinate ({x}, {y}) lies outside the slide ({width} x {height})")
        for name, value in (properties.get("measurements") or {}).items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{where}: measurement {name!r} is not a finite number")
        if len(problems) > 20:
            return problems + ["(more problems not listed)"]
    return problems
