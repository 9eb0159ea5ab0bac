"""Which torch device a step runs its model on: `auto` follows the pod (or machine) it lands on.

`auto` (the default) is CUDA where the process sees a CUDA GPU and the CPU otherwise, and says
which and why. An explicit `cuda` where there is none is a misconfiguration: it fails with a
message naming the setting, rather than silently running a GPU workload on a CPU.
Plain Python; torch is imported only when a device is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")


class DeviceError(ValueError):
    """A device setting this process cannot honour; the message names the setting."""


@dataclass(frozen=True)
class ResolvedDevice:
    name: str  # "cuda", "cpu" or "mps": what torch is given
    reason: str  # shown in the asset's metadata

    def __str__(self) -> str:
        return self.name


def resolve_device(requested: str, setting: str) -> ResolvedDevice:
    """The device for `requested` ("auto", "cuda", "cpu", "mps"); `setting` names where it was set."""
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
        return ResolvedDevice("cpu", f"{setting}='auto': no CUDA GPU visible to this process, using the CPU")
    if requested == "cuda":
        if not has_cuda:
            raise DeviceError(
                f"{setting}='cuda' but this process sees no CUDA GPU (torch.cuda.is_available() is False): "
                f"run the step where a GPU is (GCMLM_ENV=k8s gives GPU steps a pod with nvidia.com/gpu: 1; check "
                f"the pod's GPU limit, node selector and tolerations) or set {setting}='auto' or 'cpu'")
        return ResolvedDevice("cuda", f"{setting}='cuda'")
    if not torch.backends.mps.is_available():
        raise DeviceError(f"{setting}='mps' but this machine has no usable Apple GPU; set {setting}='auto' or 'cpu'")
    return ResolvedDevice("mps", f"{setting}='mps'")
