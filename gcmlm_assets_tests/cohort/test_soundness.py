"""fused_table uses a per-patient result only when its latest materialization succeeded and passed
its blocking checks: the plain decisions, the fusion that applies them, and real Dagster runs."""

import json

import dagster as dg
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort import qc
from gcmlm_assets.cohort.fusion import build_fused_table, report_json
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.cohort.soundness import (
    CANCELED, FAILED, IN_PROGRESS, CheckOutcome, PartitionFacts, exclusion_reason, unsound_partitions)
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets_tests.cohort.synthetic import make_cohort, write_cohort_files, write_radiomics_row, write_slide_vector
from gcmlm_assets_tests.cohort.upstream import StandInConfig, materialize_patients, report_sound_results, stand_ins

CHECKS = ("radiomics_row_complete", "radiomics_row_finite")
PASSED = {name: CheckOutcome(True) for name in CHECKS}


# ---------------------------------------------------------------- decisions (no Dagster)


def test_a_checked_latest_materialization_is_sound():
    assert exclusion_reason("radiomics_row", PartitionFacts(materialized=True, checks=PASSED)) is None
    # a run re-making it has not replaced the file yet: the checked file is still the one on disk
    running = PartitionFacts(materialized=True, later_attempt=(IN_PROGRESS, "feedbeef0000"), checks=PASSED,
                             file_is_latest=True)
    assert exclusion_reason("radiomics_row", running) is None
    # a check failing with WARN severity does not block, as in Dagster
    warned = {**PASSED, "radiomics_row_finite": CheckOutcome(False, "WARN", "2 NaN")}
    assert exclusion_reason("radiomics_row", PartitionFacts(materialized=True, checks=warned)) is None


@pytest.mark.parametrize("facts, expected", [
    (PartitionFacts(), "radiomics_row has no recorded materialization"),
    (PartitionFacts(materialized=True, later_attempt=(FAILED, "0123456789ab"), checks=PASSED),
     "the latest attempt to materialize radiomics_row failed (run 01234567)"),
    (PartitionFacts(materialized=False, later_attempt=(CANCELED, "abcdef012345")),
     "the latest attempt to materialize radiomics_row was canceled (run abcdef01)"),
    (PartitionFacts(materialized=True, later_attempt=(IN_PROGRESS, "feedbeef0000"), checks=PASSED),
     "the latest attempt to materialize radiomics_row is still running (run feedbeef) and the file differs "
     "from the one its latest materialization recorded"),
    (PartitionFacts(later_attempt=(IN_PROGRESS, "feedbeef0000"), file_is_latest=True),
     "the first materialization of radiomics_row is still running (run feedbeef)"),
    (PartitionFacts(materialized=True, checks={**PASSED, "radiomics_row_finite": CheckOutcome(
        False, "ERROR", "non-finite:\n  original_glcm_Idm")}),
     "blocking check radiomics_row_finite failed on the latest radiomics_row materialization: "
     "non-finite: original_glcm_Idm"),
    (PartitionFacts(materialized=True, checks={**PASSED, "radiomics_row_complete": None}),
     "blocking check radiomics_row_complete has no result for the latest radiomics_row materialization"),
])
def test_unsound_results_are_named_with_the_reason(facts, expected):
    assert exclusion_reason("radiomics_row", facts) == expected


def test_partitions_without_facts_were_never_materialized():
    facts = {"P1": PartitionFacts(materialized=True, checks=PASSED),
             "P2": PartitionFacts(materialized=True, later_attempt=(FAILED, "r" * 12), checks=PASSED)}
    reasons = unsound_partitions("radiomics_row", facts, ["P1", "P2", "P3"])
    assert set(reasons) == {"P2", "P3"} and "no recorded materialization" in reasons["P3"]


def test_fusion_leaves_unsound_results_out_unread(tmp_path):
    ids, labels, radiomics, pathology = make_cohort(3, seed=3)
    artifacts = tmp_path / "artifacts"
    for i, patient in enumerate(ids):
        write_radiomics_row(artifacts, patient, radiomics[i])
        write_slide_vector(artifacts, patient, pathology[i])
    (artifacts / "radiomics_row" / "P001" / "radiomics.parquet").write_bytes(b"not parquet")  # never read
    unsound = {"radiology": {"P001": "blocking check radiomics_row_finite failed"},
               "pathology": {"P002": "the latest attempt to materialize slide_vector failed (run 1)"}}

    table, report = build_fused_table(artifacts, None, unsound=unsound)
    _, plain = build_fused_table(artifacts, None, unsound={"radiology": {"P001": "x"}})

    rows = {r["patient_id"]: r for r in table.select(["patient_id", "has_radiology", "has_pathology"]).to_pylist()}
    assert rows == {"P000": {"patient_id": "P000", "has_radiology": True, "has_pathology": True},
                    "P001": {"patient_id": "P001", "has_radiology": False, "has_pathology": True},
                    "P002": {"patient_id": "P002", "has_radiology": True, "has_pathology": False}}
    assert report.file_problems == []
    assert report.excluded_patients() == {"P001": {"radiology": "blocking check radiomics_row_finite failed"},
                                          "P002": {"pathology": unsound["pathology"]["P002"]}}
    assert not any("P001/radiomics" in name or "P002/slide" in name for name in report.input_files)
    # which results were left out, and why, is part of what the table was made from
    assert report.input_fingerprint(None) != plain.input_fingerprint(None)
    verdict = qc.modalities_aligned(json.loads(report_json(report)))
    assert verdict.outcome == qc.WARN and "2 result(s) left out as unsound" in verdict.description


