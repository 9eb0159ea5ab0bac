"""A backfill as a user launches it, run by the real dagster-daemon: uni_features' BackfillPolicy puts
the patients in one run, and the backfill and the partition view record each patient's own outcome.

The backfill is submitted the way the UI's "Materialize selected partitions" does (a
`PartitionBackfill` added to the instance; Dagster's own class, not public API), so the daemon's
asset-backfill loop plans the runs from the asset's policy.
"""

from __future__ import annotations

import shutil
import time

import dagster as dg
import pytest

from gcmlm_assets.definitions import build_definitions
from gcmlm_assets.demo.daemon import prepare_dagster_home, start_daemon
from gcmlm_assets.pathology.assets import patch_coords, uni_features
from gcmlm_assets.pathology.resources import TilingSettings
from gcmlm_assets.profiles import PROFILE_ENV
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets_tests.support.pathology.slide_fixtures import real_slide

PATIENTS = ["P1", "P2", "P3", "P4"]
WITHOUT_PATCH_COORDS = "P3"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_daemon_backfill_batches_patients_and_fails_only_the_bad_one(tmp_path, monkeypatch, test_data):
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

    root = tmp_path / "data"
    home = prepare_dagster_home(root / "dagster_home")
    monkeypatch.setenv("GCMLM_DATA_ROOT", str(root))
    for name in ("GCMLM_LANDING_ROOT", "GCMLM_ARTIFACTS_ROOT", "GCMLM_GPU_BATCH_PATIENTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(PROFILE_ENV, "demo")
    slide = real_slide(test_data)
    for patient_id in PATIENTS:
        if patient_id != WITHOUT_PATCH_COORDS:
            (root / "landing" / patient_id / "wsi").mkdir(parents=True)
            shutil.copy(slide, root / "landing" / patient_id / "wsi" / slide.name)
    resources = {"storage": ArtifactStorage(root=str(root / "artifacts")),
                 "landing": LandingZone(root=str(root / "landing")), "pathology": TilingSettings()}

    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("patients", PATIENTS)
        for patient_id in PATIENTS:
            if patient_id != WITHOUT_PATCH_COORDS:
                assert dg.materialize([patch_coords], partition_key=patient_id, instance=instance,
                                      resources=resources).success
        graph = build_definitions("local", "demo").resolve_asset_graph()
        instance.add_backfill(PartitionBackfill.from_asset_partitions(
            backfill_id="features", asset_graph=graph, partition_names=PATIENTS,
            asset_selection=[dg.AssetKey("uni_features")], backfill_timestamp=time.time(), tags={},
            dynamic_partitions_store=instance, all_partitions=False, title=None, description=None,
            run_config=None))

        daemon = start_daemon(home, home / "daemon.log")
        try:
            deadline = time.monotonic() + 600
            while instance.get_backfill("features").status == BulkActionStatus.REQUESTED:
                assert time.monotonic() < deadline and daemon.alive(), daemon.log_tail()
                time.sleep(3)
        finally:
            daemon.stop()

        backfill = instance.get_backfill("features")
        assert backfill.status == BulkActionStatus.COMPLETED_FAILED
        [run] = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": "features"}))
        # One run for the four patients: the range the policy allows (32 per run by default).
        assert (run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]) == (
            "P1", "P4")
        assert run.status == dg.DagsterRunStatus.FAILURE
        data = backfill.asset_backfill_data
        assert {p.partition_key for p in data.materialized_subset.iterate_asset_partitions()} == {"P1", "P2", "P4"}
        assert {p.partition_key for p in data.failed_and_downstream_subset.iterate_asset_partitions()} == {
            WITHOUT_PATCH_COORDS}
        status = instance.get_status_by_partition(dg.AssetKey("uni_features"), PATIENTS, uni_features.partitions_def)
        assert {p: s.value for p, s in status.items()} == {
            "P1": "MATERIALIZED", "P2": "MATERIALIZED", "P3": "FAILED", "P4": "MATERIALIZED"}
        for patient_id in ("P1", "P2", "P4"):
            [record] = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("uni_features"), asset_partitions=[patient_id]),
                limit=1).records
            assert record.run_id == run.run_id
            assert record.asset_materialization.metadata["n_patches"].value > 20
