"""The lymph-node slides' tiling and patch features: patch_coords' and uni_features' builders
(assets.py) over the drop's `ln_wsi/`, into assets of their own (catalogue.py)."""

from __future__ import annotations

import dagster as dg

from gcmlm_assets.pathology.assets import build_patch_coords, build_patch_features
from gcmlm_assets.pathology.slide_sets import LYMPH_NODE_SLIDES

_FOLDER = f"`<landing>/<patient>/{LYMPH_NODE_SLIDES.landing_folder}/`"

ln_patch_coords = build_patch_coords(
    LYMPH_NODE_SLIDES,
    description=f"Tissue patch coordinates of every lymph-node slide in {_FOLDER}, tiled as the primary tumour's "
                f"slides are: one CLAM-layout HDF5 per slide plus `{LYMPH_NODE_SLIDES.listing.name}`.")

ln_features = build_patch_features(
    LYMPH_NODE_SLIDES,
    description=f"Patch features of every lymph-node slide with tissue in {_FOLDER}: one CLAM-layout HDF5 per "
                "slide (`features` (N, D), `coords` (N, 2)), from the same encoder resource as the primary "
                "tumour's slides.")

ASSETS: list[dg.AssetsDefinition] = [ln_patch_coords, ln_features]
