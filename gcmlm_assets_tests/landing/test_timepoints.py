"""Several CT scans per patient: landing_sensor runs radiology per scan (`ct_scans`), on a real instance."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import dagster as dg

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets_tests.support.landing.drops import (
    Ticker,
    add_timepoint,
    make_drop,
    requested,
    touch_ready,
)


def radiology_keys(result: dg.SensorResult) -> dict[str, str]:
    """Partition -> run key of each radiology run request."""
    return {r.partition_key: r.run_key for r in result.run_requests if r.tags["gcmlm/modality"] == "radiology"}


def test_two_timepoints_are_two_scans_and_two_radiology_runs(instance, landing_root):
    make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10", label=True)
    add_timepoint(landing_root, "P001", "2024-06-02")
    make_drop(landing_root, "P002", wsi=True)  # one scan, directly in ct/
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()

    assert ticker.partitions() == {"P001", "P002"}
    assert ticker.scans() == ["P001@2024-01-10", "P001@2024-06-02", "P002"]
    assert requested(result) == [("P001", "pathology"), ("P001@2024-01-10", "radiology"),
                                 ("P001@2024-06-02", "radiology"), ("P002", "pathology"), ("P002", "radiology")]
    keys = radiology_keys(result)
    assert keys["P001@2024-01-10"].startswith("P001@2024-01-10:radiology:")
    assert keys["P001@2024-01-10"] != keys["P001@2024-06-02"].replace("2024-06-02", "2024-01-10")
    pathology = [r for r in result.run_requests if r.tags["gcmlm/modality"] == "pathology"]
    assert sorted(r.run_key.split(":")[:2] for r in pathology) == [["P001", "pathology"], ["P002", "pathology"]]
    seen = json.loads(ticker.cursor)["seen"]
    assert {"P001|radiology@2024-01-10", "P001|radiology@2024-06-02", "P001|pathology", "P002|radiology"} <= set(seen)
    summary = [m for m in ticker.messages if m.startswith("landing zone:")][-1]
    assert "radiology 3 (P001@2024-01-10, P001@2024-06-02, P002)" in summary

    again = ticker.tick()
    assert again.run_requests == [] and again.dynamic_partitions_requests == []


def test_a_new_timepoint_added_later_runs_only_it(instance, landing_root, settle):
    make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10")
    ticker = Ticker(instance, landing_root)
    first = ticker.tick()
    assert requested(first) == [("P001", "pathology"), ("P001@2024-01-10", "radiology")]

    # Committed while the cursor still remembers the drop: only the new scan is fresh.
    add_timepoint(landing_root, "P001", "2024-06-02")
    later = ticker.tick()
    assert [(key, m) for key, m in requested(later) if m == "radiology"] == [("P001@2024-06-02", "radiology")]
    assert ticker.scans() == ["P001@2024-01-10", "P001@2024-06-02"]
    assert "P001@2024-01-10" not in radiology_keys(later)

    # Committed long after (the cursor has forgotten the drop): the earlier scans come back with the
    # run keys they were requested with, which Dagster never launches twice; only the new one is new.
    settle()
    make_drop(landing_root, "P002")  # a newer commit moves the watermark past P001's
    ticker.tick()
    settle()
    assert ticker.tick().run_requests == [] and not any(k.startswith("P001|") for k in json.loads(ticker.cursor)["seen"])
    earlier_keys = {**radiology_keys(first), **radiology_keys(later)}
    add_timepoint(landing_root, "P001", "2025-01-20")
    latest = radiology_keys(ticker.tick())
    assert {p: k for p, k in latest.items() if k not in earlier_keys.values()} == {
        "P001@2025-01-20": latest["P001@2025-01-20"]}
    assert all(latest[p] == earlier_keys[p] for p in earlier_keys)
    assert ticker.scans() == ["P001@2024-01-10", "P001@2024-06-02", "P002", "P001@2025-01-20"]


def test_a_badly_named_timepoint_is_refused_with_its_reason(instance, landing_root):
    make_drop(landing_root, "P001", ct=False)
    add_timepoint(landing_root, "P001", "2024-13-01")  # no such month
    add_timepoint(landing_root, "P001", "Post NACT")
    add_timepoint(landing_root, "P001", "2024-02-01")
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert requested(result) == [("P001@2024-02-01", "radiology")]
    assert ticker.scans() == ["P001@2024-02-01"]
    refused = [m for m in ticker.messages if "refused" in m]
    assert "landing zone: P001 ct/2024-13-01/ refused: '2024-13-01' is not a calendar date" in refused
    assert any(m.startswith("landing zone: P001 ct/Post NACT/ refused: 'Post NACT' is not a timepoint name: "
                            "name a timepoint folder by the scan's date") for m in refused)


def test_timepoints_that_mix_dates_and_labels_are_refused(instance, landing_root):
    make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10")
    ticker = Ticker(instance, landing_root)
    ticker.tick()
    add_timepoint(landing_root, "P001", "post_nact")
    result = ticker.tick()
    # No scan is requested (their order is unknown); pathology is, as for any commit.
    assert requested(result) == [("P001", "pathology")]
    assert any("P001 ct/ refused: timepoints mix dates (2024-01-10) and labels (post_nact)" in m
               for m in ticker.messages)
    # Which scans are gone cannot be told from a refused ct/: none is removed.
    assert ticker.scans() == ["P001@2024-01-10"]


def test_a_one_scan_drop_keeps_its_partition_run_key_and_cursor_entry(instance, landing_root):
    folder = make_drop(landing_root, "P001", label=True)
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert ticker.scans() == ["P001"] and ticker.partitions() == {"P001"}
    [run] = result.run_requests
    # The fingerprint of the days of one scan per patient: READY's mtime and (name, size, mtime) of
    # the files of ct/ and ct_label/.
    files = sorted((f"{sub}/{path.name}", path.stat().st_size, path.stat().st_mtime_ns)
                   for sub in ("ct", "ct_label") for path in (folder / sub).iterdir())
    payload = json.dumps([(folder / "READY").stat().st_mtime_ns, files]).encode()
    fingerprint = hashlib.sha256(payload).hexdigest()[:16]
    assert (run.partition_key, run.run_key) == ("P001", f"P001:radiology:{fingerprint}")
    assert json.loads(ticker.cursor)["seen"] == {"P001|radiology": fingerprint}


def test_scans_gone_from_a_drop_are_removed(instance, landing_root):
    make_drop(landing_root, "P001", ct=False)
    add_timepoint(landing_root, "P001", "2024-01-10")
    add_timepoint(landing_root, "P001", "2024-06-02")
    single = make_drop(landing_root, "P002")
    ticker = Ticker(instance, landing_root)
    ticker.tick()
    assert ticker.scans() == ["P001@2024-01-10", "P001@2024-06-02", "P002"]

    shutil.rmtree(landing_root / "P001" / "ct" / "2024-06-02")
    touch_ready(landing_root / "P001")
    # P002's only scan becomes its baseline timepoint
    (single / "ct" / "baseline").mkdir()
    (single / "ct" / "ct.nii.gz").rename(single / "ct" / "baseline" / "ct.nii.gz")
    touch_ready(single)
    result = ticker.tick()
    assert ticker.scans() == ["P001@2024-01-10", "P002@baseline"]
    assert requested(result) == [("P002@baseline", "radiology")]
    assert "ct_scans: 2 scan(s) no longer in their drops removed (P001@2024-06-02, P002)" in ticker.messages


def test_an_old_cursor_adds_what_ct_image_has_materialized_once(instance, landing_root):
    """An instance from before ct_scans: its patients' radiology partitions become their only scans."""
    make_drop(landing_root, "P001")
    make_drop(landing_root, "P002")
    instance.add_dynamic_partitions("patients", ["P001", "P002", "P003"])
    for patient_id in ("P002", "P001", "P003"):  # P003's drop has left the landing zone since
        instance.report_runless_asset_event(dg.AssetMaterialization("ct_image", partition=patient_id))
    ticker = Ticker(instance, landing_root)
    # the cursor of a tick before ct_scans, after both drops were handled
    handled = plan_tick(scan_landing_zone(landing_root), None, max_runs=10)
    assert json.loads(handled.cursor).pop("scans") == 1
    old = json.loads(handled.cursor)
    del old["scans"]
    ticker.cursor = json.dumps({**old, "w": time.time_ns()})

    result = ticker.tick()
    assert result.run_requests == []
    assert ticker.scans() == ["P001", "P002", "P003"]
    assert any(m.startswith("ct_scans: 3 scan(s) that ct_image has materialized added once") for m in ticker.messages)
    assert json.loads(ticker.cursor)["scans"] == 1
    again = ticker.tick()
    assert again.dynamic_partitions_requests == [] and ticker.scans() == ["P001", "P002", "P003"]


