"""The one `Definitions` of the project.

Each domain exports its own part (`radiology/`, `pathology/`, `cohort/` definitions.py); this
module only assembles them, tells the cohort what it needs of the others, and adds the policy:
the settings profile and the configured models on every asset page (key, group, kinds, owners and
code version are the catalogue's, gcmlm_assets/catalogue.py), the executor, the landing and steps
sensors that carry a patient's drop through its modality's chain.

`GCMLM_ENV` picks the executor: `local` (default) runs each run's steps one after the other in
the run's own process; `k8s` runs each step as a Kubernetes job (dagster-k8s). `GCMLM_PROFILE` picks the settings
profile (`production` by default, or `demo`; see `profiles.py`) that the resources and the
automation sensors are built from, so the daemon's runs need no run config.
"""

from __future__ import annotations

import dagster as dg

from gcmlm_assets import runs, settings
from gcmlm_assets.catalogue import (
    CT_MASK, FOLLOW_ONS, LN_FEATURES, MODALITY_CHAINS, PATCH_COORDS, PATIENT_FEATURES, QUPATH_GEOJSON,
    RISK_EXPLANATIONS, SEGMENTATION_MODEL, UNI_FEATURES)
from gcmlm_assets.cohort import definitions as cohort
from gcmlm_assets.cohort.sensors import PATIENT_FEATURE_ASSETS
from gcmlm_assets.landing.sensors import build_landing_sensor
from gcmlm_assets.pathology import definitions as pathology
from gcmlm_assets.patient_steps import build_patient_steps_sensor
from gcmlm_assets.profiles import Profile, get_profile
from gcmlm_assets.radiology import definitions as radiology
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone


def model_identities(resources: dict) -> dict[str, dict]:
    """Asset name -> the configured model's identity (encoder, nnU-Net settings), read from the
    resources without loading or hashing any weights (the materializations record the hashes)."""
    segmentation, encoder = resources["segmentation"].configured_model(), resources["encoder"].configured_encoder()
    return {UNI_FEATURES.key: encoder, LN_FEATURES.key: encoder,
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


def shared_resources(profile: Profile) -> dict:
    return {"storage": ArtifactStorage(), "landing": LandingZone(),
            "automation": AutomationSettings(**profile.resource_settings("automation"))}


def blocking_check_keys(assets: list[dg.AssetsDefinition], asset_names: tuple[str, ...]) -> list[dg.AssetCheckKey]:
    """The blocking checks declared on `asset_names` (what decides whether the cohort may use a result)."""
    return [spec.key for asset in assets for spec in asset.check_specs
            if spec.blocking and spec.asset_key.to_user_string() in asset_names]


# What a change of each modality's drop re-materializes for that patient, in order.
MODALITY_ASSETS: dict[str, list[dg.AssetKey]] = {
    modality: [dg.AssetKey(asset.key) for asset in chain] for modality, chain in MODALITY_CHAINS.items()}
landing_sensor = build_landing_sensor(MODALITY_ASSETS, holds=pathology.LANDING_HOLDS)
# What the cohort refresh waits on: each chain up to the row it fuses (catalogue.PATIENT_FEATURES),
# not what follows it there (radiology's DICOM SEG and SR), which the scores do not read. A chain
# that yields no row the cohort fuses would not be waited on at all.
FEATURE_CHAINS: list[list[dg.AssetKey]] = [
    chain[:chain.index(dg.AssetKey(PATIENT_FEATURES[modality].asset.key)) + 1]
    for modality, chain in MODALITY_ASSETS.items() if modality in PATIENT_FEATURES]
# A steps sensor per follow-on pair (catalogue.FOLLOW_ONS), in batched runs tagged as the upstream's
# work: the QuPath GeoJSON follows a new grid (tissue and tiles, before any explanation) and a new
# explanation (the patch values). It stays out of pathology's chain, which the cohort refresh waits on.
FOLLOW_ON_WORK = {PATCH_COORDS.key: runs.PATHOLOGY, RISK_EXPLANATIONS.key: runs.EXPLANATIONS}
FOLLOW_ON_SENSORS: dict[str, tuple[list[dg.AssetKey], str]] = {
    f"{downstream.key}_after_{upstream.key}_sensor": ([dg.AssetKey(upstream.key), dg.AssetKey(downstream.key)],
                                                      FOLLOW_ON_WORK[upstream.key])
    for upstream, downstream in FOLLOW_ONS}


def build_domains(env: str, profile: Profile) -> list[dg.Definitions]:
    """Each domain's part of the definitions, in the UI's order; the cohort is told what it needs
    of the others."""
    parts = [radiology.definitions(env, profile), pathology.definitions(env, profile)]
    input_checks = blocking_check_keys([asset for part in parts for asset in part.assets], PATIENT_FEATURE_ASSETS)
    return [*parts, cohort.definitions(env, profile, input_check_keys=input_checks,
                                       patient_chains=FEATURE_CHAINS,
                                       training_pending=radiology.training_pending,
                                       training_resource_keys=radiology.TRAINING_STATUS_RESOURCES,
                                       explanation_followers=[QUPATH_GEOJSON.key])]


def build_definitions(env: str | None = None, profile: str | None = None) -> dg.Definitions:
    env = env or settings.environment()
    chosen = get_profile(profile)
    domains = build_domains(env, chosen)
    resources = shared_resources(chosen)
    for domain in domains:
        clash = set(resources) & set(domain.resources or {})
        if clash:  # a later domain must not replace another's resource unnoticed
            raise ValueError(f"resource key(s) defined twice: {', '.join(sorted(clash))}")
        resources.update(domain.resources or {})
    steps = [build_patient_steps_sensor(f"{modality}_steps_sensor", chain, modality, chosen.sensor_interval_s)
             for modality, chain in MODALITY_ASSETS.items()]
    steps += [build_patient_steps_sensor(name, chain, work, chosen.sensor_interval_s)
              for name, (chain, work) in FOLLOW_ON_SENSORS.items()]
    return dg.Definitions(
        assets=with_profile([asset for domain in domains for asset in domain.assets], chosen,
                            model_identities(resources)),
        asset_checks=[check for domain in domains for check in domain.asset_checks or ()],
        sensors=[landing_sensor, *steps, *(sensor for domain in domains for sensor in domain.sensors or ())],
        resources=resources,
        executor=build_executor(env),
        metadata={"settings_profile": chosen.name, "environment": env},
    )


defs = build_definitions()
