"""risk_explanations_sensor: after a new risk_scores, explains the patients whose explanation changed.

risk_scores writes each scored patient's explanation key (explain/explanation_keys.py) beside the score,
and risk_explanations records the key it explained as its materialization's data version. On a
new risk_scores the sensor reads the scores' keys and every patient's recorded key (one query)
and asks only for the patients whose keys differ, one run per bucket of `GCMLM_GPU_BATCH_PATIENTS`
partitions (patient_batches.py; the run carries the bucket's tag): over the range from the
bucket's first changed patient to its last (the step skips the patients in between that are
unchanged or unscored, without an event), or an ordinary one-patient run for a bucket of one.
One tick asks for at most `runs_per_tick` runs; its cursor (the scores' event
and the last patient asked for) lets the next tick carry on.

Assets made from the explanation (`carried_on`, e.g. pathology's QuPath GeoJSON, named by
definitions.py so that the cohort imports no other domain) are selected in a one-patient run,
which carries them on itself; a range run cannot chain steps (patient_steps.py), so a steps
sensor carries them on after it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import dagster as dg

from gcmlm_assets import runs
from gcmlm_assets.batching import DATA_VERSION_TAG, batch_patients
from gcmlm_assets.cohort.explain.explanation_keys import patients_to_explain
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.patient_batches import PatientBatch, plan_batches
from gcmlm_assets.resources import ArtifactStorage

# What the daemon turns into runs within seconds: 10,000 changed patients, 32 per run, take
# seven ticks instead of one tick of 313 runs.
RUNS_PER_TICK = 50
KEY_COLUMN = "explanation_key"


def _read_cursor(cursor: str | None) -> tuple[int | None, str | None, bool]:
    """(scores event, last patient asked for, every patient asked for) from the cursor."""
    if not cursor:
        return None, None, False
    if cursor.isdigit():  # the cursor before keys: that event's explanations were all asked for
        return int(cursor), None, True
    try:
        state = json.loads(cursor)
        return int(state["scores_event"]), state.get("after"), bool(state["complete"])
    except (ValueError, KeyError, TypeError):
        return None, None, False


def _cursor(scores_event: int, after: str | None, complete: bool) -> str:
    return json.dumps({"scores_event": scores_event, "after": after, "complete": complete}, sort_keys=True)


def recorded_explanation_keys(instance: dg.DagsterInstance, explanations_asset: str) -> dict[str, str]:
    """{patient: the key of its latest explanation}, for every patient, in one query."""
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        dg.AssetKey(explanations_asset), dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG])
    return {patient_id: values[DATA_VERSION_TAG] for patient_id, values in tags.items() if DATA_VERSION_TAG in values}


def _run_request(explanations_asset: str, batch: PatientBatch, size: int, scores_event: int,
                 carried_on: Sequence[str] = ()) -> dg.RunRequest:
    """One run for a bucket's changed patients: over the range from the first to the last (the step
    leaves the unchanged ones between), or an ordinary one-patient run for a batch of one, which
    also materializes the `carried_on` assets."""
    selection = [explanations_asset, *(carried_on if batch.single else ())]
    return runs.batch_run_request(
        batch, size, run_key=f"explain:{scores_event}:{batch.first}:{batch.last}",
        asset_selection=[dg.AssetKey(key) for key in selection],
        tags={"gcmlm/reason": f"{len(batch.patients)} patient(s) whose explanation key changed with risk_scores "
                              f"event {scores_event}", **runs.work_tags(runs.EXPLANATIONS)})


def build_risk_explanations_sensor(interval_s: int, explanations_asset: str, scores_asset: str, scores_file: str,
                                   runs_per_tick: int = RUNS_PER_TICK,
                                   carried_on: Sequence[str] = ()) -> dg.SensorDefinition:
    """`carried_on`: per-patient assets downstream of the explanation that a one-patient run
    materializes after it."""
    carried_on = list(carried_on)

    @dg.sensor(
        name="risk_explanations_sensor",
        minimum_interval_seconds=interval_s,
        asset_selection=[explanations_asset, *carried_on],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"After each new {scores_asset} materialization, requests {explanations_asset} for the scored "
                    "patients whose explanation key (model file, the patient's fused_table row and patch features) "
                    "differs from the one last explained, GCMLM_GPU_BATCH_PATIENTS patients per run (a range of "
                    f"partitions), at most {runs_per_tick} runs per tick.",
    )
    def risk_explanations_sensor(context: dg.SensorEvaluationContext, storage: ArtifactStorage):
        instance = context.instance
        records = instance.fetch_materializations(dg.AssetKey(scores_asset), limit=1).records
        if not records:
            return dg.SkipReason(f"{scores_asset} has not been materialized")
        event = records[0].storage_id  # orders the events
        done_event, after, complete = _read_cursor(context.cursor)
        if done_event == event and complete:
            return dg.SkipReason(f"every explanation that changed with {scores_asset}'s latest scores (event {event}) "
                                 "was requested")
        if done_event != event:
            after = None
        import pyarrow.parquet as pq

        path = storage.store().path(scores_asset, None, scores_file)
        try:
            if KEY_COLUMN not in pq.read_schema(path).names:
                return dg.SkipReason(f"{path} has no {KEY_COLUMN} column (written before explanations were keyed): "
                                     f"materialize {scores_asset} to write it")
            table = pq.read_table(path, columns=["patient_id", KEY_COLUMN])
        except (OSError, ValueError) as error:
            return dg.SkipReason(f"{path} cannot be read: {error}")
        scored = dict(zip(table.column("patient_id").to_pylist(), table.column(KEY_COLUMN).to_pylist()))
        partitions = list(instance.get_dynamic_partitions(patients_partitions.name))
        changed = patients_to_explain(partitions, scored, recorded_explanation_keys(instance, explanations_asset))
        if after is not None:
            # the patients up to `after` were asked for by an earlier tick for the same scores
            position = {patient_id: i for i, patient_id in enumerate(partitions)}
            start = position.get(after, -1)
            changed = [patient_id for patient_id in changed if position[patient_id] > start]
        if not changed:
            why = (f"no explanation to update: every scored patient's explanation matches {scores_asset}'s "
                   f"latest scores (event {event})" if after is None else
                   f"every explanation that changed with {scores_asset}'s latest scores (event {event}) was requested")
            return dg.SensorResult(skip_reason=why, cursor=_cursor(event, after, True))
        size = batch_patients()
        planned = plan_batches(partitions, changed, size, allow_gaps=True)
        groups, complete = planned[:runs_per_tick], len(planned) <= runs_per_tick
        asked = sum(len(group.patients) for group in groups)
        context.log.info(f"{len(changed)} scored patient(s) to explain ({scores_asset} event {event}): {asked} in "
                         f"{len(groups)} run(s) now" + ("" if complete else ", the rest on the next ticks"))
        return dg.SensorResult(run_requests=[_run_request(explanations_asset, group, size, event, carried_on)
                                               for group in groups],
                               cursor=_cursor(event, groups[-1].last, complete))

    return risk_explanations_sensor
