"""One step, many patients: the batched runs of the GPU assets, with per-patient truth.

A backfill of `ct_mask` or `uni_features` puts up to `GCMLM_GPU_BATCH_PATIENTS` patients in one
run (a `BackfillPolicy`), so the step loads nnU-Net or UNI once and loops over
`context.partition_keys`. A per-patient asset function is written once, as a generator of what one
patient's single-partition step yields (a `MaterializeResult` and check results, or nothing when
the patient is skipped); `per_patient_events` runs it for one patient or for a range.

What Dagster 1.13 records for a range step (and for any step's check results), and how we use it:
- A `MaterializeResult` returned for a range is recorded for *every* partition of the range, with
  the same metadata. So in a range each patient's materialization is logged on its own instead
  (`AssetMaterialization(partition=...)`), with that patient's metadata and data version.
- A check result carries a partition only when its check spec has a partitions_def (a preview
  feature our specs do not use); otherwise Dagster stores it with partition None, one history for
  all patients, from a single-partition step too. So every patient's check results are stored as
  `AssetCheckEvaluation(partition=..., target_materialization_data=...)`: the UI shows them per
  patient, and `get_asset_check_partition_info` tells for each patient whether its latest check
  passed on which materialization (what fused_table's soundness filter reads). A range step logs
  them after yielding the patient's materialization (so that it is stored when they look it up);
  a single-partition step yields them, each after the check's output as Dagster does for an
  `AssetCheckResult`, so a failed blocking check still fails the step and stops downstream steps.
  `store_checks_per_patient` does the same for the per-patient assets without a range path.
  Dagster still records each run's plan for a check with partition None; that row stays planned
  (shown as skipped, or failed if the run failed) beside the patient's own evaluation. A patient
  whose step failed gets no evaluation of its own, so that plan would be the check's newest row,
  its "latest execution" naming no patient ("Partition —"). So a failed patient's checks are
  recorded under the patient as not evaluated, saying why (`_not_evaluated`): failed, on the
  patient's newest materialization if any, so fused_table leaves that result out until the
  patient's step succeeds again, as after any failed run. A skipped patient (nothing to do, e.g.
  ct_mask waiting for a model) gets none: skipped is not failed, and its newest evaluation stands.
- Dagster has no public per-partition failure event. It marks a partition failed when the latest
  run that planned it failed without materializing it. So a patient that fails is logged with its
  reason, the others carry on, and the step then fails naming every failed patient: the run is
  red, only the failed patients show as failed (the others are materialized), and "re-execute
  failed" or the next backfill runs just them. A failure that may be transient (not an input
  error) lets the step's retry policy re-run it; the patients already done are then reused from
  their stored outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import dagster as dg

from gcmlm_assets import settings
from gcmlm_assets.catalogue import Asset
# Dagster's own names: which materialization an evaluation checked, and a materialization's tags
from gcmlm_assets.dagster_internals import BACKFILL_ID_TAG, CODE_VERSION_TAG, DATA_VERSION_IS_USER_PROVIDED_TAG
from gcmlm_assets.dagster_internals import AssetCheckEvaluationTargetMaterializationData as CheckedMaterialization
from gcmlm_assets.dagster_internals import DATA_VERSION_TAG
from gcmlm_assets.patient_batches import PATIENTS_TAG, parse_patients_tag

DEFAULT_BATCH_PATIENTS = 32


def batch_patients() -> int:
    """Patients per backfill run of a GPU asset (`GCMLM_GPU_BATCH_PATIENTS`, default 32)."""
    raw = settings.gpu_batch_patients(DEFAULT_BATCH_PATIENTS)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"GCMLM_GPU_BATCH_PATIENTS must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"GCMLM_GPU_BATCH_PATIENTS must be at least 1, got {value}")
    return value


def gpu_backfill_policy() -> dg.BackfillPolicy:
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=batch_patients())


PatientStep = Callable[[str], Iterable[dg.MaterializeResult | dg.AssetCheckResult]]


class StepFailure(dg.Failure):
    """A failure of the whole step (its model cannot load, its device is wrong), not of one patient."""


class LoadOnce:
    """A model the step loads when its first patient needs it and then shares with the others.

    `get(key)` loads again only when the key changes (a model retrained while the run went on).
    A load that fails with one of `errors` fails the whole step once, with its message.
    """

    def __init__(self, load: Callable, errors: tuple[type[Exception], ...] = ()):
        self._load, self._errors = load, errors
        self._key, self._value = None, None
        self._failed: tuple[tuple, StepFailure] | None = None
        self.loads = 0

    def get(self, *key):
        # A load that failed for this key fails the same way again, without loading (or hashing a
        # checkpoint) once more for every patient of the run.
        if self._failed is not None and self._failed[0] == key:
            raise self._failed[1]
        if self.loads == 0 or key != self._key:
            self._value = None  # let the old model go before the new one loads
            try:
                self._value = self._load(*key)
            except self._errors as error:
                failure = StepFailure(description=str(error), allow_retries=False)
                self._failed = (key, failure)
                raise failure from error
            self._key, self._failed = key, None
            self.loads += 1
        return self._value


class _PatientFailed(Exception):
    def __init__(self, patient_id: str, reason: str, retryable: bool, evaluated: frozenset[str] = frozenset()):
        prefix = f"patient {patient_id}: "
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason  # said once, not twice
        super().__init__(f"{prefix}{reason}")
        self.patient_id, self.reason, self.retryable = patient_id, reason, retryable
        self.evaluated = evaluated  # the checks whose results the patient's step yielded before failing


def per_patient_events(context: dg.AssetExecutionContext, asset: Asset, step: PatientStep,
                       check_specs: list[dg.AssetCheckSpec]) -> Iterator:
    """What the step yields: `step`'s own events for one patient, or a range done patient by patient."""
    asset_key, code_version = asset.key, asset.code_version
    if context.has_partition_key:
        yield from _checks_under_partition(context, context.partition_key, lambda: step(context.partition_key))
        return
    blocking = {spec.name for spec in check_specs if spec.blocking}
    failures: list[_PatientFailed] = []
    done = skipped = 0
    patients = range_patients(context)
    for patient_id in patients:
        try:
            outcome = _run_one(context, asset_key, patient_id, step, blocking)
        except _PatientFailed as failure:
            failures.append(failure)
            context.log.error(str(failure))
            for evaluation in _not_evaluated(context, dg.AssetKey(asset_key), patient_id, failure.evaluated,
                                             f"failed for this patient: {failure.reason}"):
                context.log_event(evaluation)
            continue
        materialized = False
        for event in outcome:
            if isinstance(event, dg.MaterializeResult):
                # yielded, not logged: it is stored before the checks below look it up
                yield _materialization(context, asset_key, patient_id, event, code_version)
                checked = latest_materialization(context.instance, dg.AssetKey(asset_key), patient_id)
                for result in event.check_results or ():
                    context.log_event(_check_evaluation(asset_key, patient_id, result, blocking, checked))
                materialized = True
            else:
                checked = latest_materialization(context.instance, dg.AssetKey(asset_key), patient_id)
                context.log_event(_check_evaluation(asset_key, patient_id, event, blocking, checked))
        if materialized:
            done += 1
        else:
            skipped += 1
            context.log.info(f"patient {patient_id}: {asset_key} skipped (see the message above)")
    context.log.info(f"{asset_key}: {done} patient(s) materialized, {skipped} skipped, {len(failures)} failed "
                     f"of {len(patients)} in this run")
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(patients)} patients failed: "
                        + "; ".join(str(f) for f in failures),
            metadata={"failed_patients": dg.MetadataValue.json({f.patient_id: f.reason for f in failures}),
                      "materialized_patients": done},
            allow_retries=any(f.retryable for f in failures))


