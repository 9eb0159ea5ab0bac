"""Patch grids over the tissue of a whole-slide image (plain Python, no Dagster).

Two modes:

* `default`: patches of `patch_size` px at `target_mpp` µm/px laid on one grid
  from the slide's top-left corner. Tissue is segmented on a low-resolution
  image of about `seg_mpp` µm/px (never level 0 of a large slide), rasterised
  into a mask, and a patch is kept when the tissue fraction under it is at
  least `min_tissue`, computed for all patches at once from the mask's
  integral image. Patches are read from the finest pyramid level that is not
  finer than needed (`read_size` px there, resized to `patch_size`).
* `clam`: reproduces CLAM's `create_patches_fp.py` (segmentation at CLAM's
  seg level, CLAM's area units, one grid per tissue contour starting at the
  contour's bounding box, the `four_pt` contour rule with the hole test,
  patches at level 0, padding rules) so that its coordinates match CLAM's.

Coordinates are level-0 top-left x, y (int64). The HDF5 layout is CLAM's
(`coords` dataset with attributes), read as-is by CLAM and TRIDENT.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


from gcmlm_assets.catalogue import PATCH_COORDS
from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.slides import PLAUSIBLE_MPP, Slide, SlideError, SlideInfo
from gcmlm_assets.pathology.tissue import (
    SegmentationParams,
    TissueRegion,
    find_tissue_regions,
    rasterise,
    tissue_binary,
)
from gcmlm_assets.storage import atomic_path

# Imported on first use: the definitions import this module's constants and types, not its work.
cv2 = lazy("cv2")
h5py = lazy("h5py")
np = lazy("numpy")

# patch_coords' code version (catalogue.py): bump it there when a change of this module changes its
# output for the same inputs. It is in patch_coords' fingerprint and in its data version.
TILING_VERSION = PATCH_COORDS.code_version
MODES = ("default", "clam")
CLAM_CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")


@dataclass(frozen=True)
class ClamParams:
    """CLAM's `create_patches_fp.py` parameters (its own defaults; a preset CSV may override).

    `a_t` and `a_h` are in CLAM's unit: multiples of a `ref_patch_size`² px area
    at level 0 (CLAM's `segmentTissue` default of 512).
    """

    seg_level: int = -1  # -1: level 0 if the slide has one level, else the best level for downsample 64
    # CLAM's segmentation defaults are the ones `default` mode uses (SegmentationParams').
    sthresh: int = SegmentationParams.sthresh
    sthresh_up: int = SegmentationParams.sthresh_up
    mthresh: int = SegmentationParams.mthresh
    close: int = SegmentationParams.close
    use_otsu: bool = SegmentationParams.use_otsu
    a_t: float = 100.0
    a_h: float = 16.0
    max_n_holes: int = 8
    ref_patch_size: int = 512
    patch_size: int = 256
    step_size: int = 256
    patch_level: int = 0
    contour_fn: str = "four_pt"
    use_padding: bool = True
    keep_ids: str = "none"  # comma-separated contour indices to keep ("none": all)
    exclude_ids: str = "none"  # comma-separated contour indices to drop
    max_seg_pixels: int = 400_000_000  # CLAM reads the seg level whole; refuse what would not fit

    @classmethod
    def from_preset_csv(cls, path: str | os.PathLike, base: ClamParams | None = None) -> ClamParams:
        """`base` (default: CLAM's defaults) with the columns of a CLAM preset CSV
        (`presets/*.csv`: one row of seg/filter/patch parameters) applied on top."""
        with open(path, newline="", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
        values = dataclasses.asdict(base or cls())
        for item in dataclasses.fields(cls):
            raw = row.get(item.name)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            if item.type in ("bool", bool):
                values[item.name] = raw.lower() in ("true", "1", "yes")
            elif item.type in ("int", int):
                values[item.name] = int(float(raw))
            elif item.type in ("float", float):
                values[item.name] = float(raw)
            else:
                values[item.name] = raw
        return cls(**values)

    def contour_ids(self, n_contours: int) -> list[int]:
        """The contours CLAM patches, in the order it patches them."""
        def parse(text: str) -> set[int]:
            text = str(text).strip()
            return set() if text.lower() in ("", "none") else {int(v) for v in text.split(",")}

        keep, exclude = parse(self.keep_ids), parse(self.exclude_ids)
        chosen = keep if keep else set(range(n_contours))
        return sorted(i for i in chosen - exclude if 0 <= i < n_contours)

    def segmentation(self) -> SegmentationParams:
        return SegmentationParams(sthresh=self.sthresh, sthresh_up=self.sthresh_up, mthresh=self.mthresh,
                                  close=self.close, use_otsu=self.use_otsu)


@dataclass(frozen=True)
class TilingParams:
    mode: str = "default"
    patch_size: int = 256  # px of the patch the encoder gets
    target_mpp: float = 0.5  # µm/px of those pixels (about 20x)
    min_tissue: float = 0.25  # fraction of the patch that must be tissue
    default_mpp: float = 0.5  # used (and reported as a warning) when the slide has no resolution
    plausible_mpp: tuple[float, float] = PLAUSIBLE_MPP
    # A pyramid level (or 1.0 read size ratio) within this relative distance counts as exact:
    # 0.499 µm/px scanned, 0.5 wanted -> read 256 px as they are, no resize.
    level_match_tolerance: float = 0.02
    seg_mpp: float = 8.0  # µm per mask pixel: 16 mask px per side of a 256 px x 0.5 µm patch
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    min_tissue_area: float = 1.0  # tissue regions smaller than this many patch areas are dropped
    min_hole_area: float = 1.0  # holes smaller than this many patch areas count as tissue
    max_n_holes: int | None = None  # None keeps every hole
    # A one-level slide above this many pixels is segmented on its associated thumbnail
    # (when that has the slide's aspect ratio) instead of streaming all of level 0.
    thumbnail_above_pixels: int = 400_000_000
    clam: ClamParams = field(default_factory=ClamParams)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"tiling mode must be one of {MODES}, got {self.mode!r}")
        if self.patch_size < 1 or self.target_mpp <= 0 or self.seg_mpp <= 0:
            raise ValueError("patch_size, target_mpp and seg_mpp must be positive")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must lie in [0, 1], got {self.min_tissue}")
        if self.clam.contour_fn not in CLAM_CONTOUR_FNS:
            raise ValueError(f"clam contour_fn must be one of {CLAM_CONTOUR_FNS}, got {self.clam.contour_fn!r}")

    def as_dict(self) -> dict:
        """The parameters that matter for the chosen mode (recorded in outputs and fingerprints)."""
        everything = dataclasses.asdict(self)
        if self.mode == "clam":
            return {"mode": "clam", "default_mpp": self.default_mpp,
                    "plausible_mpp": list(self.plausible_mpp), "clam": everything["clam"]}
        everything.pop("clam")
        everything["plausible_mpp"] = list(self.plausible_mpp)
        return everything


@dataclass(frozen=True)
class ReadPlan:
    """How one patch is read: `read_size` px square at pyramid `level`, then resized to `patch_size`."""

    level: int
    level_downsample: float
    read_size: int
    patch_size: int
    patch_size_level0: float  # side of the patch's field of view in level-0 px (the grid step)
    achieved_mpp: float  # µm/px of the delivered patch (target_mpp up to the rounding of read_size)


@dataclass
class TilingResult:
    name: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    attrs: dict  # written on the HDF5 `coords` dataset
    n_candidates: int
    regions: list[TissueRegion]  # tissue contours in `preview` pixels
    preview: np.ndarray  # RGB image the tissue was segmented on
    preview_scale: tuple[float, float]  # level-0 px per preview px (x, y)
    patch_size_level0: float
    tissue_fraction: float  # of the slide's area
    reason: str | None = None  # why there are no patches

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))


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


# ---------------------------------------------------------------- point in polygon


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

    attrs = _common_attrs(info, plan.level, params.patch_size, plan.read_size, fov, plan.achieved_mpp)
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
        preview=_rgb(rgba), preview_scale=(scale_x, scale_y), patch_size_level0=fov,
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


# ---------------------------------------------------------------- CLAM mode


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


def _tile_clam(slide: Slide, params: TilingParams) -> TilingResult:
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
    attrs = _common_attrs(info, clam.patch_level, clam.patch_size, clam.patch_size, float(ref_patch),
                          mpp0 * patch_ds[0])
    attrs.update({
        "downsample": np.array(downsamples[clam.patch_level], np.float64),
        "target_mpp": float(mpp0 * patch_ds[0]),
        "seg_level": int(seg_level),
        "step_size": int(clam.step_size),
        **{f"clam_{key}": value for key, value in _h5_safe(dataclasses.asdict(clam)).items()},
    })
    mask = rasterise(regions, (seg_h, seg_w))
    return TilingResult(
        name=info.name, coords=coords, attrs=attrs, n_candidates=n_candidates, regions=regions,
        preview=_rgb(rgba), preview_scale=(scale_x, scale_y), patch_size_level0=float(ref_patch),
        tissue_fraction=float(mask.mean()), reason=reason,
    )


# ---------------------------------------------------------------- common


def tile_slide(slide: Slide, params: TilingParams) -> TilingResult:
    return _tile_clam(slide, params) if params.mode == "clam" else _tile_default(slide, params)


def _rgb(rgba: np.ndarray) -> np.ndarray:
    from gcmlm_assets.pathology.slides import rgba_to_rgb_on_white

    return rgba_to_rgb_on_white(rgba)


def _common_attrs(info: SlideInfo, level: int, patch_size: int, read_size: int, size_level0: float,
                  achieved_mpp: float) -> dict:
    level_dim = np.array(info.level_dimensions[level], np.int64)
    downsample = info.level_downsamples[level]
    mpp0 = info.mpp.mean
    return {
        # CLAM's attributes. CLAM (and TRIDENT given CLAM coordinates) reads `patch_size` pixels at
        # `patch_level`, so `patch_size` is the size READ there: equal to the output size when a
        # level matches target_mpp, larger when a finer level is read and resized.
        "patch_size": np.int64(read_size),
        "patch_level": np.int64(level),
        "downsample": np.array([downsample, downsample], np.float64),
        "level_dim": level_dim,
        "downsampled_level_dim": level_dim.copy(),
        "name": info.name,
        # TRIDENT's attributes, consistent with the above: patch_size x level0_magnification /
        # target_magnification == patch_size_level0 (the field of view at level 0).
        "patch_size_level0": np.int64(round(size_level0)),
        "level0_width": np.int64(info.dimensions[0]),
        "level0_height": np.int64(info.dimensions[1]),
        "level0_magnification": float(10.0 / mpp0),
        "target_magnification": float(10.0 / mpp0 * read_size / size_level0),
        "overlap": np.int64(0),
        # Ours: the patch the encoder sees is read_size px resized to target_patch_size px, at
        # achieved_mpp (target_mpp up to the rounding of read_size).
        "target_patch_size": np.int64(patch_size),
        "read_size": np.int64(read_size),
        "level0_mpp": float(mpp0),
        "mpp_source": info.mpp.source,
        "achieved_mpp": float(achieved_mpp),
        "tiling_version": TILING_VERSION,
    }


def _h5_safe(values: dict) -> dict:
    safe = {}
    for key, value in values.items():
        if value is None:
            safe[key] = "none"
        elif isinstance(value, (bool, np.bool_)):
            safe[key] = bool(value)
        elif isinstance(value, (list, tuple)):
            safe[key] = np.asarray(value)
        else:
            safe[key] = value
    return safe


def write_coords_h5(final: str | os.PathLike, result: TilingResult) -> Path:
    """One slide's CLAM-layout file, written under a temporary name and renamed into place."""
    final = Path(final)
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as handle:
            dataset = handle.create_dataset("coords", data=np.asarray(result.coords, np.int64).reshape(-1, 2))
            for key, value in _h5_safe(result.attrs).items():
                dataset.attrs[key] = value
    return final


@dataclass(frozen=True)
class PatchCoords:
    coords: np.ndarray
    attrs: dict

    @property
    def patch_level(self) -> int:
        return int(self.attrs["patch_level"])

    @property
    def read_size(self) -> int:
        """Square side to read at `patch_level`; resize it to `patch_size`."""
        return int(self.attrs.get("read_size", self.attrs["patch_size"]))

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])


