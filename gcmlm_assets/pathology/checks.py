"""Asset checks of the pathology group."""

import dagster as dg

CHECKS: list[dg.AssetChecksDefinition] = []
