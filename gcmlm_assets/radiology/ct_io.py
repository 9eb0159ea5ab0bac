"""Read one CT from a landing folder, canonicalise its orientation, summarise it, picture it.

Plain Python (no Dagster). A folder holds either one DICOM series or exactly one
volume file (`.nii`, `.nii.gz`, `.nrrd`, `.mha`). Everything that would make the
volume geometrically wrong (missing slices, uneven or sheared slice positions, a
single slice) is refused with a `CTInputError` that names the folder or file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from gcmlm_assets.lazy import lazy
from gcmlm_assets.radiology import ct_voxels
from gcmlm_assets.storage import atomic_path

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk
else:  # imported on first use: the definitions import this module, not its work (gcmlm_assets/lazy.py)
    np = lazy("numpy")
    sitk = lazy("SimpleITK")

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_KIND_OF_SUFFIX = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha"}
CANONICAL_ORIENTATION = "LPS"  # what ITK calls an identity direction matrix

# Slice gaps may differ from the median gap by this fraction before a series is
# refused: scanners round positions to ~1e-3 mm, far below 1 % of any CT spacing,
# while one missing slice doubles a gap.
SLICE_GAP_TOLERANCE = 0.01
# A step between slices that leaves the slice normal by more than this (mm per mm)
# means a sheared stack (gantry tilt), which ITK's series reader would misplace.
SHEAR_TOLERANCE = 1e-3

_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_MODALITY = "0008|0060"


class CTInputError(ValueError):
    """A CT drop that cannot be turned into a trustworthy volume; the message names file and problem."""


@dataclasses.dataclass(frozen=True)
class CTSource:
    """Where a volume came from."""

    kind: str  # "dicom" | "nifti" | "nrrd" | "mha"
    files: tuple[Path, ...]
    folder: Path
    original_orientation: str

    def describe(self) -> str:
        if self.kind == "dicom":
            return f"DICOM series of {len(self.files)} files in {self.folder}"
        return str(self.files[0])


@dataclasses.dataclass(frozen=True)
class CTSummary:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    orientation: str
    original_orientation: str
    oblique: bool
    pixel_type: str
    hu_min: float
    hu_max: float
    hu_p01: float
    hu_p50: float
    hu_p99: float
    source_kind: str
    source_files: int

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CTSummary:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for name in ("size", "spacing", "origin", "direction"):
            values[name] = tuple(values[name])
        return cls(**values)


# ---------------------------------------------------------------- finding the input


def volume_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def visible_files(folder: Path) -> list[Path]:
    """Regular files of `folder`, hidden ones (uploaders' temporaries, .DS_Store) left out."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def input_files(folder: Path) -> list[Path]:
    """The files a CT read depends on (for fingerprints)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CTInputError(f"{folder}: CT folder does not exist")
    return visible_files(folder)


def _refuse_empty_files(files: list[Path]) -> None:
    for path in files:
        if path.stat().st_size == 0:
            raise CTInputError(f"{path}: file is empty (0 bytes)")


GZIP_MAGIC = b"\x1f\x8b"


def _refuse_truncated_gzip(path: Path) -> None:
    """ITK reads a cut-short .nii.gz without complaint and fills the missing voxels with zeros:
    decompress the whole stream first (in chunks) and refuse one that ends early. A file named .gz
    that is not gzip at all is left to ITK, which reads such files as they are."""
    if not path.name.lower().endswith(".gz"):
        return
    with open(path, "rb") as handle:
        if handle.read(2) != GZIP_MAGIC:
            return
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise CTInputError(f"{path}: truncated or damaged gzip file ({path.stat().st_size} bytes; "
                           f"{_first_line(error)}); upload it again") from error


def _nifti_data_layout(header: bytes) -> tuple[int, int] | None:
    """(byte offset of the voxel data, bits per voxel as stored) from a NIfTI-1 or NIfTI-2 header,
    or None when the header is neither. The stored type, not ITK's: ITK turns scaled integers into
    float32 in memory."""
    for order in ("<", ">"):
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0]) if len(header) >= 4 else 0
        if size == 348 and len(header) >= 112:
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{order}i2")[0])
            offset = float(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
            return (int(offset), bitpix) if np.isfinite(offset) and offset >= 0 else None
        if size == 540 and len(header) >= 176:
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{order}i2")[0])
            return int(np.frombuffer(header[168:176], dtype=f"{order}i8")[0]), bitpix
    return None


def _refuse_short_nifti(path: Path, image: sitk.Image) -> None:
    """An uncompressed .nii shorter than its header's voxel data (ITK pads it with zeros)."""
    if not path.name.lower().endswith(".nii"):
        return
    with open(path, "rb") as handle:
        header = handle.read(540)
    layout = _nifti_data_layout(header)
    if layout is None or layout[1] <= 0:
        return  # not a header this check understands; ITK has read it
    offset, bitpix = layout
    expected = offset + int(np.prod(image.GetSize(), dtype=np.int64)) * bitpix // 8
    found = path.stat().st_size
    if found < expected:
        raise CTInputError(f"{path}: truncated NIfTI file: its header describes {expected} bytes, the file has "
                           f"{found}; upload it again")


def read_volume_file(path: Path) -> sitk.Image:
    """Read one 3-D volume file; an empty, unreadable or non-3-D file raises CTInputError."""
    path = Path(path)
    if not path.is_file():
        raise CTInputError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise CTInputError(f"{path}: file is empty (0 bytes)")
    _refuse_truncated_gzip(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise CTInputError(f"{path}: cannot be read as a {volume_suffix(path) or 'volume'} file "
                           f"({_first_line(error)})") from error
    _refuse_short_nifti(path, image)
    if image.GetDimension() != 3:
        raise CTInputError(f"{path}: expected a 3-D volume, found {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(f"{path}: expected one value per voxel, found "
                           f"{image.GetNumberOfComponentsPerPixel()} (colour or vector image)")
    if min(image.GetSize()) < 2:
        raise CTInputError(f"{path}: volume of size {image.GetSize()} has a single slice")
    _refuse_non_finite(path, image)
    return image


def _refuse_non_finite(path: Path, image: sitk.Image) -> None:
    problem = ct_voxels.non_finite_problem(path, image)
    if problem:
        raise CTInputError(f"{path}: {problem}")


def read_ct_folder(folder: Path) -> tuple[sitk.Image, CTSource]:
    """The CT in `folder` as read (not yet reoriented), and where it came from."""
    folder = Path(folder)
    files = input_files(folder)
    if not files:
        raise CTInputError(f"{folder}: no CT found (folder is empty)")
    volumes = [p for p in files if volume_suffix(p)]
    if len(volumes) > 1:
        names = ", ".join(p.name for p in volumes)
        raise CTInputError(f"{folder}: expected exactly one CT volume file, found {len(volumes)} ({names})")
    if volumes:
        others = [p for p in files if p not in volumes]
        if others:
            raise CTInputError(f"{folder}: holds a volume file ({volumes[0].name}) and other files "
                               f"({', '.join(p.name for p in others[:5])}); expected one or the other")
        image = read_volume_file(volumes[0])
        kind = _KIND_OF_SUFFIX[volume_suffix(volumes[0])]
        return image, CTSource(kind, (volumes[0],), folder, orientation_code(image))
    return read_dicom_series(folder)


# ---------------------------------------------------------------- DICOM


def read_dicom_series(folder: Path) -> tuple[sitk.Image, CTSource]:
    folder = Path(folder)
    _refuse_empty_files(visible_files(folder))
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        for path in visible_files(folder):
            _refuse_non_image_dicom(path)
        raise CTInputError(f"{folder}: no DICOM series and no .nii/.nii.gz/.nrrd/.mha volume found")
    if len(series_ids) > 1:
        raise CTInputError(f"{folder}: holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); "
                           "expected exactly one")
    file_names = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])]
    _refuse_dicom_files_outside(folder, file_names)
    if len(file_names) < 2:
        raise CTInputError(f"{file_names[0] if file_names else folder}: DICOM series has a single slice; "
                           "a CT volume needs at least two")
    sorted_files = _check_slice_geometry(folder, file_names)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in sorted_files])
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise CTInputError(f"{folder}: DICOM series cannot be read ({_first_line(error)})") from error
    return image, CTSource("dicom", tuple(sorted_files), folder, orientation_code(image))


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _refuse_dicom_files_outside(folder: Path, series_files: list[Path]) -> None:
    """GDCM leaves a damaged slice (truncated, bad header) out of the series without a word, which
    would then surface as a "missing slice": name that file and its problem instead."""
    listed = {Path(f).resolve() for f in series_files}
    for path in visible_files(folder):
        if path.resolve() in listed or not _looks_like_dicom(path):
            continue
        _refuse_non_image_dicom(path)
        size = path.stat().st_size
        try:
            _slice_header(path)
        except CTInputError as error:
            raise CTInputError(f"{path}: damaged or truncated DICOM file ({size:,} bytes) that the series "
                               f"reader left out; re-export the series ({error})") from error
        raise CTInputError(f"{path}: DICOM file ({size:,} bytes) left out of the series by the reader: "
                           "damaged or truncated pixel data, or a slice of another series")


