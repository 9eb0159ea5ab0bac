"""Pictures for the Dagster UI, with their size rules in one place.

Every picture is kept twice:

* full size: a lossless PNG rendered at `FULL_DPI`, written beside the asset's artifacts, its path
  in the materialization metadata (`picture_path`, `plot_<kind>_path`, ...);
* for display: embedded in markdown metadata as a data URI, at least `MIN_DISPLAY_WIDTH` px wide
  (as rendered up to `KEEP_WIDTH_UP_TO`, wider ones at `DISPLAY_WIDTH`, when it fits) and with the whole markdown string under `MARKDOWN_LIMIT` bytes,
  so that the event log stays small and a mask outline can still be read.

The display version is made from the full-size picture by trying encodings from the best looking
down (`_ladder`): plots (flat colours, text) as palette PNG, photographic pictures (CT, slides) as
WebP, then fewer colours or lower quality, then a narrower picture down to `MIN_DISPLAY_WIDTH`.
Only if nothing fits at that width is the picture made narrower still: the byte limit wins.

matplotlib and Pillow are imported on first use: loading the definitions must not pay for them.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcmlm_assets.storage import atomic_write_bytes

MIN_DISPLAY_WIDTH = 800
DISPLAY_WIDTH = 1200  # what wider pictures are scaled to
KEEP_WIDTH_UP_TO = 1400  # narrower ones are shown as they are: resampling blurs lines and text
MARKDOWN_LIMIT = 60_000  # bytes of one markdown metadata value, data URI included
# A per-patient picture is stored with every materialization of every patient (three times on
# SQLite: the step's output, the run's log and the asset index): half the limit keeps a full
# pass within the instance's budget per patient (a real slide's picture may then be narrower).
PATIENT_MARKDOWN_LIMIT = 30_000
FULL_DPI = 150

PLOT = "plot"  # line art and text: palette PNG keeps it sharp and small
PHOTO = "photo"  # CT slices, slide thumbnails: lossy WebP is several times smaller than PNG
KINDS = (PLOT, PHOTO)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display in workers or pods), imported on first use:
    loading the definitions must not pay for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def __getattr__(name: str):
    # `pictures.plt` / `from gcmlm_assets.pictures import plt`, imported only when asked for.
    if name == "plt":
        return pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- full size


def figure_png(fig, dpi: int = FULL_DPI) -> bytes:
    """The figure as a lossless PNG at full size (closes the figure)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    pyplot().close(fig)
    return buffer.getvalue()


def rgb_png(rgb) -> bytes:
    """An (H, W, 3) uint8 array as a lossless PNG."""
    buffer = io.BytesIO()
    _as_rgb_image(rgb).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def save_png(png: bytes, path: str | Path) -> Path:
    return atomic_write_bytes(path, png)


# ---------------------------------------------------------------- display


@dataclass(frozen=True)
class Display:
    """The picture as embedded in the event log."""

    data: bytes
    mime: str
    width: int
    height: int
    encoding: str  # e.g. "png 64 colours", "webp q80": what the ladder settled on

    def markdown(self, alt: str = "picture") -> str:
        return markdown(self.data, self.mime, alt)


@dataclass(frozen=True)
class Picture:
    full_png: bytes
    display: Display


def markdown(data: bytes, mime: str, alt: str = "picture") -> str:
    """Markdown that the Dagster UI renders as an inline image (a data URI of any image type)."""
    return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode()})"


def render(picture: Any, kind: str, alt: str = "picture") -> Picture:
    """A matplotlib figure (closed here) or an (H, W, 3) uint8 array: its full-size PNG and its
    display version."""
    full = rgb_png(picture) if _is_array(picture) else figure_png(picture)
    return Picture(full, display_version(full, kind, alt))


def picture_markdown(path: str | Path, kind: str, alt: str = "picture", limit: int = MARKDOWN_LIMIT) -> str:
    """The display markdown of a stored full-size picture."""
    return display_version(Path(path).read_bytes(), kind, alt, limit).markdown(alt)


