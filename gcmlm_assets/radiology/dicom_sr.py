"""The radiomics row as a DICOM TID 1500 Measurement Report (Comprehensive 3D SR) of the SEG's segment.

Plain Python (no Dagster). Every feature of the `radiomics_row` parquet becomes one measurement of
the volumetric ROI "the stomach segment of the gastric-mask SEG". A feature's concept name is a
standard code where DICOM has one (PS3.16 CID 218 "Quantitative Image Features": the IBSI codes
for shape and texture, and "Attenuation Coefficient" with a CID 7464 derivation such as Mean for
the unfiltered CT's first-order statistics); otherwise a code of the private scheme `99PYRADIOMICS`
whose meaning is the PyRadiomics feature name (its value: 16 hex digits of the name's SHA-256).
Values are stored exactly: the NUM item's (0040,A161) Floating Point Value (float64) beside its
decimal string of at most 16 characters. The PyRadiomics version and extraction settings are the
group's algorithm identification.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gcmlm_assets.catalogue import RADIOMICS_SR
from gcmlm_assets.lazy import lazy
from gcmlm_assets.radiology.dicom_patient import pseudonymise
from gcmlm_assets.radiology.dicom_seg import MANUFACTURER, SEGMENT_TYPE, derived_uid
from gcmlm_assets.storage import atomic_path, sha256_file

if TYPE_CHECKING:
    import pydicom
else:  # imported on first use: the definitions import this module, not its work (gcmlm_assets/lazy.py)
    pydicom = lazy("pydicom")

PRIVATE_SCHEME = "99PYRADIOMICS"
PRIVATE_SCHEME_NAME = "PyRadiomics feature names (gcmlm_assets private coding scheme)"
SR_SERIES_NUMBER = 9702
PATIENT_COLUMN = "patient_id"
ORIGINAL_PREFIX = "original_"
ATTENUATION = ("112031", "DCM", "Attenuation Coefficient")
PROCEDURE = ("25045-6", "LN", "CT unspecified body region")  # CID 100

# UCUM units (CID 7181 where listed there).
NO_UNITS = ("1", "UCUM", "no units")
MM = ("mm", "UCUM", "millimeter")
MM2 = ("mm2", "UCUM", "square millimeter")
MM3 = ("mm3", "UCUM", "cubic millimeter")
PER_MM = ("/mm", "UCUM", "per millimeter")
HU = ("[hnsf'U]", "UCUM", "Hounsfield unit")
HU2 = ("[hnsf'U]2", "UCUM", "square Hounsfield unit")
HU2_MM3 = ("[hnsf'U]2.mm3", "UCUM", "square Hounsfield unit times cubic millimeter")
ARBITRARY = ("[arb'U]", "UCUM", "arbitrary unit")  # intensities of a filtered CT are not HU

# Shape features: the IBSI concept (pydicom's keyword in its IBSI table) and the unit.
SHAPE = {
    "Elongation": ("Elongation", NO_UNITS), "Flatness": ("Flatness", NO_UNITS),
    "LeastAxisLength": ("LeastAxisIn3DLength", MM), "MajorAxisLength": ("MajorAxisIn3DLength", MM),
    "MinorAxisLength": ("MinorAxisIn3DLength", MM), "Maximum3DDiameter": ("Maximum3DDiameterOfAMesh", MM),
    "MeshVolume": ("VolumeOfMesh", MM3), "VoxelVolume": ("VolumeFromVoxelSummation", MM3),
    "SurfaceArea": ("SurfaceAreaOfMesh", MM2), "SurfaceVolumeRatio": ("SurfaceToVolumeRatio", PER_MM),
    "Sphericity": ("Sphericity", NO_UNITS),
    "Maximum2DDiameterColumn": (None, MM), "Maximum2DDiameterRow": (None, MM), "Maximum2DDiameterSlice": (None, MM),
}
# First-order statistics of the unfiltered CT: Attenuation Coefficient with a CID 7464 derivation
# (pydicom scheme, keyword), else private; and the unit. Energy, TotalEnergy and RootMeanSquared
# include PyRadiomics' voxelArrayShift, so they are not plain statistics of the HU values.
FIRST_ORDER = {
    "Mean": (("SCT", "Mean"), HU), "Median": (("SCT", "Median"), HU), "Minimum": (("SCT", "Minimum"), HU),
    "Maximum": (("SCT", "Maximum"), HU), "Variance": (("UMLS", "Variance"), HU2),
    "Skewness": (("DCM", "Skewness"), NO_UNITS), "Kurtosis": (("DCM", "Kurtosis"), NO_UNITS),
    "10Percentile": (None, HU), "90Percentile": (None, HU), "InterquartileRange": (None, HU),
    "Range": (None, HU), "MeanAbsoluteDeviation": (None, HU), "RobustMeanAbsoluteDeviation": (None, HU),
    "RootMeanSquared": (None, HU), "Energy": (None, HU2), "TotalEnergy": (None, HU2_MM3),
}
# Histogram features of the first-order class, computed on the binned intensities: IBSI codes.
FIRST_ORDER_HISTOGRAM = {"Entropy": "IntensityHistogramEntropy", "Uniformity": "IntensityHistogramUniformity"}
# Texture classes (dimensionless): PyRadiomics feature -> IBSI keyword (None: no IBSI feature).
TEXTURE = {
    "glcm": {
        "Autocorrelation": "AutocorrelationOfGLCM", "ClusterProminence": "ClusterProminenceOfGLCM",
        "ClusterShade": "ClusterShadeOfGLCM", "ClusterTendency": "ClusterTendencyOfGLCM",
        "Contrast": "ContrastOfGLCM", "Correlation": "CorrelationOfGLCM",
        "DifferenceAverage": "DifferenceAverageOfGLCM", "DifferenceEntropy": "DifferenceEntropyOfGLCM",
        "DifferenceVariance": "DifferenceVarianceOfGLCM", "Id": "InverseDifferenceOfGLCM",
        "Idm": "InverseDifferenceMomentOfGLCM", "Idmn": "NormalizedInverseDifferenceMomentOfGLCM",
        "Idn": "NormalizedInverseDifferenceOfGLCM", "Imc1": "FirstMeasureOfInformationCorrelationOfGLCM",
        "Imc2": "SecondMeasureOfInformationCorrelationOfGLCM", "InverseVariance": "InverseVarianceOfGLCM",
        "JointAverage": "JointAverageOfGLCM", "JointEnergy": "AngularSecondMomentOfGLCM",
        "JointEntropy": "JointEntropyOfGLCM", "MCC": None, "MaximumProbability": "JointMaximumOfGLCM",
        "SumAverage": "SumAverageOfGLCM", "SumEntropy": "SumEntropyOfGLCM", "SumSquares": "JointVarianceOfGLCM",
    },
    "glrlm": {
        "GrayLevelNonUniformity": "GrayLevelNonuniformityInRuns",
        "GrayLevelNonUniformityNormalized": "NormalizedGrayLevelNonuniformityInRuns",
        "GrayLevelVariance": "GrayLevelVarianceInRuns", "HighGrayLevelRunEmphasis": "HighGrayLevelRunEmphasis",
        "LongRunEmphasis": "LongRunsEmphasis", "LongRunHighGrayLevelEmphasis": "LongRunHighGrayLevelEmphasis",
        "LongRunLowGrayLevelEmphasis": "LongRunLowGrayLevelEmphasis",
        "LowGrayLevelRunEmphasis": "LowGrayLevelRunEmphasis", "RunEntropy": "RunEntropy",
        "RunLengthNonUniformity": "RunLengthNonuniformity",
        "RunLengthNonUniformityNormalized": "NormalizedRunLengthNonuniformity", "RunPercentage": "RunPercentage",
        "RunVariance": "RunLengthVariance", "ShortRunEmphasis": "ShortRunsEmphasis",
        "ShortRunHighGrayLevelEmphasis": "ShortRunHighGrayLevelEmphasis",
        "ShortRunLowGrayLevelEmphasis": "ShortRunLowGrayLevelEmphasis",
    },
    "glszm": {
        "GrayLevelNonUniformity": "GrayLevelNonuniformityOfSizeZoneCounts",
        "GrayLevelNonUniformityNormalized": "NormalizedGrayLevelNonuniformityOfSizeZoneCounts",
        "GrayLevelVariance": "GrayLevelVarianceInSizeZones", "HighGrayLevelZoneEmphasis": "HighGrayLevelZoneEmphasis",
        "LargeAreaEmphasis": "LargeZoneEmphasis", "LargeAreaHighGrayLevelEmphasis": "LargeZoneHighGrayLevelEmphasis",
        "LargeAreaLowGrayLevelEmphasis": "LargeZoneLowGrayLevelEmphasis",
        "LowGrayLevelZoneEmphasis": "LowGrayLevelZoneEmphasis", "SizeZoneNonUniformity": "ZoneSizeNonuniformity",
        "SizeZoneNonUniformityNormalized": "NormalizedZoneSizeNonuniformity", "SmallAreaEmphasis": "SmallZoneEmphasis",
        "SmallAreaHighGrayLevelEmphasis": "SmallZoneHighGrayLevelEmphasis",
        "SmallAreaLowGrayLevelEmphasis": "SmallZoneLowGrayLevelEmphasis", "ZoneEntropy": "ZoneSizeEntropy",
        "ZonePercentage": "SizeZonePercentage", "ZoneVariance": "ZoneSizeVariance",
    },
    # PyRadiomics' GLDM is IBSI's neighbouring grey level dependence matrix (NGLDM).
    "gldm": {
        "DependenceEntropy": "DependenceCountEntropy", "DependenceNonUniformity": "DependenceCountNonUniformity",
        "DependenceNonUniformityNormalized": "DependenceCountNonUniformityNormalized",
        "DependenceVariance": "DependenceCountVariance", "GrayLevelNonUniformity": "GreyLevelNonUniformityOfNGLDM",
        "GrayLevelVariance": "GreyLevelVarianceOfNGLDM", "HighGrayLevelEmphasis": "HighGreyLevelCountEmphasis",
        "LargeDependenceEmphasis": "HighDependenceEmphasis",
        "LargeDependenceHighGrayLevelEmphasis": "HighDependenceHighGreyLevelEmphasis",
        "LargeDependenceLowGrayLevelEmphasis": "HighDependenceLowGreyLevelEmphasis",
        "LowGrayLevelEmphasis": "LowGreyLevelCountEmphasis", "SmallDependenceEmphasis": "LowDependenceEmphasis",
        "SmallDependenceHighGrayLevelEmphasis": "LowDependenceHighGreyLevelEmphasis",
        "SmallDependenceLowGrayLevelEmphasis": "LowDependenceLowGreyLevelEmphasis",
    },
    "ngtdm": {"Busyness": "BusynessOfNGTDM", "Coarseness": "CoarsenessOfNGTDM", "Complexity": "ComplexityOfNGTDM",
              "Contrast": "ContrastOfNGTDM", "Strength": "StrengthOfNGTDM"},
}


class SRInputError(ValueError):
    """A radiomics row or SEG an SR cannot be made from; the message names the file and the problem."""


def _standard(scheme: str, keyword: str) -> tuple[str, str, str]:
    """(value, scheme, meaning) of a concept in pydicom's copy of the DICOM code tables."""
    from pydicom.sr.codedict import codes

    code = getattr(getattr(codes, scheme), keyword)
    return code.value, code.scheme_designator, code.meaning


