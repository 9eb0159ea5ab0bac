"""The fused cohort table: one row per patient from the per-patient feature files and the clinical table.

Plain Python + pyarrow (no Dagster). Each patient's feature row of each modality (the files
`catalogue.PATIENT_FEATURES` names) is read on its own (one small row at a time), so memory grows
with the cohort table, never with whatever else a partitioned asset may hold.

Columns, in this order:
  patient_id, has_radiology, has_pathology, has_clinical, mlm (int8, null = unknown),
  clin_<covariate>..., rad_<PyRadiomics feature>..., path_n_patches, path_n_slides, path_feat_<i>...,
  has_lymph_node, ln_n_slides, ln_n_nodes, ln_n_metastatic_nodes, ln_tumour_area_mm2,
  ln_metastatic_node_area_mm2, ln_t_mln, has_delta, delta_<feature>_diff, delta_<feature>_rel...,
  delta_days, delta_similarity
The lymph-node block comes after the others, so a cohort without lymph-node slides has every earlier column as
before; its ln_* columns exist only when some patient's lymph_nodes row was used (like rad_* and path_*).
`ln_t_mln` is null where T/MLN is undefined (no metastatic node): a value, not a missing block.
The delta block (change between a patient's first and last CT scan, `deltas.py`) comes last, for the
same reason; its delta_* columns exist only when some patient has two usable scans.

radiomics_row is stored per CT scan (`radiomics_row/<scan key>/`): which scan feeds the radiology
block and which two the delta block is `scan_choice.py`'s (setting `radiology_timepoint`); the
report says per patient which scans fed it (`scans`). A patient with one scan reads exactly as before.

What counts as what (the alignment check reports these):
- a feature file that cannot be used (unreadable, not one row, `patient_id` not its folder's name,
  or, for a scan, neither its scan key nor its patient; a non-numeric feature, no finite value, columns other than the cohort's; for a lymph_nodes row,
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
from gcmlm_assets.cohort.tables import deltas
from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.tables.lymph_node_rows import (  # the row's contract; its names are used from here too
    LYMPH_NODE_COUNT_COLUMNS, LYMPH_NODE_FEATURES, T_MLN, lymph_node_row_problem)
from gcmlm_assets.cohort.tables.scan_choice import ScanChoice, choose_scans, delta_pair_problems, find_scan_files
from gcmlm_assets.lazy import lazy
from gcmlm_assets.patients import patient_id_problem
from gcmlm_assets.scans import parse_scan_key
from gcmlm_assets.storage import atomic_path, sha256_file, sha256_text

# imported on first use: the definitions import this module, the steps compute (gcmlm_assets/lazy.py)
np = lazy("numpy")
pa = lazy("pyarrow")
pq = lazy("pyarrow.parquet")

# The model's blocks: their names are in stored model files, metrics and the fused table's flags,
# so they are the model's own, not the UI's group names.
RADIOLOGY, PATHOLOGY, CLINICAL = "radiology", "pathology", "clinical"
LYMPH_NODE = catalogue.LYMPH_NODE  # "lymph_node": the modality's name is the block's
DELTA = "delta"  # the change of the radiomics between a patient's first and last CT scan
AVAILABILITY = {RADIOLOGY: "has_radiology", PATHOLOGY: "has_pathology", CLINICAL: "has_clinical",
                LYMPH_NODE: "has_lymph_node", DELTA: "has_delta"}
PREFIX = {RADIOLOGY: "rad_", PATHOLOGY: "path_", CLINICAL: "clin_", LYMPH_NODE: "ln_", DELTA: "delta_"}
DEFAULT_RADIOLOGY_TIMEPOINT = "baseline"
# slide_vector's bookkeeping columns: kept in the table, not model features.
SLIDE_COUNT_COLUMNS = ("n_patches", "n_slides")
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
    # patient -> {scans: its scan keys oldest first, radiology: the one read, delta: [first, last] or None}
    scans: dict[str, dict] = field(default_factory=dict)

    def input_fingerprint(self, clinical_sha256: str | None) -> str:
        """One hash over every input the table was built from (names and contents)."""
        parts = [f"{name}={digest}" for name, digest in sorted(self.input_files.items())]
        # the reasons too: the stored report must say why each result was left out
        left_out = [f"excluded:{e['patient_id']}:{e['modality']}={e['reason']}" for e in self.excluded_results]
        # and which scans fed each patient's blocks
        chosen = [f"scans:{p}={json.dumps(c, sort_keys=True)}" for p, c in sorted(self.scans.items())]
        return sha256_text(f"clinical={clinical_sha256}", *parts, *sorted(left_out), *chosen)

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


def _read_one_row(path: Path, patient_id: str, source: FeatureSource,
                  scan_patient: str | None = None) -> tuple[_Row | None, str | None]:
    """The file's one row, or why it cannot be used. `patient_id` is the folder's name (a scan key
    for radiomics rows); a scan's row may name its scan key or its patient (`scan_patient`)."""
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, never fatal
        return None, f"unreadable parquet ({type(exc).__name__}: {exc})"
    if table.num_rows != 1:
        return None, f"has {table.num_rows} rows, expected exactly 1"
    if ID_COLUMN not in table.column_names:
        return None, f"lacks the {ID_COLUMN} column"
    stored_id = table.column(ID_COLUMN)[0].as_py()
    if stored_id != patient_id and (scan_patient is None or stored_id != scan_patient):
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


