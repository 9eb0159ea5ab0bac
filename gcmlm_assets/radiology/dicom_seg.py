"""The gastric mask as a DICOM Segmentation (SEG) of the CT series it was made on, and back.

Plain Python (no Dagster). `mask.nii.gz` lies on the canonical LPS grid of `ct.nii.gz`, which
`ct_io.load_ct` made from the DICOM series by permuting and flipping axes only. Each SEG frame is
one source slice: its pixels are looked up in the mask through the slice's own position, orientation
and pixel spacing, so flipped, reordered and oblique series come out right. A mask that does not lie
on exactly the series' voxel lattice (the drop changed since the mask was made) is refused.
`read_seg_mask` does the reverse from the SEG's per-frame geometry, independently of highdicom's
bookkeeping, which makes the round trip a real check.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from gcmlm_assets.catalogue import CT_MASK_SEG
from gcmlm_assets.lazy import lazy
from gcmlm_assets.radiology.ct_io import visible_files, volume_suffix
from gcmlm_assets.radiology.dicom_patient import pseudonymise
from gcmlm_assets.storage import atomic_path, sha256_file

if TYPE_CHECKING:
    import numpy as np
    import pydicom
    import SimpleITK as sitk
else:  # imported on first use: the definitions import this module, not its work (gcmlm_assets/lazy.py)
    np = lazy("numpy")
    pydicom = lazy("pydicom")
    sitk = lazy("SimpleITK")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# Codes of the one segment (PS3.16 CID 7150 "Segmentation Property Categories", CID 7151 "Types").
SEGMENT_CATEGORY = ("91723000", "SCT", "Anatomical Structure")
SEGMENT_TYPE = ("69695003", "SCT", "Stomach")
SEGMENT_LABEL = "Stomach"
# The algorithm family of a predicted mask (CID 7162 "Segmentation Algorithm Families").
MODEL_FAMILY = ("123110", "DCM", "Artificial Intelligence")
ALGORITHM_TYPES = ("MANUAL", "SEMIAUTOMATIC", "AUTOMATIC")
MANUFACTURER = "gcmlm_assets"
MODEL_NAME = "gcmlm_assets gastric mask export"
SEG_SERIES_NUMBER = 9701
# A frame's pixels must fall this close (in voxels) to the mask's voxel centres: DS strings and
# NIfTI's float32 geometry round far below it, a different grid misses by a sizeable fraction.
LATTICE_TOLERANCE = 0.05
# DICOM LO (long string) values hold at most 64 characters.
LO_MAX = 64


class SegInputError(ValueError):
    """A CT series or mask a SEG cannot be made from; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class MaskOrigin:
    """Who made the mask, as the SEG's segment records it."""

    algorithm_type: str  # one of ALGORITHM_TYPES
    description: str  # what the series is, in words (Series/Content Description)
    algorithm_name: str = ""  # required unless MANUAL
    algorithm_version: str = ""
    parameters: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type must be one of {ALGORITHM_TYPES}, got {self.algorithm_type!r}")
        if self.algorithm_type != "MANUAL" and not (self.algorithm_name and self.algorithm_version):
            raise ValueError(f"a {self.algorithm_type} mask needs an algorithm name and version")


def reference_origin(reference_file: str | Path, algorithm_type: str = "MANUAL", algorithm_name: str = "",
                     algorithm_version: str = "") -> MaskOrigin:
    """A reference mask from the landing drop (`ct_label/`): MANUAL unless the site says how it was made."""
    parameters = (("reference_file", Path(reference_file).name),)
    return MaskOrigin(algorithm_type, f"Gastric mask (reference {Path(reference_file).name})"[:LO_MAX],
                      algorithm_name, algorithm_version, parameters)


def model_origin(model_id: str) -> MaskOrigin:
    """A mask the installed nnU-Net model predicted; `model_id` is `GastricSegmenter.model_id`
    (`<dataset>__<trainer>__<plans>__<configuration>__fold_<folds>__<checkpoint sha256[:12]>`)."""
    from importlib import metadata

    dataset, checkpoint = model_id.split("__")[0], model_id.rsplit("__", 1)[-1]
    parameters = [("model_id", model_id)]
    try:
        parameters.append(("nnunetv2", metadata.version("nnunetv2")))
    except metadata.PackageNotFoundError:
        pass
    return MaskOrigin("AUTOMATIC", f"Gastric mask (nnU-Net {dataset})"[:LO_MAX],
                      f"nnU-Net {dataset}"[:LO_MAX], checkpoint[:LO_MAX], tuple(parameters))


