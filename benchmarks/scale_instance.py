"""A Dagster instance holding thousands of patients' runs, written in bulk (scale benchmark, tests).

    python -m benchmarks.scale_instance --home DIR [--patients 1000] [--picture-bytes B] [--heatmaps H]

builds DIR as a DAGSTER_HOME (deploy/local/dagster.yaml: SQLite, the queued run coordinator) with
the patients' runs, to look at in the UI (`DAGSTER_HOME=DIR dagster-webserver ...`) or time queries on.

How: each kind of run (radiology, pathology, cohort, explanation) is executed once by Dagster,
on an ephemeral instance, for a placeholder patient, with stand-ins of the real steps built from
the real definitions' specs (`_scale_steps.py`). Its events, as Dagster serialized them, become a
template. A run of patient P is that template with the run id, the patient id and the times
replaced and its references to other events (a check's target materialization, the
`dagster/input_event_pointer/*` tags) pointed at P's own events; it is written the way
`SqliteEventLogStorage.store_event` writes each event (the run's own shard; asset, check and run
status events mirrored in the index with their asset-key, tag and check-execution rows), but one
transaction per batch instead of one per event. Runs go straight into the run storage's tables,
finished (SUCCESS, with start and end times) or QUEUED. Dagster's own queries then read them as
they read real runs (`gcmlm_assets_tests/core/test_scale_instance.py`).
"""

import argparse
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import (
    AssetCheckExecutionsTable,
    AssetEventTagsTable,
    SqlEventLogStorageTable,
)
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._serdes import deserialize_value, serialize_value
from sqlalchemy import create_engine, event as sqlalchemy_event
from sqlalchemy.pool import NullPool

from benchmarks._scale_templates import (  # noqa: F401 - record_templates and Templates are this module's API too
    DATA_VERSION_TAG, PARTITION_SETS, PLACEHOLDER, EventTemplate, Templates, record_templates)

SENSOR_TAG, RUN_KEY_TAG, PARTITION_TAG = "dagster/sensor_name", "dagster/run_key", "dagster/partition"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCAL_INSTANCE_CONFIG = PROJECT_ROOT / "deploy" / "local" / "dagster.yaml"
SHARD_THREADS = 3
SECONDS_PER_RUN = 60.0  # a run's place on the time line (the recorded events keep their own spacing)


# ---------------------------------------------------------------- writing


@dataclass
class RunSpec:
    """One run to write: which template, for whom, when, with which tags."""

    kind: str
    patient: str | None
    start: float
    tags: dict[str, str]
    status: dg.DagsterRunStatus = dg.DagsterRunStatus.SUCCESS
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    patients: tuple[str, ...] = ()  # a run over a range of patients (no partition tag)


def workspace_job_origin(job_name: str):
    """Where the daemon's runs come from: workspace.yaml's code location (a queued run must say)."""
    from dagster._core.remote_origin import RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.workspace.load import location_origin_from_module_name

    location = location_origin_from_module_name("gcmlm_assets.definitions", None, str(PROJECT_ROOT), "gcmlm_assets")
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_name)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc).replace(tzinfo=None)


