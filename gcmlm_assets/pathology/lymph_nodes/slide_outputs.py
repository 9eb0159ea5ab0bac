"""One analysed lymph-node slide's files: QuPath GeoJSON, picture, patches table (plain Python, no Dagster).

* GeoJSON (level-0 px, what QuPath's File > Import objects reads): one "Lymph node" annotation per
  node (name "Node <id>"; measurements area_mm2, tumour_area_mm2, metastatic 0/1), then one
  "Tumor" annotation per tumour region (measurements area_mm2, node_id).
* Picture: the slide's thumbnail with nodes outlined (red: metastatic, green: clean), tumour
  filled in semi-transparent orange, node ids, and a title with the counts and T/MLN.
* Patches table: slide, x, y (level-0 corner, as the HDF5), tumour_probability, node_id (0: none).
"""

from __future__ import annotations

from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.lymph_nodes.patient_row import t_mln
from gcmlm_assets.pathology.lymph_nodes.regions import SlideNodes
from gcmlm_assets.pathology.qupath_geojson import ANNOTATION, feature_collection, polygon_coordinates
from gcmlm_assets.pathology.slides import opened

cv2 = lazy("cv2")
np = lazy("numpy")
pa = lazy("pyarrow")

NODE_CLASS = "Lymph node"
TUMOUR_CLASS = "Tumor"  # QuPath's own class name
METASTATIC_COLOUR = (220, 30, 30)
CLEAN_COLOUR = (0, 160, 0)
TUMOUR_COLOUR = (255, 150, 0)
TUMOUR_OPACITY = 0.45
PICTURE_MAX_SIDE = 1200  # px of the thumbnail's longer side


# ---------------------------------------------------------------- GeoJSON


def _annotation(coordinates: list, name: str, class_name: str, colour, measurements: dict) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": coordinates},
        "properties": {
            "objectType": ANNOTATION,
            "name": name,
            "classification": {"name": class_name, "color": list(colour)},
            "measurements": measurements,
            "isLocked": True,  # made by the analysis: not for editing by hand
        },
    }


def slide_geojson(slide: SlideNodes) -> dict:
    """The slide's nodes and tumour regions as a QuPath FeatureCollection (level-0 px)."""
    features = []
    for node in slide.nodes:
        coordinates = polygon_coordinates(node.outer, node.holes)
        if coordinates is None:
            continue
        colour = METASTATIC_COLOUR if node.metastatic else CLEAN_COLOUR
        features.append(_annotation(coordinates, f"Node {node.id}", NODE_CLASS, colour, {
            "area_mm2": node.area_mm2, "tumour_area_mm2": node.tumour_area_mm2,
            "metastatic": int(node.metastatic)}))
    for index, region in enumerate(slide.tumour_regions, start=1):
        coordinates = polygon_coordinates(region.outer, region.holes)
        if coordinates is None:  # a one-cell-wide sliver has no outline to draw; its area still counts
            continue
        features.append(_annotation(coordinates, f"Tumor {index} (node {region.node_id})", TUMOUR_CLASS,
                                    TUMOUR_COLOUR, {"area_mm2": region.area_mm2, "node_id": region.node_id}))
    return feature_collection(features)


# ---------------------------------------------------------------- patches table


def patches_table(slide: SlideNodes):
    n = len(slide.coords)
    return pa.table({
        "slide": pa.array([slide.name] * n, pa.string()),
        "x": pa.array(slide.coords[:, 0], pa.int64()),
        "y": pa.array(slide.coords[:, 1], pa.int64()),
        "tumour_probability": pa.array(slide.probabilities, pa.float64()),
        "node_id": pa.array(slide.patch_node_ids, pa.int64()),
    })


# ---------------------------------------------------------------- picture