# ---------------------------------------------------------------- the source series


def seg_absent_reason(ct_folder: Path) -> str | None:
    """Why the CT in `ct_folder` gets no SEG (a sentence for the UI), or None when it can have one."""
    files = visible_files(Path(ct_folder))
    volumes = [p for p in files if volume_suffix(p)]
    if volumes:
        kind = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".mha": "MHA"}[volume_suffix(volumes[0])]
        return (f"the CT came in as a {kind} file ({volumes[0].name}), not as a DICOM series: a DICOM SEG "
                "must reference the study, series and instances it segments, and this CT has none")
    if not files:
        return f"{ct_folder}: no CT files"
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception as error:  # noqa: BLE001 - any parse failure: name the file
        return f"{files[0].name} cannot be read as DICOM ({error})"
    missing = [name for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID")
               if not header.get(name)]
    if missing:
        return (f"the DICOM series lacks {', '.join(missing)} ({files[0].name}): a SEG cannot be placed in its "
                "study and frame of reference")
    return None


def read_source_series(ct_folder: Path) -> list[pydicom.Dataset]:
    """The headers (no pixels) of the CT series in `ct_folder`, sorted along the slice normal as
    `ct_io` sorts them; refused when they are not one series in one frame of reference."""
    ct_folder = Path(ct_folder)
    files = visible_files(ct_folder)
    if not files or any(volume_suffix(p) for p in files):
        raise SegInputError(f"{ct_folder}: {seg_absent_reason(ct_folder) or 'no DICOM series'}")
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:  # noqa: BLE001 - any parse failure: name the file
            raise SegInputError(f"{path}: not a readable DICOM file ({error})") from error
    for key in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(h.get(key, "")) for h in headers}
        if len(values) != 1 or "" in values:
            raise SegInputError(f"{ct_folder}: the DICOM files do not share one {key} ({sorted(values)[:3]})")
    normal = np.cross(*_orientation(headers[0], files[0]))
    along = [float(np.dot(_position(h, p), normal)) for h, p in zip(headers, files, strict=True)]
    return [headers[i] for i in np.argsort(along, kind="stable")]


def _orientation(header: pydicom.Dataset, where) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(header.get("ImageOrientationPatient") or [], dtype=float)
    if values.size != 6:
        raise SegInputError(f"{where}: Image Orientation (Patient) (0020,0037) missing or malformed")
    return values[:3], values[3:]


def _position(header: pydicom.Dataset, where) -> np.ndarray:
    values = np.asarray(header.get("ImagePositionPatient") or [], dtype=float)
    if values.size != 3:
        raise SegInputError(f"{where}: Image Position (Patient) (0020,0032) missing or malformed")
    return values


def _pixel_spacing(values, where) -> tuple[float, float]:
    spacing = np.asarray(values or [], dtype=float)
    if spacing.size != 2:
        raise SegInputError(f"{where}: Pixel Spacing (0028,0030) missing or malformed")
    return float(spacing[0]), float(spacing[1])


# ---------------------------------------------------------------- frames <-> canonical voxels