def _scan_reason(scan: str, patient_id: str, reason: str) -> str:
    return reason if scan == patient_id else f"scan {scan}: {reason}"


def _radiology_from_scans(artifacts_root: Path, source: FeatureSource, known_patients: set[str] | None,
                          known_scans: set[str] | None, report: FusionReport, unsound: Mapping[str, str],
                          radiology_timepoint: str) -> tuple[dict[str, _Row], dict[str, dict[str, float]]]:
    """({patient: the chosen scan's row}, {patient: delta row}) from the per-scan radiomics rows
    (scan_choice.py says which scans); only the scans a block reads are read and hashed."""
    found = find_scan_files(artifacts_root / source.asset, source.filename, known_scans, known_patients)
    report.stale_folders.extend(found.stale)
    choices: dict[str, ScanChoice] = choose_scans(known_scans if known_scans is not None else found.files,
                                                  radiology_timepoint)
    if known_patients is not None:
        choices = {p: c for p, c in choices.items() if p in known_patients}
    needed = sorted({str(s) for c in choices.values()
                     for s in ((c.radiology,) if c.radiology else ()) + (c.delta or ())})
    scan_rows: dict[str, _Row] = {}
    left_out: dict[str, str] = {}  # scan key -> why it is unsound
    for key in needed:
        path = found.files.get(key)
        if path is None:
            continue  # not materialized (yet)
        patient_id = parse_scan_key(key).patient_id
        if key in unsound:
            left_out[key] = unsound[key]
            continue
        report.input_files[str(path.relative_to(artifacts_root))] = sha256_file(path)
        row, problem = _read_one_row(path, key, source, scan_patient=patient_id)
        if problem:
            report.file_problems.append({"patient_id": patient_id, "modality": source.modality, "file": str(path),
                                         "reason": _scan_reason(key, patient_id, problem)})
        else:
            scan_rows[key] = row
    if scan_rows:
        reference = _reference_columns(scan_rows)
        for key in sorted(scan_rows):
            columns = list(scan_rows[key].values)
            if columns != reference:
                patient_id = parse_scan_key(key).patient_id
                report.file_problems.append({
                    "patient_id": patient_id, "modality": source.modality, "file": str(found.files[key]),
                    "reason": _scan_reason(key, patient_id, _describe_column_difference(reference, columns))})
                del scan_rows[key]
    rows: dict[str, _Row] = {}
    delta_rows: dict[str, dict[str, float]] = {}
    for patient_id, choice in choices.items():
        report.scans[patient_id] = choice.as_dict()
        if choice.radiology is not None:
            key = str(choice.radiology)
            if key in left_out:
                report.excluded_results.append({"patient_id": patient_id, "modality": RADIOLOGY,
                                                "file": str(found.files[key]),
                                                "reason": _scan_reason(key, patient_id, left_out[key])})
            elif key in scan_rows:
                rows[patient_id] = scan_rows[key]
        if choice.delta is None:
            continue
        first, last = (str(s) for s in choice.delta)
        problems = delta_pair_problems(choice.delta, found.files, left_out, scan_rows, source.asset)
        if problems:  # the block is absent: which scan and why
            report.excluded_results.append({
                "patient_id": patient_id, "modality": DELTA, "reason": "; ".join(why for _, why in problems),
                "file": str(artifacts_root / source.asset / problems[0][0] / source.filename)})
        else:
            features = list(scan_rows[first].values)
            delta_rows[patient_id] = deltas.delta_row(features, scan_rows[first].values, scan_rows[last].values,
                                                      choice.delta[0].timepoint, choice.delta[1].timepoint)
    return rows, delta_rows


