"""Streaming feature extraction end to end vs the encoder's forward pass alone, and its peak memory.

    python -m benchmarks.features [--patches 480] [--batch-size 32] [--workers 0] [--read-threads 0]
                                  [--encoder vit-tiny-random] [--device cpu|cuda] [--checkpoint FILE]
                                  [--repeats 6] [--rates-only] [--diagnose]

On a GPU: `--encoder uni --device cuda --batch-size 256 --workers 8 --patches 2896` (the whole
slide) gives UNI patches/s (bar: 3,000/s on one H100). Without `--checkpoint`, an encoder that
needs weights gets random ones written to a temporary file: throughput does not depend on the
weights.

On the large pyramidal slide of `benchmarks.slides`, tiled by `patch_coords`'
tiler (512 px read at level 0, resized to 224 px):

- forward only: the encoder on already-normalised batches of real patches,
  `batch-size` at a time, under `torch.inference_mode`: the rate that
  extraction would reach if reading cost nothing;
- end to end: `extract_slide_features` (reading and resizing, normalisation,
  encoder, HDF5 appends, rename) on the same number of patches and batch
  size, reading as `--workers` / `--read-threads` say (defaults: the
  extractor's CPU defaults, i.e. in this process on torch's thread count).
  Reading costs nothing when this reaches the forward-only rate. The runs are
  timed `--repeats` times in adjacent groups (rotating which goes first) and
  the table gives medians, with the ratio taken per group: a shared
  machine's speed drifts by several per cent between runs;
- with `--diagnose`, also the extractor reading in one DataLoader worker
  process instead (`--workers 1`, the GPU way), and with reading taken out
  (every batch the same prepared pixels): what is left of the gap to the
  forward pass is then the extraction loop itself (normalisation, HDF5), not
  reading;
- peak RSS of the extraction at 1x and 4x the patch count (at most a quarter
  of the slide, and the whole slide), each in a fresh subprocess (`VmHWM` of
  the process, `ru_maxrss` of its largest DataLoader worker, if any), with
  the CPU time per patch of all its processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.read_path import coords_file, tiled_benchmark_slide
from gcmlm_assets.pathology import extract
from gcmlm_assets.pathology.encoders import load_encoder
from gcmlm_assets.pathology.extract import extract_slide_features, normalisation_constants, normalise_batch
from gcmlm_assets.pathology.patch_batches import PatchBatches, block_major_order, describe_reading
from gcmlm_assets.pathology.patch_grid import read_patch_grid
from gcmlm_assets.pathology.region_readers import OPENSLIDE


def benchmark_encoder(args: argparse.Namespace, tmp: Path):
    """The encoder to time: `--checkpoint`, or random weights saved to `tmp` when it needs a file."""
    from gcmlm_assets.pathology.encoders import get_spec

    spec = get_spec(args.encoder)
    checkpoint = args.checkpoint or None
    if checkpoint is None and spec.requires_checkpoint:
        from safetensors.torch import save_file

        torch.manual_seed(0)
        checkpoint = tmp / f"{args.encoder}-random.safetensors"
        save_file({k: v.contiguous() for k, v in spec.build().state_dict().items()}, str(checkpoint))
    return load_encoder(args.encoder, checkpoint, args.device)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_only(encoder, slide_path: Path, coords_path: Path, n_patches: int, batch_size: int) -> float:
    """Seconds for the encoder alone over `n_patches`, in batches of real, normalised patches."""
    grid = read_patch_grid(coords_path)
    level_xy = grid.coords.astype(np.int64)  # level 0 on this slide
    batches = PatchBatches(slide_path, level_xy, block_major_order(level_xy, grid.read_size), grid.read_size,
                           encoder.spec.input_size, batch_size, OPENSLIDE, grid.patch_level)
    mean, inv_std = normalisation_constants(encoder, encoder.device)
    images = normalise_batch(batches[0]["images"].to(encoder.device), mean, inv_std).contiguous(
        memory_format=torch.channels_last)
    batches.close()
    # The batches the extractor runs: full ones, then the remainder.
    sizes = [batch_size] * (n_patches // batch_size) + ([n_patches % batch_size] if n_patches % batch_size else [])
    cuda = encoder.device.type == "cuda"
    # The same precision as the extractor: bf16 autocast on CUDA, float32 on CPU.
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
        encoder.module(images)  # warm-up
        _synchronise(encoder.device)
        started = time.perf_counter()
        for size in sizes:
            encoder.module(images[:size]).float().cpu().numpy()
        _synchronise(encoder.device)
        return time.perf_counter() - started


def peak_rss_mib() -> float:
    """This process's peak RSS since it started its program.

    `ru_maxrss` is not that: after fork + exec it starts from the RSS the
    parent had when it forked, so a large benchmark parent would inflate it.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One extraction in this (fresh) process; prints its rate and peak RSS as JSON."""
    slide_path, tiling = tiled_benchmark_slide()
    with tempfile.TemporaryDirectory() as tmp:
        encoder = benchmark_encoder(args, Path(tmp))
        coords_path = coords_file(tiling, args.child, Path(tmp))
        result = extract_slide_features(slide_path, coords_path, Path(tmp) / "features.h5", encoder,
                                        fingerprint="benchmark", batch_size=args.batch_size,
                                        num_workers=args.workers, read_threads=args.read_threads)
    print(json.dumps({
        "patches": result.n_patches,
        "seconds": result.seconds,
        "rss_mib": peak_rss_mib(),
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cpu_s": sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                     for f in ("ru_utime", "ru_stime")),
    }))


class PreparedBatches(PatchBatches):
    """The extractor's batches with reading taken out: the first batch's pixels, read once per
    process, stand in for every batch (with each batch's own indices)."""

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        if getattr(self, "_prepared_pid", None) != os.getpid():
            self._prepared = super().__getitem__(0)["images"]
            self._prepared_pid = os.getpid()
        indices = self.order[item * self.batch_size : (item + 1) * self.batch_size]
        return {"images": self._prepared[: len(indices)].clone(), "index": torch.from_numpy(indices)}


@contextlib.contextmanager
def reading_replaced():
    """`extract_slide_features` with `PreparedBatches` in place of `PatchBatches`."""
    saved = extract.PatchBatches
    extract.PatchBatches = PreparedBatches
    try:
        yield
    finally:
        extract.PatchBatches = saved


def run_child(args: argparse.Namespace, n_patches: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.features", "--child", str(n_patches), "--batch-size",
               str(args.batch_size), "--workers", str(args.workers), "--read-threads", str(args.read_threads),
               "--encoder", args.encoder,
               "--device", args.device] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: read in-process)")
    parser.add_argument("--read-threads", type=int, default=0,
                        help="with --workers 0, threads decoding each batch (0: torch's thread count)")
    parser.add_argument("--encoder", default="vit-tiny-random")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--checkpoint", default="", help="weights file (default: random weights if needed)")
    parser.add_argument("--repeats", type=int, default=6, help="timed groups (one run of each kind per group)")
    parser.add_argument("--rates-only", action="store_true", help="skip the peak-RSS runs")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time the extractor with 1 DataLoader worker, and with reading taken out")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    slide_path, tiling = tiled_benchmark_slide()
    n = min(args.patches, tiling.n_patches)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = benchmark_encoder(args, Path(tmp))
        coords_path = coords_file(tiling, n, Path(tmp))
        results = []

        def run_forward() -> float:
            return forward_only(encoder, slide_path, coords_path, n, args.batch_size)

        def run_end_to_end(workers: int = args.workers) -> float:
            result = extract_slide_features(slide_path, coords_path, Path(tmp) / "features.h5", encoder,
                                            fingerprint=f"run-{time.time()}", batch_size=args.batch_size,
                                            num_workers=workers, read_threads=args.read_threads)
            results.append(result)
            return result.seconds

        def run_without_reading() -> float:
            with reading_replaced():
                return run_end_to_end()

        runs = {"forward pass only": run_forward, "end to end (streaming extractor)": run_end_to_end}
        if args.diagnose:
            if args.workers != 1:
                runs["end to end, 1 DataLoader worker"] = lambda: run_end_to_end(1)
            runs["end to end, reading taken out"] = run_without_reading
        seconds = {name: [] for name in runs}
        # Timed in adjacent groups, in rotating order, so that a slower spell of
        # a shared machine hits every run of a group alike: ratios are per group.
        for repeat in range(args.repeats):
            names = list(runs)
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                seconds[name].append(runs[name]())

    forward = np.array(seconds["forward pass only"])
    result = results[-1]
    print(f"encoder {args.encoder} on {encoder.device}, batch {args.batch_size}, "
          f"reading {describe_reading(args.workers, args.read_threads)}, "
          f"torch threads {torch.get_num_threads()}, reader {result.reader_label}; {args.repeats} timed groups, medians")
    print()
    print(f"| {'run':<34} | {'patches':>7} | {'seconds':>7} | {'patches/s':>9} | {'% of forward':>12} "
          f"| {'range of %':>11} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 14}|{'-' * 13}|")
    for name, times in seconds.items():
        median = float(np.median(times))
        ratios = 100 * forward / np.array(times)
        print(f"| {name:<34} | {n:>7} | {median:>7.2f} | {n / median:>9.1f} | {np.median(ratios):>11.1f}% "
              f"| {ratios.min():>4.0f}-{ratios.max():.0f} % |")
    print("\n% of forward: median over the groups of forward seconds / this run's seconds (bar: 95 %)")
    if args.rates_only:
        return
    memory_n = min(n, tiling.n_patches // 4)  # 4x must fit on the slide
    single, quadruple = run_child(args, memory_n), run_child(args, 4 * memory_n)
    print()
    workers = args.workers > 0
    print(f"| {'peak RSS, fresh process':<34} | {'patches':>7} | {'main MiB':>8} | {'worker MiB':>10} "
          f"| {'patches/s':>9} | {'CPU ms/patch':>12} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 10}|{'-' * 12}|{'-' * 11}|{'-' * 14}|")
    for name, run in (("1x", single), ("4x", quadruple)):
        worker_mib = f"{run['worker_rss_mib']:.0f}" if workers else "-"
        print(f"| {name:<34} | {run['patches']:>7} | {run['rss_mib']:>8.0f} | {worker_mib:>10} "
              f"| {run['patches'] / run['seconds']:>9.1f} | {1000 * run['cpu_s'] / run['patches']:>12.2f} |")
    growth = 100 * (quadruple["rss_mib"] / single["rss_mib"] - 1)
    line = f"\npeak RSS 4x vs 1x: main {growth:+.1f} %"
    if workers:
        line += f", worker {100 * (quadruple['worker_rss_mib'] / max(single['worker_rss_mib'], 1e-9) - 1):+.1f} %"
    print(line + " (bound: 20 %); CPU ms/patch: user + system time of the process and its workers, incl. start-up")


if __name__ == "__main__":
    main()
