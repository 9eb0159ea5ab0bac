"""The fused table as matrices: one feature block per modality, the labels and who has what.

Plain Python (no Dagster). A patient has a block when the fused table flags the modality and at
least one of its features is finite; the models use only the patients that have their block.
The attention-MIL block (`pathology_abmil`) reads no table column: its input is the patient's bag
of patch features (from uni_features), and a patient has the block when a bag was given.
The lymph-node block's columns are fixed (fusion.LYMPH_NODE_FEATURES, in that order, whether or not
the table has them: an absent column reads as NaN), so its pipeline can name the T/MLN column by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.tables.fusion import AVAILABILITY, DELTA, LYMPH_NODE, LYMPH_NODE_FEATURES, PATHOLOGY, PREFIX
from gcmlm_assets.lazy import lazy

# imported on first use: the definitions import this module, the steps compute (gcmlm_assets/lazy.py)
np = lazy("numpy")
pa = lazy("pyarrow")

PATHOLOGY_ABMIL = "pathology_abmil"
# The lymph-node block's model features (fused_table's ln_n_slides is bookkeeping, not one of them).
LYMPH_NODE_COLUMNS = tuple(PREFIX[LYMPH_NODE] + name for name in LYMPH_NODE_FEATURES)
# Blocks that only some patients can ever have (lymph-node slides are not scanned for every resection;
# the delta block needs two CT scans): a cohort in which no patient has one trains, cross-validates and
# fuses exactly as without the block.
OPTIONAL_BLOCKS = (LYMPH_NODE, DELTA)


def block_columns(column_names: list[str], block: str) -> list[str]:
    if block == LYMPH_NODE:
        return list(LYMPH_NODE_COLUMNS)
    if block == PATHOLOGY:
        return [c for c in column_names if c.startswith(PREFIX[PATHOLOGY] + "feat")]
    return [c for c in column_names if c.startswith(PREFIX[block])]


@dataclass
class BlockData:
    columns: list[str]
    X: np.ndarray  # (patients, features) float64; NaN where missing
    available: np.ndarray  # (patients,) bool


@dataclass
class CohortData:
    patient_ids: np.ndarray
    labels: np.ndarray  # float: 0, 1, or NaN for unknown
    blocks: dict[str, BlockData]
    bags: list[np.ndarray | None] = field(default_factory=list)  # per patient: patch features (N, D) or None

    @classmethod
    def from_table(cls, table: pa.Table, blocks: tuple[str, ...], columns: dict[str, list[str]] | None = None,
                   bags: Mapping[str, np.ndarray] | None = None) -> CohortData:
        """Matrices of the fused table; `columns` fixes each block's columns (a fitted model's);
        `bags` maps patient ids to their patch features (the attention-MIL block's input)."""
        patient_ids = np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=object)
        labels = np.asarray([np.nan if v is None else float(v)
                             for v in table.column(LABEL_COLUMN).to_pylist()])
        patient_bags = [None if bags is None else bags.get(p) for p in patient_ids]
        data: dict[str, BlockData] = {}
        for block in blocks:
            if block == PATHOLOGY_ABMIL:
                available = np.array([b is not None and len(b) > 0 for b in patient_bags], dtype=bool)
                data[block] = BlockData([], np.zeros((len(patient_ids), 0)), available)
                continue
            names = columns[block] if columns is not None else block_columns(table.column_names, block)
            X = np.full((table.num_rows, len(names)), np.nan)
            for j, name in enumerate(names):
                if name in table.column_names:
                    X[:, j] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            flag = AVAILABILITY[block]
            available = (np.asarray(table.column(flag).to_pylist(), dtype=bool)
                         if flag in table.column_names else np.zeros(table.num_rows, bool))
            if names:
                available &= np.isfinite(X).any(axis=1)
            else:
                available[:] = False
            data[block] = BlockData(list(names), X, available)
        return cls(patient_ids, labels, data, patient_bags)

    def inputs(self, block: str, rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """The block's model input for `rows` (a bool mask or indices): a matrix, or a list of bags."""
        if block == PATHOLOGY_ABMIL:
            indices = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
            return [self.bags[i] for i in indices]
        return self.blocks[block].X[rows]

    @property
    def labelled(self) -> np.ndarray:
        return np.isfinite(self.labels)

    def any_block(self) -> np.ndarray:
        mask = np.zeros(len(self.patient_ids), bool)
        for block in self.blocks.values():
            mask |= block.available
        return mask


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {"positive": int(np.sum(labels == 1)), "negative": int(np.sum(labels == 0))}

