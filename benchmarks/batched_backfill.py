"""Patients per second on CPU, batched (one run for N patients) against one run per patient.

    python -m benchmarks.batched_backfill [--patients 8] [--repeats 1] [--only ct_mask|uni_features]
                                          [--model-folder PATH] [--encoder vit-tiny-random] [--verbose]

Both GPU assets, `ct_mask` and `uni_features`, run through Dagster (`dg.materialize`, in-process
executor, a real SQLite instance from `dg.instance_for_test`) in two ways on the same patients:

- per-patient: one single-partition run per patient, as a backfill without a backfill policy
  would launch them; each run loads its model for its one patient;
- batched: ONE run over the whole range of patients (the partition-range tags a batched backfill
  run carries), which loads the model once and records every patient on its own.

ct_mask: `--patients` CTs derived from the real abdominal CT (../shared/data/ct/totalsegmentator),
resampled to 5 or 6 mm and cropped a little differently each, none with a reference mask, so every
mask is predicted. The model is a tiny nnU-Net trained once up front through `segmentation_model`
(the demo profile's, `SegmentationModelResource.cpu_demo()`, on four 6 mm crops with their stomach masks),
or the trained folder given by `--model-folder` / `GCMLM_NNUNET_MODEL_FOLDER` (no training).
`ct_image` is materialized for every patient before timing.

uni_features: `--patients` patients, each with a copy of the real slide
../shared/data/wsi/cmu-1-small-region.svs, `patch_coords` materialized before timing, encoder
`--encoder` (default `vit-tiny-random`, an untrained ViT that needs no weights) on the CPU.

Before each timed phase the asset's artifact folders (artifacts/<asset>/<patient>) are deleted, so
nothing is reused; the recorded metadata of every patient is checked to say so (`reused` False for
ct_mask, no `reused_slides` for uni_features). One untimed single-patient run first warms the
process (imports of torch, nnU-Net, the encoder). Model loads are counted by wrapping the real
loaders (`GastricSegmenter.load`, `encoders.load_encoder`). Phases alternate their order between
repeats; the table gives medians.

The import of the definitions in a fresh process (`python -c "import gcmlm_assets.definitions"`,
and with the asset's model modules) is measured separately: a deployment with one run per patient
pays it (plus a pod start, not measured) for every run, the in-process loop here does not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from benchmarks.nnunet_tiny import CROPS, on_grid

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GCMLM_TEST_DATA", ROOT.parent / "shared" / "data"))
CT_SOURCE = DATA / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
STOMACH_SOURCE = DATA / "ct" / "totalsegmentator" / "example_ct_sm_stomach.nii.gz"
SLIDE_SOURCE = DATA / "wsi" / "cmu-1-small-region.svs"

PER_PATIENT, BATCHED = "per-patient runs", "one range run"
IMPORT_REPEATS = 3
IMPORTS = {
    "definitions": "import gcmlm_assets.definitions",
    "ct_mask": "import gcmlm_assets.definitions, gcmlm_assets.radiology.nnunet, "
               "nnunetv2.inference.predict_from_raw_data",
    "uni_features": "import gcmlm_assets.definitions, gcmlm_assets.pathology.encoders",
}
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# ---------------------------------------------------------------- measuring


def fresh_import_seconds(statement: str, repeats: int = IMPORT_REPEATS) -> float:
    """Median wall seconds of `python -c statement` in a fresh interpreter (this venv, project root)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"python -c {statement!r} failed:\n{done.stderr[-2000:]}")
    return statistics.median(times)


class LoadCounter:
    """Counts calls of a real model loader and the seconds spent in it."""

    def __init__(self):
        self.loads, self.seconds = 0, 0.0

    def wrap(self, load: Callable) -> Callable:
        def counted(*args, **kwargs):
            start = time.perf_counter()
            try:
                return load(*args, **kwargs)
            finally:
                self.loads += 1
                self.seconds += time.perf_counter() - start
        return counted


