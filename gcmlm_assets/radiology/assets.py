"""Dagster assets of the radiology group (thin wiring over the plain modules beside it)."""

import dagster as dg

ASSETS: list[dg.AssetsDefinition] = []
