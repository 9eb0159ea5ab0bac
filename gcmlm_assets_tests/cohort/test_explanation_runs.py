"""Which patients risk_explanations_sensor explains, and the runs over ranges of patients that do it.

A real Dagster instance throughout: the sensor is evaluated against it, and each run it asks for is
executed with the request's own tags (a range of the `patients` partitions, or one partition), as
the daemon would launch it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import explanation_assets
from gcmlm_assets.catalogue import RISK_EXPLANATIONS, SCORES_FILE
from gcmlm_assets.cohort.explain.explanation_keys import read_patient_rows, row_digests
from gcmlm_assets.cohort.explanation_sensors import build_risk_explanations_sensor, recorded_explanation_keys
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.demo.watch import unexplained
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.patient_batches import BUCKET_TAG, PATIENTS_TAG
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.cohort.explained_cohort import QUICK, write_patch_features, write_patient_files
from gcmlm_assets_tests.support.cohort.synthetic import make_cohort, write_clinical_csv
from gcmlm_assets_tests.support.cohort.upstream import add_patients, report_sound_results

EXPLANATIONS = RISK_EXPLANATIONS.key
FIRST, NEW = 12, 3  # labelled patients of the first refresh; unlabelled patients dropped later
BATCH = 13  # patients per bucket after the first refresh: P000-P012, P013-P014


def test_a_row_hashes_the_same_alone_as_in_its_table():
    table = pa.table({"patient_id": ["A", "B", "C"], "n": pa.array([1, None, 3], pa.int64()),
                      "flag": pa.array([True, None, False]), "x": pa.array([0.5, float("nan"), None], pa.float32()),
                      "note": ["a", None, "c"]})
    whole = row_digests(table)
    assert len(set(whole)) == 3
    assert [row_digests(table.slice(i, 1))[0] for i in range(3)] == whole  # a null in a neighbour changes nothing
    changed = table.set_column(1, "n", pa.array([1, 0, 3], pa.int64()))  # B's null becomes 0: only B's digest
    assert [a == b for a, b in zip(row_digests(changed), whole)] == [True, False, True]
    reordered = table.select(["x", "note", "patient_id", "flag", "n"])
    assert row_digests(reordered) == whole


def _sensor():
    return build_risk_explanations_sensor(30, EXPLANATIONS, "risk_scores", SCORES_FILE.name, runs_per_tick=2)


def _tick(sensor, instance, storage, cursor):
    with dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor) as context:
        return sensor(context)


def _all_ticks(sensor, instance, storage, cursor) -> tuple[list[dg.RunRequest], str]:
    """Every run the sensor asks for, tick after tick, until it skips."""
    requests = []
    while True:
        result = _tick(sensor, instance, storage, cursor)
        if isinstance(result, dg.SkipReason) or not result.run_requests:
            return requests, result.cursor if isinstance(result, dg.SensorResult) else cursor
        assert len(result.run_requests) <= 2  # runs_per_tick
        requests += result.run_requests
        cursor = result.cursor


def _patients(request: dg.RunRequest, partitions: list[str]) -> list[str]:
    """The partitions a request's run covers."""
    if request.partition_key is not None:
        return [request.partition_key]
    span = request.partition_key_range
    return partitions[partitions.index(span.start):partitions.index(span.end) + 1]


