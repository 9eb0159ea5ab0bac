"""landing_sensor ticks over 10,000 READY CT drops of 300 files each, 10 of them new or changed.

    python -m benchmarks.sensor_tick [--root DIR] [--patients 10000] [--files 300]
                                     [--new 5] [--changed 5] [--repeats 3]

Builds the landing zone (in a temporary folder, or once in --root and reused by later runs):
each drop's `ct/` holds one empty file and `--files - 1` hard links to it, `wsi/` one more
link, then READY. Times the first tick of an empty cursor (capped at the default 200 runs),
one uncapped plan over every drop (what each tick used to cost: it walks every file) which
leaves the watermark behind all of them, then commits `--new` new drops and `--changed` changed
ones (a file replaced, READY touched) and times the ticks that find them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg

from gcmlm_assets.landing.scan import SETTLE_NS, plan_tick, scan_landing_zone
from gcmlm_assets.definitions import landing_sensor
from gcmlm_assets.pathology.resources import PatchEncoder
from gcmlm_assets.profiles import DEMO
from gcmlm_assets.resources import LandingZone

BUILT_MARKER = ".sensor-tick-benchmark"  # a file, not a folder: the scan ignores it


def write_drop(folder: Path, files: int) -> None:
    """One CT drop: an empty file and hard links to it (one inode, however many files)."""
    ct = folder / "ct"
    ct.mkdir(parents=True)
    first = ct / "IM000000.dcm"
    first.touch()
    for k in range(1, files):
        os.link(first, ct / f"IM{k:06d}.dcm")
    (folder / "wsi").mkdir()
    os.link(first, folder / "wsi" / "slide.svs")
    (folder / "READY").touch()  # last: the commit


def old_ids(patients: int) -> list[str]:
    return [f"OLD{i:06d}" for i in range(patients)]


def build(root: Path, patients: int, files: int) -> float | None:
    """Build the existing drops unless `root` already holds them; seconds taken, or None."""
    spec = f"{patients} patients x {files} files\n"
    marker = root / BUILT_MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8") == spec:
        return None
    if any(root.iterdir()):
        raise SystemExit(f"{root} is not empty and was not built for {spec.strip()}")
    t0 = time.perf_counter()
    # Linking is kernel-bound; a few threads overlap the directory updates.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda pid: write_drop(root / pid, files), old_ids(patients), chunksize=64))
    marker.write_text(spec)
    return time.perf_counter() - t0


def commit_changes(root: Path, patients: int, files: int, new: int, changed: int) -> set[str]:
    """New drops and fixed ones (a file replaced, READY touched last); their patient ids."""
    ids = set()
    for i in range(new):
        folder = root / f"NEW{i:06d}"
        write_drop(folder, files)
        ids.add(folder.name)
    for i in range(changed):
        folder = root / old_ids(patients)[i * patients // max(changed, 1)]
        broken = folder / "ct" / "IM000001.dcm"
        broken.unlink()
        broken.write_bytes(b"a replaced slice")
        os.utime(folder / "READY")
        ids.add(folder.name)
    return ids


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def requested_patients(orders: dict[str, list[str]], result: dg.SensorResult) -> set[str]:
    """The patients the tick's run requests cover: single-partition requests and range requests
    (batched runs) over their chain's partition set, in its order (`orders`: each set's partitions
    before the tick) once the tick's partition requests are applied."""
    from gcmlm_assets import runs
    from gcmlm_assets.catalogue import ASSETS
    from gcmlm_assets.partitions import partitions_of
    from gcmlm_assets.scans import parse_scan_key

    orders = {name: list(keys) for name, keys in orders.items()}
    for request in result.dynamic_partitions_requests or []:
        keys = list(request.partition_keys)
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            orders[request.partitions_def_name] = [k for k in orders[request.partitions_def_name] if k not in keys]
        else:
            orders[request.partitions_def_name] += keys
    covered = set()
    for request in result.run_requests:
        if request.partition_key is not None:
            covered.add(request.partition_key)
            continue
        order = orders[partitions_of(ASSETS[request.asset_selection[0].to_user_string()]).name]
        covered |= runs.range_run_patients(request.tags, order, {p: i for i, p in enumerate(order)})
    return {parse_scan_key(key).patient_id for key in covered}  # a scan key names its patient


