"""fused_table uses a per-patient result only when its latest materialization succeeded and passed
its blocking checks: the plain decisions, the fusion that applies them, and real Dagster runs."""

import json
from collections import Counter

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as CheckStatus

from gcmlm_assets.catalogue import RADIOMICS_TABLE
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort.tables import qc
from gcmlm_assets.cohort.tables.fusion import build_fused_table, report_json
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.cohort.tables.soundness import (
    CANCELED, FAILED, IN_PROGRESS, CheckOutcome, PartitionFacts, exclusion_reason, unsound_partitions)
from gcmlm_assets.cohort.soundness_facts import check_outcomes, unsound_results
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.cohort.synthetic import (
    make_cohort, write_cohort_files, write_radiomics_row, write_slide_vector,
)
from gcmlm_assets_tests.support.cohort.upstream import (
    StandInConfig, add_patients, materialize_patients, report_sound_results, stand_ins)

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
    RADIOMICS_TABLE.path(ArtifactStore(artifacts), "P001").write_bytes(b"not parquet")  # never read
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
    add_patients(instance, ids)
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
    report = json.loads((artifacts / "fused_table" / "fusion_report.json").read_text(encoding="utf-8"))
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
    add_patients(instance, ids)
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


# ---------------------------------------------------------------- how the check results are stored and read


RADIOMICS = dg.AssetKey("radiomics_row")
BLOCKING = {"radiomics_row": list(CHECKS), "slide_vector": ["slide_vector_valid"]}
EVALUATED = {CheckStatus.SUCCEEDED, CheckStatus.FAILED}


class CountedReads:
    """The instance's own event storage, counting the queries made of it and the rows they return."""

    def __init__(self, storage):
        self._storage, self.queries, self.rows = storage, Counter(), Counter()

    def __getattr__(self, name):
        method = getattr(self._storage, name)

        def counted(*args, **kwargs):
            answer = method(*args, **kwargs)
            self.queries[name] += 1
            self.rows[name] += len(getattr(answer, "records", answer))
            return answer

        return counted


def materialize_range(instance, artifacts, patients, config: dict[str, StandInConfig] | None = None):
    """One run per stand-in over a range of patients, as a batched backfill run (radiomics_row's
    partitions are the patients' single scans, keyed by patient id)."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    results = []
    for asset in stand_ins(artifacts):
        name = asset.key.to_user_string()
        run_config = {"ops": {name: {"config": (config or {}).get(name, StandInConfig()).model_dump()}}}
        results.append(dg.materialize([asset], instance=instance, raise_on_error=False, run_config=run_config,
                                      tags={ASSET_PARTITION_RANGE_START_TAG: patients[0],
                                            ASSET_PARTITION_RANGE_END_TAG: patients[-1]}))
    return results


def latest_materializations(instance, key=RADIOMICS) -> dict[str, int]:
    return instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)


def report_runless(instance, key, patient, checks, *, passed=True, partition=True):
    """A runless materialization of the patient and results of `checks` on it: stored under the
    patient (as our runs store them), or with partition None (as they were stored before)."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData)

    instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=patient))
    target = AssetCheckEvaluationTargetMaterializationData(
        storage_id=latest_materializations(instance, key)[patient], run_id="", timestamp=0.0)
    for name in checks:
        instance.report_runless_asset_event(dg.AssetCheckEvaluation(
            asset_key=key, check_name=name, passed=passed, description=f"older result of {name}",
            partition=patient if partition else None, target_materialization_data=target))


def test_single_partition_and_range_runs_store_each_check_under_its_patient(data_root, instance):
    ids, _ = write_cohort_files(data_root, 4, seed=7)
    artifacts = data_root / "artifacts"
    add_patients(instance, ids)
    single = materialize_patients(instance, artifacts, ["P000"])
    ranged = materialize_range(instance, artifacts, ["P001", "P002", "P003"])
    assert all(r.success for r in [*single, *ranged])

    for asset, names in BLOCKING.items():
        latest = latest_materializations(instance, dg.AssetKey(asset))
        assert set(latest) == set(ids)
        for name in names:
            key = dg.AssetCheckKey(dg.AssetKey(asset), name)
            infos = {i.partition_key: i for i in instance.event_log_storage.get_asset_check_partition_info([key])}
            # each patient's evaluation names the materialization it checked; under partition None
            # only the runs' plans are left (no evaluation)
            assert {p: (i.latest_execution_status, i.latest_target_materialization_storage_id)
                    for p, i in infos.items() if p is not None} == {
                p: (CheckStatus.SUCCEEDED, latest[p]) for p in ids}
            assert not instance.event_log_storage.get_asset_check_execution_history(
                key, limit=10, status=EVALUATED, partition_filter=PartitionKeyFilter(key=None))
    # what the UI shows per run: the check and its patient
    evaluations = [e for result in (*single, *ranged) for e in result.get_asset_check_evaluations()]
    assert {(e.partition, e.check_name) for e in evaluations} == {
        (p, name) for p in ids for names in BLOCKING.values() for name in names}


