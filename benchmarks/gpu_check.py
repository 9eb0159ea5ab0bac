"""The GPU checks of the production path in one script: UNI throughput, batched ct_mask, one nnU-Net epoch.

    python -m benchmarks.gpu_check [--device cuda|cpu] [--quick] [--patients 32] [--budget 480]
                                   [--only encoder,training,ct_mask]

Three sections, each through the code the assets run, each failing on its own (its error is
printed, the next one runs, and the exit status is 1 if any failed):

1. encoder: UNI's architecture (ViT-L/16, `encoders.get_spec("uni")`) with random weights
   written to a temporary safetensors file, loaded by `load_encoder` as a real checkpoint would
   be, on the large pyramidal slide of `benchmarks.slides` (2,896 patches): the encoder's forward
   pass alone and `extract_slide_features` end to end, as `python -m benchmarks.features --device
   cuda --encoder uni --batch-size 256 --workers 8` times them (its functions, reused).
2. training: `nnunet_training.train_segmentation_model` with nnU-Net's full-size `3d_fullres`
   plans and its default trainer for one short epoch, on four CTs of clinical size (the shared
   abdominal CT resampled to 0.78 x 0.78 x 2.5 mm, about 470 x 390 x 36 voxels, cropped a little
   differently each, with its stomach mask), under the compile setting the deployment chose
   (`nnUNet_compile` from deploy/helm/values.yaml: false). It reports the phases' seconds and
   what nnU-Net's trainer decided (`_do_i_compile`, the real method, its answer recorded).
3. ct_mask: N patients (default 32) predicted in one range run vs one run per patient, through
   Dagster exactly as `python -m benchmarks.batched_backfill --only ct_mask` does (its classes,
   reused), with the model section 2 trained (full-size plans, weights barely trained: the speed
   is that of a production model, the masks are not). If section 2 did not produce a model, a
   tiny one is trained first, and the table says so.

`--quick` shrinks everything so that a CPU runs it in a few minutes: the ViT-Ti random encoder on
a 4,096 px slide, tiny plans (`TinyPlans`) on four 6 mm crops, one training iteration, 2 patients.
`--budget` (seconds, default 480 on cuda) guards the total: a section starts only if its minimum
fits what is left, ct_mask predicts fewer patients when the one-patient warm-up says that N would
not fit, and the output says what was skipped or shrunk. A summary of every table is printed again
at the end, after nnU-Net's own output.

On the device machine (the `device` tool, /work/.library/device/README.md and KINDS.md): it gets a
copy of the session's checkout only (no .venv, no ../shared/data), its python3 is 3.12 with torch,
timm, numpy, h5py, tifffile, opencv, scipy, scikit-learn, pandas, pyyaml and safetensors already
there, and it reaches no package registry, so `make install` cannot run there. The rest of what this
script imports (benchmarks/gpu_check_wheels.txt: the project's pins of dagster, nnU-Net, SimpleITK,
OpenSlide, imagecodecs...) travels as wheels, about 109 MiB, more than the 64 MiB one call may carry:
SimpleITK goes in a first call, the rest in a second, both installed into `.gpu_site/`, an ignored
folder that stays on the machine between calls while it is warm (30 s after a call). Here, once:

    bash benchmarks/gpu_check_prepare.sh        # .gpu_whl1 (50 MiB), .gpu_whl2 (58 MiB), .gpu_data (2 MiB)

Device call 1, carry [".gpu_whl1", ".gpu_data"], timeout_s 120:

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu_site .gpu_whl1/*.whl

Device call 2, AT ONCE (a machine given back loses .gpu_site: then make both calls again), carry
[".gpu_whl2"], timeout_s 600:

    set -o pipefail; \\
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu_site .gpu_whl2/*.whl && \\
    PYTHONPATH=$PWD:$PWD/.gpu_site GCMLM_TEST_DATA=$PWD/.gpu_data PYTHONUNBUFFERED=1 \\
    python3 -m benchmarks.gpu_check --device cuda 2>&1 | tee $OUT/gpu_check.txt

The second call carries the checkout (about 2.4 MiB) plus 58.4 MiB of wheels: keep the checkout's
untracked files small. The device's torch (2.11) and numpy (2.5) are not the project's pins (2.14,
2.4): the card and those versions head the output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("encoder", "training", "ct_mask")
# The realistic training CTs' grid (x, y, z mm): in-plane close to a 512 x 512 CT of the abdomen.
CLINICAL_SPACING = (0.78, 0.78, 2.5)
COMPILE_SWITCH = "nnUNet_compile"


class Skipped(Exception):
    """A section that did not start: the budget left is below its minimum."""


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def require(self, section: str, minimum: float) -> None:
        if self.left() < minimum:
            raise Skipped(f"{section}: skipped, {self.left():.0f} s of the {self.seconds:.0f} s budget left, "
                          f"it needs at least {minimum:.0f} s")


@dataclass
class Report:
    """What each section printed as its result, printed again at the end; and which sections failed."""

    lines: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    model_folder: Path | None = None
    model_note: str = ""

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def device_description(device: str) -> str:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def chosen_compile_setting() -> str:
    """`nnUNet_compile` as deploy/helm/values.yaml gives it to the code location's pods."""
    import yaml

    values = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text(encoding="utf-8"))
    return str(values["dagster-user-deployments"]["deployments"][0]["env"][COMPILE_SWITCH])


