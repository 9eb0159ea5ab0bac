"""The Kubernetes Job of every step, as dagster-k8s builds it for the production deployment.

How the jobs are built: by dagster-k8s's own step handler, not by hand. A child process (see
"Why a child process" below) loads the real definitions (`build_definitions(env="k8s")`) and:

1. makes a Dagster instance whose `run_launcher` block is deploy/k8s/dagster.yaml's, plus two
   test-only keys (`load_incluster_config: false` and a kubeconfig file naming an unreachable
   server: nothing is ever sent to it). Its storage is a throwaway SQLite one, not PostgreSQL;
2. resolves the run config of the global asset job, which holds every asset and asset check,
   and creates the executor the way a run worker does: `ResolvedRunConfig.build` and the
   executor definition's `executor_creation_fn`. That executor is `deploy_k8s.k8s_executor()`,
   so `K8sStepHandler` gets the `step_k8s_config` and `max_concurrent` it has in production;
3. creates a real `DagsterRun` of that job (`instance.create_run_for_job`), whose code origin
   names the image (`TEST_IMAGE`) as a code location deployed from that image does, its
   execution plan, and a `PlanOrchestrationContext`;
4. for each step, asks the executor for its `StepHandlerContext`
   (`StepDelegatingExecutor._get_step_handler_context`, as the executor's loop does) and runs
   `K8sStepHandler.launch_step`: that builds the container context (`_get_container_context`:
   `K8sContainerContext.create_for_run(..., include_run_tags=False)` merged with the
   executor's context, then `get_user_defined_k8s_config` of the step's op tags) and the job
   (`construct_dagster_k8s_job` with `DagsterK8sJobConfig`), then calls the Kubernetes client's
   `BatchV1Api.create_namespaced_job`, which is replaced here by a recorder;
5. serializes each recorded `V1Job` with `ApiClient().sanitize_for_serialization` and sets
   `metadata.namespace` to the namespace it was created in (the API server does the same).

The two private names used (`_get_step_handler_context`, `_step_handler`) are those dagster's and
dagster-k8s's own tests use; a rename fails here, loudly.

It does this twice: for a plain run, and for a run carrying a job-level `dagster-k8s/config` tag
(run tags are where a job's tags and a launch's tags end up) that asks for distinctive settings.
dagster-k8s 0.29's step handler builds step pods with `include_run_tags=False`, so none of them
may appear in a step job; the run launcher's own path (`include_run_tags=True`, the run worker's
pod) is checked to show the tag itself is well-formed and would be seen if it were merged.

Why a child process: op tags are built when the asset modules are imported (from
`GCMLM_GPU_NODE_SELECTOR` / `GCMLM_GPU_TOLERATIONS`), and other tests of the session have
already imported them without those variables. The child starts clean with the variables set
(by monkeypatch, inherited by the child), so nothing is reloaded in this process and the other
tests keep their modules.

Then each manifest is validated against the Kubernetes OpenAPI schema of one pinned version
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
from gcmlm_assets_tests.support.deploy import chart_launcher

PROJECT_ROOT = Path(__file__).resolve().parents[2]
INSTANCE_YAML = PROJECT_ROOT / "deploy" / "k8s" / "dagster.yaml"

# The Kubernetes versions manifests are validated against (kubernetes-validate's strict schemas;
# 1.37.0 of the package ships 1.25 to 1.37).
KUBERNETES_VERSIONS = tuple(f"1.{minor}" for minor in range(29, 36))

TEST_IMAGE = "registry.example.com/gcmlm/gcmlm-assets:0.1.0"
TEST_NAMESPACE = "gcmlm-test"
# Distinctive, so that they cannot be mistaken for the defaults.
GPU_NODE_SELECTOR = {"gcmlm.example.com/accelerator": "h200"}
GPU_TOLERATIONS = [
    {"key": "gcmlm.example.com/gpu-only", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
]

# A job-level tag that must not reach step pods; each value is unique to it.
RUN_TAG_MARKER = "run-tag-must-not-reach-steps"
RUN_TAG_CONFIG = {
    "container_config": {
        "env": [{"name": "GCMLM_RUN_TAG_MARKER", "value": RUN_TAG_MARKER}],
        "resources": {"limits": {"cpu": "77"}},
    },
    "pod_spec_config": {"node_selector": {"gcmlm.example.com/run-tag": RUN_TAG_MARKER}},
    "pod_template_spec_metadata": {"labels": {"gcmlm.example.com/run-tag": RUN_TAG_MARKER}},
}

ASSET_CLASSES = {
    "segmentation_model": step_pods.GPU, "ct_mask": step_pods.GPU, "uni_features": step_pods.GPU,
    "ct_image": step_pods.CPU, "radiomics_row": step_pods.CPU, "patch_coords": step_pods.CPU,
    "slide_vector": step_pods.CPU,
    "clinical_table": step_pods.COHORT, "fused_table": step_pods.COHORT, "risk_model": step_pods.COHORT,
    "risk_scores": step_pods.COHORT, "risk_explanations": step_pods.COHORT,
}

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


# ---------------------------------------------------------------- building (child process)

def _kubeconfig(path: Path) -> Path:
    """A kubeconfig naming an unreachable server: the client needs one, nothing contacts it."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "offline", "user": {"token": "unused"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}],
    }))
    return path


