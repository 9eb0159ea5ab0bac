"""Helpers shared by the feature-extraction tests: coordinate files and the simple reference loop."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import openslide
import torch
from torchvision import transforms

from gcmlm_assets.pathology.encoders import LoadedEncoder

SMALL_SLIDE = "cmu-1-small-region.svs"


def slide_path(test_data: Path) -> Path:
    return test_data / "wsi" / SMALL_SLIDE


def grid_coords(rows: range, cols: range, step: int = 256) -> np.ndarray:
    """Level-0 top-left corners of a regular grid (row-major, as a tiler lays them)."""
    return np.array([(c * step, r * step) for r in rows for c in cols], dtype=np.int64).reshape(-1, 2)


def write_coords_file(path: Path, slide: Path, coords: np.ndarray, *, patch_size: int = 256,
                      read_size: int | None = None, patch_level: int = 0) -> Path:
    """A patch-coordinate file in the `patch_coords` contract layout (CLAM attrs + target_mpp, read_size)."""
    with openslide.OpenSlide(str(slide)) as handle:
        level_dim = handle.level_dimensions[patch_level]
        downsample = handle.level_downsamples[patch_level]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        dataset = fh.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        dataset.attrs["patch_size"] = patch_size
        dataset.attrs["patch_level"] = patch_level
        dataset.attrs["downsample"] = np.array([downsample, downsample])
        dataset.attrs["level_dim"] = np.array(level_dim)
        dataset.attrs["downsampled_level_dim"] = np.array(level_dim)
        dataset.attrs["name"] = slide.stem
        dataset.attrs["target_mpp"] = 0.5
        dataset.attrs["read_size"] = read_size or patch_size
    return path


def reference_features(encoder: LoadedEncoder, slide: Path, coords: np.ndarray, read_size: int,
                       level: int = 0) -> np.ndarray:
    """The simplest correct computation: one read_region per patch, PIL resize, torchvision normalise."""
    transform = transforms.Compose([
        transforms.Resize(encoder.spec.input_size),
        transforms.ToTensor(),
        transforms.Normalize(encoder.spec.mean, encoder.spec.std),
    ])
    with openslide.OpenSlide(str(slide)) as handle:
        images = [transform(handle.read_region((int(x), int(y)), level, (read_size, read_size)).convert("RGB"))
                  for x, y in coords]
    with torch.inference_mode():
        return encoder.module(torch.stack(images)).float().numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def materialize_patient(instance, assets, resources: dict, patient_id: str) -> dg.ExecuteInProcessResult:
    """Materialize `assets` for one patient (adding the partition if new); failures are returned, not raised."""
    if patient_id not in instance.get_dynamic_partitions("patients"):
        instance.add_dynamic_partitions("patients", [patient_id])
    return dg.materialize(assets, partition_key=patient_id, instance=instance, resources=resources,
                          raise_on_error=False)


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    """The plain values of `asset`'s materialization metadata in `result`."""
    [event] = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}
