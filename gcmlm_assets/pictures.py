"""Pictures for the Dagster UI: a PNG embedded in markdown metadata, also saved beside the artifact."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in workers or pods
import matplotlib.pyplot as plt  # noqa: E402

from gcmlm_assets.storage import atomic_write_bytes  # noqa: E402


def figure_png(fig, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str = "picture") -> str:
    """Markdown that the Dagster UI renders as an inline image."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def save_png(png: bytes, path: str | Path) -> Path:
    return atomic_write_bytes(path, png)