def build_step_jobs(workdir: Path, source: str = "plain") -> dict:
    """Every step's Job, built by dagster-k8s's K8sStepHandler (see the module docstring).

    `source`: "plain" takes the run launcher from deploy/k8s/dagster.yaml; "chart" takes it, and
    the code location's container context, as the Helm chart renders them from
    deploy/helm/values.yaml with pull secrets set (chart_launcher.py), and builds one run only.
    Both also record the run worker's Job, made by `K8sRunLauncher.launch_run`.
    """
    from unittest import mock

    import kubernetes
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.execution.plan.active import ActiveExecution
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster._core.test_utils import instance_for_test
    from dagster_k8s.container_context import K8sContainerContext

    from gcmlm_assets.definitions import build_definitions

    defs = build_definitions(env="k8s")
    job_def = defs.resolve_implicit_global_asset_job_def()
    # The code location, as `dagster api grpc -m gcmlm_assets.definitions` serves it from the image.
    if source == "chart":
        values = chart_launcher.chart_values(chart_launcher.PULL_SECRET_OVERRIDES)
        image = chart_launcher.image_name(chart_launcher.the_deployment(values))
        container_context = chart_launcher.code_location_container_context(values)
        launcher = chart_launcher.run_launcher(values)
        run_tags = [("plain", {})]
    else:
        image, container_context = TEST_IMAGE, None
        launcher = copy.deepcopy(yaml.safe_load(INSTANCE_YAML.read_text(encoding="utf-8"))["run_launcher"])
        run_tags = [("plain", {}), ("tagged", {step_pods.K8S_CONFIG_TAG: json.dumps(RUN_TAG_CONFIG)})]
    repository = ReconstructableRepository.for_module(
        "gcmlm_assets.definitions", "defs", str(PROJECT_ROOT), container_image=image,
        container_context=container_context)
    recon_job = repository.get_reconstructable_job(job_def.name)

    launcher.setdefault("config", {}).update(
        load_incluster_config=False, kubeconfig_file=str(_kubeconfig(workdir / "kubeconfig")))

    nodes = {}
    for assets_def in [*defs.assets, *defs.asset_checks]:
        node = nodes.setdefault(assets_def.node_def.name, {"assets": [], "checks": []})
        node["assets"] += [key.to_user_string() for key in getattr(assets_def, "keys", ())]
        node["checks"] += [f"{key.asset_key.to_user_string()}:{key.name}" for key in assets_def.check_keys]

    created: list[tuple[object, str]] = []

    def record(_api, body, namespace, **_kwargs):
        created.append((body, namespace))

    serialize = kubernetes.client.ApiClient().sanitize_for_serialization
    result: dict = {"runs": {}, "steps": {}}
    with instance_for_test(overrides={"run_launcher": launcher}) as instance, \
            mock.patch.object(kubernetes.client.BatchV1Api, "create_namespaced_job", record):
        executor_config = ResolvedRunConfig.build(job_def, {}).execution.execution_engine_config
        executor = job_def.executor_def.executor_creation_fn(InitExecutorContext(
            job=recon_job, executor_def=job_def.executor_def, executor_config=executor_config,
            instance=instance))
        result["executor"] = {"config": executor_config, "max_concurrent": executor._max_concurrent,  # noqa: SLF001
                              "step_handler": type(executor._step_handler).__name__}  # noqa: SLF001
        plan = create_execution_plan(recon_job)
        for label, tags in run_tags:
            run = instance.create_run_for_job(job_def, execution_plan=plan, tags=tags,
                                              job_code_origin=recon_job.get_python_origin())
            plan_context = PlanOrchestrationContext(
                plan_data=PlanData(job=recon_job, dagster_run=run, instance=instance, execution_plan=plan),
                log_manager=create_context_free_log_manager(instance, run), executor=executor,
                output_capture=None)
            active = ActiveExecution(plan, retry_mode=executor.retries)
            jobs = {}
            for step in plan.steps:
                created.clear()
                context = executor._get_step_handler_context(plan_context, [step], active)  # noqa: SLF001
                list(executor._step_handler.launch_step(context))  # noqa: SLF001
                assert len(created) == 1, f"{step.key}: {len(created)} jobs created"
                body, namespace = created[0]
                manifest = serialize(body)
                manifest["metadata"]["namespace"] = namespace
                jobs[step.key] = manifest
                op = step.node_handle.name
                result["steps"][step.key] = {"op": op, "has_k8s_tag": step_pods.K8S_CONFIG_TAG in step.tags,
                                             **nodes.get(op, {"assets": [], "checks": []})}
            # The run worker's pod (K8sRunLauncher) does read run tags: the control for the tagged run.
            run_pod_config = K8sContainerContext.create_for_run(
                run, instance.run_launcher, include_run_tags=True).run_k8s_config.to_dict()
            created.clear()
            instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
            assert len(created) == 1, f"run worker: {len(created)} jobs created"
            run_worker = serialize(created[0][0])
            run_worker["metadata"]["namespace"] = created[0][1]
            result["runs"][label] = {"tags": dict(run.tags), "jobs": jobs, "run_worker": run_worker,
                                     "run_pod_k8s_config": json.loads(json.dumps(run_pod_config, default=str))}
    return result


