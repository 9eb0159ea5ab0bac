"""The Kubernetes Job of every step, as dagster-k8s builds it for the production deployment.

The jobs are built by dagster-k8s's own step handler, in a child process, by
gcmlm_assets_tests/support/deploy/step_jobs.py (its docstring says how and why).

Each manifest is validated against the Kubernetes OpenAPI schema of one pinned version
(`kubernetes-validate`, strict: unknown fields fail), checked for what each class of work and every
pod must have, and scanned by checkov (its own virtualenv, `.venv-checkov`, made by `make test`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gcmlm_assets import step_pods
from gcmlm_assets_tests.support.deploy.step_jobs import (
    ASSET_CLASSES, GPU_NODE_SELECTOR, GPU_TOLERATIONS, KUBERNETES_VERSIONS, PROJECT_ROOT, RUN_TAG_CONFIG,
    RUN_TAG_MARKER, TEST_IMAGE, TEST_NAMESPACE, container_of, pod_spec_of, validation_failures,
)

RUN_AS_UID = 10001
DATA_PVC, DATA_MOUNT = "gcmlm-data", "/data"
SCRATCH_ENV = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TORCH_HOME", "MPLCONFIGDIR")


# checkov findings accepted on step jobs, each for a stated reason. Anything else fails the test,
# and so does an entry here that no longer fails anywhere.
CHECKOV_SKIPS = {
    # CPU limits: none on any class. A CPU limit throttles a step (CFS quota) while the node has
    # idle cores; the requests are what the scheduler reserves.
    "CKV_K8S_11": "CPU limits intentionally absent: requests reserve, limits would only throttle",
    # Memory limits: GPU steps have one (step_pods.GPU.memory_limit); CPU, cohort and check steps
    # have requests only, by design, so that a large patient can use the node's free memory. The
    # cost: over its request such a pod is among the first evicted under node memory pressure.
    "CKV_K8S_13": "memory limits only on GPU steps; CPU/cohort/check steps burst over requests",
    # The image is whatever the code location is deployed from (Helm values / DAGSTER_CURRENT_IMAGE);
    # pinning it by digest is the deployer's choice, not something the step config sets.
    "CKV_K8S_43": "image digest pinning belongs to the deployment's image reference",
    # A NetworkPolicy is a namespace object of its own (the Helm chart's), selecting pods by label
    # (app.kubernetes.io/component=step_worker); no field of a step's Job can provide one.
    "CKV2_K8S_6": "NetworkPolicy for step pods must ship with the Helm chart, not the Job",
}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def jobs(built) -> dict[str, dict]:
    """Step key -> Job manifest, for the run without job-level tags."""
    return built["runs"]["plain"]["jobs"]


def _asset_step(built: dict, asset: str) -> str:
    steps = [key for key, step in built["steps"].items() if asset in step["assets"]]
    assert len(steps) == 1, f"{asset}: steps {steps} materialize it"
    return steps[0]


def _env(container: dict) -> dict[str, str]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _volumes(job: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec_of(job).get("volumes", [])}


def _mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


# ---------------------------------------------------------------- the executor and the steps

def test_jobs_come_from_the_k8s_step_handler_with_the_deploy_executor_config(built):
    from gcmlm_assets import deploy_k8s

    executor = built["executor"]
    assert executor["step_handler"] == "K8sStepHandler"
    assert executor["max_concurrent"] == deploy_k8s.MAX_CONCURRENT
    resolved = {key: value for key, value in executor["config"]["step_k8s_config"].items() if value}
    assert resolved == json.loads(json.dumps(deploy_k8s.step_k8s_config()))


def test_every_asset_of_the_definitions_has_a_class_here(built):
    assets = {a for step in built["steps"].values() for a in step["assets"]}
    assert assets == set(ASSET_CLASSES), "an asset was added or removed: give it a class in ASSET_CLASSES"


@pytest.mark.parametrize("asset", sorted(ASSET_CLASSES))
def test_each_asset_pod_is_sized_by_its_class(built, jobs, asset):
    work = ASSET_CLASSES[asset]
    step = _asset_step(built, asset)
    assert built["steps"][step]["has_k8s_tag"], (
        f"{asset}: its op has no {step_pods.K8S_CONFIG_TAG} tag; "
        f"expected op_tags=step_pods.op_tags(step_pods.{work.name.upper()})")
    job = jobs[step]
    pod, container = pod_spec_of(job), container_of(job)
    resources = container["resources"]
    assert resources["requests"] == {"cpu": work.cpu, "memory": work.memory}, f"{asset}: {resources}"
    if work.gpus:
        assert resources["limits"] == {"nvidia.com/gpu": "1", "memory": work.memory_limit}, f"{asset}: {resources}"
        assert pod["nodeSelector"] == GPU_NODE_SELECTOR
        assert pod["tolerations"] == GPU_TOLERATIONS
        shm = _mounts(container)["/dev/shm"]
        assert _volumes(job)[shm["name"]]["emptyDir"]["medium"] == "Memory"
    else:
        assert not resources.get("limits"), f"{asset} ({work.name}) should request only: {resources}"
        assert "nvidia.com/gpu" not in json.dumps(job)
        assert not pod.get("nodeSelector") and not pod.get("tolerations"), f"{asset}: placed like a GPU pod"
        assert "/dev/shm" not in _mounts(container)


def test_steps_without_a_class_get_the_baseline_requests(built, jobs):
    unclassed = [key for key, step in built["steps"].items() if not step["has_k8s_tag"] and not step["assets"]]
    baseline = step_pods.resources(step_pods.BASELINE)
    for key in unclassed:
        assert container_of(jobs[key])["resources"] == baseline, key


def test_every_step_pod_runs_non_root_read_only_with_the_data_volume(built, jobs):
    assert set(jobs) == set(built["steps"])
    for key, job in jobs.items():
        pod, container = pod_spec_of(job), container_of(job)
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": RUN_AS_UID, "runAsGroup": RUN_AS_UID, "fsGroup": RUN_AS_UID,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}, key
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False, key
        assert security["capabilities"] == {"drop": ["ALL"]}, key
        assert security["readOnlyRootFilesystem"] is True, key
        assert security["runAsNonRoot"] is True and security["runAsUser"] == RUN_AS_UID, key
        assert pod["automountServiceAccountToken"] is False, key
        assert pod["serviceAccountName"] == "gcmlm-dagster", key
        assert container["image"] == TEST_IMAGE, key
        assert {"configMapRef": {"name": "gcmlm-env"}} in container["envFrom"], key
        assert job["metadata"]["namespace"] == TEST_NAMESPACE, key

        volumes, mounts = _volumes(job), _mounts(container)
        assert len(volumes) == len(pod["volumes"]), f"{key}: duplicate volume names"
        assert len(mounts) == len(container["volumeMounts"]), f"{key}: duplicate mount paths"
        assert all(m["name"] in volumes for m in mounts.values()), key
        assert volumes[mounts[DATA_MOUNT]["name"]]["persistentVolumeClaim"] == {"claimName": DATA_PVC}, key
        # What the read-only root needs: every writable path is an emptyDir of its own.
        env = _env(container)
        writable = {path for path, m in mounts.items() if "emptyDir" in volumes[m["name"]]}
        assert "/tmp" in writable and env["DAGSTER_HOME"] in writable, f"{key}: {sorted(writable)}"
        for name in SCRATCH_ENV:
            assert env[name] == "/tmp" or env[name].startswith("/tmp/"), f"{key}: {name}={env[name]}"


def test_job_level_tags_never_reach_step_pods(built):
    tagged = built["runs"]["tagged"]
    assert json.loads(tagged["tags"][step_pods.K8S_CONFIG_TAG]) == RUN_TAG_CONFIG
    # The tag is well-formed and is read where dagster-k8s reads run tags: the run worker's pod.
    assert RUN_TAG_MARKER in json.dumps(tagged["run_pod_k8s_config"])
    assert set(tagged["jobs"]) == set(built["steps"])
    leaked = [key for key, job in tagged["jobs"].items() if RUN_TAG_MARKER in json.dumps(job)]
    assert not leaked, f"job-level dagster-k8s/config reached the step pods of {leaked}"
    for key, job in tagged["jobs"].items():
        plain = built["runs"]["plain"]["jobs"][key]
        assert pod_spec_of(job).get("nodeSelector") == pod_spec_of(plain).get("nodeSelector"), key
        assert container_of(job)["resources"] == container_of(plain)["resources"], key


# ---------------------------------------------------------------- the Kubernetes schema

def test_every_job_is_valid_for_kubernetes_1_29_to_1_35(built):
    manifests = {f"{label}/{key}": job for label, run in built["runs"].items() for key, job in run["jobs"].items()}
    manifests.update({f"{label}/run worker": run["run_worker"] for label, run in built["runs"].items()})
    failures = validation_failures(manifests)
    assert not failures, "\n".join(failures[:40])


def test_strict_validation_rejects_an_unknown_field(jobs):
    import kubernetes_validate

    job = copy.deepcopy(next(iter(jobs.values())))
    container_of(job)["securityContext"]["readOnlyRootFileSystem"] = True  # misspelt
    for version in KUBERNETES_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(job, version, strict=True)


# ---------------------------------------------------------------- checkov

def _checkov() -> Path:
    path = Path(os.environ.get("GCMLM_CHECKOV", PROJECT_ROOT / ".venv-checkov" / "bin" / "checkov"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"checkov not found at {path}: run `make .venv-checkov/bin/checkov` (make test does)",
                    pytrace=False)
    return path


def test_checkov_finds_nothing_outside_the_skip_list(jobs, tmp_path):
    checkov = _checkov()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for key, job in jobs.items():
        (manifests / f"{key}.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    # --skip-download: offline, no Prisma Cloud guidelines; checkov exits 1 when a check fails.
    done = subprocess.run([str(checkov), "-d", str(manifests), "--framework", "kubernetes", "-o", "json",
                           "--quiet", "--compact", "--skip-download"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), f"checkov exit {done.returncode}:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout)
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", done.stdout[:2000]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= len(jobs)
    failed = report["results"]["failed_checks"] if report["results"] else []
    unexpected = sorted({(f["check_id"], f["check_name"], Path(f["file_path"]).stem)
                         for f in failed if f["check_id"] not in CHECKOV_SKIPS})
    assert not unexpected, "checkov findings on step jobs:\n" + "\n".join(map(str, unexpected))
    stale = sorted(set(CHECKOV_SKIPS) - {f["check_id"] for f in failed})
    assert not stale, f"skipped checks that no longer fail, remove them from CHECKOV_SKIPS: {stale}"


# ---------------------------------------------------------------- import weight

def test_local_definitions_do_not_import_dagster_k8s():
    code = ("import sys, gcmlm_assets.definitions; "
            "print(sorted(m for m in ('dagster_k8s', 'kubernetes') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GCMLM_ENV": "local"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
