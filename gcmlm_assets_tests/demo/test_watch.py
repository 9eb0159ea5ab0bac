"""The demo's watcher on an instance whose latest risk_scores cannot be read: an error, never "done"
(`settled` asks `unexplained` last; the runner reports the error and exits 1); its progress counts
the radiology assets over every CT scan, a patient's timepoints each."""

from __future__ import annotations

import dagster as dg
import pytest

from gcmlm_assets.demo.watch import ScoresUnreadable, progress, unexplained


def _report_scores(instance: dg.DagsterInstance, metadata: dict) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization("risk_scores", metadata=metadata))


def test_unreadable_scores_are_an_error_not_settled(tmp_path):
    missing, damaged = tmp_path / "gone.parquet", tmp_path / "scores.parquet"
    damaged.write_bytes(b"not a parquet file")
    with dg.DagsterInstance.ephemeral() as instance:
        assert unexplained(instance) == set()  # nothing scored yet: nothing to explain
        for path in (missing, damaged):
            _report_scores(instance, {"path": dg.MetadataValue.path(str(path))})
            with pytest.raises(ScoresUnreadable, match=f"{path}: risk_scores' latest file .* cannot be read"):
                unexplained(instance)
        _report_scores(instance, {"scored": 3})
        with pytest.raises(ScoresUnreadable, match="names no scores file"):
            unexplained(instance)


def test_progress_counts_radiology_over_every_scan_and_the_rest_over_patients():
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("patients", ["P1", "P2"])
        instance.add_dynamic_partitions("ct_scans", ["P1@2024-01-10", "P1@2024-06-02", "P2"])
        for key in ("P1@2024-01-10", "P2"):
            instance.report_runless_asset_event(dg.AssetMaterialization("ct_image", partition=key))
        instance.report_runless_asset_event(dg.AssetMaterialization("patch_coords", partition="P1"))
        now = progress(instance)
        assert (now.patients, now.scans) == (2, 3)
        assert now.per_asset["ct_image"] == {"done": 2, "failed": 0, "in progress": 0, "waiting": 1}
        assert now.per_asset["patch_coords"] == {"done": 1, "failed": 0, "in progress": 0, "waiting": 1}
        assert "ct_image 2/3 scans" in now.line() and "patch_coords 1/2" in now.line()