def _execute(instance, resources, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    assets = [*cohort_assets.ASSETS, *explanation_assets.ASSETS]
    result = dg.materialize(assets, instance=instance, resources=resources, selection=[EXPLANATIONS],
                            partition_key=request.partition_key, tags=request.tags)
    assert result.success
    return result


def _materialized(instance, run_id: str) -> dict[str, dict]:
    """{patient: metadata} of the explanations a run materialized."""
    found = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        event = entry.dagster_event
        materialization = event.step_materialization_data.materialization
        found[event.partition] = {k: v.value for k, v in materialization.metadata.items()}
    return found


def _scores(store: ArtifactStore) -> dict[str, dict]:
    return {row["patient_id"]: row for row in pq.read_table(store.root / "risk_scores/scores.parquet").to_pylist()}


@pytest.fixture
def cohort(data_root: Path, instance):
    """FIRST labelled patients known to Dagster; NEW more with files and clinical rows, unlabelled, not yet."""
    ids, labels, radiomics, pathology = make_cohort(FIRST + NEW, seed=4)
    store = ArtifactStore(data_root / "artifacts")
    write_patient_files(store, ids, radiomics, pathology)
    write_clinical_csv(data_root / "landing", ids, labels, unknown=set(ids[FIRST:]))
    add_patients(instance, ids[:FIRST])
    report_sound_results(instance, store.root, ids[:FIRST])
    return ids, store, pathology


def test_only_patients_whose_key_changed_are_explained_in_ranges(cohort, instance, base_resources, monkeypatch):
    ids, store, pathology = cohort
    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", str(FIRST))
    resources = {**base_resources, "risk_model": RiskModelSettings(**QUICK, abmil_in_ablation=False)}
    storage, sensor = base_resources["storage"], _sensor()
    assert dg.materialize(cohort_assets.ASSETS, instance=instance, resources=resources).success
    scores = _scores(store)
    [model_version] = {row["model_version"] for row in scores.values()}
    assert model_version == json.loads((store.root / "risk_model/current.json").read_text(encoding="utf-8"))["version"]

    # First scores: everyone, in one run over the range of all patients (batches of FIRST here);
    # each patient is materialized on its own, with its own metadata and key.
    [request], cursor = _all_ticks(sensor, instance, storage, None)
    assert (request.partition_key_range.start, request.partition_key_range.end) == (ids[0], ids[FIRST - 1])
    explained = _materialized(instance, _execute(instance, resources, request).run_id)
    assert sorted(explained) == ids[:FIRST]
    for patient_id, meta in explained.items():
        assert meta["probability"] == pytest.approx(scores[patient_id]["probability"], abs=1e-12)
        assert meta["risk_model_version"] == model_version
        assert Path(meta["explanation_path"]).parent.parent.name == patient_id
    recorded = recorded_explanation_keys(instance, EXPLANATIONS)
    assert recorded == {p: scores[p]["explanation_key"] for p in ids[:FIRST]}
    assert unexplained(instance) == set()

    # NEW unlabelled patients arrive and one patient's patch features change; the installed model
    # scores them (fused_table and risk_scores only: nothing refits the model here).
    changed_patient = ids[5]
    write_patch_features(store, changed_patient, pathology[5, :48].astype(np.float64) * 3 + 0.5,
                         np.random.default_rng(99))
    add_patients(instance, ids[FIRST:])
    report_sound_results(instance, store.root, [changed_patient, *ids[FIRST:]])
    assert dg.materialize(cohort_assets.ASSETS, instance=instance, resources=resources,
                          selection=["fused_table", "risk_scores"]).success
    new_scores = _scores(store)
    assert {p for p in new_scores if new_scores[p]["explanation_key"] != scores.get(p, {}).get("explanation_key")} == {
        changed_patient, *ids[FIRST:]}
    assert unexplained(instance) == {changed_patient, *ids[FIRST:]}

    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", str(BATCH))
    before = _tick(sensor, instance, storage, cursor)
    requests, cursor_after = _all_ticks(sensor, instance, storage, cursor)
    changed = [changed_patient, *ids[FIRST:]]
    assert len(requests) == 2  # one run per bucket with a changed patient
    assert [r.run_key for r in requests] == [r.run_key for r in before.run_requests]  # the same tick, the same keys
    partitions = list(instance.get_dynamic_partitions(patients_partitions.name))
    spans = [_patients(r, partitions) for r in requests]
    assert spans == [partitions[5:FIRST + 1], changed[2:]]
    assert requests[0].tags["dagster/asset_partition_range_start"] == changed_patient
    # the range holds unchanged patients, so the run names its own; the second covers its whole range
    assert requests[0].tags[PATIENTS_TAG] == ",".join(changed[:2]) and PATIENTS_TAG not in requests[1].tags
    assert [r.tags[BUCKET_TAG] for r in requests] == [f"{BATCH}:0", f"{BATCH}:1"]
    assert all(r.tags["gcmlm/work"] == "explanations" for r in requests)

    # The first range spans the unchanged patients between: they are skipped without an event.
    run = _execute(instance, resources, requests[0])
    explained = _materialized(instance, run.run_id)
    assert sorted(explained) == sorted(changed[:2])
    for patient_id, meta in explained.items():
        assert meta["probability"] == pytest.approx(new_scores[patient_id]["probability"], abs=1e-12)
    skipped = [p for p in spans[0] if p not in changed]
    assert skipped == ids[6:FIRST]
    assert not (set(_materialized(instance, run.run_id)) & set(skipped))
    counts = {p: len(instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(EXPLANATIONS), asset_partitions=[p]), limit=10).records) for p in skipped}
    assert set(counts.values()) == {1}  # the first refresh's only
    status = instance.get_status_by_partition(dg.AssetKey(EXPLANATIONS), spans[0], patients_partitions)
    assert {str(s.value) for s in status.values()} == {"MATERIALIZED"}  # the skipped ones stay green
    _execute(instance, resources, requests[1])
    assert unexplained(instance) == set()

    # Scores again with nothing changed: no run, and the tick says why.
    assert dg.materialize(cohort_assets.ASSETS, instance=instance, resources=resources,
                          selection=["risk_scores"]).success
    result = _tick(sensor, instance, storage, cursor_after)
    assert not result.run_requests and "no explanation to update" in result.skip_reason.skip_message

    # A new model version: everyone is explained again, in ranges of BATCH.
    refit = {**resources, "risk_model": RiskModelSettings(**QUICK, abmil_in_ablation=False, l1_c=0.5)}
    assert dg.materialize(cohort_assets.ASSETS, instance=instance, resources=refit,
                          selection=["risk_model", "risk_scores"]).success
    assert {row["model_version"] for row in _scores(store).values()} != {model_version}
    requests, _ = _all_ticks(sensor, instance, storage, result.cursor)
    assert len(requests) == math.ceil(len(ids) / BATCH)
    assert [p for r in requests for p in _patients(r, partitions)] == partitions

    # A range may span a patient the fused table does not have (not processed yet, or left out):
    # that patient is skipped like an unchanged one, and the others are explained.
    add_patients(instance, ["NOFEATURES"])
    span = dg.RunRequest(tags={"dagster/asset_partition_range_start": ids[-1],
                               "dagster/asset_partition_range_end": "NOFEATURES"})
    assert sorted(_materialized(instance, _execute(instance, refit, span).run_id)) == [ids[-1]]


def test_a_runs_rows_are_read_at_once_and_hash_as_in_the_whole_table(tmp_path):
    table = pa.table({"patient_id": ["A", "B", "C"], "has_pathology": [True, False, True], "v": [1.0, 2.0, 3.0]})
    pq.write_table(table, tmp_path / "fused.parquet")
    rows = read_patient_rows(tmp_path / "fused.parquet", ["C", "A"])
    assert sorted(rows.column("patient_id").to_pylist()) == ["A", "C"]
    assert dict(zip(rows.column("patient_id").to_pylist(), row_digests(rows))) == {
        "A": row_digests(table)[0], "C": row_digests(table)[2]}
