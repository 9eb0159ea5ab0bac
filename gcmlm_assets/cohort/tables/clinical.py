"""Reading and validating the landing zone's `clinical.csv` (plain Python, no Dagster).

The file has a header with `patient_id` and `mlm` (metachronous liver metastasis: `0`, `1`, or
empty while not yet known) and any number of further columns of numeric covariates (empty =
missing). Whole-file problems (unreadable, no header, a required column missing, repeated column
names) raise `ClinicalFileError` naming the file. Row problems never stop the rest of the file and
are never dropped silently: every bad row is returned as a `RowProblem` with its line number and
reason, and is left out of the table. A patient id that occurs on several lines is a problem on
each of those lines, and the patient is left out, because there is no telling which line is right.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from gcmlm_assets.landing.scan import CLINICAL_CSV
from gcmlm_assets.lazy import lazy
from gcmlm_assets.patients import patient_id_problem

# imported on first use: the definitions import this module, the steps compute (gcmlm_assets/lazy.py)
pa = lazy("pyarrow")

ID_COLUMN = "patient_id"
LABEL_COLUMN = "mlm"
REQUIRED_COLUMNS = (ID_COLUMN, LABEL_COLUMN)
# Spreadsheet exports write integers as "1.0" now and then; those mean the same label.
LABEL_SPELLINGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


class ClinicalFileError(ValueError):
    """The file as a whole cannot be read as a clinical table."""


@dataclass(frozen=True)
class RowProblem:
    line: int  # line number in the file; the header is line 1
    patient_id: str
    reason: str

    def describe(self) -> str:
        who = f" (patient {self.patient_id!r})" if self.patient_id else ""
        return f"line {self.line}{who}: {self.reason}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClinicalTable:
    """The valid rows: one per patient, sorted by patient id."""

    table: pa.Table  # patient_id (string), mlm (int8, null = unknown), covariates (float64)
    covariates: list[str]
    rows_read: int

    @property
    def patient_ids(self) -> list[str]:
        return self.table.column(ID_COLUMN).to_pylist()


def read_clinical_csv(path: str | Path) -> tuple[ClinicalTable, list[RowProblem]]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM from spreadsheet exports is fine
    except FileNotFoundError:
        raise ClinicalFileError(f"{path}: clinical table not found") from None
    except UnicodeDecodeError as exc:
        raise ClinicalFileError(f"{path}: not UTF-8 text ({exc})") from None
    return parse_clinical_csv(text, source=str(path))


def parse_clinical_csv(text: str, *, source: str = CLINICAL_CSV) -> tuple[ClinicalTable, list[RowProblem]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ClinicalFileError(f"{source}: empty file (expected a header with "
                                f"{', '.join(REQUIRED_COLUMNS)})") from None
    except csv.Error as exc:
        raise ClinicalFileError(f"{source}: header is not valid CSV ({exc})") from None
    header = [name.strip() for name in header]
    _check_header(header, source)
    covariates = [name for name in header if name not in REQUIRED_COLUMNS]
    id_index, label_index = header.index(ID_COLUMN), header.index(LABEL_COLUMN)
    covariate_index = {name: header.index(name) for name in covariates}

    problems: list[RowProblem] = []
    parsed: dict[str, tuple[int, int | None, list[float]]] = {}
    lines_by_patient: dict[str, list[int]] = {}
    rows_read = 0
    while True:
        line = reader.line_num + 1  # a quoted field may span lines: report where the row starts
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(RowProblem(line, "", f"not valid CSV ({exc}); the rest of the file is not read"))
            break  # the reader cannot resynchronise after a broken quote
        if not fields or all(not f.strip() for f in fields):
            continue  # blank lines carry no patient
        rows_read += 1
        patient_id = fields[id_index].strip() if id_index < len(fields) else ""
        reasons: list[str] = []
        # (A short line's missing id is told by its field count.)
        id_problem = patient_id_problem(patient_id) if patient_id or len(fields) == len(header) else None
        if id_problem:
            reasons.append(f"invalid patient id ({_text_kind(patient_id)}): {id_problem}")
            patient_id = ""  # not an id of ours: it may be anything, e.g. a name
        if len(fields) != len(header):
            reasons.append(f"has {len(fields)} fields, the header has {len(header)}")
        else:
            label_text = fields[label_index].strip()
            label: int | None = None
            if label_text:
                if label_text in LABEL_SPELLINGS:
                    label = LABEL_SPELLINGS[label_text]
                else:
                    reasons.append(f"{LABEL_COLUMN} must be 0, 1 or empty (unknown), got {_text_kind(label_text, show_numbers=False)}")
            values: list[float] = []
            for name in covariates:
                value, problem = _parse_number(fields[covariate_index[name]])
                if problem:
                    reasons.append(f"covariate {name!r}: {problem}")
                values.append(value)
        if reasons:
            problems.append(RowProblem(line, patient_id, "; ".join(reasons)))
            continue
        lines_by_patient.setdefault(patient_id, []).append(line)
        parsed.setdefault(patient_id, (line, label, values))

    for patient_id, lines in lines_by_patient.items():
        if len(lines) > 1:
            others = ", ".join(str(n) for n in lines)
            for n in lines:
                problems.append(RowProblem(n, patient_id, f"patient id repeated on lines {others}; "
                                                          "patient left out until one line remains"))
            del parsed[patient_id]
    problems.sort(key=lambda p: (p.line, p.reason))
    return ClinicalTable(_to_arrow(parsed, covariates), covariates, rows_read), problems


def _check_header(header: list[str], source: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ClinicalFileError(f"{source}: header lacks column(s) {', '.join(missing)} "
                                f"(found: {', '.join(header) or 'nothing'})")
    if any(name == "" for name in header):
        raise ClinicalFileError(f"{source}: header has an empty column name (column "
                                f"{header.index('') + 1})")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ClinicalFileError(f"{source}: header repeats column(s) {', '.join(repeated)}")


def _parse_number(text: str) -> tuple[float, str | None]:
    text = text.strip()
    if not text:
        return math.nan, None  # missing covariate; the model imputes it
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"not a number: {_text_kind(text)}"
    if not math.isfinite(value):
        return math.nan, f"not a finite number: {text!r}"
    return value, None


def _text_kind(text: str, show_numbers: bool = True) -> str:
    """A cell described without its value: a wrong cell may hold a name, a birth date or a hospital
    number, and problems are recorded (problems.json, metadata, logs). The line and column locate it.
    Numbers are shown where they are what the column is for (covariates), never for the label,
    whose only numbers are 0 and 1: a number there may be a date or a hospital number."""
    length = f"{len(text)} character{'s' if len(text) != 1 else ''}"
    try:
        float(text)
    except ValueError:
        return f"text of {length}"
    return repr(text) if show_numbers else f"a number of {length}"


def _to_arrow(parsed: dict[str, tuple[int, int | None, list[float]]], covariates: list[str]) -> pa.Table:
    ids = sorted(parsed)
    columns: dict[str, pa.Array] = {
        ID_COLUMN: pa.array(ids, pa.string()),
        LABEL_COLUMN: pa.array([parsed[p][1] for p in ids], pa.int8()),
    }
    for i, name in enumerate(covariates):
        values = [parsed[p][2][i] for p in ids]
        # NaN marks a missing covariate in the float column; null says the same thing to readers.
        columns[name] = pa.array(values, pa.float64(), mask=[math.isnan(v) for v in values])
    return pa.table(columns)


def label_counts(table: pa.Table) -> dict[str, int]:
    labels = table.column(LABEL_COLUMN).to_pylist()
    return {
        "positive": sum(1 for v in labels if v == 1),
        "negative": sum(1 for v in labels if v == 0),
        "unknown": sum(1 for v in labels if v is None),
    }
