"""What ITK reads without complaint but a CT must not contain (plain Python, no Dagster).

- NaN or infinite voxels in a float volume: ITK's NIfTI reader turns them into 0 without a word,
  so a NIfTI's stored data are counted here; in NRRD or MHA they would reach the HU statistics and
  the features.
- A DICOM file without an image (a structured report, a presentation state, a key-object note, an
  encapsulated PDF): GDCM leaves it out of every series without a word.

Each function returns the problem in words (the caller prefixes the file) or None.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

from gcmlm_assets.lazy import lazy

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk
else:  # imported on first use: the definitions import this module, not its work (gcmlm_assets/lazy.py)
    np = lazy("numpy")
    sitk = lazy("SimpleITK")

GZIP_MAGIC = b"\x1f\x8b"
# NIfTI datatype codes of floating-point voxels, and their numpy types.
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
# Where a DICOM object keeps its image.
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CHUNK_VALUES = 1 << 20


def _count_non_finite(values: np.ndarray) -> tuple[int, int, int | None]:
    """(NaN count, infinite count, flat index of the first non-finite value or None)."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return 0, 0, None
    return int(np.isnan(values).sum()), int(np.isinf(values).sum()), int(np.flatnonzero(bad)[0])


def _nifti_float_layout(header: bytes) -> tuple[int, np.dtype] | None:
    """(byte offset of the voxel data, stored float dtype) of a NIfTI-1/-2 header with float voxels."""
    for order in ("<", ">"):
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0]) if len(header) >= 4 else 0
        if size == 348 and len(header) >= 112:
            datatype = int(np.frombuffer(header[70:72], dtype=f"{order}i2")[0])
            offset = float(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
        elif size == 540 and len(header) >= 176:
            datatype = int(np.frombuffer(header[12:14], dtype=f"{order}i2")[0])
            offset = float(np.frombuffer(header[168:176], dtype=f"{order}i8")[0])
        else:
            continue
        if datatype not in NIFTI_FLOAT_TYPES or not np.isfinite(offset) or offset < 0:
            return None
        return int(offset), np.dtype(order + NIFTI_FLOAT_TYPES[datatype])
    return None


def _nifti_non_finite(path: Path, voxels: int) -> tuple[int, int, int | None] | None:
    """NaN / infinite values counted in a float NIfTI's stored voxels, streamed in chunks; None
    when the file is not a float NIfTI."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
        layout = _nifti_float_layout(stream.read(540))
        if layout is None:
            return None
        offset, dtype = layout
        stream.seek(offset)
        nan = inf = done = 0
        first = None
        # Exactly the volume's voxels: bytes after them (padding, extensions) are not voxels.
        while done < voxels and (chunk := stream.read(dtype.itemsize * min(_CHUNK_VALUES, voxels - done))):
            values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype=dtype)
            chunk_nan, chunk_inf, chunk_first = _count_non_finite(values)
            nan, inf = nan + chunk_nan, inf + chunk_inf
            if first is None and chunk_first is not None:
                first = done + chunk_first
            done += values.size
    return nan, inf, first


def non_finite_problem(path: Path, image: sitk.Image) -> str | None:
    """Why the float volume `image`, read from `path`, has voxels that are not finite numbers."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return None  # stored as integers (maybe scaled): always finite
    voxels = int(np.prod(image.GetSize(), dtype=np.int64)) * image.GetNumberOfComponentsPerPixel()
    counted = _nifti_non_finite(path, voxels) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    if counted is None:
        counted = _count_non_finite(sitk.GetArrayViewFromImage(image).ravel())
    nan, inf, first = counted
    if not (nan or inf):
        return None
    # Stored x fastest: the flat index unravels as (z, y, x), reported as ITK's index (x, y, z).
    z, y, x = np.unravel_index(first, image.GetSize()[::-1])
    return (f"{nan} NaN and {inf} infinite voxel value(s) (non-finite, the first at voxel "
            f"{(int(x), int(y), int(z))}); a CT holds finite Hounsfield units only, export it again")


def non_image_dicom_problem(path: Path) -> str | None:
    """What a well-formed DICOM file without image data is (e.g. a structured report), or None
    (an image, or not parseable: then it is the caller's "damaged" case)."""
    import pydicom

    try:
        # Values over 1 KB (the pixels) are not loaded; only their presence is asked.
        dataset = pydicom.dcmread(path, defer_size="1 KB")
    except Exception:  # noqa: BLE001 - any parse failure is the caller's "damaged file" case
        return None
    if any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS):
        return None
    sop_class = dataset.get("SOPClassUID")
    kind = getattr(sop_class, "name", "") or str(sop_class or "unknown SOP class")
    return (f"DICOM file without image data ({kind}, modality {dataset.get('Modality', 'unknown')}), not a CT "
            "slice; the ct/ folder must hold only the slices of one CT series")
