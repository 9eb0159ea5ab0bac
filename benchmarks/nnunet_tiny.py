"""Tiny nnU-Net on CPU: how long planning, training, loading and predicting take, and how good it gets.

    python -m benchmarks.nnunet_tiny [--epochs 20] [--iterations 12] [--threads 1] [--repeats 1]

The cohort of the nnU-Net test, without Dagster: four crops of the real abdominal
CT (../shared/data/ct/totalsegmentator) resampled to 6 mm with their stomach
masks, trained with the demo profile's settings (`SegmentationModelResource.cpu_demo()`; the
defaults here are the tests' 20 x 12 iterations on one thread) through
`nnunet_training.train_segmentation_model`; then `GastricSegmenter` loads the model and
predicts the whole CT resampled to 5 mm (a grid it never saw). Prints wall and
CPU seconds per phase (CPU includes nnU-Net's worker processes), the pseudo
Dice of nnU-Net's online validation and the Dice of the 5 mm prediction.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(os.environ.get("GCMLM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CROPS = [(0, 0, 0, 61, 50, 15), (5, 2, 0, 51, 45, 15), (0, 4, 1, 55, 46, 14), (7, 0, 0, 54, 48, 15)]


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def on_grid(image: sitk.Image, spacing: float | tuple[float, float, float], interpolator) -> sitk.Image:
    """`image` resampled to `spacing` mm (one value: isotropic; else x, y, z) over the same extent."""
    spacings = [float(spacing)] * 3 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacings)]
    grid = sitk.Image(size, image.GetPixelID())
    grid.SetSpacing(spacings)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, -1024 if interpolator == sitk.sitkLinear else 0)


def run_once(work: Path, settings) -> dict:
    from gcmlm_assets.radiology import nnunet, nnunet_training

    source = DATA / "ct" / "totalsegmentator"
    ct = sitk.DICOMOrient(sitk.ReadImage(str(source / "example_ct_sm.nii.gz")), "LPS")
    stomach = sitk.DICOMOrient(sitk.ReadImage(str(source / "example_ct_sm_stomach.nii.gz")), "LPS")
    ct6, stomach6 = on_grid(ct, 6.0, sitk.sitkLinear), on_grid(stomach, 6.0, sitk.sitkNearestNeighbor)
    cases = []
    for index, (x, y, z, nx, ny, nz) in enumerate(CROPS):
        image_file, mask_file = work / f"case{index}_ct.nii.gz", work / f"case{index}_mask.nii.gz"
        sitk.WriteImage(sitk.RegionOfInterest(ct6, [nx, ny, nz], [x, y, z]), str(image_file), True)
        sitk.WriteImage(sitk.RegionOfInterest(stomach6, [nx, ny, nz], [x, y, z]), str(mask_file), True)
        cases.append(nnunet_training.TrainingCase(f"case{index}", image_file, mask_file))

    result = nnunet_training.train_segmentation_model(cases, work / "nnunet", settings)
    wall, cpu = time.perf_counter(), cpu_seconds()
    segmenter = nnunet.GastricSegmenter.load(result.model_folder, settings.device,
                                             pins=nnunet.CheckpointPins.of_fresh_training(result.model_folder))
    load = (time.perf_counter() - wall, cpu_seconds() - cpu)
    held_out, truth = on_grid(ct, 5.0, sitk.sitkLinear), on_grid(stomach, 5.0, sitk.sitkNearestNeighbor)
    wall, cpu = time.perf_counter(), cpu_seconds()
    predicted = sitk.GetArrayFromImage(segmenter.predict(held_out)) > 0
    predict = (time.perf_counter() - wall, cpu_seconds() - cpu)
    reference = sitk.GetArrayFromImage(truth) > 0
    dice = 2 * np.logical_and(predicted, reference).sum() / max(1, predicted.sum() + reference.sum())
    return {"result": result, "load": load, "predict": predict, "dice": float(dice), "voxels": held_out.GetSize()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from gcmlm_assets.radiology.resources import SegmentationModelResource

    settings = SegmentationModelResource.cpu_demo(epochs=args.epochs, iterations_per_epoch=args.iterations,
                                                  torch_threads=args.threads).training_settings()
    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="nnunet_tiny_") as tmp:
            rows.append(run_once(Path(tmp), settings))
    print(f"\ntiny nnU-Net: trainer {settings.trainer}, {args.epochs} epochs x {args.iterations} iterations, "
          f"{len(CROPS)} cases, torch threads {args.threads}, device {settings.device}, cpus {os.cpu_count()}")
    print(f"{'run':>3} | {'plan+prep s':>11} | {'train s':>7} | {'total s':>7} | {'total CPU s':>11} | "
          f"{'load s':>6} | {'predict s':>9} | {'pseudo Dice':>11} | {'Dice 5 mm':>9}")
    for index, row in enumerate(rows):
        result = row["result"]
        print(f"{index:>3} | {result.seconds['plan_and_preprocess']:>11.1f} | {result.seconds['train']:>7.1f} | "
              f"{result.seconds['total']:>7.1f} | {result.cpu_seconds:>11.1f} | {row['load'][0]:>6.2f} | "
              f"{row['predict'][0]:>9.2f} | {result.metrics['final_pseudo_dice'] or 0:>11.3f} | {row['dice']:>9.3f}")
    print(f"(held-out CT {rows[0]['voxels']} voxels at 5 mm; prediction with test-time mirroring, nnU-Net's default)")


if __name__ == "__main__":
    main()
