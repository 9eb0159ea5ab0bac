"""risk_explanations' patch file for a real grid, written by risk_explanations' own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gcmlm_assets.cohort.explain.patient_explanation import PatientExplanation, SlidePatches
from gcmlm_assets.cohort.explanation_assets import _write_patches
from gcmlm_assets_tests.support.pathology.slide_fixtures import SMALL_REGION

SMALL_REGION_NAME = Path(SMALL_REGION).stem  # the slide's name in patch_coords' listing


def write_patch_values(path: Path, coords: np.ndarray, *, attention: bool = True, seed: int = 0,
                       slide_name: str = SMALL_REGION_NAME) -> Path:
    """A patch file as risk_explanations writes it, its patches in another order than the grid's
    (feature extraction may store them so)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(coords))
    slide = SlidePatches(slide_name, None, 256.0, coords[order], np.zeros((len(coords), 4), np.float32))
    explanation = PatientExplanation("P1", 0.3, -0.8, [], pathology_weight=0.7)
    explanation.patch_contributions[slide_name] = rng.normal(0, 0.05, len(coords))
    if attention:
        weights = rng.random(len(coords))
        explanation.attention[slide_name] = weights / weights.sum()
    _write_patches(explanation, [slide], path)
    return path
