"""Each patient's bag of patch features (all slides, concatenated): the attention-MIL block's input.

Plain Python (no Dagster). The bags are read from the patch-feature asset's files (`uni_features`)
of the patients that have pathology in the fused table, so they come from the same sound results
the slide vectors were pooled from. Values stay as stored (float16/float32 kept as float32): the
explanations need exactly what the mean pooling summed.
"""

from __future__ import annotations

from collections.abc import Iterable

from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.tables.fusion import AVAILABILITY, PATHOLOGY
from gcmlm_assets.lazy import lazy
from gcmlm_assets.patch_features import PoolingError, patient_slides
from gcmlm_assets.storage import ArtifactStore, sha256_text

# imported on first use: the definitions import this module, the steps compute (gcmlm_assets/lazy.py)
np = lazy("numpy")

# Patches per patient ABMIL trains and cross-validates on (evenly spaced; scoring reads them all):
# 2048 UNI embeddings are 8 MiB, so a cohort of hundreds of patients fits in the step's memory.
TRAINING_BAG_PATCHES = 2048


def pathology_patients(fused_table, labelled_only: bool = False) -> list[str]:
    """The fused table's patients with pathology (and a known label, with `labelled_only`)."""
    ids = fused_table.column(ID_COLUMN).to_pylist()
    flags = fused_table.column(AVAILABILITY[PATHOLOGY]).to_pylist()
    labels = fused_table.column(LABEL_COLUMN).to_pylist()
    return [p for p, has, label in zip(ids, flags, labels) if has and (label is not None or not labelled_only)]


def load_bags(store: ArtifactStore, features_asset: str, patient_ids: Iterable[str],
              max_patches: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({patient: features (N, D) float32}, {patient: why no bag}) for the given patients.

    `max_patches`: a larger bag keeps that many patches, evenly spaced through the slides (the same
    ones every time), so that training on a cohort of UNI-sized bags fits in memory."""
    bags: dict[str, np.ndarray] = {}
    problems: dict[str, str] = {}
    for patient_id in patient_ids:
        slides = patient_slides(store, features_asset, patient_id)
        if not slides:
            problems[patient_id] = f"no {features_asset} manifest"
            continue
        try:
            parts = [slide.read()[0] for slide in slides]
        except PoolingError as error:
            problems[patient_id] = str(error)
            continue
        dims = {part.shape[1] for part in parts if part.ndim == 2}
        if len(dims) != 1 or sum(len(part) for part in parts) == 0:
            problems[patient_id] = f"feature files disagree on the dimension ({sorted(dims)}) or hold no patch"
            continue
        bag = np.concatenate([part.astype(np.float32) for part in parts])
        if max_patches is not None and len(bag) > max_patches:
            bag = bag[np.linspace(0, len(bag) - 1, max_patches).round().astype(int)]
        bags[patient_id] = bag
    return bags, problems


def bags_fingerprint(store: ArtifactStore, features_asset: str, patient_ids: Iterable[str]) -> str:
    """One hash over the feature files' recorded hashes: changes when any bag would change."""
    parts = []
    for patient_id in sorted(patient_ids):
        manifest = store.read_manifest(features_asset, patient_id) or {}
        parts += [f"{patient_id}/{name}={digest}" for name, digest in sorted((manifest.get("files") or {}).items())]
    return sha256_text(*parts)
