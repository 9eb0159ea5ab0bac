"""How `patch_coords` finds tissue and lays patches: the `pathology` resource's settings, declared
once (plain Python, no Dagster).

The resource (TilingSettings in pathology/resources.py) inherits these fields (see setting_fields).
Their defaults are the plain tiling classes' own (TilingParams, SegmentationParams, ClamParams: one
definition each); the settings are flat, one form field each, and `tiling_params()` builds the
nested TilingParams from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gcmlm_assets.pathology.tiling_params import ClamParams, TilingParams
from gcmlm_assets.pathology.tissue import SegmentationParams
from gcmlm_assets.setting_fields import setting

TILING = TilingParams()  # the tiling defaults


@dataclass(frozen=True)
class TilingFields:
    mode: Annotated[str, setting('"default" or "clam"')] = TILING.mode
    patch_size: Annotated[int, setting("patch side in px at target_mpp")] = TILING.patch_size
    target_mpp: Annotated[float, setting("µm per pixel of the patches (0.5 ~ 20x)")] = TILING.target_mpp
    min_tissue: Annotated[float, setting("minimum tissue fraction of a kept patch")] = TILING.min_tissue
    default_mpp: Annotated[float, setting(
        "µm/px assumed (with a WARN) for slides without resolution")] = TILING.default_mpp
    min_plausible_mpp: float = TILING.plausible_mpp[0]
    max_plausible_mpp: float = TILING.plausible_mpp[1]
    level_match_tolerance: float = TILING.level_match_tolerance
    seg_mpp: Annotated[float, setting("µm per pixel of the image tissue is segmented on")] = TILING.seg_mpp
    sthresh: int = TILING.segmentation.sthresh
    mthresh: int = TILING.segmentation.mthresh
    close: int = TILING.segmentation.close
    use_otsu: bool = TILING.segmentation.use_otsu
    min_tissue_area: Annotated[float, setting(
        "drop tissue regions under this many patch areas")] = TILING.min_tissue_area
    min_hole_area: Annotated[float, setting("fill holes under this many patch areas")] = TILING.min_hole_area
    max_n_holes: Annotated[int | None, setting("keep only the largest N holes per region")] = TILING.max_n_holes
    clam_preset: Annotated[str | None, setting("CLAM preset CSV; overrides the `clam_*` fields")] = None
    clam_seg_level: int = TILING.clam.seg_level
    clam_a_t: float = TILING.clam.a_t
    clam_a_h: float = TILING.clam.a_h
    clam_max_n_holes: int = TILING.clam.max_n_holes
    clam_contour_fn: str = TILING.clam.contour_fn
    clam_use_padding: bool = TILING.clam.use_padding
    min_patches_per_slide: Annotated[int, setting("patch_count_in_bounds warns below this")] = 10
    max_patches_per_slide: Annotated[int, setting("patch_count_in_bounds warns above this")] = 200_000

    def tiling_params(self) -> TilingParams:
        clam = ClamParams(seg_level=self.clam_seg_level, sthresh=self.sthresh, mthresh=self.mthresh,
                          close=self.close, use_otsu=self.use_otsu, a_t=self.clam_a_t, a_h=self.clam_a_h,
                          max_n_holes=self.clam_max_n_holes, contour_fn=self.clam_contour_fn,
                          use_padding=self.clam_use_padding, patch_size=self.patch_size,
                          step_size=self.patch_size)
        if self.clam_preset:
            clam = ClamParams.from_preset_csv(self.clam_preset, base=clam)
        return TilingParams(
            mode=self.mode, patch_size=self.patch_size, target_mpp=self.target_mpp,
            min_tissue=self.min_tissue, default_mpp=self.default_mpp,
            plausible_mpp=(self.min_plausible_mpp, self.max_plausible_mpp),
            level_match_tolerance=self.level_match_tolerance, seg_mpp=self.seg_mpp,
            segmentation=SegmentationParams(sthresh=self.sthresh, mthresh=self.mthresh, close=self.close,
                                            use_otsu=self.use_otsu),
            min_tissue_area=self.min_tissue_area, min_hole_area=self.min_hole_area,
            max_n_holes=self.max_n_holes, clam=clam,
        )