def private_code_value(feature: str) -> str:
    """The private code of a feature: 16 hex digits of its name's SHA-256. A Code Value holds 16
    characters (SH); longer ones go to Long Code Value, which highdicom 0.28 cannot read back."""
    import hashlib

    return hashlib.sha256(feature.encode()).hexdigest()[:16]


def _private(feature: str) -> tuple[str, str, str]:
    if len(feature) > 64:  # Code Meaning (LO) holds the name, so it must fit
        raise SRInputError(f"feature name {feature!r} is longer than a Code Meaning's 64 characters")
    return private_code_value(feature), PRIVATE_SCHEME, feature


def feature_concept(feature: str) -> tuple[tuple[str, str, str], tuple[str, str, str] | None, tuple[str, str, str]]:
    """(concept name, derivation or None, unit) of a PyRadiomics feature `<image type>_<class>_<name>`."""
    image_type, _, rest = feature.partition("_")
    feature_class, _, name = rest.partition("_")
    original = image_type + "_" == ORIGINAL_PREFIX
    if feature_class == "shape":
        keyword, unit = SHAPE.get(name, (None, NO_UNITS))
        return (_standard("IBSI", keyword) if keyword and original else _private(feature)), None, unit
    if feature_class == "firstorder":
        if name in FIRST_ORDER_HISTOGRAM:
            return (_standard("IBSI", FIRST_ORDER_HISTOGRAM[name]) if original else _private(feature)), None, NO_UNITS
        derivation, unit = FIRST_ORDER.get(name, (None, NO_UNITS))
        if not original:
            return _private(feature), None, (unit if unit == NO_UNITS else ARBITRARY)
        if derivation is not None:
            return ATTENUATION, _standard(*derivation), unit
        return _private(feature), None, unit
    keyword = TEXTURE.get(feature_class, {}).get(name)
    return (_standard("IBSI", keyword) if keyword and original else _private(feature)), None, NO_UNITS


