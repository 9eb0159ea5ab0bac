"""risk_assessments through a real Dagster instance: a FHIR R4 RiskAssessment Bundle per scored
patient, equal to risk_scores, reused while the scores are unchanged."""

import dagster as dg
import pyarrow.parquet as pq

from gcmlm_assets.catalogue import ASSESSMENT_INDEX, FUSED_FILE, FUSED_TABLE, RISK_ASSESSMENTS, SCORES_FILE
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort import exchange_assets
from gcmlm_assets.cohort.exchange import fhir_risk
from gcmlm_assets.storage import ArtifactStore, sha256_file
from gcmlm_assets_tests.support.cohort.runs import FAST_MODEL
from gcmlm_assets_tests.support.cohort.synthetic import write_cohort_files
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results


def _materialize(instance, resources, selection=None):
    return dg.materialize([*cohort_assets.ASSETS, *exchange_assets.ASSETS, *cohort_checks.CHECKS],
                          instance=instance, resources={**resources, "risk_model": FAST_MODEL},
                          raise_on_error=False, selection=selection)


def _metadata(result, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()} | {
        "data_version": event.materialization.tags["dagster/data_version"]}


def test_every_scored_patient_gets_a_risk_assessment_equal_to_its_score(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 24, seed=21, without_radiology={"P004"})
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)

    result = _materialize(instance, base_resources)

    assert result.success
    shown = _metadata(result, RISK_ASSESSMENTS.key)
    store = ArtifactStore(data_root / "artifacts")
    scores = {row["patient_id"]: row for row in pq.read_table(SCORES_FILE.path(store)).to_pylist()}
    index = fhir_risk.read_index(ASSESSMENT_INDEX.path(store))
    assert set(index["patients"]) == set(scores) and shown["bundles"] == len(scores)
    assert shown["data_version"] == sha256_file(ASSESSMENT_INDEX.path(store))
    for patient_id, entry in index["patients"].items():
        bundle = fhir_risk.read_bundle(ASSESSMENT_INDEX.path(store).parent / entry["file"])
        (assessment,) = [e.resource for e in bundle.entry if e.resource.get_resource_type() == "RiskAssessment"]
        assert float(assessment.prediction[0].probabilityDecimal) == scores[patient_id]["probability"]
        assert entry["risk_group"] == scores[patient_id]["risk_group"]
        assert ("radiology" in entry["modalities_missing"]) == (patient_id == "P004"), patient_id
        inputs = [b.identifier.value for b in assessment.basis]
        assert (f"radiomics_row/{patient_id}" in inputs) == (patient_id != "P004")  # its only scan's key
    # the patient scored without radiology comes first in the preview, saying so
    first_row = shown["preview"].splitlines()[2]
    assert first_row.startswith("| P004 |") and "radiology" in first_row
    assert shown["patients_with_missing_modalities"] == 1

    again = _materialize(instance, base_resources)
    assert again.success
    reused = _metadata(again, RISK_ASSESSMENTS.key)
    assert reused["reused"] is True and reused["data_version"] == shown["data_version"]

    # a fused table other than the one scored: its report's scans would not be the scored ones
    manifest = store.read_manifest(FUSED_TABLE.key, None)
    store.write_manifest(FUSED_TABLE.key, None, {**manifest, "files": {**manifest["files"], FUSED_FILE.name: "0" * 64}})
    refused = _materialize(instance, base_resources, selection=[RISK_ASSESSMENTS.key])
    assert not refused.success
    (failure,) = [e for e in refused.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "fused_table changed since risk_scores scored it" in failure.step_failure_data.user_failure_data.description


def test_scores_changed_behind_the_manifest_are_refused_naming_the_file(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 24, seed=22)
    add_patients(instance, ids)
    report_sound_results(instance, data_root / "artifacts", ids)
    assert _materialize(instance, base_resources).success
    scores_path = SCORES_FILE.path(ArtifactStore(data_root / "artifacts"))
    scores_path.write_bytes(scores_path.read_bytes() + b"\0")

    result = _materialize(instance, base_resources, selection=[RISK_ASSESSMENTS.key])

    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert str(scores_path) in failure.step_failure_data.user_failure_data.description
