"""A small cohort materialized into a fresh local instance, and the Dagster webserver and daemon
over it: the state a user finds after their first drops, for the browser tests.

Patients (synthetic, from the demo's generator, the first two with a reference stomach mask):
- `ready[0]`: CT, mask and radiomics row materialized; slides tiled and encoded.
- `ready[1]`: CT and mask materialized (its radiomics row is left for the UI to launch); slides
  tiled and encoded (both patients' slide vectors are left for the UI's backfill).
- GC9001, scanned twice: its first timepoint's CT is sound and materialized; its second's
  (`broken`, `GC9001@2024-04-02`) is a file cut to a third, so that partition alone has failed with a reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from gcmlm_assets.demo.daemon import WORKSPACE, Daemon, prepare_dagster_home, start_daemon
from gcmlm_assets.partitions import ct_scans_partitions, patients_partitions
from gcmlm_assets.scans import scan_key
from gcmlm_assets.settings import scoped_environment

PROJECT_ROOT = Path(__file__).resolve().parents[3]
# Git-ignored: the screenshots each run leaves for a person to look at.
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "ui"
SENSORS = ("landing_sensor", "radiology_steps_sensor", "pathology_steps_sensor", "lymph_node_steps_sensor",
           "segmentation_training_sensor", "predicted_mask_sensor", "cohort_refresh_sensor",
           "qupath_geojson_after_patch_coords_sensor", "qupath_geojson_after_risk_explanations_sensor",
           "tumour_classifier_sensor", "lymph_nodes_after_classifier_sensor")


@dataclass(frozen=True)
class Cohort:
    root: Path
    home: Path
    env: dict[str, str]
    ready: tuple[str, str]
    broken: str


def _environment(root: Path, home: Path) -> dict[str, str]:
    return {"GCMLM_DATA_ROOT": str(root), "DAGSTER_HOME": str(home), "GCMLM_PROFILE": "demo",
            "GCMLM_ENV": "local"}


def build_cohort(root: Path) -> Cohort:
    """Write the drops and materialize them in this process, as the landing sensor's runs would."""
    from gcmlm_assets.definitions import build_definitions
    from gcmlm_assets.demo.synthetic import write_cohort
    from gcmlm_assets.demo.synthetic_ct import make_ct, nifti_bytes
    from gcmlm_assets.demo.synthetic_plan import CohortSpec, plan_cohort

    spec = CohortSpec.small(n_patients=4, id_prefix="GC")
    plans = [plan for plan in plan_cohort(spec) if plan.has_reference_mask][:2]
    with_masks = [plan.patient_id for plan in plans]
    landing = root / "landing"
    write_cohort(landing, spec)
    for folder in landing.iterdir():
        if folder.is_dir() and folder.name not in with_masks:
            shutil.rmtree(folder)
    # No READY markers: the landing sensor leaves these drops to the test.
    for marker in landing.glob("*/READY"):
        marker.unlink()
    scanned_twice = "GC9001"
    first, broken = scan_key(scanned_twice, "2024-01-10"), scan_key(scanned_twice, "2024-04-02")
    for timepoint in ("2024-01-10", "2024-04-02"):
        (landing / scanned_twice / "ct" / timepoint).mkdir(parents=True)
    # A NIfTI cut short (the demo's own drops are DICOM series): its error names the one file.
    ct_bytes = nifti_bytes(make_ct(plans[0], spec)[0])
    (landing / scanned_twice / "ct" / "2024-01-10" / "ct.nii.gz").write_bytes(ct_bytes)
    (landing / scanned_twice / "ct" / "2024-04-02" / "ct.nii.gz").write_bytes(ct_bytes[: len(ct_bytes) // 3])

    home = prepare_dagster_home(root / "dagster_home")
    env = _environment(root, home)
    with scoped_environment(env):
        defs = build_definitions("local", "demo")
        job = defs.resolve_implicit_global_asset_job_def()
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions(patients_partitions.name, [*with_masks, scanned_twice])
            # the radiology assets' partitions: each drop's only CT scan, keyed by its patient id, and
            # GC9001's two timepoints
            instance.add_dynamic_partitions(ct_scans_partitions.name, [*with_masks, first, broken])

            def run(patient: str, *assets: str, succeed: bool = True) -> None:
                result = job.execute_in_process(
                    instance=instance, partition_key=patient, raise_on_error=False,
                    asset_selection=[dg.AssetKey(name) for name in assets])
                assert result.success is succeed, (patient, assets, result.all_events[-3:])

            # one run per partition set: a run's assets share theirs
            run(with_masks[0], "ct_image", "ct_mask", "radiomics_row")
            run(with_masks[0], "patch_coords", "uni_features")
            run(with_masks[1], "ct_image", "ct_mask")
            run(with_masks[1], "patch_coords", "uni_features")
            run(first, "ct_image")
            run(broken, "ct_image", succeed=False)
    return Cohort(root, home, env, (with_masks[0], with_masks[1]), broken)


def stop_sensors(cohort: Cohort) -> None:
    """The automation sensors run by default; these tests launch everything themselves."""
    dagster = Path(sys.executable).parent / "dagster"
    for name in SENSORS:
        subprocess.run([str(dagster), "sensor", "stop", name, "-w", str(WORKSPACE)], cwd=PROJECT_ROOT,
                       env={**os.environ, **cohort.env}, check=True, capture_output=True, timeout=120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Webserver:
    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self) -> None:
        """Stop the server by the process id it was started with."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_webserver(cohort: Cohort, log_path: Path, timeout_s: float = 180) -> Webserver:
    import urllib.request

    port = free_port()
    executable = Path(sys.executable).parent / "dagster-webserver"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(executable), "-h", "127.0.0.1", "-p", str(port), "-w", str(WORKSPACE)], cwd=PROJECT_ROOT,
            env={**os.environ, **cohort.env}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = Webserver(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5):
                return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"dagster-webserver did not come up; its log {log_path}:\n"
                                   + log_path.read_text(encoding="utf-8", errors="replace")[-3000:]) from None
            time.sleep(1)


def start_cohort_daemon(cohort: Cohort) -> Daemon:
    return start_daemon(cohort.home, cohort.root / "daemon.log", env=cohort.env)
