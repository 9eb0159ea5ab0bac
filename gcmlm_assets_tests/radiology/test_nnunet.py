"""A real nnU-Net through Dagster: train a tiny model with `segmentation_model`, predict with `ct_mask`.

The cohort is made from the real abdominal CT and its stomach mask: four patients
are crops of it resampled to 6 mm (one with its reference mask left on the
original 3 mm grid, so the asset has to resample it; one dropped as a timepoint,
`ct/<date>/` with its mask in `ct_label/<date>/`, a case of its own), one patient's reference
mask is empty (skipped, with the reason, without stopping the training), and one
patient without a mask is the CT resampled to 5 mm, a grid the model never saw. Training happens
once per module (the demo profile's tiny nnU-Net, trained shorter: `demo_segmentation()`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gcmlm_assets.radiology import nnunet, nnunet_training
from gcmlm_assets.radiology.checkpoint_pins import checkpoint_digests
from gcmlm_assets.radiology.assets import ct_image, ct_mask
from gcmlm_assets.radiology.resources import RadiomicsSettings
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.scans import scan_key
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.pictures import assert_ui_picture
from gcmlm_assets_tests.support.radiology.checkpoints import write_trapped_checkpoint
from gcmlm_assets_tests.support.radiology.ct import make_drop
from gcmlm_assets_tests.support.radiology.nnunet_cohort import (
    TRAIN_SPACING_MM, TRAINING_CROPS, Cohort, demo_segmentation, model_table, resampled,
)
from gcmlm_assets_tests.support.run_results import metadata_of, step_failure_text

HELD_OUT_SPACING_MM = 5.0
MASK_ON_ORIGINAL_GRID = "GC004"
# A training patient whose scan is a timepoint folder: its case is its scan key.
TIMEPOINT_PATIENT, TIMEPOINT = "GC003", "2024-05-01"
TRAINING_CASES = [scan_key(p, TIMEPOINT if p == TIMEPOINT_PATIENT else None) for p in TRAINING_CROPS]
HELD_OUT = "GC005"
EMPTY_MASK = "GC006"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@contextlib.contextmanager
def raw_stdout() -> Iterator[list[str]]:
    """What the block writes to standard output, Python and descriptor level alike (pytest's capfd,
    which a module-scoped fixture cannot use); the text is in the list once the block ends."""
    sys.stdout.flush()
    saved_fd, saved_stream, captured = os.dup(1), sys.stdout, []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), write_through=True)
        try:
            yield captured
        finally:
            sys.stdout.close()
            sys.stdout = saved_stream
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def log_lines(instance, result: dg.ExecuteInProcessResult, step: str, level: int) -> list[str]:
    """The plain log lines (context.log) a step of the run wrote at `level`, in order."""
    return [entry.user_message for entry in instance.all_logs(result.run_id)
            if entry.dagster_event is None and entry.step_key == step and entry.level == level]


def build_cohort(root: Path, real_ct: Path, real_stomach: Path) -> tuple[dict, sitk.Image]:
    """Landing drops of the training patients and the held-out one; returns the held-out truth."""
    landing, sources = root / "landing", root / "sources"
    sources.mkdir(parents=True)
    ct = sitk.ReadImage(str(real_ct))
    stomach = sitk.ReadImage(str(real_stomach))
    ct6, stomach6 = resampled(ct, TRAIN_SPACING_MM, sitk.sitkLinear), resampled(stomach, TRAIN_SPACING_MM,
                                                                                sitk.sitkNearestNeighbor)
    for patient_id, (x, y, z, nx, ny, nz) in TRAINING_CROPS.items():
        folder = sources / patient_id
        folder.mkdir()
        ct_file, mask_file = folder / "ct.nii.gz", folder / "stomach.nii.gz"
        sitk.WriteImage(sitk.RegionOfInterest(ct6, [nx, ny, nz], [x, y, z]), str(ct_file), True)
        mask = stomach if patient_id == MASK_ON_ORIGINAL_GRID else sitk.RegionOfInterest(stomach6, [nx, ny, nz],
                                                                                          [x, y, z])
        sitk.WriteImage(mask, str(mask_file), True)
        drop = make_drop(landing, patient_id, [ct_file], mask_file)
        if patient_id == TIMEPOINT_PATIENT:
            for folder in ("ct", "ct_label"):
                moved = drop / f"{folder}-{TIMEPOINT}"
                (drop / folder).rename(moved)
                (drop / folder).mkdir()
                moved.rename(drop / folder / TIMEPOINT)
    held_out_dir = sources / HELD_OUT
    held_out_dir.mkdir()
    sitk.WriteImage(resampled(ct, HELD_OUT_SPACING_MM, sitk.sitkLinear), str(held_out_dir / "ct.nii.gz"), True)
    make_drop(landing, HELD_OUT, [held_out_dir / "ct.nii.gz"])
    empty_dir = sources / EMPTY_MASK
    empty_dir.mkdir()
    sitk.WriteImage(ct6, str(empty_dir / "ct.nii.gz"), True)
    sitk.WriteImage(stomach6 * 0, str(empty_dir / "empty.nii.gz"), True)
    make_drop(landing, EMPTY_MASK, [empty_dir / "ct.nii.gz"], empty_dir / "empty.nii.gz")
    return ct, resampled(stomach, HELD_OUT_SPACING_MM, sitk.sitkNearestNeighbor)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_ct, real_stomach):
    """One cohort, one Dagster instance, one training for every test of this module."""
    root = tmp_path_factory.mktemp("nnunet_cohort")
    (root / "artifacts").mkdir()
    (root / "dagster_home").mkdir()
    original_ct, held_out_truth = build_cohort(root, real_ct, real_stomach)
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        cohort = Cohort(root, instance, {
            "storage": ArtifactStorage(root=str(root / "artifacts")),
            "landing": LandingZone(root=str(root / "landing")),
            "radiomics": RadiomicsSettings(),
            "segmentation": demo_segmentation(),
        })
        patients = [*TRAINING_CASES, HELD_OUT, EMPTY_MASK]
        instance.add_dynamic_partitions("ct_scans", patients)
        for patient_id in patients:
            assert cohort.materialize([ct_image], partition=patient_id).success, patient_id

        wall, cpu = time.perf_counter(), os.times()
        with raw_stdout() as stdout:
            result = cohort.train()
        wall, cpu_after = time.perf_counter() - wall, os.times()
        assert result.success, [e.step_failure_data.error for e in result.get_step_failure_events()]
        cohort.training = metadata_of(result, "segmentation_model")
        [cohort.training_stdout] = stdout
        cohort.training_info = log_lines(instance, result, "segmentation_model", logging.INFO)
        cohort.training_debug = log_lines(instance, result, "segmentation_model", logging.DEBUG)
        cohort.training_seconds = wall
        cohort.training_cpu_seconds = (cpu_after.user + cpu_after.system + cpu_after.children_user
                                       + cpu_after.children_system) - (cpu.user + cpu.system + cpu.children_user
                                                                       + cpu.children_system)
        print(f"\n[nnU-Net tiny training through segmentation_model] wall {wall:.1f} s, "
              f"CPU {cohort.training_cpu_seconds:.1f} s; nnU-Net phases {cohort.training['wall_time_s']:.1f} s "
              f"(plan+preprocess {cohort.training['plan_and_preprocess_time_s']:.1f} s, "
              f"train {cohort.training['train_time_s']:.1f} s); "
              f"pseudo Dice {cohort.training.get('final_pseudo_dice')}")
        cohort.original_ct, cohort.held_out_truth = original_ct, held_out_truth
        yield cohort


def test_segmentation_model_trains_and_installs_a_tiny_nnunet(trained):
    meta = trained.training
    models_root = trained.artifacts / "segmentation_model"
    assert meta["trained"] is True and meta["reused"] is False
    # Every scan with a reference mask, the timepoint's (ct_label/<timepoint>/) among them.
    assert meta["n_training_cases"] == len(TRAINING_CASES)
    assert meta["training_cases"] == ", ".join(TRAINING_CASES)
    assert f"{TIMEPOINT_PATIENT}@{TIMEPOINT}" in TRAINING_CASES
    assert meta["trainer"] == "nnUNetTrainerAdam" and meta["plans"] == "nnUNetPlans_tiny"
    assert (meta["configuration"], meta["fold"], meta["epochs"], meta["iterations_per_epoch"]) == (
        "3d_fullres", "all", 20, 12)
    assert meta["final_train_loss"] < 1.5 and 0.0 <= meta["final_pseudo_dice"] <= 1.0
    assert set(meta["input_sha256"]) == set(TRAINING_CASES)
    # One unusable reference mask is reported and left out; the held-out patient has none at all.
    assert list(meta["skipped_cases"]) == [EMPTY_MASK]
    assert "empty.nii.gz: mask is empty" in meta["skipped_cases"][EMPTY_MASK]
    # nnU-Net's own progress plot under the UI's size rules, the original beside the model.
    assert_ui_picture(meta["training_progress"], meta["training_progress_path"])
    # The model's identity at a glance, in one table on the asset page.
    assert model_table(meta) == {
        "model id": meta["model_id"], "plans": "nnUNetPlans_tiny", "configuration": "3d_fullres",
        "trainer": "nnUNetTrainerAdam", "folds": "all", "epochs": "20", "iterations per epoch": "12",
        "training cases": f"{len(TRAINING_CASES)}: {', '.join(TRAINING_CASES)}", "held-out cases": "none",
        "device": "cpu", "checkpoint sha256": meta["checkpoint_sha256"]}
    # The first model: nothing installed to compare it with.
    assert meta["decision"] == "installed: the first model (none installed to compare with)"

    # Installed atomically as <artifacts>/segmentation_model/<model_id>/ with a current.json pointer.
    folder = Path(meta["model_folder"])
    assert folder == models_root / meta["model_id"]
    pointer = json.loads((models_root / "current.json").read_text(encoding="utf-8"))
    assert pointer["folder"] == meta["model_id"]
    assert not [p for p in models_root.iterdir() if p.name.startswith(".tmp")]
    assert nnunet.find_trained_model_folder(folder) == folder
    # Each checkpoint's digest, recorded at install; every later load verifies the files against it.
    checkpoint_digest = sha256_file(folder / "fold_all" / "checkpoint_final.pth")
    assert pointer["checkpoint_sha256_by_fold"] == meta["checkpoint_sha256_by_fold"] == {"all": checkpoint_digest}
    installed = nnunet.describe_model_folder(folder, nnunet.installed_model_pins(models_root, pointer))
    assert meta["checkpoint_sha256"] == installed.checkpoint_sha256
    assert meta["model_id"].endswith(meta["checkpoint_sha256"][:12])

    # The tiny plans that were trained: 4 stages of 4..32 features.
    arch = json.loads((folder / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["architecture"]
    assert arch["arch_kwargs"]["n_stages"] == 4
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 32]
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {"background": 0, "stomach": 1} and dataset["channel_names"] == {"0": "CT"}


def test_training_reports_phases_and_epochs_in_the_step_log_and_nothing_on_raw_stdout(trained):
    # nnU-Net prints its plans, a citation and five lines per epoch: none of it reaches raw stdout.
    assert trained.training_stdout == ""
    info = trained.training_info
    for phase in ("dataset: 4 cases written as Dataset501_GastricCT", "planning: fingerprint and nnUNetPlans_tiny",
                  "preprocessing: 3d_fullres with 1 process(es)", "training: 20 epochs of 12 + 2 iterations"):
        assert sum(line.startswith(phase) for line in info) == 1, (phase, info)
    epochs = [line for line in info if line.startswith("epoch ")]
    assert [int(re.match(r"epoch (\d+)/20: ", line)[1]) for line in epochs] == list(range(1, 21)), epochs
    number = r"-?\d+\.\d+"
    for line in epochs:
        assert re.fullmatch(rf"epoch \d+/20: train loss {number}, val loss {number}, pseudo Dice (\d\.\d+|nan), "
                            r"\d+\.\d s", line), line
    # The last epoch's line agrees with the metrics recorded on the materialization.
    assert f"pseudo Dice {trained.training['final_pseudo_dice']:.4f}" in epochs[-1]
    assert f"train loss {trained.training['final_train_loss']:.4f}" in epochs[-1]
    # What nnU-Net printed is kept, as debug lines of the same step.
    debug = "\n".join(trained.training_debug)
    assert "This is the configuration used by this training" in debug and debug.count("Epoch time:") == 20


def test_ct_mask_predicts_a_binary_mask_on_the_exact_ct_grid(trained, capfd):
    capfd.readouterr()
    result = trained.materialize([ct_image, ct_mask], partition=HELD_OUT, selection=[ct_mask])
    assert result.success, step_failure_text(result, "ct_mask") if not result.success else ""
    assert capfd.readouterr().out == ""  # loading and predicting with nnU-Net print nothing to raw stdout
    meta = metadata_of(result, "ct_mask")
    assert meta["source"] == "predicted" and meta["model_id"] == trained.training["model_id"]

    ct = sitk.ReadImage(str(trained.artifacts / "ct_image" / HELD_OUT / "ct.nii.gz"))
    mask = sitk.ReadImage(str(trained.artifacts / "ct_mask" / HELD_OUT / "mask.nii.gz"))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == (
        ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    values = sitk.GetArrayFromImage(mask)
    assert set(np.unique(values)) <= {0, 1} and values.sum() == meta["voxels"] > 0

    # The 5 mm grid was never trained on; the tiny model still finds the stomach there.
    truth = sitk.GetArrayFromImage(sitk.DICOMOrient(trained.held_out_truth, "LPS"))
    score = dice(values > 0, truth > 0)
    print(f"\n[held-out 5 mm CT] predicted {values.sum()} voxels, reference {truth.sum()}, Dice {score:.3f}")
    assert score > 0.2


def test_segmenter_keeps_the_grid_of_a_non_lps_image(trained):
    segmenter = nnunet.GastricSegmenter.load(Path(trained.training["model_folder"]), device="cpu",
                                             pins=installed_pins(trained))
    assert segmenter.model_id == trained.training["model_id"]
    image = resampled(trained.original_ct, TRAIN_SPACING_MM, sitk.sitkLinear)  # stored RAS, as scanned
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "RAS"
    mask = segmenter.predict(image)
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == (
        image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    # Voxel for voxel the same answer as on the LPS copy of the image: orientation is undone exactly.
    lps = segmenter.predict(sitk.DICOMOrient(image, "LPS"))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")), sitk.GetArrayFromImage(lps))


def test_every_fold_of_a_pinned_model_is_read_without_running_code(trained, tmp_path):
    # An ensemble whose second fold is the real checkpoint plus an object that runs code when
    # unpickled, both folds pinned: the pins pass, the weights-only unpickler refuses that fold.
    installed = Path(trained.training["model_folder"])
    folder, marker = tmp_path / "model", tmp_path / "unpickled"
    folder.mkdir()
    for name in ("plans.json", "dataset.json"):
        shutil.copy(installed / name, folder / name)
    real = nnunet.read_checkpoint(installed / "fold_all" / nnunet.CHECKPOINT)
    (folder / "fold_0").mkdir()
    shutil.copy(installed / "fold_all" / nnunet.CHECKPOINT, folder / "fold_0" / nnunet.CHECKPOINT)
    trapped = write_trapped_checkpoint(folder / "fold_1" / nnunet.CHECKPOINT, marker, beside=real)
    pins = nnunet.CheckpointPins(checkpoint_digests(folder), "this test", "")
    assert nnunet.describe_model_folder(folder, pins).folds == ("0", "1")  # fold 0 gives the identity
    with pytest.raises(nnunet.ModelFolderError) as refused:
        nnunet.GastricSegmenter.load(folder, "cpu", pins=pins)
    assert f"{trapped}: refused by torch's weights-only loader" in str(refused.value)
    assert not marker.exists()
    # What the load avoids: nnU-Net's own loader unpickles every fold in full, and the trap runs.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False).initialize_from_trained_model_folder(
        str(folder), use_folds=(0, 1), checkpoint_name=nnunet.CHECKPOINT)
    assert marker.exists()


def test_unchanged_inputs_reuse_the_installed_model(trained):
    before = sorted(p.name for p in (trained.artifacts / "segmentation_model").iterdir())
    result = trained.train()
    assert result.success
    meta = metadata_of(result, "segmentation_model")
    assert meta["reused"] is True and meta["trained"] is False
    assert model_table(meta) == model_table(trained.training)
    assert meta["model_id"] == trained.training["model_id"]
    assert sorted(p.name for p in (trained.artifacts / "segmentation_model").iterdir()) == before
    [materialization] = result.asset_materializations_for_node("segmentation_model")
    assert materialization.tags["dagster/data_version"] == trained.training["checkpoint_sha256"]


def test_resource_pointing_at_a_trained_folder_skips_training(trained, tmp_path):
    installed = Path(trained.training["model_folder"])
    # An nnU-Net results tree as nnU-Net itself lays it out: pointing at its dataset folder is enough.
    results = tmp_path / "nnUNet_results" / "Dataset501_GastricCT"
    external = results / "nnUNetTrainerAdam__nnUNetPlans_tiny__3d_fullres"
    external.parent.mkdir(parents=True)
    os.symlink(installed, external)
    before = sorted(p.name for p in (trained.artifacts / "segmentation_model").iterdir())

    resource = demo_segmentation(trained_model_folder=str(results),
                                                  trained_model_sha256=checkpoint_digest(trained))
    result = trained.train(segmentation=resource)
    assert result.success
    meta = metadata_of(result, "segmentation_model")
    assert meta["trained"] is False and meta["source"] == "configured trained_model_folder"
    assert meta["model_folder"] == str(external)
    assert meta["checkpoint_sha256"] == trained.training["checkpoint_sha256"]
    table = model_table(meta)
    assert (table["model id"], table["plans"], table["trainer"]) == (
        trained.training["model_id"], "nnUNetPlans_tiny", "nnUNetTrainerAdam")
    assert table["epochs"] == table["training cases"] == "not recorded (trained outside this platform)"
    assert sorted(p.name for p in (trained.artifacts / "segmentation_model").iterdir()) == before
    assert resource.model_folder(ArtifactStorage(root=str(trained.artifacts)).store()) == external
    assert meta["checkpoint_sha256_by_fold"] == {"all": checkpoint_digest(trained)}


def installed_pins(trained) -> nnunet.CheckpointPins:
    models_root = trained.artifacts / "segmentation_model"
    return nnunet.installed_model_pins(models_root, nnunet.read_current_model(models_root))


def checkpoint_digest(trained) -> str:
    return sha256_file(Path(trained.training["model_folder"]) / "fold_all" / "checkpoint_final.pth")


def trapped_copy(trained, folder: Path) -> Path:
    """A copy of the trained model whose checkpoint is replaced by one that creates a marker when
    unpickled; returns the marker's path."""
    shutil.copytree(trained.training["model_folder"], folder)
    marker = folder.parent / "unpickled"
    write_trapped_checkpoint(folder / "fold_all" / "checkpoint_final.pth", marker)
    return marker