def _concept_key(name: tuple, derivation: tuple | None) -> tuple:
    return (name[0], name[1], derivation[0] if derivation else "", derivation[1] if derivation else "")


# ---------------------------------------------------------------- the row


def read_feature_row(row_path: Path) -> tuple[str, dict[str, float], dict[str, str]]:
    """(patient id, features in column order, schema metadata) of a radiomics_row parquet."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(row_path)
    except Exception as error:  # noqa: BLE001 - any read failure: name the file
        raise SRInputError(f"{row_path}: not a readable parquet file ({error})") from error
    if table.num_rows != 1 or PATIENT_COLUMN not in table.column_names:
        raise SRInputError(f"{row_path}: expected one row with a {PATIENT_COLUMN} column, found {table.num_rows} "
                           f"row(s) and columns {table.column_names[:3]}...")
    row = table.to_pylist()[0]
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return str(row.pop(PATIENT_COLUMN)), {k: float(v) for k, v in row.items()}, metadata


# ---------------------------------------------------------------- building and writing


def build_sr(seg_path: Path, row_path: Path, params: Mapping, patient_id: str, row_id: str | None = None):
    """The TID 1500 Comprehensive 3D SR of the row at `row_path`, measured in the SEG at `seg_path`,
    whose patient is the platform's `patient_id` (dicom_patient.py); `params` are the PyRadiomics
    settings the row was extracted with; `row_id` is the id the row holds (its scan's partition key,
    default `patient_id`). Returns (SR, names of the features left out as not finite)."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from gcmlm_assets.radiology.features import settings_hash

    row_patient, row, metadata = read_feature_row(row_path)
    expected = patient_id if row_id is None else row_id
    if row_patient != expected:
        raise SRInputError(f"{row_path}: the row is patient {row_patient}'s, not {expected}'s")
    version = metadata.get("pyradiomics_version")
    if not version:
        raise SRInputError(f"{row_path}: the row does not record its pyradiomics_version")
    seg = hd.seg.segread(seg_path)
    settings = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    algorithm = hd.sr.AlgorithmIdentification(
        name="PyRadiomics", version=version,
        parameters=[f"settings={settings}", f"settings_sha256={settings_hash(params)}",
                    f"params={metadata.get('params', '')}"])
    measurements, skipped, seen = [], [], {}
    for feature, value in row.items():
        if not math.isfinite(value):
            skipped.append(feature)  # a NUM item holds numbers only; the row's checks flag these
            continue
        name, derivation, unit = feature_concept(feature)
        key = _concept_key(name, derivation)
        if key in seen:
            raise SRInputError(f"{row_path}: features {seen[key]} and {feature} map to the same concept {key}")
        seen[key] = feature
        measurements.append(hd.sr.Measurement(
            name=Code(*name), value=value, unit=Code(*unit),
            derivation=Code(*derivation) if derivation else None))
    stomach = Code(*SEGMENT_TYPE)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("sr tracking", str(seg.SOPInstanceUID)),
                                                     identifier="Stomach"),
        # Built by hand: highdicom 0.28's ReferencedSegment.from_segmentation looks for the segment of
        # each frame per frame, where a one-segment SEG keeps it in the shared functional groups.
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(
                str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))),
        finding_type=stomach, finding_sites=[hd.sr.FindingSite(stomach)], algorithm_id=algorithm,
        measurements=measurements)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", "radiomics"), name=f"PyRadiomics {version}"[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=None,
                                                     observer_device_context=observer),
        procedure_reported=Code(*PROCEDURE), imaging_measurements=[group])
    identity = (str(seg.SOPInstanceUID), sha256_file(row_path), settings, RADIOMICS_SR.code_version)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg], content=report, series_instance_uid=derived_uid("sr series", *identity),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=derived_uid("sr instance", *identity), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description="Radiomics of the gastric mask",
        coding_schemes=[CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
                                                       responsible_organization=MANUFACTURER)])
    pseudonymise(sr, patient_id)  # highdicom copies the patient of the SEG (the evidence)
    return sr, skipped


