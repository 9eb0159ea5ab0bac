"""Patients per second through the automatic path, batched by the sensors vs one run per patient.

    python -m benchmarks.batched_sensors [--patients 8] [--concurrency 1] [--model-folder PATH] [--verbose]

K new patient drops (`--patients`, each a CT without a reference mask and a slide) go through the
radiology chain ct_image -> ct_mask (predicted by a tiny nnU-Net) -> radiomics_row -> ct_mask_seg
-> radiomics_sr (both without a file: the CTs are NIfTI) and the pathology chain patch_coords ->
uni_features (`vit-tiny-random`) -> slide_vector, twice, with the demo profile's settings
(`GCMLM_PROFILE=demo`):

- one run per patient: `GCMLM_GPU_BATCH_PATIENTS=1`, so landing_sensor requests one run of each
  patient's whole chain per modality (2 K runs, 2 K model loads), what it requested before batching;
- batched: `GCMLM_GPU_BATCH_PATIENTS=K` (one bucket): landing_sensor requests one range run of each
  chain's first asset, then radiology_steps_sensor and pathology_steps_sensor are ticked after
  every finished run until they have nothing left to carry on (one run per asset: 8 runs, 2 loads).

The sensors are evaluated here against the mode's own instance (a fresh DAGSTER_HOME with
deploy/local/dagster.yaml); every RunRequest is executed like the daemon's run worker does it, in
a FRESH PROCESS (benchmarks/_sensor_run.py: start Python, import the definitions, execute the run
with the request's tags against that instance, in-process executor), so each run pays its own
start, imports and model load. Not measured: the run launcher's own overhead and the wait for the
next sensor tick (the demo profile ticks the steps sensors every 10 s, landing_sensor every 30 s),
which the batched path pays once per asset of a chain and the per-patient path once.
`--concurrency N` starts up to N runs at a time under the instance's limits (one run per bucket tag,
as deploy/local/dagster.yaml allows two runs at a time); the default 1 runs them one after the other.

Each mode has its own landing zone, artifacts and instance, so nothing is reused between modes;
the recorded metadata says so for every patient (ct_mask predicted and not reused, uni_features
without reused slides), and every patient must end with radiomics_row and slide_vector. The model:
a tiny nnU-Net trained once up front (benchmarks.batched_backfill's setup, 1-2 minutes) and copied
into each mode's artifacts as the installed model, or the folder given by `--model-folder` /
`GCMLM_NNUNET_MODEL_FOLDER` (its digests in GCMLM_NNUNET_MODEL_SHA256).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.batched_backfill import CT_SOURCE, SLIDE_SOURCE, STOMACH_SOURCE, CtMaskBench, ct_variant, drop

ROOT = Path(__file__).resolve().parents[1]
PER_PATIENT, BATCHED = "one run per patient", "batched by the sensors"
CHAIN_ENDS = ("radiomics_row", "slide_vector")
POLL_S = 0.05


@dataclass
class RunDone:
    assets: list[str]
    patients: int
    wall: float
    execute_s: float
    loads: int
    load_s: float
    success: bool
    run_id: str


@dataclass
class ModeResult:
    mode: str
    batch: int
    wall: float
    runs: list[RunDone] = field(default_factory=list)


# ---------------------------------------------------------------- one mode's instance and sensors


def prepare_mode(folder: Path, patients: list[str], sources: Path, model_dir: Path | None) -> None:
    """A landing zone with the K drops, an empty artifacts folder (with the installed model) and instance."""
    for patient_id in patients:
        drop(folder / "landing", patient_id, "ct", [sources / patient_id / "ct.nii.gz"])
        drop(folder / "landing", patient_id, "wsi", [SLIDE_SOURCE])
    (folder / "artifacts").mkdir()
    if model_dir is not None:
        shutil.copytree(model_dir, folder / "artifacts" / "segmentation_model")
    (folder / "dagster_home").mkdir()
    shutil.copy(ROOT / "deploy" / "local" / "dagster.yaml", folder / "dagster_home" / "dagster.yaml")


def mode_environment(folder: Path, batch: int, model_folder: str | None) -> dict[str, str]:
    env = {"DAGSTER_HOME": str(folder / "dagster_home"), "GCMLM_ARTIFACTS_ROOT": str(folder / "artifacts"),
           "GCMLM_LANDING_ROOT": str(folder / "landing"), "GCMLM_PROFILE": "demo", "GCMLM_ENV": "local",
           "GCMLM_GPU_BATCH_PATIENTS": str(batch), "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if model_folder:
        env["GCMLM_NNUNET_MODEL_FOLDER"] = model_folder
    return env


class Sensors:
    """landing_sensor and the two steps sensors, evaluated like the daemon does (cursors carried over)."""

    def __init__(self, instance, landing: Path):
        from gcmlm_assets import runs
        from gcmlm_assets.definitions import MODALITY_ASSETS
        from gcmlm_assets.pathology.resources import PatchEncoder
        from gcmlm_assets.patient_steps import build_patient_steps_sensor
        from gcmlm_assets.profiles import DEMO
        from gcmlm_assets.resources import LandingZone

        self.instance = instance
        self.landing_resources = {"landing": LandingZone(root=str(landing)),
                                  "encoder": PatchEncoder(**DEMO.resource_settings("encoder"))}
        self.steps = [build_patient_steps_sensor(f"{modality}_steps_sensor", chain, work, DEMO.sensor_interval_s)
                      for (modality, chain), work in zip(MODALITY_ASSETS.items(), (runs.RADIOLOGY, runs.PATHOLOGY))]
        self.cursors: dict[str, str | None] = {}

    def _tick(self, sensor, resources: dict | None = None):
        import dagster as dg

        with dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(sensor.name),
                                     resources=resources) as context:
            result = sensor(context)
        self.cursors[sensor.name] = result.cursor
        for request in result.dynamic_partitions_requests or []:  # as the daemon applies them
            if isinstance(request, dg.DeleteDynamicPartitionsRequest):
                for key in request.partition_keys:
                    self.instance.delete_dynamic_partition(request.partitions_def_name, key)
            else:
                self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return [(sensor.name, request) for request in result.run_requests or []]

    def landing(self) -> list:
        from gcmlm_assets.definitions import landing_sensor

        return self._tick(landing_sensor, self.landing_resources)

    def steps_ticks(self) -> list:
        return [item for sensor in self.steps for item in self._tick(sensor)]


def chain_partitions(asset: str):
    """The partition set of the chain `asset` starts: `ct_scans` for radiology, `patients` for pathology."""
    from gcmlm_assets.catalogue import ASSETS
    from gcmlm_assets.partitions import partitions_of

    return partitions_of(ASSETS[asset])


def request_patients(instance, request) -> int:
    """The partitions a run request covers (here each patient has one scan: patients either way)."""
    from gcmlm_assets import runs

    if request.partition_key is not None:
        return 1
    order = instance.get_dynamic_partitions(chain_partitions(request.asset_selection[0].to_user_string()).name)
    return len(runs.range_run_patients(request.tags, order, {p: i for i, p in enumerate(order)}))


def run_payload(sensor_name: str, request, verbose: bool) -> str:
    from gcmlm_assets import runs

    # the tags the daemon adds to a sensor's run
    tags = {**request.tags, runs.RUN_KEY_TAG: request.run_key, "dagster/sensor_name": sensor_name}
    return json.dumps({"assets": [key.to_user_string() for key in request.asset_selection],
                       "partition": request.partition_key, "tags": tags,
                       "log_level": "INFO" if verbose else "WARNING"})


# ---------------------------------------------------------------- running a mode


def run_mode(mode: str, batch: int, folder: Path, env: dict[str, str], concurrency: int,
             verbose: bool) -> ModeResult:
    import dagster as dg

    from gcmlm_assets.patient_batches import BUCKET_TAG
    from gcmlm_assets.settings import scoped_environment

    child_env = {**os.environ, **env}
    with scoped_environment(env), dg.DagsterInstance.get() as instance:
        sensors = Sensors(instance, folder / "landing")
        assert not sensors.steps_ticks()  # the daemon ticks them before the drops: their cursors start here
        start = time.perf_counter()
        pending = sensors.landing()
        result = ModeResult(mode, batch, 0.0)
        running: dict = {}  # process -> (request, bucket, start)
        while pending or running:
            for item in list(pending):
                bucket = item[1].tags.get(BUCKET_TAG)
                if len(running) < concurrency and bucket not in {b for _, b, _ in running.values()}:
                    pending.remove(item)
                    process = subprocess.Popen(
                        [sys.executable, "-m", "benchmarks._sensor_run", run_payload(*item, verbose)],
                        cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    running[process] = (item[1], bucket, time.perf_counter())
            finished = [process for process in running if process.poll() is not None]
            if not finished:
                time.sleep(POLL_S)
                continue
            for process in finished:
                request, _, started = running.pop(process)
                out, err = process.communicate()
                wall = time.perf_counter() - started
                if verbose and err.strip():
                    print(err, file=sys.stderr)
                lines = out.strip().splitlines()
                if process.returncode != 0 or not lines:
                    raise RuntimeError(f"{mode}: the run process for {request.asset_selection} exited "
                                       f"{process.returncode}:\n{err[-3000:]}")
                done = json.loads(lines[-1])
                run = RunDone([k.to_user_string() for k in request.asset_selection],
                              request_patients(instance, request), wall, done["execute_s"], done["model_loads"],
                              done["load_s"], done["success"], done["run_id"])
                result.runs.append(run)
                print(f"  {mode}: run {len(result.runs)}: {','.join(run.assets)} x {run.patients} patient(s): "
                      f"{wall:.1f} s (in the run {run.execute_s:.1f} s, {run.loads} model load(s))"
                      + ("" if run.success else " FAILED"), flush=True)
                if not run.success:
                    record = instance.get_run_by_id(run.run_id)
                    raise RuntimeError(f"{mode}: run {run.run_id} ({record.status}) failed:\n{err[-3000:]}")
            pending.extend(sensors.steps_ticks())
        result.wall = time.perf_counter() - start
        verify(instance, mode, env["GCMLM_ARTIFACTS_ROOT"])
    return result


def verify(instance, mode: str, artifacts: str) -> None:
    """Every patient reached the ends of both chains (radiology: its only scan, keyed by the patient
    id), its mask predicted and nothing reused."""
    import dagster as dg

    from gcmlm_assets.partitions import patients_partitions

    patients = set(instance.get_dynamic_partitions(patients_partitions.name))
    for asset in CHAIN_ENDS:
        partitions = set(instance.get_dynamic_partitions(chain_partitions(asset).name))
        if partitions != patients:
            raise RuntimeError(f"{mode}: {asset}'s partitions {sorted(partitions)} are not the patients' only "
                               f"scans {sorted(patients)}")
        missing = partitions - instance.get_materialized_partitions(dg.AssetKey(asset))
        if missing:
            raise RuntimeError(f"{mode}: {asset} not materialized for {sorted(missing)}")
    for patient_id in sorted(patients):
        mask = latest_metadata(instance, "ct_mask", patient_id)
        features = latest_metadata(instance, "uni_features", patient_id)
        if mask.get("source") != "predicted" or mask.get("reused") is not False or features.get("reused_slides"):
            raise RuntimeError(f"{mode}: {patient_id} was not recomputed (ct_mask {mask.get('source')}, reused "
                               f"{mask.get('reused')}; uni_features reused {features.get('reused_slides')})")
        if not str(mask.get("path", "")).startswith(artifacts):
            raise RuntimeError(f"{mode}: {patient_id}'s mask {mask.get('path')} is not under {artifacts}")


def latest_metadata(instance, asset: str, patient_id: str) -> dict:
    import dagster as dg

    [record] = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[patient_id]), limit=1).records
    return {name: value.value for name, value in record.asset_materialization.metadata.items()}


# ---------------------------------------------------------------- setup and report


def train_tiny_model(work: Path, verbose: bool) -> tuple[Path, str]:
    """benchmarks.batched_backfill's tiny nnU-Net, trained once: (its installed-models folder, a note)."""
    import dagster as dg

    (work / "dagster_home").mkdir(parents=True)
    with dg.instance_for_test(temp_dir=str(work / "dagster_home")) as instance:
        bench = CtMaskBench.build(work, instance, 0, None, verbose)
    return work / "artifacts" / "segmentation_model", bench.model_note


