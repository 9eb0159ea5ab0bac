"""What the automation sensors ask the Dagster instance about runs (thin wiring, no decisions)."""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

IN_FLIGHT_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED_STATUSES = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
PARTITION_TAG = "dagster/partition"
RUN_KEY_TAG = "dagster/run_key"


def run_asset_names(run: dg.DagsterRun) -> set[str]:
    return {key.to_user_string() for key in (run.asset_selection or ())}


def in_flight_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Runs queued, starting or running now (a handful: the queue, not the history)."""
    return list(instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES)))


def touching(runs: Iterable[dg.DagsterRun], assets: Iterable[str]) -> list[dg.DagsterRun]:
    """The runs that materialize any of `assets`."""
    wanted = set(assets)
    return [run for run in runs if run_asset_names(run) & wanted]


def partitions_of(runs: Iterable[dg.DagsterRun]) -> set[str]:
    return {run.tags[PARTITION_TAG] for run in runs if PARTITION_TAG in run.tags}


def run_key_exists(instance: dg.DagsterInstance, run_key: str) -> bool:
    return bool(instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1))


def latest_finished(instance: dg.DagsterInstance, *, excluding: Iterable[str] = (),
                    window: int = 50, max_pages: int = 40) -> tuple[str, float] | None:
    """(run id, end time) of the most recently ended run that materializes anything outside
    `excluding`: among the newest `window` finished runs that hold one, paging back past runs of
    excluded assets only (each risk_scores brings one explanation run per patient); None when
    there is none in the newest `window * max_pages`."""
    excluded = set(excluding)
    cursor = None
    for _ in range(max_pages):
        records = instance.get_run_records(filters=dg.RunsFilter(statuses=FINISHED_STATUSES), limit=window,
                                           cursor=cursor)
        ended = [(record.end_time or record.update_timestamp.timestamp(), record.dagster_run.run_id)
                 for record in records if run_asset_names(record.dagster_run) - excluded]
        if ended:
            end, run_id = max(ended)
            return run_id, end
        if len(records) < window:
            return None
        cursor = records[-1].dagster_run.run_id
    return None