def test_a_configured_folder_needs_its_pinned_digest(trained, tmp_path):
    right = checkpoint_digest(trained)
    external = tmp_path / "external"
    marker = trapped_copy(trained, external)
    trapped = sha256_file(external / "fold_all" / "checkpoint_final.pth")
    for pinned, expected_text in [(None, "no SHA-256 is pinned"),
                                  (right, f"SHA-256 mismatch: expected {right}, found {trapped}")]:
        resource = demo_segmentation(trained_model_folder=str(external), trained_model_sha256=pinned)
        result = trained.train(segmentation=resource)
        assert not result.success
        message = step_failure_text(result, "segmentation_model")
        assert expected_text in message and str(external / "fold_all" / "checkpoint_final.pth") in message
        assert "GCMLM_NNUNET_MODEL_SHA256" in message
        # ct_mask of a patient without a reference mask: refused before nnU-Net's predictor loads it.
        result = trained.materialize([ct_image, ct_mask], partition=HELD_OUT, selection=[ct_mask],
                                     segmentation=resource)
        assert not result.success and expected_text in step_failure_text(result, "ct_mask")
    assert not marker.exists()


def test_a_tampered_installed_model_is_refused_and_replaced_on_install(trained, tmp_path):
    # A copy of the artifact store (CT and model) whose installed checkpoint was replaced afterwards.
    artifacts = tmp_path / "artifacts"
    models_root = artifacts / "segmentation_model"
    shutil.copytree(trained.artifacts / "ct_image" / HELD_OUT, artifacts / "ct_image" / HELD_OUT)
    models_root.mkdir(parents=True)
    shutil.copy(trained.artifacts / "segmentation_model" / "current.json", models_root / "current.json")
    installed = models_root / trained.training["model_id"]
    marker = trapped_copy(trained, installed)
    result = trained.materialize([ct_image, ct_mask], partition=HELD_OUT, selection=[ct_mask],
                                 storage=ArtifactStorage(root=str(artifacts)))
    assert not result.success
    message = step_failure_text(result, "ct_mask")
    assert f"{installed / 'fold_all' / 'checkpoint_final.pth'}: SHA-256 mismatch: expected {checkpoint_digest(trained)}" \
        in message and str(models_root / "current.json") in message
    assert not marker.exists()

    # Installing the same trained model again replaces the tampered folder instead of keeping it.
    fresh = models_root / ".tmp-train-test" / "model"
    shutil.copytree(trained.training["model_folder"], fresh)
    model = nnunet.install_trained_model(fresh, models_root)
    assert model.folder == installed and sha256_file(installed / "fold_all" / "checkpoint_final.pth") == \
        checkpoint_digest(trained)
    assert not marker.exists() and not fresh.exists()
    assert not [p.name for p in models_root.iterdir() if p.name.startswith(".tmp-train-stale")]


