"""The fused cohort table: one row per patient from the per-patient feature files and the clinical table.

Plain Python + pyarrow (no Dagster). Each patient's feature row of each modality (the files
`catalogue.PATIENT_FEATURES` names) is read on its own (one small row at a time), so memory grows
with the cohort table, never with whatever else a partitioned asset may hold.

Columns, in this order:
  patient_id, has_radiology, has_pathology, has_clinical, mlm (int8, null = unknown),
  clin_<covariate>..., rad_<PyRadiomics feature>..., path_n_patches, path_n_slides, path_feat_<i>...,
  has_lymph_node, ln_n_slides, ln_n_nodes, ln_n_metastatic_nodes, ln_tumour_area_mm2,
  ln_metastatic_node_area_mm2, ln_t_mln
The lymph-node block comes last, so a cohort without lymph-node slides has every earlier column as
before; its ln_* columns exist only when some patient's lymph_nodes row was used (like rad_* and path_*).
`ln_t_mln` is null where T/MLN is undefined (no metastatic node): a value, not a missing block.

What counts as what (the alignment check reports these):
- a feature file that cannot be used (unreadable, not one row, `patient_id` not its folder's name,
  a non-numeric feature, no finite value, columns other than the cohort's; for a lymph_nodes row,
  also a column of the contract missing, no slide analysed (`n_slides` 0 or null: the row measures
  nothing, so it is not a present block), a negative count or area, more metastatic nodes than nodes,
  T/MLN outside [0, 1], T/MLN null with metastatic nodes or set without any) is an ERROR for that
  patient's modality: the modality is marked absent and the file is named with the reason;
- a patient with features but no clinical row is a WARNING: scored, but not trained on;
- a clinical row without any features is a WARNING: kept in the table, cannot be scored;
- a patient folder that is not a known patient partition (when the caller passes the known
  ones) is a stale artifact: left out and reported;
- a result the caller marks unsound (`unsound`: its latest materialization failed, or failed a
  blocking check; see `soundness.py`) is left out unread, with the reason: that modality counts as
  absent for the patient.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gcmlm_assets import catalogue
from gcmlm_assets.catalogue import AssetFile
from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.lazy import lazy
from gcmlm_assets.patients import patient_id_problem
from gcmlm_assets.storage import atomic_path, sha256_file, sha256_text

# imported on first use: the definitions import this module, the steps compute (gcmlm_assets/lazy.py)
np = lazy("numpy")
pa = lazy("pyarrow")
pq = lazy("pyarrow.parquet")

# The model's blocks: their names are in stored model files, metrics and the fused table's flags,
# so they are the model's own, not the UI's group names.
RADIOLOGY, PATHOLOGY, CLINICAL = "radiology", "pathology", "clinical"
LYMPH_NODE = catalogue.LYMPH_NODE  # "lymph_node": the modality's name is the block's
AVAILABILITY = {RADIOLOGY: "has_radiology", PATHOLOGY: "has_pathology", CLINICAL: "has_clinical",
                LYMPH_NODE: "has_lymph_node"}
PREFIX = {RADIOLOGY: "rad_", PATHOLOGY: "path_", CLINICAL: "clin_", LYMPH_NODE: "ln_"}
# slide_vector's bookkeeping columns: kept in the table, not model features.
SLIDE_COUNT_COLUMNS = ("n_patches", "n_slides")
# lymph_nodes' row (design of issue 24): n_slides is bookkeeping, the rest are the block's features.
LYMPH_NODE_COUNT_COLUMNS = ("n_slides",)
LYMPH_NODE_FEATURES = ("n_nodes", "n_metastatic_nodes", "tumour_area_mm2", "metastatic_node_area_mm2", "t_mln")
T_MLN = "t_mln"
# Per block, the columns kept as written (int64) and not used as features.
COUNT_COLUMNS = {PATHOLOGY: SLIDE_COUNT_COLUMNS, LYMPH_NODE: LYMPH_NODE_COUNT_COLUMNS}
# Integer features kept int64 in the table (null where the block is absent).
INTEGER_FEATURES = {LYMPH_NODE: ("n_nodes", "n_metastatic_nodes")}


@dataclass(frozen=True)
class FeatureSource:
    """A block's per-patient feature row: <artifacts>/<asset>/<patient_id>/<filename>."""

    modality: str
    file: AssetFile

    @property
    def asset(self) -> str:
        return self.file.asset.key

    @property
    def filename(self) -> str:
        return self.file.name


