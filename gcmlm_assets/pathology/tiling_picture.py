"""The picture of a patient's tiling shown in the Dagster UI (plain Python, no Dagster).

Each slide's low-resolution image with its tissue contours, holes and kept patches drawn on it.
"""

from __future__ import annotations

from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.tiling_params import TilingResult

# Imported on first use: the definitions import the tiling's constants and types, not its work.
cv2 = lazy("cv2")
np = lazy("numpy")

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
