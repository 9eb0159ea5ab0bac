"""The fused table from per-patient files: prefixes, flags, orphans and rejected files, and its checks."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gcmlm_assets.catalogue import RADIOMICS_TABLE, SLIDE_VECTOR_TABLE
from gcmlm_assets.cohort.tables import qc
from gcmlm_assets.cohort.tables.clinical import parse_clinical_csv
from gcmlm_assets.cohort.tables.fusion import build_fused_table, fused_stats, report_json, write_parquet
from gcmlm_assets.storage import ArtifactStore
from gcmlm_assets_tests.support.cohort.synthetic import (
    RADIOMICS_NAMES, make_cohort, write_radiomics_row, write_slide_vector)


def _clinical(lines):
    parsed, problems = parse_clinical_csv("patient_id,mlm,age\n" + "\n".join(lines) + "\n")
    assert problems == []
    return parsed.table


def test_fused_rows_columns_flags_and_orphans(tmp_path):
    ids, labels, radiomics, pathology = make_cohort(5, seed=3)
    artifacts = tmp_path / "artifacts"
    for i in (0, 1, 2, 4):  # P003 lacks radiology
        write_radiomics_row(artifacts, ids[i], radiomics[i])
    for i in (0, 1, 3, 4):  # P002 lacks pathology
        write_slide_vector(artifacts, ids[i], pathology[i], n_patches=50 + i)
    # P004 has features but no clinical row; P009 has a clinical row but no features
    clinical = _clinical(["P000,1,60", "P001,0,", "P002,,70", "P003,1,55", "P009,0,40"])

    table, report = build_fused_table(artifacts, clinical)

    assert table.column("patient_id").to_pylist() == ["P000", "P001", "P002", "P003", "P004", "P009"]
    assert table.column_names[:5] == ["patient_id", "has_radiology", "has_pathology", "has_clinical", "mlm"]
    rows = {r["patient_id"]: r for r in table.to_pylist()}
    assert [rows[p]["has_radiology"] for p in rows] == [True, True, True, False, True, False]
    assert [rows[p]["has_pathology"] for p in rows] == [True, True, False, True, True, False]
    assert [rows[p]["has_clinical"] for p in rows] == [True, True, True, True, False, True]
    assert [rows[p]["mlm"] for p in rows] == [1, 0, None, 1, None, 0]
    assert rows["P001"]["clin_age"] is None and rows["P000"]["clin_age"] == 60.0
    rad = [c for c in table.column_names if c.startswith("rad_")]
    feat = [c for c in table.column_names if c.startswith("path_feat_")]
    assert rad == ["rad_" + n for n in RADIOMICS_NAMES] and len(feat) == 1024
    assert table.schema.field(rad[0]).type == pa.float64() and table.schema.field(feat[0]).type == pa.float64()
    assert rows["P001"][rad[3]] == radiomics[1, 3]
    assert np.isclose(rows["P004"]["path_feat_0007"], pathology[4, 7])
    assert rows["P003"][rad[0]] is None and rows["P002"]["path_feat_0000"] is None
    assert rows["P003"]["path_n_patches"] == 53

    assert report.features_without_clinical == ["P004"]
    assert report.clinical_without_features == ["P009"]
    assert report.file_problems == []
    assert len(report.input_files) == 8
    stats = fused_stats(table)
    assert stats["with_both"] == 3 and stats["with_features"] == 5 and stats["label_unknown"] == 2

    verdict = qc.modalities_aligned(json.loads(report_json(report)))
    assert verdict.outcome == qc.WARN and "P004" in verdict.description and "P009" in verdict.description


def test_bad_feature_files_are_rejected_and_named(tmp_path):
    ids, labels, radiomics, pathology = make_cohort(6, seed=4)
    artifacts = tmp_path / "artifacts"
    for i, patient_id in enumerate(ids):
        write_radiomics_row(artifacts, patient_id, radiomics[i])
        write_slide_vector(artifacts, patient_id, pathology[i])
    # P000: its radiomics file claims another patient
    store = ArtifactStore(artifacts)
    row = RADIOMICS_TABLE.path(store, "P000")
    write_parquet(pq.read_table(row).set_column(0, "patient_id", pa.array(["P001"])), row)
    # P001: a radiomics file with one feature fewer than the cohort's
    row = RADIOMICS_TABLE.path(store, "P001")
    table = pq.read_table(row)
    write_parquet(table.drop_columns([table.column_names[-1]]), row)
    # P002: not parquet at all
    SLIDE_VECTOR_TABLE.path(store, "P002").write_bytes(b"not parquet")
    # P003: slide vector of zero patches
    write_slide_vector(artifacts, "P003", pathology[3], n_patches=0)
    # P005: a leftover folder of a patient that is no longer a partition
    clinical = _clinical([f"{p},{l}," for p, l in zip(ids, labels)])

    fused, report = build_fused_table(artifacts, clinical, known_patients=set(ids[:5]))

    problems = {(p["patient_id"], p["modality"]): p for p in report.file_problems}
    assert set(problems) == {("P000", "radiology"), ("P001", "radiology"), ("P002", "pathology"),
                             ("P003", "pathology")}
    assert "'P001' but the file is in the folder of 'P000'" in problems[("P000", "radiology")]["reason"]
    assert "1 missing (original_gldm_LargeDependenceEmphasis)" in problems[("P001", "radiology")]["reason"]
    assert "unreadable parquet" in problems[("P002", "pathology")]["reason"]
    assert "n_patches is 0" in problems[("P003", "pathology")]["reason"]
    assert problems[("P002", "pathology")]["file"] == str(SLIDE_VECTOR_TABLE.path(store, "P002"))
    assert [s["folder"].split("/")[-1] for s in report.stale_folders] == ["P005", "P005"]

    rows = {r["patient_id"]: r for r in fused.to_pylist()}
    assert not rows["P000"]["has_radiology"] and rows["P000"]["has_pathology"]
    assert not rows["P002"]["has_pathology"] and rows["P002"]["has_radiology"]
    assert rows["P004"]["has_radiology"] and rows["P004"]["has_pathology"]
    assert not rows["P005"]["has_radiology"] and rows["P005"]["has_clinical"]  # stale files left out

    verdict = qc.modalities_aligned(json.loads(report_json(report)))
    assert verdict.outcome == qc.ERROR
    assert "slide_vector/P002/slide_vector.parquet: unreadable parquet" in verdict.description


def test_duplicate_fused_ids_fail_the_check():
    assert qc.fused_ids_unique(["P1", "P2", "P3"]).passed
    verdict = qc.fused_ids_unique(["P1", "P2", "P1"])
    assert verdict.outcome == qc.ERROR and "P1" in verdict.description
    assert (verdict.expected, verdict.found) == ("one row per patient", "1 patient(s) on several rows: P1")


def test_enough_labelled_counts_only_patients_with_features():
    table = pa.table({"patient_id": ["a", "b", "c", "d", "e"], "mlm": pa.array([1, 1, 0, 0, None], pa.int8()),
                      "has_radiology": [True, False, True, True, True],
                      "has_pathology": [False, False, False, True, True]})
    verdict = qc.enough_labelled(table, 2)
    # a warning, not an error: the cohort is still growing and risk_model waits for more labels
    assert verdict.outcome == qc.WARN and "positive: 1" in verdict.description
    assert "risk_model waits for more" in verdict.description
    assert qc.enough_labelled(table, 1).passed
