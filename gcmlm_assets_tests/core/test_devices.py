"""Device resolution: `auto` falls back to the CPU locally; a GPU step on Kubernetes never does.

Runs on a machine where torch sees no CUDA GPU (CI, this project's CPU runners): there the
Kubernetes case must raise. On a machine with a GPU these tests are skipped, not faked.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest
import torch

from gcmlm_assets.devices import DeviceError, require_gpu_step_device, resolve_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")

NODE_SELECTOR = '{"nvidia.com/gpu.present": "true"}'
POD_SETTINGS = ("nvidia.com/gpu", "GCMLM_GPU_NODE_SELECTOR", "GCMLM_GPU_TOLERATIONS", "node selector",
                "tolerations", "NVIDIA device plugin")


@pytest.fixture
def on_kubernetes(monkeypatch):
    monkeypatch.setenv("GCMLM_ENV", "k8s")
    monkeypatch.setenv("GCMLM_GPU_NODE_SELECTOR", NODE_SELECTOR)
    monkeypatch.delenv("GCMLM_GPU_TOLERATIONS", raising=False)


@pytest.fixture
def local(monkeypatch):
    monkeypatch.delenv("GCMLM_ENV", raising=False)


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_a_gpu_step_on_kubernetes_without_a_gpu_fails_naming_the_pod_settings(on_kubernetes, requested):
    with pytest.raises(DeviceError) as raised:
        resolve_device(requested, "encoder.device", gpu_step=True)
    message = str(raised.value)
    for setting in POD_SETTINGS:
        assert setting in message, f"{setting!r} not named: {message}"
    assert f"encoder.device='{requested}'" in message and "GCMLM_ENV=k8s" in message
    assert f"GCMLM_GPU_NODE_SELECTOR={NODE_SELECTOR!r}" in message, "the value the pod has is shown"
    with pytest.raises(DeviceError, match="does not fall back to the CPU"):
        require_gpu_step_device(requested, "encoder.device")


def test_auto_still_falls_back_to_the_cpu_locally(local):
    device = resolve_device("auto", "encoder.device", gpu_step=True)
    assert device.name == "cpu" and "no CUDA GPU" in device.reason
    require_gpu_step_device("auto", "encoder.device")  # nothing to check outside Kubernetes


def test_on_kubernetes_an_explicit_cpu_and_non_gpu_steps_keep_the_cpu(on_kubernetes):
    assert resolve_device("cpu", "segmentation.device", gpu_step=True).name == "cpu"
    require_gpu_step_device("cpu", "segmentation.device")
    assert resolve_device("auto", "segmentation.device").name == "cpu"


@pytest.mark.parametrize("asset_name", ["uni_features", "ct_mask", "segmentation_model"])
def test_each_gpu_asset_fails_at_once_on_kubernetes_without_a_gpu(on_kubernetes, instance, data_root, asset_name):
    """The real asset, materialized in process with GCMLM_ENV=k8s: the step fails before any input is read."""
    from gcmlm_assets import step_pods
    from gcmlm_assets.definitions import build_definitions

    defs = build_definitions(env="local")  # the in-process executor; GCMLM_ENV is read by the step
    assets_def = next(a for a in defs.assets if dg.AssetKey(asset_name) in getattr(a, "keys", ()))
    assert step_pods.GPU_RESOURCE in json.dumps(assets_def.op.tags[step_pods.K8S_CONFIG_TAG]), \
        f"{asset_name} is a GPU-class step"
    partition = None
    if assets_def.partitions_def is not None:
        instance.add_dynamic_partitions(assets_def.partitions_def.name, ["P001"])
        partition = "P001"
    # No input exists under data_root: a step that read anything before its device check would fail
    # with another error.
    result = dg.materialize([assets_def], selection=[dg.AssetKey(asset_name)], partition_key=partition,
                            instance=instance, resources=defs.resources, raise_on_error=False)
    assert not result.success
    failures = [event for event in result.all_events if event.is_step_failure]
    assert len(failures) == 1, [event.event_type_value for event in result.all_events]
    error = failures[0].step_failure_data.error
    text = json.dumps(error.to_string() if hasattr(error, "to_string") else str(error))
    assert "GCMLM_GPU_NODE_SELECTOR" in text and "nvidia.com/gpu" in text, text[:3000]
    assert "DeviceError" in text, text[:3000]
