"""Seconds per slide, patches found and peak memory of `patch_coords`' work on a large slide.

    python -m benchmarks.tiling [--size 40000] [--repeats 3]

Builds (once, cached under benchmarks/out/) a 40,000 x 40,000 px JPEG-tiled
pyramidal TIFF of real tissue (see benchmarks/slides.py), then runs what the
asset does for one patient -- open and verify the slide, segment tissue, lay
the grid, write the HDF5, the picture and slides.json -- in a fresh process
per (slide, mode), so that each peak RSS is that run's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.slides import build_pyramidal_slide, shared_slide_path


def peak_rss_mib() -> float:
    """This process's own peak RSS. VmHWM belongs to the address space made at exec; ru_maxrss
    would also carry the parent's peak over fork + exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(slide: Path, mode: str, repeats: int, clam_preset: str | None) -> dict:
    """Runs in the child process."""
    from gcmlm_assets.pathology.patch_coords import tile_patient, write_patient_outputs
    from gcmlm_assets.pathology.tiling_params import ClamParams, TilingParams

    clam = ClamParams.from_preset_csv(clam_preset) if clam_preset else ClamParams()
    params = TilingParams(mode=mode, clam=clam)
    baseline_mib = peak_rss_mib()
    seconds, n_patches = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            outcomes = tile_patient([slide], params)
            if outcomes[0].error:
                raise RuntimeError(outcomes[0].error)
            listing = write_patient_outputs(Path(out), "BENCH", outcomes, params)
            seconds.append(time.perf_counter() - started)
            n_patches = listing["n_patches"]
    return {"seconds": seconds, "n_patches": n_patches,
            "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline_mib,
            "read_size": int(outcomes[0].result.attrs["read_size"]),
            "level": int(outcomes[0].result.attrs["patch_level"])}


def run_child(slide: Path, mode: str, repeats: int, clam_preset: Path | None) -> dict:
    preset = ["--clam-preset", str(clam_preset)] if clam_preset else []
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.tiling", "--child", str(slide), "--mode", mode,
         "--repeats", str(repeats), *preset],
        capture_output=True, text=True,
    )
    if output.returncode != 0:
        raise RuntimeError(f"benchmark of {slide.name} ({mode}) failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=40_000)
    parser.add_argument("--flat-size", type=int, default=20_000, help="side of the one-level slide")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--mode", default="default")
    parser.add_argument("--clam-preset", help="CLAM preset CSV for the clam rows "
                        "(default: the one the shared CLAM reference was made with)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child), args.mode, args.repeats, args.clam_preset)))
        return
    preset = Path(args.clam_preset) if args.clam_preset else \
        shared_slide_path().parents[2] / "reference" / "clam" / "params.csv"

    started = time.perf_counter()
    large = build_pyramidal_slide(width=args.size, height=args.size)
    import openslide

    # A one-level slide has no pyramid to segment on: it is streamed from level 0 in strips.
    flat = build_pyramidal_slide(width=args.flat_size, height=args.flat_size, downsamples=(1,))
    build_s = time.perf_counter() - started
    cases = [(large, "default"), (large, "clam"), (flat, "default"),
             (shared_slide_path(), "default"), (shared_slide_path(), "clam")]
    rows = []
    for slide, mode in cases:
        with openslide.OpenSlide(str(slide)) as handle:
            width, height = handle.dimensions
            levels = handle.level_count
            mpp = float(handle.properties.get("openslide.mpp-x", "nan"))
        stats = run_child(slide, mode, args.repeats, preset if preset.is_file() else None)
        rows.append((f"{slide.name}", f"{width:,}x{height:,} px, {levels} lvl, {mpp:g} µm/px", mode,
                     f"{statistics.median(stats['seconds']):.2f}", f"{min(stats['seconds']):.2f}",
                     f"{stats['n_patches']:,}", f"L{stats['level']} x {stats['read_size']} px",
                     f"{stats['peak_rss_mib']:.0f}", f"{stats['peak_rss_mib'] - stats['baseline_rss_mib']:.0f}"))

    header = ("slide", "size", "mode", "s/slide (median)", "s (best)", "patches", "read", "peak RSS MiB",
              "RSS over imports MiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"slide build (cached after first run): {build_s:.1f} s; {args.repeats} runs per row, one process per row; "
          f"clam rows use {preset if preset.is_file() else 'CLAM defaults'}")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