def test_resource_pointing_at_an_invalid_folder_fails_clearly(trained, tmp_path):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    result = trained.train(segmentation=demo_segmentation(trained_model_folder=str(not_a_model)))
    assert not result.success
    message = step_failure_text(result, "segmentation_model")
    assert str(not_a_model) in message and "plans.json" in message and "checkpoint_final.pth" in message

    unfinished = tmp_path / "unfinished"
    (unfinished / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (unfinished / name).write_text("{}")
    with pytest.raises(nnunet.ModelFolderError, match=r"unfinished.*no fold_<f>/checkpoint_final\.pth"):
        nnunet.find_trained_model_folder(unfinished)
    with pytest.raises(nnunet.ModelFolderError, match="does not exist"):
        nnunet.find_trained_model_folder(tmp_path / "missing")


def train_on_new_drops(root: Path, drops: dict[str, tuple[Path, Path | None]]) -> dg.ExecuteInProcessResult:
    """A fresh instance and landing zone with `drops` (patient -> CT file, reference mask or None): each
    CT materialized, then segmentation_model asked to train on them with the CPU demo settings."""
    (root / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        cohort = Cohort(root, instance, {
            "storage": ArtifactStorage(root=str(root / "artifacts")),
            "landing": LandingZone(root=str(root / "landing")),
            "radiomics": RadiomicsSettings(),
            "segmentation": demo_segmentation(),
        })
        for patient_id, (ct, mask) in drops.items():
            make_drop(root / "landing", patient_id, [ct], mask)
        instance.add_dynamic_partitions("ct_scans", list(drops))
        for patient_id in drops:
            assert cohort.materialize([ct_image], partition=patient_id).success
        return cohort.train()


def test_training_needs_two_patients_with_a_reference_mask(tmp_path, real_ct, real_stomach):
    result = train_on_new_drops(tmp_path, {"ONLY1": (real_ct, real_stomach), "NOMASK": (real_ct, None)})
    assert not result.success
    message = step_failure_text(result, "segmentation_model")
    assert "at least 2 CT scans with a reference mask" in message and "found 1 (ONLY1)" in message
    assert not (tmp_path / "artifacts" / "segmentation_model" / "current.json").exists()


def test_dataset_writer_refuses_a_mask_on_another_grid(tmp_path, real_ct, real_stomach):
    coarse_mask = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(resampled(sitk.ReadImage(str(real_stomach)), 6.0, sitk.sitkNearestNeighbor), str(coarse_mask))
    cases = [nnunet_training.TrainingCase("A1", real_ct, real_stomach),
             nnunet_training.TrainingCase("A2", real_ct, coarse_mask)]
    with pytest.raises(nnunet_training.TrainingDataError, match=r"coarse\.nii\.gz: mask grid .* differs from its CT"):
        nnunet_training.write_raw_dataset(cases, tmp_path / "raw", 501)


def test_a_backfill_range_loads_the_model_once_and_records_each_patient_as_its_own(trained, monkeypatch):
    """ct_mask over a range of patients, as a batched backfill run does it: one model load, each
    patient's mask, metadata and checks recorded for that patient, and one bad patient failing
    alone (the run fails naming it; the others stay materialized)."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    sources = trained.root / "sources"
    predicted, broken, referenced = "GC007", "GC008", "GC009"
    make_drop(trained.landing, predicted, [sources / HELD_OUT / "ct.nii.gz"])
    make_drop(trained.landing, referenced, [sources / "GC001" / "ct.nii.gz"], sources / "GC001" / "stomach.nii.gz")
    make_drop(trained.landing, broken, [sources / "GC002" / "ct.nii.gz"], sources / "GC002" / "stomach.nii.gz")
    bad_mask = trained.landing / broken / "ct_label" / "stomach.nii.gz"
    bad_mask.write_bytes(b"not a NIfTI file")
    batch = [predicted, broken, referenced]
    trained.instance.add_dynamic_partitions("ct_scans", batch)
    for patient_id in batch:
        assert trained.materialize([ct_image], partition=patient_id).success, patient_id

    loads = []
    real_load = nnunet.GastricSegmenter.load.__func__

    def counting_load(cls, *args, **kwargs):  # the real loader, counted
        loads.append(args[0])
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(nnunet.GastricSegmenter, "load", classmethod(counting_load))
    result = dg.materialize([ct_image, ct_mask], selection=[ct_mask], instance=trained.instance,
                            resources=trained.resources, raise_on_error=False,
                            tags={ASSET_PARTITION_RANGE_START_TAG: predicted, ASSET_PARTITION_RANGE_END_TAG: referenced})

    assert not result.success
    failure = step_failure_text(result, "ct_mask")
    assert f"1 of 3 patients failed: patient {broken}: " in failure and str(bad_mask) in failure
    assert predicted not in failure.split("failed:", 1)[1] and referenced not in failure.split("failed:", 1)[1]
    assert len(loads) == 1  # one model for the whole run (the referenced patient is compared with the same one)

    key = dg.AssetKey("ct_mask")
    # Read back from the instance (the run's event log), as the UI does.
    logged = [entry.dagster_event for entry in trained.instance.all_logs(result.run_id)
              if entry.dagster_event and entry.dagster_event.step_key == "ct_mask"]
    by_patient = {e.partition: e for e in logged if e.is_step_materialization and e.asset_key == key}
    assert set(by_patient) == {predicted, referenced}
    meta = {pid: e.step_materialization_data.materialization.metadata for pid, e in by_patient.items()}
    assert meta[predicted]["source"].value == "predicted" and meta[referenced]["source"].value == "reference"
    assert meta[predicted]["model_id"].value == trained.training["model_id"]
    for patient_id in (predicted, referenced):
        assert (trained.artifacts / "ct_mask" / patient_id / "mask.nii.gz").is_file()
    assert not (trained.artifacts / "ct_mask" / broken / "mask.nii.gz").exists()

    # What the UI shows: per-patient status, versions and check results.
    status = trained.instance.get_status_by_partition(key, batch, ct_mask.partitions_def)
    assert {pid: str(s.value) for pid, s in status.items()} == {
        predicted: "MATERIALIZED", broken: "FAILED", referenced: "MATERIALIZED"}
    versions = {pid: e.step_materialization_data.materialization.tags for pid, e in by_patient.items()}
    assert versions[predicted]["dagster/data_version"] == meta[predicted]["sha256"].value
    assert versions[referenced]["dagster/code_version"] == "2"
    checked = {}
    for event in logged:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            checked.setdefault(evaluation.partition, {})[evaluation.check_name] = evaluation.passed
    # the broken patient's checks are recorded under it as not evaluated (batching.py), never passed
    assert set(checked) == {predicted, broken, referenced}
    assert checked[broken] and not any(checked[broken].values())
    # The real reference mask passes every blocking check; its comparison with the model was recorded.
    blocking = {spec.name for spec in ct_mask.check_specs if spec.blocking}
    assert blocking and all(checked[referenced][name] for name in blocking)
    assert "mask_agrees_with_model" in checked[referenced]
    assert meta[referenced]["agreement_model_id"].value == trained.training["model_id"]

    # Re-running the failed patient alone, once its file is fixed, completes the range.
    bad_mask.write_bytes((sources / "GC002" / "stomach.nii.gz").read_bytes())
    assert trained.materialize([ct_image, ct_mask], partition=broken, selection=[ct_mask]).success
    status = trained.instance.get_status_by_partition(key, batch, ct_mask.partitions_def)
    assert {str(s.value) for s in status.values()} == {"MATERIALIZED"}


def test_a_reference_mask_is_compared_with_the_installed_model(trained, real_ct):
    """With a model installed, ct_mask of a patient with a reference mask also runs the model and
    records the two masks' Dice; a mislabelled reference (TotalSegmentator's liver) gets a WARN that
    names the file and the model, and is still materialized (the check does not block)."""
    sources = trained.root / "sources"
    good, mislabelled = "GC010", "GC011"
    make_drop(trained.landing, good, [sources / "GC001" / "ct.nii.gz"], sources / "GC001" / "stomach.nii.gz")
    liver = sitk.Cast(sitk.ReadImage(str(real_ct.parent / "example_seg_fast.nii.gz")) == 5, sitk.sitkUInt8)
    sitk.WriteImage(liver, str(sources / "liver_as_stomach.nii.gz"))
    make_drop(trained.landing, mislabelled, [sources / "GC001" / "ct.nii.gz"], sources / "liver_as_stomach.nii.gz")
    trained.instance.add_dynamic_partitions("ct_scans", [good, mislabelled])
    model = nnunet.GastricSegmenter.load(Path(trained.training["model_folder"]), device="cpu",
                                        pins=installed_pins(trained))

    outcomes = {}
    for patient_id in (good, mislabelled):
        assert trained.materialize([ct_image], partition=patient_id).success
        result = trained.materialize([ct_image, ct_mask], partition=patient_id, selection=[ct_mask])
        assert result.success, patient_id  # a disagreement warns; it never fails the step
        meta = metadata_of(result, "ct_mask")
        assert meta["source"] == "reference" and meta["agreement_model_id"] == model.model_id
        # The recorded Dice is the overlap of the model's own prediction with the stored reference mask.
        ct = sitk.ReadImage(str(trained.artifacts / "ct_image" / patient_id / "ct.nii.gz"))
        stored = sitk.ReadImage(str(trained.artifacts / "ct_mask" / patient_id / "mask.nii.gz"))
        expected = dice(sitk.GetArrayFromImage(model.predict(ct)) > 0, sitk.GetArrayFromImage(stored) > 0)
        assert meta["model_agreement_dice"] == pytest.approx(expected, abs=1e-12)
        assert meta["model_agreement"] == f"Dice {expected:.3f} with model {model.model_id}"
        [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "mask_agrees_with_model"]
        assert check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["dice"].value == meta["model_agreement_dice"]
        outcomes[patient_id] = (meta["model_agreement_dice"], check)
    print(f"\n[reference vs model] Dice {outcomes[good][0]:.3f} (stomach), {outcomes[mislabelled][0]:.3f} (liver)")

    score, check = outcomes[mislabelled]
    reference = trained.landing / mislabelled / "ct_label" / "liver_as_stomach.nii.gz"
    assert score < 0.1 and check.passed is False
    assert str(reference) in check.description and model.model_id in check.description
    assert f"Dice {score:.3f}, below 0.7" in check.description
    assert outcomes[good][0] > outcomes[mislabelled][0]
    assert outcomes[good][1].passed is (outcomes[good][0] >= 0.7)


def test_training_refuses_label_maps_without_a_label(tmp_path, real_ct):
    """segmentation_model takes reference masks as ct_mask does: label maps need the label setting."""
    label_map = real_ct.parent / "example_seg_fast.nii.gz"
    result = train_on_new_drops(tmp_path, {"MAP1": (real_ct, label_map), "MAP2": (real_ct, label_map)})
    assert not result.success
    message = step_failure_text(result, "segmentation_model")
    assert "only 0 usable reference mask(s)" in message
    for patient_id in ("MAP1", "MAP2"):
        path = tmp_path / "landing" / patient_id / "ct_label" / label_map.name
        assert f"{path}: mask holds 40 different labels" in message


def test_the_installed_model_predicts_each_scan_without_a_reference_mask(trained, monkeypatch):
    """A patient with three timepoints, one with a reference mask: predicted_mask_sensor's sweep asks
    for the mask of each scan without one (its own partition, run, file and row) and leaves the
    other alone."""
    import pyarrow.parquet as pq

    from gcmlm_assets.radiology import assets, dicom_assets
    from gcmlm_assets.radiology.segmentation_model import segmentation_model
    from gcmlm_assets.radiology.sensors import build_predicted_mask_sensor

    monkeypatch.setenv("GCMLM_GPU_BATCH_PATIENTS", "1")  # one run per scan, carrying its whole chain
    sources, drop = trained.root / "sources", trained.landing / "GC020"
    scans = {"2024-01-10": ("GC001", False), "2024-03-02": ("GC002", False), "2024-06-20": ("GC004", True)}
    for name, (source, with_mask) in scans.items():
        (drop / "ct" / name).mkdir(parents=True)
        shutil.copy(sources / source / "ct.nii.gz", drop / "ct" / name / "ct.nii.gz")
        if with_mask:
            (drop / "ct_label" / name).mkdir(parents=True)
            shutil.copy(sources / source / "stomach.nii.gz", drop / "ct_label" / name / "stomach.nii.gz")
    keys = [f"GC020@{name}" for name in scans]
    trained.instance.add_dynamic_partitions("ct_scans", keys)
    for key in keys:
        assert trained.materialize([ct_image], partition=key).success, key

    sensor = build_predicted_mask_sensor(30)
    resources = {name: trained.resources[name] for name in ("landing", "storage", "segmentation")}
    with dg.build_sensor_context(instance=trained.instance, resources=resources) as context:
        requests = sensor(context)
    asked = {request.partition_key: request for request in requests}
    predicted = keys[:2]
    assert set(predicted) <= set(asked) and keys[2] not in asked

    everything = [*assets.ASSETS, *dicom_assets.ASSETS, segmentation_model]
    for key in predicted:
        request = asked[key]
        result = dg.materialize(everything, instance=trained.instance, resources=trained.resources,
                                selection=request.asset_selection, partition_key=key, tags=request.tags,
                                raise_on_error=False)
        assert result.success, key
        meta = metadata_of(result, "ct_mask")
        assert meta["source"] == "predicted" and meta["model_id"] == trained.training["model_id"]
        ct = sitk.ReadImage(str(trained.artifacts / "ct_image" / key / "ct.nii.gz"))
        mask = sitk.ReadImage(str(trained.artifacts / "ct_mask" / key / "mask.nii.gz"))
        assert (mask.GetSize(), mask.GetOrigin()) == (ct.GetSize(), ct.GetOrigin())  # the scan's own grid
        row = pq.read_table(trained.artifacts / "radiomics_row" / key / "radiomics.parquet")
        assert row.column("patient_id").to_pylist() == [key]
    assert not (trained.artifacts / "ct_mask" / keys[2]).exists()


def test_nnunet_case_ids_of_timepoint_scans_are_file_names_and_split_back():
    for key in ("P001", "P001@2024-05-01", "P.1@baseline", "P.@post_nact", "A-b_c.d@2023-12-31"):
        name = nnunet_training.nnunet_case_id(key)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name), name
        assert nnunet_training.case_of_nnunet_id(name) == key
    assert nnunet_training.nnunet_case_id("P001") == "P001"  # a drop's only scan keeps its case id
    assert nnunet_training.nnunet_case_id("P001@2024-05-01") == "P001..2024-05-01"
