"""Asset checks of the radiology group.

The checks are declared as `check_specs` on the partitioned assets and evaluated
inside each asset's step, on the files the step just wrote (or reused): that is
how a check runs per patient partition in Dagster 1.13 and how a blocking failure
stops the downstream asset of that patient only. Every check is blocking with
ERROR severity because each guards something a downstream result depends on.
`CHECKS` (stand-alone `@asset_check`s) therefore stays empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from gcmlm_assets.lazy import lazy

# Imported when a check runs, not when the definitions (which declare the checks) load.
np = lazy("numpy")
pa = lazy("pyarrow")
sitk = lazy("SimpleITK")
radiomics_features = lazy("gcmlm_assets.radiology.features")

CHECKS: list[dg.AssetChecksDefinition] = []

# Plausible CT grids: real scanners reconstruct 0.2-1 mm in-plane and 0.5-10 mm slices; outside
# 0.1-10 mm a header is wrong (e.g. spacing in cm or m). Fewer than 8 voxels along an axis is no volume;
# more than 4096 is not a CT.
CT_SPACING_MM = (0.1, 10.0)
CT_VOXELS_PER_AXIS = (8, 4096)
# CT in Hounsfield units always contains fat (-100) or air (-1000) somewhere; data that never goes below
# -50 HU are raw stored values without the rescale intercept, or not CT at all (MR, PET).
CT_LOW_PERCENTILE_MAX_HU = -50.0
# No scanner's extended scale goes beyond these.
CT_HU_LIMITS = (-4096.0, 35000.0)


def _spec(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)


CT_IMAGE_CHECK_SPECS = [
    _spec("ct_geometry_plausible", "ct_image",
          f"Voxel spacing within {CT_SPACING_MM} mm and {CT_VOXELS_PER_AXIS} voxels per axis."),
    _spec("ct_hu_range_plausible", "ct_image",
          f"Values look like Hounsfield units: 1st percentile <= {CT_LOW_PERCENTILE_MAX_HU} HU, "
          f"all values within {CT_HU_LIMITS} HU."),
]
CT_MASK_CHECK_SPECS = [
    _spec("mask_matches_ct_geometry", "ct_mask",
          "mask.nii.gz has exactly ct.nii.gz's size, spacing, origin and direction, uint8 values 0/1."),
    _spec("mask_not_empty", "ct_mask", "The stored mask has at least one foreground voxel."),
    _spec("mask_volume_plausible", "ct_mask",
          "Mask volume within the range set on the `radiomics` resource (mask_volume_min_ml..max_ml)."),
]
RADIOMICS_ROW_CHECK_SPECS = [
    _spec("radiomics_row_complete", "radiomics_row",
          "One row: patient_id, then exactly the float64 feature columns the params produce, in order."),
    _spec("radiomics_row_finite", "radiomics_row", "Every feature value is finite (no NaN or inf)."),
]


def _result(name: str, passed: bool, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, passed=bool(passed), severity=dg.AssetCheckSeverity.ERROR,
                               metadata=metadata)


def _header(path: Path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


# ---------------------------------------------------------------- ct_image


def ct_image_check_results(ct_path: Path) -> list[dg.AssetCheckResult]:
    image = sitk.ReadImage(str(ct_path))
    spacing, size = image.GetSpacing(), image.GetSize()
    geometry_ok = (all(CT_SPACING_MM[0] <= s <= CT_SPACING_MM[1] for s in spacing)
                   and all(CT_VOXELS_PER_AXIS[0] <= n <= CT_VOXELS_PER_AXIS[1] for n in size))
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    p01 = float(np.percentile(values, 1))
    hu_ok = p01 <= CT_LOW_PERCENTILE_MAX_HU and CT_HU_LIMITS[0] <= low and high <= CT_HU_LIMITS[1]
    return [
        _result("ct_geometry_plausible", geometry_ok, spacing_mm=str(tuple(round(s, 4) for s in spacing)),
                size=str(size)),
        _result("ct_hu_range_plausible", hu_ok, hu_min=low, hu_max=high, hu_p01=p01),
    ]


# ---------------------------------------------------------------- ct_mask


def ct_mask_check_results(mask_path: Path, ct_path: Path, volume_min_ml: float,
                          volume_max_ml: float) -> list[dg.AssetCheckResult]:
    ct, stored = _header(ct_path), _header(mask_path)
    mismatches = [name for name, a, b in (
        ("size", ct.GetSize(), stored.GetSize()),
        ("spacing", ct.GetSpacing(), stored.GetSpacing()),
        ("origin", ct.GetOrigin(), stored.GetOrigin()),
        ("direction", ct.GetDirection(), stored.GetDirection()),
    ) if tuple(a) != tuple(b)]
    mask = sitk.ReadImage(str(mask_path))
    values = sitk.GetArrayViewFromImage(mask)
    labels = sorted(int(v) for v in np.unique(values))
    binary_uint8 = mask.GetPixelID() == sitk.sitkUInt8 and set(labels) <= {0, 1}
    voxels = int(np.count_nonzero(values))
    volume_ml = voxels * float(np.prod(mask.GetSpacing())) / 1000.0
    return [
        _result("mask_matches_ct_geometry", not mismatches and binary_uint8,
                mismatched=", ".join(mismatches) or "none", pixel_type=mask.GetPixelIDTypeAsString(),
                labels=str(labels)),
        _result("mask_not_empty", voxels > 0, voxels=voxels),
        _result("mask_volume_plausible", volume_min_ml <= volume_ml <= volume_max_ml, volume_ml=volume_ml,
                allowed_ml=f"{volume_min_ml}..{volume_max_ml}"),
    ]


# ---------------------------------------------------------------- radiomics_row


def radiomics_row_check_results(table, patient_id: str,
                                expected_features: Sequence[str]) -> list[dg.AssetCheckResult]:
    names = table.column_names
    features = names[1:]
    missing = [n for n in expected_features if n not in features]
    unexpected = [n for n in features if n not in set(expected_features)]
    not_float = [n for n in features if table.schema.field(n).type != pa.float64()]
    complete = (table.num_rows == 1 and names[:1] == [radiomics_features.PATIENT_COLUMN]
                and table.column(radiomics_features.PATIENT_COLUMN).to_pylist() == [patient_id]
                and list(features) == list(expected_features) and not not_float)
    non_finite = [n for n in features if table.num_rows != 1
                  or not all(v is not None and math.isfinite(v) for v in table.column(n).to_pylist())]
    return [
        _result("radiomics_row_complete", complete, rows=table.num_rows, features=len(features),
                expected_features=len(expected_features), missing=", ".join(missing[:20]),
                unexpected=", ".join(unexpected[:20]), not_float64=", ".join(not_float[:20])),
        _result("radiomics_row_finite", not non_finite, non_finite=", ".join(non_finite[:20]),
                non_finite_count=len(non_finite)),
    ]
