"""A small real lymph-node slide: separated discs of tissue (the nodes) on glass, darker discs of
'tumour' inside some, and a speck of debris; written as a pyramidal TIFF and tiled by the real tiling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gcmlm_assets.pathology.patch_coords import tile_patient, write_patient_outputs
from gcmlm_assets.pathology.tiling_params import TilingParams
from gcmlm_assets_tests.support.pathology.slide_fixtures import write_pyramid_tiff

MPP = 0.5
WIDTH, HEIGHT = 2048, 1536
GLASS = (243, 241, 244)
NODE_TISSUE = (226, 152, 192)
TUMOUR_TISSUE = (150, 82, 160)
# 32 px patches at 0.5 µm/px (the slide's own resolution: read as they are) and a 2 µm/px
# segmentation: ~20 patches and ~75 segmentation px across a node, so areas compare to a few %.
PARAMS = TilingParams(patch_size=32, target_mpp=MPP, seg_mpp=2.0)


@dataclass(frozen=True)
class Disc:
    x: float
    y: float
    r: float

    def area_mm2(self, mpp: float = MPP) -> float:
        return math.pi * self.r ** 2 * mpp * mpp * 1e-6

    def contains(self, points) -> np.ndarray:
        points = np.asarray(points, np.float64).reshape(-1, 2)
        return (points[:, 0] - self.x) ** 2 + (points[:, 1] - self.y) ** 2 < self.r ** 2


@dataclass(frozen=True)
class PlantedNode:
    disc: Disc
    tumour: Disc | None = None


# Ordered as the analysis numbers nodes: by the (y, x) of their bounding boxes.
NODES = (
    PlantedNode(Disc(430, 420, 300)),
    PlantedNode(Disc(1350, 500, 330), Disc(1400, 520, 180)),
    PlantedNode(Disc(1200, 1180, 260), Disc(1150, 1200, 120)),
)
DEBRIS = Disc(300, 1300, 45)  # 0.0016 mm²: tissue to the tiling, debris to the analysis


def planted_image(nodes=NODES, debris=DEBRIS) -> np.ndarray:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.empty((HEIGHT, WIDTH, 3), np.float32)
    rgb[:] = GLASS
    for disc, colour in [(n.disc, NODE_TISSUE) for n in nodes] + [(debris, NODE_TISSUE)] + \
            [(n.tumour, TUMOUR_TISSUE) for n in nodes if n.tumour]:
        rgb[(xx - disc.x) ** 2 + (yy - disc.y) ** 2 < disc.r ** 2] = colour
    rgb += rng.normal(0.0, 1.5, size=(HEIGHT, WIDTH, 1)).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_lymph_node_slide(path: Path) -> Path:
    return write_pyramid_tiff(path, planted_image(), mpp=MPP, downsamples=(1, 4))


def tiled_patient(folder: Path, slides: list[Path], patient_id: str = "P1", params: TilingParams = PARAMS) -> dict:
    """ln_patch_coords' outputs (slides.json + HDF5), as the tiling writes them; returns the listing."""
    listing = write_patient_outputs(folder, patient_id, tile_patient(slides, params), params)
    listing.pop("files")
    return listing


def perfect_probabilities(coords, side: float, nodes=NODES) -> np.ndarray:
    """0.95 for a patch whose centre lies in a planted tumour disc, else 0.05."""
    centres = np.asarray(coords, np.float64) + side / 2
    tumour = np.zeros(len(centres), bool)
    for node in nodes:
        if node.tumour:
            tumour |= node.tumour.contains(centres)
    return np.where(tumour, 0.95, 0.05)
