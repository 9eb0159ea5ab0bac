#!/usr/bin/env bash
# Check the tests' re-statement of the dagster chart (gcmlm_assets_tests/support/deploy/chart_render.py,
# chart_launcher.py) against the real chart, rendered by Helm from deploy/helm/values.yaml.
# CI cannot download the chart; run this wherever the chart and Helm are, after any change to the
# values, the renderers or the chart's version:
#
#   helm pull dagster/dagster --version 1.13.27 --untar --untardir /tmp/chart
#   deploy/check_chart.sh /tmp/chart/dagster
#
# CHART may also be a chart reference Helm resolves itself (dagster/dagster, with CHART_VERSION).
# Exit status 0: lint passes and the renderers match the chart; otherwise each difference is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
CHART=${1:?usage: deploy/check_chart.sh CHART_DIR_OR_REF}
HELM=${HELM:-helm}
PYTHON=${PYTHON:-.venv/bin/python}
VERSION_ARGS=()
if [ -n "${CHART_VERSION:-}" ]; then VERSION_ARGS=(--version "$CHART_VERSION"); fi
# The release, namespace and tag the renderers assume (chart_launcher.RELEASE, NAMESPACE, values.yaml).
ARGS=(--namespace gcmlm -f deploy/helm/values.yaml
      --set 'dagster-user-deployments.deployments[0].image.tag=0.1.0' "${VERSION_ARGS[@]}")
RENDERED=$(mktemp)
trap 'rm -f "$RENDERED"' EXIT
if [ -d "$CHART" ]; then
  "$HELM" lint --strict "$CHART" "${ARGS[@]}"
fi
"$HELM" template gcmlm "$CHART" "${ARGS[@]}" > "$RENDERED"
PYTHONPATH=$PWD "$PYTHON" -m gcmlm_assets_tests.deploy.chart_check "$RENDERED"
