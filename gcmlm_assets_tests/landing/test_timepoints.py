"""Several CT scans per patient: landing_sensor runs radiology per scan (`ct_scans`), on a real instance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import dagster as dg

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.pathology.resources import PatchEncoder
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
    make_drop(landing_root, "P002", wsi=True)
    ticker = Ticker(instance, landing_root)
    first = ticker.tick()
    assert requested(first) == [("P001", "pathology"), ("P001@2024-01-10", "radiology"),
                                ("P002", "pathology"), ("P002", "radiology")]

    # Committed while the cursor still remembers the drop: only the new scan runs, not pathology.
    add_timepoint(landing_root, "P001", "2024-06-02")
    later = ticker.tick()
    assert requested(later) == [("P001@2024-06-02", "radiology")]
    assert ticker.scans() == ["P001@2024-01-10", "P002", "P001@2024-06-02"]
    assert "2 unchanged unit(s) of recommitted drops not re-run" in ticker.messages[-1]  # pathology, 2024-01-10
    assert ticker.tick().run_requests == []

    # Committed long after: the watermark has passed the drop and the cursor forgotten it; the
    # memory in Dagster's key-value store still knows what each unit was last requested with.
    settle()
    touch_ready(landing_root / "P002")  # a newer commit moves the watermark past P001's
    p002 = ticker.tick()
    assert requested(p002) == [("P002", "pathology"), ("P002", "radiology")]  # READY alone: re-run all
    settle()
    assert ticker.tick().run_requests == []
    assert not any(k.startswith("P001|") for k in json.loads(ticker.cursor)["seen"])
    assert instance.run_storage.get_cursor_values({"gcmlm/landing/P001|radiology@2024-06-02"})
    add_timepoint(landing_root, "P001", "2025-01-20")
    latest = ticker.tick()
    assert requested(latest) == [("P001@2025-01-20", "radiology")]
    assert radiology_keys(latest)["P001@2025-01-20"].startswith("P001@2025-01-20:radiology:")

    # A cursor lost altogether (every drop walked again): the same. P002, unchanged, is requested
    # with the run key it had, which Dagster never launches twice.
    ticker.cursor = None
    add_timepoint(landing_root, "P001", "2025-06-30")
    reset = ticker.tick()
    assert [(p, m) for p, m in requested(reset) if p.startswith("P001")] == [("P001@2025-06-30", "radiology")]
    assert {r.run_key for r in reset.run_requests if r.partition_key == "P002"} == {
        r.run_key for r in p002.run_requests}


def test_touching_ready_alone_reruns_every_unit_of_the_drop(instance, landing_root, settle):
    folder = make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10")
    add_timepoint(landing_root, "P001", "2024-06-02")
    ticker = Ticker(instance, landing_root)
    first = {r.run_key for r in ticker.tick().run_requests}
    settle()
    touch_ready(folder)
    again = ticker.tick()
    assert requested(again) == [("P001", "pathology"), ("P001@2024-01-10", "radiology"),
                                ("P001@2024-06-02", "radiology")]
    assert not {r.run_key for r in again.run_requests} & first
    assert ticker.tick().run_requests == []


def test_a_file_replaced_in_one_timepoint_reruns_only_it(instance, landing_root, settle):
    folder = make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10")
    add_timepoint(landing_root, "P001", "2024-06-02")
    ticker = Ticker(instance, landing_root)
    ticker.tick()
    settle()
    # Replaced as `cp -p` does: same name, size and mtime; only the ctime tells.
    ct = folder / "ct" / "2024-06-02" / "ct.nii.gz"
    old = ct.stat()
    ct.write_bytes(b"X" * old.st_size)
    os.utime(ct, ns=(old.st_atime_ns, old.st_mtime_ns))
    memory_keys = {"gcmlm/landing/P001|radiology@2024-06-02", "gcmlm/landing/P001|radiology@2025-01-20"}
    before = instance.run_storage.get_cursor_values(memory_keys)
    add_timepoint(landing_root, "P001", "2025-01-20")  # committed with it: a unit the memory has never seen
    assert requested(ticker.tick()) == [("P001@2024-06-02", "radiology"), ("P001@2025-01-20", "radiology")]
    # Both remembered: the changed unit's memory updated, the new one's added, in the same tick.
    after = instance.run_storage.get_cursor_values(memory_keys)
    assert set(before) == {"gcmlm/landing/P001|radiology@2024-06-02"} and set(after) == memory_keys
    assert after["gcmlm/landing/P001|radiology@2024-06-02"] != before["gcmlm/landing/P001|radiology@2024-06-02"]
    assert ticker.tick().run_requests == []


def test_held_units_are_requested_once_the_hold_lifts(instance, landing_root, tmp_path, monkeypatch):
    monkeypatch.delenv("GCMLM_UNI_CHECKPOINT", raising=False)
    folder = make_drop(landing_root, "P001", ct=False, wsi=True)
    add_timepoint(landing_root, "P001", "2024-01-10")
    ticker = Ticker(instance, landing_root, encoder=PatchEncoder(name="uni"))
    assert requested(ticker.tick()) == [("P001@2024-01-10", "radiology")]  # pathology held

    add_timepoint(landing_root, "P001", "2024-06-02")
    assert requested(ticker.tick()) == [("P001@2024-06-02", "radiology")]
    # READY alone, pathology never requested: the scans that can run are re-run.
    touch_ready(folder)
    assert requested(ticker.tick()) == [("P001@2024-01-10", "radiology"), ("P001@2024-06-02", "radiology")]
    assert any("pathology held for 1 (P001)" in m for m in ticker.messages)

    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"weights of the operator's UNI checkpoint")
    monkeypatch.setenv("GCMLM_UNI_CHECKPOINT", str(weights))
    assert requested(ticker.tick()) == [("P001", "pathology")]
    assert ticker.tick().run_requests == []


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
    assert set(instance.run_storage.get_cursor_values({"gcmlm/landing/P001|radiology"})) == {
        "gcmlm/landing/P001|radiology"}


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
    # P001's remaining scan did not change: a removal alone is READY touched alone, its scan re-run.
    assert requested(result) == [("P001@2024-01-10", "radiology"), ("P002@baseline", "radiology")]
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
