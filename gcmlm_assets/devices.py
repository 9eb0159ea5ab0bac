"""Which torch device a step runs its model on: `auto` follows the pod (or machine) it lands on.

`auto` (the default) is CUDA where the process sees a CUDA GPU and the CPU otherwise, and says
which and why. An explicit `cuda` where there is none is a misconfiguration: it fails with a
message naming the setting, rather than silently running a GPU workload on a CPU.

On Kubernetes (GCMLM_ENV=k8s) a GPU-class step (`step_pods.GPU`: segmentation_model, ct_mask,
uni_features) runs in a pod sized for a GPU; seeing none there means the pod landed on the wrong
node or lost its GPU limit, so `auto` does not fall back to the CPU: the step fails at once,
naming the pod settings to check. An explicit `cpu` is still honoured there (a deliberate choice).
`auto` keeps its fallback for local runs.
Plain Python; torch is imported only when a device is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

from gcmlm_assets import settings

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")


class DeviceError(ValueError):
    """A device setting this process cannot honour; the message names the setting."""


@dataclass(frozen=True)
class ResolvedDevice:
    name: str  # "cuda", "cpu" or "mps": what torch is given
    reason: str  # shown in the asset's metadata

    def __str__(self) -> str:
        return self.name


def on_kubernetes() -> bool:
    return settings.on_kubernetes()


def no_gpu_in_pod_message(setting: str, requested: str) -> str:
    """Why a GPU step on Kubernetes refuses to run without a GPU, and which pod settings to check."""
    seen = settings.gpu_pod_variables()
    shown = ", ".join(f"{name}={value!r}" for name, value in seen.items() if value is not None) or "none set"
    return (f"GPU step on Kubernetes (GCMLM_ENV=k8s) but this pod sees no CUDA GPU "
            f"(torch.cuda.is_available() is False, {setting}={requested!r}); it does not fall back to the CPU. "
            "Check the step pod's settings: its container's nvidia.com/gpu limit (step_pods.GPU, from the "
            "op's dagster-k8s/config tag), its node selector (GCMLM_GPU_NODE_SELECTOR) and tolerations "
            "(GCMLM_GPU_TOLERATIONS) that place it on a GPU node, and that the node runs the NVIDIA device "
            f"plugin. Seen here: {shown}. To run it on the CPU deliberately, set {setting}='cpu'")


def resolve_device(requested: str, setting: str, gpu_step: bool = False) -> ResolvedDevice:
    """The device for `requested` ("auto", "cuda", "cpu", "mps"); `setting` names where it was set.

    `gpu_step`: the caller is a GPU-class step; on Kubernetes `auto` then raises instead of
    falling back to the CPU (see the module docstring).
    """
    requested = (requested or "auto").strip().lower()
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"{setting}={requested!r} is not a device; choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "cpu":
        return ResolvedDevice("cpu", f"{setting}='cpu'")
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        if has_cuda:
            return ResolvedDevice("cuda", f"{setting}='auto': CUDA GPU {torch.cuda.get_device_name(0)} found")
        if gpu_step and on_kubernetes():
            raise DeviceError(no_gpu_in_pod_message(setting, requested))
        return ResolvedDevice("cpu", f"{setting}='auto': no CUDA GPU visible to this process, using the CPU")
    if requested == "cuda":
        if not has_cuda and gpu_step and on_kubernetes():
            raise DeviceError(no_gpu_in_pod_message(setting, requested))
        if not has_cuda:
            raise DeviceError(
                f"{setting}='cuda' but this process sees no CUDA GPU (torch.cuda.is_available() is False): "
                f"run the step where a GPU is (GCMLM_ENV=k8s gives GPU steps a pod with nvidia.com/gpu: 1; check "
                f"the pod's GPU limit, node selector and tolerations) or set {setting}='auto' or 'cpu'")
        return ResolvedDevice("cuda", f"{setting}='cuda'")
    if not torch.backends.mps.is_available():
        raise DeviceError(f"{setting}='mps' but this machine has no usable Apple GPU; set {setting}='auto' or 'cpu'")
    return ResolvedDevice("mps", f"{setting}='mps'")


def require_gpu_step_device(requested: str, setting: str) -> None:
    """Called first by each GPU-class step: on Kubernetes, fail at once when its pod has no GPU.

    Locally it does nothing (the step resolves its device when it loads its model, `auto` falling
    back to the CPU). Nothing heavy is loaded here beyond torch itself.
    """
    if on_kubernetes():
        resolve_device(requested, setting, gpu_step=True)
