"""What the dagster/dagster chart (1.13.27) hands dagster-k8s for runs and steps, from our values.

The chart cannot be downloaded in the tests, so the parts that decide a run's and a step's pod
are rendered here from deploy/helm/values.yaml, following the chart's templates as read for
1.13 (written for this project, not copied):

- the instance's `run_launcher:` block (templates/helpers/instance/_run-launcher.tpl,
  `dagsterYaml.runLauncher.k8s`): the chart's service account `<fullname>` unless
  `global.serviceAccountName` / `serviceAccount.name` is set, the instance ConfigMap
  `<fullname>-instance`, `global.dagsterHome`, the password Secret, the launcher's pull policy,
  the top-level `imagePullSecrets`, env vars, volumes, the container security context and
  `runK8sConfig`. No env ConfigMap of the chart's own is passed by the launcher in 1.13 (only
  `envConfigMaps` of the values, none here);
- the code location's container context (the user-deployments subchart's
  `dagsterUserDeployments.k8sContainerContext`, passed to `dagster api grpc` as
  DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT when `includeConfigInLaunchedRuns` is on): its pull
  policy, the subchart's `imagePullSecrets`, the env ConfigMap the subchart makes from the
  deployment's `env` map (`<subchart fullname>-<deployment>-user-env`), volumes, resources, the
  namespace and the subchart's service account (`<subchart fullname>-user-deployments`), and a run
  pod spec that mounts the service-account token. dagster-k8s merges it over the launcher's for
  the run pod and for every step pod, so its service account and ConfigMap are the ones those
  pods get;
- the code server's own pod spec (templates/deployment-user.yaml), for the pod security check.

`fullname` follows the chart's helper: the release name if it contains the chart's name, else
`<release>-<chart name>`, cut at 63 characters.
Plain Python: no dagster import.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
VALUES_FILE = REPO / "deploy" / "helm" / "values.yaml"

# The release and namespace of deploy/README.md's `helm upgrade --install gcmlm ... --namespace gcmlm`.
RELEASE = "gcmlm"
NAMESPACE = "gcmlm"
CHART_NAME = "dagster"
SUBCHART_NAME = "dagster-user-deployments"

# The chart's own defaults (its values.yaml) for the keys our values leave out.
CHART_DEFAULTS: dict[str, Any] = {
    "global": {"dagsterHome": "/opt/dagster/dagster_home", "serviceAccountName": ""},
    "serviceAccount": {"name": ""},
    "imagePullSecrets": [],
    "runLauncher": {"config": {"k8sRunLauncher": {"loadInclusterConfig": True, "imagePullPolicy": "Always",
                                                  "envConfigMaps": [], "envSecrets": []}}},
    "dagster-user-deployments": {"imagePullSecrets": [], "serviceAccount": {"name": ""}},
}

# How an operator with a private registry sets pull secrets (deploy/README.md): the chart's
# top-level key (run launcher: run and step pods) and the subchart's (code server, and through the
# container context run and step pods too).
PULL_SECRET = "gcmlm-registry"
PULL_SECRET_OVERRIDES: dict[str, Any] = {
    "imagePullSecrets": [{"name": PULL_SECRET}],
    "dagster-user-deployments": {"imagePullSecrets": [{"name": PULL_SECRET}]},
}


def merged(base: dict, override: dict) -> dict:
    """`override` over `base`, maps merged key by key, anything else replaced (as Helm merges values)."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def chart_values(*overrides: dict) -> dict:
    """deploy/helm/values.yaml over the chart's defaults, then each override (like `-f`/`--set`)."""
    values = merged(CHART_DEFAULTS, yaml.safe_load(VALUES_FILE.read_text(encoding="utf-8")))
    for override in overrides:
        values = merged(values, override)
    return values


def _fullname(release: str, chart: str) -> str:
    name = release if chart in release else f"{release}-{chart}"
    return name[:63].rstrip("-")


def fullname(release: str = RELEASE) -> str:
    return _fullname(release, CHART_NAME)


def subchart_fullname(release: str = RELEASE) -> str:
    return _fullname(release, SUBCHART_NAME)


def launcher_service_account(values: dict, release: str = RELEASE) -> str:
    return values["global"].get("serviceAccountName") or values["serviceAccount"].get("name") or fullname(release)


def code_location_service_account(values: dict, release: str = RELEASE) -> str:
    subchart = values["dagster-user-deployments"]
    return (values["global"].get("serviceAccountName") or subchart.get("serviceAccount", {}).get("name")
            or f"{subchart_fullname(release)}-user-deployments")


def instance_config_map(release: str = RELEASE) -> str:
    return f"{fullname(release)}-instance"


def user_env_config_map(deployment: dict, release: str = RELEASE) -> str:
    return f"{subchart_fullname(release)}-{deployment['name']}-user-env"


def the_deployment(values: dict) -> dict:
    deployments = values["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1, "one code location"
    return deployments[0]


def image_name(deployment: dict) -> str:
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def _names(refs: list[dict]) -> list[str]:
    return [ref["name"] for ref in refs if "name" in ref]


_RUN_K8S_CONFIG_KEYS = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                        "podTemplateSpecMetadata": "pod_template_spec_metadata",
                        "jobSpecConfig": "job_spec_config", "jobMetadata": "job_metadata"}