def write_sr(seg_path: Path, row_path: Path, sr_path: Path, params: Mapping, patient_id: str,
             row_id: str | None = None) -> dict:
    """Write the radiomics row at `row_path` (holding `row_id`, see build_sr) as a TID 1500 SR
    referencing the SEG at `seg_path` to `sr_path`, atomically, as the SR of the platform's
    `patient_id`; return what the asset shows."""
    sr, skipped = build_sr(seg_path, row_path, params, patient_id, row_id)
    with atomic_path(sr_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    measured = read_sr_measurements(sr_path)
    standard = sum(1 for feature in measured if feature_concept(feature)[0][1] != PRIVATE_SCHEME)
    return {
        "sr_path": str(sr_path),
        "patient_id": patient_id,
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "series_instance_uid": str(sr.SeriesInstanceUID),
        "referenced_seg_uid": str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID),
        "measurements": len(measured),
        "standard_codes": standard,
        "private_codes": len(measured) - standard,
        "features_not_finite": ", ".join(skipped),
    }


# ---------------------------------------------------------------- reading back


def _concept_index(features) -> dict[tuple, str]:
    return {_concept_key(*feature_concept(feature)[:2]): feature for feature in features}


def read_sr_measurements(sr_path: Path, features=None) -> dict[str, float]:
    """The SR's measurements as PyRadiomics feature name -> value. Standard codes are turned back
    into names through the same table (`features`: the candidate names; by default those of the
    default params, extended by every private code found)."""
    import highdicom as hd

    sr = hd.sr.srread(sr_path)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    items = group.get_measurements()
    if features is None:
        features = _candidate_features(items)
    index = _concept_index(features)
    values = {}
    for item in items:
        name = (item.name.value, item.name.scheme_designator)
        derivation = item.derivation
        key = (*name, derivation.value if derivation else "", derivation.scheme_designator if derivation else "")
        if key not in index:
            raise SRInputError(f"{sr_path}: measurement {item.name.meaning} ({key}) is no known PyRadiomics feature")
        values[index[key]] = float(item.value)
    return values


def _candidate_features(items) -> list[str]:
    """Every PyRadiomics name of the 'original' image type this module codes, plus the private ones."""
    names = [f"{ORIGINAL_PREFIX}shape_{n}" for n in SHAPE]
    names += [f"{ORIGINAL_PREFIX}firstorder_{n}" for n in (*FIRST_ORDER, *FIRST_ORDER_HISTOGRAM)]
    names += [f"{ORIGINAL_PREFIX}{c}_{n}" for c, table in TEXTURE.items() for n in table]
    names += [item.name.meaning for item in items if item.name.scheme_designator == PRIVATE_SCHEME]
    return list(dict.fromkeys(names))


def referenced_seg_uid(sr_path: Path) -> str:
    """The SOP Instance UID of the SEG whose segment the SR measures."""
    import highdicom as hd

    (group,) = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    return str(group.referenced_segment.referenced_sop_instance_uid)