def slide_thumbnail(slide_path, *, default_mpp: float, plausible_mpp, max_side: int = PICTURE_MAX_SIDE):
    """The whole slide as RGB of at most `max_side` px on its longer side, read from the coarsest
    pyramid level that is still at least that large; and its level-0 px per thumbnail px (x, y)."""
    from gcmlm_assets.pathology.slides import rgba_to_rgb_on_white

    with opened(slide_path, default_mpp=default_mpp, plausible_mpp=plausible_mpp) as slide:
        width, height = slide.info.dimensions
        factor = min(1.0, max_side / max(width, height))
        out_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        level = 0
        for index, (level_w, level_h) in enumerate(slide.info.level_dimensions):
            if level_w >= out_size[0] and level_h >= out_size[1]:
                level = index
        rgb = rgba_to_rgb_on_white(slide.read_level_resized(level, out_size))
    return rgb, (width / out_size[0], height / out_size[1])


def slide_title(slide: SlideNodes) -> list[str]:
    ratio = t_mln(slide.tumour_area_mm2, slide.metastatic_node_area_mm2, slide.n_metastatic_nodes)
    ratio_text = f"T/MLN {ratio:.3f}" if ratio is not None else "T/MLN undefined (no metastatic node)"
    return [f"{slide.name}: {slide.n_nodes} node(s), {slide.n_metastatic_nodes} metastatic",
            f"tumour {slide.tumour_area_mm2:.3f} mm2 of {slide.metastatic_node_area_mm2:.3f} mm2, {ratio_text}",
            "nodes: red metastatic, green clean; tumour orange"]


DRAW_SHIFT = 4  # cv2's fractional bits: outlines placed to 1/16 px


def _points(outline, scale) -> np.ndarray:
    """Level-0 px -> thumbnail px (pixel i's centre is at level-0 (i + 0.5) x scale), fixed-point."""
    points = np.asarray(outline, np.float64).reshape(-1, 2) / np.asarray(scale, np.float64) - 0.5
    return np.round(points * (1 << DRAW_SHIFT)).astype(np.int32)


def draw_slide_picture(thumbnail, scale, slide: SlideNodes):
    """(H, W, 3) uint8: `thumbnail` (RGB, `scale` level-0 px per px) with the slide's nodes and
    tumour drawn on it, under a title band."""
    image = np.ascontiguousarray(thumbnail[..., :3]).copy()
    if slide.tumour_regions:
        overlay = image.copy()
        for region in slide.tumour_regions:
            cv2.fillPoly(overlay, [_points(region.outer, scale)], TUMOUR_COLOUR, cv2.LINE_AA, DRAW_SHIFT)
            if region.holes:
                holes = [_points(hole, scale) for hole in region.holes]
                mask = np.zeros(image.shape[:2], np.uint8)
                cv2.fillPoly(mask, holes, 1, cv2.LINE_8, DRAW_SHIFT)
                overlay[mask > 0] = image[mask > 0]
        image = cv2.addWeighted(overlay, TUMOUR_OPACITY, image, 1 - TUMOUR_OPACITY, 0)
    thickness = max(1, round(max(image.shape[:2]) / 500))
    font_scale = max(0.4, max(image.shape[:2]) / 1600)
    for node in slide.nodes:
        colour = METASTATIC_COLOUR if node.metastatic else CLEAN_COLOUR
        cv2.polylines(image, [_points(node.outer, scale)] + [_points(h, scale) for h in node.holes], True, colour,
                      thickness, cv2.LINE_AA, DRAW_SHIFT)
        x0, y0 = _points([node.bbox[:2]], scale)[0] >> DRAW_SHIFT
        cv2.putText(image, str(node.id), (int(x0), int(max(y0 - 4, 12))), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    colour, thickness, cv2.LINE_AA)
    return _with_title(image, slide_title(slide))


def _with_title(image, lines: list[str]):
    """`image` under a white band holding `lines`, each shrunk to fit the width."""
    width = max(image.shape[1], 400)
    line_height = 22
    band = np.full((line_height * len(lines) + 8, width, 3), 255, np.uint8)
    for index, line in enumerate(lines):
        font_scale = 0.55
        while font_scale > 0.25 and cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)[0][0] > width - 8:
            font_scale -= 0.05
        cv2.putText(band, line, (4, line_height * (index + 1)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    body = np.full((image.shape[0], width, 3), 255, np.uint8)
    body[:, :image.shape[1]] = image
    return np.concatenate([band, body], axis=0)
