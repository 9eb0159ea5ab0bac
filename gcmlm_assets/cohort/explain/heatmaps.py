"""Per-patch value heatmaps over a slide thumbnail: exact logit contributions or ABMIL attention.

Plain Python (no Dagster). Each patch is drawn as a semi-transparent square coloured by its value
over the slide's thumbnail (OpenSlide); a slide that cannot be read any more is drawn as its patch
layout on white, with a note, as the slide_vector picture does. A colour bar with its label
says what the colours mean:

- "contribution": a diverging map CENTRED ON ZERO (limits +-max|value|), so white means "as in
  the reference" (the explanations pass parts relative to the training cohort's average patient),
  red raises and blue lowers the pathology logit, whatever the range of the values;
- "attention": a sequential map from 0 to the largest weight, labelled as attention, which is
  NOT a contribution (a patch can draw attention and still push the logit either way).

Two sizes: the UI form (the drawing's longer side `side_px`, the whole picture at least
pictures.MIN_DISPLAY_WIDTH wide) and `full_resolution=True` for the artifact store, drawn at the
slide's level-0 size, and at least MIN_PATCH_PX pixels per patch (the longer side capped at
FULL_MAX_SIDE_PX).
The slide drawing is placed 1:1 in the PNG at `figure_layout`'s position.

numpy, Pillow and matplotlib are imported on first use.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gcmlm_assets.lazy import lazy

if TYPE_CHECKING:
    import numpy

np = lazy("numpy")

CONTRIBUTION = "contribution"
ATTENTION = "attention"
COLOURS = {CONTRIBUTION: "RdBu_r", ATTENTION: "viridis"}
LABELS = {CONTRIBUTION: "pathology logit vs. the average training patient\n"
                        "red raises, blue lowers the risk",
          ATTENTION: "ABMIL attention (not a contribution)"}

UI_SIDE_PX = 1000  # the drawing's longer side in the UI form
MIN_PATCH_PX = 16  # each patch's side in the full-resolution form (unless the cap below binds)
FULL_MAX_SIDE_PX = 8192
PATCH_ALPHA = 0.6  # the tissue stays visible under the squares
DPI = 100  # figure inches x 100 = pixels, so the layout is planned in pixels


@dataclass(frozen=True)
class HeatmapDrawing:
    """The slide with its patches coloured, before the title and colour bar are added."""

    rgb: numpy.ndarray  # (H, W, 3) uint8
    scale: float  # drawing pixels per level-0 pixel
    vmin: float
    vmax: float
    colours: str  # the matplotlib colormap's name
    label: str
    note: str  # "" or why the slide itself is not shown

    def patch_box(self, x: float, y: float, patch_side_level0: float) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) drawing pixels of a patch at level-0 (x, y), inclusive."""
        return _patch_box(x, y, patch_side_level0, self.scale)


def _patch_box(x: float, y: float, side: float, scale: float) -> tuple[int, int, int, int]:
    return round(x * scale), round(y * scale), round((x + side) * scale) - 1, round((y + side) * scale) - 1


def patch_value_drawing(slide_path, coords, patch_side_level0: float, values, kind: str,
                        side_px: int = UI_SIDE_PX, *, full_resolution: bool = False) -> HeatmapDrawing:
    """The thumbnail (or a white canvas with the patch layout) with each patch's square coloured
    by its value; non-finite values are left undrawn."""
    from PIL import Image, ImageDraw

    from gcmlm_assets.patch_features import slide_thumbnail

    if kind not in COLOURS:
        raise ValueError(f"kind must be one of {', '.join(COLOURS)}, got {kind!r}")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(coords):
        raise ValueError(f"{len(values)} values for {len(coords)} patches")
    patch_side = float(patch_side_level0)
    if patch_side <= 0:
        raise ValueError(f"patch_side_level0 must be positive, got {patch_side_level0}")

    level0 = _level0_size(slide_path)
    note = ""
    if level0 is None:
        note = "slide file not readable: patch layout only"
        extent = coords.max(axis=0) + patch_side if len(coords) else np.array([patch_side, patch_side])
        level0 = (float(extent[0]), float(extent[1]))
    longer = max(level0)
    side = int(side_px)
    if full_resolution:  # the slide's own level-0 size, or more if its patches would be tiny; capped
        side = max(side, min(max(math.ceil(longer), math.ceil(longer * MIN_PATCH_PX / patch_side)),
                             FULL_MAX_SIDE_PX))
    scale = side / longer
    size = (max(1, round(level0[0] * scale)), max(1, round(level0[1] * scale)))

    thumbnail = None
    if not note:
        thumbnail, _ = slide_thumbnail(slide_path, side)
    if thumbnail is None:
        if not note:
            note = "slide file not readable: patch layout only"
        base = Image.new("RGBA", size, (255, 255, 255, 255))
    else:
        # OpenSlide never enlarges; resize to the planned size so patches land where computed.
        base = Image.fromarray(thumbnail).convert("RGBA").resize(size, Image.Resampling.BILINEAR)

    vmin, vmax = colour_limits(values, kind)
    rgba = _colormap(COLOURS[kind])(np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0))
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    alpha = round(PATCH_ALPHA * 255)
    for (x, y), value, colour in zip(coords, values, rgba):
        if not math.isfinite(value):
            continue
        fill = (round(colour[0] * 255), round(colour[1] * 255), round(colour[2] * 255), alpha)
        draw.rectangle(_patch_box(x, y, patch_side, scale), fill=fill)
    rgb = np.asarray(Image.alpha_composite(base, overlay).convert("RGB"))
    return HeatmapDrawing(rgb, scale, vmin, vmax, COLOURS[kind], LABELS[kind], note)


