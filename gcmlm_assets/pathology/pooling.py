"""Patient-level pooling of patch features: a small strategy interface.

A pooling turns the patch features of all of a patient's slides into one
vector. The assets only see `Pooling.pool(slides) -> PooledVector` and pick a
strategy by name from `POOLINGS`, so a learned pooling (attention-MIL, with
its weights as a constructor argument) can be registered here later without
touching them.

Slides are read in row chunks: memory is bounded by the chunk, not by the
number of patches.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gcmlm_assets.columns import Column
from gcmlm_assets.lazy import lazy
# The uni_features files are read by the cohort too: their reader lives below both domains
# (re-exported here, where pathology's assets and tests take them from).
from gcmlm_assets.patch_features import PoolingError, SlideFeatures, patient_slides, slide_thumbnail

# Imported on first use: the definitions import this module's constants and types, not its work.
h5py = lazy("h5py")
np = lazy("numpy")


@dataclass
class PooledVector:
    vector: np.ndarray  # (D,)
    n_patches: int
    n_slides: int
    details: dict[str, Any] = field(default_factory=dict)


class Pooling(Protocol):
    name: str

    def pool(self, slides: Iterable[SlideFeatures]) -> PooledVector: ...

    def describe(self) -> dict[str, Any]:
        """Parameters that identify this pooling (for fingerprints and metadata)."""


class MeanPooling:
    """Mean of every patch feature of every slide: slides weigh by their patch count."""

    name = "mean"

    def pool(self, slides: Iterable[SlideFeatures]) -> PooledVector:
        total: np.ndarray | None = None
        n_patches = n_slides = 0
        per_slide: dict[str, int] = {}
        for slide in slides:
            n_slides += 1
            rows = 0
            for features, _ in slide.chunks():
                if total is None:
                    total = np.zeros(features.shape[1], dtype=np.float64)
                elif features.shape[1] != total.shape[0]:
                    raise PoolingError(
                        f"{slide.path}: feature dimension {features.shape[1]} differs from "
                        f"{total.shape[0]} of the patient's other slides"
                    )
                # float64 running sums: exact enough over millions of patches.
                total += features.sum(axis=0)
                rows += features.shape[0]
            per_slide[slide.name] = rows
            n_patches += rows
        if n_patches == 0 or total is None:
            names = ", ".join(per_slide)
            raise PoolingError(f"no patch features to pool over {n_slides} slide(s) ({names}): "
                               "every slide has 0 patches")
        return PooledVector(total / n_patches, n_patches, n_slides, {"patches_per_slide": per_slide})

    def describe(self) -> dict[str, Any]:
        return {"pooling": self.name}


POOLINGS: dict[str, type] = {MeanPooling.name: MeanPooling}


def get_pooling(name: str, **params: Any) -> Pooling:
    try:
        factory = POOLINGS[name]
    except KeyError:
        raise PoolingError(f"unknown pooling {name!r}; known: {', '.join(sorted(POOLINGS))}") from None
    return factory(**params)


# The columns of `slide_vector_table`, shown on the asset page (`feat_*`: one per encoder dimension).
SLIDE_VECTOR_COLUMNS = (
    Column("patient_id", "string", "The patient (the partition key)"),
    Column("n_patches", "int64", "Patches pooled, over all of the patient's slides"),
    Column("n_slides", "int64", "Slides whose patch features were pooled"),
    Column("feat_*", "double", "The pooled patch features, feat_0000 .. feat_(D-1) for the encoder's "
                               "D dimensions (1024 for UNI)"),
)


def feature_columns(dim: int) -> list[str]:
    return [f"feat_{i:04d}" for i in range(dim)]


def slide_vector_table(patient_id: str, pooled: PooledVector):
    """The one-row `slide_vector` table: patient_id, n_patches, n_slides, feat_0000..."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "patient_id": pa.array([patient_id], pa.string()),
        "n_patches": pa.array([pooled.n_patches], pa.int64()),
        "n_slides": pa.array([pooled.n_slides], pa.int64()),
    }
    for name, value in zip(feature_columns(pooled.vector.shape[0]), pooled.vector):
        columns[name] = pa.array([float(value)], pa.float64())
    return pa.table(columns)


def write_slide_vector(path: str | os.PathLike, patient_id: str, pooled: PooledVector) -> Path:
    """The one-row parquet, written under a temporary name and renamed into place."""
    import pyarrow.parquet as pq

    from gcmlm_assets.storage import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(slide_vector_table(patient_id, pooled), tmp)
    return Path(path)