def print_table(results: list[ModeResult], patients: int) -> None:
    header = (f"{'mode':<24} | {'batch':>5} | {'runs':>4} | {'model loads':>11} | {'load s':>6} | "
              f"{'in runs s':>9} | {'wall s':>7} | {'patients/s':>10} | {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    base = patients / results[0].wall
    for result in results:
        rate = patients / result.wall
        print(f"{result.mode:<24} | {result.batch:>5} | {len(result.runs):>4} | "
              f"{sum(r.loads for r in result.runs):>11} | {sum(r.load_s for r in result.runs):>6.1f} | "
              f"{sum(r.execute_s for r in result.runs):>9.1f} | {result.wall:>7.1f} | {rate:>10.3f} | "
              f"{rate / base:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=1, help="runs at a time (one per bucket)")
    parser.add_argument("--model-folder", default=os.environ.get("GCMLM_NNUNET_MODEL_FOLDER") or None,
                        help="trained nnU-Net folder (default GCMLM_NNUNET_MODEL_FOLDER), its checkpoints' digests "
                             "in GCMLM_NNUNET_MODEL_SHA256; without it a tiny model is trained first")
    parser.add_argument("--verbose", action="store_true", help="show every run's log (INFO)")
    args = parser.parse_args()
    if args.patients < 2 or args.concurrency < 1:
        parser.error("--patients must be at least 2 and --concurrency at least 1")
    for path in (CT_SOURCE, STOMACH_SOURCE, SLIDE_SOURCE):
        if not path.is_file():
            parser.error(f"{path} not found (set GCMLM_TEST_DATA to the shared data folder)")

    import SimpleITK as sitk

    patients = [f"PAT{index + 1:03d}" for index in range(args.patients)]
    with tempfile.TemporaryDirectory(prefix="batched_sensors_") as tmp:
        work = Path(tmp)
        if args.model_folder:
            model_dir, model_note = None, f"nnU-Net from {args.model_folder}"
        else:
            print("training the tiny nnU-Net once ...", flush=True)
            model_dir, model_note = train_tiny_model(work / "model", args.verbose)
        ct = sitk.ReadImage(str(CT_SOURCE))
        for index, patient_id in enumerate(patients):
            (work / "sources" / patient_id).mkdir(parents=True)
            sitk.WriteImage(ct_variant(ct, index), str(work / "sources" / patient_id / "ct.nii.gz"), True)
        results = []
        for mode, batch in ((PER_PATIENT, 1), (BATCHED, args.patients)):
            folder = work / ("per_patient" if batch == 1 else "batched")
            prepare_mode(folder, patients, work / "sources", model_dir)
            print(f"{mode} (GCMLM_GPU_BATCH_PATIENTS={batch}) ...", flush=True)
            results.append(run_mode(mode, batch, folder, mode_environment(folder, batch, args.model_folder),
                                    args.concurrency, args.verbose))

    print(f"\nautomatic path, {args.patients} new drops (CT + slide each), every run in a fresh process, "
          f"{args.concurrency} run(s) at a time; cpus {os.cpu_count()}")
    print(f"  radiology: ct_image -> ct_mask -> radiomics_row -> ct_mask_seg -> radiomics_sr (no SEG: NIfTI CTs), "
          f"every mask predicted by the {model_note}")
    print(f"  pathology: patch_coords -> uni_features ({SLIDE_SOURCE.name}, vit-tiny-random, cpu) -> slide_vector")
    print()
    print_table(results, args.patients)
    print("\nwall s: from landing_sensor's tick to the end of the last run (sensor ticks included, the daemon's "
          "tick intervals and run launcher not). in runs s: time inside the runs' execution, the rest of the "
          "wall is each process's start, imports and the sensors. model loads: nnU-Net and encoder loads "
          "counted in the run processes. Every patient ended with radiomics_row and slide_vector, its mask "
          "predicted and nothing reused (each mode has its own instance and artifacts).")


if __name__ == "__main__":
    main()
