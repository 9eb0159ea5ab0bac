"""DICOM whole-slide images: the `.dcm` files of one series grouped into one slide (plain Python, no Dagster).

A DICOM-WSI is a series of instances, one file each: a VOLUME instance per
pyramid level (a level may be split over several files, a concatenation),
plus THUMBNAIL, LABEL and OVERVIEW instances. OpenSlide opens the whole
series from any one of its files by scanning the file's folder for the same
Series Instance UID; counted file by file, one scan would be tiled and
encoded once per file.

Here only headers are read (pydicom, pixels never loaded). Files are grouped
by Series Instance UID; tissue comes from the VOLUME instances only (value 3
of ImageType, the image flavour), and the others are named as ignored, with
the reason. A `.dcm` that is not a whole-slide instance (a CT slice, a
report) is refused with its file named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.pathology.slide_error import SlideError

# VL Whole Slide Microscopy Image Storage: the only SOP class OpenSlide reads as a slide.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
VOLUME = "VOLUME"
# Why each non-VOLUME flavour is not tiled.
IGNORED_FLAVOURS = {
    "LABEL": "a photograph of the slide's paper label (text, barcode), not tissue",
    "OVERVIEW": "a low-magnification photograph of the whole glass, label included (OpenSlide's 'macro')",
    "THUMBNAIL": "a downsampled copy of the VOLUME pyramid, whose own levels are read instead",
}
DICOM_SUFFIXES = (".dcm", ".dicom")
TILE_RULE = ("tissue from the VOLUME instances only (ImageType value 3); LABEL, OVERVIEW and THUMBNAIL "
             "instances are not tiled")

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns",
                "TotalPixelMatrixRows", "SOPInstanceUIDOfConcatenationSource"]


@dataclass(frozen=True)
class DicomInstance:
    path: Path
    sop_instance_uid: str  # of the concatenation source for a level split over several files
    series_uid: str
    image_type: tuple[str, ...]
    width: int | None  # TotalPixelMatrixColumns
    height: int | None

    @property
    def flavour(self) -> str:
        return self.image_type[2] if len(self.image_type) > 2 else ""

    def describe(self) -> dict:
        return {"file": self.path.name, "image_type": "\\".join(self.image_type),
                "width": self.width, "height": self.height}


@dataclass(frozen=True)
class DicomSeries:
    series_uid: str
    volumes: tuple[DicomInstance, ...]  # largest level first
    ignored: tuple[tuple[DicomInstance, str], ...]  # (instance, why it is not tiled)

    @property
    def opener(self) -> Path:
        """The file OpenSlide is given: one of level 0 (any file of the series would open it)."""
        return self.volumes[0].path

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(sorted([v.path for v in self.volumes] + [i.path for i, _ in self.ignored]))

    def describe(self) -> dict:
        """The choice made, as recorded in the slide listing and shown in the UI."""
        return {
            "series_instance_uid": self.series_uid,
            "opened_file": self.opener.name,
            "rule": TILE_RULE,
            "volume_instances": [v.describe() for v in self.volumes],
            "ignored_instances": [{**i.describe(), "reason": why} for i, why in self.ignored],
        }


def looks_like_dicom(path: Path) -> bool:
    """A DICOM name, or the Part 10 marker after the 128-byte preamble (PACS exports often have no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in (".tif", ".tiff"):
        return False  # a dual-personality DICOM-TIFF named so is read as TIFF, by OpenSlide as by us
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _text(value) -> str:
    return str(value).strip() if value is not None else ""


def read_instance(path: str | os.PathLike) -> DicomInstance:
    """The header of one whole-slide instance (pixels not read), or `SlideError` naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    path = Path(path)
    if path.stat().st_size == 0:
        raise SlideError(path, "the file is empty (0 bytes)")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError as error:
        raise SlideError(path, f"not a DICOM file (no DICM marker after the 128-byte preamble): {error}") from error
    except Exception as error:  # noqa: BLE001 - a cut or garbled header: still name the file
        raise SlideError(path, f"its DICOM header cannot be read ({type(error).__name__}: {error}); "
                               "truncated or corrupt file") from error
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(getattr(meta, "MediaStorageSOPClassUID", None) or ds.get("SOPClassUID"))
    if sop_class != WSI_SOP_CLASS:
        kind = UID(sop_class).name if sop_class else "no SOP class"
        raise SlideError(path, f"is a DICOM {kind} instance (SOP class {sop_class or 'missing'}), not a whole-slide "
                               f"image (VL Whole Slide Microscopy Image Storage, {WSI_SOP_CLASS}); "
                               "remove it from wsi/")
    series_uid = _text(ds.get("SeriesInstanceUID"))
    if not series_uid:
        raise SlideError(path, "its DICOM header has no SeriesInstanceUID, so the series it belongs to is unknown")
    image_type = tuple(_text(v).upper() for v in (ds.get("ImageType") or []))
    if len(image_type) < 3:
        shown = "\\".join(image_type) or "(missing)"
        raise SlideError(path, f"its ImageType {shown} has no value 3 "
                               "(VOLUME, LABEL, OVERVIEW or THUMBNAIL), so its role in the slide is unknown")
    width, height = ds.get("TotalPixelMatrixColumns"), ds.get("TotalPixelMatrixRows")
    source = _text(ds.get("SOPInstanceUIDOfConcatenationSource")) or _text(ds.get("SOPInstanceUID"))
    return DicomInstance(path, source, series_uid, image_type,
                         int(width) if width is not None else None, int(height) if height is not None else None)


def group_series(paths: list[Path]) -> list[DicomSeries]:
    """The series that `paths` (DICOM files of one folder) make up, in the order of their openers' names."""
    by_series: dict[str, list[DicomInstance]] = {}
    for path in sorted(paths):
        instance = read_instance(path)
        by_series.setdefault(instance.series_uid, []).append(instance)
    return sorted((_series(uid, instances) for uid, instances in by_series.items()), key=lambda s: s.opener.name)


def _series(series_uid: str, instances: list[DicomInstance]) -> DicomSeries:
    volumes, ignored = [], []
    seen: dict[str, Path] = {}  # SOP Instance UID -> first file of a non-VOLUME instance
    for instance in instances:
        flavour = instance.flavour
        if flavour == VOLUME:
            if instance.width is None or instance.height is None:
                raise SlideError(instance.path, "VOLUME instance without TotalPixelMatrixColumns/Rows: "
                                                "its level size is unknown")
            volumes.append(instance)
        elif instance.sop_instance_uid in seen:
            # A copied file: OpenSlide reads one of them, as do we.
            ignored.append((instance, f"a copy of {seen[instance.sop_instance_uid].name} (same SOP Instance UID)"))
        else:
            seen[instance.sop_instance_uid] = instance.path
            ignored.append((instance, IGNORED_FLAVOURS.get(
                flavour, f"image flavour {flavour!r} is not a slide level (only VOLUME instances are tiled)")))
    if not volumes:
        names = ", ".join(f"{i.path.name} ({i.flavour})" for i in instances)
        raise SlideError(instances[0].path, f"DICOM series {series_uid} has no VOLUME instance, only {names}: "
                                            "it holds no tissue image to tile")
    volumes.sort(key=lambda v: (-(v.width or 0) * (v.height or 0), v.path.name))
    return DicomSeries(series_uid, tuple(volumes), tuple(ignored))


def series_containing(path: str | os.PathLike) -> DicomSeries:
    """The series of `path`, gathered from the DICOM files of its folder (as OpenSlide gathers it)."""
    path = Path(path)
    wanted = read_instance(path).series_uid
    folder = [p for p in sorted(path.parent.iterdir())
              if p.is_file() and not p.name.startswith(".") and looks_like_dicom(p)]
    same = [p for p in folder if p == path or _series_uid_or_none(p) == wanted]
    return _series(wanted, [read_instance(p) for p in same])


def _series_uid_or_none(path: Path) -> str | None:
    try:
        return read_instance(path).series_uid
    except SlideError:
        return None  # another file's problem; listing the folder reports it
