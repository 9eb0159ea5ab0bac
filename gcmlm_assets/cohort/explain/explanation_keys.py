"""Which patients' explanations are out of date (plain Python, no Dagster).

A patient's explanation (risk_explanations) is made from the explanation code, the risk model file,
the patient's own fused_table row and, when that row has pathology, the patient's patch features
(uni_features' manifest lists each feature file's hash). Its key hashes exactly these, so a new or
changed patient changes no other patient's key, and a new model changes everyone's.

risk_scores writes each scored patient's key beside the score; risk_explanations records the key
it explained as its materialization's data version; `patients_to_explain` compares the two.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

from gcmlm_assets.catalogue import RISK_EXPLANATIONS
from gcmlm_assets.lazy import lazy
from gcmlm_assets.storage import ArtifactStore, sha256_text

np = lazy("numpy")
pa = lazy("pyarrow")
pc = lazy("pyarrow.compute")
pq = lazy("pyarrow.parquet")

# risk_explanations' code version (catalogue.py): part of every explanation key, so bumping it
# explains every patient again.
CODE_VERSION = RISK_EXPLANATIONS.code_version
ID_COLUMN = "patient_id"
PATHOLOGY_FLAG = "has_pathology"


def row_digests(table) -> list[str]:
    """One digest per row, over the columns' names, types and the row's values (nulls told apart
    from zeros). A row hashes the same whatever other rows are in the table, so a row read alone
    gives the digest it has in the whole table."""
    n = table.num_rows
    if n == 0:
        return []
    names = sorted(table.column_names)
    header = ";".join(f"{name}:{table.schema.field(name).type}" for name in names).encode()
    fixed, other = [], []
    for name in names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            # fill the nulls in the column's own type (to_numpy would turn an int column with a
            # null into floats, so a row's bytes would depend on its neighbours)
            filled = pc.fill_null(column, False if pa.types.is_boolean(kind) else 0).combine_chunks()
            values = np.ascontiguousarray(filled.to_numpy(zero_copy_only=False))
            fixed.append(values.view(np.uint8).reshape(n, -1))
            fixed.append(np.asarray(column.is_valid().to_numpy(zero_copy_only=False), np.uint8).reshape(n, 1))
        else:
            other.append(column.to_pylist())
    matrix = np.hstack(fixed) if fixed else np.zeros((n, 0), np.uint8)
    digests = []
    for i in range(n):
        digest = hashlib.sha256(header)
        digest.update(matrix[i].tobytes())
        digest.update(json.dumps([values[i] for values in other], default=str).encode())
        digests.append(digest.hexdigest())
    return digests


def explanation_key(model_sha256: str, row_digest: str, feature_files: Mapping[str, str] | None) -> str:
    """The key of one patient's explanation. `feature_files`: the patient's uni_features files and
    their hashes when the row has pathology, else None (the explanation reads no patches then)."""
    return sha256_text(CODE_VERSION, model_sha256, row_digest,
                       json.dumps(None if feature_files is None else dict(feature_files), sort_keys=True))


def explanation_keys(table, model_sha256: str, store: ArtifactStore, features_asset: str) -> dict[str, str]:
    """{patient: key} for every row of `table` (the fused table, or some of its rows)."""
    ids = table.column(ID_COLUMN).to_pylist()
    with_pathology = table.column(PATHOLOGY_FLAG).to_pylist()
    return {patient_id: explanation_key(model_sha256, digest,
                                        patient_feature_files(store, features_asset, patient_id) if flag else None)
            for patient_id, digest, flag in zip(ids, row_digests(table), with_pathology)}


def patient_feature_files(store: ArtifactStore, features_asset: str, patient_id: str) -> dict[str, str]:
    manifest = store.read_manifest(features_asset, patient_id) or {}
    return dict(manifest.get("files") or {})


def read_patient_rows(path, patient_ids: Iterable[str]):
    """The fused table's rows of `patient_ids`, in one read of the file however many they are."""
    wanted = sorted(set(patient_ids))
    return pq.read_table(path, filters=[(ID_COLUMN, "in", wanted)]) if wanted else pq.read_table(path).slice(0, 0)


def patients_to_explain(partitions: Sequence[str], scored: Mapping[str, str | None],
                        recorded: Mapping[str, str | None]) -> list[str]:
    """The scored patients, in the order of `partitions`, whose recorded explanation key (None:
    never explained) differs from the key their score came with."""
    return [p for p in partitions if p in scored and recorded.get(p) != scored[p]]
