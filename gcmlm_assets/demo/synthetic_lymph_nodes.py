"""The synthetic patient's lymph-node slides, their truth and their annotations (plain Python, no Dagster).

A slide is glass with separated, roughly elliptical lymph nodes (the plan's nodes,
synthetic_plan.py), laid out in rows with `ln_gap` units of glass between their bounding boxes,
so that each node is exactly one tissue component. Lymphoid tissue is dense, small, round,
dark-blue nuclei on a pale lilac background; a metastatic node holds one or two tumour regions of
the primary slides' texture (synthetic_slides.py: larger, pleomorphic purple nuclei in nests on
lilac cytoplasm, pink stroma between the nests), so the two differ at patch level in colour and
texture.

The shapes are polygons in level-0 px (integer vertices) drawn from `[seed, 4, patient, slide]`;
the pixels from `[seed, 5, patient, slide]`. The truth (`slide_truth`) is measured on the shapes
rasterised at level 0 (the same rasters the pixels are painted from), not from a formula, and the
annotations (`annotation_geojson`) are the same polygons as QuPath GeoJSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import cv2
import numpy as np

from gcmlm_assets.demo.synthetic_plan import CohortSpec, PatientPlan, PlannedNode
from gcmlm_assets.demo.synthetic_slides import (
    RGB_CYTOPLASM,
    RGB_GLASS,
    RGB_NUCLEUS,
    RGB_STROMA,
    resized_noise,
)
from gcmlm_assets.pathology.qupath_geojson import ANNOTATION, feature_collection, polygon_coordinates

# Lymphoid tissue: the pale background between lymphocytes and their dark-blue nuclei (RGB).
RGB_LYMPHOID = np.array([224, 204, 232], np.float32)
RGB_LYMPHOCYTE = np.array([48, 44, 126], np.float32)
NODE_CLASS, NODE_COLOUR = "Lymph node", (0, 90, 200)
TUMOUR_CLASS, TUMOUR_COLOUR = "Tumor", (200, 0, 0)  # QuPath's built-in tumour class
OUTLINE_VERTICES = 120
TUMOUR_MARGIN = 0.3  # units of glass-free node tissue kept around every tumour region


@dataclass(frozen=True)
class NodeShape:
    centre: tuple[int, int]  # level-0 px: the node's planted centre, inside the node
    outline: np.ndarray  # (K, 2) int32 level-0 px
    tumours: tuple[np.ndarray, ...]  # (K, 2) int32 level-0 px each, inside `outline`
    metastatic: bool

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 (exclusive) of the outline's pixels."""
        x0, y0 = self.outline.min(axis=0)
        x1, y1 = self.outline.max(axis=0) + 1
        return int(x0), int(y0), int(x1), int(y1)


@dataclass(frozen=True)
class LymphNodeSlide:
    name: str
    width: int
    height: int
    nodes: tuple[NodeShape, ...]


def ln_slide_name(plan: PatientPlan, k: int) -> str:
    """The slide's name (its file name without extension): `<patient>_ln<k + 1>`."""
    return f"{plan.patient_id}_ln{k + 1}"


# ---------------------------------------------------------------- shapes


def _outline(rng: np.random.Generator, semi_major: float, semi_minor: float, angle_deg: float) -> np.ndarray:
    """An ellipse with a gently wavy border, centred on (0, 0), as (K, 2) float points."""
    theta = np.linspace(0.0, 2 * np.pi, OUTLINE_VERTICES, endpoint=False)
    wobble = np.ones_like(theta)
    for harmonic in (2, 3, 4, 5):
        wobble += rng.normal(0, 0.025) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    x, y = semi_major * np.cos(theta) * wobble, semi_minor * np.sin(theta) * wobble
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.stack([c * x - s * y, s * x + c * y], axis=1)


def _inside_by(outline: np.ndarray, points: np.ndarray, margin: float) -> bool:
    contour = outline.reshape(-1, 1, 2).astype(np.float32)
    return all(cv2.pointPolygonTest(contour, (float(x), float(y)), True) >= margin for x, y in points)