class InstanceWriter:
    """Writes templated runs into `instance` (SQLite run-sharded or a single-database storage)."""

    def __init__(self, instance: dg.DagsterInstance, templates: Templates):
        self.instance, self.templates = instance, templates
        self.events = instance.event_log_storage
        self.sharded = bool(getattr(self.events, "is_run_sharded", False))
        self._latest: dict[int, int] = {}  # template storage id -> the newest written id of that event
        self._by_patient: dict[str, dict[int, int]] = {}  # the same, per patient
        self._empty_shard: Path | None = None
        if self.sharded:
            scratch = Path(tempfile.mkdtemp(prefix="empty-shard-"))
            storage = type(self.events)(str(scratch))
            with storage.run_connection("empty"):
                pass
            self._empty_shard = Path(storage.path_for_shard("empty"))
        self._job_origin = workspace_job_origin(next(iter(templates.runs.values())).run.job_name)
        runs = instance.run_storage
        for job, plan in templates.snapshots:
            if not runs.has_job_snapshot(job.snapshot_id):
                runs.add_job_snapshot(job)
            runs.add_execution_plan_snapshot(plan)

    def close(self) -> None:
        if self._empty_shard is not None:
            shutil.rmtree(self._empty_shard.parent, ignore_errors=True)

    def write(self, specs: list[RunSpec]) -> None:
        """The runs of `specs`, in order, in one transaction per storage."""
        with self.instance.run_storage.connect() as conn:
            self._write_runs(conn, specs)
        # The shards are separate files: threads write them while this one fills the index.
        with self.events.index_transaction() as conn, ThreadPoolExecutor(SHARD_THREADS) as shards:
            newest: dict[tuple[str, str], tuple[int, str]] = {}
            written = []
            for spec in specs:
                shard_rows = self._write_events(conn, spec, newest)
                if shard_rows:
                    written.append(shards.submit(self._write_shard, spec.run_id, shard_rows))
            for future in written:
                future.result()
            # The asset-key rows hold each asset's newest materialization and planned event: what
            # one update per event would leave.
            for event_id, text in sorted(newest.values()):
                self.events._store_asset_event(conn, deserialize_value(text, EventLogEntry), event_id)

    def _write_runs(self, conn, specs: list[RunSpec]) -> None:
        """The rows add_run writes, with what handle_run_event sets on RUN_START and RUN_SUCCESS."""
        rows, tags = [], []
        for spec in specs:
            template = self.templates.runs[spec.kind]
            run_tags = {k: v for k, v in template.run.tags.items() if k != PARTITION_TAG}
            run_tags.update(spec.tags)
            if spec.patient:
                run_tags[PARTITION_TAG] = spec.patient
            run = template.run._replace(run_id=spec.run_id, tags=run_tags, status=spec.status,
                                        remote_job_origin=self._job_origin)
            row = {"run_id": run.run_id, "pipeline_name": run.job_name, "status": run.status.value,
                   "run_body": serialize_value(run), "snapshot_id": run.job_snapshot_id,
                   "partition": run_tags.get(PARTITION_TAG), "partition_set": run_tags.get("dagster/partition_set"),
                   "backfill_id": run_tags.get("dagster/backfill"), "create_timestamp": _utc(spec.start),
                   "start_time": None, "end_time": None, "update_timestamp": _utc(spec.start + 2.0)}
            if spec.status == dg.DagsterRunStatus.SUCCESS:
                end = spec.start + template.offset_of("PIPELINE_SUCCESS")
                row.update(start_time=spec.start + template.offset_of("PIPELINE_START"), end_time=end,
                           update_timestamp=_utc(end))
            rows.append(row)
            tags += [{"run_id": run.run_id, "key": k, "value": v} for k, v in run.tags_for_storage().items()]
        conn.execute(RunsTable.insert(), rows)
        if tags:
            conn.execute(RunTagsTable.insert(), tags)

    def _write_events(self, conn, spec: RunSpec, newest: dict) -> list[dict]:
        """The run's events in the index (all of them in a single-database storage); returns the
        rows of its own shard (run-sharded SQLite)."""
        template = self.templates.runs[spec.kind]
        events = template.events
        if spec.status != dg.DagsterRunStatus.SUCCESS:
            events = events[:template.queued_upto]
        delta = spec.start - template.start
        own: dict[int, int] = {}
        shard_rows, pending, checks, tag_rows = [], [], {}, []
        insert = SqlEventLogStorageTable.insert()
        for event, patient in self._sequence(events, spec):
            patient_ids = self._by_patient.setdefault(patient, {}) if patient else {}

            def written_id(template_id: int) -> int:
                return (own.get((patient, template_id)) or patient_ids.get(template_id)
                        or self._latest.get(template_id, template_id))

            holes = {"run": spec.run_id, "patient": patient or PLACEHOLDER}
            text = "".join(part if isinstance(part, str) else repr(part[1] + delta) if part[0] == "ts"
                           else str(written_id(part[1])) if part[0] == "id" else holes[part[0]]
                           for part in event.parts)
            row = {"run_id": spec.run_id, "event": text, "dagster_event_type": event.event_type,
                   "timestamp": _utc(event.timestamp + delta), "step_key": event.step_key,
                   "asset_key": event.asset_key, "partition": patient if event.partitioned else None}
            if self.sharded:
                shard_rows.append(row)
                if not event.indexed:
                    continue
            elif not (event.asset_key or event.check):
                pending.append(row)  # a single-database storage keeps every event in one table
                continue
            if pending:  # in order: ids follow the run's events
                conn.execute(insert, pending)
                pending.clear()
            event_id = conn.execute(insert, row).inserted_primary_key[0]
            if event.check:
                self._check_rows(checks, event.check, spec.run_id, patient, text, row["timestamp"], event_id,
                                 written_id)
            elif event.asset_key:
                own[(patient, event.storage_id)] = self._latest[event.storage_id] = event_id
                if patient:
                    patient_ids[event.storage_id] = event_id
                if event.data_version is not None:
                    tag_rows.append({"event_id": event_id, "asset_key": event.asset_key, "key": DATA_VERSION_TAG,
                                     "value": event.data_version.replace(PLACEHOLDER, patient or PLACEHOLDER),
                                     "event_timestamp": row["timestamp"]})
                newest[(event.asset_key, event.event_type)] = (event_id, text)
        if pending:
            conn.execute(insert, pending)
        if tag_rows:
            conn.execute(AssetEventTagsTable.insert(), tag_rows)
        if checks:
            conn.execute(AssetCheckExecutionsTable.insert(), list(checks.values()))
        return shard_rows

    @staticmethod
    def _sequence(events: list[EventTemplate], spec: RunSpec) -> Iterator[tuple[EventTemplate, str | None]]:
        """(event, patient) in the order the run writes them. A run over a range of patients
        (`spec.patients`) writes its run and step events once and each patient's own events (those
        with a partition or naming the patient) once per patient; a range step logs materializations,
        so the step output that carries a single patient's metadata is left out."""
        if not spec.patients:
            yield from ((event, spec.patient) for event in events)
            return
        for event in events:
            if event.event_type == "STEP_OUTPUT" and ("patient",) in event.parts:
                continue
            if event.partitioned or ("patient",) in event.parts:
                yield from ((event, patient) for patient in spec.patients)
            else:
                yield event, None

    @staticmethod
    def _check_rows(rows: dict, facts: tuple, run_id: str, patient: str | None, text: str, timestamp: datetime,
                    event_id: int, written_id) -> None:
        """The check-execution rows Dagster leaves: a PLANNED row per planned check (and partition),
        which the check's evaluation in the same run and partition then completes (or, with no
        such row, adds its own)."""
        def partition(value):
            return patient if value == "patient" else value

        if facts[0] == "planned":
            _, asset_key, check_name, partitions = facts
            for key in map(partition, partitions):
                rows[(asset_key, check_name, key, len(rows))] = {
                    "asset_key": asset_key, "check_name": check_name, "partition": key, "run_id": run_id,
                    "execution_status": AssetCheckExecutionRecordStatus.PLANNED.value, "evaluation_event": text,
                    "evaluation_event_timestamp": timestamp, "evaluation_event_storage_id": event_id,
                    "materialization_event_storage_id": None}
            return
        _, asset_key, check_name, passed, target, key = facts
        key = partition(key)
        status = AssetCheckExecutionRecordStatus.SUCCEEDED if passed else AssetCheckExecutionRecordStatus.FAILED
        values = {"execution_status": status.value, "evaluation_event": text, "evaluation_event_timestamp": timestamp,
                  "evaluation_event_storage_id": event_id,
                  "materialization_event_storage_id": written_id(target) if target is not None else None,
                  "partition": key}
        planned = [k for k, row in rows.items() if k[:3] == (asset_key, check_name, key)
                   and row["execution_status"] == AssetCheckExecutionRecordStatus.PLANNED.value]
        if planned:
            rows[planned[0]].update(values)
        else:
            rows[(asset_key, check_name, key, len(rows))] = {"asset_key": asset_key, "check_name": check_name,
                                                              "run_id": run_id, **values}

    def _write_shard(self, run_id: str, rows: list[dict]) -> None:
        """The run's own SQLite file: a copy of an empty shard Dagster created, then its events
        (without waiting for the disk on commit: the file's content is the same)."""
        shutil.copyfile(self._empty_shard, self.events.path_for_shard(run_id))
        engine = create_engine(self.events.conn_string_for_shard(run_id), poolclass=NullPool)
        sqlalchemy_event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA synchronous=OFF"))
        try:
            with engine.begin() as conn:
                conn.execute(SqlEventLogStorageTable.insert(), rows)
        finally:
            engine.dispose()


