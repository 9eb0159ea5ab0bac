"""Tissue segmentation of a low-resolution slide image (plain numpy/OpenCV, no Dagster).

The recipe is CLAM's: saturation channel of HSV (stained tissue is coloured,
glass is grey-white), median blur against speckle, a fixed or Otsu threshold,
a morphological closing to bridge small gaps, then outer contours with their
holes (`RETR_CCOMP`) filtered by area. Areas here are in pixels of the image
segmented; callers convert their units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gcmlm_assets.lazy import lazy

# Imported on first use: the definitions import this module's constants and types, not its work.
cv2 = lazy("cv2")
np = lazy("numpy")



@dataclass(frozen=True)
class SegmentationParams:
    sthresh: int = 8  # saturation threshold (0-255) when not using Otsu
    sthresh_up: int = 255
    mthresh: int = 7  # median blur kernel (odd, pixels)
    close: int = 4  # closing kernel (pixels); 0 = none
    use_otsu: bool = False


@dataclass
class TissueRegion:
    """One tissue contour and the holes kept inside it, as (K, 2) int32 x,y arrays."""

    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    area: float = 0.0  # outer area minus the holes' areas


def tissue_binary(rgb: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """uint8 image, 255 where tissue: saturation -> median blur -> threshold -> closing.

    `rgb` may carry a 4th (alpha) channel; it is ignored, as CLAM ignores it.
    """
    if params.mthresh % 2 != 1:
        raise ValueError(f"mthresh (median blur kernel) must be odd, got {params.mthresh}")
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)[..., 1]
    blurred = cv2.medianBlur(saturation, params.mthresh)
    if params.use_otsu:
        _, binary = cv2.threshold(blurred, 0, params.sthresh_up, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, binary = cv2.threshold(blurred, params.sthresh, params.sthresh_up, cv2.THRESH_BINARY)
    if params.close > 0:
        kernel = np.ones((params.close, params.close), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    return binary


def find_tissue_regions(binary: np.ndarray, *, min_area: float, min_hole_area: float,
                        max_n_holes: int | None) -> list[TissueRegion]:
    """Outer contours whose net area (holes subtracted) exceeds `min_area`, each with
    its holes larger than `min_hole_area` (only the `max_n_holes` largest when set).

    Comparisons are strict, as in CLAM. Order follows OpenCV's contour order, which
    CLAM's coordinate order depends on.
    """
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or len(contours) == 0:
        return []
    parent = hierarchy[0][:, 3]
    areas = np.fromiter((cv2.contourArea(c) for c in contours), dtype=np.float64, count=len(contours))
    is_hole = parent >= 0
    # Sum of the holes' areas of every outer contour, in one pass.
    hole_area_sum = np.bincount(parent[is_hole], weights=areas[is_hole], minlength=len(contours))
    net_area = areas - hole_area_sum

    holes_of: dict[int, list[int]] = {}
    for hole in np.flatnonzero(is_hole):
        holes_of.setdefault(int(parent[hole]), []).append(int(hole))

    regions = []
    for index in np.flatnonzero(~is_hole):
        if net_area[index] == 0 or not net_area[index] > min_area:
            continue
        hole_ids = sorted(holes_of.get(int(index), []), key=lambda h: areas[h], reverse=True)
        if max_n_holes is not None:
            hole_ids = hole_ids[:max_n_holes]
        holes = [contours[h].reshape(-1, 2) for h in hole_ids if areas[h] > min_hole_area]
        regions.append(TissueRegion(contours[index].reshape(-1, 2), holes, float(net_area[index])))
    return regions


def rasterise(regions: list[TissueRegion], shape: tuple[int, int]) -> np.ndarray:
    """uint8 0/1 mask of the regions, holes cut out.

    Drawn largest first: a tissue island lying inside another region's hole is
    smaller than that region, so it is painted after the hole is cut and survives.
    """
    mask = np.zeros(shape, np.uint8)
    for region in sorted(regions, key=lambda r: cv2.contourArea(r.outer), reverse=True):
        cv2.drawContours(mask, [region.outer.reshape(-1, 1, 2)], -1, 1, thickness=cv2.FILLED)
        if region.holes:
            cv2.drawContours(mask, [h.reshape(-1, 1, 2) for h in region.holes], -1, 0, thickness=cv2.FILLED)
    return mask
