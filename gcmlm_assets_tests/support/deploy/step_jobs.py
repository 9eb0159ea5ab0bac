"""The Kubernetes Job of every step, as dagster-k8s builds it for the production deployment: the
builder the deploy tests (test_step_jobs.py, test_chart_jobs.py) share.

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
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gcmlm_assets import step_pods
from gcmlm_assets_tests.support.deploy import chart_launcher

PROJECT_ROOT = Path(__file__).resolve().parents[3]
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
    "ct_image": step_pods.CPU, "radiomics_row": step_pods.CPU, "ct_mask_seg": step_pods.CPU,
    "radiomics_sr": step_pods.CPU, "patch_coords": step_pods.CPU, "slide_vector": step_pods.CPU,
    "qupath_geojson": step_pods.CPU, "ln_patch_coords": step_pods.CPU, "ln_features": step_pods.GPU,
    "tumour_classifier": step_pods.CPU, "lymph_nodes": step_pods.CPU,
    "clinical_table": step_pods.COHORT, "fused_table": step_pods.COHORT, "risk_model": step_pods.COHORT,
    "risk_scores": step_pods.COHORT, "risk_assessments": step_pods.COHORT, "risk_explanations": step_pods.COHORT,
}

def offline_kubeconfig(path: Path) -> Path:
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
        load_incluster_config=False, kubeconfig_file=str(offline_kubeconfig(workdir / "kubeconfig")))

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


def run_builder(out: Path, source: str, env: dict[str, str]) -> dict:
    """`build_step_jobs(source)` in a child process with `env` over this one's (see the module docstring)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("GCMLM_GPU_SHM", raising=False)
        done = subprocess.run(
            [sys.executable, "-m", "gcmlm_assets_tests.support.deploy.step_jobs", str(out), source],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"building the step jobs failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def pod_spec_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container_of(job: dict) -> dict:
    containers = pod_spec_of(job)["containers"]
    assert [c["name"] for c in containers] == ["dagster"], containers
    return containers[0]


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


def _main() -> None:
    out = Path(sys.argv[1])
    out.write_text(json.dumps(build_step_jobs(out.parent, *sys.argv[2:]), default=str))


if __name__ == "__main__":
    _main()
