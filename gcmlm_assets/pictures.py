"""Pictures for the Dagster UI: a PNG embedded in markdown metadata, also saved beside the artifact."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from gcmlm_assets.storage import atomic_write_bytes


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


def figure_png(fig, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str = "picture") -> str:
    """Markdown that the Dagster UI renders as an inline image."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def save_png(png: bytes, path: str | Path) -> Path:
    return atomic_write_bytes(path, png)