def _tumour_outlines(rng: np.random.Generator, node: PlannedNode, outline: np.ndarray,
                     unit: float) -> list[np.ndarray]:
    """The node's tumour regions (relative to its centre): one region of the planned share, or two
    along the major axis; shrunk (never moved out) until they lie inside with TUMOUR_MARGIN."""
    a = node.radius / math.sqrt(node.aspect) * unit
    b = node.radius * math.sqrt(node.aspect) * unit
    margin = TUMOUR_MARGIN * unit
    axis = np.array([math.cos(math.radians(node.angle)), math.sin(math.radians(node.angle))])
    if node.tumour_regions == 2:
        first = rng.uniform(0.4, 0.6)
        shares = [node.tumour_share * first, node.tumour_share * (1 - first)]
        ta = [a * math.sqrt(share) for share in shares]
        tb = [b * math.sqrt(share) for share in shares]
        # Centres on the major axis, the regions one unit apart, the pair centred in the node.
        half = (2 * ta[0] + 2 * ta[1] + unit) / 2  # half the pair's length along the axis
        left, right = -half + ta[0], half - ta[1]
        regions = [(ta[0], tb[0], left * axis), (ta[1], tb[1], right * axis)]
        shapes = [_fit(rng, outline, sa, sb, node.angle, centre, margin) for sa, sb, centre in regions]
        if all(shape is not None for shape in shapes):
            return shapes
    scale = math.sqrt(node.tumour_share)
    slack = (1 - scale) * b / 2
    centre = rng.uniform(-slack, slack, size=2)
    turn = rng.uniform(-20, 20)
    # Centred and aligned with the node first: the planned share fits there with the least shrinking,
    # so the tumour area (and T/MLN) stays what the severity planned.
    shape = _fit(rng, outline, a * scale, b * scale, node.angle, np.zeros(2), margin)
    if shape is None:
        shape = _fit(rng, outline, a * scale, b * scale, node.angle + turn, centre, margin)
    if shape is None:
        raise RuntimeError(f"no tumour region fits in a node of radius {node.radius}")
    return [shape]


def _fit(rng, outline, semi_major, semi_minor, angle, centre, margin, tries: int = 40) -> np.ndarray | None:
    shape = _outline(rng, semi_major, semi_minor, angle)
    for _ in range(tries):
        points = shape + centre
        if _inside_by(outline, points, margin):
            return points
        shape *= 0.985
    return None