def range_patients(context: dg.AssetExecutionContext) -> list[str]:
    """The patients a range step works on: the range's, or those of them the run names
    (`PATIENTS_TAG`, set by a sensor whose batch skips patients inside its range)."""
    named = parse_patients_tag(context.run.tags.get(PATIENTS_TAG))
    keys = list(context.partition_keys)
    return keys if named is None else [patient_id for patient_id in keys if patient_id in named]


def _run_one(context, asset_key: str, patient_id: str, step: PatientStep, blocking: set[str]) -> list:
    """The patient's events, or `_PatientFailed`; check results yielded before a failure are kept."""
    events: list = []
    try:
        for event in step(patient_id):
            events.append(event)
    except StepFailure:
        raise
    except dg.Failure as error:
        _log_partial_checks(context, asset_key, patient_id, events, blocking)
        raise _PatientFailed(patient_id, error.description or str(error), retryable=error.allow_retries,
                             evaluated=_checks_in(events)) from error
    except Exception as error:  # noqa: BLE001 - any other error fails this patient only (and may be retried)
        _log_partial_checks(context, asset_key, patient_id, events, blocking)
        raise _PatientFailed(patient_id, f"{type(error).__name__}: {error}", retryable=True,
                             evaluated=_checks_in(events)) from error
    return events


