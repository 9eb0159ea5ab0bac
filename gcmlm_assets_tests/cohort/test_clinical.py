"""clinical.csv validation: every bad row is reported with its line and reason, good rows are kept."""

import re

import pytest

from gcmlm_assets.cohort.tables import qc
from gcmlm_assets.cohort.tables.clinical import ClinicalFileError, parse_clinical_csv, read_clinical_csv


def test_valid_file_with_bom_blank_lines_and_unknown_labels(tmp_path):
    path = tmp_path / "clinical.csv"
    path.write_bytes("\ufeffpatient_id,mlm,age\nP2,1,61\n\nP1,,\nP3,0.0,70.5\n".encode())
    parsed, problems = read_clinical_csv(path)
    assert problems == []
    assert parsed.rows_read == 3
    assert parsed.covariates == ["age"]
    rows = parsed.table.to_pylist()
    assert [r["patient_id"] for r in rows] == ["P1", "P2", "P3"]  # sorted by id
    assert [r["mlm"] for r in rows] == [None, 1, 0]
    assert rows[0]["age"] is None and rows[1]["age"] == 61.0 and rows[2]["age"] == 70.5
    assert qc.clinical_rows_valid([p.as_dict() for p in problems]).passed


def test_every_bad_row_is_named_with_line_and_reason():
    text = "\n".join([
        "patient_id,mlm,age",
        "P01,1,60",          # 2 good
        "P 02,0,55",         # 3 whitespace in id
        "P03,yes,50",        # 4 bad label
        "P04,0,old",         # 5 covariate not a number
        "P05,1,inf",         # 6 covariate not finite
        "P06,1",             # 7 too few fields
        "P07,0,40",          # 8 duplicate ...
        "../etc,0,40",       # 9 path-like id
        "P07,1,41",          # 10 ... of line 8
        "P08,0,",            # 11 good (missing covariate)
    ]) + "\n"
    parsed, problems = parse_clinical_csv(text)
    by_line = {p.line: p for p in problems}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "whitespace" in by_line[3].reason
    # The cell is described, never repeated: a wrong cell may hold a name or a hospital number.
    assert "mlm must be 0, 1 or empty" in by_line[4].reason and "text of 3 characters" in by_line[4].reason
    assert "yes" not in by_line[4].reason
    assert "covariate 'age'" in by_line[5].reason and "not a number" in by_line[5].reason
    assert "not a finite number" in by_line[6].reason
    assert "2 fields" in by_line[7].reason
    assert "repeated on lines 8, 10" in by_line[8].reason and by_line[10].patient_id == "P07"
    assert "path separator" in by_line[9].reason
    assert parsed.patient_ids == ["P01", "P08"]  # bad rows and both duplicates left out, not guessed
    assert parsed.table.column("age").to_pylist() == [60.0, None]

    verdict = qc.clinical_rows_valid([p.as_dict() for p in problems])
    assert not verdict.passed and verdict.outcome == qc.ERROR
    for line in (3, 4, 5, 6, 7, 8, 9, 10):
        assert f"line {line}" in verdict.description
    assert verdict.metadata["bad_lines"] == [3, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("header, message", [
    ("patient_id,age", "lacks column(s) mlm"),
    ("id,mlm", "lacks column(s) patient_id"),
    ("patient_id,mlm,age,age", "repeats column(s) age"),
    ("patient_id,mlm,", "empty column name"),
])
def test_whole_file_problems_name_the_file(tmp_path, header, message):
    path = tmp_path / "clinical.csv"
    path.write_text(header + "\nP1,1\n")
    with pytest.raises(ClinicalFileError, match=re.escape(message)) as caught:
        read_clinical_csv(path)
    assert str(path) in str(caught.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ClinicalFileError, match="not found"):
        read_clinical_csv(tmp_path / "clinical.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes("patient_id,mlm\nP\xe9,1\n".encode("latin-1"))
    with pytest.raises(ClinicalFileError, match="not UTF-8"):
        read_clinical_csv(path)