# ---------------------------------------------------------------- what a full pass writes


class LandingTags:
    """The tags landing_sensor puts on a patient's run: those of one probe request per modality
    (`from_requests`, what the code in the tree requests), else the ones it has always put."""

    PROBE = "PROBE000000"

    def __init__(self, probes: dict[str, dg.RunRequest] | None = None):
        self.probes = probes or {}

    def __call__(self, patient: str, modality: str) -> dict[str, str]:
        fingerprint = uuid.uuid5(uuid.NAMESPACE_URL, f"{patient}/{modality}").hex[:16]
        probe = self.probes.get(modality)
        if probe is None:
            return {SENSOR_TAG: "landing_sensor", RUN_KEY_TAG: f"{patient}:{modality}:{fingerprint}",
                    "gcmlm/modality": modality, "gcmlm/fingerprint": fingerprint}
        old = probe.tags.get("gcmlm/fingerprint")

        def own(value: str) -> str:
            value = value.replace(self.PROBE, patient)
            return value.replace(old, fingerprint) if old else value

        tags = {k: own(v) for k, v in probe.tags.items() if k != PARTITION_TAG}
        return {**tags, SENSOR_TAG: "landing_sensor", **({RUN_KEY_TAG: own(probe.run_key)} if probe.run_key else {})}


