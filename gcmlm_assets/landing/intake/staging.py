"""Received instances on their way into a landing drop (no Dagster, no networking).

Each association stages its de-identified instances in its own hidden folder inside the patient's
drop, `<landing>/<pseudonym>/.intake/<association>/<SOPInstanceUID>.dcm` (same filesystem, so every
move is a rename; hidden, so neither the landing sensor nor `ct_image` sees it). Then:

- released association: its instances are renamed into `<pseudonym>/.intake/released/`, still
  hidden; an instance already there or in `ct/` (same SOPInstanceUID) is dropped. The folder marks
  the patient pending, so a restart still commits it;
- aborted or broken association: its staged instances are deleted, nothing of it is released
  (the sender re-sends; what earlier released associations delivered stays pending);
- `commit_due`: a pending patient with no open association that has sent it instances, and no
  instance received, moved or discarded for `quiet_s`, is committed: `READY` removed, the released
  instances renamed into `ct/`, `READY` written, `.intake/released/` removed, in that order.

So `ct/` changes only while `READY` is absent, and the landing sensor's contract holds for a patient
sent more after a commit: whenever `READY` is there, it is newer than every file in the drop. Had the
released instances gone into `ct/` at once, under the earlier `READY`, the next tick would have seen a
changed series and requested `ct_image` before the quiet time, maybe on part of the series. (Removing
`READY` at the release instead would show a drop already analysed as an unfinished upload for the whole
quiet time; this way it is not ready only for the few renames of the commit.)

A drop holds one CT series: an instance of another series than the one the patient's `ct/` or
`.intake/released/` holds (or an open association is staging) is refused; remove `<pseudonym>/ct/` to
replace a series. The receiver writes only directly into `ct/`: an instance for a patient whose `ct/`
is split into timepoint folders (`ct/<timepoint>/`, gcmlm_assets/scans.py) is refused too, since
files beside those folders would refuse the patient's whole CT.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gcmlm_assets.landing.intake.deidentify import IntakeRefusal
from gcmlm_assets.landing.scan import CT_FOLDER, READY_MARKER
from gcmlm_assets.scans import holds_files
from gcmlm_assets.storage import atomic_write_bytes

STAGING_FOLDER = ".intake"
RELEASED_FOLDER = "released"  # inside STAGING_FOLDER: released, not yet committed (the patient is pending)
INSTANCE_SUFFIX = ".dcm"
RECORDS_KEPT = 1000  # recent commits and associations, for the log and the tests


@dataclass
class OpenAssociation:
    name: str
    staged: dict[str, tuple[str, Path]] = field(default_factory=dict)  # SOPInstanceUID -> (pseudonym, file)
    series: dict[str, str] = field(default_factory=dict)  # pseudonym -> SeriesInstanceUID
    duplicates: int = 0


@dataclass(frozen=True)
class AssociationRecord:
    name: str
    outcome: str  # "released" or why it was discarded
    moved: int  # instances released (renamed into .intake/released/, into ct/ at the commit)
    duplicates: int  # instances already released or in ct/ (or sent twice), not written again
    discarded: int  # staged instances deleted with an aborted association
    patients: tuple[str, ...]


@dataclass(frozen=True)
class CommitRecord:
    pseudonym: str
    instances: int  # files in ct/ at the commit
    last_activity: float  # monotonic seconds
    committed_at: float


class IntakeZone:
    """The receiver's state; every method is safe to call from the associations' threads."""

    def __init__(self, landing_root: str | os.PathLike, quiet_s: float):
        self.root = Path(landing_root)
        self.quiet_s = float(quiet_s)
        self._lock = threading.Lock()
        self._open: dict[str, OpenAssociation] = {}
        self._pending: set[str] = set()
        self._last_activity: dict[str, float] = {}
        self._series: dict[str, str] = {}  # pseudonym -> the series in its ct/ (read once)
        self.associations: collections.deque[AssociationRecord] = collections.deque(maxlen=RECORDS_KEPT)
        self.commits: collections.deque[CommitRecord] = collections.deque(maxlen=RECORDS_KEPT)

    # ------------------------------------------------------------ paths

    def drop(self, pseudonym: str) -> Path:
        return self.root / pseudonym

    def _staging(self, pseudonym: str, association: str) -> Path:
        return self.drop(pseudonym) / STAGING_FOLDER / association

    def _released(self, pseudonym: str) -> Path:
        return self.drop(pseudonym) / STAGING_FOLDER / RELEASED_FOLDER

    def _delivered(self, pseudonym: str, sop_uid: str) -> bool:
        name = sop_uid + INSTANCE_SUFFIX
        return (self._released(pseudonym) / name).exists() or (self.drop(pseudonym) / CT_FOLDER / name).exists()

    # ------------------------------------------------------------ associations

    def open(self, association: str) -> None:
        if association == RELEASED_FOLDER:
            raise ValueError(f"{association!r} names the released instances' folder, not an association")
        with self._lock:
            self._open[association] = OpenAssociation(association)

    def stage(self, association: str, pseudonym: str, series_uid: str, sop_uid: str, data: bytes) -> bool:
        """Stage one de-identified instance; False when it is a duplicate (not written)."""
        with self._lock:
            record = self._open[association]
            self._last_activity[pseudonym] = time.monotonic()
            held = self._series_held(pseudonym)
            if held is not None and held != series_uid:
                raise IntakeRefusal(f"patient {pseudonym} already holds series {held} (one CT series per drop; "
                                    f"remove {self.drop(pseudonym) / CT_FOLDER} to replace it)")
            if held is None:  # nothing delivered directly into ct/: it may be split into timepoints
                self._refuse_timepoint_folders(pseudonym)
            if sop_uid in record.staged or self._delivered(pseudonym, sop_uid):
                record.duplicates += 1
                return False
            record.series[pseudonym] = series_uid
            path = self._staging(pseudonym, association) / (sop_uid + INSTANCE_SUFFIX)
            record.staged[sop_uid] = (pseudonym, path)
        # Written outside the lock: each association writes only into its own folder.
        try:
            atomic_write_bytes(path, data)
        except BaseException:
            with self._lock:
                del record.staged[sop_uid]
            raise
        return True

    def _refuse_timepoint_folders(self, pseudonym: str) -> None:
        ct = self.drop(pseudonym) / CT_FOLDER
        try:
            with os.scandir(ct) as entries:
                folders = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return
        folders = [name for name in folders if holds_files(ct / name)]  # empty ones are nothing (scans.py)
        if folders:
            raise IntakeRefusal(f"patient {pseudonym}'s ct/ is split into timepoint folders ({', '.join(folders)}): "
                                "the receiver writes a series only directly into ct/, where beside them it would "
                                f"refuse the patient's whole CT; copy this scan into {ct}/<timepoint>/ by hand "
                                "(see the landing zone's timepoints) instead of sending it")

    def _series_held(self, pseudonym: str) -> str | None:
        for other in self._open.values():
            if pseudonym in other.series:
                return other.series[pseudonym]
        released, ct = self._released(pseudonym), self.drop(pseudonym) / CT_FOLDER
        if not released.is_dir() and not ct.is_dir():  # never delivered, or ct/ removed to replace the series
            self._series.pop(pseudonym, None)
            return None
        if pseudonym not in self._series:
            first = next((p for folder in (released, ct) if folder.is_dir()
                          for p in sorted(folder.glob("*" + INSTANCE_SUFFIX)) if not p.name.startswith(".")), None)
            if first is None:
                return None
            import pydicom

            self._series[pseudonym] = str(pydicom.dcmread(first, stop_before_pixels=True,
                                                          specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        return self._series[pseudonym]

    def finish(self, association: str) -> AssociationRecord:
        """A released association: its instances into .intake/released/, its patients pending."""
        with self._lock:
            record = self._open.pop(association)
            moved: collections.Counter[str] = collections.Counter()
            duplicates = record.duplicates
            for sop_uid, (pseudonym, path) in sorted(record.staged.items()):
                if self._delivered(pseudonym, sop_uid):  # delivered meanwhile by another association
                    path.unlink()
                    duplicates += 1
                    continue
                released = self._released(pseudonym)
                released.mkdir(exist_ok=True)
                os.replace(path, released / path.name)
                moved[pseudonym] += 1
            now = time.monotonic()
            for pseudonym in {p for p, _ in record.staged.values()}:
                self._last_activity[pseudonym] = now
                self._remove_staging(pseudonym, association)
                if moved[pseudonym]:
                    self._series[pseudonym] = record.series[pseudonym]
                    self._pending.add(pseudonym)
            result = AssociationRecord(association, "released", sum(moved.values()), duplicates, 0,
                                       tuple(sorted(moved)))
            self.associations.append(result)
            return result

    def discard(self, association: str, reason: str) -> AssociationRecord | None:
        """An aborted or broken association: its staged instances are deleted."""
        with self._lock:
            record = self._open.pop(association, None)
            if record is None:
                return None  # already released
            now = time.monotonic()
            patients = sorted({p for p, _ in record.staged.values()})
            for pseudonym in patients:
                self._last_activity[pseudonym] = now
                self._remove_staging(pseudonym, association)
            result = AssociationRecord(association, reason, 0, record.duplicates, len(record.staged),
                                       tuple(patients))
            self.associations.append(result)
            return result

    def _remove_staging(self, pseudonym: str, association: str) -> None:
        shutil.rmtree(self._staging(pseudonym, association), ignore_errors=True)
        drop = self.drop(pseudonym)
        with contextlib.suppress(OSError):  # only when nothing else is there
            (drop / STAGING_FOLDER).rmdir()
            drop.rmdir()

    # ------------------------------------------------------------ commits

    def commit_due(self) -> list[CommitRecord]:
        """Commit every pending patient that is quiet and has no open association: its released
        instances into ct/ while READY is absent, then READY."""
        committed = []
        with self._lock:
            busy = {p for record in self._open.values() for p in record.series}
            now = time.monotonic()
            for pseudonym in sorted(self._pending - busy):
                last = self._last_activity.get(pseudonym, 0.0)
                if now - last < self.quiet_s:
                    continue
                drop, released = self.drop(pseudonym), self._released(pseudonym)
                ct = drop / CT_FOLDER
                arrived = sorted(released.glob("*" + INSTANCE_SUFFIX)) if released.is_dir() else []
                if arrived:
                    # ct/ changes only while READY is absent: no tick sees new content under an old READY.
                    with contextlib.suppress(FileNotFoundError):
                        (drop / READY_MARKER).unlink()
                    ct.mkdir(exist_ok=True)
                    for path in arrived:
                        os.replace(path, ct / path.name)
                instances = sum(1 for p in ct.iterdir() if p.name.endswith(INSTANCE_SUFFIX)) if ct.is_dir() else 0
                if instances:  # else the operator removed ct/ meanwhile: nothing to commit
                    atomic_write_bytes(drop / READY_MARKER, f"DICOM intake: {instances} instances\n".encode())
                # After READY: a commit that stopped half-way is redone at the restart (`recover`).
                with contextlib.suppress(OSError):
                    released.rmdir()
                with contextlib.suppress(OSError):
                    (drop / STAGING_FOLDER).rmdir()
                self._pending.discard(pseudonym)
                if not instances:
                    continue
                record = CommitRecord(pseudonym, instances, last, now)
                self.commits.append(record)
                committed.append(record)
        return committed

    def recover(self) -> tuple[list[str], int]:
        """At start: patients left pending by an earlier run (committed after `quiet_s`), and the
        staged instances of associations it did not finish (deleted: never released)."""
        pending, discarded = [], 0
        if not self.root.is_dir():
            return pending, discarded
        now = time.monotonic()
        with self._lock, os.scandir(self.root) as entries:
            for entry in entries:
                staging = Path(entry.path) / STAGING_FOLDER
                if not entry.is_dir(follow_symlinks=False) or not staging.is_dir():
                    continue
                for leftover in staging.iterdir():
                    if leftover.is_dir() and leftover.name != RELEASED_FOLDER:
                        discarded += sum(1 for _ in leftover.iterdir())
                        shutil.rmtree(leftover, ignore_errors=True)
                if (staging / RELEASED_FOLDER).is_dir():
                    self._pending.add(entry.name)
                    self._last_activity[entry.name] = now
                    pending.append(entry.name)
                else:
                    with contextlib.suppress(OSError):  # a folder the receiver made for nothing
                        staging.rmdir()
                        os.rmdir(entry.path)
        return sorted(pending), discarded

    def last_activity(self, pseudonym: str) -> float | None:
        """When (monotonic seconds) an instance of the patient was last received, moved or discarded."""
        with self._lock:
            return self._last_activity.get(pseudonym)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)
