"""Where things live, read from the environment once.

`GCMLM_DATA_ROOT` (default `./data`) holds the landing zone, the artifacts and
the Dagster home; each can be moved on its own with its own variable.

The environment is read here and in profiles.py only (gcmlm_assets_tests/core/test_environment.py):
each variable the platform reads has its function below, with its default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("GCMLM_DATA_ROOT", "data")).resolve()


def landing_root() -> Path:
    return Path(os.environ.get("GCMLM_LANDING_ROOT", data_root() / "landing")).resolve()


def artifacts_root() -> Path:
    return Path(os.environ.get("GCMLM_ARTIFACTS_ROOT", data_root() / "artifacts")).resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", data_root() / "dagster_home")).resolve()


def environment() -> str:
    """`local` (default) or `k8s`: selects executor and resources."""
    env = os.environ.get("GCMLM_ENV", "local").strip().lower()
    if env not in ("local", "k8s"):
        raise ValueError(f"GCMLM_ENV must be 'local' or 'k8s', got {env!r}")
    return env


def on_kubernetes() -> bool:
    """`GCMLM_ENV` is `k8s` (read as `environment()` reads it, without refusing other values)."""
    return os.environ.get("GCMLM_ENV", "local").strip().lower() == "k8s"


def gpu_batch_patients(default: int) -> str:
    """`GCMLM_GPU_BATCH_PATIENTS` as written (batching.py checks it)."""
    return os.environ.get("GCMLM_GPU_BATCH_PATIENTS", str(default))


def gpu_node_selector() -> str:
    """`GCMLM_GPU_NODE_SELECTOR` as written ("" when unset; step_pods.py parses the JSON)."""
    return os.environ.get("GCMLM_GPU_NODE_SELECTOR", "")


def gpu_tolerations() -> str:
    """`GCMLM_GPU_TOLERATIONS` as written ("" when unset; step_pods.py parses the JSON)."""
    return os.environ.get("GCMLM_GPU_TOLERATIONS", "")


def gpu_shm_size() -> str:
    """`GCMLM_GPU_SHM`: the size of a GPU pod's shared-memory volume."""
    return os.environ.get("GCMLM_GPU_SHM", "16Gi")


def gpu_pod_variables() -> dict[str, str | None]:
    """The variables that place a pod on a GPU and show it one (for the message of a pod without one)."""
    return {name: os.environ.get(name) for name in ("GCMLM_GPU_NODE_SELECTOR", "GCMLM_GPU_TOLERATIONS",
                                                    "NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}


def nnunet_model_folder() -> str | None:
    """`GCMLM_NNUNET_MODEL_FOLDER`: a trained nnU-Net model folder (None when unset or empty)."""
    return os.environ.get("GCMLM_NNUNET_MODEL_FOLDER") or None


def nnunet_model_sha256() -> str | None:
    """`GCMLM_NNUNET_MODEL_SHA256`: the digests of that folder's checkpoints (None when unset or empty)."""
    return os.environ.get("GCMLM_NNUNET_MODEL_SHA256") or None


def cublas_workspace_config() -> str | None:
    """`CUBLAS_WORKSPACE_CONFIG`, when the caller set it (deterministic seeding keeps it)."""
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def encoder_checkpoint(variable: str) -> str:
    """The checkpoint path in the encoder's own variable (its spec's `checkpoint_env`; "" when unset)."""
    return os.environ.get(variable, "")


def test_data_root() -> str | None:
    """`GCMLM_TEST_DATA`: the folder of real test files the demo may blend in (None when unset)."""
    return os.environ.get("GCMLM_TEST_DATA")


def intake_pseudonym_table() -> Path | None:
    """`GCMLM_INTAKE_PSEUDONYM_TABLE`: the DICOM receiver's real id -> pseudonym table (no default:
    the operator chooses a place outside the landing zone and the artifacts)."""
    value = os.environ.get("GCMLM_INTAKE_PSEUDONYM_TABLE")
    return Path(value).resolve() if value else None


def intake_host() -> str:
    """`GCMLM_INTAKE_HOST`: the address the DICOM receiver listens on (this machine only by default)."""
    return os.environ.get("GCMLM_INTAKE_HOST", "127.0.0.1")


def intake_port() -> int:
    """`GCMLM_INTAKE_PORT`: the DICOM receiver's port (11112, DICOM's registered non-privileged port)."""
    return int(os.environ.get("GCMLM_INTAKE_PORT", "11112"))


def intake_ae_title() -> str:
    """`GCMLM_INTAKE_AE_TITLE`: the DICOM receiver's AE title."""
    return os.environ.get("GCMLM_INTAKE_AE_TITLE", "GCMLM")


def intake_calling_ae_titles() -> tuple[str, ...]:
    """`GCMLM_INTAKE_CALLING_AE_TITLES`: comma-separated AE titles allowed to send (empty: any)."""
    return tuple(t.strip() for t in os.environ.get("GCMLM_INTAKE_CALLING_AE_TITLES", "").split(",") if t.strip())


def intake_quiet_s() -> float:
    """`GCMLM_INTAKE_QUIET_S`: seconds without a new instance before a patient's READY is written."""
    return float(os.environ.get("GCMLM_INTAKE_QUIET_S", "60"))


def process_environment() -> dict[str, str]:
    """A copy of this process's environment (for a child process to start from)."""
    return dict(os.environ)


def use_dagster_home(home: str | os.PathLike) -> None:
    """`DAGSTER_HOME` for the rest of this process (and the processes it starts)."""
    os.environ["DAGSTER_HOME"] = str(home)


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block only; each is restored (or removed) afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
