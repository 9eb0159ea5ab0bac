"""What each step's Kubernetes pod asks for, by class of work: the one place op tags are made.

Every asset names its class (`GPU`, `CPU` or `COHORT`) and gets the `dagster-k8s/config` op tag
built here. dagster-k8s's `k8s_job_executor` reads op tags, never job-level tags, when it builds a
step's pod, so the sizing lives on the ops. Locally the tags are inert.

Where GPU pods run (node selector, tolerations) is cluster-specific, so it comes from the code
location's environment at import time:

- `GCMLM_GPU_NODE_SELECTOR`: a JSON object, e.g. `{"nvidia.com/gpu.present": "true"}` (default `{}`);
- `GCMLM_GPU_TOLERATIONS`: a JSON list of tolerations (default: tolerate the `nvidia.com/gpu`
  taint that GPU node pools usually carry);
- `GCMLM_GPU_SHM`: size of the memory-backed `/dev/shm` of GPU pods (default `16Gi`), where
  PyTorch DataLoader workers pass batches; the container default (64 MiB) fails with "bus error".

GPU steps also share the concurrency pool `GPU_POOL`; its limit (the number of GPUs the platform
may hold at once) is set on the instance (deploy/k8s/dagster.yaml and deploy/README.md).
Plain Python: no dagster import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gcmlm_assets import settings

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_POOL = "gpu"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


class PodSettingsError(ValueError):
    """A GCMLM_GPU_* environment variable that cannot be used, named in the message."""


@dataclass(frozen=True)
class WorkClass:
    name: str
    cpu: str
    memory: str
    gpus: int = 0
    # Memory limit for GPU pods: a runaway data loader is killed rather than starving the node.
    memory_limit: str | None = None

    def description(self) -> str:
        gpu = f", {self.gpus} GPU" if self.gpus else ""
        return f"{self.name}: {self.cpu} CPU, {self.memory} memory requested{gpu}"


# GPU steps (nnU-Net training and prediction, UNI patch encoding): 8 DataLoader / augmentation
# workers decoding slide tiles or CT patches feed one GPU.
GPU = WorkClass("gpu", cpu="8", memory="32Gi", gpus=1, memory_limit="48Gi")
# Per-patient CPU steps: CT conversion, PyRadiomics, tissue segmentation and tiling, pooling.
CPU = WorkClass("cpu", cpu="2", memory="8Gi")
# Cohort steps: fusion and the risk model's repeated cross-validation.
COHORT = WorkClass("cohort", cpu="4", memory="8Gi")
WORK_CLASSES = {c.name: c for c in (GPU, CPU, COHORT)}
# Steps that name no class (the stand-alone asset checks, which read one table): every step pod
# gets these requests from the executor's `step_k8s_config` (deploy_k8s.py); a class's op tag
# replaces them. Not a class for assets, so not in WORK_CLASSES.
BASELINE = WorkClass("baseline", cpu="1", memory="2Gi")


def _json_env(name: str, raw: str, default, kind: type):
    raw = raw.strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise PodSettingsError(f"{name} is not valid JSON ({error}): {raw!r}") from error
    if not isinstance(value, kind):
        raise PodSettingsError(f"{name} must be a JSON {kind.__name__}, got {raw!r}")
    return value


def gpu_placement() -> tuple[dict, list]:
    """(node selector, tolerations) of GPU pods, from the environment."""
    selector = _json_env("GCMLM_GPU_NODE_SELECTOR", settings.gpu_node_selector(), {}, dict)
    tolerations = _json_env("GCMLM_GPU_TOLERATIONS", settings.gpu_tolerations(), DEFAULT_GPU_TOLERATIONS, list)
    return selector, tolerations


def resources(work: WorkClass) -> dict:
    """The container `resources` of a step of this class: requests, and limits for GPU steps only."""
    result: dict = {"requests": {"cpu": work.cpu, "memory": work.memory}}
    if work.gpus:
        limits = {GPU_RESOURCE: str(work.gpus)}
        if work.memory_limit:
            limits["memory"] = work.memory_limit
        result["limits"] = limits
    return result


def k8s_config(work: WorkClass) -> dict:
    """The `dagster-k8s/config` value for a step of this class."""
    container: dict = {"resources": resources(work)}
    config: dict = {"container_config": container}
    if work.gpus:
        container["volume_mounts"] = [{"name": "dshm", "mount_path": "/dev/shm"}]
        selector, tolerations = gpu_placement()
        pod_spec: dict = {
            "volumes": [{"name": "dshm", "empty_dir": {
                "medium": "Memory", "size_limit": settings.gpu_shm_size()}}],
            "tolerations": tolerations,
        }
        if selector:
            pod_spec["node_selector"] = selector
        config["pod_spec_config"] = pod_spec
    return config


def op_tags(work: WorkClass) -> dict[str, dict]:
    """Op tags of an asset whose step is of class `work`."""
    return {K8S_CONFIG_TAG: k8s_config(work)}
