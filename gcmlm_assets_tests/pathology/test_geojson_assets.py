"""The `qupath_geojson` asset through a real Dagster instance, on the real slide's patch_coords, and
the sensors that request it: the grid alone, then with an explanation's patch values, reuse, a
stale explanation, a patient without slides, and range runs."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from gcmlm_assets.catalogue import PATCHES_FILE, QUPATH_GEOJSON, RISK_EXPLANATIONS, SCORES_FILE, SLIDE_LISTING
from gcmlm_assets.cohort.explanation_sensors import build_risk_explanations_sensor
from gcmlm_assets.pathology.assets import patch_coords
from gcmlm_assets.pathology.coords_h5 import read_coords_h5
from gcmlm_assets.pathology.geojson_assets import qupath_geojson
from gcmlm_assets.pathology.resources import TilingSettings
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.storage import ArtifactStore, new_version_folder, publish_version, sha256_file
from gcmlm_assets_tests.support.pathology.patch_values import SMALL_REGION_NAME, write_patch_values
from gcmlm_assets_tests.support.pathology.slide_fixtures import copy_into, real_slide

VALUE_COLUMNS = ("attention", "contribution_fused_logit", "contribution_pathology_logit")


def _resources(base_resources: dict) -> dict:
    return {**base_resources, "pathology": TilingSettings()}


def _tiled(instance, base_resources, data_root: Path, test_data: Path, *patients: str) -> ArtifactStore:
    """patch_coords of the real slide for each patient, materialized through Dagster."""
    instance.add_dynamic_partitions(patients_partitions.name, list(patients))
    for patient_id in patients:
        copy_into(real_slide(test_data), data_root / "landing" / patient_id / "wsi")
        assert dg.materialize([patch_coords], partition_key=patient_id, instance=instance,
                              resources=_resources(base_resources)).success
    return ArtifactStore(data_root / "artifacts")


def _geojson(instance, base_resources, patient_id: str | None = None, tags: dict | None = None):
    return dg.materialize([qupath_geojson], partition_key=patient_id, instance=instance,
                          resources=_resources(base_resources), tags=tags)


def _explain(store: ArtifactStore, patient_id: str, coords: np.ndarray) -> Path:
    """Publish an explanation version holding a patch file for `coords`, as risk_explanations does."""
    root = RISK_EXPLANATIONS.folder(store, patient_id)
    staging = new_version_folder(root)
    write_patch_values(PATCHES_FILE.in_folder(staging), coords)
    pointer = publish_version(root, staging, {"explanation_key": "test"})
    return PATCHES_FILE.in_folder(root / pointer["version"])


def _grid(store: ArtifactStore, patient_id: str) -> tuple[dict, np.ndarray]:
    listing = json.loads(SLIDE_LISTING.path(store, patient_id).read_text(encoding="utf-8"))
    return listing, read_coords_h5(listing["slides"][0]["h5"]).coords


def _tiles(path: Path) -> list[dict]:
    collection = json.loads(path.read_text(encoding="utf-8"))
    return [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]


def _only(result: dg.ExecuteInProcessResult) -> tuple[dict, str, dict]:
    [event] = result.get_asset_materialization_events()
    materialization = event.materialization
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return ({k: v.value for k, v in materialization.metadata.items()},
            materialization.tags["dagster/data_version"], checks)


def test_grid_first_then_the_explanations_values_then_reused(instance, base_resources, data_root, test_data):
    store = _tiled(instance, base_resources, data_root, test_data, "P001")
    listing, grid = _grid(store, "P001")
    side = listing["slides"][0]["patch_size_level0"]
    path = QUPATH_GEOJSON.folder(store, "P001") / f"{SMALL_REGION_NAME}.geojson"

    # Not explained yet: tissue and the grid, said so.
    metadata, grid_version, checks = _only(_geojson(instance, base_resources, "P001"))
    assert metadata["n_slides"] == 1 and metadata["n_tiles"] == len(grid) and metadata["tiles_with_values"] == 0
    assert "not been explained yet" in metadata["values"] and metadata["measurements"] == "none"
    assert metadata["geojson_files"] == [str(path)] and "QuPath" in metadata["how_to_open"]
    assert checks["geojson_matches_grid"].passed
    tiles = _tiles(path)
    assert np.array_equal(np.array([t["geometry"]["coordinates"][0][0] for t in tiles]), grid)
    assert all("measurements" not in t["properties"] for t in tiles)
    assert tiles[0]["geometry"]["coordinates"][0][2] == [int(grid[0][0]) + side, int(grid[0][1]) + side]

    # Explained: every tile carries the parquet's values for its patch, exactly.
    values = _explain(store, "P001", grid)
    metadata, values_version, checks = _only(_geojson(instance, base_resources, "P001"))
    assert metadata["tiles_with_values"] == len(grid) and metadata["reused"] is False
    assert metadata["measurements"] == ", ".join(VALUE_COLUMNS)
    assert metadata["patch_values_path"] == str(values) and checks["geojson_matches_grid"].passed
    assert values_version != grid_version
    rows = {(r["x"], r["y"]): r for r in pq.read_table(values).to_pylist()}
    for tile in _tiles(path):
        x, y = tile["geometry"]["coordinates"][0][0]
        assert tile["properties"]["measurements"] == {name: rows[(x, y)][name] for name in VALUE_COLUMNS}

    # Nothing changed: the files are reused, byte for byte, with the same data version.
    before = sha256_file(path)
    metadata, again_version, checks = _only(_geojson(instance, base_resources, "P001"))
    assert metadata["reused"] is True and again_version == values_version and sha256_file(path) == before
    assert checks["geojson_matches_grid"].passed


def test_an_explanation_of_another_tiling_leaves_the_grid_alone(instance, base_resources, data_root, test_data):
    store = _tiled(instance, base_resources, data_root, test_data, "P001")
    _, grid = _grid(store, "P001")
    _explain(store, "P001", grid + np.array([1, 0]))  # made before the slide was tiled again
    metadata, _, checks = _only(_geojson(instance, base_resources, "P001"))
    assert metadata["tiles_with_values"] == 0 and "another tiling" in metadata["values"]
    assert checks["geojson_matches_grid"].passed


def test_a_patient_without_slides_is_skipped_and_a_range_writes_each_patient(instance, base_resources, data_root,
                                                                              test_data):
    store = _tiled(instance, base_resources, data_root, test_data, "P001", "P002")
    instance.add_dynamic_partitions(patients_partitions.name, ["P003"])  # no slides
    skipped = _geojson(instance, base_resources, "P003")
    assert skipped.success and not skipped.get_asset_materialization_events()
    assert not QUPATH_GEOJSON.folder(store, "P003", create=False).exists()

    # The follow-on sensor after a (range) run of explanations: one run over the range, the
    # GeoJSON only; each patient's materialization and check are its own.
    sensor = _geojson_sensor("qupath_geojson_after_risk_explanations_sensor")
    with dg.build_sensor_context(instance=instance) as context:
        cursor = sensor(context).cursor
    _, grid = _grid(store, "P001")
    for patient_id in ("P001", "P002", "P003"):
        _explain(store, patient_id, grid)
        instance.report_runless_asset_event(dg.AssetMaterialization(RISK_EXPLANATIONS.key, partition=patient_id))
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        [request] = sensor(context).run_requests
    assert request.asset_selection == [dg.AssetKey(QUPATH_GEOJSON.key)]
    assert (request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]) \
        == ("P001", "P003")
    result = _geojson(instance, base_resources, tags=request.tags)
    assert result.success
    made = {e.partition: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert sorted(made) == ["P001", "P002"]  # P003 has no slides: skipped, the run still succeeds
    assert all(m["tiles_with_values"].value == len(grid) for m in made.values())
    checked = {e.partition: e.passed for e in result.get_asset_check_evaluations()
               if e.partition is not None}
    assert checked == {"P001": True, "P002": True}


def _geojson_sensor(name: str) -> dg.SensorDefinition:
    from gcmlm_assets.definitions import FOLLOW_ON_SENSORS
    from gcmlm_assets.patient_steps import build_patient_steps_sensor

    chain, work = FOLLOW_ON_SENSORS[name]
    return build_patient_steps_sensor(name, chain, work, 30)


@pytest.mark.parametrize("batch, carried", [(1, True), (3, False)])
def test_a_one_patient_explanation_run_carries_the_geojson_on(instance, data_root, monkeypatch, batch, carried):
    """risk_explanations_sensor selects the GeoJSON in a one-patient run (which chains its steps),
    not in a range run (which cannot: the steps sensor above follows it)."""
    import pyarrow as pa

    from gcmlm_assets.resources import ArtifactStorage

    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", str(batch))
    patients = ["P001", "P002", "P003"]
    instance.add_dynamic_partitions(patients_partitions.name, patients)
    store = ArtifactStore(data_root / "artifacts")
    scores = store.path("risk_scores", None, SCORES_FILE.name)
    scores.parent.mkdir(parents=True)
    pq.write_table(pa.table({"patient_id": patients, "explanation_key": ["k1", "k2", "k3"]}), scores)
    instance.report_runless_asset_event(dg.AssetMaterialization("risk_scores"))
    sensor = build_risk_explanations_sensor(30, RISK_EXPLANATIONS.key, "risk_scores", SCORES_FILE.name,
                                            carried_on=[QUPATH_GEOJSON.key])
    with dg.build_sensor_context(instance=instance, resources={"storage": ArtifactStorage(root=str(store.root))}) \
            as context:
        requests = sensor(context).run_requests
    assert len(requests) == (3 if carried else 1)
    expected = [RISK_EXPLANATIONS.key, QUPATH_GEOJSON.key] if carried else [RISK_EXPLANATIONS.key]
    assert all(r.asset_selection == [dg.AssetKey(k) for k in expected] for r in requests)


def test_the_definitions_wire_the_geojson_to_its_sensors():
    from gcmlm_assets.definitions import build_definitions

    defs = build_definitions("local", "demo")
    explain = defs.get_sensor_def("risk_explanations_sensor")
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey(QUPATH_GEOJSON.key) in explain.asset_selection.resolve(graph)
    for name in ("qupath_geojson_after_patch_coords_sensor", "qupath_geojson_after_risk_explanations_sensor"):
        assert defs.get_sensor_def(name).asset_selection.resolve(graph) == {dg.AssetKey(QUPATH_GEOJSON.key)}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey(QUPATH_GEOJSON.key)).parent_keys} == {
        "patch_coords", RISK_EXPLANATIONS.key}
