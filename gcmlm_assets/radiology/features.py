"""PyRadiomics feature extraction: params files, extractors, one feature row per patient.

Plain Python (no Dagster). PyRadiomics is always given FILES (the very
`ct.nii.gz` the mask was made on and `mask.nii.gz`), so it reads exactly the
grid the mask was written on and its geometry checks cannot trip.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import yaml

from gcmlm_assets.lazy import lazy
from gcmlm_assets.storage import atomic_path

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import SimpleITK as sitk
    from radiomics import featureextractor
else:  # imported on first use: the definitions import this module, not its work (gcmlm_assets/lazy.py)
    np = lazy("numpy")
    pa = lazy("pyarrow")
    pq = lazy("pyarrow.parquet")
    sitk = lazy("SimpleITK")

PARAMS_DIR = Path(__file__).resolve().parent / "params"
NAMED_PARAMS = ("default", "rich")
PATIENT_COLUMN = "patient_id"

# PyRadiomics' GLCM class warns on every image that SumAverage equals 2 x JointAverage: a known property of
# the default feature list, not a problem of the case, so it is dropped to keep run logs readable.
logging.getLogger("radiomics.glcm").addFilter(lambda record: "Sum Average" not in record.getMessage())


class RadiomicsError(RuntimeError):
    """Extraction failed for a case; the message names the files."""


@functools.cache
def _radiomics() -> ModuleType:
    """PyRadiomics with its feature extractor, imported on first use (not when the definitions load)."""
    import radiomics
    import radiomics.featureextractor

    # PyRadiomics logs every step at INFO to its own stderr handler; keep warnings and errors only.
    radiomics.setVerbosity(logging.WARNING)
    return radiomics


def pyradiomics_version() -> str:
    return str(_radiomics().__version__)


# ---------------------------------------------------------------- params


def resolve_params(name_or_path: str | Path) -> Path:
    """`default`/`rich` (kept in the package) or a path to a PyRadiomics params YAML."""
    if str(name_or_path) in NAMED_PARAMS:
        return PARAMS_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PyRadiomics params file not found "
                                f"(use {' or '.join(NAMED_PARAMS)} or a YAML path)")
    return path


def load_params(name_or_path: str | Path) -> dict:
    path = resolve_params(name_or_path)
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: not a PyRadiomics params mapping")
    return params


def settings_hash(params: Mapping) -> str:
    """Content hash of parsed params (comments and key order do not matter)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------- extractors


def extractor_from_params(params: Mapping) -> featureextractor.RadiomicsFeatureExtractor:
    """An extractor from a params mapping (`imageType`/`featureClass`/`setting`), validated by PyRadiomics."""
    return _radiomics().featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(dict(params)))


def extractor_from_settings(settings: Mapping, image_types: Mapping | None = None,
                            feature_classes: Mapping | None = None) -> featureextractor.RadiomicsFeatureExtractor:
    """An extractor from explicit extraction settings (e.g. the `diagnostics_Configuration_Settings`
    PyRadiomics records), Original image only unless `image_types` says otherwise, and the given
    feature classes (name -> list of features or None for the class defaults; default: all 3-D classes)."""
    extractor = _radiomics().featureextractor.RadiomicsFeatureExtractor(**copy.deepcopy(dict(settings)))
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(**copy.deepcopy(dict(image_types or {"Original": {}})))
    if feature_classes is not None:
        extractor.disableAllFeatures()
        extractor.enableFeaturesByName(**{name: (list(feats) if feats else [])
                                          for name, feats in feature_classes.items()})
    return extractor


# ---------------------------------------------------------------- extraction


@dataclasses.dataclass(frozen=True)
class FeatureRow:
    features: dict[str, float]  # name -> value, in stable (sorted) order
    seconds: float
    diagnostics: dict[str, str]


def extract_features(extractor: featureextractor.RadiomicsFeatureExtractor,
                     image_path: Path, mask_path: Path, label: int | None = None) -> FeatureRow:
    """Run PyRadiomics on two files; features as float, sorted by name so column order never moves."""
    started = time.perf_counter()
    try:
        result = extractor.execute(str(image_path), str(mask_path), label=label)
    except (ValueError, RuntimeError) as error:
        raise RadiomicsError(f"PyRadiomics failed on image {image_path} with mask {mask_path}: {error}") from error
    seconds = time.perf_counter() - started
    try:
        features = {name: _as_float(name, value) for name, value in result.items()
                    if not name.startswith("diagnostics_")}
    except RadiomicsError as error:
        raise RadiomicsError(f"PyRadiomics on image {image_path} with mask {mask_path}: {error}") from error
    diagnostics = {name: str(value) for name, value in result.items()
                   if name.startswith(("diagnostics_Mask-interpolated", "diagnostics_Image-interpolated",
                                       "diagnostics_Mask-original_VoxelNum"))}
    return FeatureRow(dict(sorted(features.items())), seconds, diagnostics)


def _as_float(name: str, value) -> float:
    array = np.asarray(value, dtype=np.float64)
    if array.size != 1:
        raise RadiomicsError(f"feature {name} is not a scalar: shape {array.shape}")
    return float(array.reshape(()))


@functools.lru_cache(maxsize=8)
def _expected_names_for(params_json: str) -> tuple[str, ...]:
    params = json.loads(params_json)
    # A noise cube with a ball inside, large enough (24 mm, 1 mm voxels) for every LoG sigma up to 5 mm
    # and a wavelet level, run through the same extractor: the feature names PyRadiomics produces for
    # these params when nothing is skipped.
    rng = np.random.default_rng(0)
    values = rng.normal(40.0, 60.0, size=(24, 24, 24)).astype(np.int16)
    zz, yy, xx = np.mgrid[:24, :24, :24]
    ball = ((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 36).astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="radiomics-probe-") as tmp:
        image_path, mask_path = Path(tmp) / "image.nrrd", Path(tmp) / "mask.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(values), str(image_path))
        sitk.WriteImage(sitk.GetImageFromArray(ball), str(mask_path))
        row = extract_features(extractor_from_params(params), image_path, mask_path)
    return tuple(row.features)


def expected_feature_names(params: Mapping) -> tuple[str, ...]:
    """The sorted feature names a complete extraction with `params` yields."""
    return _expected_names_for(json.dumps(params, sort_keys=True, default=str))


# ---------------------------------------------------------------- the row file


def row_table(patient_id: str, features: Mapping[str, float]) -> pa.Table:
    columns = {PATIENT_COLUMN: pa.array([patient_id], pa.string())}
    for name, value in features.items():
        columns[name] = pa.array([float(value)], pa.float64())
    return pa.table(columns)


def write_row(path: Path, patient_id: str, features: Mapping[str, float], metadata: Mapping[str, str]) -> Path:
    """One-row parquet, `patient_id` then features; written atomically; deterministic bytes."""
    table = row_table(patient_id, features)
    table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_row(path: Path) -> pa.Table:
    return pq.read_table(path)


def non_finite_features(features: Mapping[str, float]) -> list[str]:
    return [name for name, value in features.items() if not math.isfinite(value)]