def _main() -> None:
    out = Path(sys.argv[1])
    out.write_text(json.dumps(build_step_jobs(out.parent, *sys.argv[2:]), default=str))


if __name__ == "__main__":
    _main()


# ---------------------------------------------------------------- fixtures

def run_builder(out: Path, source: str, env: dict[str, str]) -> dict:
    """`build_step_jobs(source)` in a child process with `env` over this one's (see the module docstring)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("GCMLM_GPU_SHM", raising=False)
        done = subprocess.run([sys.executable, "-m", "gcmlm_assets_tests.deploy.test_step_jobs", str(out), source],
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"building the step jobs failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return run_builder(tmp_path_factory.mktemp("step_jobs") / "jobs.json", "plain", {
        "GCMLM_ENV": "k8s",
        "GCMLM_GPU_NODE_SELECTOR": json.dumps(GPU_NODE_SELECTOR),
        "GCMLM_GPU_TOLERATIONS": json.dumps(GPU_TOLERATIONS),
        "DAGSTER_K8S_NAMESPACE": TEST_NAMESPACE,  # the run launcher's job_namespace
    })


@pytest.fixture(scope="module")
def jobs(built) -> dict[str, dict]:
    """Step key -> Job manifest, for the run without job-level tags."""
    return built["runs"]["plain"]["jobs"]


def _asset_step(built: dict, asset: str) -> str:
    steps = [key for key, step in built["steps"].items() if asset in step["assets"]]
    assert len(steps) == 1, f"{asset}: steps {steps} materialize it"
    return steps[0]


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def _container(job: dict) -> dict:
    containers = _pod(job)["containers"]
    assert [c["name"] for c in containers] == ["dagster"], containers
    return containers[0]


def _env(container: dict) -> dict[str, str]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _volumes(job: dict) -> dict[str, dict]:
    return {v["name"]: v for v in _pod(job).get("volumes", [])}


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
    pod, container = _pod(job), _container(job)
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
        assert _container(jobs[key])["resources"] == baseline, key


def test_every_step_pod_runs_non_root_read_only_with_the_data_volume(built, jobs):
    assert set(jobs) == set(built["steps"])
    for key, job in jobs.items():
        pod, container = _pod(job), _container(job)
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
        assert _pod(job).get("nodeSelector") == _pod(plain).get("nodeSelector"), key
        assert _container(job)["resources"] == _container(plain)["resources"], key


# ---------------------------------------------------------------- the Kubernetes schema

def validation_failures(manifests: dict[str, dict]) -> list[str]:
    """Each manifest against each of KUBERNETES_VERSIONS, strict (unknown fields fail)."""
    import kubernetes_validate

    failures = []
    for version in KUBERNETES_VERSIONS:
        for name, manifest in manifests.items():
            try:
                assert kubernetes_validate.validate(manifest, version, strict=True) == version
            except kubernetes_validate.ValidationError as error:
                failures.append(f"{version} {name}: {'.'.join(map(str, error.path))}: {error.message}")
    return failures


def test_every_job_is_valid_for_kubernetes_1_29_to_1_35(built):
    manifests = {f"{label}/{key}": job for label, run in built["runs"].items() for key, job in run["jobs"].items()}
    manifests.update({f"{label}/run worker": run["run_worker"] for label, run in built["runs"].items()})
    failures = validation_failures(manifests)
    assert not failures, "\n".join(failures[:40])


def test_strict_validation_rejects_an_unknown_field(jobs):
    import kubernetes_validate

    job = copy.deepcopy(next(iter(jobs.values())))
    _container(job)["securityContext"]["readOnlyRootFileSystem"] = True  # misspelt
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
