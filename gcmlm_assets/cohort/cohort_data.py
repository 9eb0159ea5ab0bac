"""The fused table as matrices: one feature block per modality, the labels and who has what.

Plain Python (no Dagster). A patient has a block when the fused table flags the modality and at
least one of its features is finite; the models use only the patients that have their block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gcmlm_assets.cohort.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.fusion import AVAILABILITY, PATHOLOGY, PREFIX


def block_columns(column_names: list[str], block: str) -> list[str]:
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

    @classmethod
    def from_table(cls, table: pa.Table, blocks: tuple[str, ...],
                   columns: dict[str, list[str]] | None = None) -> CohortData:
        """Matrices of the fused table; `columns` fixes each block's columns (a fitted model's)."""
        patient_ids = np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=object)
        labels = np.asarray([np.nan if v is None else float(v)
                             for v in table.column(LABEL_COLUMN).to_pylist()])
        data: dict[str, BlockData] = {}
        for block in blocks:
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
        return cls(patient_ids, labels, data)

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

