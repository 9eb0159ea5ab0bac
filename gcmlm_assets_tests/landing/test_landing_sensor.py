"""landing_sensor on a temporary landing zone, evaluated against a real Dagster instance."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.definitions import MODALITY_ASSETS
from gcmlm_assets_tests.support.landing.drops import (
    Ticker,
    make_drop,
    requested,
    touch_later,
    touch_ready,
)


def test_new_patient_becomes_partition_and_run(instance, landing_root):
    make_drop(landing_root, "P001", ct=True, wsi=True)
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert ticker.partitions() == {"P001"}
    by_modality = {r.tags["gcmlm/modality"]: r for r in result.run_requests}
    assert set(by_modality) == {"radiology", "pathology"}
    assert by_modality["radiology"].partition_key == "P001"
    assert list(by_modality["radiology"].asset_selection) == MODALITY_ASSETS["radiology"]
    assert list(by_modality["pathology"].asset_selection) == MODALITY_ASSETS["pathology"]
    assert by_modality["radiology"].run_key.startswith("P001:radiology:")


def test_drop_without_ready_is_ignored(instance, landing_root):
    make_drop(landing_root, "P002", ready=False)
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert result.run_requests == []
    assert ticker.partitions() == set()


def test_second_tick_requests_nothing(instance, landing_root):
    make_drop(landing_root, "P001", wsi=True)
    make_drop(landing_root, "P002")
    ticker = Ticker(instance, landing_root)
    assert len(ticker.tick().run_requests) == 3
    second = ticker.tick()
    assert second.run_requests == []
    assert second.dynamic_partitions_requests == []


def test_committed_change_requests_new_runs(instance, landing_root):
    """Replaced files + READY touched: the modality whose files changed runs again, others nothing."""
    folder = make_drop(landing_root, "P001", wsi=True)
    make_drop(landing_root, "P002", wsi=True)
    ticker = Ticker(instance, landing_root)
    old_keys = {r.run_key for r in ticker.tick().run_requests}

    touch_later(folder / "wsi" / "slide1.svs", b"a re-scanned slide, larger than before")
    touch_ready(folder)
    changed = ticker.tick()
    # Radiology's files are those it was last requested with: only pathology runs.
    assert requested(changed) == [("P001", "pathology")]
    assert not {r.run_key for r in changed.run_requests} & old_keys
    assert ticker.tick().run_requests == []

    # A new reference mask, committed, is a radiology change too.
    (folder / "ct_label").mkdir()
    touch_later(folder / "ct_label" / "mask.nii.gz", b"mask")
    touch_ready(folder)
    assert ("P001", "radiology") in requested(ticker.tick())


def test_ready_written_after_upload_triggers(instance, landing_root):
    make_drop(landing_root, "P001")
    folder = make_drop(landing_root, "P002", ready=False)
    ticker = Ticker(instance, landing_root)
    assert [r.partition_key for r in ticker.tick().run_requests] == ["P001"]
    time.sleep(0.01)
    (folder / "READY").write_text("")
    assert [r.partition_key for r in ticker.tick().run_requests] == ["P002"]


def test_copy_with_preserved_mtime_is_still_seen(instance, landing_root):
    folder = make_drop(landing_root, "P001")
    ticker = Ticker(instance, landing_root)
    first = ticker.tick()
    ct = folder / "ct" / "ct.nii.gz"
    old = ct.stat()
    time.sleep(0.01)
    ct.write_bytes(b"replaced content with a new size")
    os.utime(ct, ns=(old.st_atime_ns, old.st_mtime_ns))  # like `cp -p` / rsync -a
    touch_ready(folder)
    second = ticker.tick()
    assert [r.partition_key for r in second.run_requests] == ["P001"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key


@pytest.mark.parametrize("bad_name", ["..bad", "with space", "naïve", "-dash-first", "x" * 65])
def test_invalid_ids_are_reported_not_added(instance, landing_root, bad_name):
    make_drop(landing_root, bad_name)
    make_drop(landing_root, "GOOD1")
    scan = scan_landing_zone(landing_root)
    assert [Path(folder).name for folder, _ in scan.invalid] == [bad_name]
    assert scan.invalid[0][1]  # a reason is given
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert ticker.partitions() == {"GOOD1"}
    assert {r.partition_key for r in result.run_requests} == {"GOOD1"}


def test_per_tick_cap_defers_the_rest(instance, landing_root):
    for i in range(7):
        make_drop(landing_root, f"P{i:03d}")
    ticker = Ticker(instance, landing_root, max_runs=3)
    seen: list[str] = []
    for expected in (3, 3, 1, 0):
        result = ticker.tick()
        assert len(result.run_requests) == expected
        seen += [r.partition_key for r in result.run_requests]
    assert sorted(seen) == [f"P{i:03d}" for i in range(7)]  # each exactly once
    assert len(ticker.cursor) < 1000  # the cursor does not grow with the landing zone


def test_cursor_stays_small_for_many_patients(landing_root):
    for i in range(300):
        make_drop(landing_root, f"P{i:04d}")
    scan = scan_landing_zone(landing_root)
    cursor = None
    total = 0
    for _ in range(5):
        plan = plan_tick(scan, cursor, max_runs=100)
        total += len(plan.runs)
        cursor = plan.cursor
    assert total == 300
    # While the drops are younger than the settling window the cursor remembers
    # them (so nothing is requested twice); once they are older it forgets them.
    settled = scan_landing_zone(landing_root)
    settled.started_ns += 60 * 10**9
    plan = plan_tick(settled, cursor, max_runs=100)
    assert plan.runs == []
    assert len(plan.cursor) < 200


def test_write_during_scan_is_not_lost(landing_root):
    """A drop committed again just before the watermark moved is still picked up next tick."""
    make_drop(landing_root, "A")
    first = plan_tick(scan_landing_zone(landing_root), None, max_runs=10)
    folder = make_drop(landing_root, "B")
    scan = scan_landing_zone(landing_root)
    # B is fixed and committed again after it was listed but before the tick ends.
    touch_later(folder / "ct" / "ct.nii.gz", b"changed after being scanned")
    touch_ready(folder)
    second = plan_tick(scan, first.cursor, max_runs=10)
    assert [r.patient_id for r in second.runs] == ["B"]
    third = plan_tick(scan_landing_zone(landing_root), second.cursor, max_runs=10)
    assert [r.patient_id for r in third.runs] == ["B"]
    assert third.runs[0].fingerprint != second.runs[0].fingerprint


def test_missing_landing_zone_is_empty(instance, tmp_path):
    ticker = Ticker(instance, tmp_path / "does-not-exist")
    assert ticker.tick().run_requests == []


def test_drop_moved_in_with_mv_is_picked_up(instance, landing_root, tmp_path, settle):
    """`mv` keeps the times of everything inside the drop; only the moved folder's ctime is new."""
    staging = tmp_path / "staging"
    make_drop(staging, "P900", ct=True, wsi=True)
    settle()  # READY is older than the next tick's watermark
    make_drop(landing_root, "P001", ct=True)
    settle()
    ticker = Ticker(instance, landing_root)
    assert [r.partition_key for r in ticker.tick().run_requests] == ["P001"]

    os.rename(staging / "P900", landing_root / "P900")
    result = ticker.tick()
    assert ticker.partitions() == {"P001", "P900"}
    assert requested(result) == [("P900", "pathology"), ("P900", "radiology")]
    assert list(ticker.tick().run_requests) == []