def read_coords_h5(path: str | os.PathLike) -> PatchCoords:
    with h5py.File(path, "r") as handle:
        dataset = handle["coords"]
        return PatchCoords(np.asarray(dataset[:], np.int64), dict(dataset.attrs))


# ---------------------------------------------------------------- picture


# Slides per row of the picture, and the size of each slide's drawing: at FULL_DPI one inch is 150 px,
# so a slide drawn `max_side` px wide fills its axis without being scaled (outlines stay 1-2 px).
PICTURE_COLUMNS = 3
PICTURE_INCHES_PER_SLIDE = 6.0


def tiling_picture(results: list[TilingResult], *, max_side: int = 900, max_slides: int = 6) -> bytes:
    """Full-size PNG: each slide's low-resolution image with tissue contours (green), holes
    (blue) and kept patches (red squares), up to `PICTURE_COLUMNS` slides per row."""
    from gcmlm_assets.pictures import figure_png, pyplot

    plt = pyplot()

    shown = results[:max_slides]
    columns = max(1, min(len(shown), PICTURE_COLUMNS))
    rows = -(-len(shown) // columns)
    side = PICTURE_INCHES_PER_SLIDE
    fig, axes = plt.subplots(rows, columns, figsize=(side * columns, (side + 0.6) * rows), squeeze=False,
                             layout="constrained")
    for axis in axes.flat[len(shown):]:
        axis.axis("off")
    for axis, result in zip(axes.flat, shown):
        image = result.preview
        # Scaled to `max_side` both ways, so that outlines stay thin on small segmentation images.
        factor = max_side / max(image.shape[:2])
        image = cv2.resize(image, (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor))),
                           interpolation=cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR)
        image = np.ascontiguousarray(image.copy())
        sx = factor / result.preview_scale[0]
        sy = factor / result.preview_scale[1]
        to_picture = np.array([factor, factor])
        for region in result.regions:
            cv2.polylines(image, [np.round(region.outer * to_picture).astype(np.int32).reshape(-1, 1, 2)],
                          True, (0, 170, 0), 3)
            for hole in region.holes:
                cv2.polylines(image, [np.round(hole * to_picture).astype(np.int32).reshape(-1, 1, 2)],
                              True, (0, 60, 220), 2)
        side_x, side_y = result.patch_size_level0 * sx, result.patch_size_level0 * sy
        for x, y in result.coords:
            top_left = (int(round(x * sx)), int(round(y * sy)))
            bottom_right = (int(round(x * sx + side_x)) - 1, int(round(y * sy + side_y)) - 1)
            cv2.rectangle(image, top_left, bottom_right, (220, 30, 30), 1)
        axis.imshow(image)
        axis.set_title(f"{result.name}\n{result.n_patches} patches, {result.attrs.get('mpp_source')}", fontsize=14)
        axis.axis("off")
    total = sum(result.n_patches for result in results)
    shown_note = f", first {len(shown)} shown" if len(results) > len(shown) else ""
    fig.suptitle(f"{len(results)} slide(s), {total} patches{shown_note}: tissue (green), holes (blue), "
                 "patches (red)", fontsize=14)
    return figure_png(fig)
