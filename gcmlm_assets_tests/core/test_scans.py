"""A patient's CT scans: timepoint names, scan keys, their order, and what a drop's ct/ holds."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from gcmlm_assets.scans import (
    DropScan,
    InvalidScanKey,
    ScanKey,
    chosen_scan,
    list_drop_scans,
    order_timepoints,
    parse_scan_key,
    patient_scans,
    scan_folders,
    scan_key,
    scan_key_problem,
    timepoint_date,
    timepoint_problem,
)


@pytest.mark.parametrize("name", ["2024-03-15", "baseline", "post_nact", "follow_up_2", "post_nact_2",
                                  "staging_999"])
def test_dates_and_labels_are_timepoint_names(name):
    assert timepoint_problem(name) is None


@pytest.mark.parametrize("name", ["pre_treatment", "post_treatment", "t1", "follow_up2", "follow_up_0",
                                  "follow_up_02", "follow_up_1000", "baseline_"])
def test_labels_of_unknown_order_are_refused_naming_the_known_labels_and_dates(name):
    # Ordered by name, post_treatment would come before pre_treatment: the delta's sign reversed.
    reason = timepoint_problem(name)
    assert reason.startswith(f"{name!r} is not a known timepoint label (its order among the scans would be a guess)")
    assert "baseline, staging, pre_nact, post_nact, preoperative, postoperative, follow_up" in reason
    assert "by the scan's date (ISO YYYY-MM-DD" in reason and "_<n>" in reason


@pytest.mark.parametrize("name, reason", [
    ("2024-02-30", "is not a calendar date"),
    ("2024-3-15", "is not a timepoint name"),
    ("Baseline", "is not a timepoint name"),
    ("post nact", "is not a timepoint name"),
    ("1st", "is not a timepoint name"),
    ("a@b", "is not a timepoint name"),
    ("x" * 33, "is not a known timepoint label"),
    ("", "is not a timepoint name"),
])
def test_other_names_are_refused_with_the_reason(name, reason):
    assert reason in timepoint_problem(name)


def test_scan_keys_round_trip():
    assert scan_key("P001", None) == "P001"
    assert scan_key("P001", "2024-03-15") == "P001@2024-03-15"
    assert parse_scan_key("P001") == ScanKey("P001", None)
    assert parse_scan_key("P001@baseline") == ScanKey("P001", "baseline")
    assert str(ScanKey("GC.01-a", "post_nact")) == "GC.01-a@post_nact"
    assert scan_key_problem("P001@2024-03-15") is None


@pytest.mark.parametrize("key", ["..P", "P001@", "P001@Baseline", "P001@2024-02-30", "P 1@baseline", "P001@a@b"])
def test_bad_scan_keys_name_the_key(key):
    with pytest.raises(InvalidScanKey, match="invalid scan key"):
        parse_scan_key(key)
    assert repr(key) in scan_key_problem(key)


def test_timepoints_oldest_first():
    assert order_timepoints(["2024-06-02", "2023-12-31", "2024-01-10"]) == ["2023-12-31", "2024-01-10", "2024-06-02"]
    # labels in treatment order, each label's repeats right after it by number (the label itself: 0)
    assert order_timepoints(["follow_up_10", "follow_up", "post_nact_2", "follow_up_2", "post_nact", "baseline",
                             "preoperative", "post_nact_1"]) == [
        "baseline", "post_nact", "post_nact_1", "post_nact_2", "preoperative", "follow_up", "follow_up_2",
        "follow_up_10"]
    with pytest.raises(ValueError, match="'pre_treatment' is not a known timepoint label"):
        order_timepoints(["baseline", "pre_treatment"])
    assert order_timepoints(["2024-01-10", None]) == [None, "2024-01-10"]
    assert timepoint_date("2024-01-10") == dt.date(2024, 1, 10)
    assert timepoint_date("baseline") is None and timepoint_date(None) is None


def test_patient_scans_groups_and_orders_keys():
    grouped = patient_scans(["P2", "P1@2024-06-02", "P1@2024-01-10", "not a key", "P3@post_nact", "P3@baseline"])
    assert grouped == {
        "P1": [ScanKey("P1", "2024-01-10"), ScanKey("P1", "2024-06-02")],
        "P2": [ScanKey("P2", None)],
        "P3": [ScanKey("P3", "baseline"), ScanKey("P3", "post_nact")],
    }


def test_a_stale_bare_key_beside_timepoints_is_left_out():
    # P1's drop was split into timepoints; its old single scan "P1" is still in the partition set.
    grouped = patient_scans(["P1", "P1@2024-06-02", "P1@2024-01-10", "P2"])
    assert grouped == {"P1": [ScanKey("P1", "2024-01-10"), ScanKey("P1", "2024-06-02")], "P2": [ScanKey("P2", None)]}
    assert chosen_scan(grouped["P1"]) == ScanKey("P1", "2024-01-10")


def test_scan_keys_are_not_ordered():
    with pytest.raises(TypeError):
        ScanKey("P1", None) < ScanKey("P1", "baseline")  # no order: None against a str cannot be compared


def test_chosen_scan():
    dated = [ScanKey("P", "2024-01-10"), ScanKey("P", "2024-06-02")]
    labelled = [ScanKey("P", "pre_nact"), ScanKey("P", "baseline")]  # as given: chosen by name, not position
    assert chosen_scan(dated) == dated[0]  # no timepoint labelled baseline: the oldest
    assert chosen_scan(labelled) == labelled[1]
    assert chosen_scan(dated, "first") == dated[0] and chosen_scan(dated, "last") == dated[1]
    assert chosen_scan(dated, "2024-06-02") == dated[1]
    assert chosen_scan(dated, "post_nact") is None
    assert chosen_scan([], "baseline") is None


def write(path: Path, content: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_one_scan_directly_in_ct(tmp_path):
    write(tmp_path / "ct" / "ct.nii.gz")
    write(tmp_path / "ct_label" / "mask.nii.gz")
    write(tmp_path / "ct" / ".partial")  # an uploader's temporary file
    listed = list_drop_scans(tmp_path)
    assert listed.scans == [DropScan(None, "ct", "ct_label")] and listed.problems == []
    assert scan_folders(None) == ("ct", "ct_label")


def test_timepoint_folders(tmp_path):
    write(tmp_path / "ct" / "2024-06-02" / "IM0001.dcm")
    write(tmp_path / "ct" / "2024-01-10" / "ct.nii.gz")
    write(tmp_path / "ct_label" / "2024-01-10" / "mask.nii.gz")
    (tmp_path / "ct" / "2024-09-01").mkdir()  # no scan yet
    listed = list_drop_scans(tmp_path)
    assert listed.scans == [DropScan("2024-01-10", "ct/2024-01-10", "ct_label/2024-01-10"),
                            DropScan("2024-06-02", "ct/2024-06-02", "ct_label/2024-06-02")]
    assert listed.problems == []


def test_no_ct_is_no_scan(tmp_path):
    assert list_drop_scans(tmp_path).scans == [] and list_drop_scans(tmp_path).problems == []


def test_a_bad_name_is_refused_the_others_go_on(tmp_path):
    write(tmp_path / "ct" / "2024-01-10" / "ct.nii.gz")
    write(tmp_path / "ct" / "scan 2" / "ct.nii.gz")
    listed = list_drop_scans(tmp_path)
    assert [s.timepoint for s in listed.scans] == ["2024-01-10"]
    [(folder, reason)] = listed.problems
    assert folder == "ct/scan 2" and "is not a timepoint name" in reason


def test_mixed_dates_and_labels_are_all_refused(tmp_path):
    write(tmp_path / "ct" / "2024-01-10" / "ct.nii.gz")
    write(tmp_path / "ct" / "post_nact" / "ct.nii.gz")
    listed = list_drop_scans(tmp_path)
    assert listed.scans == []
    assert listed.problems == [("ct", "timepoints mix dates (2024-01-10) and labels (post_nact): their order is "
                                      "unknown; name them all by date or all by label")]


def test_files_beside_timepoint_folders_are_refused(tmp_path):
    write(tmp_path / "ct" / "ct.nii.gz")
    write(tmp_path / "ct" / "2024-01-10" / "ct.nii.gz")
    listed = list_drop_scans(tmp_path)
    assert listed.scans == []
    [(folder, reason)] = listed.problems
    assert folder == "ct" and "holds both the files of one scan and sub-folders (2024-01-10)" in reason


def test_reference_masks_that_do_not_match_the_ct_layout(tmp_path):
    write(tmp_path / "ct" / "ct.nii.gz")
    write(tmp_path / "ct_label" / "2024-01-10" / "mask.nii.gz")
    one = list_drop_scans(tmp_path)
    assert one.scans == [DropScan(None, "ct", "ct_label")]
    assert [folder for folder, _ in one.problems] == ["ct_label"]

    split = tmp_path / "split"
    write(split / "ct" / "2024-01-10" / "ct.nii.gz")
    write(split / "ct_label" / "mask.nii.gz")
    write(split / "ct_label" / "2024-02-02" / "mask.nii.gz")
    listed = list_drop_scans(split)
    assert [s.timepoint for s in listed.scans] == ["2024-01-10"]
    problems = dict(listed.problems)
    assert "put each scan's mask in ct_label/<timepoint>/" in problems["ct_label"]
    assert "which has no CT folder ct/2024-02-02/" in problems["ct_label/2024-02-02"]


def test_an_empty_sub_folder_beside_a_single_scan_is_ignored(tmp_path):
    write(tmp_path / "ct" / "ct.nii.gz")
    (tmp_path / "ct" / "2024-09-01" / "series").mkdir(parents=True)  # no file anywhere under it
    write(tmp_path / "ct" / "old" / ".DS_Store")  # hidden files only
    listed = list_drop_scans(tmp_path)
    assert listed.scans == [DropScan(None, "ct", "ct_label")] and listed.problems == []
    write(tmp_path / "ct" / "2024-09-01" / "series" / "IM0001.dcm")  # now it holds a scan
    listed = list_drop_scans(tmp_path)
    assert listed.scans == [] and [folder for folder, _ in listed.problems] == ["ct"]
    assert "sub-folders (2024-09-01)" in listed.problems[0][1]


def test_a_timepoint_folder_holding_only_sub_folders_is_refused_naming_it(tmp_path):
    write(tmp_path / "ct" / "2024-01-10" / "ct.nii.gz")
    write(tmp_path / "ct" / "2024-06-02" / "DICOM" / "ST000" / "IM0001.dcm")  # a nested DICOM export
    (tmp_path / "ct" / "2024-09-01" / "DICOM").mkdir(parents=True)  # empty: no scan yet
    listed = list_drop_scans(tmp_path)
    assert [s.timepoint for s in listed.scans] == ["2024-01-10"]
    assert listed.problems == [("ct/2024-06-02", "holds no files directly, only sub-folders (DICOM): the scan's "
                                                 "files must lie directly in ct/2024-06-02/")]
