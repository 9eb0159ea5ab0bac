"""Kubernetes execution (GCMLM_ENV=k8s): every step runs as a Kubernetes job of its own.

dagster-k8s builds each step's job from, in this order (later wins, lists are appended):
the run launcher's settings in the instance (deploy/k8s/dagster.yaml: service account, the
`gcmlm-data` volume at /data, the `gcmlm-env` config map), the code location's container
context, the executor's `step_k8s_config` below, then the step's op tag
(`step_pods.op_tags`: the sizing of its class of work). Job-level `dagster-k8s/config` tags
are not used for step pods (dagster-k8s 0.29 builds them with `include_run_tags=False`;
gcmlm_assets_tests/deploy/test_step_jobs.py checks it). So what every step pod needs lives
here, once, and what differs by class stays in `step_pods.py`.

Every step pod:

- requests `step_pods.BASELINE` unless its op tag names a class (steps of stand-alone asset
  checks name none);
- runs as the image's non-root user (UID/GID `RUN_AS_UID`, the Dockerfile's `USER`), with the
  runtime's default seccomp profile, no privilege escalation and no Linux capabilities;
- has a read-only root filesystem. What a step writes outside `/data` goes to two disk-backed
  emptyDirs:
  - `scratch` at `/tmp`, where `HOME`, `TMPDIR`, the XDG cache and config folders and those of
    matplotlib and torch point, replacing the image's (under its read-only home). Nothing is
    downloaded there: encoder and nnU-Net weights are read from paths under /data;
  - `dagster-home` at `DAGSTER_HOME`: the step worker loads the instance from the run's
    instance reference, not from a `dagster.yaml` there, but writes the step's captured
    stdout/stderr under the instance's compute-log directory, `$DAGSTER_HOME/storage` unless
    the instance configures `compute_logs` elsewhere;
- does not mount a service-account token: the step worker talks to PostgreSQL, not to the
  Kubernetes API (the run worker, which creates the step jobs, keeps its token);
- pulls its image with `Always`, so a moved tag is never run from a stale node cache (layers
  already on the node are reused, only the manifest is checked).

`fsGroup` gives the pod's volumes the image's group; `fsGroupChangePolicy: OnRootMismatch` skips
the recursive ownership change when the volume's root already has it, so a step pod does not walk
all of /data before it starts. (Volume types without ownership management, NFS for one, ignore
`fsGroup`: such a share must already be writable by UID/GID 10001.)
"""

from __future__ import annotations

import dagster as dg
from dagster_k8s import k8s_job_executor
from dagster_k8s.job import DAGSTER_HOME_DEFAULT

from gcmlm_assets import step_pods

# Step pods of one run at a time (per run, not global; GPU steps are also bounded by the
# instance's `gpu` pool).
MAX_CONCURRENT = 16
# The Dockerfile's non-root user and group.
RUN_AS_UID = 10001
# DAGSTER_HOME in step pods: the run launcher's `dagster_home`, which deploy/k8s/dagster.yaml
# leaves at dagster-k8s's default.
DAGSTER_HOME = DAGSTER_HOME_DEFAULT
SCRATCH_DIR = "/tmp"
# Past these sizes the kubelet evicts the pod: temporary files and caches; captured step logs.
SCRATCH_SIZE = "10Gi"
DAGSTER_HOME_SIZE = "1Gi"
SCRATCH_ENV = {
    "HOME": SCRATCH_DIR,
    "TMPDIR": SCRATCH_DIR,
    "XDG_CACHE_HOME": f"{SCRATCH_DIR}/.cache",
    "XDG_CONFIG_HOME": f"{SCRATCH_DIR}/.config",
    "TORCH_HOME": f"{SCRATCH_DIR}/.cache/torch",
    "MPLCONFIGDIR": f"{SCRATCH_DIR}/.config/matplotlib",
}


def pod_security_context() -> dict:
    return {
        "run_as_non_root": True,
        "run_as_user": RUN_AS_UID,
        "run_as_group": RUN_AS_UID,
        "fs_group": RUN_AS_UID,
        "fs_group_change_policy": "OnRootMismatch",
        "seccomp_profile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    return {
        "run_as_non_root": True,
        "run_as_user": RUN_AS_UID,
        "run_as_group": RUN_AS_UID,
        "privileged": False,
        "allow_privilege_escalation": False,
        "read_only_root_filesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccomp_profile": {"type": "RuntimeDefault"},
    }


def step_k8s_config() -> dict:
    """The executor's `step_k8s_config`: what every step pod gets, whatever its class of work."""
    return {
        "container_config": {
            # Replaced by the class's own requests where the op tag names a class.
            "resources": step_pods.resources(step_pods.BASELINE),
            "image_pull_policy": "Always",
            "security_context": container_security_context(),
            "env": [{"name": name, "value": value} for name, value in SCRATCH_ENV.items()],
            "volume_mounts": [
                {"name": "scratch", "mount_path": SCRATCH_DIR},
                {"name": "dagster-home", "mount_path": DAGSTER_HOME},
            ],
        },
        "pod_spec_config": {
            "security_context": pod_security_context(),
            "automount_service_account_token": False,
            "volumes": [
                {"name": "scratch", "empty_dir": {"size_limit": SCRATCH_SIZE}},
                {"name": "dagster-home", "empty_dir": {"size_limit": DAGSTER_HOME_SIZE}},
            ],
        },
    }


def executor_config() -> dict:
    return {"max_concurrent": MAX_CONCURRENT, "step_k8s_config": step_k8s_config()}


def k8s_executor() -> dg.ExecutorDefinition:
    return k8s_job_executor.configured(executor_config())