def colour_limits(values, kind: str) -> tuple[float, float]:
    """Contributions: symmetric about zero (+-max|v|); attention: 0 to the largest weight."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if kind == CONTRIBUTION:
        largest = float(np.max(np.abs(finite))) if finite.size else 0.0
        largest = largest if largest > 0 else 1.0  # all zero: every patch neutral
        return -largest, largest
    top = float(np.max(finite)) if finite.size else 0.0
    return 0.0, top if top > 0 else 1.0


@dataclass(frozen=True)
class FigureLayout:
    """Pixel positions in the heatmap PNG (origin top left)."""

    width: int
    height: int
    image_left: int
    image_top: int
    bar_left: int
    bar_width: int
    font_scale: float
    title_lines: tuple[str, ...]


def figure_layout(drawing_width: int, drawing_height: int, title: str) -> FigureLayout:
    """The picture: the title above, the drawing 1:1 below it on the left, the colour bar to its
    right; at least pictures.MIN_DISPLAY_WIDTH wide (padded with white)."""
    from gcmlm_assets.pictures import MIN_DISPLAY_WIDTH

    # Text grows with big full-resolution drawings, so the legend stays legible when zoomed out.
    font_scale = min(6.0, max(1.0, drawing_width / 1200))
    pad = round(16 * font_scale)
    bar_gap, bar_width, bar_labels = round(20 * font_scale), round(22 * font_scale), round(150 * font_scale)
    width = max(MIN_DISPLAY_WIDTH, pad + drawing_width + bar_gap + bar_width + bar_labels + pad)
    # 13 pt at DPI pixels per inch; an average character is about 0.6 of the size
    characters = max(20, int((width - 2 * pad) / (13 * font_scale * DPI / 72 * 0.6)))
    lines = tuple(line for part in title.splitlines() for line in (textwrap.wrap(part, characters) or [""]))
    title_height = pad + round(len(lines) * 22 * font_scale) + pad
    return FigureLayout(width, title_height + drawing_height + pad, pad, title_height,
                        pad + drawing_width + bar_gap, bar_width, font_scale, lines)


def patch_value_heatmap(slide_path, coords, patch_side_level0: float, values, kind: str, title: str,
                        side_px: int = UI_SIDE_PX, *, full_resolution: bool = False) -> bytes:
    """PNG of the patches' values over the slide, with a colour bar and its label (see the module
    doc). `coords`: (N, 2) level-0 top-left corners; `values`: (N,)."""
    drawing = patch_value_drawing(slide_path, coords, patch_side_level0, values, kind, side_px,
                                  full_resolution=full_resolution)
    return heatmap_png(drawing, title)


def heatmap_png(drawing: HeatmapDrawing, title: str) -> bytes:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from gcmlm_assets.pictures import pyplot

    plt = pyplot()
    height, width = drawing.rgb.shape[:2]
    if drawing.note:
        title = f"{title}\n({drawing.note})"
    layout = figure_layout(width, height, title)
    fig = plt.figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI, facecolor="white")

    def box(left: int, top: int, w: int, h: int) -> list[float]:  # pixels -> figure fractions
        return [left / layout.width, 1 - (top + h) / layout.height, w / layout.width, h / layout.height]

    axis = fig.add_axes(box(layout.image_left, layout.image_top, width, height))
    axis.imshow(drawing.rgb, interpolation="none", aspect="auto")
    axis.set_axis_off()
    bar_axis = fig.add_axes(box(layout.bar_left, layout.image_top, layout.bar_width, height))
    mappable = ScalarMappable(Normalize(drawing.vmin, drawing.vmax), _colormap(drawing.colours))
    bar = fig.colorbar(mappable, cax=bar_axis)
    bar.set_label(drawing.label, fontsize=11 * layout.font_scale)
    bar.ax.tick_params(labelsize=9 * layout.font_scale)
    fig.text(layout.image_left / layout.width, 1 - (layout.image_left * 0.75) / layout.height,
             "\n".join(layout.title_lines), ha="left", va="top", fontsize=13 * layout.font_scale)
    buffer = io.BytesIO()
    # No tight bounding box: it would crop the padding that keeps the width rule and the 1:1 layout.
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _level0_size(slide_path) -> tuple[float, float] | None:
    from pathlib import Path

    if not slide_path or not Path(str(slide_path)).is_file():
        return None
    import openslide

    try:
        with openslide.OpenSlide(str(slide_path)) as handle:
            return tuple(float(v) for v in handle.dimensions)  # type: ignore[return-value]
    except (openslide.OpenSlideError, OSError):
        return None
