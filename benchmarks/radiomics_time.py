"""Per-case PyRadiomics time: the packaged `default` vs `rich` params on the real abdominal CT.

    python -m benchmarks.radiomics_time [--params default rich] [--repeats 3] [--cases ...]

Cases (all built from ../shared/data/ct/totalsegmentator, in a temporary folder):
  ct3mm_stomach   the real 3 mm CT and its stomach mask (~128 ml), as ct_image/ct_mask write them
  ct1mm_stomach   the same CT resampled to 1 mm beforehand (B-spline; mask nearest neighbour)
  ct3mm_large     the 3 mm CT with the stomach mask dilated to ~400 ml (a full stomach)
Both params files resample to 1 mm inside PyRadiomics, so the three differ in ROI size and in how much
of the resampling is left to PyRadiomics. Timed through the same functions radiomics_row uses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.radiology import ct_io, features, masks

DATA = Path(os.environ.get("GCMLM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CASES = ("ct3mm_stomach", "ct1mm_stomach", "ct3mm_large")


def build_case(name: str, folder: Path) -> tuple[Path, Path]:
    source = DATA / "ct" / "totalsegmentator"
    ct = ct_io.canonicalise(sitk.ReadImage(str(source / "example_ct_sm.nii.gz")))
    mask = masks.conform_mask(sitk.ReadImage(str(source / "example_ct_sm_stomach.nii.gz")), ct,
                              source / "example_ct_sm_stomach.nii.gz").image
    if name == "ct1mm_stomach":
        extent_mm = [int(round(n * s)) for n, s in zip(ct.GetSize(), ct.GetSpacing(), strict=True)]
        grid = sitk.Image(extent_mm, sitk.sitkInt16)
        grid.SetSpacing((1.0, 1.0, 1.0))
        grid.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint((-1 / 3, -1 / 3, -1 / 3)))
        mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        ct = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkBSpline, -1024, sitk.sitkInt16)
    elif name == "ct3mm_large":
        mask = sitk.Cast(sitk.BinaryDilate(mask, [4, 4, 3]), sitk.sitkUInt8)
    image_path, mask_path = folder / f"{name}_ct.nii.gz", folder / f"{name}_mask.nii.gz"
    ct_io.write_volume(ct, image_path)
    masks.write_mask(mask, mask_path)
    return image_path, mask_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", nargs="+", default=["default", "rich"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case for `default` (rich: 1)")
    args = parser.parse_args()

    print(f"PyRadiomics {features.pyradiomics_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    header = (f"{'case':<15} {'mask ml':>8} {'params':<8} {'features':>8} {'ROI voxels @1mm':>15} "
              f"{'s/case':>8} {'runs':>4}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="radiomics-bench-") as tmp:
        for case in args.cases:
            image_path, mask_path = build_case(case, Path(tmp))
            stats = masks.mask_stats(sitk.ReadImage(str(mask_path)))
            for params_name in args.params:
                params = features.load_params(params_name)
                repeats = args.repeats if params_name == "default" else 1
                seconds, row = [], None
                for _ in range(repeats):
                    extractor = features.extractor_from_params(params)
                    started = time.perf_counter()
                    row = features.extract_features(extractor, image_path, mask_path)
                    seconds.append(time.perf_counter() - started)
                finite = all(np.isfinite(list(row.features.values())))
                print(f"{case:<15} {stats.volume_ml:>8.1f} {params_name:<8} "
                      f"{len(row.features):>7}{'' if finite else '!'} "
                      f"{row.diagnostics.get('diagnostics_Mask-interpolated_VoxelNum', '?'):>15} "
                      f"{statistics.median(seconds):>8.2f} {repeats:>4}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end ('!' after a count: some values not finite)")


if __name__ == "__main__":
    main()
