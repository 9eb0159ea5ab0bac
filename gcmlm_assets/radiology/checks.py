"""Asset checks of the radiology group.

The checks are declared as `check_specs` on the partitioned assets and evaluated
inside each asset's step, on the files the step just wrote (or reused): that is
how a check runs per CT scan partition (`ct_scans`) in Dagster 1.13 and how a blocking failure
stops the downstream asset of that patient only. Every check but one is blocking with
ERROR severity because each guards something a downstream result depends on; the
exception, `mask_agrees_with_model`, warns (a reference mask that the model disagrees
with may still be right). `CHECKS` (stand-alone `@asset_check`s) therefore stays empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from gcmlm_assets.catalogue import CT_IMAGE, CT_MASK, CT_MASK_SEG, RADIOMICS_ROW, RADIOMICS_SR
from gcmlm_assets.lazy import lazy
from gcmlm_assets.radiology import features as radiomics_features
from gcmlm_assets.radiology import masks
from gcmlm_assets.radiology.hounsfield import AIR_HU, BONE_HU
from gcmlm_assets.scans import InvalidScanKey, parse_scan_key

# Imported when a check runs, not when the definitions (which declare the checks) load.
np = lazy("numpy")
pa = lazy("pyarrow")
sitk = lazy("SimpleITK")

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




def _spec(name: str, asset: str, description: str, blocking: bool = True) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, blocking=blocking, description=description)


def _mm(value: float) -> str:
    return f"{value:g}"


CT_IMAGE_CHECK_SPECS = [
    _spec("ct_geometry_plausible", CT_IMAGE.key,
          f"The CT has a realistic voxel size ({_mm(CT_SPACING_MM[0])} to {_mm(CT_SPACING_MM[1])} mm in each "
          f"direction) and a realistic number of voxels ({CT_VOXELS_PER_AXIS[0]} to {CT_VOXELS_PER_AXIS[1]} "
          "per direction). Outside these, the scan's header is wrong and every size and volume measured on it "
          "would be wrong too."),
    _spec("ct_hu_range_plausible", CT_IMAGE.key,
          "The CT values are Hounsfield units, as in any real CT: some air or fat is present (the lowest 1 % "
          f"of values at or below {_mm(CT_LOW_PERCENTILE_MAX_HU)} HU) and no value lies beyond what a scanner "
          f"produces ({_mm(CT_HU_LIMITS[0])} to {_mm(CT_HU_LIMITS[1])} HU). Otherwise the file is not a CT or "
          "lost its calibration on export, and the texture features would be meaningless."),
]
CT_MASK_CHECK_SPECS = [
    _spec("mask_matches_ct_geometry", CT_MASK.key,
          "The stomach outline (mask) lies on exactly the same voxel grid as the patient's CT and marks each "
          "voxel only as stomach or not; otherwise the features would be measured in the wrong place."),
    _spec("mask_not_empty", CT_MASK.key,
          "The stomach outline marks at least one voxel; an empty outline gives no radiomics features for the "
          "patient."),
    _spec("mask_volume_plausible", CT_MASK.key,
          "The outlined stomach volume lies within the plausible range set for the project (in millilitres); "
          "a much smaller or larger volume usually means a failed segmentation or a wrong reference outline."),
    _spec("mask_content_plausible", CT_MASK.key,
          "The outlined stomach holds what a stomach holds on CT: soft tissue, fluid and its own gas. Only a "
          f"small share of its voxels may be as dense as bone (above {BONE_HU} HU) or be air outside the body "
          f"(below {AIR_HU} HU and joined to the edge of the image). More means the outline sits on the wrong "
          "anatomy, for example a reference mask whose file header places it on the spine or outside the "
          "patient."),
    _spec("mask_agrees_with_model", CT_MASK.key,
          "For a patient with a reference outline, once a segmentation model is installed: the model's own "
          "outline overlaps the reference well (Dice at or above the threshold set for the project). A low "
          "overlap is a warning, not a stop: either the reference outline is misplaced or mislabelled, or the "
          "model does poorly on this patient. It passes when no model is installed or when the mask is the "
          "model's own.", blocking=False),
]
RADIOMICS_ROW_CHECK_SPECS = [
    _spec("radiomics_row_complete", RADIOMICS_ROW.key,
          "The patient has exactly one row of radiomics features with every feature the settings ask for, in "
          "the agreed order, so that the patient lines up with the rest of the cohort."),
    _spec("radiomics_row_finite", RADIOMICS_ROW.key,
          "Every radiomics feature of the patient is a real number (none missing or infinite); a missing value "
          "means a feature could not be computed from this scan and outline."),
]
CT_MASK_SEG_CHECK_SPECS = [
    _spec("seg_matches_mask", CT_MASK_SEG.key,
          "The DICOM SEG, read back and placed by each frame's own position and orientation, marks exactly the "
          "voxels of the stomach mask it was made from, voxel for voxel: what a radiologist sees in the PACS "
          "viewer is what the features were measured in. Passes with the reason when the CT came in without "
          "a DICOM series (no SEG)."),
]
RADIOMICS_SR_CHECK_SPECS = [
    _spec("sr_matches_row", RADIOMICS_SR.key,
          "The DICOM SR, read back, holds every finite feature of the patient's radiomics row with exactly the "
          "row's value, and nothing else. Passes with the reason when there is no SEG (and so no SR)."),
]


def _result(name: str, passed: bool, expected: str, found: str, failure: str,
            severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR, **metadata) -> dg.AssetCheckResult:
    """`failure` (plain words naming the patient and file) is the description of a failed result;
    a passed one says what was found."""
    return dg.AssetCheckResult(check_name=name, passed=bool(passed), severity=severity,
                               description=f"Passed: {found}." if passed else failure,
                               metadata={"expected": expected, "found": found, **metadata})


def _header(path: Path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def whose(scan_key: str) -> str:
    """A scan's partition key in words: the patient id, and the timepoint unless it is the drop's only scan."""
    try:
        scan = parse_scan_key(scan_key)
    except InvalidScanKey:
        return scan_key
    return scan.patient_id if scan.timepoint is None else f"{scan.patient_id} (timepoint {scan.timepoint})"


def _patient_of(path: Path) -> str:
    # The store lays files out as <asset>/<scan key>/<file>.
    return whose(path.parent.name)


def _listed(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------- text (plain, testable without a run)


def geometry_problems(spacing: Sequence[float], size: Sequence[int]) -> list[str]:
    """What is implausible about a CT grid, per axis, in words; empty when plausible."""
    problems = []
    for axis, s, n in zip("xyzt", spacing, size):
        if not CT_SPACING_MM[0] <= s <= CT_SPACING_MM[1]:
            problems.append(f"voxel size {s:g} mm along {axis}")
        if not CT_VOXELS_PER_AXIS[0] <= n <= CT_VOXELS_PER_AXIS[1]:
            problems.append(f"{n} voxels along {axis}")
    return problems


def hu_problems(low: float, high: float, p01: float) -> list[str]:
    """Why CT values do not look like Hounsfield units, in words; empty when they do."""
    problems = []
    if p01 > CT_LOW_PERCENTILE_MAX_HU:
        problems.append(f"no air or fat: the lowest 1 % of values reach only {p01:g} HU")
    if low < CT_HU_LIMITS[0]:
        problems.append(f"values down to {low:g} HU")
    if high > CT_HU_LIMITS[1]:
        problems.append(f"values up to {high:g} HU")
    return problems


# ---------------------------------------------------------------- ct_image


def ct_image_check_results(ct_path: Path) -> list[dg.AssetCheckResult]:
    image = sitk.ReadImage(str(ct_path))
    spacing, size = image.GetSpacing(), image.GetSize()
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    p01 = float(np.percentile(values, 1))
    patient = _patient_of(ct_path)
    spacing_text = " x ".join(f"{s:g}" for s in spacing)
    size_text = " x ".join(str(n) for n in size)
    grid = geometry_problems(spacing, size)
    hu = hu_problems(low, high, p01)
    return [
        _result("ct_geometry_plausible", not grid,
                expected=f"voxel size {_mm(CT_SPACING_MM[0])}-{_mm(CT_SPACING_MM[1])} mm and "
                         f"{CT_VOXELS_PER_AXIS[0]}-{CT_VOXELS_PER_AXIS[1]} voxels along each axis",
                found=f"voxel size {spacing_text} mm, {size_text} voxels",
                failure=f"The CT of patient {patient} ({ct_path}) has an implausible geometry: {'; '.join(grid)}. "
                        "Its header is probably wrong (for example spacing in cm instead of mm).",
                spacing_mm=str(tuple(round(s, 4) for s in spacing)), size=str(size),
                min_spacing_mm=float(min(spacing)), max_spacing_mm=float(max(spacing)),
                min_voxels_per_axis=int(min(size)), max_voxels_per_axis=int(max(size))),
        _result("ct_hu_range_plausible", not hu,
                expected=f"lowest 1 % of values at or below {_mm(CT_LOW_PERCENTILE_MAX_HU)} HU, all values within "
                         f"{_mm(CT_HU_LIMITS[0])}..{_mm(CT_HU_LIMITS[1])} HU",
                found=f"lowest 1 % at {p01:g} HU, values {low:g}..{high:g} HU",
                failure=f"The CT of patient {patient} ({ct_path}) does not look like Hounsfield units: "
                        f"{'; '.join(hu)}. It may have been exported without its rescale slope and intercept, "
                        "or it is not a CT.",
                hu_min=low, hu_max=high, hu_p01=p01),
    ]


# ---------------------------------------------------------------- ct_mask


def ct_mask_check_results(mask_path: Path, ct_path: Path, volume_min_ml: float, volume_max_ml: float,
                          bone_fraction_max: float, outside_air_fraction_max: float) -> list[dg.AssetCheckResult]:
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
    is_uint8 = mask.GetPixelID() == sitk.sitkUInt8
    binary_uint8 = is_uint8 and set(labels) <= {0, 1}
    voxels = int(np.count_nonzero(values))
    volume_ml = voxels * float(np.prod(mask.GetSpacing())) / 1000.0
    patient = _patient_of(mask_path)
    pixel_type = mask.GetPixelIDTypeAsString()
    grid_problems = ([f"its {', '.join(mismatches)} differ{'s' if len(mismatches) == 1 else ''} from the CT's"]
                     if mismatches else [])
    if not is_uint8:
        grid_problems.append(f"it is stored as {pixel_type}, not 8-bit unsigned integers")
    if not set(labels) <= {0, 1}:
        grid_problems.append(f"it holds the values {labels}, not only 0 and 1")
    volume_range = f"{volume_min_ml:g}-{volume_max_ml:g} ml"
    if volume_ml < volume_min_ml:
        volume_problem = f"below the plausible minimum of {volume_min_ml:g} ml"
    else:
        volume_problem = f"above the plausible maximum of {volume_max_ml:g} ml"
    return [
        _result("mask_matches_ct_geometry", not mismatches and binary_uint8,
                expected="the CT's size, spacing, origin and direction; 8-bit values 0 and 1 only",
                found=(f"{'; '.join(grid_problems)}" if grid_problems
                       else f"same grid as the CT; {pixel_type} values {labels}"),
                failure=f"The stomach mask of patient {patient} ({mask_path}) does not fit its CT ({ct_path}): "
                        f"{'; '.join(grid_problems)}.",
                mismatched=", ".join(mismatches) or "none", pixel_type=pixel_type, labels=str(labels)),
        _result("mask_not_empty", voxels > 0,
                expected="at least 1 stomach voxel", found=f"{voxels} stomach voxel(s)",
                failure=f"The stomach mask of patient {patient} ({mask_path}) is empty: no voxel is marked as "
                        "stomach, so no radiomics features can be computed.",
                voxels=voxels),
        _result("mask_volume_plausible", volume_min_ml <= volume_ml <= volume_max_ml,
                expected=volume_range, found=f"{volume_ml:.1f} ml",
                failure=f"The stomach mask of patient {patient} ({mask_path}) measures {volume_ml:.1f} ml, "
                        f"{volume_problem} (settings radiomics.mask_volume_min_ml / mask_volume_max_ml): "
                        "the segmentation or the reference outline is probably wrong.",
                volume_ml=volume_ml, allowed_ml=f"{volume_min_ml}..{volume_max_ml}",
                volume_min_ml=float(volume_min_ml), volume_max_ml=float(volume_max_ml)),
        _content_result(mask, mask_path, ct_path, mismatches, bone_fraction_max, outside_air_fraction_max),
    ]


def _content_result(mask, mask_path: Path, ct_path: Path, mismatches: list[str], bone_fraction_max: float,
                    outside_air_fraction_max: float) -> dg.AssetCheckResult:
    patient = _patient_of(mask_path)
    expected = (f"at most {bone_fraction_max:.1%} of the voxels above {BONE_HU} HU (bone) and at most "
                f"{outside_air_fraction_max:.1%} air outside the body")
    if mismatches:  # the voxels cannot be paired with the CT's: mask_matches_ct_geometry says why
        return _result("mask_content_plausible", False, expected=expected,
                       found="not measured: the mask is not on the CT's grid",
                       failure=f"What the stomach mask of patient {patient} ({mask_path}) covers could not be "
                               f"measured: it is not on the grid of its CT ({ct_path}).")
    content = masks.mask_content(sitk.ReadImage(str(ct_path)), mask)
    bone, air = content.bone_fraction, content.outside_air_fraction
    problems = []
    if bone > bone_fraction_max:
        problems.append(f"{bone:.1%} of its voxels are as dense as bone (above {BONE_HU} HU; at most "
                        f"{bone_fraction_max:.1%} allowed)")
    if air > outside_air_fraction_max:
        problems.append(f"{air:.1%} of its voxels are air outside the body (at most "
                        f"{outside_air_fraction_max:.1%} allowed)")
    return _result(
        "mask_content_plausible", not problems, expected=expected,
        found=f"{bone:.1%} bone, {air:.1%} air outside the body, of {content.voxels} voxels",
        failure=f"The stomach mask of patient {patient} ({mask_path}) covers the wrong anatomy on its CT "
                f"({ct_path}): {'; '.join(problems)}. A stomach holds soft tissue, fluid and its own gas; the "
                "mask is probably misplaced (a wrong origin or orientation in its file header) or belongs to "
                "another scan (settings radiomics.mask_bone_fraction_max / mask_outside_air_fraction_max).",
        bone_fraction=float(bone), outside_air_fraction=float(air), bone_voxels=content.bone_voxels,
        outside_air_voxels=content.outside_air_voxels, bone_fraction_max=float(bone_fraction_max),
        outside_air_fraction_max=float(outside_air_fraction_max))


def mask_agreement_result(mask_path: Path, agreement: dict, min_dice: float) -> dg.AssetCheckResult:
    """The WARN check of a reference mask against the installed model's prediction.

    `agreement` is what ct_mask recorded: `status` "compared" (with `dice`, `model_id`,
    `reference_file`), "no model", "predicted" (the mask is the model's) or "unavailable" (`reason`).
    """
    patient = _patient_of(mask_path)
    status = agreement.get("status", "no model")
    expected = f"Dice between the model's mask and the reference mask at or above {min_dice:g}"
    warn = dg.AssetCheckSeverity.WARN
    if status == "compared":
        score, model_id, reference = float(agreement["dice"]), agreement["model_id"], agreement["reference_file"]
        return _result(
            "mask_agrees_with_model", score >= min_dice, expected=expected,
            found=f"Dice {score:.3f} with model {model_id}",
            failure=f"The reference stomach mask of patient {patient} ({reference}) and the outline predicted by "
                    f"model {model_id} overlap poorly (Dice {score:.3f}, below {min_dice:g}; setting "
                    "segmentation.agreement_min_dice). Check that the reference mask belongs to this CT and "
                    "marks the stomach; if it does, the model does poorly on this patient.",
            severity=warn, dice=score, model_id=model_id, reference_file=reference, min_dice=float(min_dice))
    if status == "unavailable":
        reason = agreement.get("reason", "")
        return _result(
            "mask_agrees_with_model", False, expected=expected, found=f"not compared: {reason}",
            failure=f"The reference stomach mask of patient {patient} ({agreement.get('reference_file', '')}) "
                    f"could not be compared with the segmentation model: {reason}.",
            severity=warn, reference_file=agreement.get("reference_file", ""))
    found = ("no segmentation model was installed when this mask was made: nothing to compare with"
             if status == "no model"
             else "the mask is the model's own prediction: nothing to compare with")
    return _result("mask_agrees_with_model", True, expected=expected, found=found, failure="", severity=warn)


# ---------------------------------------------------------------- radiomics_row


def radiomics_row_check_results(table, patient_id: str,
                                expected_features: Sequence[str]) -> list[dg.AssetCheckResult]:
    names = table.column_names
    features = names[1:]
    missing = [n for n in expected_features if n not in features]
    unexpected = [n for n in features if n not in set(expected_features)]
    not_float = [n for n in features if table.schema.field(n).type != pa.float64()]
    id_column_ok = names[:1] == [radiomics_features.PATIENT_COLUMN]
    stored_ids = table.column(radiomics_features.PATIENT_COLUMN).to_pylist() if id_column_ok else []
    complete = (table.num_rows == 1 and id_column_ok and stored_ids == [patient_id]
                and list(features) == list(expected_features) and not not_float)
    row_problems = []
    if table.num_rows != 1:
        row_problems.append(f"{table.num_rows} rows")
    if not id_column_ok:
        row_problems.append(f"first column {names[:1]} instead of {radiomics_features.PATIENT_COLUMN}")
    elif stored_ids != [patient_id]:
        row_problems.append(f"patient id {_listed([str(i) for i in stored_ids])}")
    if missing:
        row_problems.append(f"{len(missing)} feature(s) missing: {_listed(missing)}")
    if unexpected:
        row_problems.append(f"{len(unexpected)} unexpected feature(s): {_listed(unexpected)}")
    if not_float:
        row_problems.append(f"{len(not_float)} feature(s) not stored as decimal numbers: {_listed(not_float)}")
    if not complete and not row_problems:
        row_problems.append("the features are in another order than the settings produce")

    non_finite = {}
    for name in features:
        values = table.column(name).to_pylist()
        if table.num_rows != 1 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            non_finite[name] = values[0] if len(values) == 1 else f"{len(values)} values"
    shown_non_finite = _listed([f"{name} ({value})" for name, value in non_finite.items()])
    return [
        _result("radiomics_row_complete", complete,
                expected=f"1 row for patient {whose(patient_id)}: patient id, then {len(expected_features)} features "
                         "as decimal numbers in the settings' order",
                found="; ".join(row_problems) if row_problems else f"1 row, {len(features)} features",
                failure=f"The radiomics row of patient {whose(patient_id)} is incomplete: {'; '.join(row_problems)}.",
                rows=table.num_rows, features=len(features),
                expected_features=len(expected_features), missing=", ".join(missing[:20]),
                unexpected=", ".join(unexpected[:20]), not_float64=", ".join(not_float[:20])),
        _result("radiomics_row_finite", not non_finite,
                expected="every feature a finite number",
                found=(f"{len(non_finite)} of {len(features)} feature(s) not a finite number: {shown_non_finite}"
                       if non_finite else f"all {len(features)} features finite"),
                failure=f"{len(non_finite)} radiomics feature(s) of patient {whose(patient_id)} could not be computed "
                        f"(missing, NaN or infinite): {shown_non_finite}.",
                non_finite=", ".join(list(non_finite)[:20]), non_finite_count=len(non_finite)),
    ]


# ---------------------------------------------------------------- ct_mask_seg, radiomics_sr


def seg_matches_mask_result(seg_path: Path | None, mask_path: Path, absent_reason: str = "") -> dg.AssetCheckResult:
    """The SEG at `seg_path` read back onto the mask's grid against the mask (None: no SEG, and why)."""
    from gcmlm_assets.radiology.dicom_seg import SegInputError, read_seg_mask

    expected = f"the SEG marks exactly the voxels of {mask_path}"
    if seg_path is None:
        return _result("seg_matches_mask", True, expected=expected, found=f"no SEG: {absent_reason}", failure="")
    mask = sitk.ReadImage(str(mask_path))
    try:
        read_back = sitk.GetArrayFromImage(read_seg_mask(seg_path, mask)) != 0
    except SegInputError as error:
        return _result("seg_matches_mask", False, expected=expected, found=str(error),
                       failure=f"The SEG of patient {_patient_of(seg_path)} cannot be read back: {error}.")
    truth = sitk.GetArrayViewFromImage(mask) != 0
    differing = int(np.count_nonzero(read_back != truth))
    found = (f"{int(truth.sum())} voxels, all equal" if not differing
             else f"{differing} of {truth.size} voxels differ ({int(read_back.sum())} in the SEG, "
                  f"{int(truth.sum())} in the mask)")
    return _result("seg_matches_mask", not differing, expected=expected, found=found,
                   failure=f"The SEG {seg_path} of patient {_patient_of(seg_path)} does not match {mask_path}: "
                           f"{found}.", differing_voxels=differing)


def sr_matches_row_result(sr_path: Path | None, row_path: Path, absent_reason: str = "") -> dg.AssetCheckResult:
    """The SR's measurements read back against the row's finite features (None: no SR, and why)."""
    from gcmlm_assets.radiology.dicom_sr import SRInputError, read_feature_row, read_sr_measurements

    expected = f"every finite feature of {row_path} with its exact value"
    if sr_path is None:
        return _result("sr_matches_row", True, expected=expected, found=f"no SR: {absent_reason}", failure="")
    _, row, _ = read_feature_row(row_path)
    finite = {name: value for name, value in row.items() if math.isfinite(value)}
    try:
        measured = read_sr_measurements(sr_path, features=list(row))
    except SRInputError as error:
        return _result("sr_matches_row", False, expected=expected, found=str(error),
                       failure=f"The SR of patient {_patient_of(sr_path)} cannot be read back: {error}.")
    missing = [name for name in finite if name not in measured]
    extra = [name for name in measured if name not in finite]
    different = [name for name in finite if name in measured and measured[name] != finite[name]]
    problems = [f"{len(names)} {what}: {_listed(names)}" for names, what in (
        (missing, "feature(s) missing"), (extra, "measurement(s) not in the row"), (different, "value(s) differ"))
        if names]
    found = "; ".join(problems) if problems else f"{len(measured)} measurements, all equal to the row"
    return _result("sr_matches_row", not problems, expected=expected, found=found,
                   failure=f"The SR {sr_path} of patient {_patient_of(sr_path)} does not match {row_path}: {found}.",
                   measurements=len(measured))
