"""A small cohort of lymph-node patients as ln_patch_coords and ln_features leave it, for the tests of
tumour_classifier, lymph_nodes and their sensors.

Each patient has one real lymph-node slide (lymph_node_slides.py) tiled by the real tiling; its feature
file holds embeddings that say how much tumour a patch shows, plus noise, so that what is tested is the
wiring and the analysis, not an encoder. The annotated patients have the planted nodes and tumours as
a QuPath export in their landing folder."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np

from gcmlm_assets.catalogue import LN_FEATURES, LN_PATCH_COORDS
from gcmlm_assets.landing.scan import LN_ANNOTATIONS_FOLDER, LN_WSI_FOLDER
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.pathology.coords_h5 import read_coords_h5
from gcmlm_assets.pathology.resources import LymphNodeSettings, TumourClassifierSettings
from gcmlm_assets.reuse import StoredOutput
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.pathology import lymph_node_slides as planted
from gcmlm_assets_tests.support.pathology.ln_fixtures import annotation, polygon, write_annotations, write_feature_file

ANNOTATED = ("P1", "P2", "P3")
PATIENTS = (*ANNOTATED, "P4")
DIM = 8


def disc_ring(disc, n: int = 64, scale: float = 1.0) -> list[list[float]]:
    """A closed ring around the disc (its radius times `scale`), level-0 px."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = disc.r * scale
    ring = [[float(disc.x + r * np.cos(a)), float(disc.y + r * np.sin(a))] for a in angles]
    return ring + [ring[0]]


def slide_name(patient_id: str) -> str:
    return f"{patient_id}_ln1"


def annotation_file(landing: Path, patient_id: str) -> Path:
    """Where the patient's slide's QuPath export lies in the landing zone."""
    return landing / patient_id / LN_ANNOTATIONS_FOLDER / f"{slide_name(patient_id)}.geojson"


def write_planted_annotations(path: Path, tumour_scale: float = 1.0) -> Path:
    """The planted nodes and tumours as QuPath annotations (tumours drawn `tumour_scale` times their size)."""
    features = [annotation(polygon(disc_ring(node.disc)), "Lymph node") for node in planted.NODES]
    features += [annotation(polygon(disc_ring(node.tumour, scale=tumour_scale)), "Tumor")
                 for node in planted.NODES if node.tumour]
    return write_annotations(path, features)


def embeddings(coords: np.ndarray, side: float, seed: int) -> np.ndarray:
    """Feature 0 is 1 for a tumour patch and 0 otherwise, plus noise; the rest is noise."""
    rng = np.random.default_rng(seed)
    tumour = planted.perfect_probabilities(coords, side) > 0.5
    features = rng.normal(0.0, 0.25, size=(len(coords), DIM))
    features[:, 0] += tumour
    return features


def drop(store: ArtifactStore, landing: Path, patient_id: str, seed: int, *, annotated: bool) -> None:
    """ln_patch_coords' and ln_features' outputs of one patient's lymph-node slide, and its annotations."""
    slide = planted.write_lymph_node_slide(landing / patient_id / LN_WSI_FOLDER / f"{slide_name(patient_id)}.tiff")
    listing = planted.tiled_patient(LN_PATCH_COORDS.folder(store, patient_id), [slide], patient_id)
    slides, files = [], {}
    for entry in listing["slides"]:
        grid = read_coords_h5(entry["h5"])
        side = int(grid.attrs["patch_size_level0"])
        path = write_feature_file(LN_FEATURES.folder(store, patient_id) / entry["h5_file"],
                                  embeddings(grid.coords, side, seed), grid.coords, side=side,
                                  dimensions=tuple(entry["dimensions"]))
        files[path.name] = path
        slides.append({"h5_file": path.name, "slide_file": entry["file"], "n_patches": len(grid.coords)})
    StoredOutput(store, LN_FEATURES, patient_id, f"test-{seed}").record(files, slides=slides)
    if annotated:
        write_planted_annotations(annotation_file(landing, patient_id))


def build_cohort(instance: dg.DagsterInstance, data_root: Path, patients=PATIENTS,
                 annotated=ANNOTATED) -> ArtifactStore:
    """The patients' partitions and their lymph-node outputs under `data_root` (artifacts/, landing/).
    The instance holds no materialization of them: a test reports or runs what it needs."""
    store, landing = ArtifactStore(data_root / "artifacts"), data_root / "landing"
    instance.add_dynamic_partitions(patients_partitions.name, list(patients))
    for seed, patient_id in enumerate(patients):
        drop(store, landing, patient_id, seed, annotated=patient_id in annotated)
    return store


def ln_resources(base_resources: dict, **classifier) -> dict:
    """The test resources with the lymph-node analysis' and the classifier's settings."""
    return {**base_resources, "lymph_node": LymphNodeSettings(min_node_area_mm2=0.02),
            "ln_classifier": TumourClassifierSettings(**classifier)}