@contextlib.contextmanager
def replaced(owner, name: str, value) -> Iterator[None]:
    """`owner.name = value` for the duration of the block, restored exactly (descriptor included)."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@dataclass
class Phase:
    mode: str
    wall: float
    loads: int
    load_seconds: float
    materialized: int
    runs: int
    runs_ok: int
    failures: list[str] = field(default_factory=list)


def recorded_materializations(instance, run_id: str, asset: str) -> dict[str, dict]:
    """patient -> metadata of the asset's materializations the run logged (read back from the instance)."""
    import dagster as dg

    key, found = dg.AssetKey(asset), {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.is_step_materialization and event.asset_key == key:
            metadata = event.step_materialization_data.materialization.metadata
            found[event.partition] = {name: value.value for name, value in metadata.items()}
    return found


def failure_messages(result) -> list[str]:
    return [event.step_failure_data.error.message.strip() if event.step_failure_data.error else str(event.message)
            for event in result.get_step_failure_events()]


# ---------------------------------------------------------------- the two assets


class Bench:
    """One asset, its patients, its Dagster instance and resources."""

    asset: str
    assets: list

    def __init__(self, work: Path, instance, resources: dict, patients: list[str], verbose: bool):
        self.work, self.instance, self.resources, self.patients = work, instance, resources, patients
        self.artifacts = work / "artifacts"
        self.run_config = None if verbose else QUIET_RUN_CONFIG

    def materialize(self, assets, selection, *, partition: str | None = None, tags: dict | None = None):
        import dagster as dg

        return dg.materialize(assets, selection=selection, partition_key=partition, instance=self.instance,
                              resources=self.resources, tags=tags, run_config=self.run_config,
                              raise_on_error=False)

    def run_one(self, patient_id: str):
        return self.materialize(self.assets, [self.asset], partition=patient_id)

    def run_range(self):
        from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

        return self.materialize(self.assets, [self.asset], tags={ASSET_PARTITION_RANGE_START_TAG: self.patients[0],
                                                                 ASSET_PARTITION_RANGE_END_TAG: self.patients[-1]})

    def clear(self) -> None:
        """Delete the asset's stored outputs so that the next phase recomputes every patient."""
        for patient_id in self.patients:
            shutil.rmtree(self.artifacts / self.asset / patient_id, ignore_errors=True)

    def counting(self, counter: LoadCounter) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def reused(self, metadata: dict) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def time_phase(self, mode: str) -> Phase:
        self.clear()
        counter = LoadCounter()
        with self.counting(counter):
            start = time.perf_counter()
            results = [self.run_one(p) for p in self.patients] if mode == PER_PATIENT else [self.run_range()]
            wall = time.perf_counter() - start
        recorded: dict[str, dict] = {}
        for result in results:
            recorded.update(recorded_materializations(self.instance, result.run_id, self.asset))
        stale = sorted(p for p, metadata in recorded.items() if self.reused(metadata))
        if stale:
            raise RuntimeError(f"{self.asset} {mode}: stored outputs were reused for {stale}; the phase "
                               "did not recompute them")
        failures = [message for result in results if not result.success for message in failure_messages(result)]
        missing = [p for p in self.patients if p not in recorded]
        if missing and not failures:
            failures = [f"no materialization recorded for {missing}"]
        return Phase(mode, wall, counter.loads, counter.seconds, len(set(recorded) & set(self.patients)),
                     len(results), sum(result.success for result in results), failures)

    def warm_up(self) -> None:
        """One untimed single-patient run: the first run of a process imports the model stack."""
        result = self.run_one(self.patients[0])
        if not result.success:
            raise RuntimeError(f"{self.asset} warm-up run failed: " + "; ".join(failure_messages(result)))
        self.clear()


def drop(landing: Path, patient_id: str, modality: str, files: list[Path], mask: Path | None = None) -> None:
    """A landing-zone drop: <landing>/<patient>/<modality>/ with copies of `files`, optional ct_label/, READY."""
    folder = landing / patient_id
    (folder / modality).mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, folder / modality / path.name)
    if mask is not None:
        (folder / "ct_label").mkdir()
        shutil.copyfile(mask, folder / "ct_label" / mask.name)
    (folder / "READY").write_text("")


