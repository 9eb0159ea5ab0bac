"""The one `Definitions` of the project.

`GCMLM_ENV` picks the executor: `local` (default) runs steps in subprocesses of
this machine; `k8s` runs each step as a Kubernetes job (dagster-k8s).
"""

from __future__ import annotations

import dagster as dg

from gcmlm_assets import settings
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort import resources as cohort_resources
from gcmlm_assets.landing.sensors import landing_sensor
from gcmlm_assets.pathology import assets as pathology_assets
from gcmlm_assets.pathology import checks as pathology_checks
from gcmlm_assets.pathology import resources as pathology_resources
from gcmlm_assets.radiology import assets as radiology_assets
from gcmlm_assets.radiology import checks as radiology_checks
from gcmlm_assets.radiology import resources as radiology_resources
from gcmlm_assets.resources import ArtifactStorage, LandingZone

# Two CPU-heavy steps at a time is what one 2-core machine sustains.
LOCAL_MAX_CONCURRENT_STEPS = 2


def build_executor(env: str) -> dg.ExecutorDefinition:
    if env == "k8s":
        from gcmlm_assets.deploy_k8s import k8s_executor

        return k8s_executor()
    return dg.multiprocess_executor.configured({"max_concurrent": LOCAL_MAX_CONCURRENT_STEPS})


def build_resources(env: str) -> dict:
    resources: dict = {"storage": ArtifactStorage(), "landing": LandingZone()}
    for domain in (radiology_resources, pathology_resources, cohort_resources):
        resources.update(domain.resources(env))
    return resources


def build_definitions(env: str | None = None) -> dg.Definitions:
    env = env or settings.environment()
    return dg.Definitions(
        assets=[*radiology_assets.ASSETS, *pathology_assets.ASSETS, *cohort_assets.ASSETS],
        asset_checks=[*radiology_checks.CHECKS, *pathology_checks.CHECKS, *cohort_checks.CHECKS],
        sensors=[landing_sensor, *cohort_assets.SENSORS],
        resources=build_resources(env),
        executor=build_executor(env),
    )


defs = build_definitions()
