"""The production instance's storage (deploy/k8s/dagster.yaml) on a real PostgreSQL, written by two
processes at once.

Two Python processes (this module run as a script) materialize ct_image for different patients at the
same moment through `DagsterInstance.get()` on a DAGSTER_HOME whose dagster.yaml is the production
file's `storage:` section; this process then reads the runs, materializations and check evaluations
back from the database. The run launcher and coordinator are left out: they need a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
K8S_INSTANCE = PROJECT_ROOT / "deploy" / "k8s" / "dagster.yaml"
WORKER_TAG = "gcmlm/test-worker"
WORKERS = {
    "worker-a": ["PGA001", "PGA002", "PGA003"],
    "worker-b": ["PGB001", "PGB002", "PGB003"],
}
CT_SIZE = (32, 32, 16)
CT_SPACING = (0.8, 0.8, 2.5)
BARRIER_TIMEOUT_S = 60.0


def write_synthetic_ct(path: Path, seed: int) -> None:
    """A small int16 CT in HU: air around a soft-tissue cylinder with a fat rim, some noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = CT_SIZE
    y, x = np.mgrid[:ny, :nx]
    radius = np.hypot(x - nx / 2, y - ny / 2)
    plane = np.where(radius < 11, 40.0, np.where(radius < 13, -100.0, -1000.0))
    volume = np.repeat(plane[None], nz, axis=0) + rng.normal(0.0, 10.0, (nz, ny, nx))
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(CT_SPACING)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _instance_home(home: Path) -> None:
    """DAGSTER_HOME/dagster.yaml holding only the production instance's storage section."""
    production = yaml.safe_load(K8S_INSTANCE.read_text(encoding="utf-8"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": production["storage"]}))


def _wait_for(paths: list[Path], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not all(p.exists() for p in paths):
        exited = [p for p in processes if p.poll() is not None]
        if exited:
            out, err = exited[0].communicate()
            pytest.fail(f"a worker exited before the start signal (rc {exited[0].returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"workers not ready after {BARRIER_TIMEOUT_S} s")
        time.sleep(0.05)


def test_two_processes_materialize_patients_into_the_production_postgres_storage(postgres_database, tmp_path,
                                                                                  monkeypatch):
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    from gcmlm_assets.radiology import checks

    home, landing, artifacts, barrier = (tmp_path / name for name in ("dagster_home", "landing", "artifacts",
                                                                      "barrier"))
    _instance_home(home)
    barrier.mkdir()
    patients = [p for ids in WORKERS.values() for p in ids]
    for seed, patient in enumerate(patients):
        write_synthetic_ct(landing / patient / "ct" / "ct.nii.gz", seed)
    # This process and both workers: the test server's fresh database, the storage-only DAGSTER_HOME.
    overrides = {**postgres_database.env(), "DAGSTER_HOME": str(home), "GCMLM_DATA_ROOT": str(tmp_path / "data")}
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    env = {**os.environ, **overrides}

    with dg.DagsterInstance.get() as instance:
        # The production storage section, resolved against the test server: tables made, partitions known.
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert instance.get_runs() == []
        instance.add_dynamic_partitions("patients", patients)
        instance.add_dynamic_partitions("ct_scans", patients)  # each drop's only scan: the radiology partitions

        # Both workers load everything, say they are ready, and start materializing on one signal.
        started = time.monotonic()
        workers = {
            name: subprocess.Popen(
                [sys.executable, "-m", "gcmlm_assets_tests.deploy.test_postgres_instance", name, str(landing),
                 str(artifacts), str(barrier), *ids],
                cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, ids in WORKERS.items()
        }
        try:
            _wait_for([barrier / f"{name}.ready" for name in WORKERS], list(workers.values()))
            (barrier / "go").touch()
            reports = {}
            for name, process in workers.items():
                out, err = process.communicate(timeout=120)
                assert process.returncode == 0, f"{name} failed (rc {process.returncode}):\n{out}\n{err}"
                reports[name] = json.loads(out.strip().splitlines()[-1])
        finally:
            for process in workers.values():
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        print(f"two workers done in {time.monotonic() - started:.1f} s")

        # Runs: every run of both processes is recorded, succeeded, for the partition that process ran.
        assert reports["worker-a"]["pid"] != reports["worker-b"]["pid"]
        run_of_patient: dict[str, str] = {}
        spans = {}
        for name, ids in WORKERS.items():
            records = instance.get_run_records(filters=dg.RunsFilter(tags={WORKER_TAG: name}))
            assert {r.dagster_run.run_id for r in records} == set(reports[name]["run_ids"])
            assert len(records) == len(ids)
            for record in records:
                assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
                partition = record.dagster_run.tags["dagster/partition"]
                assert partition in ids and partition not in run_of_patient, (name, partition)
                run_of_patient[partition] = record.dagster_run.run_id
            spans[name] = (min(r.start_time for r in records), max(r.end_time for r in records))
        assert sorted(run_of_patient) == sorted(patients)
        assert len(instance.get_runs()) == len(patients)
        # The two processes' runs overlapped in time: the writes really were concurrent.
        (a_start, a_end), (b_start, b_end) = spans.values()
        assert a_start < b_end and b_start < a_end, spans
        print("run spans, s from worker-a's first start:",
              {name: (round(first - a_start, 2), round(last - a_start, 2)) for name, (first, last) in spans.items()})

        # Materializations: exactly one per patient partition, from that patient's run, with its file.
        ct_key = dg.AssetKey("ct_image")
        assert instance.get_materialized_partitions(ct_key) == set(patients)
        materialization_of_patient: dict[str, int] = {}
        for patient in patients:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=ct_key, asset_partitions=[patient]), limit=10).records
            assert len(records) == 1, (patient, records)
            record = records[0]
            assert record.run_id == run_of_patient[patient]
            materialization_of_patient[patient] = record.storage_id
            metadata = record.asset_materialization.metadata
            path = Path(metadata["path"].path)
            assert path == artifacts / "ct_image" / patient / "ct.nii.gz" and path.is_file()
            assert metadata["size"].value == str(CT_SIZE)
            assert metadata["reused"].value is False
            assert metadata["input_files"].value == 1

        # Check evaluations: each of ct_image's checks ran once per patient, in that patient's run, on that
        # patient's materialization (not the other process's, written at the same moment), and passed. Each
        # result is stored under its patient (gcmlm_assets/batching.py); Dagster also keeps each run's plan
        # for the check under no partition, never evaluated.
        patient_of_run = {run_id: patient for patient, run_id in run_of_patient.items()}
        for spec in checks.CT_IMAGE_CHECK_SPECS:
            history = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(ct_key, spec.name), limit=100)
            evaluated = [e for e in history if e.partition is not None]
            assert all(e.status != AssetCheckExecutionRecordStatus.SUCCEEDED for e in history if e.partition is None)
            assert sorted(patient_of_run.get(e.run_id, e.run_id) for e in evaluated) == sorted(patients), spec.name
            for execution in evaluated:
                patient = patient_of_run[execution.run_id]
                assert execution.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (spec.name, patient)
                evaluation = execution.event.dagster_event.asset_check_evaluation_data
                assert evaluation.passed, (spec.name, patient, evaluation.metadata)
                assert evaluation.partition == execution.partition == patient
                target = evaluation.target_materialization_data
                assert target.run_id == execution.run_id, (spec.name, patient)
                assert target.storage_id == materialization_of_patient[patient], (spec.name, patient)


# ---------------------------------------------------------------- worker process


def _worker(name: str, landing: str, artifacts: str, barrier: str, patient_ids: list[str]) -> None:
    """Materialize ct_image for each patient, one run each, on the instance DAGSTER_HOME describes."""
    from gcmlm_assets.radiology.assets import ct_image
    from gcmlm_assets.resources import ArtifactStorage, LandingZone

    resources = {"storage": ArtifactStorage(root=artifacts), "landing": LandingZone(root=landing)}
    with dg.DagsterInstance.get() as instance:
        (Path(barrier) / f"{name}.ready").touch()
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while not (Path(barrier) / "go").exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: no start signal after {BARRIER_TIMEOUT_S} s")
            time.sleep(0.01)
        run_ids = []
        for patient in patient_ids:
            result = dg.materialize([ct_image], instance=instance, partition_key=patient, resources=resources,
                                    tags={WORKER_TAG: name})
            run_ids.append(result.run_id)  # materialize raises when the run fails
    print(json.dumps({"worker": name, "pid": os.getpid(), "run_ids": run_ids}))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
