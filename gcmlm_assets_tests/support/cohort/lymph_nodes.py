"""Hand-made lymph_nodes rows (the lymph_nodes asset's per-patient file, design of issue 24) for the
cohort's tests: written where fused_table reads them, with T/MLN carrying a planted label signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gcmlm_assets.catalogue import LYMPH_NODE_TABLE
from gcmlm_assets.storage import ArtifactStore

INTEGERS = ("n_slides", "n_nodes", "n_metastatic_nodes")


def write_lymph_node_row(artifacts: Path, patient_id: str, *, n_slides: int = 1, n_nodes: int = 4,
                         n_metastatic_nodes: int = 0, tumour_area_mm2: float = 0.0,
                         metastatic_node_area_mm2: float = 0.0, t_mln: float | None = None,
                         **overrides) -> Path:
    """One patient's lymph_nodes.parquet; `overrides` replace or add columns (a broken file)."""
    row = {"patient_id": patient_id, "n_slides": n_slides, "n_nodes": n_nodes,
           "n_metastatic_nodes": n_metastatic_nodes, "tumour_area_mm2": tumour_area_mm2,
           "metastatic_node_area_mm2": metastatic_node_area_mm2, "t_mln": t_mln, **overrides}
    columns = {}
    for name, value in row.items():
        kind = pa.string() if name == "patient_id" else pa.int64() if name in INTEGERS else pa.float64()
        columns[name] = pa.array([value], kind)
    path = LYMPH_NODE_TABLE.path(ArtifactStore(artifacts), patient_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def lymph_node_rows(labels: np.ndarray, seed: int = 0, signal: float = 1.0) -> list[dict]:
    """Per patient, a plausible row whose T/MLN (and metastatic node count) follows the label:
    positives have metastatic nodes with a high T/MLN, negatives mostly none (T/MLN null)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in labels:
        nodes = int(rng.integers(3, 12))
        metastatic = int(min(nodes, rng.integers(1, 4))) if (label == 1 or rng.random() < 0.25) else 0
        if metastatic:
            node_area = float(metastatic * rng.uniform(4.0, 9.0))
            ratio = float(np.clip(rng.normal(0.35 + 0.4 * signal * label, 0.12), 0.02, 0.98))
            rows.append({"n_nodes": nodes, "n_metastatic_nodes": metastatic, "metastatic_node_area_mm2": node_area,
                         "tumour_area_mm2": ratio * node_area, "t_mln": ratio})
        else:
            rows.append({"n_nodes": nodes, "n_metastatic_nodes": 0, "metastatic_node_area_mm2": 0.0,
                         "tumour_area_mm2": 0.0, "t_mln": None})
    return rows
