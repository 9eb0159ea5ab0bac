"""The size rules of the UI's pictures, as the tests check them on every asset's metadata: at least
800 px wide, under 60,000 bytes of markdown, a full-size PNG beside it."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

# The numbers, written out: a change of the module's constants must not loosen the tests.
MIN_WIDTH = 800
LIMIT_BYTES = 60_000
PATIENT_LIMIT_BYTES = 30_000  # a per-patient picture: every patient's materializations carry one

_DATA_URI = re.compile(r"!\[(?P<alt>[^\]]*)\]\(data:(?P<mime>image/[a-z]+);base64,(?P<data>[A-Za-z0-9+/=]+)\)")


def decode_markdown(markdown: str) -> tuple[str, str, Image.Image]:
    """(alt, mime, decoded image) of one embedded picture."""
    match = _DATA_URI.fullmatch(markdown)
    assert match, f"not one embedded image: {markdown[:80]}..."
    image = Image.open(io.BytesIO(base64.b64decode(match["data"])))
    image.load()
    expected_format = {"image/png": "PNG", "image/webp": "WEBP", "image/jpeg": "JPEG"}[match["mime"]]
    assert image.format == expected_format, (match["mime"], image.format)
    return match["alt"], match["mime"], image


def assert_ui_picture(markdown: str, full_path: str | Path, limit: int = LIMIT_BYTES) -> Image.Image:
    """The embedded picture is readable (>= 800 px wide), small (< `limit` bytes of markdown) and its
    full-size lossless PNG exists at `full_path`, at least as wide."""
    assert len(markdown.encode()) < limit, len(markdown.encode())
    _, _, shown = decode_markdown(markdown)
    assert shown.width >= MIN_WIDTH, shown.size
    full_path = Path(full_path)
    assert full_path.is_file(), full_path
    with Image.open(full_path) as full:
        assert full.format == "PNG"
        assert full.width >= shown.width or full.width < MIN_WIDTH, (full.size, shown.size)
    return shown
