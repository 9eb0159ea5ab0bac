"""Asset checks of the cohort group."""

import dagster as dg

CHECKS: list[dg.AssetChecksDefinition] = []