def _checks_in(events: list) -> frozenset[str]:
    return frozenset(e.check_name for e in events if isinstance(e, dg.AssetCheckResult))


def _not_evaluated(context: dg.AssetExecutionContext, asset_key: dg.AssetKey, patient_id: str, evaluated,
                   why: str) -> list[dg.AssetCheckEvaluation]:
    """The run's checks of `asset_key` that have no result for the failed patient, recorded under
    the patient as not evaluated (see the module's docstring)."""
    keys = [key for key in context.selected_asset_check_keys
            if key.asset_key == asset_key and key.name not in evaluated]
    if not keys:
        return []
    checked = latest_materialization(context.instance, asset_key, patient_id)
    return [dg.AssetCheckEvaluation(
        asset_key=asset_key, check_name=key.name, passed=False, severity=dg.AssetCheckSeverity.ERROR,
        description=f"patient {patient_id}: not evaluated: {asset_key.to_user_string()} {why}",
        metadata={"evaluated": False}, blocking=context.assets_def.get_spec_for_check_key(key).blocking,
        partition=patient_id, target_materialization_data=checked) for key in keys]


def _log_partial_checks(context, asset_key: str, patient_id: str, events: list, blocking: set[str]) -> None:
    results = [event for event in events if isinstance(event, dg.AssetCheckResult)]
    checked = latest_materialization(context.instance, dg.AssetKey(asset_key), patient_id) if results else None
    for result in results:
        context.log_event(_check_evaluation(asset_key, patient_id, result, blocking, checked))


def _materialization(context, asset_key: str, patient_id: str, result: dg.MaterializeResult,
                     code_version: str | None) -> dg.AssetMaterialization:
    tags = dict(result.tags or {})
    if result.data_version is not None:
        tags[DATA_VERSION_TAG] = result.data_version.value
        tags[DATA_VERSION_IS_USER_PROVIDED_TAG] = "true"
    if code_version:
        tags[CODE_VERSION_TAG] = code_version
    backfill = context.run.tags.get(BACKFILL_ID_TAG)
    if backfill:
        tags[BACKFILL_ID_TAG] = backfill
    return dg.AssetMaterialization(asset_key=result.asset_key or asset_key, partition=patient_id,
                                   metadata=dict(result.metadata or {}), tags=tags)


def _check_evaluation(asset_key: str, patient_id: str, result: dg.AssetCheckResult, blocking: set[str],
                      checked: CheckedMaterialization | None) -> dg.AssetCheckEvaluation:
    key = result.asset_key or dg.AssetKey(asset_key)
    return dg.AssetCheckEvaluation(
        asset_key=key, check_name=result.check_name, passed=result.passed, metadata=result.metadata,
        severity=result.severity, description=result.description, blocking=result.check_name in blocking,
        partition=patient_id, target_materialization_data=checked)