def ct_variant(ct: sitk.Image, index: int) -> sitk.Image:
    """The real CT at 5 or 6 mm, cropped by a few voxels that differ from patient to patient."""
    image = on_grid(ct, (5.0, 6.0)[index % 2], sitk.sitkLinear)
    start = [2 * (index // 2 % 4), 2 * (index // 8 % 2), index // 2 % 2]
    size = [n - s - trim for n, s, trim in zip(image.GetSize(), start, (2, 2, 1))]
    return sitk.RegionOfInterest(image, size, start)


class CtMaskBench(Bench):
    asset = "ct_mask"

    @classmethod
    def build(cls, work: Path, instance, n_patients: int, model_folder: str | None, verbose: bool, *,
              device: str = "cpu", model_sha256: str | None = None) -> CtMaskBench:
        from gcmlm_assets.radiology.assets import ct_image, ct_mask
        from gcmlm_assets.radiology.segmentation_model import segmentation_model
        from gcmlm_assets.radiology.resources import RadiomicsSettings, SegmentationModelResource
        from gcmlm_assets.resources import ArtifactStorage, LandingZone

        landing, sources = work / "landing", work / "sources"
        sources.mkdir(parents=True)
        # A given folder is loaded only with its checkpoints' digests pinned (`model_sha256`, else
        # GCMLM_NNUNET_MODEL_SHA256).
        segmentation = (SegmentationModelResource.cpu_demo(
            device=device, trained_model_folder=model_folder,
            trained_model_sha256=model_sha256 or os.environ.get("GCMLM_NNUNET_MODEL_SHA256"))
            if model_folder else SegmentationModelResource.cpu_demo(device=device))
        resources = {"storage": ArtifactStorage(root=str(work / "artifacts")),
                     "landing": LandingZone(root=str(landing)), "radiomics": RadiomicsSettings(),
                     "segmentation": segmentation}
        ct = sitk.ReadImage(str(CT_SOURCE))
        training = []
        if not model_folder:
            stomach = sitk.ReadImage(str(STOMACH_SOURCE))
            ct6, stomach6 = on_grid(ct, 6.0, sitk.sitkLinear), on_grid(stomach, 6.0, sitk.sitkNearestNeighbor)
            for index, (x, y, z, nx, ny, nz) in enumerate(CROPS):
                patient_id = f"TRAIN{index + 1}"
                folder = sources / patient_id
                folder.mkdir()
                sitk.WriteImage(sitk.RegionOfInterest(ct6, [nx, ny, nz], [x, y, z]), str(folder / "ct.nii.gz"), True)
                sitk.WriteImage(sitk.RegionOfInterest(stomach6, [nx, ny, nz], [x, y, z]),
                                str(folder / "stomach.nii.gz"), True)
                drop(landing, patient_id, "ct", [folder / "ct.nii.gz"], folder / "stomach.nii.gz")
                training.append(patient_id)
        patients = [f"CT{index + 1:03d}" for index in range(n_patients)]
        for index, patient_id in enumerate(patients):
            folder = sources / patient_id
            folder.mkdir()
            sitk.WriteImage(ct_variant(ct, index), str(folder / "ct.nii.gz"), True)
            drop(landing, patient_id, "ct", [folder / "ct.nii.gz"])  # no reference mask: predicted
        # The timed patients last and in one block: the range run covers exactly them. Each drop's
        # only scan is the patient's `ct_scans` partition, keyed by its id (scans.py).
        for partition_set in ("patients", "ct_scans"):
            instance.add_dynamic_partitions(partition_set, training + patients)
        bench = cls(work, instance, resources, patients, verbose)
        bench.assets = [ct_image, ct_mask]
        for patient_id in training + patients:
            result = bench.materialize([ct_image], [ct_image], partition=patient_id)
            if not result.success:
                raise RuntimeError(f"ct_image {patient_id}: " + "; ".join(failure_messages(result)))
        started = time.perf_counter()
        result = bench.materialize([ct_image, segmentation_model], [segmentation_model])
        seconds = time.perf_counter() - started
        if not result.success:
            raise RuntimeError("segmentation_model: " + "; ".join(failure_messages(result)))
        [event] = result.asset_materializations_for_node("segmentation_model")
        model = {name: value.value for name, value in event.metadata.items()}
        bench.model_note = (f"model {model['model_id']} from {model_folder}" if model_folder else
                            f"tiny nnU-Net trained here on {len(training)} crops in {seconds:.0f} s "
                            f"(pseudo Dice {model.get('final_pseudo_dice', float('nan')):.3f})")
        bench.sizes = [sitk.ReadImage(str(work / "artifacts" / "ct_image" / p / "ct.nii.gz")).GetSize()
                       for p in patients]
        return bench

    def counting(self, counter: LoadCounter):
        from gcmlm_assets.radiology import nnunet

        real_load = nnunet.GastricSegmenter.__dict__["load"].__func__
        return replaced(nnunet.GastricSegmenter, "load", classmethod(counter.wrap(real_load)))

    def reused(self, metadata: dict) -> bool:
        if metadata.get("source") != "predicted":
            raise RuntimeError(f"ct_mask was not predicted: source {metadata.get('source')!r}")
        return metadata["reused"] is not False

    def describe(self) -> str:
        voxels = sorted(x * y * z for x, y, z in self.sizes)
        return (f"ct_mask: {len(self.patients)} CTs at 5/6 mm ({voxels[0]:,}-{voxels[-1]:,} voxels), every mask "
                f"predicted on {self.resources['segmentation'].device}; {self.model_note}")


class UniFeaturesBench(Bench):
    asset = "uni_features"

    @classmethod
    def build(cls, work: Path, instance, n_patients: int, encoder: str, verbose: bool) -> UniFeaturesBench:
        from gcmlm_assets.pathology.assets import patch_coords, uni_features
        from gcmlm_assets.pathology.resources import PatchEncoder, TilingSettings
        from gcmlm_assets.resources import ArtifactStorage, LandingZone

        landing = work / "landing"
        resources = {"storage": ArtifactStorage(root=str(work / "artifacts")),
                     "landing": LandingZone(root=str(landing)), "pathology": TilingSettings(),
                     "encoder": PatchEncoder(name=encoder, device="cpu")}
        patients = [f"WSI{index + 1:03d}" for index in range(n_patients)]
        for patient_id in patients:
            drop(landing, patient_id, "wsi", [SLIDE_SOURCE])
        instance.add_dynamic_partitions("patients", patients)
        bench = cls(work, instance, resources, patients, verbose)
        bench.assets = [uni_features]
        bench.patches = {}
        for patient_id in patients:
            result = bench.materialize([patch_coords], [patch_coords], partition=patient_id)
            if not result.success:
                raise RuntimeError(f"patch_coords {patient_id}: " + "; ".join(failure_messages(result)))
            [event] = result.asset_materializations_for_node("patch_coords")
            bench.patches[patient_id] = event.metadata["n_patches"].value
        bench.encoder = encoder
        return bench

    def counting(self, counter: LoadCounter):
        from gcmlm_assets.pathology import encoders

        return replaced(encoders, "load_encoder", counter.wrap(encoders.load_encoder))

    def reused(self, metadata: dict) -> bool:
        return bool(metadata["reused_slides"])

    def describe(self) -> str:
        return (f"uni_features: {len(self.patients)} patients x 1 slide ({SLIDE_SOURCE.name}, "
                f"{sum(self.patches.values()) // len(self.patches)} patches each), encoder {self.encoder} on cpu, "
                f"batch size {self.resources['encoder'].batch_size}")


# ---------------------------------------------------------------- running and reporting


def run_bench(bench: Bench, repeats: int) -> dict[str, list[Phase]]:
    bench.warm_up()
    phases: dict[str, list[Phase]] = {PER_PATIENT: [], BATCHED: []}
    for repeat in range(repeats):
        order = [PER_PATIENT, BATCHED] if repeat % 2 == 0 else [BATCHED, PER_PATIENT]
        for mode in order:
            phase = bench.time_phase(mode)
            phases[mode].append(phase)
            print(f"  {bench.asset} repeat {repeat + 1}/{repeats}: {mode}: {phase.wall:.2f} s, "
                  f"{phase.loads} model load(s), {phase.materialized}/{len(bench.patients)} materialized, "
                  f"{phase.runs_ok}/{phase.runs} run(s) succeeded",
                  flush=True)
    return phases


@dataclass
class Row:
    asset: str
    mode: str
    patients: int
    loads: int
    load_seconds: float | None
    wall: float
    materialized: int
    runs_ok: str

    @property
    def rate(self) -> float:
        return self.patients / self.wall


def summary_rows(asset: str, n: int, phases: dict[str, list[Phase]], import_seconds: float) -> list[Row]:
    def median_row(mode: str) -> Row:
        runs = phases[mode]
        return Row(asset, mode, n, statistics.median_low([p.loads for p in runs]),
                   statistics.median([p.load_seconds for p in runs]), statistics.median([p.wall for p in runs]),
                   min(p.materialized for p in runs), f"{sum(p.runs_ok for p in runs)}/{sum(p.runs for p in runs)}")

    per_patient, batched = median_row(PER_PATIENT), median_row(BATCHED)
    with_imports = [
        Row(asset, f"{PER_PATIENT} + {n} fresh imports*", n, per_patient.loads, None,
            per_patient.wall + n * import_seconds, per_patient.materialized, per_patient.runs_ok),
        Row(asset, f"{BATCHED} + 1 fresh import*", n, batched.loads, None,
            batched.wall + import_seconds, batched.materialized, batched.runs_ok),
    ]
    return [per_patient, batched, *with_imports]


def print_table(rows: list[Row]) -> None:
    header = (f"{'asset':<12} | {'mode':<36} | {'patients':>8} | {'done':>5} | {'runs ok':>7} | "
              f"{'model loads':>11} | {'load s':>6} | {'wall s':>7} | {'patients/s':>10} | {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    baseline: dict[tuple[str, bool], float] = {}
    for row in rows:
        estimated = row.load_seconds is None
        base = baseline.setdefault((row.asset, estimated), row.rate)  # the per-patient row comes first
        load = "" if estimated else f"{row.load_seconds:.2f}"
        print(f"{row.asset:<12} | {row.mode:<36} | {row.patients:>8} | {row.materialized:>5} | {row.runs_ok:>7} | "
              f"{row.loads:>11} | {load:>6} | {row.wall:>7.2f} | {row.rate:>10.3f} | {row.rate / base:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=["ct_mask", "uni_features"])
    parser.add_argument("--model-folder", default=os.environ.get("GCMLM_NNUNET_MODEL_FOLDER") or None,
                        help="trained nnU-Net folder for ct_mask (default GCMLM_NNUNET_MODEL_FOLDER), its "
                             "checkpoints' digests in GCMLM_NNUNET_MODEL_SHA256; "
                             "without it a tiny model is trained first")
    parser.add_argument("--encoder", default="vit-tiny-random", help="registered encoder for uni_features")
    parser.add_argument("--verbose", action="store_true", help="show Dagster's console log of every run")
    args = parser.parse_args()
    if args.patients < 1 or args.repeats < 1:
        parser.error("--patients and --repeats must be at least 1")
    for path in (CT_SOURCE, STOMACH_SOURCE, SLIDE_SOURCE):
        if not path.is_file():
            parser.error(f"{path} not found (set GCMLM_TEST_DATA to the shared data folder)")
    assets = [args.only] if args.only else ["ct_mask", "uni_features"]

    import dagster as dg

    # The backfill policy is a beta parameter: say it once here, not in every run's output.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    if not args.verbose:
        logging.getLogger("nnunetv2").setLevel(logging.WARNING)

    print("fresh-process imports (median of 3) ...", flush=True)
    imports = {name: fresh_import_seconds(IMPORTS[name]) for name in ["definitions", *assets]}

    rows, notes = [], []
    for asset in assets:
        with tempfile.TemporaryDirectory(prefix=f"batched_backfill_{asset}_") as tmp:
            work = Path(tmp)
            (work / "dagster_home").mkdir()
            with dg.instance_for_test(temp_dir=str(work / "dagster_home")) as instance:
                print(f"{asset}: preparing {args.patients} patients ...", flush=True)
                if asset == "ct_mask":
                    bench = CtMaskBench.build(work, instance, args.patients, args.model_folder, args.verbose)
                else:
                    bench = UniFeaturesBench.build(work, instance, args.patients, args.encoder, args.verbose)
                phases = run_bench(bench, args.repeats)
                notes.append(bench.describe())
                rows.extend(summary_rows(asset, args.patients, phases, imports[asset]))
                for mode, runs in phases.items():
                    for failure in {f for phase in runs for f in phase.failures}:
                        notes.append(f"FAILED in {asset} {mode}: {failure[:500]}")

    import torch

    print(f"\nbatched backfill vs one run per patient: {args.patients} patients, {args.repeats} repeat(s) "
          f"(medians), cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    for note in notes:
        print(f"  {note}")
    print()
    print_table(rows)
    print("\nwall s: the dg.materialize calls only (in-process executor, SQLite instance), each phase after its "
          "asset's artifacts were deleted; every patient was recomputed (none reused). done: patients "
          "materialized. runs ok: Dagster runs that succeeded, over all repeats. load s: time inside the "
          "counted model loader. speed-up: patients/s over the per-patient row above it.")
    print(f"fresh-process import, median of {IMPORT_REPEATS}: `import gcmlm_assets.definitions` "
          f"{imports['definitions']:.2f} s; "
          + "; ".join(f"with {asset}'s model modules {imports[asset]:.2f} s" for asset in assets) + ".")
    print("* estimated: the in-process per-patient loop pays that import once for the whole process, while a "
          "deployment with one run per patient pays it (plus a pod start, not measured) for every run and a "
          "batched run once; these rows add n x or 1 x the asset's fresh-process import to the measured wall.")


if __name__ == "__main__":
    main()
