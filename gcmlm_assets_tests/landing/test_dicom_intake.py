"""The DICOM receiver on loopback: a real pynetdicom SCP on a free port, pynetdicom's own SCU.

A series in two overlapping associations commits READY once, after the quiet time, with every
instance, de-identified, and reads as `ct_image`; an instance sent after a commit is not read by the
landing scan before the quiet time, then commits once with the rest; a duplicate instance is written
once; an aborted association commits nothing; a non-CT SOP class is refused with its reason. The held-back identifying
values are searched for in every byte written to the landing zone and the artifacts, and in the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import dagster as dg
import pydicom
import pytest

from gcmlm_assets.landing.intake.deidentify import METHOD_CODES, IntakeRefusal
from gcmlm_assets.landing.intake.pseudonyms import PseudonymTableError
from gcmlm_assets.landing.intake.receiver import DicomReceiver
from gcmlm_assets.landing.intake.staging import IntakeZone
from gcmlm_assets.landing.scan import plan_tick, scan_landing_zone
from gcmlm_assets.radiology import resources as radiology_resources
from gcmlm_assets.radiology.assets import ct_image
from gcmlm_assets_tests.support.landing.intake import (
    associate, files_under, held_back_values_in, identifying_series, running_receiver, send, storescu,
    timer_rounds_pass, wait_for)
from gcmlm_assets_tests.support.phi_search import PATIENT_KEYWORDS, readable_forms
from gcmlm_assets_tests.support.dicom_tools import dciodvfy_report

QUIET_S = 0.3
LOGGER = "gcmlm_assets.landing.intake"


@pytest.fixture
def series(test_data, tmp_path):
    return identifying_series(test_data, tmp_path / "pacs" / "series")


@pytest.fixture
def table(tmp_path):
    return tmp_path / "secure" / "pseudonyms.json"


def dciodvfy_errors(path) -> set[str]:
    return {line.strip() for line in dciodvfy_report(path) if line.startswith("Error")}


def _only_pseudonym(table) -> str:
    [entry] = json.loads(table.read_text())["patients"]
    assert entry["patient_id"] == PATIENT_KEYWORDS["PatientID"]  # the table, and only it, links them
    return entry["pseudonym"]


def _ct_files(landing, pseudonym):
    return sorted((landing / pseudonym / "ct").glob("*.dcm"))


def test_a_series_in_two_associations_commits_ready_once_after_the_quiet_time_de_identified(
        series, table, data_root, instance, base_resources, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    landing, artifacts = data_root / "landing", data_root / "artifacts"
    with running_receiver(landing, table, QUIET_S, protected={"artifacts": artifacts}) as receiver:
        first = associate(receiver.port)
        assert [s.Status for s in send(first, series[:6])] == [0] * 6
        second = associate(receiver.port)
        assert send(second, series[6:7])[0].Status == 0
        first.release()
        pseudonym = _only_pseudonym(table)
        wait_for(lambda: any(r.outcome == "released" for r in receiver.zone.associations), "the first release")
        # Released, still hidden: the drop is not committed yet.
        assert len(list((landing / pseudonym / ".intake" / "released").glob("*.dcm"))) == 6
        assert _ct_files(landing, pseudonym) == []
        # Quiet long enough, but the second association is open and has sent this patient an instance.
        wait_for(lambda: time.monotonic() > receiver.zone.last_activity(pseudonym) + QUIET_S, "the quiet time")
        timer_rounds_pass(receiver)
        assert not (landing / pseudonym / "READY").exists() and receiver.zone.pending() == [pseudonym]

        assert [s.Status for s in send(second, series[7:])] == [0] * 5
        second.release()
        wait_for(lambda: (landing / pseudonym / "READY").exists(), "READY")
    [commit] = receiver.zone.commits  # the receiver has stopped: no later commit can come
    assert (commit.pseudonym, commit.instances) == (pseudonym, 12)
    assert commit.committed_at - commit.last_activity >= QUIET_S
    assert len(_ct_files(landing, pseudonym)) == 12
    assert sorted(p.relative_to(landing).as_posix() for p in files_under(landing)) == sorted(
        [f"{pseudonym}/READY"] + [f"{pseudonym}/ct/{p.name}" for p in _ct_files(landing, pseudonym)])

    # De-identified as the profile says, UIDs retained, the profile and options recorded.
    source = pydicom.dcmread(series[0])
    landed = pydicom.dcmread(landing / pseudonym / "ct" / f"{source.SOPInstanceUID}.dcm")
    assert (landed.PatientID, str(landed.PatientName)) == (pseudonym, pseudonym)
    assert (landed.StudyInstanceUID, landed.SeriesInstanceUID) == (source.StudyInstanceUID, source.SeriesInstanceUID)
    assert landed.PatientIdentityRemoved == "YES"
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in landed.DeidentificationMethodCodeSequence] == [
        (value, "DCM") for value, _ in METHOD_CODES]
    assert list(landed.DeidentificationMethod) == [meaning for _, meaning in METHOD_CODES]
    assert "RequestAttributesSequence" not in landed and not any(e.tag.is_private for e in landed)
    assert (landed.PatientBirthDate, landed.AccessionNumber) == ("", "")

    # The landing sensor's contract: a ready drop, its radiology due, named by the pseudonym.
    scan = scan_landing_zone(landing)
    assert ([d.patient_id for d in scan.drops], scan.invalid, scan.not_ready) == ([pseudonym], [], [])
    assert [(r.patient_id, r.modality) for r in plan_tick(scan, None, 10).runs] == [(pseudonym, "radiology")]

    # ct_image reads the received series as it is.
    instance.add_dynamic_partitions("ct_scans", [pseudonym])  # the drop's only scan
    result = dg.materialize([ct_image], partition_key=pseudonym, instance=instance,
                            resources={**radiology_resources.resources("local"), **base_resources})
    meta = result.asset_materializations_for_node("ct_image")[0].metadata
    assert meta["source"].value.startswith("DICOM series of 12 files")

    # The held-back values: in the source and the table, nowhere in the landing zone, artifacts or log.
    assert len(held_back_values_in(series[0].read_bytes())) >= 15
    assert held_back_values_in(table.read_bytes()) == ["ZZSECRETID123"]
    for root in (landing, artifacts):
        leaks = {str(p): found for p in files_under(root)
                 if (found := sorted({v for form in readable_forms(p) for v in held_back_values_in(form)}))}
        assert leaks == {}, root
    assert held_back_values_in(caplog.text.encode()) == [] and "committed" in caplog.text

    # Last, as it skips without dicom3tools: dciodvfy finds no error in a received instance that its
    # source did not have (the test series lacks a few CT attributes a scanner writes).
    assert dciodvfy_errors(landing / pseudonym / "ct" / f"{source.SOPInstanceUID}.dcm") <= dciodvfy_errors(series[0])


def test_a_duplicate_instance_is_written_once(series, table, tmp_path):
    landing = tmp_path / "landing"
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    for path in series:
        shutil.copy(path, outbox / path.name)
    shutil.copy(series[3], outbox / "again.dcm")  # the same SOPInstanceUID twice in one association
    with running_receiver(landing, table, QUIET_S) as receiver:
        sent = storescu(receiver.port, outbox)
        assert sent.returncode == 0, sent.stderr
        pseudonym = _only_pseudonym(table)
        ready = wait_for(lambda: (landing / pseudonym / "READY").exists() and landing / pseudonym / "READY", "READY")
        before = {p.name: p.stat().st_ino for p in _ct_files(landing, pseudonym)}
        committed = ready.stat().st_mtime_ns

        sent = storescu(receiver.port, series[5])  # and once more, after the commit
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(receiver.zone.associations) == 2, "the second association's end")
        timer_rounds_pass(receiver)
    assert [(r.moved, r.duplicates) for r in receiver.zone.associations] == [(12, 1), (0, 1)]
    assert {p.name: p.stat().st_ino for p in _ct_files(landing, pseudonym)} == before and len(before) == 12
    assert len(receiver.zone.commits) == 1 and ready.stat().st_mtime_ns == committed


def test_an_instance_sent_after_the_commit_is_not_read_before_the_quiet_time_then_committed_once(
        series, table, tmp_path):
    landing = tmp_path / "landing"
    with running_receiver(landing, table, QUIET_S) as receiver:
        first = associate(receiver.port)
        assert [s.Status for s in send(first, series[:11])] == [0] * 11
        first.release()
        pseudonym = _only_pseudonym(table)
        ready = wait_for(lambda: (landing / pseudonym / "READY").exists() and landing / pseudonym / "READY", "READY")
        committed = ready.stat().st_mtime_ns
        seen = plan_tick(scan_landing_zone(landing), None, 10)
        assert [(r.patient_id, r.modality) for r in seen.runs] == [(pseudonym, "radiology")]

        # The quiet time "does not pass" until the test shortens it again: what a tick sees meanwhile
        # is checked without a race against the timer.
        receiver.zone.quiet_s = 3600.0
        second = associate(receiver.port)
        assert send(second, series[11:])[0].Status == 0
        second.release()
        wait_for(lambda: len(receiver.zone.associations) == 2, "the second release")
        timer_rounds_pass(receiver)
        assert [(r.moved, r.duplicates) for r in receiver.zone.associations] == [(11, 0), (1, 0)]
        assert receiver.zone.pending() == [pseudonym] and len(receiver.zone.commits) == 1
        assert len(_ct_files(landing, pseudonym)) == 11 and ready.stat().st_mtime_ns == committed
        scan = scan_landing_zone(landing)
        assert plan_tick(scan, seen.cursor, 10).runs == []  # the drop is not read again, nor requested

        receiver.zone.quiet_s = QUIET_S
        wait_for(lambda: len(receiver.zone.commits) == 2, "the second commit")
        timer_rounds_pass(receiver)
    assert [c.instances for c in receiver.zone.commits] == [11, 12]
    assert len(_ct_files(landing, pseudonym)) == 12 and not (landing / pseudonym / ".intake").exists()
    assert ready.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in _ct_files(landing, pseudonym))
    again = plan_tick(scan_landing_zone(landing), seen.cursor, 10)
    assert [(r.patient_id, r.modality) for r in again.runs] == [(pseudonym, "radiology")]
    assert plan_tick(scan_landing_zone(landing), again.cursor, 10).runs == []


def test_an_aborted_association_commits_nothing(series, table, tmp_path):
    landing = tmp_path / "landing"
    with running_receiver(landing, table, QUIET_S) as receiver:
        assoc = associate(receiver.port)
        assert [s.Status for s in send(assoc, series[:7])] == [0] * 7
        pseudonym = _only_pseudonym(table)
        assert len(list((landing / pseudonym / ".intake").rglob("*.dcm"))) == 7  # staged, hidden
        assoc.abort()
        wait_for(lambda: receiver.zone.associations, "the abort")
        timer_rounds_pass(receiver)
        [record] = receiver.zone.associations
        # The A-ABORT or the closed socket, whichever the receiver reads first.
        assert record.outcome in ("aborted", "connection closed without a release")
        assert (record.moved, record.discarded) == (0, 7)
        assert files_under(landing) == [] and not (landing / pseudonym).exists()
        assert receiver.zone.pending() == [] and list(receiver.zone.commits) == []

        # Sent again, whole, in an association that ends: committed with all 12.
        assoc = associate(receiver.port)
        assert [s.Status for s in send(assoc, series)] == [0] * 12
        assoc.release()
        wait_for(lambda: (landing / pseudonym / "READY").exists(), "READY")
    assert [c.instances for c in receiver.zone.commits] == [12]


def test_a_non_ct_sop_class_is_refused_with_its_reason(series, table, tmp_path, caplog):
    from pynetdicom.sop_class import MRImageStorage

    caplog.set_level(logging.INFO, logger=LOGGER)
    mr = pydicom.dcmread(series[0])
    mr.SOPClassUID, mr.Modality = MRImageStorage, "MR"
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    landing = tmp_path / "landing"
    with running_receiver(landing, table, QUIET_S) as receiver:
        assoc = associate(receiver.port, MRImageStorage)
        [status] = send(assoc, [mr])
        assoc.release()
        wait_for(lambda: receiver.zone.associations, "the release")
    assert status.Status == 0x0122  # Refused: SOP Class Not Supported
    assert status.ErrorComment.startswith("only CT Image Storage is received, not MR Image")
    assert f"instance {mr.SOPInstanceUID} refused (0x0122): only CT Image Storage is received, not MR Image " \
           f"Storage ({MRImageStorage}: not a CT image)" in caplog.text
    assert files_under(landing) == [] and not table.exists()  # no pseudonym made for it either


def test_the_pseudonym_table_is_refused_inside_the_landing_zone_or_artifacts(tmp_path):
    landing, artifacts = tmp_path / "data" / "landing", tmp_path / "data" / "artifacts"
    for table in (landing / "pseudonyms.json", artifacts / "keys" / "pseudonyms.json"):
        with pytest.raises(PseudonymTableError, match="the pseudonym table lies inside the"):
            DicomReceiver(landing, table, protected={"artifacts": artifacts})
    DicomReceiver(landing, tmp_path / "secure" / "pseudonyms.json", protected={"artifacts": artifacts})


def test_a_restart_commits_what_a_stopped_receiver_left_pending_and_drops_unfinished_staging(tmp_path):
    landing = tmp_path / "landing"
    zone = IntakeZone(landing, quiet_s=0.01)
    zone.open("a1")
    zone.open("a2")
    assert zone.stage("a1", "PS01", "1.2.3", "1.2.3.1", b"DICM-1")
    assert zone.stage("a2", "PS02", "1.2.4", "1.2.4.1", b"DICM-2")
    zone.finish("a1")  # PS01 pending; a2 never ends: the process stopped

    restarted = IntakeZone(landing, quiet_s=0.01)
    assert restarted.recover() == (["PS01"], 1)
    assert not (landing / "PS02").exists()
    wait_for(restarted.commit_due, "the pending commit")
    assert (landing / "PS01" / "ct" / "1.2.3.1.dcm").read_bytes() == b"DICM-1"
    assert sorted(p.relative_to(landing).as_posix() for p in files_under(landing)) == [
        "PS01/READY", "PS01/ct/1.2.3.1.dcm"]


def test_python_m_intake_refuses_a_table_in_the_landing_zone_and_otherwise_serves_until_sigterm(
        series, tmp_path):
    landing = tmp_path / "landing"
    command = [sys.executable, "-m", "gcmlm_assets.landing.intake", "--landing", str(landing), "--port", "0",
               "--quiet-s", "0.3"]
    environment = {**os.environ, "GCMLM_INTAKE_PSEUDONYM_TABLE": str(landing / "pseudonyms.json"),
                   "GCMLM_DATA_ROOT": str(tmp_path)}
    refused = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refusing to start" in refused.stderr and "inside the landing zone" in \
        refused.stderr

    environment["GCMLM_INTAKE_PSEUDONYM_TABLE"] = str(tmp_path / "secure" / "pseudonyms.json")
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in process.stderr:  # ends if the process dies
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the receiver did not start"
        assert storescu(port, series[0].parent).returncode == 0
        pseudonym = _only_pseudonym(tmp_path / "secure" / "pseudonyms.json")
        wait_for(lambda: (landing / pseudonym / "READY").exists(), "READY")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert len(_ct_files(landing, pseudonym)) == 12


def test_a_second_series_for_a_patient_is_refused_until_its_ct_folder_is_removed(tmp_path):
    landing = tmp_path / "landing"
    zone = IntakeZone(landing, quiet_s=0.01)
    zone.open("a1")
    assert zone.stage("a1", "PS01", "1.2.3", "1.2.3.1", b"DICM-1")
    zone.open("a2")
    with pytest.raises(IntakeRefusal, match=r"patient PS01 already holds series 1\.2\.3 \(one CT series per drop"):
        zone.stage("a2", "PS01", "1.2.9", "1.2.9.1", b"DICM-9")  # while a1 stages it
    zone.finish("a1")
    with pytest.raises(IntakeRefusal, match=r"already holds series 1\.2\.3"):
        zone.stage("a2", "PS01", "1.2.9", "1.2.9.1", b"DICM-9")  # once it is released
    wait_for(zone.commit_due, "the commit")
    with pytest.raises(IntakeRefusal, match=r"already holds series 1\.2\.3"):
        zone.stage("a2", "PS01", "1.2.9", "1.2.9.1", b"DICM-9")  # once it is in ct/
    shutil.rmtree(landing / "PS01" / "ct")
    assert zone.stage("a2", "PS01", "1.2.9", "1.2.9.1", b"DICM-9")
    zone.finish("a2")
    wait_for(zone.commit_due, "the commit")
    assert [p.name for p in (landing / "PS01" / "ct").iterdir()] == ["1.2.9.1.dcm"]


def test_a_series_for_a_patient_whose_ct_is_split_into_timepoints_is_refused(tmp_path):
    landing = tmp_path / "landing"
    (landing / "PS01" / "ct" / "2024-01-10").mkdir(parents=True)
    (landing / "PS01" / "ct" / "2024-01-10" / "ct.nii.gz").write_bytes(b"scan 1")
    (landing / "PS01" / "ct" / "2024-06-02").mkdir()  # empty: no scan yet, named in no refusal
    zone = IntakeZone(landing, quiet_s=0.01)
    zone.open("a1")
    with pytest.raises(IntakeRefusal, match=r"patient PS01's ct/ is split into timepoint folders \(2024-01-10\): the "
                                            r"receiver writes a series only directly into ct/.*copy this scan into "
                                            r".*/PS01/ct/<timepoint>/ by hand"):
        zone.stage("a1", "PS01", "1.2.3", "1.2.3.1", b"DICM-1")
    zone.finish("a1")
    assert sorted(p.relative_to(landing).as_posix() for p in files_under(landing)) == ["PS01/ct/2024-01-10/ct.nii.gz"]
    assert zone.pending() == []
    # an empty sub-folder alone does not split ct/: the series is written directly into it
    (landing / "PS01" / "ct" / "2024-01-10" / "ct.nii.gz").unlink()
    zone.open("a2")
    assert zone.stage("a2", "PS01", "1.2.3", "1.2.3.1", b"DICM-1")
    zone.finish("a2")
    wait_for(zone.commit_due, "the commit")
    assert (landing / "PS01" / "ct" / "1.2.3.1.dcm").read_bytes() == b"DICM-1"