landing_run_tags = LandingTags()


def patient_run_specs(patients: Iterable[str], start: float, status=dg.DagsterRunStatus.SUCCESS,
                      tags=landing_run_tags) -> list[RunSpec]:
    """A radiology and a pathology run per patient, as landing_sensor requests them, one after the other."""
    specs = []
    for i, patient in enumerate(patients):
        for j, modality in enumerate(("radiology", "pathology")):
            specs.append(RunSpec(modality, patient, start + (2 * i + j) * SECONDS_PER_RUN,
                                 tags(patient, modality), status))
    return specs


RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


def request_run_specs(kind: str, sensor: str, requests: Iterable[dg.RunRequest], start: float,
                      partitions: Sequence[str] = ()) -> list[RunSpec]:
    """Finished runs for a sensor's run requests, one run per request with the request's tags. A
    request over a range of `partitions` (in their order) is one run that materializes each patient
    of the range."""
    specs = []
    for i, request in enumerate(requests):
        tags = {**request.tags, SENSOR_TAG: sensor, **({RUN_KEY_TAG: request.run_key} if request.run_key else {})}
        patients: tuple[str, ...] = ()
        if request.partition_key is None and all(tag in request.tags for tag in RANGE_TAGS):
            first, last = (partitions.index(request.tags[tag]) for tag in RANGE_TAGS)
            patients = tuple(partitions[first:last + 1])
        specs.append(RunSpec(kind, request.partition_key, start + i * SECONDS_PER_RUN, tags, patients=patients))
    return specs


