"""Each kind of run a patient has, executed once by Dagster and kept as a template (scale benchmark).

A template is the run's events as Dagster serialized them, cut into literal text and the holes
that differ between two patients' copies (`scale_instance.InstanceWriter` fills them in).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, EVENT_TYPE_TO_PIPELINE_RUN_STATUS, DagsterEvent
from dagster._core.events.log import EventLogEntry
from dagster._serdes import serialize_value

from benchmarks._scale_steps import COHORT, EXPLANATIONS, PATHOLOGY, RADIOLOGY, Shapes, stand_in_definitions

PLACEHOLDER = "ZZPATIENTZZ"
# The partition sets a patient's runs use: `ct_scans` for radiology (one scan per patient here,
# keyed by the patient id), `patients` for the others.
PARTITION_SETS = ("patients", "ct_scans")
KINDS = {"radiology": RADIOLOGY, "pathology": PATHOLOGY, "cohort": COHORT, "explanation": EXPLANATIONS}
DATA_VERSION_TAG = "dagster/data_version"
INDEXED = ASSET_EVENTS | ASSET_CHECK_EVENTS | set(EVENT_TYPE_TO_PIPELINE_RUN_STATUS)


@dataclass
class EventTemplate:
    parts: list  # literal strings and (kind, value) holes, see _compile
    event_type: str | None
    step_key: str | None
    asset_key: str | None
    partitioned: bool
    indexed: bool
    check: tuple | None  # what the check-execution row needs, see _check_row_facts
    timestamp: float
    storage_id: int  # in the ephemeral instance it was recorded on
    data_version: str | None


@dataclass
class RunTemplate:
    kind: str
    run: dg.DagsterRun
    events: list[EventTemplate]
    start: float  # timestamp of the first event
    queued_upto: int  # events[:queued_upto] are what a queued run has written

    def offset_of(self, event_type: str) -> float:
        return next(e.timestamp for e in self.events if e.event_type == event_type) - self.start


# What differs between two patients' copies of an event: its times, the storage ids it refers to
# (a check's target materialization, the input event pointer tags), its run id and patient id.
_HOLES = (r'"timestamp": (?P<ts>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)'
          r'|"storage_id": (?P<sid>\d+)'
          r'|(?P<pointer>"dagster/input_event_pointer/[^"]+": ")(?P<pointed>\d+)"'
          r"|(?P<fixed>{run_id}|{patient})")  # both filled in by _compile


def _compile(text: str, run_id: str) -> list:
    """A serialized event as literal strings and holes: ("ts", t), ("id", template storage id),
    ("run",), ("patient",)."""
    pattern = re.compile(_HOLES.replace("{run_id}", re.escape(run_id)).replace("{patient}", PLACEHOLDER))
    parts, last = [], 0
    for match in pattern.finditer(text):
        parts.append(text[last:match.start()])
        if match.group("ts") is not None:
            parts += ['"timestamp": ', ("ts", float(match.group("ts")))]
        elif match.group("sid") is not None:
            parts += ['"storage_id": ', ("id", int(match.group("sid")))]
        elif match.group("pointer") is not None:
            parts += [match.group("pointer"), ("id", int(match.group("pointed"))), '"']
        else:
            parts.append(("run",) if match.group("fixed") == run_id else ("patient",))
        last = match.end()
    parts.append(text[last:])
    return [p for p in parts if p != ""]


def _lifecycle_events(run: dg.DagsterRun, before: float) -> list[EventLogEntry]:
    """What the queued run coordinator and its daemon add before the run starts."""
    return [EventLogEntry(user_message="", level=20, job_name=run.job_name, run_id=run.run_id, error_info=None,
                          timestamp=before - delay, step_key=None,
                          dagster_event=DagsterEvent(event_type_value=kind.value, job_name=run.job_name))
            for kind, delay in ((dg.DagsterEventType.RUN_ENQUEUED, 2.0), (dg.DagsterEventType.RUN_STARTING, 1.0))]


@dataclass
class Templates:
    runs: dict[str, RunTemplate]
    snapshots: list[tuple]  # (job snapshot, execution plan snapshot) of each run


def record_templates(artifacts: str | Path, profile: str = "production", picture_bytes: int | None = None,
                     heatmaps: int | None = None) -> Templates:
    """Execute each kind of run once for the placeholder patient and keep its events."""
    from gcmlm_assets.definitions import build_definitions

    shapes = Shapes(Path(artifacts), picture_bytes, heatmaps)
    stand_ins = stand_in_definitions(build_definitions("local", profile), shapes)
    job = stand_ins.resolve_implicit_global_asset_job_def()
    runs, snapshots = {}, []
    with dg.DagsterInstance.ephemeral() as instance:
        # The placeholder patient's only scan is keyed by the patient id (scans.py): one key, both sets.
        for partition_set in PARTITION_SETS:
            instance.add_dynamic_partitions(partition_set, [PLACEHOLDER])
        for kind, assets in KINDS.items():
            result = job.execute_in_process(
                instance=instance, asset_selection=[dg.AssetKey(a) for a in assets],
                partition_key=None if kind == "cohort" else PLACEHOLDER,
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
            run = instance.get_run_by_id(result.run_id)
            records = instance.event_log_storage.get_records_for_run(run.run_id).records
            start = next(i for i, r in enumerate(records)
                         if r.event_log_entry.dagster_event_type == dg.DagsterEventType.RUN_START)
            lifecycle = [(-1, e) for e in _lifecycle_events(run, records[start].event_log_entry.timestamp)]
            ordered = [(r.storage_id, r.event_log_entry) for r in records[:start]] + lifecycle + [
                (r.storage_id, r.event_log_entry) for r in records[start:]]
            events = [_event_template(storage_id, entry) for storage_id, entry in ordered]
            runs[kind] = RunTemplate(kind, run, events, events[0].timestamp, queued_upto=start + 1)
            snapshots.append((instance.get_job_snapshot(run.job_snapshot_id),
                              instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)))
    return Templates(runs, snapshots)


def _event_template(storage_id: int, entry: EventLogEntry) -> EventTemplate:
    event = entry.dagster_event
    asset_key = event.asset_key.to_string() if event is not None and event.asset_key else None
    data_version = None
    if event is not None and event.is_step_materialization:
        data_version = (event.step_materialization_data.materialization.tags or {}).get(DATA_VERSION_TAG)
    return EventTemplate(
        parts=_compile(serialize_value(entry), entry.run_id), event_type=event.event_type_value if event else None,
        step_key=event.step_key if event else entry.step_key, asset_key=asset_key,
        partitioned=bool(event is not None and event.partition), indexed=bool(event and event.event_type in INDEXED),
        check=_check_row_facts(event) if event is not None and event.event_type in ASSET_CHECK_EVENTS else None,
        timestamp=entry.timestamp, storage_id=storage_id, data_version=data_version)


def _check_row_facts(event: DagsterEvent) -> tuple:
    """What Dagster's check-execution rows take from a check event (`patient` stands for the
    placeholder's partition, filled in per patient)."""
    data = event.event_specific_data

    def partition(key):
        return "patient" if key == PLACEHOLDER else key

    if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED:
        keys = data.partitions_subset.get_partition_keys() if data.partitions_subset else [None]
        return ("planned", data.asset_key.to_string(), data.check_name, [partition(k) for k in keys])
    target = data.target_materialization_data
    return ("evaluation", data.asset_key.to_string(), data.check_name, bool(data.passed),
            target.storage_id if target else None, partition(data.partition))