def frame_voxels(position: np.ndarray, row_cosine: np.ndarray, column_cosine: np.ndarray,
                 pixel_spacing: tuple[float, float], rows: int, columns: int, grid: sitk.Image,
                 where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (z, y, x) array indices in `grid` of every pixel of a frame (each shaped rows x columns).

    The frame's first pixel sits at `position`; along a row (increasing column) the pixels step
    `pixel_spacing[1]` along `row_cosine`, down a column `pixel_spacing[0]` along `column_cosine`
    (DICOM's conventions). Refused unless every pixel lands on a voxel centre of `grid`.
    """
    to_index = np.linalg.inv(np.asarray(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing()))
    start = to_index @ (np.asarray(position, dtype=float) - np.asarray(grid.GetOrigin()))
    step_column = to_index @ (np.asarray(row_cosine, dtype=float) * pixel_spacing[1])
    step_row = to_index @ (np.asarray(column_cosine, dtype=float) * pixel_spacing[0])
    corners = [start + a * (columns - 1) * step_column + b * (rows - 1) * step_row for a in (0, 1) for b in (0, 1)]
    units = [np.round(step) for step in (step_column, step_row)]
    off_lattice = max(float(np.abs(c - np.round(c)).max()) for c in corners)
    if (off_lattice > LATTICE_TOLERANCE or any(np.abs(u).sum() != 1 for u in units)
            or np.abs(units[0]).argmax() == np.abs(units[1]).argmax()):
        raise SegInputError(f"{where}: the slice's pixels do not fall on the mask's voxel grid (off by up to "
                            f"{off_lattice:.3f} voxel, pixel steps {step_column.round(3).tolist()} and "
                            f"{step_row.round(3).tolist()} in voxels); the CT changed since the mask was made")
    size = np.asarray(grid.GetSize())
    first = np.round(start).astype(int)
    for corner in corners:
        index = np.round(corner).astype(int)
        if (index < 0).any() or (index >= size).any():
            raise SegInputError(f"{where}: the slice reaches voxel {index.tolist()}, outside the mask grid of size "
                                f"{size.tolist()}; the CT changed since the mask was made")
    column, row = np.arange(columns), np.arange(rows)
    index = (first[None, None, :] + column[None, :, None] * units[0].astype(int)[None, None, :]
             + row[:, None, None] * units[1].astype(int)[None, None, :])
    return index[..., 2], index[..., 1], index[..., 0]


def mask_frames(headers: list[pydicom.Dataset], mask: sitk.Image, mask_path: Path) -> np.ndarray:
    """The mask as one uint8 frame per source slice (frames x rows x columns, in `headers`' order)."""
    values = sitk.GetArrayViewFromImage(mask)
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    frames = np.zeros((len(headers), rows, columns), dtype=np.uint8)
    slices = set()
    for k, header in enumerate(headers):
        where = f"{mask_path} on slice {header.get('SOPInstanceUID', k)}"
        if (int(header.Rows), int(header.Columns)) != (rows, columns):
            raise SegInputError(f"{where}: slice size differs from the series' {rows} x {columns}")
        z, y, x = frame_voxels(_position(header, where), *_orientation(header, where),
                               _pixel_spacing(header.get("PixelSpacing"), where), rows, columns, mask, where)
        slices.add((int(z[0, 0]), int(y[0, 0]), int(x[0, 0])))
        frames[k] = values[z, y, x] != 0
    if frames.size != values.size or len(slices) != len(headers):
        raise SegInputError(f"{mask_path}: grid of size {mask.GetSize()} is not the grid of the {len(headers)} "
                            f"slices of {rows} x {columns} it was made from")
    if int(frames.sum(dtype=np.int64)) != int(np.count_nonzero(values)):
        raise SegInputError(f"{mask_path}: not every mask voxel maps onto a source slice")
    return frames


# ---------------------------------------------------------------- writing


def _code(triple):
    from pydicom.sr.coding import Code

    return Code(*triple)


def derived_uid(*parts: str) -> str:
    """A UID derived from `parts`: the same inputs give the same instance identity. A name-based
    (version 5) UUID under the 2.25 root (PS3.5 B.2), so no organisation root is needed."""
    import uuid

    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(('gcmlm_assets', *parts))).int}"


def _software_version() -> str:
    from importlib import metadata

    versions = []
    for package in ("gcmlm_assets", "highdicom"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return "; ".join(versions) or "unknown"


def build_seg(ct_folder: Path, mask_path: Path, origin: MaskOrigin, patient_id: str):
    """The highdicom Segmentation of the mask at `mask_path` over the CT series in `ct_folder`,
    whose patient is the platform's `patient_id` (dicom_patient.py: no identity of the source's)."""
    import highdicom as hd

    headers = read_source_series(ct_folder)
    mask = sitk.ReadImage(str(mask_path))
    frames = mask_frames(headers, mask, Path(mask_path))
    if not frames.any():
        raise SegInputError(f"{mask_path}: mask is empty; a SEG needs at least one segmented voxel")
    algorithm = None
    if origin.algorithm_type != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(
            name=origin.algorithm_name, family=_code(MODEL_FAMILY), version=origin.algorithm_version,
            parameters=dict(origin.parameters) or None)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL, segmented_property_category=_code(SEGMENT_CATEGORY),
        segmented_property_type=_code(SEGMENT_TYPE), algorithm_type=origin.algorithm_type,
        algorithm_identification=algorithm)
    # The code version too: a new one rewrites stored SEGs, and a rewritten SEG is a new instance.
    identity = (str(headers[0].SeriesInstanceUID), sha256_file(mask_path), repr(origin), CT_MASK_SEG.code_version)
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=frames, segmentation_type="BINARY", segment_descriptions=[segment],
        series_instance_uid=derived_uid("seg series", *identity), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid("seg instance", *identity), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=_software_version(), device_serial_number="1",
        content_description=origin.description, content_label="GASTRIC_MASK",
        series_description=origin.description)
    # highdicom draws the dimension organization's UID at random: derived from the inputs instead,
    # like the other UIDs, so the same mask gives the same object but for its creation times.
    dimensions = derived_uid("seg dimensions", *identity)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimensions
    pseudonymise(seg, patient_id)
    return seg


