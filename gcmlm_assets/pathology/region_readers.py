"""Region readers of whole-slide images: a level's pixels as RGB uint8, read as fast as the slide allows.

Two region readers give the same pixels: `TiffTileReader` decodes the tiles
of Aperio/generic TIFF slides directly (tifffile + libjpeg-turbo) and keeps
the recently decoded ones; it is about 4x faster per pixel than OpenSlide's
`read_region`, which stays the reader for every other format (with
OpenSlide's own tile cache). The direct reader is used only after it
reproduced OpenSlide's pixels on a probe region of the slide.

Scaled decoding (`scaled_decode`, on by default): when the read size is at
least twice the encoder's input (512 px at 0.25 µm/px -> 224 px), JPEG tiles
are decoded at 1/2 (1/4, 1/8) of their size by libjpeg-turbo's scaled IDCT,
which skips most of the inverse DCT and colour conversion and leaves a
quarter of the pixels to copy and resize: about a third less CPU per patch
(see `benchmarks.read_path`). The scaled IDCT is itself a low-pass
downsampling, a slightly sharper one than an antialiased resize from full
size: on tissue the patch the encoder sees differs by 1-3 grey levels on
average. A slide gets it only after a probe patch agreed with the
full-resolution path within `SCALED_PROBE_MEAN_DIFF` grey levels on average;
a misread colour space differs by tens.

`choose_reader` picks the reader for a slide level once (it probes the slide);
`open_reader` opens it, in the process that reads (patch_batches.py's `PatchBatches`).
"""

from __future__ import annotations

import collections
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

TILE_CACHE_BYTES = 48 << 20
# Vendors whose levels are plain tiled TIFF pages that tifffile decodes as OpenSlide does. Every
# other vendor is read by OpenSlide: a DICOM-WSI ("dicom") keeps its frames in several files of a series.
DIRECT_TIFF_VENDORS = ("aperio", "generic-tiff")
PROBE_MAX_ABS_DIFF = 2
# Tile decoding at 1/scale (libjpeg-turbo's scaled IDCT through OpenCV).
DECODE_SCALES = (8, 4, 2)
_CV2_REDUCED = {2: 16, 4: 32, 8: 64}  # OpenCV's IMREAD_REDUCED_* bits, combined with IMREAD_COLOR_RGB
SCALED_PROBE_MEAN_DIFF = 8.0
# Photometric interpretation -> Adobe APP14 colour transform (0: RGB, 1: YCbCr).
# TIFF says what a JPEG tile holds; a bare JPEG decoder would have to guess
# (Aperio's tiles are RGB without the markers that say so).
_ADOBE_TRANSFORM = {2: 0, 6: 1}
T = TypeVar("T")


class RegionReader(Protocol):
    kind: str

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at the reader's level; zeros outside the image."""

    def read_into(self, x: int, y: int, out: np.ndarray) -> None:
        """`read` into a preallocated (height, width, 3) array."""

    def read_many(self, xy: np.ndarray, out: np.ndarray, threads: ReadThreads | None = None) -> None:
        """Region k at `xy[k]` into `out[k]` (n, height, width, 3), decoding on `threads` if given."""

    def close(self) -> None: ...


