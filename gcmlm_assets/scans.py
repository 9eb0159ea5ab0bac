"""CT scans of a patient: timepoints, their order, and the partition key of each scan (no Dagster).

A drop's `ct/` holds either one scan (its files directly in `ct/`: one timepoint, as always) or one
folder per timepoint, `ct/<timepoint>/`, named by scan date (ISO `YYYY-MM-DD`) or by a label
(`baseline`, `post_nact`, ...), each with its optional reference mask in `ct_label/<timepoint>/`.

Each scan is one partition of the radiology assets (`ct_scans`): the patient id for a drop's only
scan directly in `ct/`, so that single-scan drops keep their partitions, folders and files, and
`<patient>@<timepoint>` for a timepoint folder. `@` cannot occur in a patient id (patients.py) nor
in a timepoint name, so a key always splits back into the two.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.patients import patient_id_problem

SEPARATOR = "@"
CT_FOLDER = "ct"
REFERENCE_FOLDER = "ct_label"
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# Labels in treatment order. Only these: the order of any other name (`pre_treatment`?) would be a
# guess, and the delta block's sign rests on it.
LABEL_ORDER = ("baseline", "staging", "pre_nact", "post_nact", "preoperative", "postoperative", "follow_up")
# A repeat of a label, `<label>_<n>` (n = 1 to 999, no leading zero), comes right after the label
# itself, which counts as n = 0: follow_up, follow_up_1, follow_up_2. No `_0`, no `_01`: two names
# for one place in the order.
LABEL = re.compile(rf"(?P<base>{'|'.join(LABEL_ORDER)})(?:_(?P<repeat>[1-9][0-9]{{0,2}}))?")
NAMING_RULE = ("name a timepoint folder by the scan's date (ISO YYYY-MM-DD, e.g. 2024-03-15), or by one of the "
               f"labels {', '.join(LABEL_ORDER)} (in this order), optionally followed by _<n> (1 to 999) for "
               "a repeat, which comes right after the label (follow_up, follow_up_1, follow_up_2)")


class InvalidScanKey(ValueError):
    pass


@dataclass(frozen=True)
class ScanKey:
    patient_id: str
    timepoint: str | None  # None: the drop's only scan, directly in ct/

    def __str__(self) -> str:
        return scan_key(self.patient_id, self.timepoint)


def timepoint_problem(name: str) -> str | None:
    """Why `name` is not a timepoint folder's name, or None when it is."""
    if ISO_DATE.fullmatch(name):
        try:
            dt.date.fromisoformat(name)
        except ValueError:
            return f"{name!r} is not a calendar date"
        return None
    if LABEL.fullmatch(name):
        return None
    if re.fullmatch(r"[a-z][a-z0-9_]*", name):
        return f"{name!r} is not a known timepoint label (its order among the scans would be a guess): {NAMING_RULE}"
    return f"{name!r} is not a timepoint name: {NAMING_RULE}"


def scan_key(patient_id: str, timepoint: str | None) -> str:
    """The partition key of a patient's scan (see the module's docstring)."""
    return patient_id if timepoint is None else f"{patient_id}{SEPARATOR}{timepoint}"


def parse_scan_key(key: str) -> ScanKey:
    """The patient and timepoint of a scan's partition key; InvalidScanKey naming the problem."""
    patient_id, sep, timepoint = key.partition(SEPARATOR)
    problem = patient_id_problem(patient_id)
    if problem is None and sep:
        problem = timepoint_problem(timepoint)
    if problem:
        raise InvalidScanKey(f"invalid scan key {key!r}: {problem}")
    return ScanKey(patient_id, timepoint if sep else None)


def scan_key_problem(key: str) -> str | None:
    try:
        parse_scan_key(key)
    except InvalidScanKey as error:
        return str(error)
    return None


def timepoint_date(timepoint: str | None) -> dt.date | None:
    """The scan date a timepoint's name gives (an ISO-dated folder), else None."""
    if timepoint is not None and ISO_DATE.fullmatch(timepoint):
        return dt.date.fromisoformat(timepoint)
    return None


def _timepoint_sort_key(timepoint: str | None) -> tuple:
    if timepoint is None:
        return (0,)
    date = timepoint_date(timepoint)
    if date is not None:
        return (1, date.isoformat())
    label = LABEL.fullmatch(timepoint)
    if label is None:
        raise ValueError(timepoint_problem(timepoint))
    return (2, LABEL_ORDER.index(label["base"]), int(label["repeat"] or 0))


def order_timepoints(timepoints: Iterable[str | None]) -> list[str | None]:
    """Timepoints oldest first: dates in time order; labels in LABEL_ORDER, each label's repeats
    (`_<n>`) right after it by n. ValueError for a name that is neither (`timepoint_problem`)."""
    return sorted(timepoints, key=_timepoint_sort_key)


def mixed_naming_problem(timepoints: Iterable[str]) -> str | None:
    """A patient's timepoints are all dates or all labels: mixed, their order is unknown."""
    names = list(timepoints)
    dated = sorted(t for t in names if timepoint_date(t) is not None)
    labelled = sorted(t for t in names if timepoint_date(t) is None)
    if dated and labelled:
        return (f"timepoints mix dates ({', '.join(dated)}) and labels ({', '.join(labelled)}): their order is "
                "unknown; name them all by date or all by label")
    return None


