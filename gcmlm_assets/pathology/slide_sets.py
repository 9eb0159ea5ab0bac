"""The kinds of slide a drop carries, each tiled and encoded the same way into assets of its own (no Dagster).

The primary tumour's slides (`wsi/`) become patch_coords and uni_features; the lymph-node slides
(`ln_wsi/`) become ln_patch_coords and ln_features. pathology/assets.py builds both pairs of assets
from these entries, so that the two differ only in where they read and write.
"""

from __future__ import annotations

from dataclasses import dataclass

from gcmlm_assets.catalogue import (
    LN_FEATURES, LN_PATCH_COORDS, LN_SLIDE_LISTING, LN_TILING_PICTURE, PATCH_COORDS, SLIDE_LISTING, TILING_PICTURE,
    UNI_FEATURES, Asset, AssetFile)
from gcmlm_assets.landing.scan import LN_WSI_FOLDER, WSI_FOLDER


@dataclass(frozen=True)
class SlideSet:
    landing_folder: str  # the drop's sub-folder holding the slides
    coords: Asset  # the tiling's asset: one CLAM-layout HDF5 per slide with tissue
    listing: AssetFile  # its slides.json, which the encoder's asset reads
    picture: AssetFile  # its tiling picture
    features: Asset  # the encoder's asset: one HDF5 of patch embeddings per slide


PRIMARY_SLIDES = SlideSet(WSI_FOLDER, PATCH_COORDS, SLIDE_LISTING, TILING_PICTURE, UNI_FEATURES)
LYMPH_NODE_SLIDES = SlideSet(LN_WSI_FOLDER, LN_PATCH_COORDS, LN_SLIDE_LISTING, LN_TILING_PICTURE, LN_FEATURES)
