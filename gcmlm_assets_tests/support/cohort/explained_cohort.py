"""A synthetic cohort for risk_explanations' tests: radiomics rows, and patch features in the CLAM
layout from which each slide vector is pooled by the real MeanPooling (as slide_vector does), so
the per-patch contributions can be checked against the model's own logit."""

from __future__ import annotations

import h5py
import numpy as np

from gcmlm_assets.catalogue import SLIDE_VECTOR, SLIDE_VECTOR_TABLE, UNI_FEATURES
from gcmlm_assets.pathology.pooling import MeanPooling, patient_slides, write_slide_vector
from gcmlm_assets.storage import ArtifactStore, sha256_file
from gcmlm_assets_tests.support.cohort.synthetic import make_cohort, write_clinical_csv, write_radiomics_row
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results

DIM = 48
GRID = 6  # patches per side of each synthetic slide
NO_RADIOLOGY = "P003"
# Fast settings of the risk model (no ABMIL); each test adds what it needs.
QUICK = dict(n_splits=3, n_repeats=1, n_bootstrap=100, min_labelled_per_class=3, inner_splits=3)


def write_patch_features(store: ArtifactStore, patient_id: str, vector: np.ndarray, rng) -> None:
    """One or two slides of patches on a grid whose features scatter around `vector`; the slide
    vector is then pooled from them by the real MeanPooling."""
    folder = store.asset_dir(UNI_FEATURES.key, patient_id)
    slides = []
    for k in range(1 + int(rng.integers(0, 2))):
        coords = np.array([(x * 256, y * 256) for y in range(GRID) for x in range(GRID)], np.int64)
        features = (vector[None, :] + rng.normal(0, 1.0, size=(len(coords), DIM))).astype(np.float32)
        name = f"{patient_id}_slide{k + 1}.h5"
        with h5py.File(folder / name, "w") as fh:
            fh.create_dataset("features", data=features)
            fh.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 256
            fh.attrs["slide_path"] = str(folder / f"{patient_id}_slide{k + 1}.tiff")  # absent: layout only
        slides.append({"h5_file": name, "n_patches": len(coords)})
    store.write_manifest(UNI_FEATURES.key, patient_id, {
        "files": {s["h5_file"]: sha256_file(folder / s["h5_file"]) for s in slides}, "slides": slides})
    pooled = MeanPooling().pool(patient_slides(store, UNI_FEATURES.key, patient_id))
    write_slide_vector(SLIDE_VECTOR_TABLE.path(store, patient_id), patient_id, pooled)


def sound_cohort(data_root, instance, n_patients: int, seed: int) -> tuple[list[str], ArtifactStore]:
    """A cohort of `n_patients` written under `data_root` (feature files, clinical.csv), its patients
    added to the instance and their upstream reported sound: (patient ids, the artifact store)."""
    ids, labels, radiomics, pathology = make_cohort(n_patients, seed=seed)
    store = ArtifactStore(data_root / "artifacts")
    write_patient_files(store, ids, radiomics, pathology)
    write_clinical_csv(data_root / "landing", ids, labels)
    add_patients(instance, ids)
    report_sound_results(instance, store.root, ids)
    return ids, store


def write_patient_files(store: ArtifactStore, ids: list[str], radiomics: np.ndarray, pathology: np.ndarray,
                        seed: int = 0) -> None:
    """Every patient's radiomics row (but NO_RADIOLOGY's) and patch features with their slide vector."""
    rng = np.random.default_rng(seed)
    for i, patient_id in enumerate(ids):
        if patient_id != NO_RADIOLOGY:
            write_radiomics_row(store.root, patient_id, radiomics[i])
        SLIDE_VECTOR.folder(store, patient_id)
        write_patch_features(store, patient_id, pathology[i, :DIM].astype(np.float64) * 3, rng)