def patient_scans(keys: Iterable[str]) -> dict[str, list[ScanKey]]:
    """Scan keys grouped by patient, each patient's oldest first; keys that do not parse are left out.

    A patient with timepoint keys (`P@tp`) has no scan under its bare key `P`: that is a stale
    single scan (the drop's ct/ was split into timepoints since) still in the partition set, whose
    date is unknown, so it is left out rather than taken for the baseline or the delta's first scan."""
    grouped: dict[str, list[ScanKey]] = {}
    for key in keys:
        try:
            scan = parse_scan_key(key)
        except InvalidScanKey:
            continue
        grouped.setdefault(scan.patient_id, []).append(scan)
    order = {}
    for patient_id, scans in grouped.items():
        by_timepoint = {s.timepoint: s for s in scans}
        if len(by_timepoint) > 1:
            by_timepoint.pop(None, None)
        order[patient_id] = [by_timepoint[t] for t in order_timepoints(by_timepoint)]
    return order


def chosen_scan(scans: Sequence[ScanKey], choice: str = "baseline") -> ScanKey | None:
    """The scan that feeds a patient's single-scan radiology block: `choice` is `baseline` (the
    timepoint labelled so, else the oldest), `first`, `last`, or a timepoint's name (None when the
    patient has no such timepoint). `scans` oldest first."""
    if not scans:
        return None
    if choice == "first":
        return scans[0]
    if choice == "last":
        return scans[-1]
    named = [s for s in scans if s.timepoint == choice]
    if named:
        return named[0]
    return scans[0] if choice == "baseline" else None


@dataclass(frozen=True)
class DropScan:
    """One scan of a patient's drop: its CT folder and its reference-mask folder, relative to the drop."""

    timepoint: str | None
    ct_folder: str  # "ct" or "ct/<timepoint>"
    reference_folder: str  # "ct_label" or "ct_label/<timepoint>"


@dataclass
class DropScans:
    scans: list[DropScan]
    problems: list[tuple[str, str]]  # (folder relative to the drop, reason): each refused, the others go on


def scan_folders(timepoint: str | None) -> tuple[str, str]:
    """(CT folder, reference folder) of a timepoint, relative to the patient's drop."""
    if timepoint is None:
        return CT_FOLDER, REFERENCE_FOLDER
    return f"{CT_FOLDER}/{timepoint}", f"{REFERENCE_FOLDER}/{timepoint}"


def _visible(folder: Path) -> tuple[list[str], list[str]]:
    """(file names, folder names) directly in `folder`, hidden ones left out; ([], []) when absent."""
    files, folders = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                (folders if entry.is_dir(follow_symlinks=True) else files).append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return sorted(files), sorted(folders)


def holds_files(folder: Path) -> bool:
    """Whether a visible file lies anywhere under `folder` (hidden files and folders left out)."""
    for _, folders, files in os.walk(folder, followlinks=True):
        if any(not name.startswith(".") for name in files):
            return True
        folders[:] = [name for name in folders if not name.startswith(".")]
    return False


def list_drop_scans(drop: str | os.PathLike) -> DropScans:
    """The scans of a patient's drop, and each part of `ct/` or `ct_label/` refused with its reason.

    Files directly in `ct/` are the drop's only scan (sub-folders holding files beside them are
    refused: which is the scan would be a guess; empty ones are nothing). Otherwise every sub-folder
    of `ct/` is a timepoint; a badly named one is refused, the others go on; an empty one is no scan
    yet; one whose files lie only in sub-folders of its own (a nested export) is refused. Timepoints
    that mix dates and labels are all refused (their order is unknown)."""
    drop = Path(drop)
    ct_files, ct_folders = _visible(drop / CT_FOLDER)
    label_files, label_folders = _visible(drop / REFERENCE_FOLDER)
    problems: list[tuple[str, str]] = []
    if ct_files:
        # Only with files directly in ct/: a walk of its sub-folders, which are then rare.
        filled = [name for name in ct_folders if holds_files(drop / CT_FOLDER / name)]
        if filled:
            problems.append((CT_FOLDER, f"holds both the files of one scan and sub-folders ({', '.join(filled)}):"
                                        " put each scan in a timepoint folder ct/<timepoint>/"))
            return DropScans([], problems)
        if label_folders:
            problems.append((REFERENCE_FOLDER, f"has timepoint folders ({', '.join(label_folders)}) but ct/ holds "
                                               "one scan directly: put its mask directly in ct_label/"))
        return DropScans([DropScan(None, *scan_folders(None))], problems)
    timepoints = []
    for name in ct_folders:
        problem = timepoint_problem(name)
        if problem:
            problems.append((f"{CT_FOLDER}/{name}", problem))
            continue
        files, folders = _visible(drop / CT_FOLDER / name)
        if files:
            timepoints.append(name)
        elif any(holds_files(drop / CT_FOLDER / name / inner) for inner in folders):
            problems.append((f"{CT_FOLDER}/{name}", f"holds no files directly, only sub-folders ({', '.join(folders)}):"
                                                    f" the scan's files must lie directly in ct/{name}/"))
    mixed = mixed_naming_problem(timepoints)
    if mixed:
        problems.append((CT_FOLDER, mixed))
        return DropScans([], problems)
    if label_files and ct_folders:
        problems.append((REFERENCE_FOLDER, "holds files, but the CT is split into timepoint folders: put each "
                                           "scan's mask in ct_label/<timepoint>/"))
    for name in label_folders:
        if name not in ct_folders:
            problems.append((f"{REFERENCE_FOLDER}/{name}", f"a reference mask for timepoint {name!r}, which has "
                                                           "no CT folder ct/" + name + "/"))
    scans = [DropScan(t, *scan_folders(t)) for t in order_timepoints(timepoints)]
    return DropScans(scans, problems)
