"""The patch read path alone (read, decode, resize, normalise; no model), patches/s on ONE core.

    python -m benchmarks.read_path [--patches N] [--repeats 2]

On the large pyramidal slide of `benchmarks.slides` (40,000 x 40,000 px at
0.25 µm/px, JPEG tiles of 512 px), tiled by `patch_coords`' own tiler at its
defaults (256 px at 0.5 µm/px: 512 px read at level 0, resized to the
encoder's 224 px), compares:

- simple: the simplest correct loop, in the tiler's order: one
  `read_region` per patch, `.convert("RGB")`, torchvision `Resize(224)`,
  `ToTensor`, `Normalize`;
- streaming, direct tile decode: `patch_batches.PatchBatches` as a DataLoader
  worker runs it (block-major order, JPEG tiles decoded directly and cached,
  batched antialiased resize on uint8) plus the batched normalisation the main
  process does;
- streaming, direct tile decode at 1/2: the same, with the JPEG tiles decoded
  at half size by libjpeg-turbo's scaled IDCT (256 px, then resized to 224):
  what `uni_features` does by default when the read size allows it;
- streaming, OpenSlide read_region: the same batches with regions read by
  OpenSlide (the path every non-TIFF format takes).

Everything runs in this process with one thread (torch, OpenCV), so the rates
are per core. The last column compares each path's first batch with the
simple loop's pixels (maximum and mean absolute difference, in grey levels).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
import torch
from torchvision import transforms

from benchmarks.slides import build_pyramidal_slide
from gcmlm_assets.pathology.coords_h5 import write_coords_h5
from gcmlm_assets.pathology.encoders import IMAGENET_MEAN, IMAGENET_STD
from gcmlm_assets.pathology.extract import normalise_batch
from gcmlm_assets.pathology.patch_batches import PatchBatches, block_major_order
from gcmlm_assets.pathology.patch_grid import read_patch_grid
from gcmlm_assets.pathology.region_readers import OPENSLIDE, choose_reader, decode_scale
from gcmlm_assets.pathology.slides import PLAUSIBLE_MPP, opened
from gcmlm_assets.pathology.tiling import tile_slide
from gcmlm_assets.pathology.tiling_params import TilingParams, TilingResult

INPUT_SIZE = 224
BATCH_SIZE = 64


def tiled_benchmark_slide() -> tuple[Path, TilingResult]:
    """The large slide (built once, cached in benchmarks/out) and patch_coords' default tiling of it."""
    path = build_pyramidal_slide()
    with opened(path, default_mpp=0.5, plausible_mpp=PLAUSIBLE_MPP) as slide:
        return path, tile_slide(slide, TilingParams())


def coords_file(result: TilingResult, n_patches: int, folder: Path) -> Path:
    """The first `n_patches` of the tiling (its own order) as a patch_coords HDF5 file."""
    subset = dataclasses.replace(result, coords=result.coords[:n_patches])
    return write_coords_h5(folder / f"{result.name}_{n_patches}.h5", subset)


