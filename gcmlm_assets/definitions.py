"""The one `Definitions` of the project.

`GCMLM_ENV` picks the executor: `local` (default) runs each run's steps one after the other in
the run's own process; `k8s` runs each step as a Kubernetes job (dagster-k8s). `GCMLM_PROFILE` picks the settings
profile (`production` by default, or `demo`; see `profiles.py`) that the resources and the
automation sensors are built from, so the daemon's runs need no run config.
"""

from __future__ import annotations

import dagster as dg

from gcmlm_assets import settings
from gcmlm_assets.catalogue import (
    CT_MASK, RISK_EXPLANATIONS, RISK_SCORES, SCORES_FILE, SEGMENTATION_MODEL, UNI_FEATURES)
from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort import resources as cohort_resources
from gcmlm_assets.cohort import explanation_assets
from gcmlm_assets.cohort.explanation_sensors import build_risk_explanations_sensor
from gcmlm_assets.cohort.sensors import PATIENT_FEATURE_ASSETS, build_cohort_refresh_sensor
from gcmlm_assets.landing.sensors import MODALITY_ASSETS, landing_sensor
from gcmlm_assets.pathology import assets as pathology_assets
from gcmlm_assets.pathology import checks as pathology_checks
from gcmlm_assets.pathology import resources as pathology_resources
from gcmlm_assets.patient_steps import build_patient_steps_sensor
from gcmlm_assets.profiles import Profile, get_profile
from gcmlm_assets.radiology import assets as radiology_assets
from gcmlm_assets.radiology import checks as radiology_checks
from gcmlm_assets.radiology import resources as radiology_resources
from gcmlm_assets.radiology.segmentation_model import segmentation_model
from gcmlm_assets.radiology.sensors import build_predicted_mask_sensor, build_segmentation_training_sensor
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone

def model_identities(resources: dict) -> dict[str, dict]:
    """Asset name -> the configured model's identity (encoder, nnU-Net settings), read from the
    resources without loading or hashing any weights (the materializations record the hashes)."""
    segmentation = resources["segmentation"].configured_model()
    return {UNI_FEATURES.key: resources["encoder"].configured_encoder(),
            SEGMENTATION_MODEL.key: segmentation, CT_MASK.key: segmentation}


def with_profile(assets: list[dg.AssetsDefinition], profile: Profile,
                 identities: dict[str, dict] | None = None) -> list[dg.AssetsDefinition]:
    """The assets with the settings profile they run with and the models they are made with (on
    every asset page; key, group, kinds, owners and code version come from catalogue.py)."""
    identities = identities or {}

    def describe(spec: dg.AssetSpec) -> dg.AssetSpec:
        return spec.merge_attributes(metadata={"settings_profile": f"{profile.name}: {profile.description}",
                                               **identities.get(spec.key.to_user_string(), {})})

    return list(dg.map_asset_specs(describe, assets))


def build_executor(env: str) -> dg.ExecutorDefinition:
    if env == "k8s":
        from gcmlm_assets.deploy_k8s import k8s_executor

        return k8s_executor()
    # A per-patient run is a chain of steps, so a process per step would buy no parallelism and
    # cost each step a fresh import of the definitions; the instance's run queue runs two runs
    # at a time, which is what one 2-core machine sustains (deploy/local/dagster.yaml).
    return dg.in_process_executor


def build_resources(env: str, profile: Profile) -> dict:
    resources: dict = {"storage": ArtifactStorage(), "landing": LandingZone(),
                       "automation": AutomationSettings(**profile.resource_settings("automation"))}
    for domain in (radiology_resources, pathology_resources, cohort_resources):
        resources.update(domain.resources(env, profile))
    return resources


def blocking_check_keys(assets: list[dg.AssetsDefinition], asset_names: tuple[str, ...]) -> list[dg.AssetCheckKey]:
    """The blocking checks declared on `asset_names` (what decides whether the cohort may use a result)."""
    return [spec.key for asset in assets for spec in asset.check_specs
            if spec.blocking and spec.asset_key.to_user_string() in asset_names]


def build_sensors(profile: Profile) -> list[dg.SensorDefinition]:
    interval = profile.sensor_interval_s
    cohort_keys = [asset.key for asset in cohort_assets.ASSETS]
    input_checks = blocking_check_keys([*radiology_assets.ASSETS, *pathology_assets.ASSETS], PATIENT_FEATURE_ASSETS)
    steps = [build_patient_steps_sensor(f"{modality}_steps_sensor", chain, modality, interval)
             for modality, chain in MODALITY_ASSETS.items()]
    return [landing_sensor, *steps, build_segmentation_training_sensor(interval), build_predicted_mask_sensor(interval),
            build_cohort_refresh_sensor(interval, cohort_keys, input_checks, list(MODALITY_ASSETS.values())),
            build_risk_explanations_sensor(interval, RISK_EXPLANATIONS.key, RISK_SCORES.key, SCORES_FILE.name)]


def build_definitions(env: str | None = None, profile: str | None = None) -> dg.Definitions:
    env = env or settings.environment()
    chosen = get_profile(profile)
    resources = build_resources(env, chosen)
    return dg.Definitions(
        assets=with_profile([*radiology_assets.ASSETS, segmentation_model, *pathology_assets.ASSETS,
                           *cohort_assets.ASSETS, *explanation_assets.ASSETS], chosen, model_identities(resources)),
        asset_checks=[*radiology_checks.CHECKS, *pathology_checks.CHECKS, *cohort_checks.CHECKS],
        sensors=build_sensors(chosen),
        resources=resources,
        executor=build_executor(env),
        metadata={"settings_profile": chosen.name, "environment": env},
    )


defs = build_definitions()
