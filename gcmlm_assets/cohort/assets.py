"""Dagster assets of the cohort group (thin wiring over the plain modules beside it)."""

import dagster as dg

ASSETS: list[dg.AssetsDefinition] = []
