"""The instance `dagster.yaml` the dagster/dagster chart writes from deploy/helm/values.yaml.

The chart cannot be downloaded at test time, so this module re-states, in Python, what its
templates do with the keys our values file sets: `templates/configmap-instance.yaml` and the
helpers under `templates/helpers/instance/` (`_postgresql.tpl`, `_run-launcher.tpl`,
`_run-coordinator.tpl`, `_compute-log-manager.tpl`, `_scheduler.tpl`, `_concurrency.tpl`) plus
`dagster.fullname`, `dagster.serviceAccountName`, `dagster.postgresql.host` and
`dagster.postgresql.secretName` of `templates/helpers/_helpers.tpl`, as read in dagster-io/dagster
at the version with the top-level `concurrency:` block and `postgresql.postgresqlScheme` (the
1.13 chart has both).

What the chart writes there, and this module with it:

- PostgreSQL storage as three entries, `run_storage`, `event_log_storage` and `schedule_storage`
  (dagster_postgres' classes), each with the same `config: {postgres_db: ...}`: `username` and
  `db_name` as given, `password: {env: DAGSTER_PG_PASSWORD}` (every chart pod gets it from
  `global.postgresqlSecretName`, key `postgresql-password`), `hostname` (the external host when
  `postgresql.enabled` is false), `port` from `postgresql.service.port`, `params` from
  `postgresqlParams` (`{}` by default) and `scheme` only when `postgresqlScheme` is set;
- the K8sRunLauncher's block, rendered by `chart_launcher.run_launcher` (one rendering of it);
- the QueuedRunCoordinator (no `config` while its own limits are unset), `compute_logs`,
  `run_retries`, `sensors`, `telemetry`, `concurrency` and `additionalInstanceConfig` appended as
  given.

Keys of the chart our values leave at the chart's defaults and that do not change what is tested
here (run monitoring, retention, python_logs) are not rendered. Keys the chart would render
from values this module does not know fail loudly (`UnsupportedValues`), so a new key in
values.yaml cannot be silently ignored.
"""

from __future__ import annotations

import re
from typing import Any

from gcmlm_assets_tests.support.deploy import chart_launcher

CHART = "dagster"
RELEASE = "gcmlm"  # deploy/README.md: `helm upgrade --install gcmlm dagster/dagster ...`
NAMESPACE = "gcmlm"

# The variable the chart sets from the password Secret in every Dagster pod (webserver, daemon,
# code location, run and step pods) and the instance reads.
PASSWORD_ENV = "DAGSTER_PG_PASSWORD"

COMPUTE_LOG_TYPES = {"NoOpComputeLogManager", "CustomComputeLogManager"}


# The k8sRunLauncher keys chart_launcher.run_launcher renders.
LAUNCHER_KEYS = {"loadInclusterConfig", "jobNamespace", "imagePullPolicy", "kubeconfigFile", "image", "envConfigMaps",
                 "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "resources", "securityContext",
                 "failPodOnRunFailure", "schedulerName", "runK8sConfig"}


class UnsupportedValues(ValueError):
    """The values set something this renderer does not reproduce."""


def fullname(release: str = RELEASE) -> str:
    """`dagster.fullname`: the release name, or `<release>-dagster` when it lacks the chart's name."""
    name = release if CHART in release else f"{release}-{CHART}"
    return name[:63].rstrip("-")


def postgres_db(values: dict) -> dict:
    """The `postgres_db` mapping of `_postgresql.tpl`, as the chart writes it from these values."""
    pg = values["postgresql"]
    if pg.get("enabled", True):
        raise UnsupportedValues("postgresql.enabled: the bundled server is not rendered here (ours is external)")
    if values.get("global", {}).get("postgresqlSecretUsernameKey"):
        raise UnsupportedValues("global.postgresqlSecretUsernameKey is not rendered here")
    config: dict[str, Any] = {
        "username": pg["postgresqlUsername"],
        "password": {"env": PASSWORD_ENV},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams") or {},
    }
    if pg.get("postgresqlScheme"):
        config["scheme"] = pg["postgresqlScheme"]
    return config


STORAGE_CLASSES = {
    "run_storage": ("dagster_postgres.run_storage", "PostgresRunStorage"),
    "event_log_storage": ("dagster_postgres.event_log", "PostgresEventLogStorage"),
    "schedule_storage": ("dagster_postgres.schedule_storage", "PostgresScheduleStorage"),
}


def storage_sections(values: dict) -> dict:
    """The chart's three storage entries, each a dagster_postgres class on the same database."""
    return {key: {"module": module, "class": cls, "config": {"postgres_db": postgres_db(values)}}
            for key, (module, cls) in STORAGE_CLASSES.items()}


