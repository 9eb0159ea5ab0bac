"""Whole-slide images of one patient: listing, safe opening, resolution (µm per pixel).

A slide is one file (SVS, TIFF, NDPI, ...) or one DICOM-WSI series: all the
`.dcm` files that share a Series Instance UID (`dicom_wsi.py`), opened by
OpenSlide from one of its level-0 files.

Plain Python (no Dagster). Every problem is raised as `SlideError`, whose
message starts with the slide's file name and says what is wrong with it:
an empty file, a picture renamed to a slide extension, a truncated TIFF, a
file OpenSlide cannot open or cannot decode, an implausible resolution.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.lazy import lazy
from gcmlm_assets.pathology import dicom_wsi  # reads DICOM headers with pydicom, imported on first use there
from gcmlm_assets.pathology.dicom_wsi import DicomSeries
from gcmlm_assets.pathology.slide_error import SlideError  # raised here, by dicom_wsi and by the callers

# Imported on first use: the definitions import this module's constants and types, not its work.
cv2 = lazy("cv2")
np = lazy("numpy")
openslide = lazy("openslide")


# Where a slide's microns-per-pixel came from, best first.
MPP_FROM_OPENSLIDE = "openslide.mpp"
MPP_FROM_TIFF_RESOLUTION = "tiff.resolution"
MPP_FROM_OBJECTIVE_POWER = "objective-power"
MPP_FROM_DEFAULT = "default"

# Where OpenSlide's DICOM driver reads the resolution (mm per pixel, row then column).
DICOM_PIXEL_SPACING = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing"

# Whole-slide scans lie between ~0.1 µm/px (high-end 80x) and ~10 µm/px (1.25x
# overviews). A value far outside (e.g. 352.8 µm/px from a 72-dpi TIFF tag) is
# a wrong tag, and tiling with it would silently produce nonsense patches.
PLAUSIBLE_MPP = (0.05, 20.0)

# Raw pixels read at once when a level is streamed in strips: 16 Mpx = 64 MiB RGBA.
STRIP_PIXELS = 1 << 24

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


@dataclass(frozen=True)
class Mpp:
    x: float
    y: float
    source: str  # one of the MPP_FROM_* names
    detail: str  # the property values it was computed from

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


@dataclass(frozen=True)
class SlideSource:
    """What one slide is made of: the file OpenSlide opens and every file it reads."""

    path: Path
    files: tuple[Path, ...]
    series: DicomSeries | None = None  # a DICOM-WSI series; None for a one-file slide

    @property
    def name(self) -> str:
        """The stem of the slide's outputs (for a DICOM series: that of its opened level-0 file)."""
        return slide_stem(self.path)

    def file_stats(self) -> list[dict]:
        """Name, size and modification time of every file, which together identify the content."""
        stats = []
        for path in self.files:
            stat = path.stat()
            stats.append({"file": path.name, "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return stats


def slide_source(path: str | os.PathLike) -> SlideSource:
    """The slide that `path` opens: itself, or the DICOM series it belongs to (from its folder)."""
    path = Path(path)
    if path.is_file() and dicom_wsi.looks_like_dicom(path):
        series = dicom_wsi.series_containing(path)
        return SlideSource(series.opener, series.files, series)
    return SlideSource(path, (path,))


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    name: str  # file name without its extension: the stem of the slide's outputs
    size_bytes: int  # of all the slide's files
    mtime_ns: int  # the latest of its files'
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: Mpp
    quickhash: str | None  # OpenSlide's content hash (quickhash-1), when the format has one
    associated_images: tuple[str, ...]
    files: tuple[dict, ...] = ()  # SlideSource.file_stats(): every file the slide is read from
    dicom: dict | None = None  # DicomSeries.describe(): the instances tiled and those ignored

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def fingerprint(self) -> dict:
        return {"file": self.path.name, "size_bytes": self.size_bytes, "mtime_ns": self.mtime_ns,
                "files": list(self.files)}


# ---------------------------------------------------------------- listing


def list_slides(wsi_dir: str | os.PathLike) -> list[SlideSource]:
    """The slides of `<patient>/wsi/`, sorted by the name of the file opened.

    Every visible regular file is part of a slide, so a stray file fails
    loudly instead of being skipped. DICOM files are grouped by series (one
    slide per Series Instance UID; a DICOM file that is not a whole-slide
    instance is refused); every other file is a slide of its own. Two slides
    with the same stem would write the same output name and are refused.
    """
    folder = Path(wsi_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no slide folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no slide files in {folder}")
    dicom_files = [p for p in files if dicom_wsi.looks_like_dicom(p)]
    slides = [SlideSource(p, (p,)) for p in files if p not in dicom_files]
    slides += [SlideSource(s.opener, s.files, s) for s in dicom_wsi.group_series(dicom_files)]
    slides.sort(key=lambda s: s.path.name)
    seen: dict[str, Path] = {}
    for slide in slides:
        stem = slide.name
        if stem in seen:
            raise SlideError(slide.path, f"has the same name stem {stem!r} as {seen[stem].name}; "
                                         "rename one of them (outputs are named by stem)")
        seen[stem] = slide.path
    return slides


def slide_stem(path: str | os.PathLike) -> str:
    """`a.b.svs` -> `a.b` (only the last suffix goes, as CLAM names its files)."""
    name = Path(path).name
    return name.rsplit(".", 1)[0] if "." in name else name


# ---------------------------------------------------------------- file integrity


def signature_problem(path: Path) -> str | None:
    """Why the file's first bytes show it is not a slide, or None."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(16)
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return f"the file is {what}, not a whole-slide image (extension {path.suffix or 'none'})"
    return None


def tiff_truncation_problem(path: Path) -> str | None:
    """For a TIFF-based file (SVS, generic TIFF, NDPI, ...): whether any directory
    or tile/strip lies beyond the end of the file, i.e. the copy was cut short.

    Walks the directory chain itself (a few KB read per directory, plus the
    offset tables), so it costs milliseconds even for multi-GB slides.
    Returns None for non-TIFF files and for structures it does not understand.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return None
        order = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 42:
            big, offset = False, struct.unpack(order + "I", head[4:8])[0]
        elif version == 43 and len(head) >= 16:
            big, offset = True, struct.unpack(order + "Q", head[8:16])[0]
        else:
            return None
        count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        count_size = struct.calcsize(count_fmt)
        next_size = struct.calcsize(next_fmt)
        type_sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
                      13: 4, 16: 8, 17: 8, 18: 8}
        type_formats = {3: "H", 4: "I", 13: "I", 16: "Q", 17: "q", 18: "Q"}
        visited: set[int] = set()
        directory = 0
        while offset:
            if offset in visited or directory > 10_000:
                return None  # a loop: not our business to diagnose
            visited.add(offset)
            if offset + count_size > size:
                return (f"the file is truncated: TIFF directory {directory} starts at byte {offset:,} "
                        f"but the file has only {size:,} bytes")
            fh.seek(offset)
            (n_entries,) = struct.unpack(order + count_fmt, fh.read(count_size))
            block = fh.read(n_entries * entry_size + next_size)
            if len(block) < n_entries * entry_size + next_size:
                return (f"the file is truncated: TIFF directory {directory} at byte {offset:,} "
                        f"runs past the end of the file ({size:,} bytes)")
            arrays: dict[int, np.ndarray] = {}
            for i in range(n_entries):
                entry = block[i * entry_size:(i + 1) * entry_size]
                if big:
                    tag, typ, count = struct.unpack(order + "HHQ", entry[:12])
                    value = entry[12:20]
                else:
                    tag, typ, count = struct.unpack(order + "HHI", entry[:8])
                    value = entry[8:12]
                # 273/279: strip offsets/byte counts; 324/325: tile offsets/byte counts.
                if tag not in (273, 279, 324, 325) or typ not in type_formats:
                    continue
                item = type_sizes[typ]
                nbytes = item * count
                if nbytes <= len(value):
                    raw = value[:nbytes]
                else:
                    (where,) = struct.unpack(order + ("Q" if big else "I"), value)
                    if where + nbytes > size:
                        return (f"the file is truncated: the tile table of TIFF directory {directory} "
                                f"lies past the end of the file ({size:,} bytes)")
                    fh.seek(where)
                    raw = fh.read(nbytes)
                arrays[tag] = np.frombuffer(raw, dtype=np.dtype(type_formats[typ]).newbyteorder(order))
            for offsets_tag, counts_tag in ((324, 325), (273, 279)):
                if offsets_tag in arrays and counts_tag in arrays:
                    offsets = arrays[offsets_tag].astype(np.uint64)
                    counts = arrays[counts_tag].astype(np.uint64)
                    if len(offsets) == len(counts) and len(offsets):
                        ends = offsets + counts
                        # Sparse tiles (offset 0, count 0) are legal and skipped.
                        end = int(ends[counts > 0].max()) if (counts > 0).any() else 0
                        if end > size:
                            return (f"the file is truncated: image data of TIFF directory {directory} "
                                    f"extends to byte {end:,} but the file has only {size:,} bytes")
            (offset,) = struct.unpack(order + next_fmt, block[n_entries * entry_size:])
            directory += 1
    return None


# ---------------------------------------------------------------- resolution


def _positive_float(value: str | None) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def resolve_mpp(properties: Mapping[str, str], default_mpp: float) -> Mpp:
    """Microns per pixel at level 0, from the best source the slide has.

    Order: OpenSlide's `openslide.mpp-x/-y` (vendor metadata), the TIFF
    resolution tags, the objective power (10 µm/px divided by the power, the
    usual 20x = 0.5 µm/px convention), and last `default_mpp`, which the caller
    must report as a warning.
    """
    mpp_x = _positive_float(properties.get("openslide.mpp-x"))
    mpp_y = _positive_float(properties.get("openslide.mpp-y"))
    if mpp_x or mpp_y:
        mpp_x = mpp_x or mpp_y
        mpp_y = mpp_y or mpp_x
        return Mpp(mpp_x, mpp_y, MPP_FROM_OPENSLIDE,  # type: ignore[arg-type]
                   f"openslide.mpp-x={properties.get('openslide.mpp-x')}, "
                   f"openslide.mpp-y={properties.get('openslide.mpp-y')}")

    unit = (properties.get("tiff.ResolutionUnit") or "").strip().lower()
    microns_per_unit = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    res_x = _positive_float(properties.get("tiff.XResolution"))
    res_y = _positive_float(properties.get("tiff.YResolution"))
    if microns_per_unit and (res_x or res_y):
        res_x = res_x or res_y
        res_y = res_y or res_x
        return Mpp(microns_per_unit / res_x, microns_per_unit / res_y,  # type: ignore[operator]
                   MPP_FROM_TIFF_RESOLUTION,
                   f"tiff.XResolution={properties.get('tiff.XResolution')}, "
                   f"tiff.YResolution={properties.get('tiff.YResolution')}, tiff.ResolutionUnit={unit}")

    power = _positive_float(properties.get("openslide.objective-power"))
    if power:
        return Mpp(10.0 / power, 10.0 / power, MPP_FROM_OBJECTIVE_POWER,
                   f"openslide.objective-power={properties.get('openslide.objective-power')}")

    return Mpp(default_mpp, default_mpp, MPP_FROM_DEFAULT,
               "no openslide.mpp, TIFF resolution or objective power in the slide")


# ---------------------------------------------------------------- opening and reading


class Slide:
    """An open OpenSlide handle whose read errors name the file."""

    def __init__(self, handle: openslide.OpenSlide, info: SlideInfo):
        self.handle = handle
        self.info = info

    @property
    def path(self) -> Path:
        return self.info.path

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            region = self.handle.read_region((int(location[0]), int(location[1])), level,
                                             (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as error:
            raise SlideError(self.path, f"the image data cannot be decoded at level {level}, "
                                        f"region {location} size {size}: {error} "
                                        "(truncated or corrupt file)") from error
        return np.asarray(region)

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB with transparent (unscanned) pixels shown white, as a viewer shows them."""
        return rgba_to_rgb_on_white(self.read_rgba(location, level, size))

    def read_level_resized(self, level: int, out_size: tuple[int, int]) -> np.ndarray:
        """The whole of `level` resized to `out_size` (w, h), RGBA, read in strips so
        memory stays bounded whatever the level's size."""
        level_w, level_h = self.info.level_dimensions[level]
        out_w, out_h = out_size
        if (out_w, out_h) == (level_w, level_h) and level_w * level_h <= STRIP_PIXELS:
            return self.read_rgba((0, 0), level, (level_w, level_h))
        scale_y = level_h / out_h
        level_ds = self.info.level_downsamples[level]
        rows_per_strip = max(1, int(STRIP_PIXELS // max(level_w, 1) / max(scale_y, 1.0)))
        out = np.empty((out_h, out_w, 4), np.uint8)
        for row0 in range(0, out_h, rows_per_strip):
            row1 = min(out_h, row0 + rows_per_strip)
            src0 = int(math.floor(row0 * scale_y))
            src1 = min(level_h, max(src0 + 1, int(math.ceil(row1 * scale_y))))
            # read_region takes level-0 coordinates for the top-left corner.
            strip = self.read_rgba((0, int(round(src0 * level_ds))), level, (level_w, src1 - src0))
            out[row0:row1] = cv2.resize(strip, (out_w, row1 - row0), interpolation=cv2.INTER_AREA)
        return out

    def close(self) -> None:
        self.handle.close()


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)


def open_slide(path: str | os.PathLike | SlideSource, *, default_mpp: float,
               plausible_mpp: tuple[float, float] = PLAUSIBLE_MPP, verify: bool = True) -> Slide:
    """Open one slide (a file, or a `SlideSource` from `list_slides`) and check that it can be used,
    or raise `SlideError`.

    Checks, cheapest first: the file is not empty and not another kind of file
    with a slide extension; a TIFF-based file is not cut short; OpenSlide opens
    it; (with `verify`) its lowest-resolution level and its last level-0 tile
    decode (a truncated or corrupt file can open and fail only on reading);
    its resolution is plausible for a microscope scan.
    """
    source = path if isinstance(path, SlideSource) else None
    path = Path(source.path if source else path)
    try:
        path.stat()
        if source is None:
            source = slide_source(path)
        path = source.path  # a DICOM series opens from its level 0, whichever file was named
        stats = source.file_stats()
    except OSError as error:
        raise SlideError(getattr(error, "filename", None) or path,
                         f"cannot be read: {error.strerror or error}") from error
    for member in source.files:
        # DICOM files start with a free 128-byte preamble: only the TIFF check is skipped for them.
        problem = signature_problem(member) or (None if source.series else tiff_truncation_problem(member))
        if problem:
            raise SlideError(member, problem)
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as error:
        raise SlideError(path, "OpenSlide does not recognise this file as a whole-slide image "
                               f"(no supported vendor format; {error})") from error
    except openslide.OpenSlideError as error:
        raise SlideError(path, f"OpenSlide cannot open it: {error}") from error

    try:
        properties = dict(handle.properties)
        mpp = resolve_mpp(properties, default_mpp)
        if source.series is not None and mpp.source == MPP_FROM_OPENSLIDE:
            # OpenSlide takes it from level 0's PixelSpacing (row, column spacing in mm) x 1000.
            spacing = [properties.get(f"{DICOM_PIXEL_SPACING}[{i}]") for i in (0, 1)]
            mpp = Mpp(mpp.x, mpp.y, mpp.source, f"{mpp.detail}, from PixelSpacing {spacing} mm in the shared "
                                                f"functional groups of {path.name}")
        low, high = plausible_mpp
        if not (low <= mpp.x <= high and low <= mpp.y <= high):
            raise SlideError(path, f"its resolution {mpp.x:g} x {mpp.y:g} µm/px (from {mpp.source}: "
                                   f"{mpp.detail}) is outside {low:g}-{high:g} µm/px, not a microscope "
                                   "slide scan; fix the file's resolution metadata")
        info = SlideInfo(
            path=path, name=source.name, size_bytes=sum(s["size_bytes"] for s in stats),
            mtime_ns=max(s["mtime_ns"] for s in stats),
            vendor=properties.get("openslide.vendor", "unknown"),
            level_dimensions=tuple(tuple(int(v) for v in d) for d in handle.level_dimensions),
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            mpp=mpp, quickhash=properties.get("openslide.quickhash-1"),
            associated_images=tuple(sorted(handle.associated_images.keys())),
            files=tuple(stats), dicom=source.series.describe() if source.series else None,
        )
        if min(info.dimensions) < 1:
            raise SlideError(path, f"level 0 has no pixels ({info.dimensions})")
        slide = Slide(handle, info)
        if verify:
            _verify_decodes(slide)
        return slide
    except BaseException:
        handle.close()
        raise


def _verify_decodes(slide: Slide) -> None:
    info = slide.info
    lowest = len(info.level_dimensions) - 1
    width, height = info.level_dimensions[lowest]
    # A one-level slide is read whole by the segmentation anyway; skip the double decode.
    if lowest > 0 and width * height <= STRIP_PIXELS:
        slide.read_rgba((0, 0), lowest, (width, height))
    # The last tile of level 0 sits at the end of the data of most formats.
    w0, h0 = info.dimensions
    slide.read_rgba((w0 - 1, h0 - 1), 0, (1, 1))


@contextmanager
def opened(path: str | os.PathLike | SlideSource, **kwargs) -> Iterator[Slide]:
    slide = open_slide(path, **kwargs)
    try:
        yield slide
    finally:
        slide.close()
