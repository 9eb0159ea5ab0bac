"""The patch-coordinates file of one slide: its attributes, written and read back (plain Python, no Dagster).

The layout is CLAM's (a `coords` dataset of level-0 top-left x, y, int64, with attributes), read
as-is by CLAM and TRIDENT; the attributes add TRIDENT's and ours (`coords_attrs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.slides import SlideInfo
from gcmlm_assets.pathology.tiling_params import TILING_VERSION, TilingResult
from gcmlm_assets.storage import atomic_path

# Imported on first use: the definitions import the tiling's constants and types, not its work.
h5py = lazy("h5py")
np = lazy("numpy")


def coords_attrs(info: SlideInfo, level: int, patch_size: int, read_size: int, size_level0: float,
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


def h5_safe(values: dict) -> dict:
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
            for key, value in h5_safe(result.attrs).items():
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
