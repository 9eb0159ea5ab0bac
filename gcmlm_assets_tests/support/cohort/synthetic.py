"""Synthetic per-patient feature files (the artifact contract) with a planted MLM signal, for tests.

Radiology: PyRadiomics-named float64 columns; a few carry a label shift, some are near-copies of
others (as radiomic feature families are), the rest are noise. Pathology: a 1024-D slide vector
with low-rank structure (as foundation-model embeddings have); one latent factor is shifted by
the label. `signal=0` gives features independent of the label. `cohort_table` lays them out as
fused_table's table. Only numpy and pyarrow are imported: benchmarks/fusion_rules.py uses it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gcmlm_assets.catalogue import RADIOMICS_TABLE, SLIDE_VECTOR_TABLE
from gcmlm_assets.storage import ArtifactStore

RADIOMICS_NAMES = [f"original_{family}_{name}" for family, names in {
    "shape": ["MeshVolume", "Sphericity", "Elongation", "Flatness", "SurfaceArea"],
    "firstorder": ["Mean", "Median", "Energy", "Entropy", "Kurtosis", "Skewness", "Variance", "Range"],
    "glcm": ["Contrast", "Correlation", "JointEnergy", "Idm", "ClusterShade", "Autocorrelation"],
    "glrlm": ["RunEntropy", "LongRunEmphasis", "ShortRunEmphasis", "GrayLevelNonUniformity"],
    "glszm": ["ZoneEntropy", "SmallAreaEmphasis", "LargeAreaEmphasis"],
    "gldm": ["DependenceEntropy", "LargeDependenceEmphasis"],
}.items() for name in names]
INFORMATIVE_RADIOMICS = ("original_shape_MeshVolume", "original_firstorder_Entropy", "original_glcm_Contrast")
PATHOLOGY_DIM = 1024
PATHOLOGY_FACTORS = 8


def make_cohort(n_patients: int, *, seed: int = 0, signal: float = 1.0, positive_fraction: float = 0.4):
    """(patient_ids, labels, radiomics matrix, pathology matrix) with the signal planted in both."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:03d}" for i in range(n_patients)]
    labels = np.zeros(n_patients, int)
    labels[rng.permutation(n_patients)[: int(round(positive_fraction * n_patients))]] = 1

    radiomics = rng.normal(size=(n_patients, len(RADIOMICS_NAMES)))
    for name in INFORMATIVE_RADIOMICS:
        radiomics[:, RADIOMICS_NAMES.index(name)] += signal * 1.2 * labels
    # near-duplicates of informative features, as feature families are
    radiomics[:, RADIOMICS_NAMES.index("original_firstorder_Median")] = (
        radiomics[:, RADIOMICS_NAMES.index("original_firstorder_Mean")] + 0.05 * rng.normal(size=n_patients))
    radiomics[:, RADIOMICS_NAMES.index("original_shape_SurfaceArea")] = (
        radiomics[:, RADIOMICS_NAMES.index("original_shape_MeshVolume")] + 0.1 * rng.normal(size=n_patients))
    radiomics = radiomics * rng.uniform(0.5, 500, size=len(RADIOMICS_NAMES)) + rng.uniform(-50, 50, len(RADIOMICS_NAMES))

    factors = rng.normal(size=(n_patients, PATHOLOGY_FACTORS))
    factors[:, 0] += signal * 1.6 * labels
    loadings = rng.normal(size=(PATHOLOGY_FACTORS, PATHOLOGY_DIM)) / np.sqrt(PATHOLOGY_FACTORS)
    pathology = factors @ loadings + 0.3 * rng.normal(size=(n_patients, PATHOLOGY_DIM))
    return ids, labels, radiomics, pathology.astype(np.float32)


def cohort_table(ids, labels, radiomics, pathology, *, without_radiology=(), without_pathology=(),
                 unknown=()) -> pa.Table:
    """A fused table as fused_table writes it (nulls where a modality is absent)."""
    has_rad = np.array([p not in without_radiology for p in ids])
    has_path = np.array([p not in without_pathology for p in ids])
    columns = {"patient_id": pa.array(ids), "has_radiology": pa.array(has_rad), "has_pathology": pa.array(has_path),
               "has_clinical": pa.array([True] * len(ids)),
               "mlm": pa.array([None if p in unknown else int(v) for p, v in zip(ids, labels)], pa.int8())}
    for j, name in enumerate(RADIOMICS_NAMES):
        columns["rad_" + name] = pa.array(radiomics[:, j], mask=~has_rad)
    for j in range(pathology.shape[1]):
        columns[f"path_feat_{j:04d}"] = pa.array(pathology[:, j], mask=~has_path)
    return pa.table(columns)


def write_radiomics_row(artifacts: Path, patient_id: str, values: np.ndarray, row_id: str | None = None) -> Path:
    """The row of a scan (`patient_id`: its ct_scans key); `row_id`: the id the row names, default the key."""
    path = Path(artifacts) / RADIOMICS_TABLE.asset.key / patient_id / RADIOMICS_TABLE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"patient_id": pa.array([row_id or patient_id])}
    columns.update({name: pa.array([float(v)], pa.float64()) for name, v in zip(RADIOMICS_NAMES, values)})
    pq.write_table(pa.table(columns), path)
    return path


def write_slide_vector(artifacts: Path, patient_id: str, vector: np.ndarray, n_patches: int = 120) -> Path:
    path = SLIDE_VECTOR_TABLE.path(ArtifactStore(artifacts), patient_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"patient_id": pa.array([patient_id]), "n_patches": pa.array([n_patches], pa.int64()),
               "n_slides": pa.array([1], pa.int64())}
    columns.update({f"feat_{i:04d}": pa.array([float(v)], pa.float32()) for i, v in enumerate(vector)})
    pq.write_table(pa.table(columns), path)
    return path


def write_clinical_csv(landing: Path, ids, labels, *, unknown: set[str] = frozenset(),
                       extra_lines: list[str] = ()) -> Path:
    rng = np.random.default_rng(1)
    lines = ["patient_id,mlm,age,ca199"]
    for patient_id, label in zip(ids, labels):
        lines.append(f"{patient_id},{'' if patient_id in unknown else label},"
                     f"{rng.integers(35, 85)},{rng.gamma(2, 20):.1f}")
    lines += list(extra_lines)
    path = landing / "clinical.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_cohort_files(data_root: Path, n_patients: int, *, seed: int = 0, signal: float = 1.0,
                       without_radiology: set[str] = frozenset(), without_pathology: set[str] = frozenset(),
                       unknown_labels: set[str] = frozenset()):
    """Feature files and clinical.csv under `data_root` (landing/ and artifacts/); returns (ids, labels)."""
    ids, labels, radiomics, pathology = make_cohort(n_patients, seed=seed, signal=signal)
    artifacts = data_root / "artifacts"
    for i, patient_id in enumerate(ids):
        if patient_id not in without_radiology:
            write_radiomics_row(artifacts, patient_id, radiomics[i])
        if patient_id not in without_pathology:
            write_slide_vector(artifacts, patient_id, pathology[i])
    write_clinical_csv(data_root / "landing", ids, labels, unknown=unknown_labels)
    return ids, labels
