"""The demo's watcher on an instance whose latest risk_scores cannot be read: an error, never "done"
(`settled` asks `unexplained` last; the runner reports the error and exits 1)."""

from __future__ import annotations

import dagster as dg
import pytest

from gcmlm_assets.demo.watch import ScoresUnreadable, unexplained


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
