"""The `patch_coords` asset through Dagster: real slides, real instance, its checks, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import openslide
import pytest

from gcmlm_assets.pathology.assets import patch_coords
from gcmlm_assets.pathology.resources import TilingSettings
from gcmlm_assets.storage import TMP_PREFIX, sha256_file
from gcmlm_assets_tests.support.pictures import PATIENT_LIMIT_BYTES, assert_ui_picture

from gcmlm_assets_tests.support.pathology.slide_fixtures import (
    blank_slide,
    copy_into,
    png_renamed,
    real_slide,
    real_tissue_rgb,
    truncated_copy,
    write_pyramid_tiff,
    zero_byte,
)


def materialize(instance, resources: dict, patient_id: str, **settings) -> dg.ExecuteInProcessResult:
    if patient_id not in instance.get_dynamic_partitions("patients"):
        instance.add_dynamic_partitions("patients", [patient_id])
    return dg.materialize([patch_coords], partition_key=patient_id, instance=instance,
                          resources={**resources, "pathology": TilingSettings(**settings)}, raise_on_error=False)


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failures = result.get_step_failure_events()
    assert failures, "expected the step to fail"
    error = failures[0].step_failure_data.error
    return error.message + (error.cause.message if error.cause else "")


def patient_folder(data_root: Path, patient_id: str) -> Path:
    return data_root / "artifacts" / "patch_coords" / patient_id


def wsi_dir(data_root: Path, patient_id: str) -> Path:
    return data_root / "landing" / patient_id / "wsi"


def test_real_slide_end_to_end(instance, base_resources, data_root: Path, test_data: Path):
    slide = copy_into(real_slide(test_data), wsi_dir(data_root, "P001"))
    result = materialize(instance, base_resources, "P001")
    assert result.success
    folder = patient_folder(data_root, "P001")
    listing = json.loads((folder / "slides.json").read_text(encoding="utf-8"))
    entry = listing["slides"][0]
    assert listing["n_slides"] == 1 and entry["file"] == slide.name
    assert entry["mpp_source"] == "openslide.mpp" and entry["mpp"][0] == pytest.approx(0.499)
    assert entry["n_patches"] > 0 and entry["size_bytes"] == slide.stat().st_size

    # The HDF5 reads as CLAM's feature extraction reads it (Whole_Slide_Bag_FP).
    h5_path = folder / "cmu-1-small-region.h5"
    assert entry["h5"] == str(h5_path) and entry["h5_sha256"] == sha256_file(h5_path)
    with h5py.File(h5_path, "r") as handle:
        coords = handle["coords"]
        patch_level, patch_size = int(coords.attrs["patch_level"]), int(coords.attrs["patch_size"])
        assert coords.dtype == np.int64 and coords.shape == (entry["n_patches"], 2)
        assert coords.attrs["name"] == "cmu-1-small-region"
        assert list(coords.attrs["level_dim"]) == [2220, 2967]
        assert coords.attrs["target_mpp"] == 0.5 and int(coords.attrs["read_size"]) == 256
        with openslide.OpenSlide(str(slide)) as wsi:
            x, y = (int(v) for v in coords[len(coords) // 2])
            patch = np.asarray(wsi.read_region((x, y), patch_level, (patch_size, patch_size)).convert("RGB"))
    assert patch.shape == (256, 256, 3) and patch.std() > 10  # tissue, not glass

    materialization = result.get_asset_materialization_events()[0].materialization
    metadata = materialization.metadata
    assert metadata["n_patches"].value == entry["n_patches"]
    assert metadata["picture_path"].value == str(folder / "tiling.png")
    assert_ui_picture(metadata["picture"].value, metadata["picture_path"].value, PATIENT_LIMIT_BYTES)
    assert metadata["h5_files"].value == [str(h5_path)]
    assert metadata["input_fingerprints"].value[slide.name]["quickhash1"]
    assert materialization.tags["dagster/data_version"]
    checks = checks_of(result)
    assert set(checks) == {"slides_open", "mpp_known", "tissue_found", "patch_count_in_bounds"}
    assert all(check.passed for check in checks.values())

    # Unchanged inputs: the stored output is reused, byte for byte, with the same data version.
    before = {p.name: sha256_file(p) for p in folder.iterdir()}
    again = materialize(instance, base_resources, "P001")
    assert again.success
    again_materialization = again.get_asset_materialization_events()[0].materialization
    assert again_materialization.metadata["reused"].value is True
    assert again_materialization.tags["dagster/data_version"] == materialization.tags["dagster/data_version"]
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == before


def test_clam_mode_through_dagster_matches_reference(instance, base_resources, data_root, test_data,
                                                     clam_reference: Path):
    copy_into(real_slide(test_data), wsi_dir(data_root, "PCLAM"))
    result = materialize(instance, base_resources, "PCLAM", mode="clam",
                         clam_preset=str(clam_reference / "params.csv"))
    assert result.success
    with h5py.File(patient_folder(data_root, "PCLAM") / "cmu-1-small-region.h5", "r") as ours, \
            h5py.File(clam_reference / "cmu-1-small-region_coords.h5", "r") as theirs:
        assert np.array_equal(ours["coords"][:], theirs["coords"][:])
        assert ours["coords"].attrs["clam_contour_fn"] == "four_pt"


def test_checks_fail_when_they_should(instance, base_resources, data_root: Path, test_data: Path):
    folder = wsi_dir(data_root, "P002")
    copy_into(real_slide(test_data), folder)
    blank_slide(folder / "glass_only.tiff")
    write_pyramid_tiff(folder / "no_resolution.tiff", real_tissue_rgb(test_data), mpp=None, downsamples=(1, 4))
    result = materialize(instance, base_resources, "P002", max_patches_per_slide=20)
    # Non-blocking checks fail without failing the step; outputs are written for the good slides.
    assert result.success
    checks = checks_of(result)
    assert checks["slides_open"].passed
    assert not checks["mpp_known"].passed and checks["mpp_known"].severity == dg.AssetCheckSeverity.WARN
    assert "no_resolution.tiff" in checks["mpp_known"].description
    assert not checks["tissue_found"].passed and checks["tissue_found"].severity == dg.AssetCheckSeverity.ERROR
    assert "glass_only.tiff" in checks["tissue_found"].description
    assert not checks["patch_count_in_bounds"].passed
    # Each result says what it expected and what it found; a failed one names the patient and the slide.
    tissue = checks["tissue_found"]
    assert tissue.metadata["expected"].value == "at least 1 tissue patch on every slide"
    assert tissue.metadata["found"].value == "1 of 3 slide(s) without tissue patches: glass_only.tiff (no tissue found)"
    assert tissue.metadata["n_slides_without_patches"].value == 1
    assert "patient P002" in tissue.description
    mpp = checks["mpp_known"].metadata
    assert mpp["expected"].value == "every slide records its µm/px"
    assert mpp["found"].value.startswith("1 of 3 slide(s) without a recorded resolution: no_resolution.tiff (")
    assert mpp["found"].value.endswith(" µm/px assumed)") and mpp["n_defaulted"].value == 1
    assert checks["slides_open"].metadata["found"].value == "all 3 slide(s) open"
    assert checks["patch_count_in_bounds"].metadata["expected"].value == "10-20 patches per slide"
    listing = json.loads((patient_folder(data_root, "P002") / "slides.json").read_text(encoding="utf-8"))
    by_file = {e["file"]: e for e in listing["slides"]}
    assert by_file["glass_only.tiff"]["h5"] is None and by_file["glass_only.tiff"]["reason"] == "no tissue found"
    assert by_file["no_resolution.tiff"]["mpp_source"] == "default"
    assert sorted(p.name for p in patient_folder(data_root, "P002").glob("*.h5")) == \
        ["cmu-1-small-region.h5", "no_resolution.h5"]


BAD_PATIENTS = {
    # patient: (slides to make, what the failure must say)
    "BAD_SMALL": (lambda d, t: [copy_into(t / "wsi" / "small.svs", d)], ["small.svs", "smaller than one patch"]),
    "BAD_BOXES": (lambda d, t: [copy_into(t / "wsi" / "boxes.tiff", d)], ["boxes.tiff", "352.778"]),
    "BAD_TRUNCATED": (lambda d, t: [truncated_copy(real_slide(t), d / "cut.svs")], ["cut.svs", "truncated"]),
    "BAD_EMPTY": (lambda d, t: [zero_byte(d / "empty.svs")], ["empty.svs", "empty (0 bytes)"]),
    "BAD_PNG": (lambda d, t: [png_renamed(d / "photo.svs")], ["photo.svs", "PNG image"]),
    "BAD_NO_TISSUE": (lambda d, t: [blank_slide(d / "glass_a.tiff"), blank_slide(d / "glass_b.tiff", size=2048)],
                      ["glass_a.tiff", "glass_b.tiff", "no tissue"]),
    # One unreadable slide next to a good one: the patient fails, and the good slide's file is not written.
    "BAD_MIXED": (lambda d, t: [copy_into(real_slide(t), d), zero_byte(d / "z_empty.svs")],
                  ["z_empty.svs", "empty"]),
}


def test_bad_input_fails_only_that_patient(instance, base_resources, data_root: Path, test_data: Path):
    copy_into(real_slide(test_data), wsi_dir(data_root, "GOOD"))
    assert materialize(instance, base_resources, "GOOD").success
    good_folder = patient_folder(data_root, "GOOD")
    good_before = {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in good_folder.iterdir()}

    for patient_id, (make, expected) in BAD_PATIENTS.items():
        make(wsi_dir(data_root, patient_id), test_data)
        result = materialize(instance, base_resources, patient_id)
        assert not result.success, patient_id
        message = failure_message(result)
        for text in expected:
            assert text in message, (patient_id, text, message)
        assert not result.get_asset_materialization_events(), patient_id
        folder = patient_folder(data_root, patient_id)
        leftovers = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert not [n for n in leftovers if n.endswith((".h5", ".json", ".png")) or n.startswith(TMP_PREFIX)], \
            (patient_id, leftovers)
        checks = checks_of(result)
        if patient_id == "BAD_NO_TISSUE" or patient_id == "BAD_SMALL":
            assert not checks["tissue_found"].passed
        else:
            assert not checks["slides_open"].passed

    assert {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in good_folder.iterdir()} == good_before


def test_missing_slide_folder_fails_clearly(instance, base_resources, data_root: Path):
    (data_root / "landing" / "P404").mkdir(parents=True)
    result = materialize(instance, base_resources, "P404")
    assert not result.success
    assert "P404" in failure_message(result) and "wsi" in failure_message(result)