def test_broken_link_in_one_drop_does_not_stop_the_tick(instance, landing_root):
    bad = make_drop(landing_root, "P001", ct=True, wsi=True)
    os.symlink(bad / "wsi" / "gone.svs", bad / "wsi" / "slide2.svs")  # points at nothing
    make_drop(landing_root, "P002", ct=True)
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    # Both drops are planned; the pathology run of P001 will fail naming the broken file.
    assert requested(result) == [("P001", "pathology"), ("P001", "radiology"), ("P002", "radiology")]


def test_pathology_waits_while_the_encoder_has_no_weights(instance, landing_root, tmp_path, monkeypatch):
    """No run doomed to fail: without UNI weights the pathology runs are held (radiology goes on),
    the tick says why and for whom, and they are requested once a checkpoint is configured."""
    from gcmlm_assets.pathology.resources import PatchEncoder

    monkeypatch.delenv("GCMLM_UNI_CHECKPOINT", raising=False)
    make_drop(landing_root, "P001", wsi=True)
    make_drop(landing_root, "P002", wsi=True)
    ticker = Ticker(instance, landing_root, encoder=PatchEncoder(name="uni"))
    first = ticker.tick()
    assert requested(first) == [("P001", "radiology"), ("P002", "radiology")]
    assert ticker.partitions() == {"P001", "P002"}
    held = [m for m in ticker.messages if "pathology held" in m]
    assert held and "pathology held for 2 (P001, P002)" in held[0]
    assert "encoder 'uni' needs local weights" in held[0] and "GCMLM_UNI_CHECKPOINT" in held[0]
    summary = [m for m in ticker.messages if m.startswith("landing zone:")]
    assert "2 new patient(s) (P001, P002)" in summary[-1] and "radiology 2 (P001, P002)" in summary[-1]

    second = ticker.tick()  # still held; nothing requested twice, and the tick is a skip that says why
    assert second.run_requests == [] and "pathology held for 2 (P001, P002)" in second.skip_reason.skip_message
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"weights of the operator's UNI checkpoint")
    monkeypatch.setenv("GCMLM_UNI_CHECKPOINT", str(weights))
    assert requested(ticker.tick()) == [("P001", "pathology"), ("P002", "pathology")]
    assert ticker.tick().run_requests == []


