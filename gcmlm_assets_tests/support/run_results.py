"""Reading a Dagster in-process run's outcome."""

from __future__ import annotations

import dagster as dg


def step_failure_text(result: dg.ExecuteInProcessResult, asset_name: str) -> str:
    """The error text of the failed step of `asset_name` (description and error message)."""
    for event in result.get_step_failure_events():
        if event.step_key == asset_name:
            data = event.step_failure_data
            parts = [data.error.message if data.error else ""]
            if data.user_failure_data and data.user_failure_data.description:
                parts.append(data.user_failure_data.description)
            return "\n".join(parts)
    raise AssertionError(f"no step failure for {asset_name}; failed steps: {result.get_failed_step_keys()}")


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [materialization] = result.asset_materializations_for_node(asset)
    return {key: value.value for key, value in materialization.metadata.items()}
