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
from gcmlm_assets.partitions import ct_scans_partitions, partitions_of, patients_partitions
from gcmlm_assets.pathology.checks import SLIDE_VECTOR_CHECK_SPECS
from gcmlm_assets.radiology.checks import RADIOMICS_ROW_CHECK_SPECS
from gcmlm_assets.storage import sha256_file

FILES = {file.asset.key: file for file in (RADIOMICS_TABLE, SLIDE_VECTOR_TABLE)}
SPECS = {RADIOMICS_TABLE.asset.key: RADIOMICS_ROW_CHECK_SPECS, SLIDE_VECTOR_TABLE.asset.key: SLIDE_VECTOR_CHECK_SPECS}


def partition_file(artifacts: Path, name: str, partition: str) -> Path:
    """<artifacts>/<asset>/<partition>/<file>: a patient's, or a CT scan's (`<patient>@<timepoint>`)."""
    return artifacts / name / partition / FILES[name].name


class StandInConfig(dg.Config):
    failing_check: str = ""  # this check's result fails
    # only for these patients, with this severity (when empty: for every patient, with ERROR)
    failing_severity_by_patient: dict[str, str] = {}
    raise_error: bool = False  # the step fails before materializing


def _stand_in(name: str, artifacts: Path) -> dg.AssetsDefinition:
    # subsettable, as the batched real assets are, so that a range step may leave its check outputs
    # unyielded (it stores each patient's evaluations)
    @dg.multi_asset(specs=[dg.AssetSpec(name)], partitions_def=partitions_of(FILES[name].asset),
                    check_specs=SPECS[name],
                    can_subset=True, name=name)
    def stand_in(context: dg.AssetExecutionContext, config: StandInConfig):
        def one_patient(patient: str):
            if config.raise_error:
                raise RuntimeError(f"{name} {patient}: simulated step failure")
            path = partition_file(artifacts, name, patient)
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


def add_patients(instance: dg.DagsterInstance, patients, scans=None) -> None:
    """The patients' partitions, and their CT scans' (`scans`; default: one scan each, keyed by the
    patient id, as a drop with its CT directly in ct/ has), as the landing sensor adds them."""
    patients = list(patients)
    instance.add_dynamic_partitions(patients_partitions.name, patients)
    instance.add_dynamic_partitions(ct_scans_partitions.name, list(patients if scans is None else scans))


def stand_ins(artifacts: Path) -> list[dg.AssetsDefinition]:
    return [_stand_in(name, artifacts) for name in FILES]


def materialize_patients(instance: dg.DagsterInstance, artifacts: Path, patients, *,
                         config: dict[str, StandInConfig] | None = None) -> list[dg.ExecuteInProcessResult]:
    """Per patient, one run of each stand-in whose files exist (as the landing sensor's runs; a
    patient's single scan has the patient's id as its ct_scans key, radiomics_row is partitioned by
    scan, slide_vector by patient). With `config`, only the stand-ins it names run."""
    results = []
    assets = [a for a in stand_ins(artifacts) if config is None or a.key.to_user_string() in config]
    for patient in patients:
        for asset in assets:
            name = asset.key.to_user_string()
            if not (artifacts / name / patient).is_dir():
                continue
            run_config = {"ops": {name: {"config": (config or {}).get(name, StandInConfig()).model_dump()}}}
            results.append(dg.materialize([asset], instance=instance, partition_key=patient,
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

    for name in FILES:
        key = dg.AssetKey(name)
        present = [p for p in patients if partition_file(artifacts, name, p).is_file()]
        for patient in present:
            digest = sha256_file(partition_file(artifacts, name, patient))  # the assets' data version
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
