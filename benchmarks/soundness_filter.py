"""fused_table's soundness filter (`unsound_results`) on a local SQLite instance of N patients.

    python -m benchmarks.soundness_filter [--patients 1000 10000] [--history 1 3]
                                          [--failed-every 100] [--repeats 3] [--unpartitioned]

Builds, in a temporary folder, the instance's event log as the per-patient runs leave it: for each
of `history` passes over the cohort, one run per batch of 32 patients of `radiomics_row` and
`slide_vector`, each with its planned materializations, the runs' check plans, and per patient
its materialization and its blocking checks' evaluations, stored under the patient (batching.py).
In the newest pass every `failed_every`-th patient fails `radiomics_row_finite` (ERROR, left
out), the one after it fails it with WARN (kept), and 1 in 1,000 has no check result (its step was
killed between its materializations and its checks: left out); older passes fail others.
`--unpartitioned` stores the evaluations as they were stored before (partition None: one history
for all patients), to time what an instance upgraded from then pays until its patients are run
again. `time_soundness_filter(n_patients, history_multiplier)` is the one measurement, for other
benchmarks (benchmarks/scale.py).

The events are written straight into the index shard, in bulk, one transaction per pass, with
Dagster's own row layout (`_event_to_row`, its asset tag and asset rows, the check execution rows
it writes): storing 10^5 events one by one through the instance takes hours here. Then
`unsound_results` is timed (median of `repeats`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import sqlalchemy as db
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationPlanned, AssetCheckEvaluationTargetMaterializationData)
from dagster._core.events import AssetMaterializationPlannedData, DagsterEvent, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as CheckStatus
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable, SqlEventLogStorageTable
from dagster._core.storage.sqlalchemy_compat import db_select

from gcmlm_assets.cohort.soundness_facts import unsound_results
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.definitions import patient_result_checks

BATCH_PATIENTS = 32  # patients per run
JOB = "__ASSET_JOB"
FAILING_CHECK = "radiomics_row_finite"
UNCHECKED_EVERY = 1000


def patient_ids(n_patients: int) -> list[str]:
    return [f"P{i:06d}" for i in range(n_patients)]


def _entry(run_id: str, step_key: str, event_type: dg.DagsterEventType, data) -> EventLogEntry:
    event = DagsterEvent(event_type.value, job_name=JOB, step_key=step_key, event_specific_data=data)
    return EventLogEntry(error_info=None, level=10, user_message="", run_id=run_id, timestamp=time.time(),
                         step_key=step_key, job_name=JOB, dagster_event=event)


def _failure(n_pass: int, passes: int, index: int, failed_every: int) -> dg.AssetCheckSeverity | None:
    """Whether patient `index` fails FAILING_CHECK in pass `n_pass`, and with which severity."""
    newest = n_pass == passes - 1
    offset = 0 if newest else 1 + n_pass % (failed_every - 2)  # older passes fail other patients
    if (index - offset) % failed_every == 0:
        return dg.AssetCheckSeverity.ERROR
    if (index - offset) % failed_every == 1:
        return dg.AssetCheckSeverity.WARN
    return None


def _unchecked(index: int, unchecked_every: int) -> bool:
    """Whether patient `index`'s newest materializations have no check result."""
    return index % unchecked_every == 2


class _Pass:
    """One pass's events in the order they are stored, with the storage ids they will get: the index
    shard's `event_logs` ids follow one another within the one transaction that inserts them."""

    def __init__(self, first_id: int):
        self.first_id = first_id
        self.entries: list[EventLogEntry] = []
        self.check_rows: list[tuple[int, CheckStatus, int | None]] = []  # (entry, status, materialization id)

    def add(self, entry: EventLogEntry) -> int:
        self.entries.append(entry)
        return self.first_id + len(self.entries) - 1

    def add_check(self, entry: EventLogEntry, status: CheckStatus, materialization: int | None) -> None:
        self.check_rows.append((self.add(entry) - self.first_id, status, materialization))

    def write(self, storage, conn) -> None:
        """The rows SqliteEventLogStorage.store_event writes in the index shard, in bulk."""
        rows = [storage._event_to_row(entry) for entry in self.entries]  # noqa: SLF001
        conn.execute(SqlEventLogStorageTable.insert(), rows)
        last = conn.execute(db_select([db.func.max(SqlEventLogStorageTable.c.id)])).scalar()
        if last != self.first_id + len(rows) - 1:
            raise AssertionError(f"event ids {self.first_id}..{last} do not follow one another")
        latest_by_type = {}
        materializations = []
        for index, entry in enumerate(self.entries):
            kind = entry.dagster_event.event_type
            if kind in (dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED):
                latest_by_type[(entry.dagster_event.asset_key, kind)] = index
                if kind == dg.DagsterEventType.ASSET_MATERIALIZATION:
                    materializations.append(index)
        storage._store_asset_event_tags(  # noqa: SLF001
            conn, [self.entries[i] for i in materializations], [self.first_id + i for i in materializations])
        for index in sorted(latest_by_type.values()):  # the asset rows end as after every event
            storage._store_asset_event(conn, self.entries[index], self.first_id + index)  # noqa: SLF001
        conn.execute(AssetCheckExecutionsTable.insert(), [
            self._check_row(rows[index]["event"], self.entries[index], self.first_id + index, status, materialization)
            for index, status, materialization in self.check_rows])

    @staticmethod
    def _check_row(serialized: str, entry: EventLogEntry, event_id: int, status: CheckStatus,
                   materialization: int | None) -> dict:
        data = entry.dagster_event.event_specific_data
        return dict(asset_key=data.asset_key.to_string(), check_name=data.check_name,
                    partition=getattr(data, "partition", None), run_id=entry.run_id, execution_status=status.value,
                    evaluation_event=serialized,
                    evaluation_event_timestamp=datetime.fromtimestamp(entry.timestamp, timezone.utc).replace(
                        tzinfo=None),
                    evaluation_event_storage_id=event_id, materialization_event_storage_id=materialization)


