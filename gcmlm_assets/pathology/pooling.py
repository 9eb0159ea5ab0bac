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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gcmlm_assets.columns import Column
from gcmlm_assets.lazy import lazy

# Imported on first use: the definitions import this module's constants and types, not its work.
h5py = lazy("h5py")
np = lazy("numpy")


DEFAULT_CHUNK_ROWS = 8192


class PoolingError(RuntimeError):
    """The features cannot be pooled (names the file or the patient)."""


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's feature file (CLAM layout: `features` (N, D), `coords` (N, 2))."""

    path: Path
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    @property
    def name(self) -> str:
        return self.path.stem

    def shape(self) -> tuple[int, int]:
        with h5py.File(self.path, "r") as fh:
            return tuple(int(n) for n in fh["features"].shape)  # type: ignore[return-value]

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features float64 (n, D), coords (n, 2)) blocks of at most `chunk_rows` rows."""
        try:
            with h5py.File(self.path, "r") as fh:
                features, coords = fh["features"], fh["coords"]
                if features.ndim != 2:
                    raise PoolingError(f"{self.path}: `features` has shape {features.shape}, expected (N, D)")
                for start in range(0, features.shape[0], self.chunk_rows):
                    stop = start + self.chunk_rows
                    yield np.asarray(features[start:stop], dtype=np.float64), np.asarray(coords[start:stop])
        except (OSError, KeyError) as exc:
            raise PoolingError(f"{self.path}: cannot read patch features: {type(exc).__name__}: {exc}") from exc


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