def slide_layout(plan: PatientPlan, k: int, spec: CohortSpec) -> LymphNodeSlide:
    """Slide `k` of the patient's lymph-node slides: the nodes' and tumours' polygons, placed in
    rows (the first ceil(n/2) nodes, then the rest) with `ln_gap` units of glass between bounding
    boxes and around the edge."""
    rng = np.random.default_rng([spec.seed, 4, plan.index, k])
    unit = float(spec.ln_unit_px)
    shapes = []
    for node in plan.ln_slides[k]:
        a = node.radius / math.sqrt(node.aspect) * unit
        b = node.radius * math.sqrt(node.aspect) * unit
        outline = _outline(rng, a, b, node.angle)
        tumours = _tumour_outlines(rng, node, outline, unit) if node.metastatic else []
        shapes.append((node, outline, tumours))
    gap = spec.ln_gap * unit
    rows = [shapes[: (len(shapes) + 1) // 2], shapes[(len(shapes) + 1) // 2:]]
    placed: list[NodeShape] = []
    width, y = 0.0, gap
    for row in (r for r in rows if r):
        extents = [(outline.min(axis=0), outline.max(axis=0)) for _, outline, _ in row]
        row_height = max(high[1] - low[1] for low, high in extents)
        x = gap
        for (node, outline, tumours), (low, high) in zip(row, extents):
            # Nodes of one row sit at a random height within the row's slack.
            dy = rng.uniform(0, row_height - (high[1] - low[1]))
            offset = np.array([x - low[0], y + dy - low[1]])
            centre = np.round(offset).astype(np.int64)
            placed.append(NodeShape(
                centre=(int(centre[0]), int(centre[1])),
                outline=np.round(outline + offset).astype(np.int32),
                tumours=tuple(np.round(t + offset).astype(np.int32) for t in tumours),
                metastatic=node.metastatic))
            x += (high[0] - low[0]) + gap
        width = max(width, x)
        y += row_height + gap
    return LymphNodeSlide(ln_slide_name(plan, k), int(math.ceil(width)), int(math.ceil(y)), tuple(placed))


def patient_layouts(plan: PatientPlan, spec: CohortSpec) -> list[LymphNodeSlide]:
    return [slide_layout(plan, k, spec) for k in range(len(plan.ln_slides))]


# ---------------------------------------------------------------- truth


def _node_masks(node: NodeShape) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """(x0, y0) and the node's and its tumour's level-0 masks over its bounding box (bool);
    tumour clipped to the node."""
    x0, y0, x1, y1 = node.bbox
    origin = np.array([x0, y0], np.int32)
    node_mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(node_mask, [node.outline - origin], 1)
    tumour_mask = np.zeros_like(node_mask)
    if node.tumours:
        for tumour in node.tumours:  # one at a time: one call would fill where two overlap as a hole
            cv2.fillPoly(tumour_mask, [tumour - origin], 1)
    return (x0, y0), node_mask.astype(bool), tumour_mask.astype(bool) & node_mask.astype(bool)


def slide_truth(slide: LymphNodeSlide, mpp: float) -> dict:
    """The planted nodes of one slide, with areas counted on their level-0 rasters."""
    mm2_per_px = (mpp / 1000.0) ** 2
    nodes = []
    for i, node in enumerate(slide.nodes, start=1):
        _, node_mask, tumour_mask = _node_masks(node)
        nodes.append({
            "id": i,
            "centre_level0": list(node.centre),
            "bbox_level0": list(node.bbox),
            "area_mm2": round(float(node_mask.sum()) * mm2_per_px, 6),
            "tumour_area_mm2": round(float(tumour_mask.sum()) * mm2_per_px, 6),
            "metastatic": node.metastatic,
            "tumour_regions": len(node.tumours),
        })
    return {"name": slide.name, "width": slide.width, "height": slide.height, "mpp": mpp, "nodes": nodes}


def patient_totals(slides: list[dict]) -> dict:
    """The design's lymph_nodes row (without patient_id) from per-slide truths."""
    nodes = [node for slide in slides for node in slide["nodes"]]
    metastatic = [node for node in nodes if node["metastatic"]]
    tumour = sum(node["tumour_area_mm2"] for node in nodes)
    metastatic_area = sum(node["area_mm2"] for node in metastatic)
    return {
        "n_slides": len(slides),
        "n_nodes": len(nodes),
        "n_metastatic_nodes": len(metastatic),
        "tumour_area_mm2": round(tumour, 6),
        "metastatic_node_area_mm2": round(metastatic_area, 6),
        "t_mln": round(tumour / metastatic_area, 6) if metastatic else None,
    }


def patient_truth(plan: PatientPlan, spec: CohortSpec) -> dict:
    slides = [slide_truth(layout, spec.mpp) for layout in patient_layouts(plan, spec)]
    return {"annotated": plan.ln_annotated, "slides": slides, "totals": patient_totals(slides)}


# ---------------------------------------------------------------- pixels


def _scatter_nuclei(rng, canvas: np.ndarray, mask: np.ndarray, density_um2: float, radius_um: float,
                    radius_sd_um: float, max_elongation: float, um: float) -> None:
    """Poisson-many nuclei (ellipses) with centres inside `mask`, painted 255 into `canvas`."""
    inside_px = int(mask.sum())
    count = int(rng.poisson(density_um2 * inside_px / um**2))
    if count == 0:
        return
    height, width = mask.shape
    # Uniform candidates over the box, kept where the mask is: enough for `count` in most draws.
    draws = int(count * 1.3 * mask.size / inside_px) + 16
    ys = rng.integers(0, height, size=draws)
    xs = rng.integers(0, width, size=draws)
    inside = mask[ys, xs]
    ys, xs = ys[inside][:count], xs[inside][:count]
    radii = rng.normal(radius_um, radius_sd_um, size=len(ys)).clip(1.0) * um
    if max_elongation <= 1.0:
        for y, x, r in zip(ys.tolist(), xs.tolist(), radii.tolist()):
            cv2.circle(canvas, (x, y), max(1, int(round(r))), 255, -1)
        return
    elongation = rng.uniform(1.0, max_elongation, size=len(ys))
    angles = rng.uniform(0, 180, size=len(ys))
    for y, x, r, e, a in zip(ys.tolist(), xs.tolist(), radii.tolist(), elongation.tolist(), angles.tolist()):
        cv2.ellipse(canvas, (x, y), (max(1, int(round(r * e))), max(1, int(round(r / e)))), a, 0, 360, 255, -1)


def _paint_node(rng: np.random.Generator, node: NodeShape, severity: float, mpp: float) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """(x0, y0), the node's mask and its RGB (uint8) over its bounding box."""
    um = 1.0 / mpp
    origin, node_mask, tumour_mask = _node_masks(node)
    height, width = node_mask.shape
    lymphoid = node_mask & ~tumour_mask
    # Tumour: nests (a share rising with the severity) in pink stroma, as on the primary slides.
    # The texture varies with the severity only within one noise SD: the signal lies in how many nodes
    # hold tumour and how much, and a tumour far from the annotated ones' look would be missed.
    severity = float(np.clip(severity, -1.0, 1.0))
    nests = np.zeros_like(tumour_mask)
    if tumour_mask.any():
        nest_field = resized_noise(rng, height, width, cell=int(60 * um))
        share = float(np.clip(0.6 + 0.08 * severity, 0.4, 0.85))
        nests = tumour_mask & (nest_field > float(np.quantile(nest_field[tumour_mask], 1.0 - share)))
    stroma = tumour_mask & ~nests
    # 0 glass, 1 lymphoid, 2 tumour stroma, 3 tumour nest
    region = lymphoid.astype(np.uint8) + 2 * stroma.astype(np.uint8) + 3 * nests.astype(np.uint8)

    nuclei = np.zeros((height, width), np.uint8)
    # Lymphocytes: small, round, densely packed.
    _scatter_nuclei(rng, nuclei, lymphoid, 16000e-6, 2.6, 0.3, 1.0, um)
    _scatter_nuclei(rng, nuclei, nests, 5000e-6 * math.exp(0.22 * severity), 4.2 * math.exp(0.08 * severity),
                    0.9, 1.4, um)
    _scatter_nuclei(rng, nuclei, stroma, 800e-6, 2.4, 0.5, 2.2, um)
    weight = cv2.GaussianBlur(nuclei, (0, 0), 0.8)

    stain = resized_noise(rng, height, width, cell=int(120 * um))
    palette = np.stack([RGB_GLASS, RGB_LYMPHOID, RGB_STROMA, RGB_CYTOPLASM])
    nucleus_palette = np.stack([RGB_GLASS, RGB_LYMPHOCYTE, RGB_NUCLEUS, RGB_NUCLEUS])
    amplitude = np.array([0.0, 8.0, 10.0, 8.0], np.float32)
    # Pixel noise from one tile, repeated: drawing a normal per pixel would dominate the time.
    grain = 4.0 * rng.standard_normal((512, width, 1), dtype=np.float32)
    rgb = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, 512):  # in bands: float images of a whole node would be large
        rows = slice(top, min(top + 512, height))
        band_region = region[rows]
        band_stain = stain[rows][..., None]
        colour = palette[band_region] + amplitude[band_region][..., None] * band_stain
        nucleus = nucleus_palette[band_region] + 12.0 * band_stain
        w = weight[rows].astype(np.float32)[..., None] / 255.0
        colour += w * (nucleus - colour)
        colour += grain[: colour.shape[0]]
        rgb[rows] = np.clip(colour, 0, 255).astype(np.uint8)
    return origin, node_mask, rgb


def render_slide(slide: LymphNodeSlide, plan: PatientPlan, k: int, spec: CohortSpec) -> np.ndarray:
    """The slide's RGB image (uint8, height x width x 3): glass, then each node painted in its mask."""
    rng = np.random.default_rng([spec.seed, 5, plan.index, k])
    rgb = np.empty((slide.height, slide.width, 3), np.uint8)
    rgb[:] = RGB_GLASS.astype(np.uint8)
    for node in slide.nodes:
        (x0, y0), mask, pixels = _paint_node(rng, node, plan.lymph_node_severity, spec.mpp)
        target = rgb[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        np.copyto(target, pixels, where=mask[..., None])
    return rgb


# ---------------------------------------------------------------- annotations


def _annotation(outline: np.ndarray, name: str, cls: str, colour: tuple[int, int, int]) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": polygon_coordinates(outline)},
        "properties": {"objectType": ANNOTATION, "name": name,
                       "classification": {"name": cls, "color": list(colour)}},
    }


def annotation_geojson(slide: LymphNodeSlide) -> bytes:
    """What a pathologist's QuPath export of the slide would hold: a "Lymph node" annotation per
    node and a "Tumor" annotation per tumour region, the planted polygons in level-0 px."""
    features = []
    for i, node in enumerate(slide.nodes, start=1):
        features.append(_annotation(node.outline, f"Node {i}", NODE_CLASS, NODE_COLOUR))
        for j, tumour in enumerate(node.tumours, start=1):
            features.append(_annotation(tumour, f"Node {i} tumour {j}", TUMOUR_CLASS, TUMOUR_COLOUR))
    return json.dumps(feature_collection(features), indent=1).encode()


__all__ = ["LymphNodeSlide", "NodeShape", "annotation_geojson", "ln_slide_name", "patient_layouts",
           "patient_totals", "patient_truth", "render_slide", "slide_layout", "slide_truth"]
