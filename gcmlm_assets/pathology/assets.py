"""Dagster assets of the pathology group (thin wiring over the plain modules beside it)."""

import dagster as dg

ASSETS: list[dg.AssetsDefinition] = []
