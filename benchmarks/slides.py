"""Large synthetic whole-slide images for benchmarks, built from real tissue.

    python -m benchmarks.slides [--size 40000] [--tile 512]

`build_pyramidal_slide()` writes a JPEG-tiled pyramidal TIFF (generic TIFF as
OpenSlide reads it: levels in the main directory chain, resolution tags in
centimetres) whose tissue tiles are crops of the shared
`cmu-1-small-region.svs`, upsampled to the requested µm/px, arranged in a few
blob-shaped tissue islands on white glass. The tiles are produced and encoded
one at a time, so building a 40,000 x 40,000 px slide needs little memory. The
result is cached beside a JSON of the parameters that made it: a second call
with the same parameters returns at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile

from gcmlm_assets.storage import atomic_path

OUT_DIR = Path(__file__).resolve().parent / "out"
SOURCE_NAME = "cmu-1-small-region.svs"
BUILDER_VERSION = 1


def shared_slide_path() -> Path:
    root = Path(os.environ.get("GCMLM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "wsi" / SOURCE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set GCMLM_TEST_DATA to the shared data folder)")
    return path


def tissue_crops(source: Path, crop: int, out_size: int, min_tissue: float = 0.6) -> list[np.ndarray]:
    """Tissue-rich `crop` px squares of the source slide, resized to `out_size`, with their
    rotations and mirror images (8 variants each) so that the mosaic does not repeat visibly."""
    with openslide.OpenSlide(str(source)) as slide:
        image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    saturation = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1]
    crops = []
    for y in range(0, image.shape[0] - crop + 1, crop // 2):
        for x in range(0, image.shape[1] - crop + 1, crop // 2):
            if (saturation[y:y + crop, x:x + crop] > 20).mean() >= min_tissue:
                piece = cv2.resize(image[y:y + crop, x:x + crop], (out_size, out_size),
                                   interpolation=cv2.INTER_CUBIC if out_size > crop else cv2.INTER_AREA)
                for k in range(4):
                    rotated = np.rot90(piece, k)
                    crops.append(np.ascontiguousarray(rotated))
                    crops.append(np.ascontiguousarray(rotated[:, ::-1]))
    if not crops:
        raise ValueError(f"no tissue crops found in {source}")
    return crops


def tissue_layout(n_x: int, n_y: int, rng: np.random.Generator, islands: int = 5) -> np.ndarray:
    """(n_y, n_x) bool: which level-0 tiles are tissue. A few overlapping ellipses
    covering roughly 40 % of the slide, like several sections on one glass."""
    yy, xx = np.mgrid[0:n_y, 0:n_x]
    layout = np.zeros((n_y, n_x), bool)
    for _ in range(islands):
        cx, cy = rng.uniform(0.2, 0.8) * n_x, rng.uniform(0.2, 0.8) * n_y
        rx, ry = rng.uniform(0.12, 0.25) * n_x, rng.uniform(0.12, 0.25) * n_y
        angle = rng.uniform(0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        layout |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return layout


def build_pyramidal_slide(path: str | os.PathLike | None = None, *, width: int = 40_000, height: int = 40_000,
                          mpp: float = 0.25, tile: int = 512, downsamples: tuple[int, ...] = (1, 4, 16, 64),
                          quality: int = 80, seed: int = 0, source: str | os.PathLike | None = None,
                          force: bool = False) -> Path:
    """Build (or reuse) a JPEG-tiled pyramidal TIFF of real tissue; returns its path."""
    source = Path(source) if source else shared_slide_path()
    path = Path(path) if path else OUT_DIR / f"tissue_{width}x{height}_t{tile}_l{len(downsamples)}.tiff"
    recipe = {"builder": BUILDER_VERSION, "width": width, "height": height, "mpp": mpp, "tile": tile,
              "downsamples": list(downsamples), "quality": quality, "seed": seed, "source": source.name,
              "source_bytes": source.stat().st_size}
    sidecar = path.with_suffix(path.suffix + ".json")
    if not force and path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text(encoding="utf-8")) == recipe:
        return path
    if downsamples[0] != 1 or any(tile % d for d in downsamples):
        raise ValueError("downsamples must start at 1 and divide the tile size")

    rng = np.random.default_rng(seed)
    with openslide.OpenSlide(str(source)) as src:
        source_mpp = float(src.properties.get("openslide.mpp-x", 0.5))
    # Crops cover one tile's field of view at the source's resolution.
    crop = max(16, int(round(tile * mpp / source_mpp)))
    bank = tissue_crops(source, crop, tile)
    n_x, n_y = math.ceil(width / tile), math.ceil(height / tile)
    layout = tissue_layout(n_x, n_y, rng)
    choice = rng.integers(0, len(bank), size=(n_y, n_x))
    glass = np.array([243, 241, 245], np.uint8)

    def level_tiles(downsample: int) -> Iterator[np.ndarray]:
        small = tile // downsample  # a level-0 tile shrinks to this many px
        shrunk = bank if downsample == 1 else [cv2.resize(b, (small, small), interpolation=cv2.INTER_AREA)
                                              for b in bank]
        level_w, level_h = width // downsample, height // downsample
        for row in range(math.ceil(level_h / tile)):
            for col in range(math.ceil(level_w / tile)):
                out = np.empty((tile, tile, 3), np.uint8)
                out[:] = glass
                for i in range(downsample):
                    for j in range(downsample):
                        ty, tx = row * downsample + i, col * downsample + j
                        if ty < n_y and tx < n_x and layout[ty, tx]:
                            out[i * small:(i + 1) * small, j * small:(j + 1) * small] = shrunk[choice[ty, tx]]
                yield out

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as writer:
            for index, downsample in enumerate(downsamples):
                level_w, level_h = width // downsample, height // downsample
                per_cm = 1e4 / (mpp * downsample)
                writer.write(
                    level_tiles(downsample), shape=(level_h, level_w, 3), dtype=np.uint8, tile=(tile, tile),
                    photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                    subfiletype=0 if index == 0 else 1, resolution=(per_cm, per_cm),
                    resolutionunit="CENTIMETER", metadata=None,
                )
    sidecar.write_text(json.dumps(recipe, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=40_000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    path = build_pyramidal_slide(width=args.size, height=args.size, tile=args.tile, force=args.force)
    with openslide.OpenSlide(str(path)) as slide:
        print(f"{path}  {path.stat().st_size / 2**20:.0f} MiB  levels {slide.level_dimensions}  "
              f"mpp {slide.properties.get('openslide.mpp-x')}  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
