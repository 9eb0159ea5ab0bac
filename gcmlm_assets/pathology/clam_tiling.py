"""Tiling in CLAM's mode: reproduces CLAM's `create_patches_fp.py` (plain Python, no Dagster).

Segmentation at CLAM's seg level, CLAM's area units, one grid per tissue contour starting at the
contour's bounding box, the `four_pt` contour rule with the hole test, patches at level 0, padding
rules, so that its coordinates match CLAM's. `polygon_point_test` is the contour rule's
point-in-polygon test, for all candidate patches at once.
"""

from __future__ import annotations

import dataclasses

from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.coords_h5 import coords_attrs, h5_safe
from gcmlm_assets.pathology.slides import Slide, SlideError, SlideInfo, rgba_to_rgb_on_white
from gcmlm_assets.pathology.tiling_params import TilingParams, TilingResult
from gcmlm_assets.pathology.tissue import find_tissue_regions, rasterise, tissue_binary

# Imported on first use: the definitions import the tiling's constants and types, not its work.
np = lazy("numpy")


def polygon_point_test(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """For each point: 1 inside the closed polygon, 0 on its boundary, -1 outside.

    The same answer as `cv2.pointPolygonTest(polygon, point, False)` (even-odd
    rule, edges count as boundary), for all points at once: points are grouped
    by row, and each row's edge crossings are computed once and searched.
    Exact for integer and half-integer coordinates below 2**26.
    """
    polygon = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    result = np.full(len(points), -1, np.int8)
    if len(points) == 0 or len(polygon) == 0:
        return result
    ax, ay = polygon[:, 0], polygon[:, 1]
    bx, by = np.roll(ax, -1), np.roll(ay, -1)
    low_y, high_y = np.minimum(ay, by), np.maximum(ay, by)
    low_x, high_x = np.minimum(ax, bx), np.maximum(ax, bx)
    flat = ay == by
    rows, row_of = np.unique(points[:, 1], return_inverse=True)
    for row_index, y in enumerate(rows):
        members = np.flatnonzero(row_of == row_index)
        px = points[members, 0]
        # Edges whose closed y-range holds the row (boundary candidates) ...
        touching = (low_y <= y) & (y <= high_y)
        sloped = touching & ~flat
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_row = ax[sloped] + (y - ay[sloped]) * (bx[sloped] - ax[sloped]) / (by[sloped] - ay[sloped])
        # ... of which the half-open ones [low, high) are the crossings the parity counts.
        half_open = (low_y[sloped] <= y) & (y < high_y[sloped])
        crossings = np.sort(x_at_row[half_open])
        right_of_point = len(crossings) - np.searchsorted(crossings, px, side="right")
        row_result = np.where(right_of_point % 2 == 1, 1, -1).astype(np.int8)
        on_edge = np.isin(px, x_at_row)
        horizontal = touching & flat
        if horizontal.any():
            on_edge |= ((low_x[horizontal][None, :] <= px[:, None])
                        & (px[:, None] <= high_x[horizontal][None, :])).any(axis=1)
        row_result[on_edge] = 0
        result[members] = row_result
    return result


def clam_level_downsamples(info: SlideInfo) -> list[tuple[float, float]]:
    """CLAM's per-axis downsamples: measured from the level sizes unless they equal the reported one."""
    width0, height0 = info.dimensions
    result = []
    for (width, height), downsample in zip(info.level_dimensions, info.level_downsamples):
        measured = (width0 / float(width), height0 / float(height))
        result.append(measured if measured != (downsample, downsample) else (downsample, downsample))
    return result


def clam_seg_level(slide: Slide, requested: int) -> int:
    if requested >= 0:
        return requested
    if len(slide.info.level_dimensions) == 1:
        return 0
    return int(slide.handle.get_best_level_for_downsample(64))


def _clam_contour_rule(outer: np.ndarray, candidates: np.ndarray, ref_patch: int, contour_fn: str) -> np.ndarray:
    half = ref_patch // 2
    centers = candidates + half
    if contour_fn == "basic":
        return polygon_point_test(outer, candidates) >= 0
    if contour_fn == "center":
        return polygon_point_test(outer, centers) >= 0
    shift = int(half * 0.5)  # CLAM's center_shift=0.5
    if shift == 0:
        return polygon_point_test(outer, centers) >= 0
    corners = [centers + np.array(offset) for offset in
               ((-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift))]
    inside = np.stack([polygon_point_test(outer, c) >= 0 for c in corners])
    return inside.any(axis=0) if contour_fn == "four_pt" else inside.all(axis=0)


def tile_clam(slide: Slide, params: TilingParams) -> TilingResult:
    clam = params.clam
    info = slide.info
    seg_level = clam_seg_level(slide, clam.seg_level)
    if not 0 <= seg_level < len(info.level_dimensions):
        raise SlideError(info.path, f"has no level {seg_level} to segment (CLAM seg_level)")
    if not 0 <= clam.patch_level < len(info.level_dimensions):
        raise SlideError(info.path, f"has no level {clam.patch_level} to patch (CLAM patch_level)")
    seg_w, seg_h = info.level_dimensions[seg_level]
    if seg_w * seg_h > clam.max_seg_pixels:
        raise SlideError(info.path, f"CLAM mode segments level {seg_level} whole ({seg_w}x{seg_h} px), "
                                    f"more than max_seg_pixels={clam.max_seg_pixels:,}; use the default mode")
    downsamples = clam_level_downsamples(info)
    scale_x, scale_y = downsamples[seg_level]
    rgba = slide.read_rgba((0, 0), seg_level, (seg_w, seg_h))
    ref_area = int(clam.ref_patch_size ** 2 / (scale_x * scale_y))
    regions = find_tissue_regions(tissue_binary(rgba, clam.segmentation()),
                                  min_area=clam.a_t * ref_area, min_hole_area=clam.a_h * ref_area,
                                  max_n_holes=clam.max_n_holes)

    width0, height0 = info.dimensions
    patch_ds = (int(downsamples[clam.patch_level][0]), int(downsamples[clam.patch_level][1]))
    ref_patch = clam.patch_size * patch_ds[0]
    step_x, step_y = clam.step_size * patch_ds[0], clam.step_size * patch_ds[1]
    level_scale = np.array([scale_x, scale_y])
    regions = [regions[i] for i in clam.contour_ids(len(regions))]
    pieces, n_candidates = [], 0
    for region in regions:
        # CLAM scales contours to level 0 with a truncating int32 cast.
        outer = (region.outer * level_scale).astype(np.int32)
        holes = [(hole * level_scale).astype(np.int32) for hole in region.holes]
        x_start, y_start = int(outer[:, 0].min()), int(outer[:, 1].min())
        box_w = int(outer[:, 0].max()) - x_start + 1
        box_h = int(outer[:, 1].max()) - y_start + 1
        if clam.use_padding:
            x_stop, y_stop = x_start + box_w, y_start + box_h
        else:
            x_stop = min(x_start + box_w, width0 - ref_patch + 1)
            y_stop = min(y_start + box_h, height0 - ref_patch + 1)
        xs = np.arange(x_start, x_stop, step_x, dtype=np.int64)
        ys = np.arange(y_start, y_stop, step_y, dtype=np.int64)
        # CLAM walks x in the outer loop, y in the inner one.
        candidates = np.stack([np.repeat(xs, len(ys)), np.tile(ys, len(xs))], axis=1)
        n_candidates += len(candidates)
        if len(candidates) == 0:
            continue
        keep = _clam_contour_rule(outer, candidates, ref_patch, clam.contour_fn)
        centers = candidates + ref_patch / 2
        for hole in holes:
            keep &= polygon_point_test(hole, centers) <= 0
        kept = candidates[keep]
        if len(kept) > 1:  # CLAM drops a contour that yields a single patch
            pieces.append(kept)
    coords = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros((0, 2), np.int64)
    reason = None
    if len(coords) == 0:
        reason = "no tissue found" if not regions else \
            f"no patch passes CLAM's {clam.contour_fn} rule on {len(regions)} tissue contour(s)"

    mpp0 = info.mpp.mean
    attrs = coords_attrs(info, clam.patch_level, clam.patch_size, clam.patch_size, float(ref_patch),
                          mpp0 * patch_ds[0])
    attrs.update({
        "downsample": np.array(downsamples[clam.patch_level], np.float64),
        "target_mpp": float(mpp0 * patch_ds[0]),
        "seg_level": int(seg_level),
        "step_size": int(clam.step_size),
        **{f"clam_{key}": value for key, value in h5_safe(dataclasses.asdict(clam)).items()},
    })
    mask = rasterise(regions, (seg_h, seg_w))
    return TilingResult(
        name=info.name, coords=coords, attrs=attrs, n_candidates=n_candidates, regions=regions,
        preview=rgba_to_rgb_on_white(rgba), preview_scale=(scale_x, scale_y), patch_size_level0=float(ref_patch),
        tissue_fraction=float(mask.mean()), reason=reason,
    )