def _run_coordinator(daemon: dict) -> dict:
    coordinator = daemon["runCoordinator"]
    if coordinator["type"] != "QueuedRunCoordinator":
        raise UnsupportedValues(f"runCoordinator.type {coordinator['type']!r}: only the queued one is rendered here")
    own = (coordinator.get("config") or {}).get("queuedRunCoordinator") or {}
    if any(value not in (None, [], {}) for value in own.values()):
        raise UnsupportedValues("queuedRunCoordinator limits: ours are under `concurrency.runs`")
    return {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}


def _compute_logs(values: dict) -> dict:
    manager = values.get("computeLogManager") or {"type": "NoOpComputeLogManager"}
    if manager["type"] not in COMPUTE_LOG_TYPES:
        raise UnsupportedValues(f"computeLogManager.type {manager['type']!r} is not rendered here")
    if manager["type"] == "NoOpComputeLogManager":  # the chart's default
        return {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
    custom = manager["config"]["customComputeLogManager"]
    return {"module": custom["module"], "class": custom["class"], "config": custom.get("config")}


def _concurrency(concurrency: dict) -> dict:
    """`_concurrency.tpl`: pools and runs with their keys in snake_case; a tag limit's `value` as given."""
    pools, runs = concurrency.get("pools") or {}, concurrency.get("runs") or {}
    rendered: dict[str, Any] = {}
    pool_keys = {"defaultLimit": "default_limit", "granularity": "granularity",
                 "opGranularityRunBuffer": "op_granularity_run_buffer"}
    if set(pools) - set(pool_keys):
        raise UnsupportedValues(f"concurrency.pools keys not rendered here: {sorted(set(pools) - set(pool_keys))}")
    rendered_pools = {name: pools[key] for key, name in pool_keys.items() if pools.get(key) is not None}
    if rendered_pools:
        rendered["pools"] = rendered_pools
    rendered_runs: dict[str, Any] = {}
    if runs.get("maxConcurrentRuns") is not None:
        rendered_runs["max_concurrent_runs"] = runs["maxConcurrentRuns"]
    if runs.get("tagConcurrencyLimits"):
        rendered_runs["tag_concurrency_limits"] = [
            {"key": limit["key"], **({"value": limit["value"]} if limit.get("value") else {}), "limit": limit["limit"]}
            for limit in runs["tagConcurrencyLimits"]]
    if rendered_runs:
        rendered["runs"] = rendered_runs
    return rendered


def render_instance(values: dict, release: str = RELEASE, namespace: str = NAMESPACE) -> dict:
    """The whole instance `dagster.yaml` of the chart's `<fullname>-instance` ConfigMap, as a dict."""
    daemon = values["dagsterDaemon"]
    if not daemon.get("enabled", True):
        raise UnsupportedValues("dagsterDaemon.enabled: false is not rendered here")
    instance: dict[str, Any] = {"scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"}}
    sections = storage_sections(values)
    instance["schedule_storage"] = sections["schedule_storage"]
    launcher_keys = set(values["runLauncher"]["config"]["k8sRunLauncher"])
    if values["runLauncher"]["type"] != "K8sRunLauncher" or launcher_keys - LAUNCHER_KEYS:
        raise UnsupportedValues(f"runLauncher {values['runLauncher']['type']} keys not rendered here: "
                                f"{sorted(launcher_keys - LAUNCHER_KEYS)}")
    # One rendering of the launcher block, chart_launcher's (over the chart's own defaults).
    instance["run_launcher"] = chart_launcher.run_launcher(chart_launcher.merged(chart_launcher.CHART_DEFAULTS, values),
                                                          release, namespace)
    instance["run_storage"] = sections["run_storage"]
    instance["event_log_storage"] = sections["event_log_storage"]
    if daemon["runCoordinator"].get("enabled", True):
        instance["run_coordinator"] = _run_coordinator(daemon)
    instance["compute_logs"] = _compute_logs(values)
    retries = daemon.get("runRetries") or {}
    if retries.get("enabled"):
        instance["run_retries"] = {"enabled": True}
        if retries.get("maxRetries"):
            instance["run_retries"]["max_retries"] = retries["maxRetries"]
        if "retryOnAssetOrOpFailure" in retries:
            instance["run_retries"]["retry_on_asset_or_op_failure"] = retries["retryOnAssetOrOpFailure"]
    sensors = daemon.get("sensors") or {}
    if sensors.get("useThreads"):
        instance["sensors"] = {"use_threads": True}
        if sensors.get("numWorkers"):
            instance["sensors"]["num_workers"] = sensors["numWorkers"]
    instance["telemetry"] = {"enabled": values.get("telemetry", {}).get("enabled", True)}
    if (values.get("concurrency") or {}).get("enabled"):
        instance["concurrency"] = _concurrency(values["concurrency"])
    for key, value in (values.get("additionalInstanceConfig") or {}).items():
        if key in instance:
            raise UnsupportedValues(f"additionalInstanceConfig.{key} repeats a key the chart writes itself")
        instance[key] = value
    return instance


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
