"""The DICOM receiver's tests: identifying source instances, a receiver on a free loopback port,
pynetdicom's own SCU (its API and its storescu command), and polling for what the receiver does."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gcmlm_assets.landing.intake.receiver import DicomReceiver
from gcmlm_assets_tests.support.phi_search import NEEDLES, PATIENT_KEYWORDS
from gcmlm_assets_tests.support.radiology.ct import CT_NAME, ct_crop, write_dicom_series

AE_TITLE = "GCMLM"
# Identifying values beyond phi_search's, in places the profile must reach: addresses, other ids,
# physicians and operators, a station, a sequence item, a private attribute.
MORE_KEYWORDS = {
    "PatientAddress": "ZZSTREET 7 ZZTOWN",
    "OtherPatientIDs": "ZZOTHERID55",
    "ReferringPhysicianName": "ZZREFDOC^ZZPAUL",
    "OperatorsName": "ZZOPERATOR^ZZANN",
    "InstitutionAddress": "ZZHOSPITAL ROAD 1",
    "StationName": "ZZSTATION9",
    "StudyDescription": "ZZSTUDY OF ZZSECRETNAME",
}
NESTED_ACCESSION = "ZZNESTEDACC4"
PRIVATE_VALUE = "ZZPRIVATEID77"
EXTRA_NEEDLES = [value.encode() for value in MORE_KEYWORDS.values()] + [
    b"ZZSTREET", b"ZZOTHERID55", b"ZZREFDOC", b"ZZOPERATOR", b"ZZHOSPITAL ROAD", b"ZZSTATION9",
    NESTED_ACCESSION.encode(), PRIVATE_VALUE.encode()]
ALL_NEEDLES = NEEDLES + EXTRA_NEEDLES


def held_back_values_in(data: bytes) -> list[str]:
    upper = data.upper()
    return sorted({needle.decode() for needle in ALL_NEEDLES if needle.upper() in upper})


def identifying_series(test_data: Path, folder: Path) -> list[Path]:
    """The 12-slice CT crop as a DICOM series carrying every identifying value above."""
    paths = write_dicom_series(ct_crop(test_data / "ct" / "totalsegmentator" / CT_NAME), folder)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in {**PATIENT_KEYWORDS, **MORE_KEYWORDS}.items():
            setattr(ds, keyword, value)
        request = Dataset()
        request.AccessionNumber = NESTED_ACCESSION
        request.RequestingPhysician = "ZZREFDOC^ZZPAUL"
        ds.RequestAttributesSequence = Sequence([request])
        block = ds.private_block(0x0011, "ZZ HOSPITAL PRIVATE", create=True)
        block.add_new(0x01, "LO", PRIVATE_VALUE)
        ds.save_as(path, enforce_file_format=True)
    return paths


@contextlib.contextmanager
def running_receiver(landing: Path, table: Path, quiet_s: float, **options) -> Iterator[DicomReceiver]:
    """A receiver on a free loopback port, stopped (its quiet timer joined) on the way out."""
    receiver = DicomReceiver(landing, table, host="127.0.0.1", port=0, ae_title=AE_TITLE, quiet_s=quiet_s,
                             **options)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 15.0):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def timer_rounds_pass(receiver: DicomReceiver, rounds: int = 2) -> None:
    """Wait until the quiet timer has looked at least `rounds` more times (a whole look since now)."""
    start = receiver.timer_rounds
    wait_for(lambda: receiver.timer_rounds >= start + rounds, f"{rounds} rounds of the quiet timer")


def associate(port: int, *sop_classes: str):
    """An association from pynetdicom's SCU to the receiver on loopback."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.presentation import build_context

    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = [build_context(uid) for uid in (sop_classes or (CTImageStorage,))]
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established, "the receiver did not accept the association"
    return assoc


def send(assoc, paths: list[Path]) -> list[Dataset]:
    """C-STORE each file; the status datasets the receiver answered."""
    return [assoc.send_c_store(path) for path in paths]


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    """pynetdicom's storescu command sending `path` (a file or a folder) in one association."""
    return subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), str(path),
                           "-aec", AE_TITLE, "-v"], capture_output=True, text=True, timeout=60)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