class ReadThreads:
    """Threads of this process that share the decoding of one batch.

    Used when no DataLoader worker processes read (`num_workers=0`): on a CPU
    the encoder already keeps every core busy, so reading in between forward
    passes on all cores beats reading beside them in another process, which
    also pays a fork and copy-on-write faults per slide (`benchmarks.features`).
    """

    def __init__(self, n: int):
        self.n = max(1, int(n))
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="gcmlm-read")

    def map_parts(self, fn: Callable[[range], T], n_items: int) -> list[tuple[range, T]]:
        """`fn` on contiguous parts of range(n_items), one part per thread (at most `n`): [(part, result)]."""
        bounds = np.linspace(0, n_items, min(self.n, n_items) + 1).astype(int) if n_items else [0]
        parts = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        return list(zip(parts, self._pool.map(fn, parts)))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class OpenSlideReader:
    """Any format OpenSlide opens; `read_region` returns un-premultiplied RGBA."""

    kind = "openslide"

    def __init__(self, slide_path: Path, level: int):
        import openslide

        self._slide = openslide.OpenSlide(str(slide_path))
        self._level = level
        self._downsample = self._slide.level_downsamples[level]

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        location = (int(round(x * self._downsample)), int(round(y * self._downsample)))
        rgba = np.asarray(self._slide.read_region(location, self._level, (width, height)))
        # Transparent pixels (outside the slide) come back as RGBA 0, i.e. black,
        # as CLAM's `.convert("RGB")` gives.
        return rgba[..., :3]

    def read_into(self, x: int, y: int, out: np.ndarray) -> None:
        out[:] = self.read(x, y, out.shape[1], out.shape[0])

    def read_many(self, xy: np.ndarray, out: np.ndarray, threads: ReadThreads | None = None) -> None:
        def read_part(part: range) -> None:
            for k in part:
                self.read_into(int(xy[k, 0]), int(xy[k, 1]), out[k])

        if threads is None:
            read_part(range(len(xy)))
        else:
            # One OpenSlide handle serves several threads (its C library is
            # thread-safe, and ctypes releases the GIL during the call).
            threads.map_parts(read_part, len(xy))

    def close(self) -> None:
        self._slide.close()


def decode_scale(read_size: int, input_size: int) -> int:
    """The largest 1/scale JPEG decoding that still leaves at least `input_size` px (1: none)."""
    for scale in DECODE_SCALES:
        if read_size % scale == 0 and read_size // scale >= input_size:
            return scale
    return 1


