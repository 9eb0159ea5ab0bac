"""The files of the uni_features asset (catalogue.UNI_FEATURES), as their readers see them: one HDF5 file per slide.

Pathology writes them (extract.py) and pools them (pooling.py); the cohort reads them again for
the ABMIL block and the per-patch explanations. The reader lives here, below both domains, so
that neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.lazy import lazy

# Imported on first use: the definitions import this module's names, not its work.
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


    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D) as stored, coords (N, 2) level-0 px) of the whole slide."""
        try:
            with h5py.File(self.path, "r") as fh:
                return np.asarray(fh["features"][:]), np.asarray(fh["coords"][:], np.int64).reshape(-1, 2)
        except (OSError, KeyError) as exc:
            raise PoolingError(f"{self.path}: cannot read patch features: {type(exc).__name__}: {exc}") from exc

    def slide_path(self) -> str | None:
        """The slide file the features were extracted from (recorded in the feature file)."""
        value = self._attribute(lambda fh: fh.attrs.get("slide_path"))
        return str(value) if value else None

    def patch_side_level0(self) -> float:
        return float(self._attribute(lambda fh: fh["coords"].attrs.get("patch_size_level0", 0))) or 256.0

    def _attribute(self, read):
        try:
            with h5py.File(self.path, "r") as fh:
                return read(fh)
        except (OSError, KeyError) as exc:
            raise PoolingError(f"{self.path}: cannot read patch features: {type(exc).__name__}: {exc}") from exc


def patient_slides(store, features_asset: str, patient_id: str) -> list[SlideFeatures]:
    """The feature files of a patient, as the features asset's manifest lists them ([] if none)."""
    manifest = store.read_manifest(features_asset, patient_id)
    if not manifest:
        return []
    return [SlideFeatures(store.path(features_asset, patient_id, s["h5_file"])) for s in manifest["slides"]]


def slide_thumbnail(slide_path, side_px: int) -> tuple[np.ndarray | None, tuple[float, float]]:
    """(RGB thumbnail within side_px x side_px, level-0 (width, height)); (None, (0, 0)) when the
    slide file is gone or OpenSlide cannot read it."""
    if not slide_path or not Path(str(slide_path)).is_file():
        return None, (0.0, 0.0)
    import openslide

    try:
        with openslide.OpenSlide(str(slide_path)) as handle:
            image = handle.get_thumbnail((side_px, side_px)).convert("RGB")
            return np.asarray(image), tuple(float(v) for v in handle.dimensions)
    except (openslide.OpenSlideError, OSError):
        return None, (0.0, 0.0)
