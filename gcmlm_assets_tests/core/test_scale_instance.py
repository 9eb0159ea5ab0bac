"""The scale benchmark's bulk-written instance reads like one the runs wrote: Dagster's own queries
(and the soundness filter built on them) see every patient's runs, materializations and checks."""

import dagster as dg

from benchmarks.scale_instance import (
    RANGE_TAGS, InstanceWriter, RunSpec, landing_run_tags, local_instance, patient_ids, populate, record_templates,
    request_run_specs, write_in_batches)
from gcmlm_assets.cohort.soundness_facts import unsound_results
from gcmlm_assets_tests.support.definitions import patient_result_checks
from gcmlm_assets.storage import ArtifactStore

PER_PATIENT = ("ct_image", "ct_mask", "radiomics_row", "patch_coords", "uni_features", "slide_vector",
               "risk_explanations")


def test_a_populated_instance_answers_dagsters_queries(tmp_path):
    patients = patient_ids(20)
    templates = record_templates(tmp_path / "artifacts", picture_bytes=2_000)
    with local_instance(tmp_path / "home") as instance:
        population = populate(instance, patients, templates=templates, artifacts=tmp_path / "artifacts")

        assert set(instance.get_dynamic_partitions("patients")) == set(patients)
        success = dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS])
        assert instance.get_runs_count(success) == 3 * len(patients) + 1
        radiology = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "GC000007",
                                                          "gcmlm/modality": "radiology"}))
        assert [run.run_id for run in radiology] == [population.runs["radiology"][7]]
        record = instance.get_run_record_by_id(radiology[0].run_id)
        assert record.start_time < record.end_time
        for asset in PER_PATIENT:
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(patients), asset
        assert len(instance.fetch_materializations(dg.AssetKey("risk_scores"), limit=5).records) == 1

        # Each patient's latest radiomics_row is the one its own run wrote, and its checks target it.
        latest = instance.get_latest_storage_id_by_partition(dg.AssetKey("radiomics_row"),
                                                             dg.DagsterEventType.ASSET_MATERIALIZATION)
        assert set(latest) == set(patients)
        records = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("radiomics_row"), storage_ids=[latest["GC000003"]]), limit=1).records
        assert records[0].run_id == population.runs["radiology"][3]
        assert records[0].asset_materialization.partition == "GC000003"
        latest_mask = instance.get_latest_materialization_event(dg.AssetKey("ct_mask")).asset_materialization
        assert latest_mask.partition == patients[-1] and "picture" in latest_mask.metadata
        check = dg.AssetCheckKey(dg.AssetKey("radiomics_row"), "radiomics_row_complete")
        history = instance.event_log_storage.get_asset_check_execution_history(check, limit=100)
        # each patient's result is stored under the patient (batching.py); each run also leaves
        # Dagster's plan for the check, stored under no partition, never evaluated
        evaluated = [h for h in history if h.status.value == "SUCCEEDED"]
        assert {h.evaluation.target_materialization_data.storage_id for h in evaluated} == set(latest.values())
        assert {h.partition for h in evaluated} == set(patients)
        assert all(h.partition is None for h in history if h.status.value != "SUCCEEDED")

        store = ArtifactStore(tmp_path / "artifacts")
        unsound = unsound_results(instance, [*patients, "ABSENT"], patient_result_checks().blocking, store)
        # the population has no lymph-node results: every patient's counts as absent (fused_table
        # consults it only for a patient whose lymph_nodes file exists)
        assert {modality: set(reasons) for modality, reasons in unsound.items()} == {
            "radiology": {"ABSENT"}, "pathology": {"ABSENT"}, "lymph_node": {*patients, "ABSENT"}}

        # A run over a range of patients materializes each of them; queued runs are queued.
        batched = dg.RunRequest(run_key="explain:batch", tags=dict(zip(RANGE_TAGS, ("GC000004", "GC000006"))))
        [spec] = request_run_specs("explanation", "risk_explanations_sensor", [batched], 0.0, patients)
        writer = InstanceWriter(instance, templates)
        try:
            write_in_batches(writer, [spec, *(RunSpec("radiology", p, 0.0, landing_run_tags(p, "radiology"),
                                                      dg.DagsterRunStatus.QUEUED) for p in patients[:5])])
        finally:
            writer.close()
        materialized = instance.get_records_for_run(spec.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        assert [r.event_log_entry.asset_materialization.partition for r in materialized.records] == [
            "GC000004", "GC000005", "GC000006"]
        latest = instance.get_latest_storage_id_by_partition(dg.AssetKey("risk_explanations"),
                                                             dg.DagsterEventType.ASSET_MATERIALIZATION)
        newest = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("risk_explanations"), storage_ids=[latest[f"GC00000{i}"] for i in (4, 5, 6)]),
            limit=5).records
        assert {(r.run_id, r.asset_materialization.partition) for r in newest} == {
            (spec.run_id, f"GC00000{i}") for i in (4, 5, 6)}
        assert "dagster/partition" not in instance.get_run_by_id(spec.run_id).tags
        queued = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        assert {run.tags["dagster/partition"] for run in queued} == set(patients[:5])
        assert all(run.remote_job_origin is not None for run in queued)