class TiffTileReader:
    """Decodes the tiles of one TIFF page directly, each once while it stays cached.

    With `scale` > 1 (JPEG tiles only) every tile is decoded at 1/scale of its
    size, and coordinates and sizes are in that reduced grid.
    """

    kind = "tiff-tiles"

    def __init__(self, slide_path: Path, page_index: int, cache_bytes: int = TILE_CACHE_BYTES, scale: int = 1):
        import tifffile

        self._tiff = tifffile.TiffFile(str(slide_path))
        self._page = self._tiff.pages[page_index]
        page = self._page
        self._scale = scale
        self._jpeg_header = b""
        if scale != 1:
            if scale not in _CV2_REDUCED:
                raise ValueError(f"decode scale must be one of {sorted(_CV2_REDUCED)}, got {scale}")
            if (page.compression != 7 or page.photometric not in _ADOBE_TRANSFORM or page.samplesperpixel != 3
                    or page.tilewidth % scale or page.tilelength % scale):
                raise ValueError(f"{slide_path}: page {page_index} cannot be decoded scaled "
                                 f"(compression {page.compression}, photometric {page.photometric})")
            tables = page.jpegtables or b""
            # SOI, an Adobe marker naming the colour transform, then the shared tables' body.
            adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([_ADOBE_TRANSFORM[page.photometric]])
            self._jpeg_header = b"\xff\xd8" + adobe + (bytes(tables[2:-2]) if tables else b"")
        self._fd = os.open(slide_path, os.O_RDONLY)
        self._tiles_x = -(-page.imagewidth // page.tilewidth)
        self._width, self._height = -(-page.imagewidth // scale), -(-page.imagelength // scale)
        self._tile_w, self._tile_h = page.tilewidth // scale, page.tilelength // scale
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._jpegtables = page.jpegtables
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._max_tiles = max(4, cache_bytes // (self._tile_w * self._tile_h * 3))

    @property
    def scale(self) -> int:
        return self._scale

    def _tile(self, index: int) -> np.ndarray:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        tile = self._decode(index)
        self._keep(index, tile)
        return tile

    def _keep(self, index: int, tile: np.ndarray) -> None:
        self._cache[index] = tile
        if len(self._cache) > self._max_tiles:
            self._cache.popitem(last=False)

    def _decode(self, index: int) -> np.ndarray:
        """Tile `index` decoded (uncached; safe to call from several threads)."""
        count = self._counts[index]
        if count == 0:
            # A sparse TIFF leaves empty tiles out; OpenSlide shows them transparent.
            return np.zeros((self._tile_h, self._tile_w, 3), np.uint8)
        data = os.pread(self._fd, count, self._offsets[index])
        if self._scale == 1:
            segment, _, _ = self._page.decode(data, index, jpegtables=self._jpegtables)
            return np.ascontiguousarray(segment.reshape(segment.shape[-3:])[..., :3])
        return self._decode_scaled(data, index)

    def _tiles_of(self, x: int, y: int, width: int, height: int) -> Iterator[int]:
        """Indices of the tiles that the region at (x, y) overlaps inside the image."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self._width), min(y + height, self._height)
        if x1 <= x0 or y1 <= y0:
            return
        for ty in range(y0 // self._tile_h, (y1 - 1) // self._tile_h + 1):
            for tx in range(x0 // self._tile_w, (x1 - 1) // self._tile_w + 1):
                yield ty * self._tiles_x + tx

    def _decode_scaled(self, data: bytes, index: int) -> np.ndarray:
        import cv2

        stream = np.frombuffer(self._jpeg_header + data[2:], np.uint8)
        tile = cv2.imdecode(stream, _CV2_REDUCED[self._scale] | cv2.IMREAD_COLOR_RGB)
        if tile is None or tile.shape != (self._tile_h, self._tile_w, 3):
            got = None if tile is None else tile.shape
            raise ValueError(f"JPEG tile {index} decoded at 1/{self._scale} gave {got}, "
                             f"expected {(self._tile_h, self._tile_w, 3)}")
        return tile

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.empty((height, width, 3), np.uint8)
        self.read_into(x, y, out)
        return out

    def read_into(self, x: int, y: int, out: np.ndarray) -> None:
        """Fill `out` (height, width, 3) with the region at (x, y): one copy from cached tiles."""
        height, width = out.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self._width), min(y + height, self._height)
        if x0 > x or y0 > y or x1 < x + width or y1 < y + height:
            out[:] = 0  # parts outside the image stay black, as OpenSlide returns them
        for index in self._tiles_of(x, y, width, height):
            tile = self._tile(index)
            ty, tx = divmod(index, self._tiles_x)
            tile_x, tile_y = tx * self._tile_w, ty * self._tile_h
            # Intersection of the tile (clipped to the image) with the request.
            ix0, iy0 = max(x0, tile_x), max(y0, tile_y)
            ix1 = min(x1, tile_x + tile.shape[1])
            iy1 = min(y1, tile_y + tile.shape[0])
            if ix1 > ix0 and iy1 > iy0:
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[iy0 - tile_y : iy1 - tile_y, ix0 - tile_x : ix1 - tile_x]

    def read_many(self, xy: np.ndarray, out: np.ndarray, threads: ReadThreads | None = None) -> None:
        """With `threads`, the tiles that the regions need and the cache lacks are decoded first, in
        parallel (the decoders run without the GIL), then copied out in this thread."""
        height, width = out.shape[1:3]
        if threads is not None:
            missing = list(dict.fromkeys(
                index for x, y in xy for index in self._tiles_of(int(x), int(y), width, height)
                if index not in self._cache))
            # More than the cache holds would evict tiles before they are copied.
            missing = missing[: self._max_tiles]
            for part, tiles in threads.map_parts(lambda part: [self._decode(missing[i]) for i in part],
                                                 len(missing)):
                for i, tile in zip(part, tiles):
                    self._keep(missing[i], tile)
        for k, (x, y) in enumerate(xy):
            self.read_into(int(x), int(y), out[k])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._tiff.close()


def _direct_tiff_page(slide_path: Path, level: int) -> int | None:
    """The TIFF page holding OpenSlide level `level`, when it can be decoded directly."""
    import openslide
    import tifffile

    with openslide.OpenSlide(str(slide_path)) as slide:
        vendor = slide.properties.get("openslide.vendor", "")
        width, height = slide.level_dimensions[level]
    if vendor not in DIRECT_TIFF_VENDORS:
        return None
    try:
        with tifffile.TiffFile(str(slide_path)) as tif:
            matches = [
                i
                for i, page in enumerate(tif.pages)
                if page.is_tiled
                and (page.imagewidth, page.imagelength) == (width, height)
                and page.samplesperpixel in (3, 4)
                and page.bitspersample == 8
                and page.planarconfig == 1
                and page.imagedepth == 1
            ]
    except Exception:  # noqa: BLE001 - tifffile cannot parse it: OpenSlide will read it
        return None
    return matches[0] if len(matches) == 1 else None


@dataclass(frozen=True)
class ReaderChoice:
    """How one slide level is read: "tiff-tiles" (TIFF `page`, tiles decoded at 1/`scale`) or "openslide"."""

    kind: str
    page: int | None = None
    scale: int = 1


OPENSLIDE = ReaderChoice("openslide")


def choose_reader(slide_path: Path, level: int, probe: tuple[int, int, int, int] | None, *,
                  scale: int = 1, input_size: int | None = None) -> ReaderChoice:
    """The fastest reader that gives this slide's pixels, checked on the `probe` region (x, y, w, h).

    Direct tile decoding must reproduce OpenSlide on the probe; decoding at
    1/`scale` must then agree with it, both resized to `input_size`, within
    `SCALED_PROBE_MEAN_DIFF` grey levels, else the slide is decoded at full size.
    """
    page = _direct_tiff_page(slide_path, level)
    if page is None:
        return OPENSLIDE
    try:
        direct = TiffTileReader(slide_path, page)
        try:
            if probe is not None:
                reference = OpenSlideReader(slide_path, level)
                try:
                    a = direct.read(*probe).astype(np.int16)
                    b = reference.read(*probe).astype(np.int16)
                finally:
                    reference.close()
                if np.abs(a - b).max(initial=0) > PROBE_MAX_ABS_DIFF:
                    return OPENSLIDE
            if scale > 1 and probe is not None and _scaled_agrees(slide_path, page, direct, probe, scale,
                                                                   input_size or probe[2] // scale):
                return ReaderChoice("tiff-tiles", page, scale)
        finally:
            direct.close()
    except Exception:  # noqa: BLE001 - a codec tifffile lacks: OpenSlide still reads it
        return OPENSLIDE
    return ReaderChoice("tiff-tiles", page, 1)


def _scaled_agrees(slide_path: Path, page: int, direct: TiffTileReader, probe: tuple[int, int, int, int],
                   scale: int, input_size: int) -> bool:
    """Whether the probe patch decoded at 1/scale matches full decoding, both resized to `input_size`."""
    x, y, width, height = probe
    if width % scale or height % scale:
        return False
    try:
        scaled = TiffTileReader(slide_path, page, scale=scale)
    except ValueError:  # not JPEG, or a colour space we cannot name
        return False
    try:
        small = scaled.read(x // scale, y // scale, width // scale, height // scale)
    except Exception:  # noqa: BLE001 - a tile OpenCV cannot decode scaled
        return False
    finally:
        scaled.close()
    full = direct.read(x, y, width, height)
    a, b = (resize_patches(p[None], input_size).to(torch.int16) for p in (small, full))
    return float((a - b).abs().float().mean()) <= SCALED_PROBE_MEAN_DIFF


def open_reader(slide_path: Path, level: int, choice: ReaderChoice) -> RegionReader:
    if choice.kind == "tiff-tiles" and choice.page is not None:
        return TiffTileReader(slide_path, choice.page, scale=choice.scale)
    return OpenSlideReader(slide_path, level)


def resize_patches(patches: np.ndarray, size: int) -> torch.Tensor:
    """uint8 NHWC patches -> uint8 NHWC (contiguous) at `size` px: antialiased bilinear, like PIL's Resize."""
    images = torch.from_numpy(patches).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    if patches.shape[1:3] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.permute(0, 2, 3, 1).contiguous()

