"""One landing_sensor tick over 10,000 patient folders of which 10 are new.

    python -m benchmarks.sensor_tick [--patients 10000] [--new 10]

Builds the landing zone in a temporary folder, lets earlier ticks handle the
existing patients, then times the tick that finds the new ones.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg

from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.landing.sensors import landing_sensor
from gcmlm_assets.resources import LandingZone


def write_drop(root: Path, patient_id: str) -> None:
    folder = root / patient_id
    for sub, name in (("ct", "ct.nii.gz"), ("ct_label", "mask.nii.gz"), ("wsi", "slide.svs")):
        (folder / sub).mkdir(parents=True)
        (folder / sub / name).write_bytes(patient_id.encode())
    (folder / "READY").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        landing_root = Path(tmp) / "landing"
        landing_root.mkdir()
        for i in range(args.patients):
            write_drop(landing_root, f"OLD{i:06d}")
        (Path(tmp) / "home").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "home")) as instance:
            instance.add_dynamic_partitions("patients", [f"OLD{i:06d}" for i in range(args.patients)])
            # Earlier ticks have handled every existing drop.
            cursor = plan_tick(scan_landing_zone(landing_root), None, 10 * args.patients).cursor
            time.sleep(0.02)
            for i in range(args.new):
                write_drop(landing_root, f"NEW{i:06d}")
            landing = LandingZone(root=str(landing_root))

            scan_s, plan_s, tick_s = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                scan = scan_landing_zone(landing_root)
                scan_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                plan_tick(scan, cursor, landing.max_runs_per_tick)
                plan_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with dg.build_sensor_context(instance=instance, cursor=cursor,
                                             resources={"landing": landing}) as context:
                    result = landing_sensor(context)
                tick_s.append(time.perf_counter() - t0)

    rows = [
        ("patient folders", f"{args.patients + args.new:,}"),
        ("new patients", str(args.new)),
        ("scan (median s)", f"{statistics.median(scan_s):.3f}"),
        ("plan (median s)", f"{statistics.median(plan_s):.4f}"),
        ("whole sensor tick (median s)", f"{statistics.median(tick_s):.3f}"),
        ("run requests", str(len(result.run_requests))),
        ("partitions added", str(sum(len(r.partition_keys) for r in result.dynamic_partitions_requests))),
        ("cursor bytes", str(len(result.cursor or ""))),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|------")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")


if __name__ == "__main__":
    main()
