"""The `lymph_nodes` asset's tunables, declared once (plain Python, no Dagster): the resource that
the wiring configures inherits these fields (see setting_fields.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gcmlm_assets.setting_fields import setting


@dataclass(frozen=True)
class LymphNodeFields:
    tumour_threshold: Annotated[float, setting(
        "a patch is tumour when the classifier's probability is at least this", ge=0.0, le=1.0)] = 0.5
    min_tumour_patches: Annotated[int, setting(
        "tumour regions (8-connected tumour patches) of fewer patches are dropped as noise", ge=1)] = 2
    min_node_area_mm2: Annotated[float, setting(
        "tissue components smaller than this (mm²) are debris, not lymph nodes", ge=0.0)] = 0.05
    max_node_area_mm2: Annotated[float, setting(
        "the plausibility check flags a node larger than this (mm²): merged nodes or not a node slide",
        gt=0.0)] = 300.0
    max_nodes_per_slide: Annotated[int, setting(
        "the plausibility check flags a slide with more nodes than this", ge=1)] = 60


LYMPH_NODE_DEFAULTS = LymphNodeFields()
