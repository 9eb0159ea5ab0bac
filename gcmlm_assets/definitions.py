"""The one `Definitions` of the project.

Each domain exports its own part (`radiology/`, `pathology/`, `cohort/` definitions.py); this
module only assembles them, tells the cohort what it needs of the others, and adds the policy:
kinds, owners and the settings profile on every asset, the executor, the landing and steps
sensors that carry a patient's drop through its modality's chain.

`GCMLM_ENV` picks the executor: `local` (default) runs each run's steps one after the other in
the run's own process; `k8s` runs each step as a Kubernetes job (dagster-k8s). `GCMLM_PROFILE` picks the settings
profile (`production` by default, or `demo`; see `profiles.py`) that the resources and the
automation sensors are built from, so the daemon's runs need no run config.
"""

from __future__ import annotations

import dagster as dg

from gcmlm_assets import settings
from gcmlm_assets.cohort import definitions as cohort
from gcmlm_assets.cohort.sensors import PATIENT_FEATURE_ASSETS
from gcmlm_assets.landing.sensors import build_landing_sensor
from gcmlm_assets.pathology import definitions as pathology
from gcmlm_assets.patient_steps import build_patient_steps_sensor
from gcmlm_assets.profiles import Profile, get_profile
from gcmlm_assets.radiology import definitions as radiology
from gcmlm_assets.resources import ArtifactStorage, AutomationSettings, LandingZone

# What each asset is made with (the UI's kind badges) and which team answers for it.
ASSET_KINDS: dict[str, set[str]] = {
    "ct_image": {"simpleitk"}, "ct_mask": {"nnunet"}, "segmentation_model": {"nnunet"},
    "radiomics_row": {"pyradiomics"}, "patch_coords": {"openslide"}, "uni_features": {"torch"},
    "slide_vector": {"numpy"}, "clinical_table": {"pyarrow"}, "fused_table": {"pyarrow"},
    "risk_model": {"sklearn"}, "risk_scores": {"sklearn"}, "risk_explanations": {"sklearn"},
}
GROUP_OWNERS = {"radiology": "team:radiology", "pathology": "team:pathology", "cohort": "team:biostatistics"}


def model_identities(resources: dict) -> dict[str, dict]:
    """Asset name -> the configured model's identity (encoder, nnU-Net settings), read from the
    resources without loading or hashing any weights (the materializations record the hashes)."""
    segmentation = resources["segmentation"].configured_model()
    return {"uni_features": resources["encoder"].configured_encoder(),
            "segmentation_model": segmentation, "ct_mask": segmentation}


def catalogued(assets: list[dg.AssetsDefinition], profile: Profile,
               identities: dict[str, dict] | None = None) -> list[dg.AssetsDefinition]:
    """The assets with their kinds, owners, the settings profile they run with and the models they
    are made with (on every asset page)."""
    identities = identities or {}

    def describe(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.to_user_string()
        return spec.replace_attributes(
            kinds=ASSET_KINDS[name], owners=[GROUP_OWNERS[spec.group_name]],
        ).merge_attributes(metadata={"settings_profile": f"{profile.name}: {profile.description}",
                                     **identities.get(name, {})})

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
MODALITY_ASSETS: dict[str, list[dg.AssetKey]] = {"radiology": radiology.PATIENT_CHAIN,
                                                 "pathology": pathology.PATIENT_CHAIN}
landing_sensor = build_landing_sensor(MODALITY_ASSETS, holds=[pathology.LANDING_HOLD])


def build_domains(env: str, profile: Profile) -> list[dg.Definitions]:
    """Each domain's part of the definitions, in the UI's order; the cohort is told what it needs
    of the others."""
    parts = [radiology.definitions(env, profile), pathology.definitions(env, profile)]
    input_checks = blocking_check_keys([asset for part in parts for asset in part.assets], PATIENT_FEATURE_ASSETS)
    return [*parts, cohort.definitions(env, profile, input_check_keys=input_checks,
                                       patient_chains=list(MODALITY_ASSETS.values()),
                                       training_pending=radiology.training_pending,
                                       training_resource_keys=radiology.TRAINING_STATUS_RESOURCES)]


def build_definitions(env: str | None = None, profile: str | None = None) -> dg.Definitions:
    env = env or settings.environment()
    chosen = get_profile(profile)
    domains = build_domains(env, chosen)
    resources = shared_resources(chosen)
    for domain in domains:
        resources.update(domain.resources or {})
    steps = [build_patient_steps_sensor(f"{modality}_steps_sensor", chain, modality, chosen.sensor_interval_s)
             for modality, chain in MODALITY_ASSETS.items()]
    return dg.Definitions(
        assets=catalogued([asset for domain in domains for asset in domain.assets], chosen, model_identities(resources)),
        asset_checks=[check for domain in domains for check in domain.asset_checks or ()],
        sensors=[landing_sensor, *steps, *(sensor for domain in domains for sensor in domain.sensors or ())],
        resources=resources,
        executor=build_executor(env),
        metadata={"settings_profile": chosen.name, "environment": env},
    )


defs = build_definitions()
