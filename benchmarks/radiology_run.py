"""A 3-step radiology run (ct_image -> ct_mask -> radiomics_row, one scan with a reference mask):
the run process's wall time against the sum of its steps' own times.

    python -m benchmarks.radiology_run [--repeats 3] [--source PATH]

Each repeat writes a fresh synthetic patient (the demo generator's small cohort) and a fresh local
instance, then runs `dagster asset materialize` in a new process: the path a launched run takes
(a fresh process that loads the definitions and runs its steps in it; the local executor is
in-process). Reported per repeat: the process's wall time, the run's own time (RUN_START to
RUN_SUCCESS), the sum of the steps' durations (STEP_SUCCESS), and the overhead (wall - steps).
`--source` runs the code of another checkout (e.g. an older commit in a git worktree) for a
before/after comparison; the patient and the instance are made by this checkout either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ASSETS = "ct_image,ct_mask,radiomics_row"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_patient(root: Path) -> tuple[str, str]:
    """(patient id, the scan key of its first scan with a reference mask) of a fresh demo drop."""
    from gcmlm_assets.demo.synthetic import write_cohort
    from gcmlm_assets.demo.synthetic_plan import CohortSpec, plan_cohort
    from gcmlm_assets.scans import list_drop_scans, scan_key

    spec = CohortSpec.small(n_patients=2)
    [patient] = [plan.patient_id for plan in plan_cohort(spec) if plan.has_reference_mask][:1]
    write_cohort(root / "landing", spec)
    drop = root / "landing" / patient
    scans = list_drop_scans(drop).scans  # the drop's only scan, or its timepoints oldest first
    with_mask = [s for s in scans if any((drop / s.reference_folder).glob("*"))]
    return patient, scan_key(patient, (with_mask or scans)[0].timepoint)


def make_instance(home: Path, patient: str, scan: str) -> None:
    import dagster as dg

    home.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "deploy" / "local" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("patients", [patient])
        instance.add_dynamic_partitions("ct_scans", [scan])  # the radiology assets' partitions


def run_times(home: Path) -> tuple[float, float]:
    """(run seconds from RUN_START to RUN_SUCCESS, sum of the steps' durations) of the one run."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
        events = instance.all_logs(run.run_id)
    stamps = {e.dagster_event.event_type_value: e.timestamp for e in events if e.dagster_event}
    steps = sum(e.dagster_event.event_specific_data.duration_ms / 1000 for e in events
                if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS")
    return stamps["PIPELINE_SUCCESS"] - stamps["PIPELINE_START"], steps


def one_run(source: Path) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="radiology_run_") as tmp:
        root = Path(tmp)
        patient, scan = make_patient(root)
        home = root / "dagster_home"
        make_instance(home, patient, scan)
        env = {**os.environ, "GCMLM_DATA_ROOT": str(root), "DAGSTER_HOME": str(home), "GCMLM_PROFILE": "demo",
               "GCMLM_ENV": "local", "PYTHONPATH": str(source)}
        for name in ("GCMLM_LANDING_ROOT", "GCMLM_ARTIFACTS_ROOT"):
            env.pop(name, None)
        command = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "--select", ASSETS,
                   "--partition", scan, "-m", "gcmlm_assets.definitions"]
        started = time.perf_counter()
        subprocess.run(command, cwd=source, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - started
        run, steps = run_times(home)
        return wall, run, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", type=Path, default=PROJECT_ROOT,
                        help="checkout whose gcmlm_assets the run uses (default: this one)")
    args = parser.parse_args()
    source = args.source.resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True,
                            text=True).stdout.strip()
    print(f"3-step radiology run ({ASSETS}), code of {source} at {commit or '?'}, cpus {os.cpu_count()}\n")
    print(f"| {'repeat':>6} | {'process wall s':>14} | {'run s':>6} | {'sum of steps s':>14} | {'overhead s':>10} |")
    print(f"|{'-' * 8}|{'-' * 16}|{'-' * 8}|{'-' * 16}|{'-' * 12}|")
    rows = []
    for repeat in range(1, args.repeats + 1):
        wall, run, steps = one_run(source)
        rows.append((wall, run, steps))
        print(f"| {repeat:>6} | {wall:>14.2f} | {run:>6.2f} | {steps:>14.2f} | {wall - steps:>10.2f} |")
    median = [statistics.median(column) for column in zip(*rows, strict=True)]
    print(f"| {'median':>6} | {median[0]:>14.2f} | {median[1]:>6.2f} | {median[2]:>14.2f} "
          f"| {median[0] - median[2]:>10.2f} |")


if __name__ == "__main__":
    main()
