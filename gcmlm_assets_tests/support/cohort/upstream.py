"""Stand-ins for the per-patient assets fused_table reads, materialized through real Dagster runs.

They carry the real assets' names and check_specs and go through the real assets' own event path
(`per_patient_events`: one patient per run, or a range of them in one run), so their checks are
stored per partition as the real ones are. They publish the synthetic feature files already written
under the artifacts root. Their config lets a test make a patient's latest materialization fail a
check (with ERROR or WARN severity) or fail its step.
"""

from pathlib import Path

import dagster as dg

from gcmlm_assets.batching import per_patient_events
from gcmlm_assets.catalogue import RADIOMICS_TABLE, SLIDE_VECTOR_TABLE
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.pathology.checks import SLIDE_VECTOR_CHECK_SPECS
from gcmlm_assets.radiology.checks import RADIOMICS_ROW_CHECK_SPECS
from gcmlm_assets.storage import ArtifactStore, sha256_file

FILES = {file.asset.key: file for file in (RADIOMICS_TABLE, SLIDE_VECTOR_TABLE)}
SPECS = {RADIOMICS_TABLE.asset.key: RADIOMICS_ROW_CHECK_SPECS, SLIDE_VECTOR_TABLE.asset.key: SLIDE_VECTOR_CHECK_SPECS}


class StandInConfig(dg.Config):
    failing_check: str = ""  # this check's result fails
    # only for these patients, with this severity (when empty: for every patient, with ERROR)
    failing_severity_by_patient: dict[str, str] = {}
    raise_error: bool = False  # the step fails before materializing


def _stand_in(name: str, artifacts: Path) -> dg.AssetsDefinition:
    # subsettable, as the batched real assets are, so that a range step may leave its check outputs
    # unyielded (it stores each patient's evaluations)
    @dg.multi_asset(specs=[dg.AssetSpec(name)], partitions_def=patients_partitions, check_specs=SPECS[name],
                    can_subset=True, name=name)
    def stand_in(context: dg.AssetExecutionContext, config: StandInConfig):
        def one_patient(patient: str):
            if config.raise_error:
                raise RuntimeError(f"{name} {patient}: simulated step failure")
            path = FILES[name].path(ArtifactStore(artifacts), patient)
            by_patient = config.failing_severity_by_patient
            failing = config.failing_check if not by_patient or patient in by_patient else ""
            results = [dg.AssetCheckResult(
                check_name=spec.name, passed=spec.name != failing,
                severity=dg.AssetCheckSeverity(by_patient.get(patient, "ERROR")),
                description=f"simulated result of {spec.name}") for spec in SPECS[name]]
            yield dg.MaterializeResult(asset_key=name, metadata={"path": dg.MetadataValue.path(str(path))},
                                       data_version=dg.DataVersion(sha256_file(path)), check_results=results)

        yield from per_patient_events(context, FILES[name].asset, one_patient, SPECS[name])

    return stand_in


def stand_ins(artifacts: Path) -> list[dg.AssetsDefinition]:
    return [_stand_in(name, artifacts) for name in FILES]


def materialize_patients(instance: dg.DagsterInstance, artifacts: Path, patients, *,
                         config: dict[str, StandInConfig] | None = None) -> list[dg.ExecuteInProcessResult]:
    """One run per patient of both stand-ins whose files exist (as the landing sensor's runs)."""
    results = []
    assets = stand_ins(artifacts)
    for patient in patients:
        selection = [a for a in assets if (artifacts / a.key.to_user_string() / patient).is_dir()]
        if not selection:
            continue
        run_config = {"ops": {a.key.to_user_string(): {"config": (config or {}).get(
            a.key.to_user_string(), StandInConfig()).model_dump()} for a in selection}}
        results.append(dg.materialize(selection, instance=instance, partition_key=patient,
                                      run_config=run_config, raise_on_error=False))
    return results


def report_sound_results(instance: dg.DagsterInstance, artifacts: Path, patients) -> None:
    """Record, without runs, a materialization and passing blocking checks for every existing file
    (what the runs above record, in milliseconds: for tests that are not about soundness). The
    check results of one call share a run id of their own: Dagster keeps one result per check,
    run and partition, so a patient can be reported again by a later call."""
    import uuid

    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData)
    from dagster._core.events import DagsterEvent

    run_id = f"report-{uuid.uuid4()}"

    store = ArtifactStore(artifacts)
    for name, file in FILES.items():
        key = dg.AssetKey(name)
        present = [p for p in patients if file.path(store, p).is_file()]
        for patient in present:
            digest = sha256_file(file.path(store, patient))  # the assets' data version
            instance.report_runless_asset_event(dg.AssetMaterialization(
                key, partition=patient, tags={"dagster/data_version": digest}))
        latest = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)
        for patient in present:
            target = AssetCheckEvaluationTargetMaterializationData(storage_id=latest[patient], run_id="",
                                                                   timestamp=0.0)
            for spec in SPECS[name]:
                instance.report_dagster_event(run_id=run_id, dagster_event=DagsterEvent(
                    event_type_value=dg.DagsterEventType.ASSET_CHECK_EVALUATION.value, job_name=name,
                    event_specific_data=dg.AssetCheckEvaluation(
                        asset_key=key, check_name=spec.name, passed=True, partition=patient,
                        target_materialization_data=target)))
