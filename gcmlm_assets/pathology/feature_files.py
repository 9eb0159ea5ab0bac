"""The feature file of one slide (CLAM layout: `features`, `coords`, `source_index`, attributes):
its format constants, the fingerprint that says whether it is finished and current, and its
validation (plain Python, no Dagster). extract.py writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gcmlm_assets.catalogue import UNI_FEATURES
from gcmlm_assets.pathology.encoders import LoadedEncoder
from gcmlm_assets.pathology.patch_grid import plain_value
from gcmlm_assets.storage import sha256_text

# uni_features' code version (catalogue.py): bump it there when the extraction's output would change
# for the same inputs. It is in each slide's extraction fingerprint.
EXTRACTION_VERSION = UNI_FEATURES.code_version
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
CHUNK_ROWS = 256


def extraction_fingerprint(
    *, coords_sha256: str, slide_fingerprint: str, encoder: LoadedEncoder, feature_dtype: str, precision: str,
    scaled_decode: bool = True,
) -> str:
    identity = encoder.identity()
    return sha256_text(
        UNI_FEATURES.key, EXTRACTION_VERSION, coords_sha256, slide_fingerprint, identity["encoder"],
        identity["checkpoint_sha256"], identity["weights_sha256"], str(encoder.spec.input_size),
        repr(encoder.spec.mean), repr(encoder.spec.std), feature_dtype, precision, f"scaled_decode={scaled_decode}",
    )


def finished_fingerprint(path: Path) -> str | None:
    """The fingerprint of a complete feature file, or None (absent, unreadable, incomplete)."""
    try:
        with h5py.File(path, "r") as fh:
            if fh["features"].shape[0] != fh["coords"].shape[0]:
                return None
            value = fh.attrs.get("fingerprint")
    except (OSError, KeyError):
        return None
    return plain_value(value) if value is not None else None


@dataclass
class FeatureFileReport:
    path: Path
    n_rows: int = 0
    dim: int = 0
    non_finite_values: int = 0
    zero_rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_feature_file(path: str | os.PathLike, *, expected_rows: int, expected_dim: int,
                          expected_encoder: dict[str, Any] | None = None, chunk_rows: int = 4096) -> FeatureFileReport:
    """Shape (expected_rows, expected_dim), finite, no all-zero row, encoder identity recorded
    (and, given `expected_encoder`, equal to its name and checkpoint sha256)."""
    path = Path(path)
    report = FeatureFileReport(path)
    try:
        with h5py.File(path, "r") as fh:
            features, coords = fh["features"], fh["coords"]
            report.n_rows, report.dim = int(features.shape[0]), int(features.shape[1])
            if features.shape != (expected_rows, expected_dim):
                report.problems.append(f"features shape {features.shape}, expected ({expected_rows}, {expected_dim})")
            if coords.shape != (features.shape[0], 2):
                report.problems.append(f"coords shape {coords.shape} does not match features {features.shape}")
            for start in range(0, features.shape[0], chunk_rows):
                block = np.asarray(features[start : start + chunk_rows], dtype=np.float32)
                report.non_finite_values += int((~np.isfinite(block)).sum())
                report.zero_rows += int((~block.any(axis=1)).sum())
            missing = [k for k in ("encoder", "embedding_dim", "checkpoint_sha256") if not fh.attrs.get(k, "")]
            if missing:
                report.problems.append(f"encoder identity not recorded (missing attrs {missing})")
            elif expected_encoder is not None:
                recorded = {k: plain_value(fh.attrs[k]) for k in ("encoder", "checkpoint_sha256")}
                wanted = {k: expected_encoder[k] for k in ("encoder", "checkpoint_sha256")}
                if recorded != wanted:
                    report.problems.append(f"encoder identity {recorded} differs from this run's {wanted}")
    except (OSError, KeyError) as exc:
        report.problems.append(f"unreadable feature file: {type(exc).__name__}: {exc}")
        return report
    if report.non_finite_values:
        report.problems.append(f"{report.non_finite_values} non-finite values")
    if report.zero_rows:
        report.problems.append(f"{report.zero_rows} all-zero rows")
    return report
