"""ln_patch_coords and ln_features: the lymph-node slides of `ln_wsi/` through the same tiling and encoder
as the primary tumour's, as the definitions declare them, on a real instance with the demo profile's
tiny random encoder."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pytest

from gcmlm_assets.catalogue import (
    LN_FEATURES, LN_PATCH_COORDS, LN_SLIDE_LISTING, LN_TILING_PICTURE, PATCH_COORDS, UNI_FEATURES)
from gcmlm_assets.definitions import build_definitions
from gcmlm_assets.landing.scan import LN_WSI_FOLDER, WSI_FOLDER
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.pathology.features import materialize_patient
from gcmlm_assets_tests.support.pathology.slide_fixtures import real_tissue_rgb, truncated_copy, write_pyramid_tiff


@pytest.fixture(scope="module")
def demo_defs() -> dg.Definitions:
    return build_definitions("local", "demo")


@pytest.fixture
def resources(base_resources: dict, demo_defs: dg.Definitions) -> dict:
    return {**base_resources, "pathology": demo_defs.resources["pathology"], "encoder": demo_defs.resources["encoder"]}


def assets(defs: dg.Definitions, *entries) -> list[dg.AssetsDefinition]:
    return [defs.get_assets_def(entry.key) for entry in entries]


def small_slide(test_data: Path, path: Path) -> Path:
    """A 1024 px square of real tissue at 0.5 µm/px: a few patches, tiled and encoded in a second or two."""
    return write_pyramid_tiff(path, np.ascontiguousarray(real_tissue_rgb(test_data)[512:1536, 512:1536]), mpp=0.5,
                              downsamples=(1, 4))


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    [event] = result.get_step_failure_events()
    error = event.step_failure_data.error
    return error.message + (error.cause.message if error.cause else "")


def folder_digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_lymph_node_slides_are_tiled_and_encoded_beside_the_primary_ones(instance, resources, demo_defs, data_root,
                                                                          test_data):
    drop = data_root / "landing" / "P001"
    small_slide(test_data, drop / WSI_FOLDER / "primary.tiff")
    node = small_slide(test_data, drop / LN_WSI_FOLDER / "node_a.tiff")
    artifacts = data_root / "artifacts"
    primary = materialize_patient(instance, assets(demo_defs, PATCH_COORDS), resources, "P001")
    assert primary.success
    primary_files = folder_digests(artifacts / PATCH_COORDS.key / "P001")

    result = materialize_patient(instance, assets(demo_defs, LN_PATCH_COORDS, LN_FEATURES), resources, "P001")
    assert result.success
    assert {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()} == {
        LN_PATCH_COORDS.key, LN_FEATURES.key}
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 8 and all(e.passed for e in evaluations)
    assert {e.asset_key.to_user_string() for e in evaluations} == {LN_PATCH_COORDS.key, LN_FEATURES.key}

    coords_dir = artifacts / LN_PATCH_COORDS.key / "P001"
    listing = json.loads(LN_SLIDE_LISTING.in_folder(coords_dir).read_text(encoding="utf-8"))
    [entry] = listing["slides"]
    assert entry["file"] == node.name and entry["slide_path"] == str(node) and entry["n_patches"] > 0
    assert entry["h5"] == str(coords_dir / "node_a.h5") and LN_TILING_PICTURE.in_folder(coords_dir).is_file()
    with h5py.File(coords_dir / "node_a.h5", "r") as fh:
        tiled = fh["coords"][()]
    with h5py.File(artifacts / LN_FEATURES.key / "P001" / "node_a.h5", "r") as fh:
        features, coords = fh["features"][()], fh["coords"][()]
        assert fh.attrs["encoder"] == "vit-tiny-random"
    assert features.shape == (len(tiled), 192) and sorted(map(tuple, coords)) == sorted(map(tuple, tiled))
    metadata = {e.asset_key.to_user_string(): e.materialization.metadata
                for e in result.get_asset_materialization_events()}
    assert metadata[LN_PATCH_COORDS.key]["listing"].value == str(LN_SLIDE_LISTING.in_folder(coords_dir))
    assert metadata[LN_FEATURES.key]["n_patches"].value == len(tiled)

    # The primary tumour's outputs are as they were: nothing of the lymph-node run lands there.
    assert folder_digests(artifacts / PATCH_COORDS.key / "P001") == primary_files
    assert not (artifacts / UNI_FEATURES.key / "P001").exists()
    graph = demo_defs.resolve_asset_graph()
    for entry in (LN_PATCH_COORDS, LN_FEATURES):
        assert f"`<landing>/<patient>/{LN_WSI_FOLDER}/`" in graph.get(dg.AssetKey(entry.key)).description


def test_a_patient_without_lymph_node_slides_fails_naming_the_folder(instance, resources, demo_defs, data_root,
                                                                     test_data):
    small_slide(test_data, data_root / "landing" / "P002" / WSI_FOLDER / "primary.tiff")
    result = materialize_patient(instance, assets(demo_defs, LN_PATCH_COORDS), resources, "P002")
    assert not result.success
    message = failure_message(result)
    assert "P002" in message and str(data_root / "landing" / "P002" / LN_WSI_FOLDER) in message
    assert not (data_root / "artifacts" / LN_PATCH_COORDS.key / "P002").exists()


def test_a_bad_lymph_node_slide_is_named_and_nothing_is_written(instance, resources, demo_defs, data_root,
                                                                test_data):
    nodes = data_root / "landing" / "P003" / LN_WSI_FOLDER
    good = small_slide(test_data, nodes / "node_a.tiff")
    truncated_copy(good, nodes / "node_b.tiff", fraction=0.3)
    result = materialize_patient(instance, assets(demo_defs, LN_PATCH_COORDS), resources, "P003")
    assert not result.success
    assert "node_b.tiff" in failure_message(result) and "1 unusable slide(s)" in failure_message(result)
    [opened] = [e for e in result.get_asset_check_evaluations() if e.check_name == "slides_open"]
    assert not opened.passed and opened.asset_key.to_user_string() == LN_PATCH_COORDS.key
    folder = data_root / "artifacts" / LN_PATCH_COORDS.key / "P003"
    assert not folder.exists() or not any(folder.glob("*.h5"))