def latest_materialization(instance: dg.DagsterInstance, key: dg.AssetKey,
                           patient_id: str) -> CheckedMaterialization | None:
    """The patient's latest materialization of `key`: what a check result yielded now has checked
    (as Dagster looks it up for a single-partition step's `AssetCheckResult`)."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[patient_id]),
                                              limit=1).records
    if not records:
        return None
    return CheckedMaterialization(run_id=records[0].run_id, storage_id=records[0].storage_id,
                                  timestamp=records[0].timestamp)


def store_checks_per_patient(asset_fn: Callable) -> Callable:
    """For a per-patient asset's function (under `@dg.asset`): its check results are stored under
    the step's patient, as `per_patient_events` stores them (see the module's docstring)."""

    @functools.wraps(asset_fn)
    def one_patient_step(context: dg.AssetExecutionContext, *args, **kwargs):
        def events():
            made = asset_fn(context, *args, **kwargs)
            return [made] if isinstance(made, (dg.MaterializeResult, dg.AssetCheckResult)) else made or ()

        if not context.has_partition_key:  # not one patient: left to Dagster
            yield from events()
            return
        yield from _checks_under_partition(context, context.partition_key, events)

    return one_patient_step


def _checks_under_partition(context: dg.AssetExecutionContext, patient_id: str,
                            make_events: Callable[[], Iterable]) -> Iterator:
    """A single-partition step's events (made by `make_events`, which may fail) with each check
    result turned into what Dagster makes of it (the check's output, then its evaluation), the
    evaluation carrying the patient; its checks left without a result are recorded as not evaluated."""
    checked: dict[dg.AssetKey, CheckedMaterialization | None] = {}  # looked up once per materialization
    declared: dict[dg.AssetKey, set[str]] = {}
    for spec in context.assets_def.node_check_specs_by_output_name.values():  # selected or not
        declared.setdefault(spec.asset_key, set()).add(spec.name)
    evaluated: set[dg.AssetCheckKey] = set()
    try:
        for event in make_events():
            if isinstance(event, dg.MaterializeResult):
                checked.clear()
                if not event.check_results:
                    yield event
                    continue
                yield dg.MaterializeResult(asset_key=event.asset_key, metadata=event.metadata,
                                           data_version=event.data_version, tags=event.tags, value=event.value)
                results = event.check_results
            elif isinstance(event, dg.AssetCheckResult):
                results = [event]
            else:
                yield event
                continue
            for result in results:
                key = result.resolve_target_check_key(declared)  # as Dagster names an AssetCheckResult's check
                evaluated.add(key)
                if key.asset_key not in checked:
                    # Dagster has stored the materialization above by the time the step resumes here
                    checked[key.asset_key] = latest_materialization(context.instance, key.asset_key, patient_id)
                yield from _stored_check(context, key, patient_id, result, checked[key.asset_key])
    except Exception as error:  # the step fails: its checks are recorded under the patient first
        reason = error.description if isinstance(error, dg.Failure) and error.description else (
            f"{type(error).__name__}: {error}")
        reason = reason.removeprefix(f"patient {patient_id}: ")  # the record names the patient already
        for asset_key in context.selected_asset_keys:
            names = {key.name for key in evaluated if key.asset_key == asset_key}
            for evaluation in _not_evaluated(context, asset_key, patient_id, names,
                                             f"failed for this patient: {reason}"):
                context.log_event(evaluation)
        raise


def _stored_check(context: dg.AssetExecutionContext, key: dg.AssetCheckKey, patient_id: str,
                  result: dg.AssetCheckResult, checked: CheckedMaterialization | None) -> Iterator:
    if key in context.selected_asset_check_keys:  # the output downstream steps wait on
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(key))
    yield dg.AssetCheckEvaluation(
        asset_key=key.asset_key, check_name=key.name, passed=result.passed, metadata=result.metadata,
        severity=result.severity, description=result.description,
        blocking=context.assets_def.get_spec_for_check_key(key).blocking,
        partition=patient_id, target_materialization_data=checked)
