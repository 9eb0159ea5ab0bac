"""The patient's lymph-node row (`lymph_nodes.parquet`): made from the slides, written, checked
(plain Python, no Dagster).

One row: patient_id, n_slides, n_nodes, n_metastatic_nodes, tumour_area_mm2,
metastatic_node_area_mm2 and t_mln = tumour_area_mm2 / metastatic_node_area_mm2, which is null
(not 0) when the patient has no metastatic node: a ratio over no metastatic node is undefined.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from gcmlm_assets.lazy import lazy
from gcmlm_assets.storage import atomic_path

pa = lazy("pyarrow")
pq = lazy("pyarrow.parquet")

# (column, pyarrow type name): the row's contract with fused_table.
ROW_COLUMNS = (
    ("patient_id", "string"),
    ("n_slides", "int64"),
    ("n_nodes", "int64"),
    ("n_metastatic_nodes", "int64"),
    ("tumour_area_mm2", "double"),
    ("metastatic_node_area_mm2", "double"),
    ("t_mln", "double"),
)
COUNT_COLUMNS = ("n_slides", "n_nodes", "n_metastatic_nodes")
AREA_COLUMNS = ("tumour_area_mm2", "metastatic_node_area_mm2")
# Areas are sums of float cell areas: a ratio recomputed from them agrees to far better than this.
RATIO_TOLERANCE = 1e-9


def row_schema():
    types = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64()}
    return pa.schema([pa.field(name, types[kind], nullable=True) for name, kind in ROW_COLUMNS])


def t_mln(tumour_area_mm2: float, metastatic_node_area_mm2: float, n_metastatic_nodes: int) -> float | None:
    """Tumour area over metastatic node area; None without a metastatic node."""
    if n_metastatic_nodes == 0 or metastatic_node_area_mm2 <= 0:
        return None
    return min(1.0, float(tumour_area_mm2) / float(metastatic_node_area_mm2))


def patient_row(patient_id: str, slides) -> dict:
    """The row of a patient's analysed slides (regions.SlideNodes, or anything with their counts)."""
    n_metastatic = int(sum(slide.n_metastatic_nodes for slide in slides))
    tumour = float(sum(slide.tumour_area_mm2 for slide in slides))
    metastatic_area = float(sum(slide.metastatic_node_area_mm2 for slide in slides))
    return {
        "patient_id": str(patient_id),
        "n_slides": len(slides),
        "n_nodes": int(sum(slide.n_nodes for slide in slides)),
        "n_metastatic_nodes": n_metastatic,
        "tumour_area_mm2": tumour,
        "metastatic_node_area_mm2": metastatic_area,
        "t_mln": t_mln(tumour, metastatic_area, n_metastatic),
    }


def row_table(row: dict):
    return pa.Table.from_pylist([{name: row[name] for name, _ in ROW_COLUMNS}], schema=row_schema())


def write_row_table(path: str | os.PathLike, row: dict) -> Path:
    """The one-row table, checked, under a temporary name and renamed into place."""
    problems = row_value_problems(row)
    if problems:
        raise ValueError(f"{path}: the lymph-node row would be invalid: {'; '.join(problems)}")
    with atomic_path(path) as tmp:
        pq.write_table(row_table(row), tmp)
    return Path(path)


def read_row(path: str | os.PathLike) -> dict:
    table = pq.read_table(path)
    if table.num_rows != 1:
        raise ValueError(f"{path}: {table.num_rows} rows, expected one")
    return table.to_pylist()[0]


def row_value_problems(row: dict) -> list[str]:
    """What is wrong with the row's values ([] when nothing)."""
    problems = []
    if not isinstance(row.get("patient_id"), str) or not row["patient_id"]:
        problems.append("patient_id is empty")
    counts = {name: row.get(name) for name in COUNT_COLUMNS}
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{name} is {value!r}, not a count")
    areas = {name: row.get(name) for name in AREA_COLUMNS}
    for name, value in areas.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            problems.append(f"{name} is {value!r}, not an area >= 0")
    if problems:
        return problems
    n_metastatic, tumour, metastatic_area = counts["n_metastatic_nodes"], areas["tumour_area_mm2"], \
        areas["metastatic_node_area_mm2"]
    if n_metastatic > counts["n_nodes"]:
        problems.append(f"n_metastatic_nodes {n_metastatic} exceeds n_nodes {counts['n_nodes']}")
    if counts["n_nodes"] and not counts["n_slides"]:
        problems.append(f"{counts['n_nodes']} nodes on no slide")
    if (n_metastatic > 0) != (metastatic_area > 0) or (n_metastatic > 0) != (tumour > 0):
        problems.append(f"{n_metastatic} metastatic node(s) with metastatic node area {metastatic_area} mm² and "
                        f"tumour area {tumour} mm²: both are > 0 exactly when a node is metastatic")
    if tumour > metastatic_area * (1 + RATIO_TOLERANCE):
        problems.append(f"tumour area {tumour} mm² exceeds the metastatic nodes' area {metastatic_area} mm²")
    ratio = row.get("t_mln")
    if n_metastatic == 0:
        if ratio is not None:
            problems.append(f"t_mln is {ratio!r} without a metastatic node: it must be null (undefined), not a "
                            "number")
    elif ratio is None:
        problems.append(f"t_mln is null with {n_metastatic} metastatic node(s)")
    elif not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
        problems.append(f"t_mln is {ratio!r}, outside [0, 1]")
    elif metastatic_area > 0 and abs(ratio - min(1.0, tumour / metastatic_area)) > RATIO_TOLERANCE:
        problems.append(f"t_mln {ratio} is not tumour_area_mm2 / metastatic_node_area_mm2 "
                        f"({tumour / metastatic_area})")
    return problems


def lymph_node_row_problems(path: str | os.PathLike) -> list[str]:
    """What is wrong with a written `lymph_nodes.parquet` ([] when nothing): its schema (the columns,
    their order and types), exactly one row, and the row's values (row_value_problems)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:
        return [f"{path}: cannot be read as parquet: {type(error).__name__}: {error}"]
    expected = row_schema()
    found = [(field.name, str(field.type)) for field in table.schema]
    wanted = [(field.name, str(field.type)) for field in expected]
    if found != wanted:
        return [f"{path}: columns {found}, expected {wanted}"]
    if table.num_rows != 1:
        return [f"{path}: {table.num_rows} rows, expected one"]
    return [f"{path}: {problem}" for problem in row_value_problems(table.to_pylist()[0])]