def run(root: Path, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    build_s = build(root, args.patients, args.files)
    if build_s is not None:
        rows.append((f"build {args.patients:,} drops x {args.files + 1} files (once)",
                     f"{build_s:.1f}", "", f"{args.patients * (args.files + 1):,} links"))
    for old_new in root.glob("NEW*"):  # from an earlier run over the same --root
        shutil.rmtree(old_new)
    time.sleep(SETTLE_NS / 1e9)  # the existing drops were committed before these ticks

    landing = LandingZone(root=str(root))
    # The demo profile's encoder needs no weights: pathology is not held, its runs are requested too.
    encoder = PatchEncoder(**DEMO.resource_settings("encoder"))
    seconds, first = timed(lambda: plan_tick(scan_landing_zone(root), None, landing.max_runs_per_tick))
    rows.append((f"first tick, empty cursor, cap {landing.max_runs_per_tick} runs (list + plan)",
                 f"{seconds:.3f}", f"{first.walked:,}", f"{first.files:,}"))
    seconds, drained = timed(lambda: plan_tick(scan_landing_zone(root), None, 10 * args.patients))
    rows.append(("every drop walked, uncapped (list + plan): sets the watermark",
                 f"{seconds:.3f}", f"{drained.walked:,}", f"{drained.files:,}"))
    cursor = drained.cursor

    expected = commit_changes(root, args.patients, args.files, args.new, args.changed)
    home = tempfile.mkdtemp(prefix="sensor-tick-home-")
    try:
        with dg.instance_for_test(temp_dir=home) as instance:
            # The existing drops are known patients, each with its only scan (keyed by the patient
            # id, scans.py) in `ct_scans`: the tick adds only the new drops' patients and scans.
            for partition_set in ("patients", "ct_scans"):
                instance.add_dynamic_partitions(partition_set, old_ids(args.patients))
            list_s, plan_s, tick_s = [], [], []
            for _ in range(args.repeats):
                seconds, scan = timed(lambda: scan_landing_zone(root))
                list_s.append(seconds)
                seconds, plan = timed(lambda: plan_tick(scan, cursor, landing.max_runs_per_tick))
                plan_s.append(seconds)
                with dg.build_sensor_context(instance=instance, cursor=cursor,
                                             resources={"landing": landing, "encoder": encoder}) as context:
                    seconds, result = timed(lambda: landing_sensor(context))
                tick_s.append(seconds)
            orders = {name: list(instance.get_dynamic_partitions(name)) for name in ("patients", "ct_scans")}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    got = requested_patients(orders, result)
    assert got == expected, f"requested {sorted(got)}, expected {sorted(expected)}"

    n = len(scan.drops)
    rows += [
        (f"warm tick: list {n:,} drops (median of {args.repeats})", f"{statistics.median(list_s):.3f}",
         "0", f"{n:,} READY + {n:,} folders"),
        (f"warm tick: plan, walks the {args.new} new + {args.changed} changed",
         f"{statistics.median(plan_s):.3f}", f"{plan.walked:,}", f"{plan.files:,}"),
        ("warm tick: whole landing_sensor", f"{statistics.median(tick_s):.3f}",
         f"{plan.walked:,}", f"{plan.files:,}"),
    ]
    print(f"run requests {len(result.run_requests)}, partitions added "
          f"{sum(len(r.partition_keys) for r in result.dynamic_partitions_requests)}, "
          f"cursor {len(result.cursor or '')} bytes")
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("what was timed", "seconds", "drops walked", "files stat'ed")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(row, widths)))

    print(line(header))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="build here once and reuse (default: a temporary folder)")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=300, help="files per CT")
    parser.add_argument("--new", type=int, default=5)
    parser.add_argument("--changed", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.root:
        args.root.mkdir(parents=True, exist_ok=True)
        rows = run(args.root, args)
    else:
        with tempfile.TemporaryDirectory(prefix="sensor-tick-") as tmp:
            rows = run(Path(tmp), args)
    print_table(rows)


if __name__ == "__main__":
    main()
