"""Permutation importance of a fitted risk model's feature blocks and features.

Plain Python (no Dagster). Importance is the drop in AUC when information is destroyed by
shuffling it across patients, the model left as it is:
- block level (every block): the rows of the block's matrix are permuted TOGETHER with the
  block's availability, so a patient's whole block (or its absence) moves to another patient, as
  if the block belonged to someone else;
- feature level (blocks with at most `max_features_per_block` columns): one column is permuted
  among the patients that have the block; who has the block does not change.
Patients: the labelled ones the model scores on the unpermuted data; permutations shuffle among
these patients only, so no unlabelled patient's features enter. A block-level shuffle can leave
a patient with no block at all (late fusion then gives no probability): each repeat compares the
original and the permuted AUC over the patients scored in both, and says how many that was.
The numbers describe the model on the data it is given (for the final model, its own training
patients): they say what the model relies on, not what generalises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from gcmlm_assets.cohort.tables.cohort_data import PATHOLOGY_ABMIL, BlockData, CohortData
from gcmlm_assets.cohort.model.metrics import auc

Predictor = Callable[[CohortData], np.ndarray]


def model_predictor(model) -> Predictor:
    """The fused probability of a fitted FusedRiskModel as a function of CohortData (the
    data must hold the model's blocks with the model's columns: `model.cohort_data(table)`)."""
    from gcmlm_assets.cohort.model.combiners import sigmoid

    # A permutation changes one block's inputs: the other blocks' logits are taken from the last
    # call whose inputs were the very same objects (an ABMIL pass over every bag is not repeated
    # for each radiology feature). The cache holds those objects, so their ids cannot be reused.
    last: dict[str, tuple[tuple, np.ndarray]] = {}

    def predict(data: CohortData) -> np.ndarray:
        columns = []
        for block in model.blocks:
            inputs = (data.blocks[block].X, data.blocks[block].available,
                      data.bags if block == PATHOLOGY_ABMIL else None)
            cached = last.get(block)
            if cached is None or any(a is not b for a, b in zip(cached[0], inputs)):
                cached = last[block] = (inputs, model.block_column(block, data))
            columns.append(cached[1])
        return sigmoid(model.combiner.fused_logit(np.column_stack(columns)))

    return predict


def _subset(data: CohortData, rows: np.ndarray) -> CohortData:
    blocks = {name: BlockData(b.columns, b.X[rows].copy(), b.available[rows].copy())
              for name, b in data.blocks.items()}
    bags = [data.bags[i] for i in np.flatnonzero(rows)] if data.bags else []
    return CohortData(data.patient_ids[rows], data.labels[rows], blocks, bags)


def _with_block(data: CohortData, block: str, new: BlockData) -> CohortData:
    return replace(data, blocks={**data.blocks, block: new})


def _drop(labels: np.ndarray, baseline: np.ndarray, permuted: np.ndarray) -> tuple[float, int]:
    """(AUC before - AUC after, patients compared) over the patients scored both times."""
    both = np.isfinite(permuted)
    if not both.any():
        return float("nan"), 0
    return auc(labels[both], baseline[both]) - auc(labels[both], permuted[both]), int(both.sum())


def _summary(block: str, feature: str | None, drops: list[float], compared: list[int],
             baseline_auc: float) -> dict:
    values = np.asarray(drops, dtype=float)
    finite = values[np.isfinite(values)]
    return {
        "block": block,
        "feature": feature,
        "level": "block" if feature is None else "feature",
        "importance_mean": float(finite.mean()) if len(finite) else float("nan"),
        "importance_sd": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
        "n_repeats": int(len(finite)),
        "baseline_auc": baseline_auc,
        "patients_compared_min": int(min(compared)) if compared else 0,
    }


def permutation_importance(predict: Predictor, data: CohortData, blocks, n_repeats: int = 10, seed: int = 0,
                           max_features_per_block: int = 200) -> list[dict]:
    """Rows {block, feature (None at block level), level, importance_mean, importance_sd,
    n_repeats, baseline_auc, patients_compared_min}: the blocks first (in the order given), then
    the features of each block in their column order. Same seed, same numbers."""
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    baseline_all = np.asarray(predict(data), dtype=float)
    rows = data.labelled & np.isfinite(baseline_all)
    cohort = _subset(data, rows)
    labels = cohort.labels
    baseline = baseline_all[rows]
    baseline_auc = auc(labels, baseline)
    if not np.isfinite(baseline_auc):
        raise ValueError("permutation importance needs scored, labelled patients of both classes "
                         f"({int((labels == 1).sum())} positive, {int((labels == 0).sum())} negative)")
    rng = np.random.default_rng(seed)
    n = len(labels)
    block_rows, feature_rows = [], []
    for block in blocks:
        original = cohort.blocks[block]
        drops, compared = [], []
        for _ in range(n_repeats):
            order = rng.permutation(n)
            shuffled = _with_block(cohort, block,
                                   BlockData(original.columns, original.X[order], original.available[order]))
            if block == PATHOLOGY_ABMIL:  # its input is the bag, not the (empty) matrix
                shuffled = replace(shuffled, bags=[cohort.bags[i] for i in order])
            drop, count = _drop(labels, baseline, np.asarray(predict(shuffled), float))
            drops.append(drop)
            compared.append(count)
        block_rows.append(_summary(block, None, drops, compared, baseline_auc))

        having = np.flatnonzero(original.available)
        if not original.columns or len(original.columns) > max_features_per_block or len(having) < 2:
            continue
        for j, column in enumerate(original.columns):
            drops, compared = [], []
            for _ in range(n_repeats):
                X = original.X.copy()
                X[having, j] = original.X[having[rng.permutation(len(having))], j]
                shuffled = BlockData(original.columns, X, original.available)
                drop, count = _drop(labels, baseline,
                                    np.asarray(predict(_with_block(cohort, block, shuffled)), float))
                drops.append(drop)
                compared.append(count)
            feature_rows.append(_summary(block, column, drops, compared, baseline_auc))
    return block_rows + feature_rows


def _cell(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:+.3f}"


def importance_markdown(rows: list[dict], top: int = 15) -> str:
    """Every block, then the `top` features with the largest mean AUC drop."""
    if not rows:
        return "no permutation importance recorded"
    lines = ["| level | block | feature | AUC drop (mean ± SD) | repeats |", "|---|---|---|---|---|"]
    blocks = [r for r in rows if r.get("level") == "block"]
    features = sorted((r for r in rows if r.get("level") == "feature"),
                      key=lambda r: -r["importance_mean"] if r.get("importance_mean") is not None
                      and np.isfinite(r["importance_mean"]) else np.inf)
    for r in blocks + features[:top]:
        sd = r.get("importance_sd")
        spread = "" if sd is None or not np.isfinite(sd) else f" ± {sd:.3f}"
        lines.append(f"| {r.get('level')} | {r.get('block')} | {r.get('feature') or '(whole block)'} | "
                     f"{_cell(r.get('importance_mean'))}{spread} | {r.get('n_repeats', '–')} |")
    if len(features) > top:
        lines.append(f"\n{len(features) - top} more features not shown.")
    baseline = next((r.get("baseline_auc") for r in rows if r.get("baseline_auc") is not None), None)
    if baseline is not None:
        lines.append(f"\nAUC without permutation: {baseline:.3f}.")
    return "\n".join(lines)
