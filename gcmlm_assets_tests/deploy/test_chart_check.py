"""deploy/check_chart.sh's comparison (chart_check.py), on manifests made from the renderers.

The real chart is not here; these manifests are what chart_render/chart_launcher say the chart
writes, so the check must find them equal, and must name each field an edit makes differ.
"""

from __future__ import annotations

import copy

import yaml

from gcmlm_assets_tests.deploy import chart_check
from gcmlm_assets_tests.support.deploy import chart_launcher, chart_render


def _manifests(values: dict) -> list[dict]:
    deployment = chart_launcher.the_deployment(values)
    webserver = values["dagsterWebserver"]
    return [
        {"kind": "ConfigMap", "metadata": {"name": chart_launcher.instance_config_map()},
         "data": {"dagster.yaml": yaml.safe_dump(chart_render.render_instance(values))}},
        {"kind": "ConfigMap", "metadata": {"name": chart_launcher.user_env_config_map(deployment)},
         "data": {key: str(value) for key, value in deployment["env"].items()}},
        {"kind": "Deployment", "metadata": {"name": f"{chart_launcher.subchart_fullname()}-{deployment['name']}"},
         "spec": {"template": {"spec": {**chart_launcher.code_server_pod_spec(values), "nodeSelector": None}}}},
        {"kind": "Deployment", "metadata": {"name": "gcmlm-dagster-webserver"},
         "spec": {"template": {"spec": {"volumes": webserver["volumes"],
                                        "containers": [{"volumeMounts": webserver["volumeMounts"]}]}}}},
    ]


def _text(documents: list[dict]) -> str:
    return yaml.safe_dump_all(documents)


def test_the_renderers_own_manifests_show_no_difference():
    values = chart_launcher.chart_values()
    documents = _manifests(values)
    instance = yaml.safe_load(documents[0]["data"]["dagster.yaml"])
    instance["run_monitoring"] = {"enabled": True}  # a chart default chart_render leaves out
    documents[0]["data"]["dagster.yaml"] = yaml.safe_dump(instance)
    found, notes = chart_check.compare(_text(documents), values)
    assert found == []
    assert [note.split(":")[0] for note in notes] == ["dagster.yaml run_monitoring"]


def test_each_edited_field_is_named():
    values = chart_launcher.chart_values()
    documents = _manifests(values)
    instance = yaml.safe_load(documents[0]["data"]["dagster.yaml"])
    del instance["run_storage"]["config"]["postgres_db"]["scheme"]
    documents[0]["data"]["dagster.yaml"] = yaml.safe_dump(instance)
    pod = documents[2]["spec"]["template"]["spec"]
    pod["serviceAccountName"] = "default"
    documents[3]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = []
    found, _ = chart_check.compare(_text(copy.deepcopy(documents)), values)
    assert any(d.startswith("dagster.yaml/run_storage/config/postgres_db/scheme: only in the renderer") for d in found)
    assert any(d.startswith("code server pod/serviceAccountName: chart 'default'") for d in found)
    assert any(d.startswith("webserver container: mount") for d in found)
    assert len(found) == 3, found
