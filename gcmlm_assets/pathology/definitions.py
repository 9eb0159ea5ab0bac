"""Pathology's part of the definitions: its assets, checks, resources and the lymph-node analysis' sensors.

definitions.py assembles the domains' parts and adds the policy (settings profile, executor);
keys, groups, kinds, owners and code versions are the catalogue's (gcmlm_assets/catalogue.py).
"""

from __future__ import annotations

import dagster as dg

from gcmlm_assets.catalogue import LYMPH_NODE, PATHOLOGY
from gcmlm_assets.landing.sensors import ModalityHold
from gcmlm_assets.pathology import assets, checks, geojson_assets, ln_assets, ln_sensors, lymph_node_assets, resources
from gcmlm_assets.pathology.resources import PatchEncoder
from gcmlm_assets.profiles import Profile

# Pathology and lymph-node runs (both encode their slides) would all fail while the encoder has no
# weights: landing_sensor holds them.
LANDING_HOLDS = [ModalityHold(modality, "encoder", PatchEncoder.missing_weights) for modality in (PATHOLOGY, LYMPH_NODE)]


def definitions(env: str, profile: Profile) -> dg.Definitions:
    return dg.Definitions(
        assets=[*assets.ASSETS, *ln_assets.ASSETS, *lymph_node_assets.ASSETS, *geojson_assets.ASSETS],
        asset_checks=checks.CHECKS,
        sensors=[ln_sensors.build_tumour_classifier_sensor(profile.sensor_interval_s),
                 ln_sensors.build_lymph_nodes_after_classifier_sensor(profile.sensor_interval_s)],
        resources=resources.resources(env, profile),
    )
