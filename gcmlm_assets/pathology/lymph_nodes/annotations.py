"""The region annotations of a lymph-node slide (a QuPath GeoJSON export, `ln_annotations/<slide name>.geojson`)
read into node and tumour polygons, and the patch labels the tumour classifier trains on (plain Python, no Dagster).

The landing contract (README, "Lymph-node slides"): a FeatureCollection, a bare list of Features (what QuPath's
"Export objects as GeoJSON" writes without "Export as FeatureCollection") or a single Feature; level-0 pixels;
Polygon or MultiPolygon geometries; the class from `properties.classification.name` (QuPath 0.2 and later),
`properties.classification` as a string, or, when there is no classification, the legacy `properties.name`.
Classes are matched case-insensitively against NODE_CLASSES and TUMOUR_CLASSES; other classes, unclassified
objects and objects that are not annotations (QuPath detections, cells, tiles) are ignored and counted.

A patch is labelled by its centre (level-0 corner + side / 2): inside a tumour polygon -> 1, inside a node polygon
but no tumour polygon -> 0, elsewhere -> -1 (unlabelled, not used for training). A point inside a polygon's hole
is outside that polygon.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcmlm_assets.lazy import lazy

np = lazy("numpy")

NODE_CLASSES = frozenset({"lymph node", "lymph_node", "lymphnode", "node"})
TUMOUR_CLASSES = frozenset({"tumor", "tumour"})
ANNOTATION_SUFFIX = ".geojson"
TUMOUR, NOT_TUMOUR, UNLABELLED = 1, 0, -1
# QuPath clips an annotation to the image, but a drawn vertex may sit a fraction of a pixel beyond its edge.
EDGE_TOLERANCE_PX = 1.0
UNCLASSIFIED = "(unclassified)"


class AnnotationError(ValueError):
    """An annotation file that does not follow the landing contract (the message names the file)."""


@dataclass(frozen=True)
class Region:
    """One polygon in level-0 px: its outer ring (K, 2) and its holes, closed rings as float64 arrays."""

    outer: Any
    holes: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SlideAnnotations:
    path: Path
    nodes: tuple[Region, ...]
    tumours: tuple[Region, ...]
    ignored: Mapping[str, int] = field(default_factory=dict)  # class (or object type) -> number of objects
    sha256: str = ""  # of the bytes read, so that what was read and what a fingerprint names cannot differ


@dataclass(frozen=True)
class AnnotationFiles:
    by_slide: Mapping[str, Path]  # slide name -> its annotation file
    unmatched: tuple[Path, ...]  # files in the folder that name no slide


def annotation_files(folder: str | os.PathLike, slide_names: Iterable[str]) -> AnnotationFiles:
    """The annotation file of each slide that has one (`<folder>/<slide name>.geojson`, the suffix in any case), and
    the files of the folder that match no slide (reported, not used). A missing folder has no annotations."""
    folder = Path(folder)
    names = set(slide_names)
    by_slide: dict[str, Path] = {}
    unmatched: list[Path] = []
    if not folder.is_dir():
        return AnnotationFiles({}, ())
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() == ANNOTATION_SUFFIX and path.stem in names:
            by_slide[path.stem] = path
        else:
            unmatched.append(path)
    return AnnotationFiles(dict(sorted(by_slide.items())), tuple(unmatched))


def read_annotations(path: str | os.PathLike, *, dimensions: tuple[int, int] | None = None) -> SlideAnnotations:
    """The node and tumour polygons of a QuPath GeoJSON export. `dimensions`: the slide's level-0 (width, height);
    given, a vertex outside it (beyond EDGE_TOLERANCE_PX) is an error: the file belongs to another slide or is not
    in level-0 pixels. Raises AnnotationError naming the file and the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
        document = json.loads(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
    features = _features_of(document, path)
    nodes: list[Region] = []
    tumours: list[Region] = []
    ignored: Counter[str] = Counter()
    for index, feature in enumerate(features):
        where = f"{path}: feature {index}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(f"{where} is not a GeoJSON Feature")
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise AnnotationError(f"{where}: `properties` is not an object")
        object_type = properties.get("objectType", feature.get("objectType", "annotation"))
        if object_type != "annotation":  # detections, cells, tiles: not region annotations
            ignored[f"{object_type} objects"] += 1
            continue
        name = class_name(properties)
        key = name.strip().lower() if name else ""
        if key in NODE_CLASSES:
            target = nodes
        elif key in TUMOUR_CLASSES:
            target = tumours
        else:
            ignored[name or UNCLASSIFIED] += 1
            continue
        target.extend(_regions(feature.get("geometry"), where, dimensions))
    if not nodes and not tumours:
        found = ", ".join(f"{k} ({n})" for k, n in sorted(ignored.items())) or "no features"
        raise AnnotationError(f"{path}: no lymph-node or tumour annotation (classes "
                              f"{sorted(NODE_CLASSES)} or {sorted(TUMOUR_CLASSES)}); found {found}")
    return SlideAnnotations(path, tuple(nodes), tuple(tumours), dict(sorted(ignored.items())),
                            hashlib.sha256(data).hexdigest())


def class_name(properties: Mapping[str, Any]) -> str | None:
    """The object's class as QuPath wrote it: `classification.name`, `classification` as a string, else `name`."""
    classification = properties.get("classification")
    if isinstance(classification, dict):
        value = classification.get("name")
        return str(value) if value is not None else None
    if isinstance(classification, str):
        return classification
    value = properties.get("name")
    return str(value) if isinstance(value, str) else None


def _features_of(document: Any, path: Path) -> list:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if document.get("type") == "FeatureCollection" and isinstance(document.get("features"), list):
            return document["features"]
        if document.get("type") == "Feature":
            return [document]
    kind = document.get("type") if isinstance(document, dict) else type(document).__name__
    raise AnnotationError(f"{path}: not GeoJSON features (a FeatureCollection, a list of Features or a Feature); "
                          f"found {kind!r}")


def _regions(geometry: Any, where: str, dimensions: tuple[int, int] | None) -> list[Region]:
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{where}: no geometry")
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        polygons = [coordinates]
    elif kind == "MultiPolygon" and isinstance(coordinates, list):
        polygons = coordinates
    else:
        raise AnnotationError(f"{where}: geometry type {kind!r} is not supported (Polygon or MultiPolygon)")
    regions = []
    for p, rings in enumerate(polygons):
        if not isinstance(rings, list) or not rings:
            raise AnnotationError(f"{where}: {kind} polygon {p} has no rings")
        arrays = [_ring(ring, f"{where}: {kind} polygon {p} ring {r}", dimensions) for r, ring in enumerate(rings)]
        regions.append(Region(arrays[0], tuple(arrays[1:])))
    return regions


def _ring(ring: Any, where: str, dimensions: tuple[int, int] | None):
    try:
        points = np.asarray([position[:2] for position in ring], dtype=np.float64)
    except (TypeError, ValueError, IndexError):
        raise AnnotationError(f"{where}: positions are not [x, y] numbers") from None
    if points.ndim != 2 or points.shape[1] != 2:
        raise AnnotationError(f"{where}: positions are not [x, y] numbers")
    if not np.isfinite(points).all():
        raise AnnotationError(f"{where}: non-finite coordinates")
    if len(points) < 4 or not np.array_equal(points[0], points[-1]):
        raise AnnotationError(f"{where}: not a closed ring (GeoJSON needs >= 4 positions, the last equal to the first)")
    if abs(_shoelace_area(points)) <= 0.0:
        raise AnnotationError(f"{where}: degenerate ring (zero area)")
    if dimensions is not None:
        width, height = dimensions
        low, high = points.min(axis=0), points.max(axis=0)
        limit = np.array([width, height], dtype=np.float64) + EDGE_TOLERANCE_PX
        if (low < -EDGE_TOLERANCE_PX).any() or (high > limit).any():
            raise AnnotationError(
                f"{where}: coordinates span x {low[0]:g}..{high[0]:g}, y {low[1]:g}..{high[1]:g}, outside the slide's "
                f"level-0 {width} x {height} px (annotations must be in level-0 pixels of this slide)")
    return points


def _shoelace_area(points) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def region_area(region: Region) -> float:
    """The polygon's area in level-0 px² (outer ring minus holes)."""
    return abs(_shoelace_area(region.outer)) - sum(abs(_shoelace_area(h)) for h in region.holes)


def inside(points, regions: Sequence[Region]):
    """(N,) bool: each (x, y) point lies inside at least one region (inside its outer ring, outside its holes)."""
    from matplotlib.path import Path as MplPath

    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    hit = np.zeros(len(points), dtype=bool)
    for region in regions:
        low, high = region.outer.min(axis=0), region.outer.max(axis=0)
        candidates = np.flatnonzero(~hit & (points >= low).all(axis=1) & (points <= high).all(axis=1))
        if not len(candidates):
            continue
        within = MplPath(region.outer, closed=True).contains_points(points[candidates])
        for hole in region.holes:
            within &= ~MplPath(hole, closed=True).contains_points(points[candidates])
        hit[candidates[within]] = True
    return hit


def patch_labels(coords, side_level0: float, annotations: SlideAnnotations):
    """(N,) int8 labels of patches with level-0 top-left corners `coords` (N, 2) and side `side_level0` px:
    TUMOUR (1), NOT_TUMOUR (0) or UNLABELLED (-1), by the patch centre."""
    if not math.isfinite(side_level0) or side_level0 <= 0:
        raise ValueError(f"patch side {side_level0!r} px: expected a positive number")
    centres = np.asarray(coords, dtype=np.float64).reshape(-1, 2) + side_level0 / 2.0
    labels = np.full(len(centres), UNLABELLED, dtype=np.int8)
    labels[inside(centres, annotations.nodes)] = NOT_TUMOUR
    labels[inside(centres, annotations.tumours)] = TUMOUR
    return labels