def run_launcher(values: dict, release: str = RELEASE, namespace: str = NAMESPACE) -> dict:
    """The instance's `run_launcher:` block as the chart renders it for `K8sRunLauncher`."""
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    config: dict[str, Any] = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or namespace,
        "image_pull_policy": launcher["imagePullPolicy"],
    }
    if launcher.get("kubeconfigFile"):
        config["kubeconfig_file"] = launcher["kubeconfigFile"]
    if values["imagePullSecrets"]:
        config["image_pull_secrets"] = copy.deepcopy(values["imagePullSecrets"])
    config["service_account_name"] = launcher_service_account(values, release)
    if "image" in launcher:
        config["job_image"] = image_name(launcher)
    config["dagster_home"] = values["global"]["dagsterHome"]
    config["instance_config_map"] = instance_config_map(release)
    config["postgres_password_secret"] = values["global"]["postgresqlSecretName"]
    if _names(launcher["envConfigMaps"]):
        config["env_config_maps"] = _names(launcher["envConfigMaps"])
    if _names(launcher["envSecrets"]):
        config["env_secrets"] = _names(launcher["envSecrets"])
    for key, name in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes"),
                      ("labels", "labels"), ("resources", "resources"), ("securityContext", "security_context")):
        if launcher.get(key):
            config[name] = copy.deepcopy(launcher[key])
    if launcher.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if launcher.get("schedulerName"):
        config["scheduler_name"] = launcher["schedulerName"]
    if launcher.get("runK8sConfig"):
        config["run_k8s_config"] = {name: copy.deepcopy(launcher["runK8sConfig"][key])
                                    for key, name in _RUN_K8S_CONFIG_KEYS.items() if launcher["runK8sConfig"].get(key)}
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def code_location_container_context(values: dict, release: str = RELEASE, namespace: str = NAMESPACE) -> dict:
    """The container context the code server reports (`includeConfigInLaunchedRuns.enabled`)."""
    deployment = the_deployment(values)
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    subchart = values["dagster-user-deployments"]
    k8s: dict[str, Any] = {"image_pull_policy": deployment["image"]["pullPolicy"]}
    if subchart.get("imagePullSecrets"):
        k8s["image_pull_secrets"] = copy.deepcopy(subchart["imagePullSecrets"])
    k8s["env_config_maps"] = [user_env_config_map(deployment, release), *_names(deployment.get("envConfigMaps", []))]
    if _names(deployment.get("envSecrets", [])):
        k8s["env_secrets"] = _names(deployment["envSecrets"])
    for key, name in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                      ("resources", "resources"), ("schedulerName", "scheduler_name")):
        if deployment.get(key):
            k8s[name] = copy.deepcopy(deployment[key])
    k8s["namespace"] = namespace
    k8s["service_account_name"] = code_location_service_account(values, release)
    if isinstance(deployment.get("env"), list):
        k8s["env"] = copy.deepcopy(deployment["env"])
    k8s["run_k8s_config"] = {"pod_spec_config": {"automount_service_account_token": True}}
    return {"k8s": k8s}


def code_server_pod_spec(values: dict, release: str = RELEASE) -> dict:
    """The code server's pod spec (the user deployment's Deployment), empty fields left out."""
    deployment = the_deployment(values)
    image = image_name(deployment)
    container = {
        "name": SUBCHART_NAME, "image": image, "imagePullPolicy": deployment["image"]["pullPolicy"],
        "securityContext": copy.deepcopy(deployment.get("securityContext") or {}),
        "args": ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(deployment["port"]),
                 *deployment["dagsterApiGrpcArgs"]],
        "env": [{"name": "DAGSTER_CURRENT_IMAGE", "value": image},
                {"name": "DAGSTER_PG_PASSWORD", "valueFrom": {"secretKeyRef": {
                    "name": values["global"]["postgresqlSecretName"], "key": "postgresql-password"}}},
                # `dagster api grpc` reads its --container-context from this variable; Helm's toJson
                # writes it compact with sorted keys.
                {"name": "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT",
                 "value": json.dumps(code_location_container_context(values, release), sort_keys=True,
                                     separators=(",", ":"))}],
        "envFrom": [{"configMapRef": {"name": f"{subchart_fullname(release)}-user-deployments-shared-env"}},
                    {"configMapRef": {"name": user_env_config_map(deployment, release)}}],
        "resources": copy.deepcopy(deployment.get("resources") or {}),
        "readinessProbe": {"exec": {"command": ["dagster", "api", "grpc-health-check", "-p",
                                                str(deployment["port"])]},
                           "periodSeconds": 20, "timeoutSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
        "volumeMounts": copy.deepcopy(deployment.get("volumeMounts") or []),
    }
    spec = {
        "imagePullSecrets": copy.deepcopy(values["dagster-user-deployments"].get("imagePullSecrets") or []),
        "serviceAccountName": code_location_service_account(values, release),
        "securityContext": copy.deepcopy(deployment.get("podSecurityContext") or {}),
        "containers": [container],
        "volumes": copy.deepcopy(deployment.get("volumes") or []),
    }
    return {key: value for key, value in spec.items() if value != []}