def write_seg(ct_folder: Path, mask_path: Path, seg_path: Path, origin: MaskOrigin, patient_id: str) -> dict:
    """Write the mask as a DICOM SEG of the CT series in `ct_folder` to `seg_path`, atomically, as
    the SEG of the platform's `patient_id`; return what the asset shows (UIDs, frames, segment, algorithm)."""
    seg = build_seg(ct_folder, mask_path, origin, patient_id)
    with atomic_path(seg_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    referenced = seg.ReferencedSeriesSequence[0]
    return {
        "seg_path": str(seg_path),
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "study_instance_uid": str(seg.StudyInstanceUID),
        "referenced_series_uid": str(referenced.SeriesInstanceUID),
        "referenced_instances": len(referenced.ReferencedInstanceSequence),
        "frames": int(seg.NumberOfFrames),
        "segment": f"{SEGMENT_LABEL} ({SEGMENT_TYPE[1]} {SEGMENT_TYPE[0]})",
        "algorithm_type": origin.algorithm_type,
        "algorithm": (f"{origin.algorithm_name} {origin.algorithm_version}" if origin.algorithm_name
                      else origin.description),
    }


# ---------------------------------------------------------------- reading back


def _frame_item(dataset: pydicom.Dataset, frame: int, sequence: str):
    """A functional group's item for one frame: per-frame when there, else shared."""
    per_frame = dataset.PerFrameFunctionalGroupsSequence[frame]
    if sequence in per_frame:
        return per_frame[sequence][0]
    return dataset.SharedFunctionalGroupsSequence[0][sequence][0]


def read_seg_mask(seg_path: Path, like: sitk.Image) -> sitk.Image:
    """The SEG's one binary segment as a uint8 mask on `like`'s grid (the canonical `ct.nii.gz` or
    `mask.nii.gz`), placed by each frame's own position, orientation and pixel spacing."""
    seg_path = Path(seg_path)
    try:
        dataset = pydicom.dcmread(seg_path)
    except Exception as error:  # noqa: BLE001 - any parse failure: name the file
        raise SegInputError(f"{seg_path}: not a readable DICOM file ({error})") from error
    if dataset.get("SOPClassUID") != SEGMENTATION_STORAGE or dataset.get("SegmentationType") != "BINARY":
        raise SegInputError(f"{seg_path}: not a binary DICOM Segmentation ({dataset.get('SOPClassUID')}, "
                            f"{dataset.get('SegmentationType')})")
    if len(dataset.SegmentSequence) != 1:
        raise SegInputError(f"{seg_path}: holds {len(dataset.SegmentSequence)} segments, expected one")
    rows, columns, count = int(dataset.Rows), int(dataset.Columns), int(dataset.NumberOfFrames)
    pixels = dataset.pixel_array.reshape(count, rows, columns)
    values = np.zeros(like.GetSize()[::-1], dtype=np.uint8)
    for frame in range(count):
        where = f"{seg_path} frame {frame + 1}"
        orientation = _orientation(_frame_item(dataset, frame, "PlaneOrientationSequence"), where)
        position = _position(_frame_item(dataset, frame, "PlanePositionSequence"), where)
        spacing = _pixel_spacing(_frame_item(dataset, frame, "PixelMeasuresSequence").get("PixelSpacing"), where)
        z, y, x = frame_voxels(position, *orientation, spacing, rows, columns, like, where)
        values[z, y, x] |= pixels[frame].astype(np.uint8)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(like)
    return image


def frame_source_instances(seg_path: Path) -> list[str]:
    """Per frame, the SOP Instance UID of the source slice it was derived from."""
    dataset = pydicom.dcmread(seg_path, stop_before_pixels=True)
    return [str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for item in dataset.PerFrameFunctionalGroupsSequence]