def write_in_batches(writer: InstanceWriter, specs: list[RunSpec], batch: int = 300) -> None:
    for first in range(0, len(specs), batch):
        writer.write(specs[first:first + batch])


def add_patients(instance: dg.DagsterInstance, patients: Sequence[str]) -> None:
    """`patients` added to the `patients` partitions and their only scans (keyed by the patient id,
    scans.py) to `ct_scans`, those already there left alone."""
    for partition_set in PARTITION_SETS:
        known = set(instance.get_dynamic_partitions(partition_set))
        instance.add_dynamic_partitions(partition_set, [p for p in patients if p not in known])


@dataclass
class Population:
    patients: list[str]
    runs: dict[str, list[str]]  # kind -> run ids
    seconds: float


def populate(instance: dg.DagsterInstance, patients: list[str], *, templates: Templates | None = None,
             artifacts: str | Path = "/artifacts", ended: float | None = None, cohort: bool = True,
             explanations: bool = True) -> Population:
    """A full pass for `patients`: each one's radiology and pathology run, then one cohort run, then
    each one's explanation run (one run per patient, as risk_explanations_sensor requests them
    today), every run finished; the last ended `ended` (default: an hour ago). The patients are
    added to the `patients` partitions and, each with one CT scan keyed by its id, to `ct_scans`."""
    started = time.perf_counter()
    templates = templates or record_templates(artifacts)
    add_patients(instance, patients)
    count = 2 * len(patients) + int(cohort) + (len(patients) if explanations else 0)
    start = (ended or time.time() - 3600) - count * SECONDS_PER_RUN
    specs = patient_run_specs(patients, start)
    t = start + 2 * len(patients) * SECONDS_PER_RUN
    if cohort:
        specs.append(RunSpec("cohort", None, t, {SENSOR_TAG: "cohort_refresh_sensor",
                                                 RUN_KEY_TAG: f"cohort:{uuid.uuid4().hex[:16]}"}))
        t += SECONDS_PER_RUN
    if explanations:
        specs += request_run_specs("explanation", "risk_explanations_sensor", [
            dg.RunRequest(run_key=f"explain:{p}:0", partition_key=p) for p in patients], t)
    writer = InstanceWriter(instance, templates)
    try:
        write_in_batches(writer, specs)
    finally:
        writer.close()
    runs: dict[str, list[str]] = {}
    for spec in specs:
        runs.setdefault(spec.kind, []).append(spec.run_id)
    return Population(list(patients), runs, time.perf_counter() - started)


@contextlib.contextmanager
def local_instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """A DAGSTER_HOME-style instance in `home` with the local deployment's dagster.yaml."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(LOCAL_INSTANCE_CONFIG.read_text(encoding="utf-8"))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def patient_ids(count: int, prefix: str = "GC") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="the DAGSTER_HOME to build (new or empty)")
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--picture-bytes", type=int, help="bytes of each picture (default: near the code's limits)")
    parser.add_argument("--heatmaps", type=int, help="explanation pictures per patient (default: as the code embeds)")
    args = parser.parse_args()
    if args.home.exists() and any(p.name != "dagster.yaml" for p in args.home.iterdir()):
        raise SystemExit(f"{args.home} is not empty")
    templates = record_templates(args.home / "artifacts", picture_bytes=args.picture_bytes, heatmaps=args.heatmaps)
    with local_instance(args.home) as instance:
        population = populate(instance, patient_ids(args.patients), templates=templates)
        print(f"{args.patients:,} patients, {sum(len(r) for r in population.runs.values()):,} runs written in "
              f"{population.seconds:.1f} s; runs: {instance.get_runs_count():,}")


if __name__ == "__main__":
    main()
