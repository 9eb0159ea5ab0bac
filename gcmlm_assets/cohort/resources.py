"""Resources of the cohort group, keyed by resource name."""

import dagster as dg


def resources(env: str) -> dict[str, dg.ConfigurableResource]:
    return {}
