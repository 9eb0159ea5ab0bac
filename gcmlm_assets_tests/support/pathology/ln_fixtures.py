"""Lymph-node test inputs: QuPath GeoJSON annotation exports and slide feature files with chosen embeddings.

The feature files have the layout and attributes extract.py writes (CLAM's `features`, `coords`, with the tiling's
attributes on `coords` and the encoder's identity on the file), with embeddings given by the test rather than
computed by an encoder, so that a test controls how separable tumour and node patches are.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

ENCODER = {"encoder": "test-encoder", "checkpoint_sha256": "c" * 64}


def square(x0: float, y0: float, x1: float, y1: float, *, clockwise: bool = False) -> list[list[float]]:
    """A closed ring around the box (level-0 px)."""
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return ring[::-1] if clockwise else ring


def polygon(outer: list, *holes: list) -> dict:
    return {"type": "Polygon", "coordinates": [outer, *holes]}


def annotation(geometry: dict, class_name: str | None, *, form: str = "dict") -> dict:
    """A QuPath annotation Feature; `form` says where its class is: "dict" (classification {name, color}, QuPath
    0.2 and later), "string" (classification as a string) or "name" (legacy: properties.name only)."""
    properties: dict = {"objectType": "annotation", "isLocked": False}
    if class_name is not None:
        if form == "dict":
            properties["classification"] = {"name": class_name, "color": [200, 0, 0]}
        elif form == "string":
            properties["classification"] = class_name
        elif form == "name":
            properties["name"] = class_name
        else:
            raise ValueError(form)
    return {"type": "Feature", "id": f"id-{class_name}", "geometry": geometry, "properties": properties}


def write_annotations(path: Path, features: list[dict], *, collection: bool = True) -> Path:
    document = {"type": "FeatureCollection", "features": features} if collection else features
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def grid(n_cols: int, n_rows: int, side: int) -> np.ndarray:
    """Level-0 top-left corners of an n_cols x n_rows patch grid, row by row."""
    ys, xs = np.mgrid[0:n_rows, 0:n_cols]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * side


def write_feature_file(path: Path, features: np.ndarray, coords: np.ndarray, *, side: int,
                       dimensions: tuple[int, int], encoder: dict | None = None) -> Path:
    """One slide's feature file (extract.py's layout) holding `features` (N, D) at patch corners `coords`."""
    encoder = {**ENCODER, **(encoder or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh["features"] = np.asarray(features, np.float32)
        dataset = fh.create_dataset("coords", data=np.asarray(coords, np.int64))
        dataset.attrs["patch_size_level0"] = np.int64(side)
        dataset.attrs["level0_width"], dataset.attrs["level0_height"] = (np.int64(v) for v in dimensions)
        fh["source_index"] = np.arange(len(coords), dtype=np.int64)
        fh.attrs["encoder"] = encoder["encoder"]
        fh.attrs["checkpoint_sha256"] = encoder["checkpoint_sha256"]
        fh.attrs["embedding_dim"] = np.int64(features.shape[1])
        fh.attrs["fingerprint"] = "test"
    return path
