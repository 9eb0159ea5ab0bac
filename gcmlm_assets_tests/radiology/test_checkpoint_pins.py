"""nnU-Net checkpoints are pickles: a model folder is refused before unpickling unless its
checkpoints match pinned SHA-256 digests, and a pinned checkpoint is still read only by torch's
weights-only unpickler (a pickle that would run code is refused).

Each hostile folder here holds a checkpoint whose unpickling creates a marker file; a refusal
"before unpickling" is proven by the marker's absence. The loads that succeed with a real model
are in test_nnunet.py (its module-scoped trained model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcmlm_assets.radiology import nnunet
from gcmlm_assets.radiology.checkpoint_pins import CheckpointHashError, CheckpointPins, ModelFolderError, parse_pins
from gcmlm_assets.radiology.resources import SegmentationModelResource, resources
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.radiology.checkpoints import write_trapped_checkpoint

A, B, C = "a" * 64, "b" * 64, "0123456789abcdef" * 4


def trapped_model_folder(root: Path, folds=("all",)) -> tuple[Path, Path]:
    """A complete-looking nnU-Net model folder whose checkpoints create `marker` when unpickled."""
    folder, marker = root / "Dataset501_GastricCT" / "nnUNetTrainer__nnUNetPlans__3d_fullres", root / "ran"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"dataset_name": "Dataset501_GastricCT", "plans_name": "nnUNetPlans"}))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                     "labels": {"background": 0, "stomach": 1}}))
    for fold in folds:
        write_trapped_checkpoint(folder / f"fold_{fold}" / nnunet.CHECKPOINT, marker)
    return folder, marker


def test_the_trapped_checkpoint_runs_its_code_when_unpickled(tmp_path):
    # What the other tests rely on: without a refusal, loading would create the marker.
    folder, marker = trapped_model_folder(tmp_path)
    torch.load(folder / "fold_all" / nnunet.CHECKPOINT, weights_only=False)
    assert marker.exists()


def test_a_folder_without_pinned_digests_is_refused_before_unpickling(tmp_path):
    folder, marker = trapped_model_folder(tmp_path)
    checkpoint = folder / "fold_all" / nnunet.CHECKPOINT
    with pytest.raises(CheckpointHashError) as refused:
        nnunet.describe_model_folder(tmp_path, CheckpointPins.from_setting(None))
    message = str(refused.value)
    assert str(checkpoint) in message and sha256_file(checkpoint) in message
    assert "no SHA-256 is pinned" in message and "GCMLM_NNUNET_MODEL_SHA256" in message
    assert "segmentation.trained_model_sha256" in message
    assert not marker.exists()


def test_a_wrong_digest_is_refused_before_unpickling_by_every_loader(tmp_path):
    folder, marker = trapped_model_folder(tmp_path)
    checkpoint = folder / "fold_all" / nnunet.CHECKPOINT
    found = sha256_file(checkpoint)
    pins = CheckpointPins.from_setting(A)
    with pytest.raises(CheckpointHashError) as refused:
        nnunet.describe_model_folder(folder, pins)
    message = str(refused.value)
    assert f"{checkpoint}: SHA-256 mismatch: expected {A}, found {found}" in message
    assert "nothing was loaded" in message and "GCMLM_NNUNET_MODEL_SHA256" in message
    # nnU-Net's predictor is never reached either.
    with pytest.raises(CheckpointHashError, match="SHA-256 mismatch"):
        nnunet.GastricSegmenter.load(folder, "cpu", pins=pins)
    # The resource hands the configured digest to the loader; a pin naming another fold is refused too.
    resource = SegmentationModelResource(trained_model_folder=str(tmp_path), trained_model_sha256=f"fold_0={found}")
    located, resource_pins = resource.pinned_model(store=None)
    assert located == folder
    with pytest.raises(CheckpointHashError) as refused:
        nnunet.GastricSegmenter.load(located, "cpu", pins=resource_pins)
    assert f"{folder / 'fold_0' / nnunet.CHECKPOINT}: pinned" in str(refused.value)
    assert f"{checkpoint}: no pinned digest (found {found})" in str(refused.value)
    assert not marker.exists()


def test_an_ensemble_needs_a_digest_per_fold(tmp_path):
    folder, marker = trapped_model_folder(tmp_path, folds=("0", "1"))
    digests = {fold: sha256_file(folder / f"fold_{fold}" / nnunet.CHECKPOINT) for fold in ("0", "1")}
    with pytest.raises(CheckpointHashError, match="pins one digest but the model loads 2 checkpoints"):
        nnunet.describe_model_folder(folder, CheckpointPins.from_setting(digests["0"]))
    with pytest.raises(CheckpointHashError, match=r"fold_1/checkpoint_final\.pth: no pinned digest"):
        nnunet.describe_model_folder(folder, CheckpointPins.from_setting(f"fold_0={digests['0']}"))
    # The refusal says what to set once the files are checked.
    with pytest.raises(CheckpointHashError) as refused:
        nnunet.describe_model_folder(folder, CheckpointPins.from_setting(None))
    assert f"`fold_0={digests['0']},fold_1={digests['1']}`" in str(refused.value)
    assert not marker.exists()
    # Both pinned and matching: verified (only bytes read so far). Reading one is still refused, by
    # torch's weights-only unpickler, and the trap does not run.
    pins = CheckpointPins.from_setting(f"fold_0={digests['0']}, fold_1={digests['1']}")
    assert pins.verify(folder) == digests and not marker.exists()
    with pytest.raises(ModelFolderError) as refused:
        nnunet.describe_model_folder(folder, pins)
    message = str(refused.value)
    assert f"{folder / 'fold_0' / nnunet.CHECKPOINT}: refused by torch's weights-only loader" in message
    assert "nothing of it was run" in message and "weights_only=False" not in message and "safe_globals" not in message
    assert not marker.exists()


def test_an_installed_model_is_checked_against_the_digests_current_json_recorded(tmp_path):
    folder, marker = trapped_model_folder(tmp_path)
    models_root = tmp_path
    recorded = {"folder": folder.name, "checkpoint_sha256_by_fold": {"all": B}}
    with pytest.raises(CheckpointHashError) as refused:
        nnunet.describe_model_folder(folder, nnunet.installed_model_pins(models_root, recorded))
    message = str(refused.value)
    assert f"expected {B}" in message and str(models_root / "current.json") in message
    assert "materialize segmentation_model" in message
    # A pointer written before digests were recorded pins nothing: refused as well.
    with pytest.raises(CheckpointHashError, match="no SHA-256 is pinned"):
        nnunet.describe_model_folder(folder, nnunet.installed_model_pins(models_root, {"folder": folder.name}))
    assert not marker.exists()


def test_plans_naming_code_outside_the_network_packages_is_refused_before_unpickling(tmp_path):
    folder, marker = trapped_model_folder(tmp_path)
    pins = CheckpointPins.from_setting(sha256_file(folder / "fold_all" / nnunet.CHECKPOINT))  # the right digest
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"] = {"3d_fullres": {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv3d", "nonlin": "subprocess.Popen"},
        "_kw_requires_import": ["conv_op", "nonlin"]}}}
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFolderError, match=r"plans\.json: configuration '3d_fullres' names "
                                               r"nonlin='subprocess\.Popen', outside dynamic_network_architectures"):
        nnunet.describe_model_folder(folder, pins)
    assert not marker.exists()
    # A path that starts inside an allowed package but walks through a module's globals to reach
    # something else (here torch.load) is refused for what it reaches, not what it starts with.
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["nonlin"] = "torch.nn.modules.module.torch.load"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFolderError, match=r"names nonlin='torch\.nn\.modules\.module\.torch\.load', outside"):
        nnunet.describe_model_folder(folder, pins)
    assert not marker.exists()


def test_pins_setting_format():
    assert parse_pins(None) == parse_pins("  ") == {}
    assert parse_pins(A.upper()) == {"*": A}
    assert parse_pins(f"fold_0={A},1={B}\nfold_all={C}") == {"0": A, "1": B, "all": C}
    for bad, problem in [("abc", "not a SHA-256 pin"), (f"fold_x={A}", "not a SHA-256 pin"),
                         (f"0={A},fold_0={B}", "pinned twice"), (f"{A} 0={B}", "not both")]:
        with pytest.raises(ModelFolderError, match=problem):
            parse_pins(bad)


def test_the_digest_comes_from_the_environment_with_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("GCMLM_NNUNET_MODEL_FOLDER", str(tmp_path))
    monkeypatch.setenv("GCMLM_NNUNET_MODEL_SHA256", C)
    segmentation = resources("local")["segmentation"]
    assert (segmentation.trained_model_folder, segmentation.trained_model_sha256) == (str(tmp_path), C)
    assert segmentation.configured_model()["nnunet_trained_model_sha256"] == C
    monkeypatch.delenv("GCMLM_NNUNET_MODEL_SHA256")
    shown = resources("local")["segmentation"].configured_model()["nnunet_trained_model_sha256"]
    assert shown.startswith("not set: the folder is refused")


def test_a_checkpoint_is_unpickled_from_the_very_bytes_its_pin_was_checked_on(tmp_path):
    # What GastricSegmenter.load does per fold: read once, check the pin, unpickle from memory. A file
    # swapped after the folder's pins were verified fails the check; the pinned trap is still refused.
    folder, marker = trapped_model_folder(tmp_path)
    checkpoint = folder / "fold_all" / nnunet.CHECKPOINT
    with pytest.raises(CheckpointHashError) as swapped:
        nnunet.read_checkpoint(checkpoint, sha256=A)
    assert f"{checkpoint}: SHA-256 mismatch: expected {A}, found {sha256_file(checkpoint)}" in str(swapped.value)
    with pytest.raises(ModelFolderError) as refused:
        nnunet.read_checkpoint(checkpoint, sha256=sha256_file(checkpoint))
    assert f"{checkpoint}: refused by torch's weights-only loader" in str(refused.value)
    assert not marker.exists()
