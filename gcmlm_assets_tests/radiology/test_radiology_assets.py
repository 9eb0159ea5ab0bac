"""The radiology branch through Dagster: real CT, real instance, real PyRadiomics.

ct_image -> ct_mask (reference mode) -> radiomics_row on the real abdominal CT with
its stomach mask; re-runs reuse bytes; bad drops fail only their own patient's step
with a message naming the file, and leave no output behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import SimpleITK as sitk

from gcmlm_assets import columns
from gcmlm_assets.catalogue import RADIOMICS_TABLE
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets.radiology import ct_io
from gcmlm_assets.radiology.columns import RADIOMICS_ROW_COLUMNS
from gcmlm_assets.radiology.assets import ASSETS, ct_image, ct_mask, radiomics_row
from gcmlm_assets.radiology.resources import RadiomicsSettings
from gcmlm_assets_tests.support.pictures import PATIENT_LIMIT_BYTES, assert_ui_picture
from gcmlm_assets_tests.support.radiology.ct import ct_crop, make_drop, write_dicom_series
from gcmlm_assets_tests.support.run_results import metadata_of, step_failure_text

BRANCH = [ct_image, ct_mask, radiomics_row]
ALL_CHECKS = {"ct_geometry_plausible", "ct_hu_range_plausible", "mask_matches_ct_geometry", "mask_not_empty",
              "mask_volume_plausible", "mask_content_plausible", "mask_agrees_with_model", "radiomics_row_complete",
              "radiomics_row_finite"}


def materialize(instance, resources: dict, patient_id: str, assets=BRANCH) -> dg.ExecuteInProcessResult:
    if patient_id not in instance.get_dynamic_partitions("ct_scans"):
        instance.add_dynamic_partitions("ct_scans", [patient_id])
    return dg.materialize(assets, partition_key=patient_id, instance=instance, resources=resources,
                          raise_on_error=False)


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def mask_voxels(path: Path) -> int:
    return int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_real_ct_through_the_branch(instance, data_root, radiology_resources, real_ct, real_stomach, capfd):
    landing, artifacts = data_root / "landing", data_root / "artifacts"
    make_drop(landing, "TS001", [real_ct], real_stomach)

    capfd.readouterr()
    result = materialize(instance, radiology_resources, "TS001")
    assert result.success
    assert capfd.readouterr().out == ""  # SimpleITK, PyRadiomics: nothing on the run's raw stdout
    assert check_results(result) == {name: True for name in ALL_CHECKS}
    # Every result, passed too, says in words what it expected and what it found.
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    for name, evaluation in evaluations.items():
        assert evaluation.metadata["expected"].value and evaluation.metadata["found"].value, name
    assert evaluations["ct_geometry_plausible"].metadata["found"].value == \
        "voxel size 3 x 3 x 3 mm, 122 x 101 x 30 voxels"
    assert evaluations["ct_hu_range_plausible"].metadata["found"].value.endswith("values -1100..1207 HU")

    ct_meta = metadata_of(result, "ct_image")
    ct_path = artifacts / "ct_image" / "TS001" / "ct.nii.gz"
    assert ct_meta["path"] == str(ct_path)
    assert (ct_meta["size"], ct_meta["spacing_mm"]) == ("(122, 101, 30)", "(3.0, 3.0, 3.0)")
    assert (ct_meta["orientation"], ct_meta["original_orientation"]) == ("LPS", "RAS")
    assert (ct_meta["hu_min"], ct_meta["hu_max"]) == (-1100.0, 1207.0)
    assert ct_meta["picture"].startswith("![CT thumbnail](data:image/")
    assert ct_meta["picture_path"] == str(artifacts / "ct_image" / "TS001" / "ct_thumbnail.png")
    assert_ui_picture(ct_meta["picture"], ct_meta["picture_path"], PATIENT_LIMIT_BYTES)

    # The stomach volume reported is the mask file's own voxel count times the voxel volume.
    mask_meta = metadata_of(result, "ct_mask")
    reference_voxels = mask_voxels(real_stomach)
    spacing = sitk.ReadImage(str(real_stomach)).GetSpacing()
    assert mask_meta["source"] == "reference" and mask_meta["resampled_to_ct_grid"] is False
    assert mask_meta["model_id"] == "reference mask"
    assert mask_meta["voxels"] == reference_voxels
    assert math.isclose(mask_meta["volume_ml"], reference_voxels * float(np.prod(spacing)) / 1000.0, rel_tol=1e-12)
    assert mask_meta["input_ct_sha256"] == ct_meta["sha256"]
    shown = assert_ui_picture(mask_meta["picture"], mask_meta["picture_path"], PATIENT_LIMIT_BYTES)
    # The outline is drawn in red over the grey CT: the display copy still shows it in all three planes.
    rgb = np.asarray(shown.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert [int(third.sum()) > 50 for third in np.array_split(red, 3, axis=1)] == [True, True, True]
    mask = sitk.ReadImage(mask_meta["path"])
    ct = sitk.ReadImage(str(ct_path))
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
           (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())

    row_meta = metadata_of(result, "radiomics_row")
    table = pq.read_table(RADIOMICS_TABLE.path(ArtifactStore(artifacts), "TS001"))
    assert table.num_rows == 1 and table.column_names[0] == "patient_id"
    assert table.column("patient_id").to_pylist() == ["TS001"]
    values = [table.column(name)[0].as_py() for name in table.column_names[1:]]
    assert len(values) == row_meta["features"] == 107
    assert all(math.isfinite(v) for v in values)
    assert table.column_names[1:] == sorted(table.column_names[1:])
    # The schema on the asset page describes the real row; the run's own names the 107 features.
    assert columns.problems(RADIOMICS_ROW_COLUMNS, columns.table_fields(table)) == []
    schema = row_meta["dagster/column_schema"].columns
    assert [(c.name, c.type) for c in schema] == [("patient_id", "string"), ("original_*", "double")]
    assert "(107 columns: original_firstorder_10Percentile .. original_shape_VoxelVolume)" in schema[1].description
    assert row_meta["pyradiomics_version"] == "v3.0.1" and len(row_meta["settings_sha256"]) == 64
    # The 1 mm resampled stomach is about as large as the 3 mm mask (PyRadiomics' own volume).
    assert table.column("original_shape_VoxelVolume")[0].as_py() == \
        int(row_meta["resampled_roi_voxels"]) == reference_voxels * 27

    # Data versions are the output hashes.
    for asset, meta in (("ct_image", ct_meta), ("ct_mask", mask_meta), ("radiomics_row", row_meta)):
        record = instance.get_latest_data_version_record(dg.AssetKey(asset), partition_key="TS001")
        assert record.asset_materialization.tags["dagster/data_version"] == meta["sha256"]

    # A re-run with unchanged inputs reuses every output byte for byte.
    before = {name: (artifacts / name).read_bytes() for name in files_under(artifacts)}
    again = materialize(instance, radiology_resources, "TS001")
    assert again.success and all(check_results(again).values())
    for asset in ("ct_image", "ct_mask", "radiomics_row"):
        assert metadata_of(again, asset)["reused"] is True
        assert metadata_of(again, asset)["sha256"] == metadata_of(result, asset)["sha256"]
    assert {name: (artifacts / name).read_bytes() for name in files_under(artifacts)} == before

    # A changed reference mask is noticed: ct_image is reused, the mask and the row are not.
    smaller = sitk.ReadImage(str(real_stomach))
    smaller[:, :, 18:] = 0  # 64 ml: still above the 50 ml a stomach has at least
    label = landing / "TS001" / "ct_label" / real_stomach.name
    sitk.WriteImage(smaller, str(label))
    changed = materialize(instance, radiology_resources, "TS001")
    assert changed.success
    assert metadata_of(changed, "ct_image")["reused"] is True
    assert metadata_of(changed, "ct_mask")["reused"] is False
    assert metadata_of(changed, "ct_mask")["voxels"] == mask_voxels(label) < reference_voxels
    assert metadata_of(changed, "radiomics_row")["reused"] is False


def test_failing_blocking_check_fails_the_step_and_stops_downstream(instance, data_root, radiology_resources,
                                                                    real_ct, real_stomach):
    make_drop(data_root / "landing", "TS002", [real_ct], real_stomach)
    # The real stomach is ~128 ml: a 50 ml ceiling makes the volume check fail.
    resources = {**radiology_resources, "radiomics": RadiomicsSettings(mask_volume_min_ml=10.0,
                                                                       mask_volume_max_ml=50.0)}
    result = materialize(instance, resources, "TS002")
    assert not result.success
    checks = check_results(result)
    assert checks["mask_volume_plausible"] is False
    assert checks["mask_not_empty"] is True and checks["mask_matches_ct_geometry"] is True
    # The failed check says what was expected and found, and names the patient and the file.
    volume = {e.check_name: e for e in result.get_asset_check_evaluations()}["mask_volume_plausible"]
    found_ml = volume.metadata["volume_ml"].value
    assert 100 < found_ml < 160
    assert volume.metadata["expected"].value == "10-50 ml"
    assert volume.metadata["found"].value == f"{found_ml:.1f} ml"
    assert volume.metadata["volume_max_ml"].value == 50.0
    assert "patient TS002" in volume.description and "mask.nii.gz" in volume.description
    assert f"measures {found_ml:.1f} ml, above the plausible maximum of 50 ml" in volume.description
    assert "blocking asset check" in step_failure_text(result, "ct_mask")
    assert result.get_failed_step_keys() == {"ct_mask"}
    assert not result.asset_materializations_for_node("radiomics_row")
    assert not (data_root / "artifacts" / "radiomics_row" / "TS002").exists()
    # The failed mask is not left where radiomics_row (or a later run) would read it: its folder
    # went to quarantine, with the reason, and the materialization says where.
    assert not (data_root / "artifacts" / "ct_mask" / "TS002").exists()
    [moved] = (data_root / "artifacts" / "_quarantine" / "ct_mask" / "TS002").iterdir()
    assert (moved / "mask.nii.gz").is_file()
    assert json.loads((moved / "quarantine.json").read_text(encoding="utf-8"))["failed_checks"] == ["mask_volume_plausible"]
    assert metadata_of(result, "ct_mask")["quarantined_to"] == str(moved)
    # A later run with a plausible range computes the mask afresh and downstream runs.
    again = materialize(instance, radiology_resources, "TS002")
    assert again.success and metadata_of(again, "ct_mask")["reused"] is False


def test_a_label_map_is_refused_without_a_label_and_narrowed_with_one(instance, data_root, radiology_resources,
                                                                        real_ct, real_stomach, test_data):
    """TotalSegmentator's 40-label map of the real CT: refused as it is (listing its labels), the
    stomach exactly when label 6 is configured, by value or by name through a dataset.json."""
    label_map = test_data / "ct" / "totalsegmentator" / "example_seg_fast.nii.gz"
    drop = make_drop(data_root / "landing", "LMAP1", [real_ct], label_map)
    mask_file = drop / "ct_label" / label_map.name
    assets = [ct_image, ct_mask]

    refused = materialize(instance, radiology_resources, "LMAP1", assets)
    assert not refused.success and refused.get_failed_step_keys() == {"ct_mask"}
    message = step_failure_text(refused, "ct_mask")
    assert f"{mask_file}: mask holds 40 different labels" in message
    assert "5 (39350 voxels), 6 (4748 voxels)" in message and "117 (2159 voxels)" in message
    assert "radiomics.reference_mask_label" in message
    assert files_under(data_root / "artifacts" / "ct_mask" / "LMAP1") == []

    truth = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(real_stomach)), "LPS"))
    by_value = materialize(instance, {**radiology_resources, "radiomics": RadiomicsSettings(reference_mask_label="6")},
                           "LMAP1", assets)
    assert by_value.success and all(check_results(by_value).values())
    meta = metadata_of(by_value, "ct_mask")
    assert meta["reference_label"] == "label 6" and meta["voxels"] == int(truth.sum()) == 4748
    written = sitk.GetArrayFromImage(sitk.ReadImage(meta["path"]))
    np.testing.assert_array_equal(written, truth)  # the stomach, voxel for voxel

    # By name, through nnU-Net's dataset.json beside the mask: the same voxels, a new fingerprint.
    (drop / "ct_label" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "spleen": 1,
                                                                           "liver": 5, "stomach": 6}}))
    by_name = materialize(instance, {**radiology_resources,
                                     "radiomics": RadiomicsSettings(reference_mask_label="stomach")}, "LMAP1", assets)
    assert by_name.success
    named = metadata_of(by_name, "ct_mask")
    assert named["reused"] is False and named["sha256"] == meta["sha256"]
    assert named["reference_label"] == f"label 6 (stomach, from {drop / 'ct_label' / 'dataset.json'})"
    manifest = json.loads((data_root / "artifacts" / "ct_mask" / "LMAP1" / "_manifest.json").read_text(encoding="utf-8"))
    assert manifest["provenance"]["label_value"] == 6 and manifest["provenance"]["label_name"] == "stomach"


def test_a_mask_on_the_wrong_anatomy_fails_its_content_check(instance, data_root, radiology_resources, real_ct,
                                                             real_stomach, tmp_path):
    """The real stomach mask with its header moved: onto the spine (bone) and in front of the
    patient (outside air). Both fail the blocking content check, naming the file and the fractions."""
    cases = {"ONSPINE": ((-39.0, 90.0, 0.0), "as dense as bone"),
             "OUTSIDE": ((0.0, -100.0, 0.0), "air outside the body")}
    for patient_id, (shift_mm, phrase) in cases.items():
        moved = sitk.ReadImage(str(real_stomach))
        moved.SetOrigin(tuple(o + d for o, d in zip(moved.GetOrigin(), shift_mm, strict=True)))
        path = tmp_path / f"{patient_id.lower()}_stomach.nii.gz"
        sitk.WriteImage(moved, str(path))
        make_drop(data_root / "landing", patient_id, [real_ct], path)
        result = materialize(instance, radiology_resources, patient_id)
        assert not result.success and result.get_failed_step_keys() == {"ct_mask"}, patient_id
        checks = check_results(result)
        assert checks["mask_content_plausible"] is False and checks["mask_matches_ct_geometry"] is True
        content = {e.check_name: e for e in result.get_asset_check_evaluations()}["mask_content_plausible"]
        bone, air = content.metadata["bone_fraction"].value, content.metadata["outside_air_fraction"].value
        print(f"\n[{patient_id}] shifted {shift_mm} mm: bone {bone:.1%}, outside air {air:.1%}")
        assert f"patient {patient_id}" in content.description and "mask.nii.gz" in content.description
        assert phrase in content.description
        assert f"{bone:.1%} bone, {air:.1%} air outside the body" in content.metadata["found"].value
        if patient_id == "ONSPINE":
            assert bone > 0.02 and f"{bone:.1%} of its voxels are as dense as bone" in content.description
        else:
            assert air > 0.3 and f"{air:.1%} of its voxels are air outside the body" in content.description
        assert not result.asset_materializations_for_node("radiomics_row")


def test_bad_drops_fail_their_own_patient_only(instance, data_root, radiology_resources, real_ct, real_stomach,
                                               test_data, tmp_path):
    landing, artifacts = data_root / "landing", data_root / "artifacts"
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    # DICOM series with a missing middle slice.
    gap = make_drop(landing, "DCMGAP")
    slices = write_dicom_series(ct_crop(real_ct), gap / "ct")
    slices[6].unlink()
    # One DICOM slice only.
    make_drop(landing, "SINGLE", [test_data / "ct" / "pydicom" / "CT_small.dcm"])
    # A zero-byte NIfTI.
    zero = make_drop(landing, "ZERO")
    (zero / "ct" / "ct.nii.gz").write_bytes(b"")
    # A mask 1 m away from the CT.
    far = sitk.ReadImage(str(real_stomach))
    far.SetOrigin(tuple(o + 1000.0 for o in far.GetOrigin()))
    sitk.WriteImage(far, str(scratch / "far_mask.nii.gz"))
    make_drop(landing, "FARMASK", [real_ct], scratch / "far_mask.nii.gz")
    # An all-zero mask.
    sitk.WriteImage(sitk.ReadImage(str(real_stomach)) * 0, str(scratch / "empty_mask.nii.gz"))
    make_drop(landing, "EMPTYMASK", [real_ct], scratch / "empty_mask.nii.gz")
    # A good patient whose mask was exported on another (2 mm, shifted) grid.
    grid = sitk.Image([150, 130, 44], sitk.sitkUInt8)
    grid.SetSpacing((2.0, 2.0, 2.0))
    stomach = sitk.ReadImage(str(real_stomach))
    grid.SetOrigin(tuple(o + 0.7 for o in sitk.DICOMOrient(stomach, "LPS").GetOrigin()))
    sitk.WriteImage(sitk.Resample(stomach, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0),
                    str(scratch / "mask_2mm.nrrd"))
    make_drop(landing, "REGRID", [real_ct], scratch / "mask_2mm.nrrd")

    expectations = {
        "DCMGAP": ("ct_image", [str(gap / "ct"), "missing slice between slice005.dcm and slice007.dcm"]),
        "SINGLE": ("ct_image", [str(landing / "SINGLE" / "ct" / "CT_small.dcm"), "single slice"]),
        "ZERO": ("ct_image", [str(zero / "ct" / "ct.nii.gz"), "file is empty (0 bytes)"]),
        "FARMASK": ("ct_mask", [str(landing / "FARMASK" / "ct_label" / "far_mask.nii.gz"),
                                "does not overlap the CT in physical space"]),
        "EMPTYMASK": ("ct_mask", [str(landing / "EMPTYMASK" / "ct_label" / "empty_mask.nii.gz"),
                                  "mask is empty"]),
    }
    for patient_id, (failing_asset, phrases) in expectations.items():
        result = materialize(instance, radiology_resources, patient_id)
        assert not result.success, patient_id
        assert result.get_failed_step_keys() == {failing_asset}, patient_id
        message = step_failure_text(result, failing_asset)
        for phrase in phrases:
            assert phrase in message, f"{patient_id}: {phrase!r} not in {message!r}"
        # Nothing of the failed step (or after it) is visible, not even a temporary file.
        assert files_under(artifacts / failing_asset / patient_id) == []
        assert files_under(artifacts / "radiomics_row" / patient_id) == []

    regrid = materialize(instance, radiology_resources, "REGRID")
    assert regrid.success and all(check_results(regrid).values())
    meta = metadata_of(regrid, "ct_mask")
    assert meta["resampled_to_ct_grid"] is True and meta["resampling"] == "nearest neighbour"
    reference_ml = mask_voxels(real_stomach) * 0.027
    assert abs(meta["volume_ml"] - reference_ml) / reference_ml < 0.1
    assert meta["voxels"] == mask_voxels(artifacts / "ct_mask" / "REGRID" / "mask.nii.gz")

    # Every failure stayed in its own partition.
    materialized = instance.get_materialized_partitions(dg.AssetKey("radiomics_row"))
    assert materialized == {"REGRID"}


def test_assets_list_and_groups():
    names = {a.key.to_user_string() for a in ASSETS}
    assert {"ct_image", "ct_mask", "radiomics_row"} <= names
    for asset in (ct_image, ct_mask, radiomics_row):
        assert asset.group_names_by_key[asset.key] == "radiology"
        assert asset.partitions_def.name == "ct_scans"
        # Every check blocks, but the comparison with the model, which only warns.
        assert {spec.name for spec in asset.check_specs if not spec.blocking} == (
            {"mask_agrees_with_model"} if asset is ct_mask else set())


def test_predicted_mask_waits_for_a_model_skipped_not_failed(instance, data_root, radiology_resources, real_ct):
    """Without a reference mask and without an installed model, ct_mask is skipped (and with it
    radiomics_row): the run succeeds, nothing is written, and the log says what it waits for."""
    make_drop(data_root / "landing", "TS009", [real_ct])
    result = materialize(instance, radiology_resources, "TS009")
    assert result.success
    assert result.asset_materializations_for_node("ct_image")
    assert not result.asset_materializations_for_node("ct_mask")
    assert not result.asset_materializations_for_node("radiomics_row")
    assert result.is_node_skipped("radiomics_row")
    assert check_results(result) == {"ct_geometry_plausible": True, "ct_hu_range_plausible": True}
    assert not (data_root / "artifacts" / "ct_mask" / "TS009").exists()
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("TS009: waiting for a segmentation model" in message for message in logs)


def step_events(result: dg.ExecuteInProcessResult, step: str, kind: str) -> list:
    return [e for e in result.all_events if e.step_key == step and e.event_type_value == kind]


def test_transient_errors_are_retried_input_errors_fail_once(instance, data_root, radiology_resources, real_ct,
                                                            monkeypatch):
    """An I/O error in a step is retried (10 s later, the assets' retry policy); a bad input fails at once."""
    landing = data_root / "landing"
    make_drop(landing, "TS010", [real_ct])
    real_load = ct_io.load_ct
    calls = []

    def flaky_load(folder):  # the network share hiccups once
        calls.append(folder)
        if len(calls) == 1:
            raise OSError(5, "Input/output error", str(folder))
        return real_load(folder)

    monkeypatch.setattr(ct_io, "load_ct", flaky_load)
    result = materialize(instance, radiology_resources, "TS010", assets=[ct_image])
    assert result.success and len(calls) == 2
    assert len(step_events(result, "ct_image", "STEP_UP_FOR_RETRY")) == 1

    bad = make_drop(landing, "TS011")
    (bad / "ct" / "ct.nii.gz").write_bytes(b"not a volume")
    failed = materialize(instance, radiology_resources, "TS011", assets=[ct_image])
    assert not failed.success
    assert step_events(failed, "ct_image", "STEP_UP_FOR_RETRY") == []
    assert len(step_events(failed, "ct_image", "STEP_FAILURE")) == 1


def test_ct_mask_alone_refuses_a_reference_mask_linked_from_outside_the_landing_zone(
        instance, data_root, radiology_resources, real_ct, real_stomach, tmp_path):
    """ct_image checks the whole drop, but ct_mask can run without it (by hand, or after the drop
    changed): it checks `ct_label/` again and reads nothing through a link that leaves the zone."""
    drop = make_drop(data_root / "landing", "TS020", [real_ct], real_stomach)
    assert materialize(instance, radiology_resources, "TS020", assets=[ct_image]).success
    outside = tmp_path / "elsewhere" / real_stomach.name
    outside.parent.mkdir()
    (drop / "ct_label" / real_stomach.name).rename(outside)
    (drop / "ct_label" / real_stomach.name).symlink_to(outside)
    result = dg.materialize([ct_image, ct_mask], selection=[ct_mask], partition_key="TS020", instance=instance,
                            resources=radiology_resources, raise_on_error=False)
    assert not result.success
    message = step_failure_text(result, "ct_mask")
    assert f"{drop / 'ct_label' / real_stomach.name} is a symbolic link to {outside}" in message
    assert "outside the landing zone" in message
    assert not (data_root / "artifacts" / "ct_mask" / "TS020").exists()