def validate_slide_vector(path: str | os.PathLike, *, expected_dim: int) -> list[str]:
    """Problems of a `slide_vector.parquet` file: one row, D finite feature columns."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    problems: list[str] = []
    features = [c for c in table.column_names if c.startswith("feat_")]
    if table.num_rows != 1:
        problems.append(f"{table.num_rows} rows, expected 1")
    if features != feature_columns(expected_dim):
        problems.append(f"{len(features)} feature columns, expected {expected_dim} (feat_0000..)")
    for required in ("patient_id", "n_patches", "n_slides"):
        if required not in table.column_names:
            problems.append(f"column {required!r} missing")
    if features and table.num_rows:
        values = np.array([table.column(c).to_numpy() for c in features], dtype=np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            problems.append(f"{bad} non-finite feature values")
    return problems


# ---------------------------------------------------------------- picture

PICTURE_MAX_SLIDES = 6
PICTURE_COLUMNS = 3
PICTURE_SIDE_PX = 900  # each slide's drawing; 6 in at the pictures' 150 dpi


def slide_vector_picture(patient_id: str, slides: list[SlideFeatures], pooling: str,
                         max_slides: int = PICTURE_MAX_SLIDES) -> bytes:
    """Full-size PNG: a thumbnail of each pooled slide (the first `max_slides`) with the patches
    that were pooled outlined, titled with its patch count; the title gives the patient's total.

    Counts and squares come from the feature files themselves, so the picture shows what was
    pooled. A slide file that cannot be opened any more is drawn as its patch layout on white."""
    from gcmlm_assets.pictures import figure_png, pyplot

    plt = pyplot()
    # Only the slides shown are drawn (a thumbnail each); the title counts every slide's patches.
    shown = [_slide_drawing(slide) for slide in slides[:max_slides]]
    columns = max(1, min(len(shown), PICTURE_COLUMNS))
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, 6.6 * rows), squeeze=False,
                             layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, (name, n_patches, image, note) in zip(axes.flat, shown):
        axis.imshow(image)
        axis.set_title(f"{name}\n{n_patches} patches{note}", fontsize=14)
    fig.suptitle(slide_vector_title(patient_id, [slide.shape()[0] for slide in slides], pooling, len(shown)),
                 fontsize=15)
    return figure_png(fig)


def slide_vector_title(patient_id: str, patches_per_slide: list[int], pooling: str, shown: int) -> str:
    note = f", first {shown} shown" if len(patches_per_slide) > shown else ""
    return (f"{patient_id}: {sum(patches_per_slide)} patches from {len(patches_per_slide)} slide(s), "
            f"{pooling} pooling{note}")


def _slide_drawing(slide: SlideFeatures) -> tuple[str, int, np.ndarray, str]:
    """(name, patch count, RGB drawing, note) of one feature file."""
    with h5py.File(slide.path, "r") as fh:
        coords = np.asarray(fh["coords"][:], np.int64).reshape(-1, 2)
        patch_side = float(fh["coords"].attrs.get("patch_size_level0", 0)) or 256.0
        slide_path = fh.attrs.get("slide_path")
    thumbnail, level0_size = slide_thumbnail(slide_path, PICTURE_SIDE_PX)
    note = ""
    if thumbnail is None:
        note = " (slide file not readable: patch layout only)"
        extent = coords.max(axis=0) + patch_side if len(coords) else np.array([patch_side, patch_side])
        level0_size = (float(extent[0]), float(extent[1]))
        scale = PICTURE_SIDE_PX / max(level0_size)
        thumbnail = np.full((max(1, round(level0_size[1] * scale)), max(1, round(level0_size[0] * scale)), 3),
                            255, np.uint8)
    return slide.name, int(len(coords)), _outline_patches(thumbnail, coords, patch_side, level0_size), note


def _outline_patches(image: np.ndarray, coords: np.ndarray, patch_side: float,
                     level0_size: tuple[float, float]) -> np.ndarray:
    from PIL import Image, ImageDraw

    picture = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(picture)
    sx, sy = picture.width / level0_size[0], picture.height / level0_size[1]
    for x, y in coords:
        draw.rectangle((round(x * sx), round(y * sy), round((x + patch_side) * sx) - 1,
                        round((y + patch_side) * sy) - 1), outline=(220, 30, 30), width=1)
    return np.asarray(picture)
