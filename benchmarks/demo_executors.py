"""The demo's per-patient runs with each way of executing them: in-process vs the definitions' executor.

    python -m benchmarks.demo_executors [--patients 4] [--executors in_process,multiprocess]

For each executor: a fresh data root and Dagster instance, a small synthetic cohort, one tick of
the real landing_sensor, then every pathology run and the radiology runs of the patients with a
reference mask (those need no trained model), launched exactly as `make demo` launches them.
Prints wall time per run, the steps' own time (what the assets compute) and the difference
(what the executor costs: run bookkeeping, and for `multiprocess` one Python process per step
that imports the definitions), plus the CPU time of this process and its children.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(executor: str, patients: int, root: Path) -> dict:
    import dagster as dg

    from gcmlm_assets.definitions import build_definitions
    from gcmlm_assets.demo import runner, synthetic

    os.environ["GCMLM_DATA_ROOT"] = str(root)
    os.environ["DAGSTER_HOME"] = str(runner.prepare_dagster_home(root / "dagster_home"))
    landing = root / "landing"
    synthetic.write_cohort(landing, synthetic.CohortSpec.small(patients))
    defs = build_definitions("local")
    with dg.DagsterInstance.get() as instance:
        _, requests, _ = runner.tick_landing_sensor(instance, defs, None)
        runs = [runner.sensor_run(r) for r in requests]
        runs = [r for r in runs if r.tags.get("gcmlm/modality") == "pathology"
                or runner.has_reference_mask(landing, r.partition or "")]
        launcher = runner.Launcher(instance, defs, executor,
                                   runner.demo_run_config(defs, runner.DEMO_RESOURCE_CONFIG))
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        outcomes = [launcher.launch(run) for run in runs]
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    failed = [o.run.label for o in outcomes if not o.success]
    if failed:
        raise SystemExit(f"{executor}: runs failed: {failed}: {[o.error for o in outcomes if not o.success]}")
    per_run = [o.seconds for o in outcomes]
    steps = [sum(o.step_seconds.values()) for o in outcomes]
    return {"executor": executor, "runs": len(outcomes), "wall": wall, "cpu": cpu,
            "per_run": statistics.mean(per_run), "steps": statistics.mean(steps),
            "overhead": statistics.mean(r - s for r, s in zip(per_run, steps))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--executors", default="in_process,multiprocess")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gcmlm-bench-") as tmp:
        for executor in args.executors.split(","):
            rows.append(measure(executor, args.patients, Path(tmp) / executor))
    print(f"{'executor':<14} {'runs':>4} {'wall s':>8} {'CPU s':>8} {'s/run':>7} {'steps s/run':>12} {'overhead s/run':>15}")
    for row in rows:
        print(f"{row['executor']:<14} {row['runs']:>4} {row['wall']:>8.1f} {row['cpu']:>8.1f} {row['per_run']:>7.2f} "
              f"{row['steps']:>12.2f} {row['overhead']:>15.2f}")


if __name__ == "__main__":
    main()
