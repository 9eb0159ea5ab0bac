"""A small synthetic cohort through the real Dagster instance, as `make demo` runs it:
landing_sensor -> partitions and runs -> every per-patient asset, a tiny nnU-Net trained on the
reference masks, the cohort assets -> risk_scores; then the sensor's next tick and a second demo
find nothing to do."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.definitions import build_definitions
from gcmlm_assets.demo import runner, synthetic

N_PATIENTS = 8
PER_PATIENT = runner.PER_PATIENT_ASSETS

# The demo's settings, made smaller still so that each asset takes seconds.
TEST_RESOURCE_CONFIG = {
    **runner.DEMO_RESOURCE_CONFIG,
    "risk_model": {**runner.DEMO_RESOURCE_CONFIG.get("risk_model", {}),
                   "n_repeats": 2, "n_bootstrap": 200, "min_labelled_per_class": 3},
}


@pytest.fixture
def demo_run(data_root: Path, instance: dg.DagsterInstance):
    defs = build_definitions("local")
    log: list[str] = []
    result = runner.run_demo(
        spec=synthetic.CohortSpec.small(N_PATIENTS), instance=instance, defs=defs,
        landing=data_root / "landing", artifacts=data_root / "artifacts", home=data_root / "dagster_home",
        executor="in_process", real=None, resource_config=TEST_RESOURCE_CONFIG, say=log.append)
    return defs, result, log


@pytest.mark.slow
def test_small_cohort_from_landing_zone_to_risk_scores(demo_run, instance, data_root):
    defs, result, log = demo_run
    assert result.failed_runs == [], "\n".join(log)
    patients = [f"GC{i:04d}" for i in range(1, N_PATIENTS + 1)]
    summary = result.summary
    assert summary["patients"] == patients

    # Every run the sensor asked for was launched, with the daemon's tags, in the instance.
    sensor_runs = instance.get_runs(filters=dg.RunsFilter(tags={runner.SENSOR_NAME_TAG: runner.SENSOR_NAME}))
    assert len(sensor_runs) == result.requested == 2 * N_PATIENTS
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in sensor_runs)
    assert {run.tags[runner.RUN_KEY_TAG].split(":")[0] for run in sensor_runs} == set(patients)

    for name in PER_PATIENT:
        assert summary["assets"][name] == {"materialized": N_PATIENTS, "failed": 0, "missing": 0}, name
        materialized = instance.get_materialized_partitions(dg.AssetKey(name))
        assert materialized == set(patients), name
    for name in (runner.SEGMENTATION_ASSET, *runner.COHORT_ASSETS):
        assert instance.get_latest_materialization_event(dg.AssetKey(name)) is not None, name

    # Masks: reference where the landing zone had one, predicted by the trained model elsewhere.
    plans = {p.patient_id: p for p in synthetic.plan_cohort(synthetic.CohortSpec.small(N_PATIENTS))}
    sources = {}
    for pid in patients:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("ct_mask"), asset_partitions=[pid]), limit=1).records
        sources[pid] = records[0].asset_materialization.metadata["source"].value
    assert sources == {pid: "reference" if plans[pid].has_reference_mask else "predicted" for pid in patients}

    # Checks were evaluated and recorded per partition for every per-patient asset.
    checked_assets = {name.split(":")[0] for name in summary["checks"]}
    assert set(PER_PATIENT) <= checked_assets
    for name, counts in summary["checks"].items():
        if name.split(":")[0] in PER_PATIENT:
            assert sum(counts.values()) == N_PATIENTS, name
    assert not [f for f in summary["check_failures"] if f.endswith("(error)")], summary["check_failures"]

    # Every patient is scored, with a probability in [0, 1].
    scores = pq.read_table(summary["risk_scores"]["path"]).to_pylist()
    assert sorted(row["patient_id"] for row in scores) == patients
    assert all(0.0 <= row["probability"] <= 1.0 for row in scores)
    rows = runner.ablation_rows(summary["risk_model"])
    assert {"radiology", "pathology", "fused"} <= {row[0] for row in rows}

    # The sensor's next tick (cursor from the instance) finds nothing new.
    added, requests, _ = runner.tick_landing_sensor(instance, defs, runner.load_cursor(instance))
    assert added == [] and requests == []


@pytest.mark.slow
def test_second_demo_launches_nothing(demo_run, instance, data_root):
    defs, first, _ = demo_run
    assert first.failed_runs == []
    runs_before = len(instance.get_runs())
    log: list[str] = []
    second = runner.run_demo(
        spec=synthetic.CohortSpec.small(N_PATIENTS), instance=instance, defs=defs,
        landing=data_root / "landing", artifacts=data_root / "artifacts", home=data_root / "dagster_home",
        executor="in_process", real=None, resource_config=TEST_RESOURCE_CONFIG, say=log.append)
    assert second.cohort.written == [] and second.cohort.unchanged == N_PATIENTS
    assert second.requested == 0 and second.outcomes == [], "\n".join(log)
    assert len(instance.get_runs()) == runs_before
