"""The Helm chart's path: run and step Jobs from the launcher and container context the chart renders.

test_step_jobs.py builds every step's Job with dagster-k8s's step handler from
deploy/k8s/dagster.yaml's run launcher. Here the same builder takes the run launcher and the code
location's container context as the dagster/dagster 1.13.27 chart renders them from
deploy/helm/values.yaml (chart_launcher.py), with image pull secrets set as deploy/README.md
says, and also records the run worker's Job from `K8sRunLauncher.launch_run`. Every Job is
validated for Kubernetes 1.29 to 1.35 (strict), and every pod spec the tests render (step pods of
both paths, run pods, the code server's, deploy/k8s/seed-pod.yaml) is checked against Pod Security "restricted"
(pod_security.py), whose rules are each shown to catch a violating pod.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from gcmlm_assets import deploy_k8s, step_pods
from gcmlm_assets_tests.support.deploy import chart_launcher
from gcmlm_assets_tests.deploy.pod_security import restricted_violations
from gcmlm_assets_tests.support.deploy.step_jobs import (
    ASSET_CLASSES, INSTANCE_YAML, container_of, offline_kubeconfig, pod_spec_of, run_builder, validation_failures,
)


@pytest.fixture(scope="module")
def values() -> dict:
    return chart_launcher.chart_values(chart_launcher.PULL_SECRET_OVERRIDES)


@pytest.fixture(scope="module")
def chart_built(tmp_path_factory, values) -> dict:
    env = chart_launcher.the_deployment(values)["env"]
    return run_builder(tmp_path_factory.mktemp("chart_jobs") / "jobs.json", "chart", {
        "GCMLM_ENV": "k8s",
        "GCMLM_GPU_NODE_SELECTOR": env["GCMLM_GPU_NODE_SELECTOR"],
        "GCMLM_GPU_TOLERATIONS": env["GCMLM_GPU_TOLERATIONS"],
    })


@pytest.fixture(scope="module")
def chart_run(chart_built) -> dict:
    return chart_built["runs"]["plain"]


# ---------------------------------------------------------------- the rendered launcher
# The pod deploy/README.md has the operator start to seed the shared volume.
SEED_POD = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "seed-pod.yaml").read_text(encoding="utf-8"))


def test_the_rendered_launcher_names_the_charts_objects(values):
    config = chart_launcher.run_launcher(values)["config"]
    assert config["service_account_name"] == "gcmlm-dagster"
    assert config["instance_config_map"] == "gcmlm-dagster-instance"
    assert config["job_namespace"] == chart_launcher.NAMESPACE
    assert config["postgres_password_secret"] == values["global"]["postgresqlSecretName"]
    assert config["image_pull_secrets"] == [{"name": chart_launcher.PULL_SECRET}]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert config["env_vars"] == launcher["envVars"] and config["volumes"] == launcher["volumes"]
    assert config["run_k8s_config"] == {"pod_spec_config": launcher["runK8sConfig"]["podSpecConfig"]}
    # The values as they are set no pull secret: the key is left out, as the chart leaves it out.
    assert "image_pull_secrets" not in chart_launcher.run_launcher(chart_launcher.chart_values())["config"]


def test_the_rendered_launcher_is_one_dagster_k8s_accepts(values, tmp_path):
    """dagster-k8s's own config schema takes the block (with a kubeconfig instead of in-cluster)."""
    import dagster as dg
    import yaml

    block = chart_launcher.run_launcher(values)
    block["config"].update(load_incluster_config=False,
                           kubeconfig_file=str(offline_kubeconfig(tmp_path / "kubeconfig")))
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": block}))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        launcher = instance.run_launcher
        assert type(launcher).__name__ == "K8sRunLauncher"
        assert launcher.service_account_name == "gcmlm-dagster"
        assert launcher.instance_config_map == "gcmlm-dagster-instance"
        assert launcher.image_pull_secrets == [{"name": chart_launcher.PULL_SECRET}]


# ---------------------------------------------------------------- the chart path's Jobs

