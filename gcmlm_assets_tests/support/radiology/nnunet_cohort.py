"""The tiny nnU-Net cohort of the radiology tests: crops of the real CT on a coarse grid, trained and
predicted through Dagster in-process."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import SimpleITK as sitk

from gcmlm_assets.radiology.assets import ct_image
from gcmlm_assets.radiology.resources import SegmentationModelResource
from gcmlm_assets.radiology.segmentation_model import segmentation_model

# The tests train the demo profile's tiny nnU-Net for 20 x 12 iterations on one thread instead of the
# demo's 30 x 15 on two: their 6 mm crops are smaller than the demo's CTs (profiles.DEMO says why 240 do).
TEST_TRAINING = {"epochs": 20, "iterations_per_epoch": 12, "torch_threads": 1}


def demo_segmentation(**overrides) -> SegmentationModelResource:
    return SegmentationModelResource.cpu_demo(**{**TEST_TRAINING, **overrides})


TRAIN_SPACING_MM = 6.0
# (x0, y0, z0, nx, ny, nz) on the 6 mm grid (61 x 50 x 15 voxels)
TRAINING_CROPS = {
    "GC001": (0, 0, 0, 61, 50, 15),
    "GC002": (5, 2, 0, 51, 45, 15),
    "GC003": (0, 4, 1, 55, 46, 14),
    "GC004": (7, 0, 0, 54, 48, 15),
}


def resampled(image: sitk.Image, spacing: float, interpolator) -> sitk.Image:
    """`image` on a coarser grid covering the same box, in its own (non-LPS) orientation."""
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, image.GetPixelID())
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, -1024 if interpolator == sitk.sitkLinear else 0)


def model_table(meta: dict) -> dict[str, str]:
    """segmentation_model's `model` metadata table as {property: value}."""
    return {record.data["property"]: record.data["value"] for record in meta["model"].records}


class Cohort:
    def __init__(self, root: Path, instance, resources: dict):
        self.root, self.instance, self.resources = root, instance, resources
        self.landing, self.artifacts = root / "landing", root / "artifacts"

    def materialize(self, assets, *, partition: str | None = None, selection=None, **resources):
        return dg.materialize(assets, partition_key=partition, selection=selection, instance=self.instance,
                              resources={**self.resources, **resources}, raise_on_error=False)

    def train(self, **resources):
        return self.materialize([ct_image, segmentation_model], selection=[segmentation_model], **resources)
