"""One slide's patch grid as feature extraction reads it (plain Python, no Dagster): the
patch-coordinates file (CLAM layout, written by coords_h5.py or by CLAM) checked and read, and its
level-0 coordinates mapped to the pixels of the level the patches are read at.

`ExtractionError`, the error of every step of the extraction, is defined here, where the first
of them (reading the grid) is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np


class ExtractionError(RuntimeError):
    """A slide or its coordinates cannot be turned into features (names the file)."""



@dataclass(frozen=True)
class PatchGrid:
    """The patches of one slide as `patch_coords` wrote them (CLAM layout)."""

    coords: np.ndarray  # (N, 2) int64, level-0 top-left x, y
    patch_level: int
    patch_size: int
    read_size: int  # pixels read at patch_level, then resized
    attrs: dict[str, Any]

    @property
    def n_patches(self) -> int:
        return int(self.coords.shape[0])


def read_patch_grid(path: str | os.PathLike) -> PatchGrid:
    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            if "coords" not in fh:
                raise ExtractionError(f"{path}: no `coords` dataset (expected a CLAM patch-coordinate file)")
            dataset = fh["coords"]
            coords = np.asarray(dataset[()], dtype=np.int64).reshape(-1, 2) if dataset.size else np.zeros((0, 2), np.int64)
            if dataset.size and (dataset.ndim != 2 or dataset.shape[1] != 2):
                raise ExtractionError(f"{path}: `coords` has shape {dataset.shape}, expected (N, 2)")
            attrs = {key: plain_value(value) for key, value in dataset.attrs.items()}
    except OSError as exc:
        raise ExtractionError(f"{path}: cannot read patch coordinates: {exc}") from exc
    for key in ("patch_level", "patch_size"):
        if key not in attrs:
            raise ExtractionError(f"{path}: `coords` lacks attribute {key!r}")
    patch_size = int(attrs["patch_size"])
    # CLAM's own files have no read_size: it reads patch_size pixels at patch_level.
    read_size = int(attrs.get("read_size", patch_size))
    if patch_size <= 0 or read_size <= 0:
        raise ExtractionError(f"{path}: patch_size {patch_size} / read_size {read_size} must be positive")
    return PatchGrid(coords, int(attrs["patch_level"]), patch_size, read_size, attrs)


def plain_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def level_coordinates(slide_path: Path, grid: PatchGrid) -> tuple[np.ndarray, float]:
    import openslide

    try:
        with openslide.OpenSlide(str(slide_path)) as slide:
            if not 0 <= grid.patch_level < slide.level_count:
                raise ExtractionError(f"{slide_path}: patch_level {grid.patch_level} does not exist "
                                      f"(the slide has {slide.level_count} levels)")
            downsample = float(slide.level_downsamples[grid.patch_level])
    except openslide.OpenSlideError as exc:
        raise ExtractionError(f"{slide_path}: OpenSlide cannot open the slide: {exc}") from exc
    level_xy = np.floor(grid.coords / downsample).astype(np.int64) if grid.n_patches else np.zeros((0, 2), np.int64)
    return level_xy, downsample