def simple_loop(slide_path: Path, coords: np.ndarray, level: int, read_size: int) -> list[torch.Tensor]:
    transform = transforms.Compose([transforms.Resize(INPUT_SIZE), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with openslide.OpenSlide(str(slide_path)) as slide:
        return [transform(slide.read_region((int(x), int(y)), level, (read_size, read_size)).convert("RGB"))
                for x, y in coords]


def streaming(slide_path: Path, coords_path: Path, reader_kind: str, keep: int = 0, scale: int = 1):
    grid = read_patch_grid(coords_path)
    with openslide.OpenSlide(str(slide_path)) as slide:
        downsample = slide.level_downsamples[grid.patch_level]
    level_xy = np.floor(grid.coords / downsample).astype(np.int64)
    order = block_major_order(level_xy, grid.read_size)
    choice = OPENSLIDE
    if reader_kind == "tiff-tiles":
        choice = choose_reader(slide_path, grid.patch_level,
                               (int(level_xy[0, 0]), int(level_xy[0, 1]), grid.read_size, grid.read_size),
                               scale=scale, input_size=INPUT_SIZE)
        assert choice.kind == "tiff-tiles" and choice.scale == scale, f"the benchmark slide gave {choice}"
    batches = PatchBatches(slide_path, level_xy, order, grid.read_size, INPUT_SIZE, BATCH_SIZE, choice,
                           grid.patch_level)
    mean = torch.tensor(IMAGENET_MEAN) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD) * 255.0)
    kept, kept_index = [], []
    buffer = torch.empty((BATCH_SIZE, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.float32)
    try:
        for item in range(len(batches)):
            batch = batches[item]
            images = normalise_batch(batch["images"], mean, inv_std, buffer)
            if sum(len(k) for k in kept) < keep:
                kept.append(images.clone())
                kept_index.append(batch["index"])
    finally:
        batches.close()
    return (torch.cat(kept), torch.cat(kept_index)) if kept else (None, None)


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def compare(slide_path: Path, coords_path: Path, repeats: int) -> list[tuple[str, float, str]]:
    """(method, seconds, pixel difference to the simple loop) rows for one set of patches."""
    grid = read_patch_grid(coords_path)
    rows = [("simple: read_region + PIL resize + torchvision",
             best_of(repeats, lambda: simple_loop(slide_path, grid.coords, grid.patch_level, grid.read_size)), "")]
    scale = decode_scale(grid.read_size, INPUT_SIZE)
    methods = [("tiff-tiles", 1, "direct tile decode"), ("openslide", 1, "OpenSlide read_region")]
    if scale > 1:
        methods.insert(1, ("tiff-tiles", scale, f"direct tile decode at 1/{scale}"))
    std_255 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
    for kind, method_scale, label in methods:
        # Pixel agreement on the first streamed batch: same patches, same transform.
        images, index = streaming(slide_path, coords_path, kind, keep=BATCH_SIZE, scale=method_scale)
        reference = torch.stack(simple_loop(slide_path, grid.coords[index.numpy()], grid.patch_level,
                                            grid.read_size))
        grey_levels = (images - reference).abs() * std_255
        seconds = best_of(repeats, lambda: streaming(slide_path, coords_path, kind, scale=method_scale))
        rows.append((f"streaming, {label}, batched resize + normalise", seconds,
                     f"{grey_levels.amax().item():.1f} / {grey_levels.mean().item():.2f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=0, help="first N patches of the tiling (0: all)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    slide_path, tiling = tiled_benchmark_slide()
    n = min(args.patches or tiling.n_patches, tiling.n_patches)
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        aligned = coords_file(tiling, n, Path(tmp))
        tables["tiler's grid (aligned with the 512 px tiles)"] = compare(slide_path, aligned, args.repeats)
        # Grids that start at each tissue region's corner (CLAM's) need not meet
        # the tile grid: every patch then touches four tiles.
        shifted = dataclasses.replace(tiling, coords=tiling.coords[:n] + 200)
        offset = write_coords_h5(Path(tmp) / "offset.h5", shifted)
        tables["same grid moved by (200, 200) px: 4 tiles per patch"] = compare(slide_path, offset, args.repeats)
        read_size, level = read_patch_grid(aligned).read_size, read_patch_grid(aligned).patch_level

    with openslide.OpenSlide(str(slide_path)) as slide:
        dims, props = slide.dimensions, dict(slide.properties)
    print(f"slide {slide_path.name}: {dims[0]}x{dims[1]} px, {props.get('openslide.mpp-x')} µm/px, "
          f"tiles {props.get('openslide.level[0].tile-width')} px JPEG; {n} patches, "
          f"{read_size} px read at level {level} -> {INPUT_SIZE} px; 1 thread; best of {args.repeats}")
    for title, rows in tables.items():
        simple_s = rows[0][1]
        print(f"\n{title}\n")
        print(f"| {'method':<66} | {'patches':>7} | {'seconds':>7} | {'patches/s/core':>14} | {'vs simple':>9} "
              f"| {'diff max / mean (grey)':>22} |")
        print(f"|{'-' * 68}|{'-' * 9}|{'-' * 9}|{'-' * 16}|{'-' * 11}|{'-' * 24}|")
        for name, seconds, diff in rows:
            print(f"| {name:<66} | {n:>7} | {seconds:>7.2f} | {n / seconds:>14.1f} | {simple_s / seconds:>8.2f}x "
                  f"| {diff:>22} |")


if __name__ == "__main__":
    main()
