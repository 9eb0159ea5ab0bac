"""Landing-zone scanning and change planning (no Dagster).

A tick lists the landing zone with `os.scandir` and `stat` only (names, sizes,
times; no file is opened), fingerprints each ready patient's modalities and
decides which (patient, modality) pairs need a run.

The cursor stays small however many patients there are: it holds a time
watermark and the fingerprints of the few drops touched at or after it. A drop
whose newest time (mtime or ctime of its files, its folders, READY and the patient
folder itself) is older
than the watermark was handled by an earlier tick; ctime moves on every write,
rename or copy, even when a copy preserves mtimes, so a change always lifts a
drop above the watermark again. The watermark never passes the scan's start
time minus `SETTLE_NS`: a file written while the scan runs (or on a filesystem
with coarse timestamps) stays above it and is seen by the next tick.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gcmlm_assets.patients import patient_id_problem

READY_MARKER = "READY"
CLINICAL_CSV = "clinical.csv"

# Modality -> the sub-folders of a patient's drop that feed it.
MODALITY_FOLDERS: dict[str, tuple[str, ...]] = {
    "radiology": ("ct", "ct_label"),
    "pathology": ("wsi",),
}
# The folders whose presence makes a modality runnable at all.
MODALITY_REQUIRED: dict[str, str] = {"radiology": "ct", "pathology": "wsi"}
SETTLE_NS = 2_000_000_000


@dataclass(frozen=True)
class ModalityState:
    fingerprint: str  # 16 hex digits over (relative name, size, mtime) of every file
    changed_ns: int  # newest mtime/ctime among its files, folders and READY


@dataclass(frozen=True)
class PatientDrop:
    patient_id: str
    path: Path
    modalities: dict[str, ModalityState]


@dataclass
class LandingScan:
    drops: list[PatientDrop] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    not_ready: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, error)
    started_ns: int = field(default_factory=time.time_ns)


@dataclass(frozen=True)
class RunPlan:
    patient_id: str
    modality: str
    fingerprint: str

    @property
    def run_key(self) -> str:
        return f"{self.patient_id}:{self.modality}:{self.fingerprint}"


@dataclass
class TickPlan:
    runs: list[RunPlan]
    deferred: int
    cursor: str


def _stat_times(st: os.stat_result) -> int:
    return max(st.st_mtime_ns, st.st_ctime_ns)


def _walk_files(folder: Path, prefix: str, entries: list[tuple[str, int, int]]) -> int:
    """Append (relative name, size, mtime) for files under `folder`; return the newest time seen."""
    newest = _stat_times(os.stat(folder))
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue  # uploaders' temporary files
            rel = f"{prefix}/{entry.name}"
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                # A broken link or a file removed mid-scan: fingerprint what is there (the link
                # itself), so the drop still changes and its asset names the unreadable file.
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                newest = max(newest, _stat_times(st))
                entries.append((rel, -1, st.st_mtime_ns))
                continue
            newest = max(newest, _stat_times(st))
            if entry.is_dir(follow_symlinks=True):
                newest = max(newest, _walk_files(Path(entry.path), rel, entries))
            else:
                entries.append((rel, st.st_size, st.st_mtime_ns))
    return newest


def scan_patient(path: Path, ready_ns: int) -> PatientDrop:
    modalities: dict[str, ModalityState] = {}
    for modality, folders in MODALITY_FOLDERS.items():
        if not (path / MODALITY_REQUIRED[modality]).is_dir():
            continue
        entries: list[tuple[str, int, int]] = []
        newest = ready_ns
        for name in folders:
            folder = path / name
            if folder.is_dir():
                newest = max(newest, _walk_files(folder, name, entries))
        if not any(rel.startswith(MODALITY_REQUIRED[modality] + "/") for rel, _, _ in entries):
            continue
        digest = hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]
        modalities[modality] = ModalityState(digest, newest)
    return PatientDrop(path.name, path, modalities)


def scan_landing_zone(root: str | os.PathLike) -> LandingScan:
    root = Path(root)
    result = LandingScan()
    if not root.is_dir():
        return result
    with os.scandir(root) as it:
        folders = sorted((e for e in it if e.is_dir(follow_symlinks=True)), key=lambda e: e.name)
    for entry in folders:
        problem = patient_id_problem(entry.name)
        if problem:
            result.invalid.append((entry.path, problem))
            continue
        try:
            ready = os.stat(os.path.join(entry.path, READY_MARKER))
        except FileNotFoundError:
            result.not_ready.append(entry.name)
            continue
        try:
            # The patient folder's own ctime counts too: a drop moved in with `mv` keeps the
            # times of everything inside it, and only the moved folder's ctime says it is new.
            drop_ns = max(_stat_times(ready), _stat_times(entry.stat(follow_symlinks=True)))
            result.drops.append(scan_patient(Path(entry.path), drop_ns))
        except OSError as error:  # removed or unreadable mid-scan: this drop only, next tick again
            result.unreadable.append((entry.path, f"{type(error).__name__}: {error}"))
    return result


def plan_tick(scan: LandingScan, cursor: str | None, max_runs: int) -> TickPlan:
    """Which runs this tick requests, and the cursor that remembers it."""
    state = json.loads(cursor) if cursor else {}
    watermark = int(state.get("w", 0))
    seen: dict[str, str] = state.get("seen", {})

    fresh: list[tuple[int, RunPlan]] = []  # changed since the watermark and not yet requested
    still_seen: list[tuple[int, str, str]] = []  # at/after the watermark, already requested
    for drop in scan.drops:
        for modality, ms in drop.modalities.items():
            if ms.changed_ns < watermark:
                continue
            key = f"{drop.patient_id}|{modality}"
            if seen.get(key) == ms.fingerprint:
                still_seen.append((ms.changed_ns, key, ms.fingerprint))
            else:
                fresh.append((ms.changed_ns, RunPlan(drop.patient_id, modality, ms.fingerprint)))

    # Oldest changes first, so the deferred ones sit above the new watermark.
    fresh.sort(key=lambda item: (item[0], item[1].patient_id, item[1].modality))
    taken, deferred = fresh[:max_runs], fresh[max_runs:]
    times = [t for t, _ in taken] + [t for t, _, _ in still_seen]
    if deferred:
        new_watermark = deferred[0][0]
    elif times:
        new_watermark = max(times)
    else:
        new_watermark = watermark
    new_watermark = max(watermark, min(new_watermark, scan.started_ns - SETTLE_NS))
    remembered = {key: fp for t, key, fp in still_seen if t >= new_watermark}
    for t, plan in taken:
        if t >= new_watermark:
            remembered[f"{plan.patient_id}|{plan.modality}"] = plan.fingerprint
    new_cursor = json.dumps({"w": new_watermark, "seen": remembered}, sort_keys=True,
                            separators=(",", ":"))
    return TickPlan([plan for _, plan in taken], len(deferred), new_cursor)
