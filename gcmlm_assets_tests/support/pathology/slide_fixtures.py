"""Slides made in the test's tmp_path: generic pyramidal TIFFs (blank, or of real tissue), broken files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import tifffile

SMALL_REGION = "cmu-1-small-region.svs"


def real_slide(test_data: Path) -> Path:
    return test_data / "wsi" / SMALL_REGION


def real_tissue_rgb(test_data: Path) -> np.ndarray:
    with openslide.OpenSlide(str(real_slide(test_data))) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def write_pyramid_tiff(path: Path, rgb: np.ndarray, *, mpp: float | None, downsamples=(1, 4, 16),
                       tile: int = 256, compression: str | None = "zlib") -> Path:
    """A tiled generic TIFF that OpenSlide opens as a pyramid (levels in the main IFD chain).
    `mpp=None` leaves the resolution tags out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as writer:
        for index, downsample in enumerate(downsamples):
            level = rgb[::downsample, ::downsample]
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * downsample)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            writer.write(np.ascontiguousarray(level), tile=(tile, tile), photometric="rgb",
                         compression=compression, subfiletype=0 if index == 0 else 1, metadata=None, **extra)
    return path


def blank_slide(path: Path, size: int = 4096, mpp: float = 0.5) -> Path:
    """White glass with JPEG-like noise, no tissue."""
    rng = np.random.default_rng(0)
    rgb = (rng.integers(236, 247, size=(size // 16, size // 16, 3), dtype=np.uint8)
           .repeat(16, axis=0).repeat(16, axis=1))
    return write_pyramid_tiff(path, rgb, mpp=mpp)


def truncated_copy(source: Path, path: Path, fraction: float = 0.6) -> Path:
    data = source.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def png_renamed(path: Path) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


def zero_byte(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def copy_into(source: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    shutil.copyfile(source, target)
    return target