def patient_picture_markdown(path: str | Path, kind: str, alt: str = "picture") -> str:
    """The display markdown of a per-patient picture (`PATIENT_MARKDOWN_LIMIT`)."""
    return picture_markdown(path, kind, alt, PATIENT_MARKDOWN_LIMIT)


def display_version(picture: Any, kind: str, alt: str = "picture", limit: int = MARKDOWN_LIMIT) -> Display:
    """The best looking encoding of `picture` (image bytes, an RGB array or a Pillow image) whose
    markdown (with `alt`) stays under `limit` bytes, at least `MIN_DISPLAY_WIDTH` px wide if at all
    possible."""
    if kind not in KINDS:
        raise ValueError(f"picture kind {kind!r}: expected one of {KINDS}")
    image = _as_rgb_image(picture)
    overhead = len(markdown(b"", "image/webp", alt).encode())
    # base64 turns every 3 bytes into 4 characters
    budget = (limit - overhead - 1) // 4 * 3
    preferred = image.width if image.width <= KEEP_WIDTH_UP_TO else DISPLAY_WIDTH
    preferred = max(MIN_DISPLAY_WIDTH, preferred)
    resized: dict[int, Any] = {}
    for width, fmt, setting in _ladder(kind, preferred):
        if width not in resized:
            resized[width] = _resized(image, width)
        data = _encode(resized[width], fmt, setting)
        if len(data) <= budget:
            return _display(data, fmt, setting, resized[width])
    # Nothing fits at the smallest width: narrower until it does (the event log's limit wins).
    width = MIN_DISPLAY_WIDTH
    while True:
        width = max(1, int(width * 0.85))
        small = _resized(image, width)
        data = _encode(small, "webp", 30)
        if len(data) <= budget or width == 1:
            return _display(data, "webp", 30, small)


def _ladder(kind: str, preferred: int) -> list[tuple[int, str, int]]:
    """(width, format, colours or quality), best looking first."""
    widths = sorted({preferred, max(MIN_DISPLAY_WIDTH, (preferred + MIN_DISPLAY_WIDTH) // 2), MIN_DISPLAY_WIDTH},
                    reverse=True)
    if kind == PLOT:
        steps = [(preferred, "png", colours) for colours in (256, 64, 32)]
        steps += [(width, "png", colours) for width in widths[1:] for colours in (64, 32)]
        steps += [(MIN_DISPLAY_WIDTH, "png", 16)]
    else:
        steps = [(preferred, "webp", quality) for quality in (90, 80, 70, 60)]
        steps += [(width, "webp", quality) for width in widths[1:] for quality in (70, 55)]
    steps += [(MIN_DISPLAY_WIDTH, "webp", quality) for quality in (50, 35, 20, 10, 5)]
    return steps


def _encode(image, fmt: str, setting: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if fmt == "png":
        # No dithering: flat areas stay flat, which is what makes a palette PNG small.
        paletted = image.quantize(colors=setting, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        paletted.save(buffer, format="PNG", optimize=True)
    else:
        image.save(buffer, format="WEBP", quality=setting, method=5)
    return buffer.getvalue()


def _display(data: bytes, fmt: str, setting: int, image) -> Display:
    encoding = f"png {setting} colours" if fmt == "png" else f"webp q{setting}"
    return Display(data, f"image/{fmt}", image.width, image.height, encoding)


def _resized(image, width: int):
    from PIL import Image

    if width == image.width:
        return image
    height = max(1, round(image.height * width / image.width))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _is_array(picture: Any) -> bool:
    return hasattr(picture, "shape") and hasattr(picture, "dtype")


def _as_rgb_image(picture: Any):
    from PIL import Image

    if isinstance(picture, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(picture)) as opened:
            picture = opened.convert("RGBA")
    elif _is_array(picture):
        picture = Image.fromarray(picture)
    if picture.mode in ("RGBA", "LA", "P"):
        # Transparent areas shown on white, as the UI's light theme shows them.
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(background, rgba)
    return picture.convert("RGB")