# The block each modality's per-patient row feeds (catalogue.PATIENT_FEATURES names the rows).
BLOCK_OF_MODALITY = {catalogue.RADIOLOGY: RADIOLOGY, catalogue.PATHOLOGY: PATHOLOGY, catalogue.LYMPH_NODE: LYMPH_NODE}
SOURCES = tuple(FeatureSource(BLOCK_OF_MODALITY[modality], file)
                for modality, file in catalogue.PATIENT_FEATURES.items())
# The blocks whose rows fused_table reads, in column order (clinical comes from clinical_table).
FILE_BLOCKS = (RADIOLOGY, PATHOLOGY, LYMPH_NODE)


@dataclass
class FusionReport:
    file_problems: list[dict] = field(default_factory=list)  # {patient_id, modality, file, reason}
    stale_folders: list[dict] = field(default_factory=list)  # {folder, reason}
    excluded_results: list[dict] = field(default_factory=list)  # {patient_id, modality, file, reason}
    features_without_clinical: list[str] = field(default_factory=list)
    clinical_without_features: list[str] = field(default_factory=list)
    input_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    def input_fingerprint(self, clinical_sha256: str | None) -> str:
        """One hash over every input the table was built from (names and contents)."""
        parts = [f"{name}={digest}" for name, digest in sorted(self.input_files.items())]
        # the reasons too: the stored report must say why each result was left out
        left_out = [f"excluded:{e['patient_id']}:{e['modality']}={e['reason']}" for e in self.excluded_results]
        return sha256_text(f"clinical={clinical_sha256}", *parts, *sorted(left_out))

    def excluded_patients(self) -> dict[str, dict[str, str]]:
        """{patient_id: {modality: reason}} of the results left out as unsound."""
        excluded: dict[str, dict[str, str]] = {}
        for entry in self.excluded_results:
            excluded.setdefault(entry["patient_id"], {})[entry["modality"]] = entry["reason"]
        return dict(sorted(excluded.items()))


@dataclass(frozen=True)
class _Row:
    values: dict[str, float]  # contract column name -> value (NaN: a NaN or, for lymph nodes, a null)
    counts: dict[str, int]
    nulls: frozenset[str] = frozenset()  # lymph_nodes' null values (T/MLN without a metastatic node)


def find_feature_files(artifacts_root: Path, source: FeatureSource, known_patients: set[str] | None,
                       report: FusionReport, unsound: Mapping[str, str] | None = None) -> dict[str, Path]:
    """{patient: file} of the source's usable files; `unsound` maps patients to why theirs is not."""
    folder = Path(artifacts_root) / source.asset
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue  # manifests and such beside the patient folders
        problem = patient_id_problem(entry.name)
        if problem:
            report.stale_folders.append({"folder": str(entry), "reason": f"not a patient id: {problem}"})
            continue
        path = entry / source.filename
        if not path.is_file():
            continue  # not materialized (yet) for this patient
        if known_patients is not None and entry.name not in known_patients:
            report.stale_folders.append({"folder": str(entry),
                                         "reason": "not a known patient partition (stale artifact)"})
            continue
        if unsound and entry.name in unsound:
            report.excluded_results.append({"patient_id": entry.name, "modality": source.modality,
                                            "file": str(path), "reason": unsound[entry.name]})
            continue
        found[entry.name] = path
    return found


def _read_one_row(path: Path, patient_id: str, source: FeatureSource) -> tuple[_Row | None, str | None]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, never fatal
        return None, f"unreadable parquet ({type(exc).__name__}: {exc})"
    if table.num_rows != 1:
        return None, f"has {table.num_rows} rows, expected exactly 1"
    if ID_COLUMN not in table.column_names:
        return None, f"lacks the {ID_COLUMN} column"
    stored_id = table.column(ID_COLUMN)[0].as_py()
    if stored_id != patient_id:
        return None, f"{ID_COLUMN} is {stored_id!r} but the file is in the folder of {patient_id!r}"
    values: dict[str, float] = {}
    counts: dict[str, int] = {}
    nulls: set[str] = set()
    for name in table.column_names:
        if name == ID_COLUMN:
            continue
        column_type = table.schema.field(name).type
        if not (pa.types.is_floating(column_type) or pa.types.is_integer(column_type)):
            return None, f"column {name!r} is {column_type}, not numeric"
        value = table.column(name)[0].as_py()
        if name in COUNT_COLUMNS.get(source.modality, ()):
            counts[name] = int(value) if value is not None else 0
        else:
            values[name] = float("nan") if value is None else float(value)
            if value is None:
                nulls.add(name)
    if source.modality == LYMPH_NODE:
        problem = lymph_node_row_problem(values, nulls, counts)
        if problem:
            return None, problem
        return _Row(values, counts, frozenset(nulls)), None
    if not values:
        return None, "has no feature columns"
    if not any(np.isfinite(v) for v in values.values()):
        return None, "no feature value is finite"
    if source.modality == PATHOLOGY and counts.get("n_patches", 1) < 1:
        return None, "n_patches is 0: the slide vector pools no patches"
    return _Row(values, counts), None


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
        if name in nulls or not np.isfinite(value):
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