def _outcomes_after_history(tmp_path, rounds: int):
    """Three patients' latest results (one passes, one fails a blocking check with ERROR, one with
    WARN) after `rounds` older runs of the same patients, every other one failing for all."""
    root = tmp_path / f"history_{rounds}"
    for folder in ("artifacts", "landing", "dagster_home"):
        (root / folder).mkdir(parents=True)
    ids, _ = write_cohort_files(root, 3, seed=8)
    artifacts = root / "artifacts"
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        add_patients(instance, ids)
        for round_ in range(rounds):
            failing = StandInConfig(failing_check="radiomics_row_finite" if round_ % 2 else "")
            assert all(r.success for r in materialize_range(instance, artifacts, ids, {"radiomics_row": failing}))
        latest_results = StandInConfig(failing_check="radiomics_row_finite",
                                       failing_severity_by_patient={"P001": "ERROR", "P002": "WARN"})
        assert all(r.success for r in materialize_range(instance, artifacts, ids, {"radiomics_row": latest_results}))
        latest = latest_materializations(instance)
        reads = CountedReads(instance.event_log_storage)
        outcomes = {name: check_outcomes(reads, dg.AssetCheckKey(RADIOMICS, name), latest) for name in CHECKS}
        unsound = unsound_results(instance, ids, BLOCKING, ArtifactStore(artifacts))
    return outcomes, reads, unsound["radiology"]


def test_reading_the_checks_does_not_depend_on_the_history(tmp_path):
    outcomes, reads, unsound = _outcomes_after_history(tmp_path, rounds=0)
    again, longer_reads, unsound_again = _outcomes_after_history(tmp_path, rounds=2)

    # the same answers, from the same queries returning the same number of rows
    assert again == outcomes and unsound_again == unsound
    assert longer_reads.queries == reads.queries and longer_reads.rows == reads.rows
    # one query per check (a row per patient, and the run's plan under partition None), and one
    # for the failed results' own events (severity, description); no page of the history
    assert reads.queries == {"get_asset_check_partition_info": 2, "_get_event_records": 1}
    assert reads.rows == {"get_asset_check_partition_info": 2 * (3 + 1), "_get_event_records": 2}

    finite = outcomes["radiomics_row_finite"]
    assert finite["P000"] == CheckOutcome(True)
    assert finite["P001"] == CheckOutcome(False, "ERROR", "simulated result of radiomics_row_finite")
    assert finite["P002"] == CheckOutcome(False, "WARN", "simulated result of radiomics_row_finite")
    # a failed ERROR blocking check leaves the result out; WARN does not block; passed is used
    assert unsound == {"P001": "blocking check radiomics_row_finite failed on the latest radiomics_row "
                               "materialization: simulated result of radiomics_row_finite"}


def test_results_stored_before_per_partition_checks_are_still_judged(instance):
    """An instance whose evaluations were stored with partition None (before they were stored per
    patient) is judged as before: those are read only for patients without a per-partition one."""
    for patient in ("OLD_PASS", "OLD_FAIL", "OLD_STALE", "NEW"):
        add_patients(instance, [patient])
    report_runless(instance, RADIOMICS, "OLD_PASS", CHECKS, partition=False)
    report_runless(instance, RADIOMICS, "OLD_FAIL", CHECKS, passed=False, partition=False)
    report_runless(instance, RADIOMICS, "OLD_STALE", CHECKS, partition=False)
    instance.report_runless_asset_event(dg.AssetMaterialization(RADIOMICS, partition="OLD_STALE"))  # unchecked
    report_runless(instance, RADIOMICS, "NEW", CHECKS, passed=False, partition=False)
    report_runless(instance, RADIOMICS, "NEW", CHECKS)  # checked again, stored per partition
    latest = latest_materializations(instance)

    reads = CountedReads(instance.event_log_storage)
    outcomes = check_outcomes(reads, dg.AssetCheckKey(RADIOMICS, "radiomics_row_finite"), latest)

    assert outcomes == {"OLD_PASS": CheckOutcome(True, "ERROR", "older result of radiomics_row_finite"),
                        "OLD_FAIL": CheckOutcome(False, "ERROR", "older result of radiomics_row_finite"),
                        "NEW": CheckOutcome(True)}
    assert reads.queries["get_asset_check_execution_history"] == 1  # one page of the old history
