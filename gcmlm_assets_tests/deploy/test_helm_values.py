"""Test the values file against the keys it uses.

deploy/helm/values.yaml is for the dagster/dagster chart, which cannot be downloaded here. Its
schema, as far as the values file uses it, is written down in chart_schema_keys.yaml (with the
chart version it was read from); every key path of the values file must be there with the right
JSON type. The rest checks what the values mean: a ClusterIP webserver and no ingress, the
PostgreSQL password from a Secret only, the code location's module and environment, the run limits
of deploy/k8s/dagster.yaml, the shared volume at /data, and that the instance the chart makes from
these values (chart_render.py) is one Dagster 1.13 accepts: step logs kept on the shared volume
where the webserver reads them, and the same as deploy/k8s/dagster.yaml except where listed.
Its PostgreSQL storage is opened on a real server in test_chart_instance.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from gcmlm_assets import step_pods
from gcmlm_assets_tests.support.deploy import chart_launcher, chart_render

REPO = Path(__file__).resolve().parents[2]
VALUES_FILE = REPO / "deploy" / "helm" / "values.yaml"
K8S_INSTANCE_FILE = REPO / "deploy" / "k8s" / "dagster.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SCHEMA_KEYS_FILE = Path(__file__).with_name("chart_schema_keys.yaml")

ITEM = "[]"  # the path segment of a list item


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def schema_keys() -> dict:
    return yaml.safe_load(SCHEMA_KEYS_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def k8s_instance() -> dict:
    return yaml.safe_load(K8S_INSTANCE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def deployment(values) -> dict:
    deployments = values["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1, "one code location, gcmlm_assets"
    return deployments[0]


@pytest.fixture(scope="module")
def launcher(values) -> dict:
    return values["runLauncher"]["config"]["k8sRunLauncher"]


# ---------------------------------------------------------------------------------------------
# The key list: every key path of the values file is one of the chart's, with the right type.

def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a YAML value: {value!r}")


def split_pattern(pattern: str) -> tuple[str, ...]:
    """'a.b[].c' -> ('a', 'b', '[]', 'c')."""
    segments: list[str] = []
    for part in pattern.split("."):
        items = 0
        while part.endswith(ITEM):
            part, items = part[: -len(ITEM)], items + 1
        segments.append(part)
        segments.extend([ITEM] * items)
    return tuple(segments)


def show(path: tuple[str, ...]) -> str:
    text = ""
    for segment in path:
        text += segment if segment == ITEM else (f".{segment}" if text else segment)
    return text


class KeyTable:
    """Key patterns and their specs; `match` finds the spec of one concrete path."""

    def __init__(self, entries: dict[str, Any]):
        self.entries = [(split_pattern(pattern), pattern, self._spec(spec)) for pattern, spec in entries.items()]

    @staticmethod
    def _spec(spec: Any) -> dict:
        if isinstance(spec, (str, list)):
            spec = {"type": spec}
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        return {**spec, "type": types}

    def match(self, path: tuple[str, ...]) -> tuple[str, dict] | None:
        for segments, pattern, spec in self.entries:
            if len(segments) == len(path) and all(
                    s == p or (s == "*" and p != ITEM) for s, p in zip(segments, path)):
                return pattern, spec
        return None


def check_tree(node: Any, path: tuple[str, ...], table: KeyTable, kinds: dict[str, KeyTable],
               where: str, used: set[str], errors: list[str]) -> None:
    """Check `node` at `path` against `table`, then its children; record what is wrong in `errors`."""
    found = table.match(path)
    if found is None:
        errors.append(f"{where}{show(path)}: not a key of the chart's schema (chart_schema_keys.yaml)")
        return
    pattern, spec = found
    if table is kinds.get("__chart__"):
        used.add(pattern)
    if json_type(node) not in spec["type"] and not (json_type(node) == "integer" and "number" in spec["type"]):
        errors.append(f"{where}{show(path)}: {json_type(node)} {node!r}, expected {' or '.join(spec['type'])}")
        return
    if "enum" in spec and node not in spec["enum"]:
        errors.append(f"{where}{show(path)}: {node!r} is not one of {spec['enum']}")
    if spec.get("opaque"):
        return
    if "kind" in spec:
        table, where, path = kinds[spec["kind"]], f"{where}{show(path)} ({spec['kind']}) ", ()
    if isinstance(node, dict):
        for key, child in node.items():
            check_tree(child, (*path, str(key)), table, kinds, where, used, errors)
    elif isinstance(node, list):
        for child in node:
            check_tree(child, (*path, ITEM), table, kinds, where, used, errors)


def test_schema_key_list_names_its_chart_version(schema_keys, values):
    assert schema_keys["chart"] == "dagster/dagster"
    pinned = schema_keys["chart_version"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"dagster=={pinned}" in pyproject["project"]["dependencies"], \
        "the chart's version is the Dagster version it ships"
    assert f"--version {pinned}" in VALUES_FILE.read_text(encoding="utf-8")
    assert f"--version {pinned}" in (REPO / "deploy" / "README.md").read_text(encoding="utf-8")


def test_every_key_is_a_chart_key_of_the_right_type(values, schema_keys):
    chart = KeyTable(schema_keys["keys"])
    kinds = {name: KeyTable(entries) for name, entries in schema_keys["kinds"].items()}
    kinds["__chart__"] = chart
    errors: list[str] = []
    used: set[str] = set()
    for key, node in values.items():
        check_tree(node, (key,), chart, kinds, "", used, errors)
    # The pull secrets deploy/README.md tells an operator to set (empty lists in the file).
    for key, node in chart_launcher.PULL_SECRET_OVERRIDES.items():
        check_tree(node, (key,), chart, kinds, "(pull secrets set) ", used, errors)
    assert not errors, "\n".join(errors)
    stale = sorted(set(schema_keys["keys"]) - used)
    assert not stale, f"listed in chart_schema_keys.yaml but not used by the values file: {stale}"


@pytest.mark.parametrize("bad, message", [
    ({"dagsterWebserver": {"servise": {"type": "ClusterIP"}}}, "dagsterWebserver.servise: not a key"),
    ({"dagsterWebserver": {"service": {"type": "Internal"}}}, "is not one of"),
    ({"postgresql": {"service": {"port": "5432"}}}, "postgresql.service.port: string"),
    ({"runLauncher": {"config": {"k8sRunLauncher": {"volumes": [{"name": "x", "persistentVolumeClaim": {
        "claimname": "x"}}]}}}}, "persistentVolumeClaim.claimname: not a key"),
    ({"dagster-user-deployments": {"deployments": [{"env": {"A": 1}}]}}, "env.A: integer 1"),
])
def test_the_key_check_catches(schema_keys, bad, message):
    """The walker itself: misspelt keys, wrong types and values outside an enum are reported."""
    chart = KeyTable(schema_keys["keys"])
    kinds = {name: KeyTable(entries) for name, entries in schema_keys["kinds"].items()}
    errors: list[str] = []
    for key, node in bad.items():
        check_tree(node, (key,), chart, kinds, "", set(), errors)
    assert any(message in error for error in errors), errors


# ---------------------------------------------------------------------------------------------
# What the values mean.

def all_key_paths(node: Any, path: tuple[str, ...] = ()):
    if isinstance(node, dict):
        for key, child in node.items():
            yield (*path, str(key)), child
            yield from all_key_paths(child, (*path, str(key)))
    elif isinstance(node, list):
        for child in node:
            yield from all_key_paths(child, (*path, ITEM))


def test_webserver_is_cluster_internal_and_there_is_no_ingress(values):
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    assert values["ingress"]["enabled"] is False
    service_types = [v for path, v in all_key_paths(values) if path[-1] == "type" and len(path) > 1
                     and path[-2] == "service"]
    assert service_types == ["ClusterIP"], "no NodePort or LoadBalancer service anywhere"


def test_postgres_password_comes_from_a_secret_only(values):
    assert values["postgresql"]["enabled"] is False, "the external server, not the bundled one"
    assert values["postgresql"]["postgresqlHost"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", values["global"]["postgresqlSecretName"]), \
        "a Kubernetes Secret name"
    for path, value in all_key_paths(values):
        name = path[-1].lower()
        if "password" in name or "secret" in name or "token" in name:
            # Names of Secrets, never their contents: the password Secret and the pull secrets' list.
            assert path == ("global", "postgresqlSecretName") or name == "generatepostgresqlpasswordsecret" \
                or (name == "imagepullsecrets" and value == []), \
                f"{show(path)} in the values file: secrets belong in Kubernetes Secrets"
    text = VALUES_FILE.read_text(encoding="utf-8")
    assert "postgresqlPassword" not in text
    assert not re.search(r"(?i)PASSWORD=", text)


def test_code_location_module_and_environment(deployment):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    module = pyproject["tool"]["dagster"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module] == ["-m", "gcmlm_assets.definitions"]
    env = deployment["env"]
    assert env["GCMLM_ENV"] == "k8s"
    assert env["GCMLM_PROFILE"] == "production"
    assert env["GCMLM_DATA_ROOT"] == "/data"
    assert env["GCMLM_UNI_CHECKPOINT"].startswith("/data/"), "weights live on the shared volume"
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert ":" not in deployment["image"]["repository"].rsplit("/", 1)[-1], "the tag goes in image.tag"
    assert deployment["image"]["tag"] not in ("", "latest")


def test_gpu_placement_variables_parse_as_step_pods_reads_them(deployment, monkeypatch):
    env = deployment["env"]
    for name in ("GCMLM_GPU_NODE_SELECTOR", "GCMLM_GPU_TOLERATIONS", "GCMLM_GPU_SHM"):
        monkeypatch.setenv(name, env[name])
    selector, tolerations = step_pods.gpu_placement()
    assert selector and all(isinstance(v, str) for v in selector.values())
    assert any(t.get("key") == step_pods.GPU_RESOURCE for t in tolerations)
    gpu_pod = step_pods.k8s_config(step_pods.GPU)["pod_spec_config"]
    assert gpu_pod["node_selector"] == selector
    assert gpu_pod["volumes"][0]["empty_dir"]["size_limit"] == env["GCMLM_GPU_SHM"]


def test_run_pods_get_the_code_locations_environment(deployment, launcher):
    as_pairs = [f"{name}={value}" for name, value in deployment["env"].items()]
    assert launcher["envVars"] == as_pairs, \
        "runLauncher envVars must equal the deployment's env (a run pod gets both; envVars win)"


def mounted_claims(volumes: list[dict], mounts: list[dict]) -> dict[str, str]:
    """mount path -> PVC claim name."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for m in mounts if m["name"] in claims}


