"""Resources of the cohort group, keyed by resource name."""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg
from pydantic import Field

from gcmlm_assets.cohort.model.risk_model_fields import ModelSettingFields
from gcmlm_assets.profiles import PRODUCTION, Profile
from gcmlm_assets.scans import timepoint_problem
from gcmlm_assets.setting_fields import values_of


class RiskModelSettings(dg.ConfigurableResource, ModelSettingFields):
    """Settings of `risk_model` (key "risk_model"); changing any of them retrains the model."""

    # The fields are ModelSettingFields' (declared there once, with their defaults and descriptions).

    def model_settings(self):
        from gcmlm_assets.cohort.model.model_settings import ModelSettings

        return ModelSettings(**values_of(self, ModelSettingFields))


# scans.chosen_scan's choices besides a timepoint's own name
TIMEPOINT_CHOICES = ("baseline", "first", "last")


class FusedTableSettings(dg.ConfigurableResource):
    """Settings of `fused_table` (key "fused_table"); changing one rebuilds the table (its fingerprint)."""

    radiology_timepoint: str = Field(
        default="baseline",
        description="Which CT scan of a patient feeds the radiology block (`rad_*` columns): `baseline` (the timepoint "
        "labelled so, else the oldest), `first`, `last`, or a timepoint's name (a date such as 2024-03-15 or a "
        "label such as post_nact; a patient without that timepoint has no radiology block). The delta block "
        "always compares the first scan with the last.")

    def timepoint_problem(self) -> str | None:
        """Why `radiology_timepoint` is not a valid choice, or None."""
        choice = self.radiology_timepoint
        if choice in TIMEPOINT_CHOICES or timepoint_problem(choice) is None:
            return None
        return (f"fused_table setting radiology_timepoint={choice!r} is neither one of {', '.join(TIMEPOINT_CHOICES)} "
                f"nor a timepoint name ({timepoint_problem(choice)})")


class PatientResultChecks(dg.ConfigurableResource):
    """The blocking checks of each per-patient asset fused_table reads (key "patient_result_checks"):
    a patient's result is used only when they passed on its latest materialization. The cohort
    imports no other domain, so definitions.py fills this from their check specs."""

    blocking: dict[str, list[str]]


def blocking_checks_by_asset(check_keys: Iterable[dg.AssetCheckKey]) -> dict[str, list[str]]:
    by_asset: dict[str, list[str]] = {}
    for key in check_keys:
        by_asset.setdefault(key.asset_key.to_user_string(), []).append(key.name)
    return by_asset


def resources(env: str, profile: Profile = PRODUCTION,
              input_check_keys: Iterable[dg.AssetCheckKey] = ()) -> dict[str, dg.ConfigurableResource]:
    return {"risk_model": RiskModelSettings(**profile.resource_settings("risk_model")),
            "fused_table": FusedTableSettings(**profile.resource_settings("fused_table")),
            "patient_result_checks": PatientResultChecks(blocking=blocking_checks_by_asset(input_check_keys))}