# ---------------------------------------------------------------- 1. the encoder


def encoder_section(args: argparse.Namespace, budget: Budget, report: Report, work: Path) -> None:
    import numpy as np
    import torch

    from benchmarks import features
    from benchmarks.read_path import coords_file, tiled_benchmark_slide
    from benchmarks.slides import build_pyramidal_slide
    from gcmlm_assets.pathology.extract import extract_slide_features
    from gcmlm_assets.pathology.patch_batches import describe_reading
    from gcmlm_assets.pathology.slides import PLAUSIBLE_MPP, opened
    from gcmlm_assets.pathology.tiling import tile_slide
    from gcmlm_assets.pathology.tiling_params import TilingParams

    budget.require("encoder", 60 if not args.quick else 10)
    encoder_name = "vit-tiny-random" if args.quick else "uni"
    batch_size, workers = (16, 0) if args.quick else (256, 8)
    started = time.perf_counter()
    if args.quick:
        slide_path = build_pyramidal_slide(work / "quick_slide.tiff", width=4096, height=4096)
        with opened(slide_path, default_mpp=0.5, plausible_mpp=PLAUSIBLE_MPP) as slide:
            tiling = tile_slide(slide, TilingParams())
    else:
        slide_path, tiling = tiled_benchmark_slide()
    slide_seconds = time.perf_counter() - started
    n = min(64 if args.quick else 2896, tiling.n_patches)
    # benchmarks.features' own argument names: random weights saved to a file, loaded as a checkpoint.
    options = argparse.Namespace(encoder=encoder_name, checkpoint="", device=args.device)
    started = time.perf_counter()
    encoder = features.benchmark_encoder(options, work)
    load_seconds = time.perf_counter() - started
    coords_path = coords_file(tiling, n, work)
    seconds: dict[str, list[float]] = {"forward pass only": [], "end to end (streaming extractor)": []}
    result = None
    groups = 1 if args.quick else 3
    for group in range(groups):
        if group and budget.left() < 2 * sum(times[-1] for times in seconds.values()) + 300:
            report.say(f"encoder: stopped after {group} timed group(s) to keep the budget")
            break
        seconds["forward pass only"].append(features.forward_only(encoder, slide_path, coords_path, n, batch_size))
        result = extract_slide_features(slide_path, coords_path, work / "features.h5", encoder,
                                        fingerprint=f"gpu-check-{group}", batch_size=batch_size,
                                        num_workers=workers, read_threads=0)
        seconds["end to end (streaming extractor)"].append(result.seconds)
    report.say(f"## 1. encoder {encoder_name} ({encoder.spec.description}; random weights) on "
               f"{device_description(args.device)}")
    report.say(f"slide {slide_path.name} ({n} patches, built/reused in {slide_seconds:.0f} s), batch {batch_size}, "
               f"reading {describe_reading(workers, 0)}, reader {result.reader_label}, "
               f"weights written and loaded in {load_seconds:.1f} s; median of {len(seconds['forward pass only'])} "
               f"group(s), each after the first forward pass")
    report.say(f"| {'run':<34} | {'patches':>7} | {'seconds':>7} | {'patches/s':>9} | {'% of forward':>12} |")
    report.say(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 14}|")
    forward = float(np.median(seconds["forward pass only"]))
    for name, times in seconds.items():
        median = float(np.median(times))
        report.say(f"| {name:<34} | {n:>7} | {median:>7.2f} | {n / median:>9.1f} | {100 * forward / median:>11.1f}% |")
    if args.device == "cuda":
        report.say(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


# ---------------------------------------------------------------- 2. training


def training_cases(work: Path, quick: bool) -> tuple[list, str]:
    """Four labelled CTs from the shared abdominal CT: 6 mm crops (quick) or clinical-size crops."""
    import SimpleITK as sitk

    from benchmarks.batched_backfill import CT_SOURCE, STOMACH_SOURCE
    from benchmarks.nnunet_tiny import CROPS, on_grid
    from gcmlm_assets.radiology.nnunet_training import TrainingCase

    spacing = 6.0 if quick else CLINICAL_SPACING
    ct = on_grid(sitk.DICOMOrient(sitk.ReadImage(str(CT_SOURCE)), "LPS"), spacing, sitk.sitkLinear)
    stomach = on_grid(sitk.DICOMOrient(sitk.ReadImage(str(STOMACH_SOURCE)), "LPS"), spacing,
                      sitk.sitkNearestNeighbor)
    cases = []
    for index, crop in enumerate(CROPS):
        # nnunet_tiny's crops are in 6 mm voxels: the same physical boxes on this grid.
        start = [int(round(v * 6.0 / s)) for v, s in zip(crop[:3], ct.GetSpacing())]
        size = [min(int(round(v * 6.0 / s)), n - b) for v, s, n, b in zip(crop[3:], ct.GetSpacing(), ct.GetSize(),
                                                                           start)]
        image_file, mask_file = work / f"case{index}_ct.nii.gz", work / f"case{index}_mask.nii.gz"
        sitk.WriteImage(sitk.RegionOfInterest(ct, size, start), str(image_file), True)
        sitk.WriteImage(sitk.RegionOfInterest(stomach, size, start), str(mask_file), True)
        cases.append(TrainingCase(f"case{index}", image_file, mask_file))
    sizes = [sitk.ReadImage(str(case.image)).GetSize() for case in cases]
    return cases, f"{len(cases)} CTs at {spacing} mm, {sizes[0]} .. {sizes[-1]} voxels"


def training_section(args: argparse.Namespace, budget: Budget, report: Report, work: Path) -> None:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from benchmarks.batched_backfill import replaced
    from gcmlm_assets.radiology import nnunet_training
    from gcmlm_assets.radiology.resources import SegmentationModelResource
    from gcmlm_assets.settings import scoped_environment

    budget.require("training", 150 if not args.quick else 30)
    iterations, val_iterations = (1, 1) if args.quick else (25, 5)
    resource = SegmentationModelResource(
        trainer="nnUNetTrainer", epochs=1, iterations_per_epoch=iterations, val_iterations=val_iterations,
        tiny_plans=args.quick, device=args.device, preprocessing_workers=1 if args.quick else 8,
        augmentation_workers=0 if args.quick else None, torch_threads=1 if args.quick else None)
    refusal = resource.training_refusal()
    if refusal:
        raise RuntimeError(refusal)
    settings = resource.training_settings()
    (work / "cases").mkdir()
    cases, cases_note = training_cases(work / "cases", args.quick)
    compile_setting = chosen_compile_setting()
    decisions: list[bool] = []
    real_decision = nnUNetTrainer.__dict__["_do_i_compile"]

    def recorded_decision(trainer) -> bool:
        decision = bool(real_decision(trainer))
        decisions.append(decision)
        return decision

    lines: list[str] = []
    with scoped_environment({COMPILE_SWITCH: compile_setting}), \
            replaced(nnUNetTrainer, "_do_i_compile", recorded_decision):
        result = nnunet_training.train_segmentation_model(cases, work / "nnunet", settings, lines.append)
    compiled = ("yes" if decisions[-1] else "no") if decisions else "not asked (the trainer never decided)"
    report.say(f"## 2. nnU-Net training, {'TINY plans (--quick)' if args.quick else 'full-size plans'}, "
               f"{result.trainer}, on {device_description(args.device)}")
    report.say(f"cases: {cases_note}; {COMPILE_SWITCH}={compile_setting} (deploy/helm/values.yaml); "
               f"torch.compile used (trainer's _do_i_compile): {compiled}")
    for line in lines:
        report.say(f"  {line}")
    report.say(f"| {'phase':<22} | {'seconds':>7} |")
    report.say(f"|{'-' * 24}|{'-' * 9}|")
    for phase in ("dataset", "plan_and_preprocess", "train", "total"):
        report.say(f"| {phase:<22} | {result.seconds[phase]:>7.1f} |")
    report.say(f"{result.epochs} epoch x {result.iterations_per_epoch} + {result.val_iterations} iterations; "
               f"final train loss {result.metrics['final_train_loss']:.4f}, pseudo Dice "
               f"{result.metrics['final_pseudo_dice'] or 0:.4f}; CPU s (process + workers) {result.cpu_seconds:.0f}")
    report.model_folder = result.model_folder
    report.model_note = (f"{'TINY' if args.quick else 'FULL-SIZE'} nnU-Net ({result.plans_name} 3d_fullres, "
                         f"{result.trainer}) from section 2: {result.epochs} x {result.iterations_per_epoch} "
                         "iterations, so its masks mean nothing; its speed is the model's")


# ---------------------------------------------------------------- 3. ct_mask


def checkpoint_digest(model_folder: Path) -> str:
    [checkpoint] = sorted(model_folder.glob("fold_*/checkpoint_final.pth"))
    return hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def ct_mask_section(args: argparse.Namespace, budget: Budget, report: Report, work: Path) -> None:
    import dagster as dg

    from benchmarks.batched_backfill import (
        BATCHED,
        PER_PATIENT,
        CtMaskBench,
        failure_messages,
        print_table,
        summary_rows,
    )
    from gcmlm_assets.radiology.resources import RadiomicsSettings

    minimum = 60 if report.model_folder else 240  # without a model, a tiny one is trained first
    budget.require("ct_mask", minimum if not args.quick else 20)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    logging.getLogger("nnunetv2").setLevel(logging.WARNING)
    folder = str(report.model_folder) if report.model_folder else None
    (work / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(work / "dagster_home")) as instance:
        bench = CtMaskBench.build(work, instance, args.patients, folder, False, device=args.device,
                                  model_sha256=checkpoint_digest(report.model_folder) if folder else None)
        # The model's masks mean nothing (section 2 trains it for seconds): the plausibility limits
        # are opened so that every prediction is stored and timed; an empty mask still fails its check.
        bench.resources["radiomics"] = RadiomicsSettings(mask_volume_min_ml=0.0, mask_volume_max_ml=1e12,
                                                         mask_bone_fraction_max=1.0,
                                                         mask_outside_air_fraction_max=1.0)
        started = time.perf_counter()
        # One patient, first run of the process (imports, CUDA start): an upper bound of a patient's time.
        warm_up = bench.run_one(bench.patients[0])
        per_patient = time.perf_counter() - started
        check_failures = [] if warm_up.success else _only_check_failures(failure_messages(warm_up))
        bench.clear()
        fits = int((budget.left() - 30) / (2.2 * per_patient))
        wanted = len(bench.patients)
        if fits < wanted:
            if fits < 1:
                raise Skipped(f"ct_mask: skipped after the warm-up ({per_patient:.1f} s for one patient), "
                              f"{budget.left():.0f} s of the budget left")
            bench.patients, bench.sizes = bench.patients[:fits], bench.sizes[:fits]
            report.say(f"ct_mask: {fits} of the {wanted} patients, to keep the budget (warm-up: "
                       f"{per_patient:.1f} s for one patient)")
        phases = {mode: [bench.time_phase(mode)] for mode in (PER_PATIENT, BATCHED)}
    report.say(f"## 3. ct_mask, one range run vs one run per patient, on {device_description(args.device)}")
    report.say(f"{bench.describe()}")
    report.say(f"model: {report.model_note}" if folder else
               "model: TINY nnU-Net trained on the CPU-demo settings (section 2 gave no model)")
    rows = summary_rows("ct_mask", len(bench.patients), phases, 0.0)[:2]
    table: list[str] = []
    with contextlib.redirect_stdout(_Lines(table)):
        print_table(rows)
    for line in table:
        report.say(line)
    failures = [f for runs in phases.values() for phase in runs for f in phase.failures]
    check_failures += _only_check_failures(failures)
    if check_failures:
        report.say(f"NOTE: every prediction ran, but blocking QC checks failed on {len(check_failures)} run(s) "
                   f"(the model is barely trained), e.g. {check_failures[0][:300]}")


def _only_check_failures(messages: list[str]) -> list[str]:
    """`messages` if each is a blocking check's failure (the step ran to its end), else raise with them."""
    others = [message for message in messages if "asset checks failed" not in message]
    if others:
        raise RuntimeError("ct_mask runs failed: " + " | ".join(message[:500] for message in others))
    return list(messages)


class _Lines:
    """A write-only text stream that collects whole lines (for print_table's output)."""

    def __init__(self, lines: list[str]):
        self.lines, self.partial = lines, ""

    def write(self, text: str) -> int:
        *complete, self.partial = (self.partial + text).split("\n")
        self.lines.extend(complete)
        return len(text)

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------- running


RUNNERS = {"encoder": encoder_section, "training": training_section, "ct_mask": ct_mask_section}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="toy sizes (runs on a CPU in a few minutes)")
    parser.add_argument("--patients", type=int, default=None, help="ct_mask patients (default 32; --quick 2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole script (default 480; --quick 900)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    args = parser.parse_args()
    args.patients = args.patients or (2 if args.quick else 32)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or args.patients < 1:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}" if unknown
                     else "--patients must be at least 1")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
              "nothing was measured. Run it where a GPU is, or `--device cpu --quick` to try the script.",
              file=sys.stderr)
        return 2
    from benchmarks.batched_backfill import CT_SOURCE, SLIDE_SOURCE, STOMACH_SOURCE

    missing = [str(path) for path in (CT_SOURCE, STOMACH_SOURCE, SLIDE_SOURCE) if not path.is_file()]
    if missing:
        print(f"gpu_check: input(s) not found: {', '.join(missing)} (set GCMLM_TEST_DATA to the shared data "
              "folder)", file=sys.stderr)
        return 2
    budget = Budget(args.budget or (900 if args.quick else 480))
    report = Report()
    import numpy

    report.say(f"gpu_check on {device_description(args.device)}, python {platform.python_version()}, "
               f"numpy {numpy.__version__}, "
               f"{'QUICK (toy sizes)' if args.quick else 'full sizes'}, budget {budget.seconds:.0f} s")
    # Training runs first: ct_mask predicts with the model it trains.
    order = [name for name in ("encoder", "training", "ct_mask") if name in sections]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in order:
            started = time.perf_counter()
            print(f"\n=== {name} ({budget.left():.0f} s of the budget left) ===", flush=True)
            (Path(tmp) / name).mkdir()
            try:
                RUNNERS[name](args, budget, report, Path(tmp) / name)
            except Skipped as skipped:
                report.say(f"SKIPPED {skipped}")
            except Exception:  # noqa: BLE001 (each section fails on its own; its error is reported)
                report.failed.append(name)
                report.say(f"FAILED {name}:\n{traceback.format_exc()}")
            report.say(f"({name}: {time.perf_counter() - started:.0f} s)")
            report.say()
    print("\n==================== summary ====================")
    for line in report.lines:
        print(line)
    print(f"total {budget.seconds - budget.left():.0f} s; failed: {', '.join(report.failed) or 'none'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
