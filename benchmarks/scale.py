"""Hospital scale (issue 20): the automation and the instance with N patients on one instance.

    python -m benchmarks.scale [--patients 1000 10000] [--new 10] [--repeats 3] [--postgres URL]
                               [--picture-bytes B] [--heatmaps H] [--reference-every 10]
                               [--create-limit 100] [--profile production]

For each N it builds a DAGSTER_HOME-style instance (deploy/local/dagster.yaml: SQLite, the queued
run coordinator; with --postgres also one in a fresh PostgreSQL database on that server) holding a
full pass of N patients, then plays the automation forward and prints one table per backend:

- runs requested per refresh when K (--new) patients arrive: their runs finish, the cohort refresh
  sensor's request is executed (a new risk_scores), then what risk_explanations_sensor requests;
- each automation sensor's tick (landing_sensor has benchmarks.sensor_tick), with nothing queued
  and with N runs queued, and risk_explanations_sensor's tick after a new risk_scores;
- the daemon turning that explanations tick's requests into queued runs (the first --create-limit
  of them; more are derived at the same rate);
- the cohort refresh decision after each refresh's explanation runs (nothing changed since);
- fused_table's soundness filter (soundness_facts.unsound_results) over every patient;
- the instance's bytes per patient after the full pass, and added by one refresh.

Both default N take 6 minutes on this 2-core machine when it is quiet, 17 when it is busy
(N = 10,000: 2.5 to 6 minutes to write the full pass, about 25 GB of temporary disk, removed at
the end unless --keep); PostgreSQL writes about 3 times slower.

What is real: Dagster 1.13's instance and storages (the run-sharded SQLite event log, runs.db,
PostgreSQL), the sensors of `build_definitions(profile=...)` evaluated as the code server does
(`evaluate_tick` with the definitions' resources), the daemon's run-creation code against a code
server of workspace.yaml's module, the soundness filter, and every event: Dagster serialized
each one when it executed stand-ins of the real steps (benchmarks/_scale_steps.py, built from the
real assets' specs, check specs and metadata keys; benchmarks/_scale_templates.py), and Dagster's
own queries read them back (benchmarks/scale_instance.py writes them).
What is synthesized: the events of patients other than the one recorded (copied from it, with
their run ids, patient ids, times and storage ids), one CT scan per patient (its `ct_scans`
partition keyed by the patient id, as a drop's only scan is: gcmlm_assets/scans.py), the run rows (written in bulk, not through the
daemon; their tags are those the real landing_sensor and the other sensors request), the times
(runs a minute apart, the full pass ending two hours ago), the picture bytes (random, near the
limits gcmlm_assets/pictures.py sets, or --picture-bytes each), and on disk only what the sensors
read: each patient's landing folder with READY, a reference mask (ct_label/) and a ct_image file
for every --reference-every'th patient, clinical.csv, an installed segmentation model folder
(empty checkpoint) whose current.json names the current reference set, and risk_scores'
scores.parquet. Sensor results are whatever the code in the tree returns; a sensor that fails or
cannot read what is here reports n/a with the reason.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from benchmarks.scale_instance import (
    SECONDS_PER_RUN, InstanceWriter, LandingTags, RunSpec, add_patients, local_instance, patient_ids,
    patient_run_specs, record_templates, request_run_specs, write_in_batches)

COHORT_SENSOR, EXPLANATIONS_SENSOR = "cohort_refresh_sensor", "risk_explanations_sensor"
MASK_SENSOR, TRAINING_SENSOR = "predicted_mask_sensor", "segmentation_training_sensor"
STEPS_SENSORS = ("radiology_steps_sensor", "pathology_steps_sensor")
# landing_sensor: benchmarks.sensor_tick
TICKED = (TRAINING_SENSOR, MASK_SENSOR, COHORT_SENSOR, EXPLANATIONS_SENSOR, *STEPS_SENSORS)


@dataclass
class Tick:
    seconds: float = 0.0
    requests: list = field(default_factory=list)
    cursor: str | None = None
    skip: str = ""
    error: str = ""
    patients: int = 0  # the patients the requests cover (a range request covers several)
    ticks: int = 0


class Sensors:
    """The real sensors, evaluated the way the code server evaluates a tick, with the cursors the
    daemon would hold."""

    def __init__(self, instance: dg.DagsterInstance, profile: str):
        from gcmlm_assets.definitions import build_definitions

        self.instance = instance
        self.repository = build_definitions("local", profile).get_repository_def()
        self.cursors: dict[str, str | None] = {}

    def tick(self, name: str, keep_cursor: bool = True) -> Tick:
        from dagster._core.execution.resources_init import get_transitive_required_resource_keys

        sensor = self.repository.get_sensor_def(name)
        resources = self.repository.get_top_level_resources()
        needed = get_transitive_required_resource_keys(sensor.required_resource_keys, resources)
        cursor = self.cursors.get(name)
        started = time.perf_counter()
        try:
            # As the code server: an instance opened from the reference, the definitions' resources.
            with dg.build_sensor_context(instance_ref=self.instance.get_ref(), cursor=cursor,
                                         repository_def=self.repository, sensor_name=name,
                                         resources={k: v for k, v in resources.items() if k in needed}) as context:
                data = sensor.evaluate_tick(context)
        except Exception as error:  # noqa: BLE001 - reported in the table, the benchmark goes on
            return Tick(time.perf_counter() - started, cursor=cursor, error=f"{type(error).__name__}: {error}")
        tick = Tick(time.perf_counter() - started, list(data.run_requests or []),
                    data.cursor if data.cursor is not None else cursor, data.skip_message or "")
        if keep_cursor:
            self.cursors[name] = tick.cursor
        return tick

    def timed(self, name: str, repeats: int) -> Tick:
        """The median of `repeats` ticks from the same cursor (which is then kept)."""
        ticks = [self.tick(name, keep_cursor=False) for _ in range(repeats)]
        tick = sorted(ticks, key=lambda t: t.seconds)[len(ticks) // 2]
        if not tick.error:
            self.cursors[name] = tick.cursor
        return tick


# ---------------------------------------------------------------- what the sensors read on disk


def write_landing(landing: Path, artifacts: Path, patients: list[str], reference_every: int) -> None:
    for i, pid in enumerate(patients):
        folder = landing / pid
        (folder / "ct").mkdir(parents=True, exist_ok=True)
        if reference_every and i % reference_every == 0:
            (folder / "ct_label").mkdir(exist_ok=True)
            (folder / "ct_label" / f"{pid}_mask.nii.gz").write_bytes(b"reference mask")
            (artifacts / "ct_image" / pid).mkdir(parents=True, exist_ok=True)
            (artifacts / "ct_image" / pid / "ct.nii.gz").write_bytes(b"ct")
        (folder / "READY").touch()


def write_clinical(landing: Path, patients: list[str]) -> None:
    rows = [f"{pid},{i % 5 % 2 if i % 4 else ''},{50 + i % 30},{i % 2},{1 + i % 4},{20 + i % 50}"
            for i, pid in enumerate(patients)]
    (landing / "clinical.csv").write_text("patient_id,mlm,age,sex,pt_stage,tumour_size_mm\n" + "\n".join(rows) + "\n")


def install_segmentation_model(landing: Path, artifacts: Path, patients: list[str]) -> None:
    """An installed model trained on the current reference set (what segmentation_model leaves)."""
    import hashlib
    import json

    from gcmlm_assets.radiology import model_lifecycle

    root = artifacts / "segmentation_model"
    model_id = "Dataset501_GastricCT__nnUNetTrainer__nnUNetPlans__3d_fullres__fold_0__0123456789ab"
    folder = root / model_id
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        (folder / name).write_text("{}")
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint: the sensors read no weights")
    digest = hashlib.sha256((folder / "fold_0" / "checkpoint_final.pth").read_bytes()).hexdigest()
    cases = model_lifecycle.reference_set(landing, {p: artifacts / "ct_image" / p / "ct.nii.gz" for p in patients})
    (root / "current.json").write_text(json.dumps({
        "model_id": model_id, "folder": model_id, "checkpoint_sha256": digest,
        "checkpoint_sha256_by_fold": {"0": digest},
        "reference_set": model_lifecycle.reference_set_fingerprint(cases)}))


def write_scores(artifacts: Path, patients: list[str]) -> None:
    """risk_scores' table, with the columns the code in the tree declares for it (an explanation
    key column holds the key each patient's explanation records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks._scale_steps import explanation_key
    from gcmlm_assets.cohort.columns import RISK_SCORES_COLUMNS

    n = len(patients)
    probability = [((i * 7919) % 1000) / 1000 for i in range(n)]
    table = pa.table({
        "patient_id": pa.array(patients, pa.string()), "probability": pa.array(probability, pa.float64()),
        "risk_group": pa.array(["high" if p >= 0.31 else "low" for p in probability], pa.string()),
        "modalities_used": pa.array(["radiology+pathology"] * n, pa.string()),
        "probability_radiology": pa.array(probability, pa.float64()),
        "probability_pathology": pa.array(probability, pa.float64()),
        "mlm": pa.array([None if i % 4 == 0 else i % 5 % 2 for i in range(n)], pa.int8())})
    if "explanation_key" in {column.name for column in RISK_SCORES_COLUMNS}:
        table = table.append_column("explanation_key", pa.array([explanation_key(p) for p in patients], pa.string()))
    folder = artifacts / "risk_scores"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "scores.parquet.tmp", compression="zstd")
    os.replace(folder / "scores.parquet.tmp", folder / "scores.parquet")