def _refuse_non_image_dicom(path: Path) -> None:
    """GDCM leaves a DICOM file without an image out of every series without a word, so it would
    otherwise read as "damaged" or "no series": name what it is."""
    if not _looks_like_dicom(path):
        return
    problem = ct_voxels.non_image_dicom_problem(path)
    if problem:
        raise CTInputError(f"{path}: {problem}")


def _slice_header(path: Path) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise CTInputError(f"{path}: unreadable DICOM file ({_first_line(error)})") from error
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()
            if key in (_TAG_POSITION, _TAG_ORIENTATION, _TAG_MODALITY)}


def _numbers(text: str, count: int, path: Path, tag: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.replace(",", "\\").split("\\") if v.strip()])
    except ValueError:
        values = np.array([])
    if values.size != count:
        raise CTInputError(f"{path}: DICOM tag {tag} is missing or malformed ({text!r})")
    return values


def _check_slice_geometry(folder: Path, files: list[Path]) -> list[Path]:
    """Sort slices along their normal and refuse gaps, duplicates, unequal steps and shear."""
    headers = [_slice_header(f) for f in files]
    modalities = {h.get(_TAG_MODALITY, "") for h in headers} - {""}
    if modalities and modalities != {"CT"}:
        raise CTInputError(f"{folder}: DICOM modality is {', '.join(sorted(modalities))}, expected CT")
    orientations = [_numbers(h.get(_TAG_ORIENTATION, ""), 6, f, _TAG_ORIENTATION)
                    for h, f in zip(headers, files, strict=True)]
    for orientation, path in zip(orientations[1:], files[1:], strict=True):
        if not np.allclose(orientation, orientations[0], atol=1e-4):
            raise CTInputError(f"{path}: slice orientation {orientation.tolist()} differs from "
                               f"{files[0].name}'s {orientations[0].tolist()}")
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    positions = np.array([_numbers(h.get(_TAG_POSITION, ""), 3, f, _TAG_POSITION)
                          for h, f in zip(headers, files, strict=True)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    ordered = [files[i] for i in order]
    gaps = np.diff(along)
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise CTInputError(f"{ordered[i + 1]}: slice at the same position as {ordered[i].name} "
                               f"({along[i]:.3f} mm along the normal); duplicate slice")
    median = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if abs(gap - median) > SLICE_GAP_TOLERANCE * median:
            missing = round(gap / median) - 1
            if missing >= 1 and abs(gap - (missing + 1) * median) <= SLICE_GAP_TOLERANCE * median:
                problem = (f"{missing} missing slice{'s' if missing > 1 else ''} between {ordered[i].name} and "
                           f"{ordered[i + 1].name} (gap {gap:.3f} mm, slice spacing {median:.3f} mm)")
            else:
                problem = (f"inconsistent slice spacing: {gap:.3f} mm between {ordered[i].name} and "
                           f"{ordered[i + 1].name}, {median:.3f} mm elsewhere")
            raise CTInputError(f"{folder}: DICOM series refused, {problem}")
    steps = np.diff(positions, axis=0)
    off_normal = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1) / np.maximum(gaps, 1e-9)
    if off_normal.max() > SHEAR_TOLERANCE:
        worst = int(off_normal.argmax())
        raise CTInputError(f"{folder}: DICOM series refused, slices are sheared (gantry tilt) between "
                           f"{ordered[worst].name} and {ordered[worst + 1].name}; resample it to an "
                           "orthogonal grid before upload")
    return ordered


# ---------------------------------------------------------------- canonical form


def orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def canonicalise(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes (no resampling) so the direction is as close to identity (LPS) as it gets."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def is_oblique(image: sitk.Image, tolerance: float = 1e-4) -> bool:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return not np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=tolerance)


def summarise(image: sitk.Image, source: CTSource) -> CTSummary:
    values = sitk.GetArrayViewFromImage(image)
    p01, p50, p99 = (float(v) for v in np.percentile(values, [1, 50, 99]))
    return CTSummary(
        size=tuple(int(v) for v in image.GetSize()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
        orientation=orientation_code(image),
        original_orientation=source.original_orientation,
        oblique=is_oblique(image),
        pixel_type=image.GetPixelIDTypeAsString(),
        hu_min=float(values.min()),
        hu_max=float(values.max()),
        hu_p01=p01, hu_p50=p50, hu_p99=p99,
        source_kind=source.kind,
        source_files=len(source.files),
    )


def write_volume(image: sitk.Image, final: Path) -> Path:
    """Write a compressed NIfTI atomically (a killed writer leaves no `final`)."""
    with atomic_path(final) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return Path(final)


def load_ct(folder: Path) -> tuple[sitk.Image, CTSource]:
    """Read the CT in `folder` and return it in canonical orientation."""
    image, source = read_ct_folder(folder)
    return canonicalise(image), source


# ---------------------------------------------------------------- pictures

ABDOMEN_WINDOW = (40.0, 400.0)  # level, width in HU: soft tissue of the abdomen


def _windowed(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    level, width = window
    return np.clip((values.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0)


def orthogonal_slices(volume: np.ndarray, spacing: tuple[float, float, float],
                      centre: tuple[int, int, int] | None = None) -> list[tuple[str, np.ndarray, float]]:
    """Axial, coronal, sagittal planes through `centre` (z, y, x) of an LPS array [z, y, x].

    Displayed the radiological way: patient's right on the left, anterior/superior up.
    Returns (name, 2-D array, aspect ratio of a pixel).
    """
    z, y, x = centre if centre is not None else tuple(s // 2 for s in volume.shape)
    sx, sy, sz = spacing
    return [
        ("axial", volume[z], sy / sx),
        ("coronal", volume[::-1, y, :], sz / sx),
        ("sagittal", volume[::-1, :, x], sz / sy),
    ]


# Three planes side by side: 12 in wide shows each plane about 400 px wide in the UI (1200 px display).
THREE_PLANES_FIGSIZE = (12.0, 4.4)


def ct_thumbnail_png(image: sitk.Image, window: tuple[float, float] = ABDOMEN_WINDOW) -> bytes:
    """Axial/coronal/sagittal mid-slices of a canonical (LPS) CT, windowed, as a full-size PNG
    (`pictures.display_version` makes the UI's copy)."""
    from gcmlm_assets.pictures import figure_png, plt

    volume = sitk.GetArrayViewFromImage(image)
    fig, axes = plt.subplots(1, 3, figsize=THREE_PLANES_FIGSIZE, layout="constrained")
    for ax, (name, plane, aspect) in zip(axes, orthogonal_slices(volume, image.GetSpacing()), strict=True):
        ax.imshow(_windowed(plane, window), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=14)
        ax.axis("off")
    fig.suptitle(f"CT W{window[1]:.0f}/L{window[0]:.0f} (patient's right on the left)", fontsize=14)
    return figure_png(fig)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with the source location; the reason is usually the last line.
    return lines[-1] if lines else type(error).__name__


__all__ = [
    "CTInputError", "CTSource", "CTSummary", "VOLUME_SUFFIXES", "canonicalise", "ct_thumbnail_png",
    "input_files", "load_ct", "orientation_code", "read_ct_folder", "read_dicom_series", "read_volume_file",
    "summarise", "volume_suffix", "write_volume",
]