def _reference_columns(rows: dict[str, _Row]) -> list[str]:
    """The column list most patients share (ties: the first patient's in id order)."""
    counted = Counter(tuple(row.values) for row in rows.values())
    best = max(counted.values())
    for patient_id in sorted(rows):
        columns = tuple(rows[patient_id].values)
        if counted[columns] == best:
            return list(columns)
    return []


def _describe_column_difference(reference: list[str], columns: list[str]) -> str:
    missing = [c for c in reference if c not in set(columns)]
    extra = [c for c in columns if c not in set(reference)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if extra:
        parts.append(f"{len(extra)} extra ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
    if not parts:
        parts.append("same names in another order")
    return "columns differ from the cohort's: " + "; ".join(parts)


def build_fused_table(artifacts_root: str | Path, clinical: pa.Table | None, *,
                      known_patients: set[str] | None = None,
                      unsound: Mapping[str, Mapping[str, str]] | None = None) -> tuple[pa.Table, FusionReport]:
    """Join every patient's feature files with the clinical table (see the module docstring).

    `unsound`: {modality: {patient_id: reason}} of results to leave out (None: use every file).
    """
    artifacts_root = Path(artifacts_root)
    report = FusionReport()
    modality_rows: dict[str, dict[str, _Row]] = {}
    for source in SOURCES:
        rows: dict[str, _Row] = {}
        found = find_feature_files(artifacts_root, source, known_patients, report,
                                   (unsound or {}).get(source.modality))
        for patient_id, path in found.items():
            relative = str(path.relative_to(artifacts_root))
            report.input_files[relative] = sha256_file(path)
            row, problem = _read_one_row(path, patient_id, source)
            if problem:
                report.file_problems.append({"patient_id": patient_id, "modality": source.modality,
                                             "file": str(path), "reason": problem})
            else:
                rows[patient_id] = row
        if rows and source.modality != LYMPH_NODE:  # a lymph_nodes row's columns are checked against its contract
            reference = _reference_columns(rows)
            for patient_id in sorted(rows):
                columns = list(rows[patient_id].values)
                if columns != reference:
                    report.file_problems.append({
                        "patient_id": patient_id, "modality": source.modality,
                        "file": str(artifacts_root / source.asset / patient_id / source.filename),
                        "reason": _describe_column_difference(reference, columns)})
                    del rows[patient_id]
        modality_rows[source.modality] = rows

    clinical_ids: list[str] = clinical.column(ID_COLUMN).to_pylist() if clinical is not None else []
    clinical_index = {pid: i for i, pid in enumerate(clinical_ids)}
    feature_ids = set().union(*(rows.keys() for rows in modality_rows.values()))
    # Patients whose only feature files were rejected or left out still get a row: it shows why.
    rejected_ids = {p["patient_id"] for p in report.file_problems + report.excluded_results}
    patient_ids = sorted(feature_ids | set(clinical_ids) | rejected_ids)
    report.features_without_clinical = sorted(feature_ids - set(clinical_ids))
    report.clinical_without_features = sorted(set(clinical_ids) - feature_ids)

    columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(patient_ids, pa.string())}
    for modality in (RADIOLOGY, PATHOLOGY):
        columns[AVAILABILITY[modality]] = pa.array([p in modality_rows[modality] for p in patient_ids])
    columns[AVAILABILITY[CLINICAL]] = pa.array([p in clinical_index for p in patient_ids])

    labels = [None] * len(patient_ids)
    if clinical is not None:
        clinical_labels = clinical.column(LABEL_COLUMN).to_pylist()
        labels = [clinical_labels[clinical_index[p]] if p in clinical_index else None for p in patient_ids]
    columns[LABEL_COLUMN] = pa.array(labels, pa.int8())

    if clinical is not None:
        for name in clinical.column_names:
            if name in (ID_COLUMN, LABEL_COLUMN):
                continue
            source_values = clinical.column(name).to_pylist()
            columns[PREFIX[CLINICAL] + name] = pa.array(
                [source_values[clinical_index[p]] if p in clinical_index else None for p in patient_ids],
                pa.float64())

    for modality in FILE_BLOCKS:
        rows = modality_rows.get(modality, {})
        if modality == LYMPH_NODE:
            # a flag of its own, after the other blocks' columns: a cohort without lymph-node slides
            # keeps every earlier column where it was
            columns[AVAILABILITY[LYMPH_NODE]] = pa.array([p in rows for p in patient_ids])
        if not rows:
            continue
        names = (list(LYMPH_NODE_FEATURES) if modality == LYMPH_NODE
                 else list(next(iter(rows.values())).values))
        # float64, as slide_vector stores them: the per-patch explanations must add up to the very
        # logit the model computes from this table.
        matrix = np.full((len(patient_ids), len(names)), np.nan, dtype=np.float64)
        nulls = np.zeros((len(patient_ids), len(names)), dtype=bool)
        for i, patient_id in enumerate(patient_ids):
            row = rows.get(patient_id)
            if row is not None:
                matrix[i] = [row.values[n] for n in names]
                nulls[i] = [n in row.nulls for n in names]
        for count in COUNT_COLUMNS.get(modality, ()):
            columns[PREFIX[modality] + count] = pa.array(
                [rows[p].counts.get(count) if p in rows else None for p in patient_ids], pa.int64())
        present = np.array([p in rows for p in patient_ids])
        integers = INTEGER_FEATURES.get(modality, ())
        for j, name in enumerate(names):
            # null where the modality is absent (and where the row itself says null); NaN inside a
            # present row stays a NaN value
            mask = ~present | nulls[:, j]
            values = np.ascontiguousarray(matrix[:, j])
            columns[PREFIX[modality] + name] = (
                pa.array(np.where(mask, 0, values).astype(np.int64), mask=mask) if name in integers
                else pa.array(values, mask=mask))
    return pa.table(columns), report


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Atomic parquet write (zstd): readers see the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def fused_stats(table: pa.Table) -> dict:
    # a table written before the lymph-node block has no flag for it: no patient has the block
    flags = {m: np.asarray(table.column(flag).to_numpy(zero_copy_only=False), bool) if flag in table.column_names
             else np.zeros(table.num_rows, bool) for m, flag in AVAILABILITY.items()}
    labels = table.column(LABEL_COLUMN).to_pylist()
    has_features = flags[RADIOLOGY] | flags[PATHOLOGY] | flags[LYMPH_NODE]
    return {
        "patients": table.num_rows,
        "with_radiology": int(flags[RADIOLOGY].sum()),
        "with_pathology": int(flags[PATHOLOGY].sum()),
        "with_both": int((flags[RADIOLOGY] & flags[PATHOLOGY]).sum()),
        "with_clinical": int(flags[CLINICAL].sum()),
        "with_lymph_node": int(flags[LYMPH_NODE].sum()),
        "with_features": int(has_features.sum()),
        "radiology_features": sum(1 for c in table.column_names if c.startswith(PREFIX[RADIOLOGY])),
        "pathology_features": sum(1 for c in table.column_names if c.startswith(PREFIX[PATHOLOGY] + "feat")),
        "clinical_covariates": sum(1 for c in table.column_names if c.startswith(PREFIX[CLINICAL])),
        "label_positive": sum(1 for v in labels if v == 1),
        "label_negative": sum(1 for v in labels if v == 0),
        "label_unknown": sum(1 for v in labels if v is None),
        "labelled_with_features": {
            "positive": int(sum(1 for v, f in zip(labels, has_features) if f and v == 1)),
            "negative": int(sum(1 for v, f in zip(labels, has_features) if f and v == 0)),
        },
    }


def preview_markdown(table: pa.Table, rows: int = 8, features_per_modality: int = 2) -> str:
    """A small markdown table: ids, flags, label and the first few features of each block."""
    names = [ID_COLUMN, *(flag for flag in AVAILABILITY.values() if flag in table.column_names), LABEL_COLUMN]
    for prefix in (PREFIX[CLINICAL], PREFIX[RADIOLOGY], PREFIX[PATHOLOGY] + "feat", PREFIX[LYMPH_NODE] + "n_"):
        names += [c for c in table.column_names if c.startswith(prefix)][:features_per_modality]
    return markdown_table(table, names, rows)


def markdown_table(table: pa.Table, names: list[str], rows: int = 8) -> str:
    """The first `rows` rows of the named columns as markdown (for the Dagster UI)."""
    def cell(value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    head = table.select(names).slice(0, rows).to_pylist()
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(r[n]) for n in names) + " |" for r in head]
    if table.num_rows > rows:
        lines.append(f"\n{table.num_rows - rows} more rows; {table.num_columns} columns in all.")
    return "\n".join(lines)


def report_json(report: FusionReport) -> str:
    return json.dumps({
        "file_problems": report.file_problems,
        "stale_folders": report.stale_folders,
        "excluded_results": report.excluded_results,
        "features_without_clinical": report.features_without_clinical,
        "clinical_without_features": report.clinical_without_features,
        "input_files": report.input_files,
    }, indent=2, sort_keys=True)
