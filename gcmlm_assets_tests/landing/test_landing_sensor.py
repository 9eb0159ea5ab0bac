"""landing_sensor on a temporary landing zone, evaluated against a real Dagster instance."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pytest

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.landing.sensors import MODALITY_ASSETS, landing_sensor
from gcmlm_assets.resources import LandingZone


def make_drop(root: Path, patient_id: str, *, ct: bool = True, wsi: bool = False,
              label: bool = False, ready: bool = True) -> Path:
    folder = root / patient_id
    if ct:
        (folder / "ct").mkdir(parents=True, exist_ok=True)
        (folder / "ct" / "ct.nii.gz").write_bytes(b"ct-" + patient_id.encode())
    if label:
        (folder / "ct_label").mkdir(parents=True, exist_ok=True)
        (folder / "ct_label" / "mask.nii.gz").write_bytes(b"mask")
    if wsi:
        (folder / "wsi").mkdir(parents=True, exist_ok=True)
        (folder / "wsi" / "slide1.svs").write_bytes(b"slide-" + patient_id.encode())
    folder.mkdir(parents=True, exist_ok=True)
    if ready:
        (folder / "READY").write_text("")
    return folder


class Ticker:
    """Evaluates the sensor like the daemon does: cursor carried over, partition requests applied."""

    def __init__(self, instance: dg.DagsterInstance, landing_root: Path, max_runs: int = 200):
        self.instance = instance
        self.landing = LandingZone(root=str(landing_root), max_runs_per_tick=max_runs)
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources={"landing": self.landing}) as context:
            result = landing_sensor(context)
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name,
                                                 list(request.partition_keys))
        self.cursor = result.cursor
        return result

    def partitions(self) -> set[str]:
        return set(self.instance.get_dynamic_partitions("patients"))


def touch_later(path: Path, content: bytes) -> None:
    """Rewrite a file so its times move past anything the cursor has seen."""
    time.sleep(0.01)
    path.write_bytes(content)


@pytest.fixture
def landing_root(tmp_path: Path) -> Path:
    root = tmp_path / "landing"
    root.mkdir()
    return root


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


def test_changed_file_requests_only_that_modality(instance, landing_root):
    folder = make_drop(landing_root, "P001", wsi=True)
    make_drop(landing_root, "P002", wsi=True)
    ticker = Ticker(instance, landing_root)
    first = ticker.tick()
    old_keys = {r.run_key for r in first.run_requests}

    touch_later(folder / "wsi" / "slide1.svs", b"a re-scanned slide, larger than before")
    changed = ticker.tick()
    assert [(r.partition_key, r.tags["gcmlm/modality"]) for r in changed.run_requests] == [
        ("P001", "pathology")]
    assert changed.run_requests[0].run_key not in old_keys
    assert ticker.tick().run_requests == []

    # A new reference mask is a radiology change.
    (folder / "ct_label").mkdir()
    touch_later(folder / "ct_label" / "mask.nii.gz", b"mask")
    relabelled = ticker.tick()
    assert [(r.partition_key, r.tags["gcmlm/modality"]) for r in relabelled.run_requests] == [
        ("P001", "radiology")]


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
    ticker.tick()
    ct = folder / "ct" / "ct.nii.gz"
    old = ct.stat()
    time.sleep(0.01)
    ct.write_bytes(b"replaced content with a new size")
    os.utime(ct, ns=(old.st_atime_ns, old.st_mtime_ns))  # like `cp -p` / rsync -a
    assert [r.partition_key for r in ticker.tick().run_requests] == ["P001"]


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
    """A drop changed just before the watermark moved is still picked up next tick."""
    make_drop(landing_root, "A")
    first = plan_tick(scan_landing_zone(landing_root), None, max_runs=10)
    folder = make_drop(landing_root, "B")
    scan = scan_landing_zone(landing_root)
    # B's change lands after it was scanned but before the tick ends.
    touch_later(folder / "ct" / "ct.nii.gz", b"changed after being scanned")
    second = plan_tick(scan, first.cursor, max_runs=10)
    assert [r.patient_id for r in second.runs] == ["B"]
    third = plan_tick(scan_landing_zone(landing_root), second.cursor, max_runs=10)
    assert [r.patient_id for r in third.runs] == ["B"]
    assert third.runs[0].fingerprint != second.runs[0].fingerprint


def test_missing_landing_zone_is_empty(instance, tmp_path):
    ticker = Ticker(instance, tmp_path / "does-not-exist")
    assert ticker.tick().run_requests == []


def test_drop_moved_in_with_mv_is_picked_up(instance, landing_root, tmp_path):
    """`mv` keeps the times of everything inside the drop; only the moved folder's ctime is new."""
    staging = tmp_path / "staging"
    make_drop(staging, "P900", ct=True, wsi=True)
    time.sleep(2.2)  # older than the next tick's watermark (capped at its start minus the settle window)
    make_drop(landing_root, "P001", ct=True)
    ticker = Ticker(instance, landing_root)
    assert [r.partition_key for r in ticker.tick().run_requests] == ["P001"]

    os.rename(staging / "P900", landing_root / "P900")
    result = ticker.tick()
    assert ticker.partitions() == {"P001", "P900"}
    assert sorted((r.partition_key, r.tags["gcmlm/modality"]) for r in result.run_requests) == [
        ("P900", "pathology"), ("P900", "radiology")]
    assert list(ticker.tick().run_requests) == []


def test_broken_link_in_one_drop_does_not_stop_the_tick(instance, landing_root):
    bad = make_drop(landing_root, "P001", ct=True, wsi=True)
    os.symlink(bad / "wsi" / "gone.svs", bad / "wsi" / "slide2.svs")  # points at nothing
    make_drop(landing_root, "P002", ct=True)
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    # Both drops are planned; the pathology run of P001 will fail naming the broken file.
    assert sorted((r.partition_key, r.tags["gcmlm/modality"]) for r in result.run_requests) == [
        ("P001", "pathology"), ("P001", "radiology"), ("P002", "radiology")]
