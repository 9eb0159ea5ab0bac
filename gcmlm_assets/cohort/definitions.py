"""The cohort's part of the definitions: its assets, checks, sensors and resources.

The cohort reads the other domains' per-patient results but imports none of them: what it needs
to know of them (their blocking checks, their chains, a training to wait for) definitions.py
passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import dagster as dg

from gcmlm_assets.cohort import assets, checks, exchange_assets, explanation_assets, resources
from gcmlm_assets.catalogue import RISK_EXPLANATIONS, RISK_SCORES, SCORES_FILE
from gcmlm_assets.cohort.explanation_sensors import build_risk_explanations_sensor
from gcmlm_assets.cohort.sensors import build_cohort_refresh_sensor
from gcmlm_assets.profiles import Profile


def definitions(env: str, profile: Profile, *, input_check_keys: Sequence[dg.AssetCheckKey],
                patient_chains: Sequence[Sequence[dg.AssetKey]],
                training_pending: Callable[[dg.SensorEvaluationContext], bool] | None = None,
                training_resource_keys: Iterable[str] = (),
                explanation_followers: Sequence[str] = ()) -> dg.Definitions:
    """`input_check_keys`, `patient_chains`, `training_pending`: see `build_cohort_refresh_sensor`;
    fused_table reads `input_check_keys` from the `patient_result_checks` resource.
    `explanation_followers`: other domains' per-patient assets made from risk_explanations, which a
    one-patient explanation run carries on (`build_risk_explanations_sensor`'s `carried_on`)."""
    interval = profile.sensor_interval_s
    cohort_keys = [asset.key for asset in (*assets.ASSETS, *exchange_assets.ASSETS)]
    refresh = build_cohort_refresh_sensor(interval, cohort_keys, list(input_check_keys),
                                          [list(chain) for chain in patient_chains], training_pending,
                                          training_resource_keys)
    explain = build_risk_explanations_sensor(interval, RISK_EXPLANATIONS.key, RISK_SCORES.key, SCORES_FILE.name,
                                             carried_on=explanation_followers)
    return dg.Definitions(
        assets=[*assets.ASSETS, *exchange_assets.ASSETS, *explanation_assets.ASSETS],
        asset_checks=checks.CHECKS,
        sensors=[refresh, explain],
        resources=resources.resources(env, profile, input_check_keys),
    )
