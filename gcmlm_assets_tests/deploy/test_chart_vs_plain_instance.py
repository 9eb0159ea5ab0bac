"""The chart's instance and deploy/k8s/dagster.yaml: the same where they share a setting, and
different only where listed here, with why (deploy/README.md points operators at these lists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gcmlm_assets_tests.support.deploy import chart_render

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rendered() -> dict:
    return chart_render.render_instance(yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def k8s_instance() -> dict:
    return yaml.safe_load((REPO / "deploy" / "k8s" / "dagster.yaml").read_text(encoding="utf-8"))



DELIBERATE_DIFFERENCES = {
    # The chart writes three storage entries with the values' host, user, database and port; the
    # plain file one `storage: postgres:` block reading them from DAGSTER_PG_* (same scheme, same
    # password variable; compared below).
    "storage": "storage", "run_storage": "storage", "event_log_storage": "storage",
    "schedule_storage": "storage",
    # The chart's daemon runs the scheduler and the threaded sensor daemon; the plain file leaves
    # both at Dagster's defaults.
    "scheduler": "daemon", "sensors": "daemon",
    # Set in the values file only; the plain file keeps Dagster's defaults.
    "telemetry": "values only", "auto_materialize": "values only",
}
# Run-launcher keys that name chart-made objects (service account, instance ConfigMap, the
# password Secret, the namespace) or carry what the plain file gets from the `gcmlm-env` ConfigMap;
# and the pull policy, which the chart always writes (its default, Always) while run and step pods
# take the code location's (IfNotPresent) through its container context (test_chart_jobs.py).
# The security contexts and run_k8s_config are written in each file's own spelling and compared in
# test_chart_jobs.py (test_the_plain_instances_run_pod_security_matches_the_charts).
LAUNCHER_DIFFERENCES = {"load_incluster_config", "job_namespace", "service_account_name", "dagster_home",
                        "instance_config_map", "postgres_password_secret", "env_config_maps", "env_vars",
                        "security_context", "run_k8s_config", "image_pull_policy"}


def _same_module(a: str, b: str) -> bool:
    return a.replace("dagster._core.", "dagster.core.") == b.replace("dagster._core.", "dagster.core.")


def test_the_chart_instance_and_the_plain_instance_agree_where_they_share(rendered, k8s_instance):
    differing = sorted(set(rendered) ^ set(k8s_instance) | {key for key in set(rendered) & set(k8s_instance)
                                                             if rendered[key] != k8s_instance[key]})
    allowed = set(DELIBERATE_DIFFERENCES) | {"run_launcher", "run_coordinator", "compute_logs"}
    assert set(differing) <= allowed, f"not listed as deliberate: {sorted(set(differing) - allowed)}"

    plain_db = k8s_instance["storage"]["postgres"]["postgres_db"]
    for key in chart_render.STORAGE_CLASSES:
        chart_db = rendered[key]["config"]["postgres_db"]
        assert chart_db["scheme"] == plain_db["scheme"] == "postgresql+psycopg2"
        assert chart_db["password"] == plain_db["password"] == {"env": chart_render.PASSWORD_ENV}
    assert rendered["concurrency"] == k8s_instance["concurrency"]
    assert rendered["run_retries"] == k8s_instance["run_retries"]
    for key in ("run_coordinator", "compute_logs"):  # equal up to dagster.core / dagster._core
        assert rendered[key]["class"] == k8s_instance[key]["class"]
        assert _same_module(rendered[key]["module"], k8s_instance[key]["module"])
        assert rendered[key].get("config") == k8s_instance[key].get("config")
    chart_launcher, plain_launcher = rendered["run_launcher"], k8s_instance["run_launcher"]
    assert (chart_launcher["module"], chart_launcher["class"]) == (plain_launcher["module"], plain_launcher["class"])
    shared = set(chart_launcher["config"]) & set(plain_launcher["config"]) - LAUNCHER_DIFFERENCES
    assert shared == {"volumes", "volume_mounts"}
    for key in shared:
        assert chart_launcher["config"][key] == plain_launcher["config"][key], key
    unlisted = (set(chart_launcher["config"]) | set(plain_launcher["config"])) - shared - LAUNCHER_DIFFERENCES
    assert not unlisted, f"run launcher keys neither compared nor listed as deliberate: {sorted(unlisted)}"
