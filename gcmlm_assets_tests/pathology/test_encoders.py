"""Encoder registry: local weights only, strict and safe loading, identity in metadata."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from gcmlm_assets.pathology.encoders import UNTRAINED, EncoderError, get_spec, load_encoder
from gcmlm_assets.pathology.extract import normalisation_constants, normalise_batch
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.pathology.features import slide_path


def _one_patch(test_data: Path, encoder) -> torch.Tensor:
    """One real tissue patch through the encoder's transform (224 px, ImageNet-normalised)."""
    import openslide

    with openslide.OpenSlide(str(slide_path(test_data))) as slide:
        rgb = np.asarray(slide.read_region((818, 1089), 0, (224, 224)).convert("RGB"))
    mean, inv_std = normalisation_constants(encoder, torch.device("cpu"))
    return normalise_batch(torch.from_numpy(rgb.copy())[None], mean, inv_std)


@pytest.mark.slow
def test_uni_checkpoint_round_trip_bin_and_safetensors(tmp_path, test_data, monkeypatch):
    # UNI's architecture with random weights stands in for the real checkpoint,
    # which cannot be downloaded here; ViT-L on CPU is slow, so one patch only.
    torch.manual_seed(1)
    original = get_spec("uni").build().eval()
    state = original.state_dict()
    bin_path = tmp_path / "pytorch_model.bin"
    st_path = tmp_path / "model.safetensors"
    torch.save(state, bin_path)
    save_file(state, str(st_path))
    del state

    from_bin = load_encoder("uni", bin_path)
    monkeypatch.setenv("GCMLM_UNI_CHECKPOINT", str(st_path))  # the setting named in errors
    from_safetensors = load_encoder("uni", None)

    patch = _one_patch(test_data, from_bin)
    with torch.inference_mode():
        expected = original(patch)
        got_bin = from_bin.module(patch)
        got_st = from_safetensors.module(patch)
    assert expected.shape == (1, 1024)
    assert torch.equal(got_bin, expected)
    assert torch.equal(got_st, expected)
    identity = from_bin.identity()
    assert identity["encoder"] == "uni" and identity["embedding_dim"] == 1024
    assert identity["checkpoint_sha256"] == sha256_file(bin_path)
    assert from_safetensors.identity()["checkpoint_sha256"] == sha256_file(st_path)
    assert identity["untrained"] is False


def test_uni_without_checkpoint_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("GCMLM_UNI_CHECKPOINT", raising=False)
    with pytest.raises(EncoderError, match="GCMLM_UNI_CHECKPOINT") as info:
        load_encoder("uni")
    assert "encoder.checkpoint" in str(info.value)

    missing = tmp_path / "nowhere" / "pytorch_model.bin"
    with pytest.raises(EncoderError, match="does not exist") as info:
        load_encoder("uni", missing)
    assert str(missing) in str(info.value) and "GCMLM_UNI_CHECKPOINT" in str(info.value)


def test_mismatched_checkpoint_fails_strict_load(tmp_path):
    small = load_encoder("vit-tiny-random")
    wrong = tmp_path / "pytorch_model.bin"
    torch.save(small.module.state_dict(), wrong)
    with pytest.raises(EncoderError, match="does not match encoder 'uni'") as info:
        load_encoder("uni", wrong)
    assert str(wrong) in str(info.value) and "size mismatch" in str(info.value)

    # One extra key is enough to refuse a checkpoint: loading is strict.
    extra = dict(small.module.state_dict())
    extra["head.weight"] = torch.zeros(3, 192)
    extra_path = tmp_path / "extra.safetensors"
    save_file({k: v.contiguous() for k, v in extra.items()}, str(extra_path))
    with pytest.raises(EncoderError, match="Unexpected key"):
        load_encoder("vit-tiny-random", extra_path)


def test_checkpoint_with_code_is_refused(tmp_path, capfd):
    # A pickle that would run code on load: weights_only must refuse it.
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    with pytest.raises(EncoderError, match="cannot be read as weights"):
        load_encoder("vit-tiny-random", path)
    assert "pickled code ran" not in capfd.readouterr().out


