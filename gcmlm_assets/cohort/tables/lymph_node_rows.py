"""The contract of a lymph_nodes row (design of issue 24), checked before fused_table uses it (no Dagster)."""

from __future__ import annotations

import math

# lymph_nodes' row (design of issue 24): n_slides is bookkeeping, the rest are the block's features.
LYMPH_NODE_COUNT_COLUMNS = ("n_slides",)
LYMPH_NODE_FEATURES = ("n_nodes", "n_metastatic_nodes", "tumour_area_mm2", "metastatic_node_area_mm2", "t_mln")
T_MLN = "t_mln"


def lymph_node_row_problem(values: dict[str, float], nulls: set[str], counts: dict[str, int]) -> str | None:
    """Why a lymph_nodes row breaks its contract (None: it keeps it). T/MLN is null exactly when no
    node is metastatic: a null with metastatic nodes, or a value without any, is a broken row."""
    expected = (*LYMPH_NODE_COUNT_COLUMNS, *LYMPH_NODE_FEATURES)
    missing = [c for c in expected if c not in values and c not in counts]
    if missing:
        return f"lacks the lymph-node column(s) {', '.join(missing)}"
    extra = [c for c in values if c not in LYMPH_NODE_FEATURES]
    if extra:
        return f"has column(s) outside the lymph-node contract: {', '.join(extra)}"
    if counts["n_slides"] < 1:  # a null reads as 0
        return f"n_slides is {counts['n_slides']}: no lymph-node slide analysed, so the row measures nothing"
    for name in LYMPH_NODE_FEATURES:
        if name == T_MLN:
            continue
        value = values[name]
        if name in nulls or not math.isfinite(value):
            return f"{name} is {'null' if name in nulls else value}: counts and areas must be finite"
        if value < 0:
            return f"{name} is {value:g}, negative"
    metastatic, nodes = values["n_metastatic_nodes"], values["n_nodes"]
    if metastatic > nodes:
        return f"n_metastatic_nodes ({metastatic:g}) exceeds n_nodes ({nodes:g})"
    t_mln = values[T_MLN]
    if T_MLN in nulls:
        if metastatic > 0:
            return (f"t_mln is null although n_metastatic_nodes is {metastatic:g}: T/MLN is defined with "
                    "metastatic nodes")
        return None
    if not 0.0 <= t_mln <= 1.0:  # NaN fails too
        return f"t_mln is {t_mln:g}, outside [0, 1]"
    if metastatic == 0:
        return f"t_mln is {t_mln:g} but n_metastatic_nodes is 0: T/MLN is undefined (null) without a metastatic node"
    return None
