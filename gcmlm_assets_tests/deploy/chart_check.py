"""Compare the real chart's `helm template` output with what chart_render / chart_launcher say it is.

The tests cannot download the dagster chart, so they trust chart_render.py and chart_launcher.py.
Whoever has the chart (`helm pull dagster/dagster --version 1.13.27`) checks those renderers with
deploy/check_chart.sh, which renders deploy/helm/values.yaml with the real Helm and feeds the
manifests to this module:

    python -m gcmlm_assets_tests.deploy.chart_check rendered.yaml

Compared as data (YAML parsed, not text): the instance ConfigMap's dagster.yaml, the code
location's env ConfigMap (name and data), the code server's pod spec and container context, its
service account, and the webserver's volumes and mounts (the compute logs it reads). Fields the
chart writes empty (`[]`, `{}`, null) and the renderers leave out are not differences; the
instance keys chart_render leaves to the chart's defaults (NOT_RENDERED) are listed, not failed.
Exit status 1 when anything else differs. Plain Python: no dagster import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from gcmlm_assets_tests.support.deploy import chart_launcher, chart_render

# Instance keys the chart writes from its own defaults and chart_render does not model (its docstring).
NOT_RENDERED = {"run_monitoring", "retention", "python_logs", "schedules", "backfills"}
CONTEXT_ENV = "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT"


def _empty(value: Any) -> bool:
    return value in (None, [], {}, "")


def differences(chart: Any, ours: Any, path: str = "") -> Iterator[str]:
    """Each place where the chart's data and the renderer's differ, empty chart fields aside."""
    if isinstance(chart, dict) and isinstance(ours, dict):
        for key in sorted(set(chart) | set(ours)):
            if key not in ours:
                if not _empty(chart[key]):
                    yield f"{path}/{key}: only in the chart: {chart[key]!r}"
            elif key not in chart:
                yield f"{path}/{key}: only in the renderer: {ours[key]!r}"
            else:
                yield from differences(chart[key], ours[key], f"{path}/{key}")
    elif isinstance(chart, list) and isinstance(ours, list) and len(chart) == len(ours):
        for index, (item, our_item) in enumerate(zip(chart, ours)):
            yield from differences(item, our_item, f"{path}[{index}]")
    elif chart != ours:
        yield f"{path}: chart {chart!r}, renderer {ours!r}"


def _one(documents: list[dict], kind: str, name_suffix: str, what: str) -> dict:
    found = [doc for doc in documents if doc.get("kind") == kind and doc["metadata"]["name"].endswith(name_suffix)]
    if len(found) != 1:
        raise ValueError(f"the rendered manifests hold {len(found)} {kind} named *{name_suffix} ({what}), not one")
    return found[0]


def compare(manifests: str, values: dict | None = None) -> tuple[list[str], list[str]]:
    """(differences, notes) between `helm template` output and the renderers, for deploy/helm/values.yaml."""
    values = values or chart_launcher.chart_values()
    documents = [doc for doc in yaml.safe_load_all(manifests) if doc]
    found: list[str] = []
    notes: list[str] = []

    instance = _one(documents, "ConfigMap", "-instance", "the instance")
    if instance["metadata"]["name"] != chart_launcher.instance_config_map():
        found.append(f"instance ConfigMap name: {instance['metadata']['name']}")
    chart_instance = yaml.safe_load(instance["data"]["dagster.yaml"])
    for key in sorted(NOT_RENDERED & set(chart_instance)):
        notes.append(f"dagster.yaml {key}: {chart_instance.pop(key)!r} (the chart's default, not rendered here)")
    found += [f"dagster.yaml{d}" for d in differences(chart_instance, chart_render.render_instance(values))]

    deployment = chart_launcher.the_deployment(values)
    env_map = _one(documents, "ConfigMap", f"-{deployment['name']}-user-env", "the code location's env")
    if env_map["metadata"]["name"] != chart_launcher.user_env_config_map(deployment):
        found.append(f"env ConfigMap name: {env_map['metadata']['name']}")
    found += [f"env ConfigMap data{d}" for d in differences(
        env_map.get("data") or {}, {key: str(value) for key, value in deployment["env"].items()})]

    server = _one(documents, "Deployment", f"-{deployment['name']}", "the code server")
    pod = server["spec"]["template"]["spec"]
    found += [f"code server pod{d}" for d in differences(pod, chart_launcher.code_server_pod_spec(values))]
    context = next((env["value"] for env in pod["containers"][0].get("env", []) if env["name"] == CONTEXT_ENV), None)
    if context is None:
        found.append(f"code server: no {CONTEXT_ENV}")
    else:
        found += [f"container context{d}" for d in differences(
            json.loads(context), chart_launcher.code_location_container_context(values))]

    webserver = _one(documents, "Deployment", "-webserver", "the webserver")["spec"]["template"]["spec"]
    wanted = values.get("dagsterWebserver", {})
    for volume in wanted.get("volumes", []):
        if volume not in webserver.get("volumes", []):
            found.append(f"webserver pod: volume {volume['name']} missing or changed")
    mounts = [mount for container in webserver["containers"] for mount in container.get("volumeMounts", [])]
    for mount in wanted.get("volumeMounts", []):
        if mount not in mounts:
            found.append(f"webserver container: mount {mount} missing or changed")
    return found, notes


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gcmlm_assets_tests.deploy.chart_check RENDERED.yaml", file=sys.stderr)
        return 2
    try:
        found, notes = compare(Path(argv[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, yaml.YAMLError) as error:
        print(f"{argv[0]}: cannot compare: {error!r}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    for difference in found:
        print(f"DIFFERS: {difference}")
    print(f"{len(found)} difference(s) between the chart and chart_render/chart_launcher")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
