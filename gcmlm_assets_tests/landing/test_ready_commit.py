"""READY as the uploader's commit point: what a tick walks, and what touching READY re-runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets_tests.support.landing.drops import (
    Ticker,
    make_drop,
    requested,
    touch_later,
    touch_ready,
)


def walked(scan) -> list[str]:
    return [d.patient_id for d in scan.drops if d.walked]


def test_listing_walks_nothing(landing_root):
    make_drop(landing_root, "P001", wsi=True)
    scan = scan_landing_zone(landing_root)
    assert [d.patient_id for d in scan.drops] == ["P001"] and walked(scan) == []
    assert set(scan.drops[0].modalities) == {"radiology", "pathology"}  # walked on first use
    assert walked(scan) == ["P001"]


def test_drops_below_the_watermark_are_not_walked(landing_root, settle):
    for i in range(20):
        make_drop(landing_root, f"P{i:03d}")
    settle()
    first = plan_tick(scan_landing_zone(landing_root), None, max_runs=200)
    assert len(first.runs) == 20 and first.walked == 20  # an empty cursor walks every drop
    make_drop(landing_root, "NEW")
    scan = scan_landing_zone(landing_root)
    second = plan_tick(scan, first.cursor, max_runs=200)
    assert [r.patient_id for r in second.runs] == ["NEW"]
    # Only the new drop and the newest old one (exactly at the watermark) are walked.
    assert walked(scan) == ["NEW", "P019"]
    assert second.files == 2


def test_change_without_ready_is_seen_once_ready_is_touched(instance, landing_root, settle):
    folder = make_drop(landing_root, "P001", wsi=True)
    make_drop(landing_root, "P002")  # newer: the watermark moves past P001
    settle()
    ticker = Ticker(instance, landing_root)
    first = {r.run_key for r in ticker.tick().run_requests}
    assert len(first) == 3

    touch_later(folder / "ct" / "ct.nii.gz", b"a new series, not yet committed")
    settle()
    assert ticker.tick().run_requests == []
    scan = scan_landing_zone(landing_root)
    plan_tick(scan, ticker.cursor, max_runs=200)
    assert "P001" not in walked(scan)

    touch_ready(folder)
    committed = ticker.tick()
    assert requested(committed) == [("P001", "radiology")]  # the slides did not change
    assert not {r.run_key for r in committed.run_requests} & first
    assert ticker.tick().run_requests == []


def test_touching_ready_alone_requests_the_runs_again(instance, landing_root, settle):
    """A broken file replaced by one of the same size and mtime, READY touched: its modality runs
    again (the file's ctime moved); READY touched alone re-runs every modality of the drop."""
    folder = make_drop(landing_root, "P001", wsi=True)
    ticker = Ticker(instance, landing_root)
    first = {r.run_key for r in ticker.tick().run_requests}

    ct = folder / "ct" / "ct.nii.gz"
    old = ct.stat()
    ct.write_bytes(b"X" * old.st_size)
    os.utime(ct, ns=(old.st_atime_ns, old.st_mtime_ns))
    settle()
    assert ticker.tick().run_requests == []  # not committed: READY is older

    touch_ready(folder)
    fixed = ticker.tick()
    assert requested(fixed) == [("P001", "radiology")]
    assert not {r.run_key for r in fixed.run_requests} & first
    settle()
    assert ticker.tick().run_requests == []

    touch_ready(folder)
    again = ticker.tick()
    assert requested(again) == [("P001", "pathology"), ("P001", "radiology")]
    assert all(r.run_key.startswith("P001:") for r in again.run_requests)
    assert not {r.run_key for r in again.run_requests} & (first | {r.run_key for r in fixed.run_requests})
    settle()
    assert ticker.tick().run_requests == []


def test_drop_replaced_with_mv_is_seen(instance, landing_root, tmp_path, settle):
    """A corrected drop staged earlier (older READY) and moved over the old one is a change."""
    staging = tmp_path / "staging"
    make_drop(staging, "P001", wsi=True)
    touch_later(staging / "P001" / "wsi" / "slide1.svs", b"the corrected slide")
    settle()
    make_drop(landing_root, "P001", wsi=True)
    make_drop(landing_root, "P002")
    settle()
    ticker = Ticker(instance, landing_root)
    first = {r.run_key for r in ticker.tick().run_requests}

    shutil.rmtree(landing_root / "P001")
    os.rename(staging / "P001", landing_root / "P001")
    replaced = ticker.tick()
    assert requested(replaced) == [("P001", "pathology"), ("P001", "radiology")]
    assert not {r.run_key for r in replaced.run_requests} & first


def test_empty_cursor_walks_only_up_to_the_cap(landing_root, settle):
    for i in range(7):
        make_drop(landing_root, f"P{i:03d}")
    settle()
    scan = scan_landing_zone(landing_root)
    plan = plan_tick(scan, None, max_runs=3)
    assert [r.patient_id for r in plan.runs] == ["P000", "P001", "P002"]
    assert walked(scan) == ["P000", "P001", "P002"] and plan.deferred == 4


def test_drop_vanished_after_listing_does_not_fail_the_tick(landing_root):
    make_drop(landing_root, "P001")
    make_drop(landing_root, "P002")
    scan = scan_landing_zone(landing_root)
    shutil.rmtree(landing_root / "P001")
    plan = plan_tick(scan, None, max_runs=10)
    assert [r.patient_id for r in plan.runs] == ["P002"]


def test_unreadable_drop_is_reported_and_skipped(landing_root, monkeypatch):
    make_drop(landing_root, "P001")
    make_drop(landing_root, "P002")
    scan = scan_landing_zone(landing_root)
    real_scandir = os.scandir

    def scandir(path):  # as root nothing is unreadable; fail P001's walk instead
        if "P001" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    plan = plan_tick(scan, None, max_runs=10)
    assert [r.patient_id for r in plan.runs] == ["P002"]
    assert [Path(folder).name for folder, _ in scan.unreadable] == ["P001"]
