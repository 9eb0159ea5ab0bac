"""The DICOM storage service (C-STORE SCP) that fills the landing zone; pynetdicom, no Dagster.

Every storage SOP class may be offered, so that a refused instance gets a reason back (a failure
status with an ErrorComment) instead of an unexplained rejected presentation context: CT Image
Storage is stored, in any transfer syntax (compressed ones as received); anything else is refused
with 0x0122 (SOP class not supported) and an instance this receiver will not take (no PatientID,
burned-in annotation, a localizer, another series than the patient's) with 0xC000 (cannot
understand). The reason is also logged, never with a patient's real id or name.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import threading
import time
from pathlib import Path

from gcmlm_assets.landing.intake.deidentify import IntakeRefusal, content_refusal, deidentify, sop_class_refusal
from gcmlm_assets.landing.intake.pseudonyms import PseudonymTable, check_table_location
from gcmlm_assets.landing.intake.staging import IntakeZone

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
ERROR_COMMENT_MAX = 64  # (0000,0902) ErrorComment is LO


def _status(code: int, comment: str = ""):
    from pydicom.dataset import Dataset

    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return status


class DicomReceiver:
    """A C-STORE SCP writing de-identified CT instances into the landing zone under pseudonyms.

    `protected` names the folders the pseudonym table must stay out of (the landing zone is always
    one). `start()` serves in background threads, `port` is the one bound (pass 0 for a free one),
    `stop()` aborts open associations (their instances are discarded) and stops the quiet timer.
    """

    def __init__(self, landing_root: str | os.PathLike, table_path: str | os.PathLike, *, host: str = "127.0.0.1",
                 port: int = 11112, ae_title: str = "GCMLM", quiet_s: float = 60.0,
                 calling_ae_titles: tuple[str, ...] = (), protected: dict[str, Path] | None = None):
        self.landing_root = Path(landing_root)
        check_table_location(Path(table_path), {"landing zone": self.landing_root, **(protected or {})})
        if quiet_s <= 0:
            raise ValueError(f"quiet time must be positive, got {quiet_s}")
        self.table = PseudonymTable(table_path)
        self.zone = IntakeZone(self.landing_root, quiet_s)
        self.host, self.requested_port, self.ae_title = host, int(port), ae_title
        self.calling_ae_titles = tuple(calling_ae_titles)
        self._names: dict[int, str] = {}
        self._counter = itertools.count(1)
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._ae = None
        self._server = None
        self.timer_rounds = 0  # how many times the quiet timer has looked (tests wait on it)

    # ------------------------------------------------------------ service

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self.requested_port

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import CTImageStorage

        self.landing_root.mkdir(parents=True, exist_ok=True)
        pending, discarded = self.zone.recover()
        if pending or discarded:
            log.info("resumed: %d patient(s) pending a READY commit (%s); %d staged instance(s) of unfinished "
                     "associations deleted", len(pending), ", ".join(pending[:10]), discarded)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax != CTImageStorage:
                ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        if self.calling_ae_titles:
            ae.require_calling_aet = list(self.calling_ae_titles)
        handlers = [(evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_C_STORE, self._on_c_store),
                    (evt.EVT_RELEASED, self._on_released), (evt.EVT_ABORTED, self._on_aborted),
                    (evt.EVT_CONN_CLOSE, self._on_closed)]
        self._server = ae.start_server((self.host, self.requested_port), block=False, evt_handlers=handlers)
        self._ae = ae
        self._timer = threading.Thread(target=self._commit_loop, name="intake-quiet-timer", daemon=True)
        self._timer.start()
        log.info("DICOM receiver %s listening on %s:%d; landing zone %s; READY after %.1f s of quiet",
                 self.ae_title, self.host, self.port, self.landing_root, self.zone.quiet_s)

    def stop(self) -> None:
        self._stop.set()
        if self._ae is not None:
            self._ae.shutdown()
        if self._timer is not None:
            self._timer.join()
        self._ae = self._server = self._timer = None

    def serve_until(self, stop: threading.Event) -> None:
        """Serve until `stop` is set (the command line sets it on SIGINT/SIGTERM)."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def _commit_loop(self) -> None:
        interval = max(0.02, min(1.0, self.zone.quiet_s / 4))
        while not self._stop.wait(interval):
            self.timer_rounds += 1
            try:
                for commit in self.zone.commit_due():
                    log.info("patient %s committed: READY written, %d instance(s) in ct/", commit.pseudonym,
                             commit.instances)
            except OSError as error:  # a full or unwritable disk: retried on the next round
                log.error("READY commit failed (retried): %s", error)

    # ------------------------------------------------------------ events

    def _name(self, event) -> str:
        return self._names[id(event.assoc)]

    def _on_accepted(self, event) -> None:
        name = f"a{time.strftime('%Y%m%dT%H%M%S')}-{next(self._counter)}"
        self._names[id(event.assoc)] = name
        self.zone.open(name)
        log.info("association %s from %s (%s) accepted", name, event.assoc.requestor.ae_title,
                 event.assoc.requestor.address)

    def _on_c_store(self, event):
        name = self._name(event)
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_instance = str(event.request.AffectedSOPInstanceUID)
        reason = sop_class_refusal(sop_class)
        if reason is not None:
            log.warning("association %s: instance %s refused (0x%04X): %s", name, sop_instance,
                        STATUS_SOP_CLASS_NOT_SUPPORTED, reason)
            return _status(STATUS_SOP_CLASS_NOT_SUPPORTED, reason)
        try:
            ds = event.dataset
            reason = content_refusal(ds)
            if reason is not None:
                raise IntakeRefusal(reason)
            pseudonym = self.table.pseudonym_for(str(ds.PatientID), str(ds.get("IssuerOfPatientID", "") or ""))
            series = str(ds.SeriesInstanceUID)
            deidentify(ds, pseudonym)
            written = self.zone.stage(name, pseudonym, series, str(ds.SOPInstanceUID),
                                      self._file_bytes(ds, event.context.transfer_syntax))
        except IntakeRefusal as error:
            log.warning("association %s: instance %s refused (0x%04X): %s", name, sop_instance,
                        STATUS_CANNOT_UNDERSTAND, error)
            return _status(STATUS_CANNOT_UNDERSTAND, str(error))
        except Exception as error:  # noqa: BLE001 - the sender gets a failure, the receiver goes on
            log.exception("association %s: instance %s could not be stored", name, sop_instance)
            return _status(STATUS_PROCESSING_FAILURE, f"{type(error).__name__}: not stored")
        if not written:
            log.info("association %s: instance %s of %s is a duplicate, not written again", name, sop_instance,
                     pseudonym)
        return _status(STATUS_SUCCESS)

    @staticmethod
    def _file_bytes(ds, transfer_syntax) -> bytes:
        """A DICOM file (with its own file meta, naming no sender) in the syntax it came in, or
        explicit little endian for the uncompressed ones."""
        from pydicom import dcmwrite
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, UID

        syntax = UID(str(transfer_syntax))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = syntax if syntax.is_compressed else ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()

    def _on_released(self, event) -> None:
        name = self._names.pop(id(event.assoc), None)
        if name is None:
            return
        record = self.zone.finish(name)
        log.info("association %s released: %d instance(s) for %s, into ct/ at the commit; %d duplicate(s) "
                 "not written",
                 name, record.moved, ", ".join(record.patients) or "no patient", record.duplicates)

    def _on_aborted(self, event) -> None:
        self._discard(event, "aborted")

    def _on_closed(self, event) -> None:
        self._discard(event, "connection closed without a release")

    def _discard(self, event, reason: str) -> None:
        name = self._names.pop(id(event.assoc), None)
        if name is None:
            return
        record = self.zone.discard(name, reason)
        if record is not None:
            log.warning("association %s %s: its %d staged instance(s) deleted, nothing of it committed (%s)",
                        name, reason, record.discarded, ", ".join(record.patients) or "no patient")
