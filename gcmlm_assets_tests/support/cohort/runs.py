"""The cohort assets and checks materialized in-process with a small, fast risk model."""

from __future__ import annotations

import dagster as dg

from gcmlm_assets.cohort import assets as cohort_assets
from gcmlm_assets.cohort import checks as cohort_checks
from gcmlm_assets.cohort.resources import RiskModelSettings

FAST_MODEL = RiskModelSettings(n_splits=4, n_repeats=2, n_bootstrap=200)


def materialize_cohort(instance, resources, selection=None, settings: RiskModelSettings = FAST_MODEL):
    return dg.materialize([*cohort_assets.ASSETS, *cohort_checks.CHECKS], instance=instance,
                          resources={**resources, "risk_model": settings}, raise_on_error=False,
                          selection=selection)


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}