def test_links_inside_the_zone_are_followed_links_out_of_it_refused(instance, landing_root, tmp_path):
    """A link that stays in the landing zone is an ordinary file; one that leaves it is refused
    (its modality not requested, the tick says why) without its target being looked at."""
    shared = landing_root / "shared_uploads"  # not a drop: no READY
    shared.mkdir()
    (shared / "ct.nii.gz").write_bytes(b"ct bytes")
    inside = make_drop(landing_root, "INSIDE", ct=False, wsi=True)
    (inside / "ct").mkdir()
    (inside / "ct" / "ct.nii.gz").symlink_to(shared / "ct.nii.gz")
    outside_file = tmp_path / "elsewhere" / "ct.nii.gz"
    outside_file.parent.mkdir()
    outside_file.write_bytes(b"not ours")
    leaving = make_drop(landing_root, "LEAVING", ct=False, wsi=True)
    (leaving / "ct").mkdir()
    (leaving / "ct" / "ct.nii.gz").symlink_to(outside_file)
    (leaving / "wsi" / "broken.svs").symlink_to(tmp_path / "gone" / "x.svs")  # dangling, and outside

    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert requested(result) == [("INSIDE", "pathology"), ("INSIDE", "radiology")]
    assert ticker.partitions() == {"INSIDE", "LEAVING"}
    refused = [m for m in ticker.messages if "LEAVING" in m and "not requested" in m]
    assert len(refused) == 2
    assert any(f"{leaving / 'ct' / 'ct.nii.gz'} is a symbolic link to {outside_file}" in m for m in refused)
    assert any(f"{leaving / 'wsi' / 'broken.svs'} is a symbolic link to {tmp_path / 'gone' / 'x.svs'}" in m
               for m in refused)
    # Fixed (the file copied in) and committed: requested as usual.
    (leaving / "ct" / "ct.nii.gz").unlink()
    (leaving / "ct" / "ct.nii.gz").write_bytes(b"copied in")
    touch_ready(leaving)
    assert requested(ticker.tick()) == [("LEAVING", "radiology")]
