"""Scan keys that left `ct_scans` and instances from before it, on a real Dagster instance.

A scan key deleted from `ct_scans` (a patient's only scan moved into timepoint folders) keeps its
ct_image materializations: predicted_mask_sensor must not batch it over the set's order. An instance
from before `ct_scans` has radiology materializations but an empty set: `ensure_ct_scans` carries
them over once.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from gcmlm_assets.partitions import ensure_ct_scans
from gcmlm_assets.radiology.resources import SegmentationModelResource
from gcmlm_assets.radiology.sensors import build_predicted_mask_sensor
from gcmlm_assets.resources import ArtifactStorage, LandingZone

FIRST, LAST = "P001@2024-01-10", "P001@2024-06-02"


def materialized(instance: dg.DagsterInstance, asset: str, *keys: str) -> None:
    for key in keys:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=key))


def model_folder(root: Path) -> Path:
    """What the sensor checks of an installed model's folder (it reads no checkpoint): its files."""
    (root / "fold_0").mkdir(parents=True)
    (root / "plans.json").write_text("{}")
    (root / "dataset.json").write_text("{}")
    (root / "fold_0" / "checkpoint_final.pth").write_bytes(b"checkpoint")
    return root


def test_a_scan_deleted_from_ct_scans_is_not_predicted(instance, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", "1")
    instance.add_dynamic_partitions("ct_scans", ["P001", "P002"])
    materialized(instance, "ct_image", "P001", "P002")
    # P001's only scan moved into timepoint folders: its key left ct_scans, its materialization stays
    instance.delete_dynamic_partition("ct_scans", "P001")
    instance.add_dynamic_partitions("ct_scans", [FIRST, LAST])
    materialized(instance, "ct_image", FIRST, LAST)
    assert "P001" in instance.get_materialized_partitions(dg.AssetKey("ct_image"))

    resources = {"landing": LandingZone(root=str(data_root / "landing")),
                 "storage": ArtifactStorage(root=str(data_root / "artifacts")),
                 "segmentation": SegmentationModelResource(trained_model_folder=str(model_folder(tmp_path / "m")))}
    sensor = build_predicted_mask_sensor(30)
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        requests = sensor(context)
    assert sorted(request.partition_key for request in requests) == [FIRST, LAST, "P002"]


def test_an_old_instance_gets_its_scans_once(instance):
    instance.add_dynamic_partitions("patients", ["P1", "P2", "P3"])
    # P3's bare key is its only scan before it moved into a timepoint folder: the timepoint stands for it
    materialized(instance, "ct_image", "P2", "P1", "P3", "P3@baseline")
    assert instance.get_dynamic_partitions("ct_scans") == []

    assert ensure_ct_scans(instance) == ["P1", "P2", "P3@baseline"]
    assert instance.get_dynamic_partitions("ct_scans") == ["P1", "P2", "P3@baseline"]
    assert ensure_ct_scans(instance) == ["P1", "P2", "P3@baseline"]  # nothing added twice

    # Once done, an emptied set stays empty: deleted scans are not brought back from their history.
    for key in ("P1", "P2", "P3@baseline"):
        instance.delete_dynamic_partition("ct_scans", key)
    assert ensure_ct_scans(instance) == [] and instance.get_dynamic_partitions("ct_scans") == []


def test_a_listed_or_new_instance_is_left_as_it_is(instance, tmp_path):
    instance.add_dynamic_partitions("ct_scans", ["P2"])
    materialized(instance, "ct_image", "P1", "P2")
    assert ensure_ct_scans(instance) == ["P2"]  # a set in use is the truth, whatever was materialized

    (tmp_path / "fresh").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "fresh")) as fresh:
        assert ensure_ct_scans(fresh) == []  # nothing from before ct_scans: done
        materialized(fresh, "ct_image", "P9")  # a later scan's partition is added by the landing sensor
        assert ensure_ct_scans(fresh) == [] and fresh.get_dynamic_partitions("ct_scans") == []