def test_scans_are_batched_over_the_ct_scans_order(instance, landing_root, monkeypatch):
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", "4")
    for patient_id in ("P001", "P002"):
        make_drop(landing_root, patient_id, ct=False, wsi=True)
        add_timepoint(landing_root, patient_id, "baseline")
        add_timepoint(landing_root, patient_id, "post_nact")
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    by_modality = {r.tags["gcmlm/modality"]: r for r in result.run_requests}
    assert len(result.run_requests) == 2
    # one run of ct_image over the patients' four scans; pathology's over the two patients
    radiology, pathology = by_modality["radiology"], by_modality["pathology"]
    assert (radiology.tags["dagster/asset_partition_range_start"],
            radiology.tags["dagster/asset_partition_range_end"]) == ("P001@baseline", "P002@post_nact")
    assert (pathology.tags["dagster/asset_partition_range_start"],
            pathology.tags["dagster/asset_partition_range_end"]) == ("P001", "P002")
    assert ticker.scans() == ["P001@baseline", "P001@post_nact", "P002@baseline", "P002@post_nact"]


def test_a_link_leaving_the_zone_in_a_timepoint_refuses_the_patients_radiology(instance, landing_root, tmp_path):
    outside = tmp_path / "elsewhere" / "ct.nii.gz"
    outside.parent.mkdir()
    outside.write_bytes(b"not ours")
    folder = make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10")
    ticker = Ticker(instance, landing_root)
    ticker.tick()
    (folder / "ct" / "2024-06-02").mkdir()
    (folder / "ct" / "2024-06-02" / "ct.nii.gz").symlink_to(outside)
    touch_ready(folder)
    result = ticker.tick()
    assert requested(result) == [("P001", "pathology")]
    assert any(m.startswith("landing zone: P001 radiology not requested: ") and str(outside) in m
               for m in ticker.messages)
    assert ticker.scans() == ["P001@2024-01-10"]  # nothing is taken as gone from a refused listing