def build_instance(instance: dg.DagsterInstance, patients: list[str], passes: int, blocking: dict[str, list[str]],
                   failed_every: int, unpartitioned: bool = False, unchecked_every: int = UNCHECKED_EVERY) -> None:
    storage = instance.event_log_storage
    for n_pass in range(passes):
        with storage.index_connection() as conn:
            last = conn.execute(db_select([db.func.max(SqlEventLogStorageTable.c.id)])).scalar()
            events = _Pass((last or 0) + 1)
            for start in range(0, len(patients), BATCH_PATIENTS):
                batch = patients[start:start + BATCH_PATIENTS]
                run_id = str(uuid.uuid4())
                for asset, checks in blocking.items():
                    key = dg.AssetKey(asset)
                    for patient in batch:
                        events.add(_entry(run_id, asset, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
                                          AssetMaterializationPlannedData(key, partition=patient)))
                    if not unpartitioned:  # the run's plan for each check, never evaluated under None
                        for name in checks:
                            events.add_check(_entry(run_id, asset, dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
                                                    AssetCheckEvaluationPlanned(asset_key=key, check_name=name)),
                                             CheckStatus.PLANNED, None)
                    for index, patient in enumerate(batch, start):
                        materialization = dg.AssetMaterialization(
                            key, partition=patient, metadata={"path": f"/data/artifacts/{asset}/{patient}"},
                            tags={"dagster/data_version": uuid.uuid4().hex})
                        entry = _entry(run_id, asset, dg.DagsterEventType.ASSET_MATERIALIZATION,
                                       StepMaterializationData(materialization))
                        target = AssetCheckEvaluationTargetMaterializationData(
                            storage_id=events.add(entry), run_id=run_id, timestamp=entry.timestamp)
                        if n_pass == passes - 1 and _unchecked(index, unchecked_every):
                            continue  # its step was killed after the materialization, before its checks
                        for name in checks:
                            severity = _failure(n_pass, passes, index, failed_every) if name == FAILING_CHECK else None
                            evaluation = dg.AssetCheckEvaluation(
                                asset_key=key, check_name=name, passed=severity is None,
                                severity=severity or dg.AssetCheckSeverity.ERROR, blocking=True,
                                description=f"{name} failed for {patient}" if severity else None,
                                partition=None if unpartitioned else patient, target_materialization_data=target)
                            check_entry = _entry(run_id, asset, dg.DagsterEventType.ASSET_CHECK_EVALUATION, evaluation)
                            events.add_check(check_entry, CheckStatus.FAILED if severity else CheckStatus.SUCCEEDED,
                                             target.storage_id)
            events.write(storage, conn)


def time_soundness_filter(n_patients: int, history_multiplier: int, *, failed_every: int = 100,
                          unpartitioned: bool = False, repeats: int = 3) -> float:
    """Median seconds (wall clock) of `unsound_results` over `n_patients` after
    `history_multiplier` passes."""
    return measure_soundness_filter(n_patients, history_multiplier, failed_every=failed_every,
                                    unpartitioned=unpartitioned, repeats=repeats)[0]


def measure_soundness_filter(n_patients: int, history_multiplier: int, *, failed_every: int = 100,
                             unpartitioned: bool = False, repeats: int = 3) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of `unsound_results`, medians of `repeats`: on a shared machine
    the CPU time is the steadier of the two (SQLite runs in this process)."""
    blocking = patient_result_checks().blocking
    patients = patient_ids(n_patients)
    with tempfile.TemporaryDirectory() as folder:
        instance = dg.DagsterInstance.local_temp(tempdir=folder)
        try:
            build_instance(instance, patients, history_multiplier, blocking, failed_every, unpartitioned)
            store = ArtifactStore(Path(folder) / "artifacts")
            wall, cpu = [], []
            for _ in range(repeats):
                started, started_cpu = time.perf_counter(), time.process_time()
                unsound = unsound_results(instance, patients, blocking, store)
                wall.append(time.perf_counter() - started)
                cpu.append(time.process_time() - started_cpu)
        finally:
            instance.dispose()
    unchecked = sum(1 for i in range(n_patients) if _unchecked(i, UNCHECKED_EVERY))
    expected = (sum(1 for i in range(n_patients) if i % failed_every == 0) + unchecked, unchecked)
    found = (len(unsound["radiology"]), len(unsound["pathology"]))
    if found != expected:
        raise AssertionError(f"expected {expected} (radiology, pathology) results left out, found {found}")
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--history", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--failed-every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unpartitioned", action="store_true",
                        help="evaluations stored with partition None (an instance from before)")
    args = parser.parse_args()
    layout = "partition None (before)" if args.unpartitioned else "per patient"
    print(f"unsound_results, check evaluations stored {layout}, 1 in {args.failed_every} failing (ERROR), "
          f"1 in {args.failed_every} warning, 1 in {UNCHECKED_EVERY} unchecked; median of {args.repeats}")
    print("| patients | check history | seconds | CPU seconds | seconds per 1,000 patients |")
    print("|---|---|---|---|---|")
    for n in args.patients:
        for history in args.history:
            wall, cpu = measure_soundness_filter(n, history, failed_every=args.failed_every,
                                                 unpartitioned=args.unpartitioned, repeats=args.repeats)
            print(f"| {n:,} | {history}x | {wall:.2f} | {cpu:.2f} | {wall / n * 1000:.3f} |", flush=True)


if __name__ == "__main__":
    main()
