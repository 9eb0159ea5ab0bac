"""DICOM whole-slide images built by the tests from a real slide: one file per instance, written with pydicom.

A series holds a tiled VOLUME pyramid (TILED_FULL, JPEG baseline frames,
YBR_FULL_422), a THUMBNAIL and a LABEL, as a scanner's DICOM export does.
The LABEL is drawn in saturated colours so that, read as tissue, it would be
found as tissue.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"

VOLUME_TYPES = (("DERIVED", "PRIMARY", "VOLUME", "NONE"), ("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"))
THUMBNAIL_TYPE = ("DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED")
LABEL_TYPE = ("ORIGINAL", "PRIMARY", "LABEL", "NONE")


@dataclass(frozen=True)
class BuiltSeries:
    series_uid: str
    volumes: list[Path]  # level 0 first
    thumbnail: Path | None
    label: Path | None

    @property
    def files(self) -> list[Path]:
        return [*self.volumes, *(p for p in (self.thumbnail, self.label) if p is not None)]


def _jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    # subsampling=1 is 4:2:2, what YBR_FULL_422 declares.
    Image.fromarray(rgb).save(out, format="JPEG", quality=90, subsampling=1)
    return out.getvalue()


def _frames(rgb: np.ndarray, tile: int) -> list[bytes]:
    """TILED_FULL order: row by row; edge frames padded with white to the full tile size."""
    height, width = rgb.shape[:2]
    frames = []
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = rgb[y:y + tile, x:x + tile]
            frame[:part.shape[0], :part.shape[1]] = part
            frames.append(_jpeg(frame))
    return frames


def _instance(path: Path, rgb: np.ndarray, *, series_uid: str, study_uid: str, image_type: tuple[str, ...],
              tile: int, pixel_spacing_mm: float | None, sop_class: str = WSI_SOP_CLASS,
              patient: dict | None = None) -> Path:
    height, width = rgb.shape[:2]
    frames = _frames(rgb, tile)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "SM"
    ds.ImageType = list(image_type)
    for keyword, value in (patient or {}).items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = tile, tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = height, width
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    if pixel_spacing_mm is not None:
        measures = Dataset()
        measures.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]  # row spacing, column spacing (mm)
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.ImagedVolumeWidth = width * pixel_spacing_mm
        ds.ImagedVolumeHeight = height * pixel_spacing_mm
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def label_picture(width: int = 240, height: int = 160) -> np.ndarray:
    """A slide label: saturated coloured blocks and a dark 'barcode', nothing like glass."""
    rgb = np.full((height, width, 3), 250, np.uint8)
    rgb[10:70, 10:110] = (200, 40, 160)
    rgb[80:150, 20:220:6] = 20
    rgb[10:70, 130:230] = (60, 60, 200)
    return rgb


def write_dicom_wsi(folder: Path, rgb: np.ndarray, *, stem: str = "slide", mpp: float | None = 0.499,
                    downsamples: tuple[int, ...] = (1, 4), tile: int = 256, thumbnail: bool = True,
                    label: bool = True, series_uid: str | None = None, patient: dict | None = None,
                    volume_types: tuple[tuple[str, ...], ...] | None = None) -> BuiltSeries:
    """One DICOM-WSI series in `folder`: `<stem>-level<i>.dcm` per VOLUME level (resampled by
    striding), `<stem>-thumbnail.dcm` and `<stem>-label.dcm`. `mpp` (µm/px at level 0) goes into
    the shared functional groups' PixelSpacing (None: left out). `volume_types`: the ImageType of each
    level (default: DERIVED\\PRIMARY\\VOLUME\\NONE for level 0, ...\\RESAMPLED for the others)."""
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    common = {"series_uid": series_uid, "study_uid": study_uid, "patient": patient}
    volumes = []
    for index, downsample in enumerate(downsamples):
        level = np.ascontiguousarray(rgb[::downsample, ::downsample])
        spacing = None if mpp is None else mpp * downsample / 1000.0
        image_type = volume_types[index] if volume_types else VOLUME_TYPES[index > 0]
        volumes.append(_instance(folder / f"{stem}-level{index}.dcm", level, image_type=image_type,
                                 tile=tile, pixel_spacing_mm=spacing, **common))
    thumbnail_path = label_path = None
    if thumbnail:
        step = max(1, max(rgb.shape[:2]) // 240)
        small = np.ascontiguousarray(rgb[::step, ::step])
        thumbnail_path = _instance(folder / f"{stem}-thumbnail.dcm", small, image_type=THUMBNAIL_TYPE,
                                   tile=max(small.shape[:2]), pixel_spacing_mm=None, **common)
    if label:
        picture = label_picture()
        label_path = _instance(folder / f"{stem}-label.dcm", picture, image_type=LABEL_TYPE,
                               tile=max(picture.shape[:2]), pixel_spacing_mm=None, **common)
    return BuiltSeries(series_uid, volumes, thumbnail_path, label_path)


def write_ct_slice(path: Path) -> Path:
    """A CT Image Storage instance (a stray radiology slice) with a .dcm name."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
