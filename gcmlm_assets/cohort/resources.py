"""Resources of the cohort group, keyed by resource name."""

from __future__ import annotations

import dagster as dg

from gcmlm_assets.cohort.model.risk_model_fields import ModelSettingFields
from gcmlm_assets.profiles import PRODUCTION, Profile
from gcmlm_assets.setting_fields import settings_resource, values_of


class _RiskModelResource(dg.ConfigurableResource):
    """Settings of `risk_model` (key "risk_model"); changing any of them retrains the model."""

    # RiskModelSettings below: these methods, with ModelSettingFields' fields.

    def model_settings(self):
        from gcmlm_assets.cohort.model.model_settings import ModelSettings

        return ModelSettings(**values_of(self, ModelSettingFields))


RiskModelSettings = settings_resource("RiskModelSettings", _RiskModelResource, ModelSettingFields, __name__)


def resources(env: str, profile: Profile = PRODUCTION) -> dict[str, dg.ConfigurableResource]:
    return {"risk_model": RiskModelSettings(**profile.resource_settings("risk_model"))}
