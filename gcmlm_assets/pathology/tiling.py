"""Patch grids over the tissue of a whole-slide image (plain Python, no Dagster).

`tile_slide` tiles a slide in one of two modes:

* `default` (this module): patches of `patch_size` px at `target_mpp` µm/px laid on one grid
  from the slide's top-left corner. Tissue is segmented on a low-resolution
  image of about `seg_mpp` µm/px (never level 0 of a large slide), rasterised
  into a mask, and a patch is kept when the tissue fraction under it is at
  least `min_tissue`, computed for all patches at once from the mask's
  integral image. Patches are read from the finest pyramid level that is not
  finer than needed (`read_size` px there, resized to `patch_size`).
* `clam` (clam_tiling.py): reproduces CLAM's `create_patches_fp.py` so that its coordinates
  match CLAM's.

The parameters and the result are in tiling_params.py, the tissue mask in tissue.py, the
coordinates file (CLAM's HDF5 layout) in coords_h5.py and the picture in tiling_picture.py.
Coordinates are level-0 top-left x, y (int64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.clam_tiling import tile_clam
from gcmlm_assets.pathology.coords_h5 import coords_attrs
from gcmlm_assets.pathology.slides import Slide, SlideError, SlideInfo, rgba_to_rgb_on_white
from gcmlm_assets.pathology.tiling_params import TilingParams, TilingResult
from gcmlm_assets.pathology.tissue import find_tissue_regions, rasterise, tissue_binary

# Imported on first use: the definitions import the tiling's constants and types, not its work.
cv2 = lazy("cv2")
np = lazy("numpy")


def tile_slide(slide: Slide, params: TilingParams) -> TilingResult:
    return tile_clam(slide, params) if params.mode == "clam" else _tile_default(slide, params)


@dataclass(frozen=True)
class ReadPlan:
    """How one patch is read: `read_size` px square at pyramid `level`, then resized to `patch_size`."""

    level: int
    level_downsample: float
    read_size: int
    patch_size: int
    patch_size_level0: float  # side of the patch's field of view in level-0 px (the grid step)
    achieved_mpp: float  # µm/px of the delivered patch (target_mpp up to the rounding of read_size)


# ---------------------------------------------------------------- read planning


def plan_read(info: SlideInfo, params: TilingParams) -> ReadPlan:
    """The pyramid level and read size that deliver `patch_size` px at `target_mpp`.

    Uses the coarsest level that is not coarser than the target (a level up to
    `level_match_tolerance` coarser counts as matching), so patches are only
    ever downsampled, never upsampled.
    """
    mpp0 = info.mpp.mean
    tolerance = params.level_match_tolerance
    needed = params.target_mpp / mpp0
    if needed < 1.0 - tolerance:
        raise SlideError(info.path, f"its resolution {mpp0:g} µm/px is coarser than the target "
                                    f"{params.target_mpp:g} µm/px; patches would be upsampled")
    level = 0
    for index, downsample in enumerate(info.level_downsamples):
        if downsample <= needed * (1.0 + tolerance) and downsample >= info.level_downsamples[level]:
            level = index
    level_downsample = info.level_downsamples[level]
    exact_read = params.patch_size * params.target_mpp / (mpp0 * level_downsample)
    ratio = exact_read / params.patch_size
    if round(ratio) >= 1 and abs(ratio - round(ratio)) <= tolerance * ratio:
        # Within tolerance of a whole multiple: read exactly that, so the grid follows the
        # level's pixels and the resize is a clean 2x, 4x ... (0.2495 µm/px -> 512 px, not 513).
        read_size = int(round(ratio)) * params.patch_size
    else:
        read_size = max(1, int(round(exact_read)))
    return ReadPlan(level=level, level_downsample=level_downsample, read_size=read_size,
                    patch_size=params.patch_size, patch_size_level0=read_size * level_downsample,
                    achieved_mpp=read_size * mpp0 * level_downsample / params.patch_size)


# ---------------------------------------------------------------- default mode


def _segmentation_image(slide: Slide, params: TilingParams) -> tuple[np.ndarray, str]:
    """RGBA image of the whole slide at about `seg_mpp` µm/px, and where it came from."""
    info = slide.info
    width0, height0 = info.dimensions
    seg_downsample = max(1.0, params.seg_mpp / info.mpp.mean)
    out_w = max(1, int(round(width0 / seg_downsample)))
    out_h = max(1, int(round(height0 / seg_downsample)))
    tolerance = params.level_match_tolerance
    if len(info.level_dimensions) == 1 and width0 * height0 > params.thumbnail_above_pixels \
            and "thumbnail" in info.associated_images:
        thumb = np.asarray(slide.handle.associated_images["thumbnail"].convert("RGBA"))
        th, tw = thumb.shape[:2]
        if abs((tw / th) / (width0 / height0) - 1.0) < 0.01:
            if tw > out_w:
                thumb = cv2.resize(thumb, (out_w, out_h), interpolation=cv2.INTER_AREA)
            return thumb, "associated thumbnail"
    level = 0
    for index, downsample in enumerate(info.level_downsamples):
        if downsample <= seg_downsample * (1.0 + tolerance) and downsample >= info.level_downsamples[level]:
            level = index
    return slide.read_level_resized(level, (out_w, out_h)), f"level {level}"


def _tile_default(slide: Slide, params: TilingParams) -> TilingResult:
    info = slide.info
    plan = plan_read(info, params)
    width0, height0 = info.dimensions
    fov = plan.patch_size_level0
    rgba, seg_source = _segmentation_image(slide, params)
    mask_h, mask_w = rgba.shape[:2]
    scale_x, scale_y = width0 / mask_w, height0 / mask_h
    patch_area_px = (fov / scale_x) * (fov / scale_y)
    regions = find_tissue_regions(
        tissue_binary(rgba, params.segmentation),
        min_area=params.min_tissue_area * patch_area_px,
        min_hole_area=params.min_hole_area * patch_area_px,
        max_n_holes=params.max_n_holes,
    )
    mask = rasterise(regions, (mask_h, mask_w))
    tissue_fraction = float(mask.mean()) if mask.size else 0.0

    n_x = int(math.floor((width0 - fov) / fov)) + 1 if width0 >= fov else 0
    n_y = int(math.floor((height0 - fov) / fov)) + 1 if height0 >= fov else 0
    reason = None
    if n_x == 0 or n_y == 0:
        coords = np.zeros((0, 2), np.int64)
        reason = (f"the slide ({width0}x{height0} px at level 0) is smaller than one patch "
                  f"({fov:g} px at level 0 = {params.patch_size} px at {params.target_mpp:g} µm/px)")
    else:
        xs = np.floor(np.arange(n_x) * fov).astype(np.int64)
        ys = np.floor(np.arange(n_y) * fov).astype(np.int64)
        fractions = tissue_fractions(mask, xs, ys, fov, (scale_x, scale_y))
        keep_rows, keep_cols = np.nonzero(fractions >= params.min_tissue)  # row-major: reading order
        coords = np.stack([xs[keep_cols], ys[keep_rows]], axis=1).astype(np.int64)
        if len(coords) == 0:
            reason = ("no tissue found" if not regions else
                      f"no patch has at least {params.min_tissue:.0%} tissue "
                      f"({len(regions)} tissue region(s) cover {tissue_fraction:.1%} of the slide)")

    attrs = coords_attrs(info, plan.level, params.patch_size, plan.read_size, fov, plan.achieved_mpp)
    attrs.update({
        "target_mpp": float(params.target_mpp),
        "min_tissue": float(params.min_tissue),
        "seg_mpp": float(params.seg_mpp),
        "seg_source": seg_source,
        "seg_sthresh": int(params.segmentation.sthresh),
        "seg_mthresh": int(params.segmentation.mthresh),
        "seg_close": int(params.segmentation.close),
        "seg_use_otsu": bool(params.segmentation.use_otsu),
        "min_tissue_area": float(params.min_tissue_area),
        "min_hole_area": float(params.min_hole_area),
        "max_n_holes": -1 if params.max_n_holes is None else int(params.max_n_holes),
        "level_match_tolerance": float(params.level_match_tolerance),
    })
    return TilingResult(
        name=info.name, coords=coords, attrs=attrs, n_candidates=n_x * n_y, regions=regions,
        preview=rgba_to_rgb_on_white(rgba), preview_scale=(scale_x, scale_y), patch_size_level0=fov,
        tissue_fraction=tissue_fraction, reason=reason,
    )


def tissue_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size_level0: float,
                     scale: tuple[float, float]) -> np.ndarray:
    """(len(ys), len(xs)) tissue fraction of every grid patch, from the mask's integral image.

    `mask` is 0/1 with one pixel per `scale` level-0 px; patch (i, j) covers
    level-0 [xs[j], xs[j] + size) x [ys[i], ys[i] + size).
    """
    mask_h, mask_w = mask.shape
    integral = cv2.integral(mask, sdepth=cv2.CV_64F)

    def bounds(starts: np.ndarray, step: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(starts / step), 0, limit - 1).astype(np.int64)
        hi = np.clip(np.round((starts + size_level0) / step), 0, limit).astype(np.int64)
        return lo, np.maximum(hi, lo + 1)

    x0, x1 = bounds(xs, scale[0], mask_w)
    y0, y1 = bounds(ys, scale[1], mask_h)
    total = (integral[y1[:, None], x1[None, :]] - integral[y0[:, None], x1[None, :]]
             - integral[y1[:, None], x0[None, :]] + integral[y0[:, None], x0[None, :]])
    return total / ((y1 - y0)[:, None] * (x1 - x0)[None, :])