# ---------------------------------------------------------------- the measurements


def instance_bytes(instance: dg.DagsterInstance, home: Path) -> dict[str, int]:
    """On-disk bytes of the instance's storage (SQLite files; a PostgreSQL database's size)."""
    if type(instance.event_log_storage).__name__.startswith("Postgres"):
        from sqlalchemy import text

        with instance.event_log_storage.index_connection() as conn:
            return {"database": int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar())}
    sizes = {"index.db": 0, "runs.db": 0, "run shards": 0, "other": 0}
    for path in home.rglob("*"):
        if not path.is_file() or path.name == "dagster.yaml":
            continue
        size = path.stat().st_size
        if path.name.startswith("index.db"):
            sizes["index.db"] += size
        elif path.name.startswith("runs.db"):
            sizes["runs.db"] += size
        elif path.parent.name == "runs" and path.suffix in (".db", ".db-wal", ".db-shm"):
            sizes["run shards"] += size
        else:
            sizes["other"] += size
    return sizes


def fmt_tick(tick: Tick) -> str:
    if tick.error:
        return f"n/a ({tick.error[:120]})"
    return f"{tick.seconds:.2f} s" + (f", {len(tick.requests):,} runs" if tick.requests else "")


def fmt_mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def measure(n: int, work: Path, args: argparse.Namespace, backend: str, make_instance) -> dict[str, str]:
    """Build the instance for `n` patients in `work`, play the automation forward, return the rows."""
    from gcmlm_assets.cohort.soundness_facts import unsound_results
    from gcmlm_assets.storage import ArtifactStore
    from gcmlm_assets_tests.support.definitions import patient_result_checks

    data = work / "data"
    landing, artifacts = data / "landing", data / "artifacts"
    os.environ.update({"GCMLM_DATA_ROOT": str(data), "GCMLM_LANDING_ROOT": str(landing),
                       "GCMLM_ARTIFACTS_ROOT": str(artifacts), "GCMLM_PROFILE": args.profile})
    for name in ("GCMLM_NNUNET_MODEL_FOLDER", "GCMLM_NNUNET_MODEL_SHA256"):
        os.environ.pop(name, None)
    rows: dict[str, str] = {}
    patients, new = patient_ids(n), patient_ids(args.new, prefix="NEW")
    write_landing(landing, artifacts, patients, args.reference_every)
    write_clinical(landing, patients + new)
    install_segmentation_model(landing, artifacts, patients)
    templates = record_templates(artifacts, args.profile, args.picture_bytes, args.heatmaps)
    now = time.time()
    # The full pass ends two hours ago; the K new patients' runs end half an hour ago (past any quiet period).
    start = now - 7200 - (3 * n + 2) * SECONDS_PER_RUN
    with make_instance(work / "home") as instance:
        writer = InstanceWriter(instance, templates)
        sensors = Sensors(instance, args.profile)
        built = time.perf_counter()
        add_patients(instance, patients)
        tags, probe_note = probe_landing_tags(instance, sensors, work / "landing-probe")
        write_in_batches(writer, patient_run_specs(patients, start, tags=tags))
        t = start + 2 * n * SECONDS_PER_RUN
        refresh = sensors.tick(COHORT_SENSOR)
        cohort_tags = refresh.requests[0].tags if refresh.requests else {}
        writer.write([RunSpec("cohort", None, t, {"dagster/sensor_name": COHORT_SENSOR, **cohort_tags})])
        write_scores(artifacts, patients)
        explain = explain_until_done(sensors, writer, t + SECONDS_PER_RUN, patients)
        for _ in range(n // 200 + 5):  # predicted_mask_sensor sweeps once after a model is installed
            if not sensors.tick(MASK_SENSOR).requests:
                break
        sensors.tick(TRAINING_SENSOR)
        rows["instance build (a full pass written in bulk)"] = f"{time.perf_counter() - built:.0f} s" + probe_note
        progress(backend, n, "full pass written")
        first = "" if refresh.requests else f" (no first refresh was requested: {refresh.skip or refresh.error})"
        rows["explanation runs after the full pass's risk_scores"] = describe_requests(explain) + first
        sizes = instance_bytes(instance, work / "home")
        parts = ", ".join(f"{k} {fmt_mb(v / n)}" for k, v in sizes.items())
        rows["instance bytes per patient after one full pass"] = f"{fmt_mb(sum(sizes.values()) / n)} ({parts})"
        after = sensors.tick(COHORT_SENSOR)
        rows["cohort refresh after the pass's explanation runs (nothing changed)"] = decision(after)

        for name in TICKED:
            rows[f"{name} tick, nothing queued"] = fmt_tick(sensors.timed(name, args.repeats))

        # K new patients: their drops, partitions and finished runs, then the refresh they cause.
        write_landing(landing, artifacts, new, 0)
        add_patients(instance, new)
        write_in_batches(writer, patient_run_specs(new, now - 1800 - 2 * len(new) * SECONDS_PER_RUN, tags=tags))
        refresh = sensors.tick(COHORT_SENSOR)
        others = {name: sensors.tick(name) for name in (MASK_SENSOR, TRAINING_SENSOR)}
        before = sum(instance_bytes(instance, work / "home").values())
        cohort_tags = refresh.requests[0].tags if refresh.requests else {}
        writer.write([RunSpec("cohort", None, now - 1500, {"dagster/sensor_name": COHORT_SENSOR, **cohort_tags})])
        write_scores(artifacts, patients + new)
        scores_cursor = sensors.cursors.get(EXPLANATIONS_SENSOR)
        first_tick = sensors.tick(EXPLANATIONS_SENSOR, keep_cursor=False)
        sensors.cursors[EXPLANATIONS_SENSOR] = scores_cursor
        progress(backend, n, f"refresh of {len(new)} new patients evaluated; the daemon creates runs")
        rows["daemon: that tick's runs created and queued"] = daemon_row(instance, scores_cursor, args.create_limit)
        explain = explain_until_done(sensors, writer, now - 1200, patients + new)
        counts = {COHORT_SENSOR: len(refresh.requests), EXPLANATIONS_SENSOR: len(explain.requests),
                  **{name: len(t.requests) for name, t in others.items() if t.requests}}
        described = {name: f"{c:,}" for name, c in counts.items()}
        described[EXPLANATIONS_SENSOR] = describe_requests(explain)
        rows[f"runs requested per refresh, K = {args.new} new patients"] = (
            f"{sum(counts.values()):,} (" + ", ".join(f"{name} {text}" for name, text in described.items()) + ")"
            + ("" if refresh.requests else f"; no refresh requested: {refresh.skip or refresh.error}"))
        rows["risk_explanations_sensor tick after a new risk_scores"] = fmt_tick(first_tick)
        added = sum(instance_bytes(instance, work / "home").values()) - before
        rows["instance bytes added per patient by one refresh"] = (
            f"{fmt_mb(added / (n + len(new)))} (1 cohort run + {describe_requests(explain)} explanation runs)")
        rows["cohort refresh after the refresh's explanation runs (nothing changed)"] = decision(
            sensors.tick(COHORT_SENSOR))

        everyone = patients + new
        store = ArtifactStore(artifacts)
        durations, unsound = [], {}
        for _ in range(args.repeats):
            started = time.perf_counter()
            unsound = unsound_results(instance, everyone, patient_result_checks().blocking, store)
            durations.append(time.perf_counter() - started)
        left_out = sum(len(v) for v in unsound.values())
        rows["fused_table's soundness filter"] = f"{statistics.median(durations):.2f} s ({left_out} results left out)"

        progress(backend, n, f"soundness filter timed; {n:,} runs queued")
        # N runs queued (radiology runs as landing_sensor requests them), then every tick again.
        queued = [RunSpec("radiology", pid, now - 600, tags(pid, "radiology"), dg.DagsterRunStatus.QUEUED)
                  for pid in patients]
        write_in_batches(writer, queued)
        for name in TICKED:
            rows[f"{name} tick, N runs queued"] = fmt_tick(sensors.timed(name, args.repeats))
        writer.close()
    progress(backend, n, "done")
    return rows


def probe_landing_tags(instance: dg.DagsterInstance, sensors: Sensors, zone: Path) -> tuple[LandingTags, str]:
    """The tags of the runs landing_sensor requests for one drop (a file in ct/ and wsi/, READY),
    so that the patients' runs carry what the code in the tree puts on them. The demo profile's
    encoder needs no weights: pathology is not held."""
    from gcmlm_assets.definitions import build_definitions
    from gcmlm_assets.resources import LandingZone

    drop = zone / LandingTags.PROBE
    for name in ("ct/IM000000.dcm", "wsi/slide.svs", "READY"):
        (drop / name).parent.mkdir(parents=True, exist_ok=True)
        (drop / name).write_bytes(b"probe")
    encoder = build_definitions("local", "demo").get_repository_def().get_top_level_resources()["encoder"]
    try:
        resources = {"landing": LandingZone(root=str(zone)), "encoder": encoder}
        with dg.build_sensor_context(instance_ref=instance.get_ref(), repository_def=sensors.repository,
                                     sensor_name="landing_sensor", resources=resources) as context:
            requests = sensors.repository.get_sensor_def("landing_sensor").evaluate_tick(context).run_requests or []
    except Exception as error:  # noqa: BLE001 - the tags it has always put are used instead
        return LandingTags(), f" (landing_sensor probe failed, {type(error).__name__}: {error}; usual tags)"
    probes = {r.tags.get("gcmlm/modality"): r for r in requests if r.partition_key == LandingTags.PROBE}
    return LandingTags(probes), "" if set(probes) >= {"radiology", "pathology"} else (
        f" (landing_sensor probe requested {sorted(probes)}: usual tags for the others)")


def explain_until_done(sensors: Sensors, writer: InstanceWriter, start: float, partitions: list[str]) -> Tick:
    """risk_explanations_sensor ticked until it requests nothing more (a tick may carry on the
    previous one's work), each tick's runs written finished; the ticks' requests together."""
    total = Tick()
    for ticks in range(1, 10_000):
        tick = sensors.tick(EXPLANATIONS_SENSOR)
        if tick.error or not tick.requests:
            total.error, total.skip = total.error or tick.error, total.skip or tick.skip
            break
        total.requests += tick.requests
        total.ticks = ticks
        specs = request_run_specs("explanation", EXPLANATIONS_SENSOR, tick.requests, start, partitions)
        total.patients += sum(len(spec.patients) or 1 for spec in specs)
        write_in_batches(writer, specs)
        start += len(specs) * SECONDS_PER_RUN
    return total


def describe_requests(total: Tick) -> str:
    if total.error:
        return f"n/a ({total.error[:120]})"
    if not total.requests:
        return f"0 ({total.skip[:150]})"
    ticks = f" in {total.ticks} ticks" if total.ticks > 1 else ""
    covered = "" if total.patients == len(total.requests) else f" for {total.patients:,} patients"
    return f"{len(total.requests):,}{covered}{ticks}"


def progress(backend: str, n: int, what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {backend.split(' ')[0]}, N = {n:,}: {what}", flush=True)


def decision(tick: Tick) -> str:
    if tick.error:
        return f"n/a ({tick.error[:120]})"
    if tick.requests:
        return f"REFRESH ({len(tick.requests)} run requested)"
    return f"no refresh ({tick.skip[:80]})"


def daemon_row(instance: dg.DagsterInstance, cursor: str | None, limit: int) -> str:
    from benchmarks._scale_daemon import tick_through_the_daemon

    try:
        tick = tick_through_the_daemon(instance, EXPLANATIONS_SENSOR, cursor, limit)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return f"n/a ({type(error).__name__}: {str(error)[:150]})"
    for run_id in tick.run_ids:  # the measured runs go; the benchmark writes the refresh's runs finished
        instance.delete_run(run_id)
    if not tick.created:
        return f"n/a ({tick.problem})"
    derived = "" if tick.created == tick.requested else (
        f"; all {tick.requested:,}: {tick.per_run_s * tick.requested:.0f} s (derived)")
    return (f"{tick.creation_s:.1f} s for {tick.created:,} runs ({tick.per_run_s:.2f} s each{derived}); "
            f"code-server evaluation {tick.evaluation_s:.2f} s" + (f"; {tick.problem}" if tick.problem else ""))


# ---------------------------------------------------------------- backends and the table


def postgres_instance(url: str, n: int):
    """A context manager making an instance in a fresh database `gcmlm_scale_<n>` on `url`'s server."""
    import contextlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"gcmlm_scale_{n}_{os.getpid()}"

    @contextlib.contextmanager
    def make(home: Path):
        admin = create_engine(base.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            home.mkdir(parents=True, exist_ok=True)
            config = (Path(__file__).resolve().parents[1] / "deploy" / "local" / "dagster.yaml").read_text(encoding="utf-8")
            target = base.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)
            (home / "dagster.yaml").write_text(config + f"\nstorage:\n  postgres:\n    postgres_url: {target}\n")
            with dg.DagsterInstance.from_config(str(home)) as instance:
                yield instance
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    return make


def print_table(title: str, columns: list[str], rows: dict[str, dict[str, str]]) -> None:
    header = ["quantity", *columns]
    body = [[name, *(values.get(c, "") for c in columns)] for name, values in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    print(f"\n{title}")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in body:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--new", type=int, default=10, help="K: new patients of one refresh")
    parser.add_argument("--repeats", type=int, default=3, help="ticks timed per sensor (the median is shown)")
    parser.add_argument("--postgres", help="also on this PostgreSQL server (postgresql://user:pw@host:port/db); "
                                           "a database is created per N and dropped")
    parser.add_argument("--picture-bytes", type=int,
                        help="bytes of each embedded picture (default: 92 %% of the limit the code sets for it)")
    parser.add_argument("--heatmaps", type=int, help="explanation pictures per patient (default: as the code embeds)")
    parser.add_argument("--reference-every", type=int, default=10, help="every k-th patient has a reference mask")
    parser.add_argument("--create-limit", type=int, default=100, help="runs the daemon creates in the timed tick")
    parser.add_argument("--profile", default="production")
    parser.add_argument("--keep", type=Path, help="build under this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    backends = {"SQLite (run-sharded event log, deploy/local/dagster.yaml)": lambda n: local_instance}
    if args.postgres:
        backends[f"PostgreSQL ({args.postgres.rsplit('@', 1)[-1]})"] = lambda n: postgres_instance(args.postgres, n)
    tables = {}
    for backend, make in backends.items():
        rows: dict[str, dict[str, str]] = {}
        for n in args.patients:
            root = args.keep or Path(tempfile.mkdtemp(prefix="scale-"))
            work = root / f"{'pg' if 'Postgre' in backend else 'sqlite'}-{n}"
            try:
                for name, value in measure(n, work, args, backend, make(n)).items():
                    rows.setdefault(name, {})[f"N = {n:,}"] = value
            finally:
                if not args.keep:
                    shutil.rmtree(root, ignore_errors=True)
        tables[backend] = rows
    for backend, rows in tables.items():
        print_table(backend, [f"N = {n:,}" for n in args.patients], rows)


if __name__ == "__main__":
    main()