def test_the_shared_volume_is_mounted_at_data_everywhere(deployment, launcher, k8s_instance):
    k8s_launcher = k8s_instance["run_launcher"]["config"]
    expected = mounted_claims(k8s_launcher["volumes"], k8s_launcher["volume_mounts"])
    assert expected == {"/data": "gcmlm-data"}
    assert mounted_claims(deployment["volumes"], deployment["volumeMounts"]) == expected
    assert mounted_claims(launcher["volumes"], launcher["volumeMounts"]) == expected
    # Identical entries, so dagster-k8s merges the code location's and the launcher's into one
    # volume of the run pod (a pod spec refuses two volumes of one name).
    assert deployment["volumes"] == launcher["volumes"] == k8s_launcher["volumes"]
    assert deployment["volumeMounts"] == launcher["volumeMounts"]


def test_pods_run_as_the_images_non_root_user(deployment, launcher):
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert user, "deploy/Dockerfile sets a numeric USER"
    uid = int(user.group(1))
    pod = deployment["podSecurityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid != 0
    assert pod["fsGroup"] == pod["runAsGroup"]
    container = deployment["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert launcher["securityContext"] == container
    assert launcher["runK8sConfig"]["podSpecConfig"]["securityContext"] == pod


def test_user_deployment_requests_but_does_not_limit(deployment):
    """Its resources reach every run and step pod; a limit would bind steps that set none."""
    assert set(deployment["resources"]) == {"requests"}


def test_run_limits_match_the_k8s_instance(values, k8s_instance):
    coordinator = k8s_instance["run_coordinator"]
    assert coordinator["class"] == "QueuedRunCoordinator"
    assert values["dagsterDaemon"]["runCoordinator"] == {"enabled": True, "type": "QueuedRunCoordinator"}
    runs, expected = values["concurrency"]["runs"], k8s_instance["concurrency"]["runs"]
    assert "config" not in coordinator  # the limits live in `concurrency.runs` (see the next tests)
    assert runs["tagConcurrencyLimits"] == expected["tag_concurrency_limits"]
    assert runs["maxConcurrentRuns"] == expected["max_concurrent_runs"]
    per_patient = [limit for limit in runs["tagConcurrencyLimits"] if limit["key"] == "dagster/partition"]
    assert per_patient == [{"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    assert {"key": "gcmlm/training", "limit": 1} in runs["tagConcurrencyLimits"]


def test_run_retries_match_the_k8s_instance(values, k8s_instance):
    retries = values["dagsterDaemon"]["runRetries"]
    expected = k8s_instance["run_retries"]
    assert (retries["enabled"], retries["maxRetries"], retries["retryOnAssetOrOpFailure"]) == (
        expected["enabled"], expected["max_retries"], expected["retry_on_asset_or_op_failure"])


def test_gpu_pool_has_a_default_limit(values, k8s_instance):
    pools = values["concurrency"]["pools"]
    assert (pools["defaultLimit"], pools["granularity"]) == (
        k8s_instance["concurrency"]["pools"]["default_limit"], k8s_instance["concurrency"]["pools"]["granularity"])
    assert values["concurrency"]["enabled"] is True
    assert isinstance(pools["defaultLimit"], int) and pools["defaultLimit"] >= 1
    assert pools["granularity"] == "op"
    assert step_pods.GPU_POOL == "gpu"
    assert "number of GPUs" in VALUES_FILE.read_text(encoding="utf-8")


def test_daemon_runs_sensors_and_automation(values):
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"] is True
    assert daemon["sensors"]["useThreads"] is True
    assert values["additionalInstanceConfig"]["auto_materialize"]["enabled"] is True


# ---------------------------------------------------------------------------------------------
# The instance the chart renders from these values (chart_render.py) loads in Dagster. Its storage
# on PostgreSQL is tested in test_chart_instance.py; here SQLite stands in for it and the run
# launcher, which needs a cluster, is checked against dagster-k8s's config schema.

def loadable_here(instance: dict) -> dict:
    """The rendered instance less what needs a cluster (run launcher) or a server (PostgreSQL)."""
    return {key: value for key, value in instance.items()
            if key not in ("run_launcher", *chart_render.STORAGE_CLASSES)}


@pytest.fixture(scope="module")
def rendered(values) -> dict:
    return chart_render.render_instance(values)


def test_rendered_instance_loads_with_the_intended_limits(values, rendered, k8s_instance, tmp_path):
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(loadable_here(rendered)))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == values["concurrency"]["pools"]["defaultLimit"]
        assert concurrency.pool_config.pool_granularity.value == "op"
        queue = concurrency.run_queue_config
        expected = k8s_instance["concurrency"]["runs"]
        assert queue.max_concurrent_runs == expected["max_concurrent_runs"]
        assert list(queue.tag_concurrency_limits) == expected["tag_concurrency_limits"]
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.auto_materialize_enabled


def test_rendered_run_launcher_config_is_one_dagster_k8s_accepts(rendered):
    from dagster._config import process_config
    from dagster._config.field_utils import convert_potential_field
    from dagster_k8s import K8sRunLauncher

    launcher = rendered["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(convert_potential_field(K8sRunLauncher.config_type()).config_type, launcher["config"])
    assert result.success, result.errors


def test_run_limits_beside_a_concurrency_block_are_refused(rendered, tmp_path):
    """Why the run limits sit under `concurrency.runs`, not in the run coordinator's config."""
    settings = loadable_here(rendered)
    settings["run_coordinator"] = {**settings["run_coordinator"], "config": {"max_concurrent_runs": 32}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(dg.DagsterInvalidConfigError, match="incompatible"):
        dg.DagsterInstance.from_config(str(tmp_path))


def test_the_renderer_refuses_values_it_does_not_reproduce(values):
    """A key that would change the chart's dagster.yaml and that chart_render.py ignores fails loudly."""
    import copy

    changed = copy.deepcopy(values)
    changed["runLauncher"]["config"]["k8sRunLauncher"]["podAnnotations"] = {"a": "b"}
    with pytest.raises(chart_render.UnsupportedValues, match="podAnnotations"):
        chart_render.render_instance(changed)
    changed = copy.deepcopy(values)
    changed["computeLogManager"]["type"] = "S3ComputeLogManager"
    with pytest.raises(chart_render.UnsupportedValues, match="S3ComputeLogManager"):
        chart_render.render_instance(changed)


# ---------------------------------------------------------------------------------------------
# Step logs: kept on the shared volume, readable by the webserver.

def test_step_logs_are_kept_where_the_webserver_reads_them(values, rendered, deployment, launcher, tmp_path):
    compute_logs = rendered["compute_logs"]
    base_dir = compute_logs["config"]["base_dir"]
    assert base_dir == "/data/dagster/compute_logs"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"compute_logs": compute_logs}))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager

        manager = instance.compute_log_manager
        assert isinstance(manager, LocalComputeLogManager), type(manager)
        assert manager._base_dir == base_dir  # noqa: SLF001 (no public accessor)

    # Step pods write there: they mount the volume's root at /data (the launcher's mounts, which
    # dagster-k8s passes on to the step jobs).
    def where_on_the_volume(volumes: list[dict], mounts: list[dict], path: str) -> str | None:
        """The path inside the PVC gcmlm-data that `path` in the pod is, or None."""
        claims = {v["name"] for v in volumes if v.get("persistentVolumeClaim", {}).get("claimName") == "gcmlm-data"}
        for mount in mounts:
            root = mount["mountPath"].rstrip("/")
            if mount["name"] in claims and (path == root or path.startswith(root + "/")):
                return "/".join(p for p in (mount.get("subPath", ""), path[len(root):].strip("/")) if p)
        return None

    on_volume = where_on_the_volume(launcher["volumes"], launcher["volumeMounts"], base_dir)
    assert on_volume == "dagster/compute_logs"
    webserver = values["dagsterWebserver"]
    assert where_on_the_volume(webserver["volumes"], webserver["volumeMounts"], base_dir) == on_volume, \
        "the webserver's pod sees the same folder of the volume at the same path"
    assert webserver["volumes"] == deployment["volumes"], "one volume, the shared PVC"
    assert where_on_the_volume(webserver["volumes"], webserver["volumeMounts"], "/data/landing") is None, \
        "the webserver mounts the step logs only, not the patients' data"


def test_the_chart_default_would_discard_step_logs(values):
    """Without computeLogManager the chart writes the NoOp manager (what issue 21 found)."""
    without = {key: value for key, value in values.items() if key != "computeLogManager"}
    assert chart_render.render_instance(without)["compute_logs"]["class"] == "NoOpComputeLogManager"


def test_values_file_has_no_json_typos_in_env(deployment):
    for name in ("GCMLM_GPU_NODE_SELECTOR", "GCMLM_GPU_TOLERATIONS"):
        json.loads(deployment["env"][name])
