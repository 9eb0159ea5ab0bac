"""Asset checks of the radiology group."""

import dagster as dg

CHECKS: list[dg.AssetChecksDefinition] = []