# ---------------------------------------------------------------- through Dagster


def materialize_fused(instance, resources):
    return dg.materialize([*cohort_assets.ASSETS, *cohort_checks.CHECKS], instance=instance,
                          resources={**resources, "risk_model": RiskModelSettings()}, raise_on_error=False,
                          selection=["clinical_table", "fused_table"])


def fused_metadata(result) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "fused_table"]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_fused_table_leaves_out_results_whose_latest_materialization_failed(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 10, seed=5)
    artifacts = data_root / "artifacts"
    instance.add_dynamic_partitions(patients_partitions.name, ids)
    real, by_hand = ["P001", "P002", "P003"], "P009"  # P009's files were copied in, never materialized
    report_sound_results(instance, artifacts, [p for p in ids if p not in (*real, by_hand)])
    assert all(r.success for r in materialize_patients(instance, artifacts, real))
    # Then P001's newest radiomics_row fails a blocking check and P002's newest slide_vector step fails.
    (bad_check,) = materialize_patients(instance, artifacts, ["P001"], config={
        "radiomics_row": StandInConfig(failing_check="radiomics_row_finite")})
    (bad_step,) = materialize_patients(instance, artifacts, ["P002"], config={
        "slide_vector": StandInConfig(raise_error=True)})
    assert not bad_check.success and not bad_step.success

    result = materialize_fused(instance, base_resources)

    assert result.success
    fused = fused_metadata(result)
    excluded = fused["excluded_patients"]
    assert set(excluded) == {"P001", "P002", by_hand}
    assert excluded["P001"] == {"radiology": "blocking check radiomics_row_finite failed on the latest "
                                             "radiomics_row materialization: simulated result of radiomics_row_finite"}
    assert excluded["P002"] == {"pathology": f"the latest attempt to materialize slide_vector failed "
                                             f"(run {bad_step.run_id[:8]})"}
    assert excluded[by_hand] == {"radiology": "radiomics_row has no recorded materialization",
                                 "pathology": "slide_vector has no recorded materialization"}
    assert fused["excluded_results"] == 4 and fused["patients"] == 10
    flags = ["patient_id", "has_radiology", "has_pathology"]
    table = {r["patient_id"]: r for r in pq.read_table(artifacts / "fused_table" / "fused.parquet",
                                                      columns=flags).to_pylist()}
    assert (table["P001"]["has_radiology"], table["P001"]["has_pathology"]) == (False, True)
    assert (table["P002"]["has_radiology"], table["P002"]["has_pathology"]) == (True, False)
    assert (table["P003"]["has_radiology"], table["P003"]["has_pathology"]) == (True, True)
    assert (table[by_hand]["has_radiology"], table[by_hand]["has_pathology"]) == (False, False)
    report = json.loads((artifacts / "fused_table" / "fusion_report.json").read_text())
    assert {(e["patient_id"], e["modality"]) for e in report["excluded_results"]} == {
        ("P001", "radiology"), ("P002", "pathology"), (by_hand, "radiology"), (by_hand, "pathology")}
    aligned = {e.check_name: e for e in result.get_asset_check_evaluations()}["modalities_aligned"]
    assert aligned.severity == dg.AssetCheckSeverity.WARN and "left out as unsound" in aligned.description

    # A new sound materialization brings the patient back.
    assert all(r.success for r in materialize_patients(instance, artifacts, ["P001", "P002"]))
    again = fused_metadata(materialize_fused(instance, base_resources))
    assert set(again["excluded_patients"]) == {by_hand}


def test_a_run_in_progress_leaves_the_checked_file_in_use_until_it_replaces_it(data_root, instance, base_resources):
    ids, _ = write_cohort_files(data_root, 6, seed=6)
    artifacts = data_root / "artifacts"
    instance.add_dynamic_partitions(patients_partitions.name, ids)
    report_sound_results(instance, artifacts, ids[:-2])
    assert all(r.success for r in materialize_patients(instance, artifacts, ["P004"]))
    # A run for P004 and the first run of P005 are queued (planned, not finished).
    job = dg.Definitions(assets=stand_ins(artifacts)).resolve_implicit_global_asset_job_def()
    pending = {p: instance.create_run_for_job(job, tags={"dagster/partition": p},
                                              asset_selection=frozenset({dg.AssetKey("radiomics_row")}))
               for p in ("P004", "P005")}
    assert all(run.status == dg.DagsterRunStatus.NOT_STARTED for run in pending.values())

    first = fused_metadata(materialize_fused(instance, base_resources))
    assert first["excluded_patients"] == {"P005": {
        "radiology": f"the first materialization of radiomics_row is still running (run {pending['P005'].run_id[:8]})",
        "pathology": "slide_vector has no recorded materialization"}}

    # The pending run has written P004's new row but not yet recorded (or checked) it.
    _, _, radiomics, _ = make_cohort(6, seed=99)
    write_radiomics_row(artifacts, "P004", radiomics[4])
    second = fused_metadata(materialize_fused(instance, base_resources))
    assert second["excluded_patients"]["P004"] == {"radiology": (
        f"the latest attempt to materialize radiomics_row is still running (run {pending['P004'].run_id[:8]}) "
        "and the file differs from the one its latest materialization recorded")}