def test_resnet50_trunc_matches_layer3_average_pool(tmp_path, test_data):
    torch.manual_seed(2)
    full = timm.create_model("resnet50", pretrained=False).eval()
    checkpoint = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), checkpoint)  # a full ResNet-50 checkpoint (layer4 and fc included)

    loaded = load_encoder("resnet50-trunc", checkpoint)
    patch = _one_patch(test_data, loaded)
    with torch.inference_mode():
        x = full.maxpool(full.act1(full.bn1(full.conv1(patch))))
        expected = full.layer3(full.layer2(full.layer1(x))).mean(dim=(2, 3))
        got = loaded.module(patch)
    assert got.shape == (1, 1024)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert loaded.untrained is False and loaded.checkpoint_sha256 == sha256_file(checkpoint)

    untrained = load_encoder("resnet50-trunc", random_weights_allowed=True)
    assert untrained.untrained and untrained.identity()["checkpoint_sha256"] == UNTRAINED


def test_resnet50_trunc_without_weights_is_refused_outside_the_demo_profile(monkeypatch):
    from gcmlm_assets.pathology.resources import resources
    from gcmlm_assets.profiles import DEMO, PRODUCTION

    monkeypatch.delenv("GCMLM_RESNET50_CHECKPOINT", raising=False)
    with pytest.raises(EncoderError, match="would run on random weights") as refused:
        load_encoder("resnet50-trunc")
    assert "GCMLM_RESNET50_CHECKPOINT" in str(refused.value) and "demo profile" in str(refused.value)
    production = resources("local", PRODUCTION)["encoder"].model_copy(update={"name": "resnet50-trunc"})
    # the landing sensor holds pathology runs with this reason, and a step fails with it
    assert "would run on random weights" in production.missing_weights()
    assert production.configured_encoder()["encoder_checkpoint"].startswith("not configured")
    with pytest.raises(EncoderError, match="would run on random weights"):
        production.load()
    demo = resources("local", DEMO)["encoder"].model_copy(update={"name": "resnet50-trunc"})
    assert demo.missing_weights() is None
    assert demo.load()[0].untrained


def test_small_encoder_is_untrained_and_reproducible():
    first = load_encoder("vit-tiny-random")
    second = load_encoder("vit-tiny-random")
    assert first.untrained and first.identity()["checkpoint_sha256"] == UNTRAINED
    assert first.weights_sha256 == second.weights_sha256
    assert first.embedding_dim == 192
    # The fixed seed must not disturb the caller's random stream.
    torch.manual_seed(5)
    a = torch.rand(1)
    torch.manual_seed(5)
    load_encoder("vit-tiny-random")
    assert torch.equal(torch.rand(1), a)


def test_unknown_encoder_lists_known_names():
    with pytest.raises(EncoderError, match="known encoders: resnet50-trunc, uni, vit-tiny-random"):
        load_encoder("uni2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_encoder_device_auto_follows_the_machine_and_says_why():
    from gcmlm_assets.pathology.resources import PatchEncoder

    model, device = PatchEncoder(name="vit-tiny-random").load()
    assert device.name == "cpu" and model.device.type == "cpu"
    assert "encoder.device='auto'" in device.reason and "no CUDA GPU" in device.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_encoder_device_cuda_without_a_gpu_fails_naming_the_setting():
    from gcmlm_assets.devices import DeviceError
    from gcmlm_assets.pathology.resources import PatchEncoder

    with pytest.raises(DeviceError, match=r"encoder.device='cuda' but this process sees no CUDA GPU"):
        PatchEncoder(name="vit-tiny-random", device="cuda").load()
    with pytest.raises(DeviceError, match="not a device"):
        PatchEncoder(name="vit-tiny-random", device="gpu").load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_names_the_setting():
    with pytest.raises(EncoderError, match="encoder.device"):
        load_encoder("vit-tiny-random", device="cuda")