def build_fused_table(artifacts_root: str | Path, clinical: pa.Table | None, *,
                      known_patients: set[str] | None = None,
                      unsound: Mapping[str, Mapping[str, str]] | None = None,
                      known_scans: set[str] | None = None,
                      radiology_timepoint: str = DEFAULT_RADIOLOGY_TIMEPOINT) -> tuple[pa.Table, FusionReport]:
    """Join every patient's feature files with the clinical table (see the module docstring).

    `unsound`: {modality: {patient_id: reason}} of results to leave out (None: use every file); for
    radiology keyed by scan key. `known_scans`: the ct_scans partitions (None: every scan folder
    found). `radiology_timepoint`: the scan of the radiology block (scans.chosen_scan's choice).
    """
    artifacts_root = Path(artifacts_root)
    report = FusionReport()
    modality_rows: dict[str, dict[str, _Row]] = {}
    delta_rows: dict[str, dict[str, float]] = {}
    for source in SOURCES:
        if source.modality == RADIOLOGY:
            modality_rows[RADIOLOGY], delta_rows = _radiology_from_scans(
                artifacts_root, source, known_patients, known_scans, report, (unsound or {}).get(RADIOLOGY) or {},
                radiology_timepoint)
            continue
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
    feature_ids = set().union(*(rows.keys() for rows in modality_rows.values()), delta_rows)
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
    # the delta block last: a cohort of single scans keeps every column above where it was
    columns[AVAILABILITY[DELTA]] = pa.array([p in delta_rows for p in patient_ids])
    if delta_rows:
        names = list(next(iter(delta_rows.values())))
        present = np.array([p in delta_rows for p in patient_ids])
        for name in names:
            # null where the patient has no delta; NaN inside one (an undated pair's days) stays NaN
            values = np.array([delta_rows[p][name] if p in delta_rows else np.nan for p in patient_ids],
                              dtype=np.float64)
            columns[PREFIX[DELTA] + name] = pa.array(values, mask=~present)
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
    has_features = flags[RADIOLOGY] | flags[PATHOLOGY] | flags[LYMPH_NODE] | flags[DELTA]
    return {
        "patients": table.num_rows,
        "with_radiology": int(flags[RADIOLOGY].sum()),
        "with_pathology": int(flags[PATHOLOGY].sum()),
        "with_both": int((flags[RADIOLOGY] & flags[PATHOLOGY]).sum()),
        "with_clinical": int(flags[CLINICAL].sum()),
        "with_lymph_node": int(flags[LYMPH_NODE].sum()),
        "with_delta": int(flags[DELTA].sum()),
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
    for prefix in (PREFIX[CLINICAL], PREFIX[RADIOLOGY], PREFIX[PATHOLOGY] + "feat", PREFIX[LYMPH_NODE] + "n_",
                   PREFIX[DELTA]):
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
        "scans": report.scans,
    }, indent=2, sort_keys=True)