def test_step_and_run_pods_get_the_charts_account_config_map_and_pull_secret(chart_built, chart_run, values):
    deployment = chart_launcher.the_deployment(values)
    # dagster-k8s merges the code location's container context over the launcher's: the
    # subchart's service account (the one its Role lets create Jobs and read pods) wins.
    account = chart_launcher.code_location_service_account(values)
    assert account == "gcmlm-dagster-user-deployments-user-deployments"
    config_map = {"configMapRef": {"name": chart_launcher.user_env_config_map(deployment)}}
    assert config_map["configMapRef"]["name"] == "gcmlm-dagster-user-deployments-gcmlm-assets-user-env"
    assert set(chart_run["jobs"]) == set(chart_built["steps"])
    pods = {**{key: job for key, job in chart_run["jobs"].items()}, "run worker": chart_run["run_worker"]}
    for key, job in pods.items():
        pod, container = pod_spec_of(job), container_of(job)
        assert pod["serviceAccountName"] == account, key
        assert pod["imagePullSecrets"] == [{"name": chart_launcher.PULL_SECRET}], key
        assert config_map in container["envFrom"], key
        assert container["image"] == chart_launcher.image_name(deployment), key
        assert job["metadata"]["namespace"] == chart_launcher.NAMESPACE, key
        assert {"mountPath": "/data", "name": "gcmlm-data"} in container["volumeMounts"], key
    run_pod = pod_spec_of(chart_run["run_worker"])
    assert run_pod["automountServiceAccountToken"] is True, "the run worker creates the step Jobs"
    assert container_of(chart_run["run_worker"])["imagePullPolicy"] == deployment["image"]["pullPolicy"]
    env = {e["name"]: e.get("value") for e in container_of(chart_run["run_worker"])["env"]}
    assert all(env[name] == value for name, value in deployment["env"].items())


def test_chart_step_pods_keep_their_class_sizing_and_security(chart_built, chart_run, values):
    deployment = chart_launcher.the_deployment(values)
    gpu_selector = json.loads(deployment["env"]["GCMLM_GPU_NODE_SELECTOR"])
    for asset, work in ASSET_CLASSES.items():
        [key] = [k for k, step in chart_built["steps"].items() if asset in step["assets"]]
        pod, container = pod_spec_of(chart_run["jobs"][key]), container_of(chart_run["jobs"][key])
        assert container["resources"] == json.loads(json.dumps(step_pods.resources(work))), asset
        assert pod.get("nodeSelector") == (gpu_selector if work.gpus else None), asset
        assert pod["automountServiceAccountToken"] is False, asset
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, asset
        assert container["imagePullPolicy"] == "Always", "step_k8s_config's pull policy wins"
        assert pod["securityContext"]["runAsUser"] == deploy_k8s.RUN_AS_UID, asset


def test_every_chart_job_is_valid_for_kubernetes_1_29_to_1_35(chart_run):
    manifests = {**chart_run["jobs"], "run worker": chart_run["run_worker"]}
    failures = validation_failures(manifests)
    assert not failures, "\n".join(failures[:40])


# ---------------------------------------------------------------- Pod Security "restricted"

def test_every_pod_we_render_is_admitted_by_pod_security_restricted(built, chart_run, values):
    pods = {f"plain/{label}/{key}": pod_spec_of(job) for label, run in built["runs"].items()
            for key, job in run["jobs"].items()}
    pods.update({f"plain/{label}/run worker": pod_spec_of(run["run_worker"]) for label, run in built["runs"].items()})
    pods.update({f"chart/{key}": pod_spec_of(job) for key, job in chart_run["jobs"].items()})
    pods["chart/run worker"] = pod_spec_of(chart_run["run_worker"])
    pods["chart/code server"] = chart_launcher.code_server_pod_spec(values)
    pods["seeding pod"] = SEED_POD["spec"]  # deploy/README.md, step 3
    failures = {name: problems for name, pod in pods.items() if (problems := restricted_violations(pod))}
    assert not failures, json.dumps(failures, indent=1)[:6000]
    assert validation_failures({"code server": {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "code-server"},
        "spec": chart_launcher.code_server_pod_spec(values)}, "seeding pod": SEED_POD}) == []


