"""Fitting the whole risk model: every block on every labelled patient that has it, the fusion's
combiner on out-of-fold logits, and the summary of what was fitted (for the model card).

Plain Python (no Dagster). The cross-validation (crossval) uses `out_of_fold_logits` inside each
outer training part, so the stacked combiner never sees a test patient.

What the fit reads (`training_table`) is the labelled patients' part of the fused table and
nothing else, and `training_data_sha256` hashes exactly that: patients without a label are
scored by the model, never trained on, so adding or changing them leaves the model as it is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.pipeline import Pipeline

from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.tables.cohort_data import (
    OPTIONAL_BLOCKS, PATHOLOGY_ABMIL, CohortData, block_columns, class_counts)
from gcmlm_assets.cohort.model.combiners import make_combiner
from gcmlm_assets.cohort.tables.fusion import AVAILABILITY, DELTA, LYMPH_NODE, PATHOLOGY, RADIOLOGY
from gcmlm_assets.cohort.model.model_settings import InsufficientLabels, ModelSettings
from gcmlm_assets.cohort.model.modelling import FusedRiskModel, block_logits, fit_block


def training_table(fused: pa.Table, blocks: tuple[str, ...]) -> pa.Table:
    """The part of the fused table the fit reads: the labelled patients' rows (mlm 0 or 1), sorted
    by patient id, with the id, the label, and the availability flag and feature columns of each
    table block in `blocks`. A feature column that no labelled patient has a value in is dropped:
    the imputer would drop it anyway, and this way a column that only unlabelled patients bring
    cannot change the model. An optional block (the lymph nodes, the delta) that no labelled patient
    has is left out entirely, flag included: without lymph-node slides or second CT scans the table,
    its hash and the model are the ones from before the block existed."""
    rows = fused.filter(pc.is_valid(fused.column(LABEL_COLUMN)))
    rows = rows.take(pc.sort_indices(rows, sort_keys=[(ID_COLUMN, "ascending")]))
    names = [ID_COLUMN, LABEL_COLUMN]
    for block in (b for b in blocks if b in AVAILABILITY):
        flag = AVAILABILITY[block]
        if block in OPTIONAL_BLOCKS and (flag not in rows.column_names or not any(rows.column(flag).to_pylist())):
            continue
        if flag in rows.column_names:
            names.append(flag)
        names += [c for c in block_columns(rows.column_names, block)
                  if c in rows.column_names and _has_a_value(rows.column(c))]
    return rows.select(names)


def _has_a_value(column: pa.ChunkedArray) -> bool:
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return bool(np.isfinite(values).any())


def training_data_sha256(table: pa.Table) -> str:
    """One hash over a training table's column names, types and values (nulls and NaN told apart;
    every NaN hashed alike): the same labelled data gives the same hash, whatever else the fused
    table holds and however its file was written."""
    digest = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns):
        digest.update(json.dumps([name, str(column.type), len(column)]).encode())
        if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
            values = column.to_numpy(zero_copy_only=False).astype("<f8")
            values[np.isnan(values)] = np.nan
            digest.update(values.tobytes())
            digest.update(pc.is_valid(column).to_numpy(zero_copy_only=False).tobytes())
        else:
            digest.update(json.dumps(column.to_pylist()).encode())
    return digest.hexdigest()


# The libraries that fit and store the model: a new one may fit differently or not load old skops files.
FITTING_LIBRARIES = ("scikit-learn", "numpy", "scipy", "skops", "torch")


def fitting_library_versions() -> str:
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return ",".join(f"{name}={version(name)}" for name in FITTING_LIBRARIES)


def out_of_fold_logits(data: CohortData, rows: np.ndarray, blocks: tuple[str, ...], settings: ModelSettings,
                       seed: int) -> np.ndarray:
    """(len(rows), blocks) logits of the patients `rows` (indices, all labelled), each from a block model
    fitted on the other inner folds of `rows` only: the stacked combiner's training input. NaN where a
    patient lacks the block or the inner training part could not fit it."""
    from sklearn.model_selection import StratifiedKFold

    labels = data.labels[rows].astype(int)
    logits = np.full((len(rows), len(blocks)), np.nan)
    n_splits = min(settings.inner_splits, int(np.bincount(labels, minlength=2).min()))
    if n_splits < 2:
        return logits
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for inner_train, inner_test in splitter.split(np.zeros(len(rows)), labels):
        for k, block in enumerate(blocks):
            available = data.blocks[block].available
            train = inner_train[available[rows[inner_train]]]
            test = inner_test[available[rows[inner_test]]]
            if len(test) == 0:
                continue
            model = fit_block(block, data.inputs(block, rows[train]), labels[train].astype(float), settings)
            if model is not None:
                logits[test, k] = block_logits(model, data.inputs(block, rows[test]))
    return logits


def fit_risk_model(data: CohortData, settings: ModelSettings, risk_threshold: float) -> tuple[FusedRiskModel, dict]:
    """Each block's model fitted on every labelled patient that has the block; the combiner on the
    out-of-fold logits of an inner cross-validation of the same patients."""
    models: dict = {}
    columns: dict[str, list[str]] = {}
    summary: dict[str, dict] = {}
    wanted = settings.fusion_blocks()
    side = (PATHOLOGY_ABMIL,) if PATHOLOGY_ABMIL in settings.blocks() and PATHOLOGY_ABMIL not in wanted else ()
    side_models: dict = {}
    for block in (*wanted, *side):
        if block not in data.blocks:
            continue
        block_data = data.blocks[block]
        rows = data.labelled & block_data.available
        model = fit_block(block, data.inputs(block, rows), data.labels[rows], settings) if rows.any() else None
        if model is None:
            if block in wanted:
                summary[block] = {"fitted": False, "reason": (
                    f"no labelled patient has {block} inputs" if block in OPTIONAL_BLOCKS and not rows.any() else
                    f"fewer than 2 labelled patients of a class have {block} inputs "
                    f"({class_counts(data.labels[rows])})")}
            continue
        info = {"fitted": True, "train_patients": int(rows.sum()), **class_counts(data.labels[rows]),
                **describe_block(block, model, block_data.columns)}
        if block in wanted:
            models[block] = model
            columns[block] = block_data.columns
            summary[block] = info
        else:
            side_models[block] = model
            summary[block] = {**info, "role": "explanation only (attention maps); not in the score"}
    if not models:
        raise InsufficientLabels("no modality has at least 2 labelled patients of each class: "
                                 + "; ".join(s["reason"] for s in summary.values() if "reason" in s))
    blocks = tuple(models)
    combiner = make_combiner(settings.fusion, blocks)
    labelled = np.flatnonzero(data.labelled & data.any_block())
    if settings.fusion == "stacked":
        combiner.fit(out_of_fold_logits(data, labelled, blocks, settings, settings.seed), data.labels[labelled])
    return FusedRiskModel(models, columns, risk_threshold, asdict(settings), combiner, side_models), summary


def describe_block(block: str, model, columns: list[str]) -> dict:
    if not isinstance(model, Pipeline):
        return model.describe()
    return describe_pipeline(block, model, columns)


def describe_pipeline(block: str, pipeline: Pipeline, columns: list[str]) -> dict:
    info: dict = {"n_input_features": len(columns), "steps": [name for name, _ in pipeline.steps]}
    # the imputer drops columns that were empty in training; follow the names through each selector
    names = np.asarray(pipeline.named_steps["impute"].get_feature_names_out(np.asarray(columns, dtype=object)),
                       dtype=object)
    if block in (RADIOLOGY, DELTA):
        for step in ("drop_constant", "decorrelate", "select_l1"):
            names = names[pipeline.named_steps[step].get_support()]
        info["selected_features"] = [str(n) for n in names]
    elif block == LYMPH_NODE:
        # the T/MLN indicator column is there only when some training patient had no metastatic node
        info["features"] = [str(n) for n in names]
    elif block == PATHOLOGY:
        pca = pipeline.named_steps["pca"]
        info["pca_components"] = int(pca.n_components_)
        info["pca_explained_variance"] = round(float(pca.explained_variance_ratio_.sum()), 4)
    return info
