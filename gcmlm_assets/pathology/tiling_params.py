"""What tiling is asked for and what it returns: the parameters of both modes (`default` and
CLAM's) and one slide's result (plain Python, no Dagster).

The modes themselves are in tiling.py (`default`) and clam_tiling.py (`clam`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass, field

from gcmlm_assets.catalogue import PATCH_COORDS
from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology.slides import PLAUSIBLE_MPP
from gcmlm_assets.pathology.tissue import SegmentationParams, TissueRegion

# Imported on first use: the definitions import this module's constants and types, not its work.
np = lazy("numpy")

# patch_coords' code version (catalogue.py): bump it there when a change of the tiling modules changes
# their output for the same inputs. It is in patch_coords' fingerprint and in its data version.
TILING_VERSION = PATCH_COORDS.code_version
MODES = ("default", "clam")
CLAM_CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")


@dataclass(frozen=True)
class ClamParams:
    """CLAM's `create_patches_fp.py` parameters (its own defaults; a preset CSV may override).

    `a_t` and `a_h` are in CLAM's unit: multiples of a `ref_patch_size`² px area
    at level 0 (CLAM's `segmentTissue` default of 512).
    """

    seg_level: int = -1  # -1: level 0 if the slide has one level, else the best level for downsample 64
    # CLAM's segmentation defaults are the ones `default` mode uses (SegmentationParams').
    sthresh: int = SegmentationParams.sthresh
    sthresh_up: int = SegmentationParams.sthresh_up
    mthresh: int = SegmentationParams.mthresh
    close: int = SegmentationParams.close
    use_otsu: bool = SegmentationParams.use_otsu
    a_t: float = 100.0
    a_h: float = 16.0
    max_n_holes: int = 8
    ref_patch_size: int = 512
    patch_size: int = 256
    step_size: int = 256
    patch_level: int = 0
    contour_fn: str = "four_pt"
    use_padding: bool = True
    keep_ids: str = "none"  # comma-separated contour indices to keep ("none": all)
    exclude_ids: str = "none"  # comma-separated contour indices to drop
    max_seg_pixels: int = 400_000_000  # CLAM reads the seg level whole; refuse what would not fit

    @classmethod
    def from_preset_csv(cls, path: str | os.PathLike, base: ClamParams | None = None) -> ClamParams:
        """`base` (default: CLAM's defaults) with the columns of a CLAM preset CSV
        (`presets/*.csv`: one row of seg/filter/patch parameters) applied on top."""
        with open(path, newline="", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
        values = dataclasses.asdict(base or cls())
        for item in dataclasses.fields(cls):
            raw = row.get(item.name)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            if item.type in ("bool", bool):
                values[item.name] = raw.lower() in ("true", "1", "yes")
            elif item.type in ("int", int):
                values[item.name] = int(float(raw))
            elif item.type in ("float", float):
                values[item.name] = float(raw)
            else:
                values[item.name] = raw
        return cls(**values)

    def contour_ids(self, n_contours: int) -> list[int]:
        """The contours CLAM patches, in the order it patches them."""
        def parse(text: str) -> set[int]:
            text = str(text).strip()
            return set() if text.lower() in ("", "none") else {int(v) for v in text.split(",")}

        keep, exclude = parse(self.keep_ids), parse(self.exclude_ids)
        chosen = keep if keep else set(range(n_contours))
        return sorted(i for i in chosen - exclude if 0 <= i < n_contours)

    def segmentation(self) -> SegmentationParams:
        return SegmentationParams(sthresh=self.sthresh, sthresh_up=self.sthresh_up, mthresh=self.mthresh,
                                  close=self.close, use_otsu=self.use_otsu)


@dataclass(frozen=True)
class TilingParams:
    mode: str = "default"
    patch_size: int = 256  # px of the patch the encoder gets
    target_mpp: float = 0.5  # µm/px of those pixels (about 20x)
    min_tissue: float = 0.25  # fraction of the patch that must be tissue
    default_mpp: float = 0.5  # used (and reported as a warning) when the slide has no resolution
    plausible_mpp: tuple[float, float] = PLAUSIBLE_MPP
    # A pyramid level (or 1.0 read size ratio) within this relative distance counts as exact:
    # 0.499 µm/px scanned, 0.5 wanted -> read 256 px as they are, no resize.
    level_match_tolerance: float = 0.02
    seg_mpp: float = 8.0  # µm per mask pixel: 16 mask px per side of a 256 px x 0.5 µm patch
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    min_tissue_area: float = 1.0  # tissue regions smaller than this many patch areas are dropped
    min_hole_area: float = 1.0  # holes smaller than this many patch areas count as tissue
    max_n_holes: int | None = None  # None keeps every hole
    # A one-level slide above this many pixels is segmented on its associated thumbnail
    # (when that has the slide's aspect ratio) instead of streaming all of level 0.
    thumbnail_above_pixels: int = 400_000_000
    clam: ClamParams = field(default_factory=ClamParams)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"tiling mode must be one of {MODES}, got {self.mode!r}")
        if self.patch_size < 1 or self.target_mpp <= 0 or self.seg_mpp <= 0:
            raise ValueError("patch_size, target_mpp and seg_mpp must be positive")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must lie in [0, 1], got {self.min_tissue}")
        if self.clam.contour_fn not in CLAM_CONTOUR_FNS:
            raise ValueError(f"clam contour_fn must be one of {CLAM_CONTOUR_FNS}, got {self.clam.contour_fn!r}")

    def as_dict(self) -> dict:
        """The parameters that matter for the chosen mode (recorded in outputs and fingerprints)."""
        everything = dataclasses.asdict(self)
        if self.mode == "clam":
            return {"mode": "clam", "default_mpp": self.default_mpp,
                    "plausible_mpp": list(self.plausible_mpp), "clam": everything["clam"]}
        everything.pop("clam")
        everything["plausible_mpp"] = list(self.plausible_mpp)
        return everything


@dataclass
class TilingResult:
    name: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    attrs: dict  # written on the HDF5 `coords` dataset
    n_candidates: int
    regions: list[TissueRegion]  # tissue contours in `preview` pixels
    preview: np.ndarray  # RGB image the tissue was segmented on
    preview_scale: tuple[float, float]  # level-0 px per preview px (x, y)
    patch_size_level0: float
    tissue_fraction: float  # of the slide's area
    reason: str | None = None  # why there are no patches

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))