def _compliant_pod() -> dict:
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "main", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                    {"name": "scratch", "emptyDir": {}}],
    }


def _set(path: str, value):
    """A change to the compliant pod: `path` is dotted, `containers.0` the first container."""
    def change(pod: dict) -> None:
        *parents, last = path.split(".")
        node = pod
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(last) if last.isdigit() else last] = value
    return change


def _delete(path: str):
    def change(pod: dict) -> None:
        *parents, last = path.split(".")
        node = pod
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]
    return change


VIOLATIONS = {
    "host network": (_set("hostNetwork", True), "host namespaces"),
    "host PID": (_set("hostPID", True), "host namespaces"),
    "host IPC": (_set("hostIPC", True), "host namespaces"),
    "privileged": (_set("containers.0.securityContext.privileged", True), "privileged containers"),
    "capability added": (_set("containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]), "capabilities"),
    "ALL not dropped": (_set("containers.0.securityContext.capabilities.drop", ["NET_RAW"]), "does not drop ALL"),
    "hostPath volume": (_set("volumes.1", {"name": "host", "hostPath": {"path": "/"}}), "hostPath volumes"),
    "other volume type": (_set("volumes.1", {"name": "nfs", "nfs": {"server": "s", "path": "/"}}),
                          "volume types"),
    "host port": (_set("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]), "host ports"),
    "proc mount": (_set("containers.0.securityContext.procMount", "Unmasked"), "/proc mount"),
    "unsafe sysctl": (_set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "sysctls"),
    "SELinux user": (_set("securityContext.seLinuxOptions", {"user": "root"}), "SELinux"),
    "AppArmor unconfined": (_set("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}),
                            "AppArmor"),
    "host process": (_set("containers.0.securityContext.windowsOptions", {"hostProcess": True}), "HostProcess"),
    "escalation allowed": (_set("containers.0.securityContext.allowPrivilegeEscalation", True),
                           "privilege escalation"),
    "escalation unset": (_delete("containers.0.securityContext.allowPrivilegeEscalation"), "privilege escalation"),
    "runAsNonRoot unset": (_delete("securityContext.runAsNonRoot"), "running as non-root"),
    "container runAsNonRoot false": (_set("containers.0.securityContext.runAsNonRoot", False),
                                     "running as non-root"),
    "runAsUser 0": (_set("containers.0.securityContext.runAsUser", 0), "runAsUser 0"),
    "seccomp unset": (_delete("securityContext.seccompProfile"), "seccomp"),
    "seccomp unconfined": (_set("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}), "seccomp"),
    "init container": (_set("initContainers", [{"name": "init", "image": "x"}]), "initContainers[init]"),
}


def test_the_restricted_checker_admits_a_compliant_pod():
    assert restricted_violations(_compliant_pod()) == []
    pod = _compliant_pod()
    pod["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    pod["volumes"].append({"name": "c", "configMap": {"name": "c"}})
    assert restricted_violations(pod) == []


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_the_restricted_checker_rejects_each_violation(rule):
    change, message = VIOLATIONS[rule]
    pod = copy.deepcopy(_compliant_pod())
    change(pod)
    problems = restricted_violations(pod)
    assert any(message in problem for problem in problems), f"{rule}: {problems}"


def test_the_plain_instances_run_pod_security_matches_the_charts(values):
    import yaml

    plain = yaml.safe_load(INSTANCE_YAML.read_text(encoding="utf-8"))["run_launcher"]["config"]
    chart = chart_launcher.run_launcher(values)["config"]
    assert plain["security_context"] == chart["security_context"]
    assert plain["run_k8s_config"]["pod_spec_config"]["security_context"] == \
        chart["run_k8s_config"]["pod_spec_config"]["securityContext"]
