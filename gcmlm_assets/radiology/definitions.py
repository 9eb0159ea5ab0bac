"""Radiology's part of the definitions: its assets, checks, sensors and resources.

definitions.py assembles the domains' parts and adds the policy (settings profile, executor);
keys, groups, kinds, owners and code versions are the catalogue's (gcmlm_assets/catalogue.py).
"""

from __future__ import annotations

import dagster as dg

from gcmlm_assets.profiles import Profile
from gcmlm_assets.radiology import assets, checks, dicom_assets, resources, sensors
from gcmlm_assets.radiology.segmentation_model import segmentation_model

# What the cohort refresh waits for: a segmentation training that is due or running.
training_pending = sensors.training_pending
TRAINING_STATUS_RESOURCES = sensors.TRAINING_STATUS_RESOURCES


def definitions(env: str, profile: Profile) -> dg.Definitions:
    interval = profile.sensor_interval_s
    return dg.Definitions(
        assets=[*assets.ASSETS, *dicom_assets.ASSETS, segmentation_model],
        asset_checks=checks.CHECKS,
        sensors=[sensors.build_segmentation_training_sensor(interval), sensors.build_predicted_mask_sensor(interval)],
        resources=resources.resources(env, profile),
    )
