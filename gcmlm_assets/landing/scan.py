"""Landing-zone scanning and change planning (no Dagster).

READY is the uploader's commit point: the uploader writes or replaces a drop's files, then
writes or touches READY last. A tick therefore lists the landing root and stats only READY and
the folder of each patient (`scan_landing_zone`); the folder's times count because a drop moved
in with `mv` keeps every time inside it and only the moved folder's ctime is new. A drop's files
are walked (`scandir` + `stat`, no file is opened) only when that commit time is at or above the
cursor's watermark, oldest first, and only until the tick's run cap is full (`plan_tick`): a drop
below the watermark was handled by an earlier tick, whatever its files say.

A symbolic link whose target lies outside the landing zone (a patient folder, or a file or folder
inside a drop) is refused, never followed: the patient folder is reported as invalid, the modality
holding the link is not requested (the tick says which link and where it leads), and the assets
refuse it too (`LandingZone.refuse_links_leaving`). Only the link's target path is resolved; nothing
outside the landing zone is stat'ed, opened or read.

A modality's fingerprint covers (relative name, size, mtime) of its files and READY's mtime, so
touching READY alone yields new run keys: the uploader's "please re-run" after fixing a drop,
even when a replacement file kept the size and mtime of the broken one.

Radiology is fingerprinted per CT scan (gcmlm_assets/scans.py): each scan of a drop (its `ct/` and
`ct_label/` folders, or `ct/<timepoint>/` and `ct_label/<timepoint>/`) is a run of its own, on its
scan's partition. A drop's only scan directly in `ct/` keeps the patient id as its partition, and
its fingerprint, cursor entry and run key stay those of the days of one scan per patient. The parts
of `ct/` and `ct_label/` that `list_drop_scans` refuses are reported with their reason; the other
scans go on.

What a drop runs once is a unit (`unit_name`): a modality, or one scan of radiology. Each unit also
has a content fingerprint, its files' (relative name, size, mtime, ctime) without READY; the sensor
keeps the content fingerprint each unit was last requested with (its memory, in Dagster's key-value
store). Of the units a commit makes fresh (their run fingerprint is not in the cursor), those whose
content differs from their memory are requested alone: a new timepoint of a known patient runs only
that timepoint, even months later when the cursor has long forgotten the drop; a file replaced
with its old size and mtime (`cp -p`) still changes its unit (ctime). When no fresh unit of a drop
changed (READY touched alone), all of them are requested: the uploader's "please re-run".

The cursor stays small however many patients there are: a watermark and the fingerprints of the
few drops at or above it. The watermark never passes the scan's start minus `SETTLE_NS`, so a
READY touched while a tick runs (or on a filesystem with coarse timestamps) stays above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gcmlm_assets.catalogue import LYMPH_NODE, PATHOLOGY, RADIOLOGY
# The scan reports the links the resources refuse (landing_input.py, below the domains).
from gcmlm_assets.landing_input import describe_links_leaving, link_leaving
from gcmlm_assets.patients import patient_id_problem
# ct/ holds a drop's CT series (a NIfTI or a DICOM series; the DICOM intake writes into it), or one
# folder per timepoint; ct_label/ their reference masks (scans.py).
from gcmlm_assets.scans import CT_FOLDER, REFERENCE_FOLDER, list_drop_scans, scan_key

READY_MARKER = "READY"
CLINICAL_CSV = "clinical.csv"
WSI_FOLDER = "wsi"  # the primary tumour's slides
LN_WSI_FOLDER = "ln_wsi"  # the lymph-node slides
LN_ANNOTATIONS_FOLDER = "ln_annotations"  # QuPath GeoJSON of the lymph-node slides, `<slide name>.geojson`

# Modality -> the sub-folders of a patient's drop that feed it.
MODALITY_FOLDERS: dict[str, tuple[str, ...]] = {
    RADIOLOGY: (CT_FOLDER, REFERENCE_FOLDER),
    PATHOLOGY: (WSI_FOLDER,),
    LYMPH_NODE: (LN_WSI_FOLDER, LN_ANNOTATIONS_FOLDER),
}
# The folders whose presence makes a modality runnable at all.
MODALITY_REQUIRED: dict[str, str] = {RADIOLOGY: CT_FOLDER, PATHOLOGY: WSI_FOLDER, LYMPH_NODE: LN_WSI_FOLDER}
# Modalities run once per CT scan (the `ct_scans` partitions), not once per patient.
PER_SCAN_MODALITIES = frozenset({RADIOLOGY})
SETTLE_NS = 2_000_000_000


@dataclass(frozen=True)
class ModalityState:
    """One unit of a drop (`unit_name`): a modality, or a scan of a per-scan modality."""

    fingerprint: str  # the run fingerprint: 16 hex digits over READY's mtime and (relative name, size, mtime) of its files
    files: int  # how many entries were stat'ed for it
    modality: str = ""
    partition: str = ""  # the run's partition: the scan key (per-scan modalities) or the patient id
    content: str = ""  # 16 hex digits over (relative name, size, mtime, ctime) of its files: no READY


def unit_name(modality: str, timepoint: str | None) -> str:
    """What a drop runs once: a modality, or one timepoint of a per-scan modality (`radiology@<timepoint>`);
    the cursor remembers each as `<patient>|<unit>`."""
    return modality if timepoint is None else f"{modality}@{timepoint}"


def _stat_times(st: os.stat_result) -> int:
    return max(st.st_mtime_ns, st.st_ctime_ns)


def _walk_files(folder: Path, prefix: str, entries: list[tuple[str, int, int, int]], root: str,
                leaving: list[tuple[str, str]]) -> None:
    """Append (relative name, size, mtime, ctime) for the files under `folder`; links that lead out
    of `root` go to `leaving` as (relative name, target) and are not followed."""
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue  # uploaders' temporary files
            rel = f"{prefix}/{entry.name}"
            target = link_leaving(entry.path, root)
            if target is not None:
                leaving.append((rel, target))
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                # A broken link or a file removed mid-walk: fingerprint what is there (the link
                # itself), so the drop still changes and its asset names the unreadable file.
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append((rel, -1, st.st_mtime_ns, st.st_ctime_ns))
                continue
            if stat.S_ISDIR(st.st_mode):
                _walk_files(Path(entry.path), rel, entries, root, leaving)
            else:
                entries.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@dataclass
class PatientDrop:
    """A ready drop as listed; its files are walked only when `modalities` is first read."""

    patient_id: str
    path: Path
    ready_mtime_ns: int
    changed_ns: int  # the commit time: newest mtime/ctime of READY and the patient folder
    _modalities: dict[str, ModalityState] | None = field(default=None, init=False, repr=False)
    # Why the walk failed (vanished, unreadable): kept so that walking the tick again (`walk_tick`,
    # then `plan_tick`) decides the same.
    _error: OSError | None = field(default=None, init=False, repr=False)
    # Modality -> (relative name, target) of its links leading out of the landing zone: not runnable.
    refused: dict[str, list[tuple[str, str]]] = field(default_factory=dict, init=False, repr=False)
    # (folder relative to the drop, reason) of each part of ct/ or ct_label/ that holds no scan we take.
    scan_problems: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)
    # The scan keys the drop holds now; None when its listing cannot be trusted to say which are gone
    # (links leaving the zone, or a problem with the whole of ct/): then no scan is taken as removed.
    scan_keys: tuple[str, ...] | None = field(default=None, init=False, repr=False)

    @property
    def walked(self) -> bool:
        return self._modalities is not None

    @property
    def modalities(self) -> dict[str, ModalityState]:
        """Fingerprint of each runnable unit (`unit_name`): a modality, per scan for the per-scan
        ones (walks the drop once; OSError if it vanished)."""
        if self._error is not None:
            raise self._error
        if self._modalities is None:
            try:
                self._modalities = self._fingerprint()
            except OSError as error:
                self._error = error
                raise
        return self._modalities

    def _fingerprint(self) -> dict[str, ModalityState]:
        modalities: dict[str, ModalityState] = {}
        root = os.path.realpath(self.path.parent)  # drops are the landing root's direct children
        self.refused, self.scan_problems, self.scan_keys = {}, [], None
        for modality, folders in MODALITY_FOLDERS.items():
            required = MODALITY_REQUIRED[modality]
            entries: list[tuple[str, int, int, int]] = []
            leaving: list[tuple[str, str]] = []
            for name in folders:
                target = link_leaving(self.path / name, root)
                if target is not None:
                    leaving.append((name, target))
                elif (self.path / name).is_dir():
                    _walk_files(self.path / name, name, entries, root, leaving)
            if leaving:
                # Refused before the scans are listed: listing them would stat the links' targets.
                self.refused[modality] = leaving
                continue
            if modality in PER_SCAN_MODALITIES:
                modalities.update(self._scan_states(modality, entries))
                continue
            if not (self.path / required).is_dir():
                continue
            if not any(entry[0].startswith(required + "/") for entry in entries):
                continue
            modalities[modality] = self._state(modality, self.patient_id, entries)
        return modalities

    def _state(self, modality: str, partition: str, entries: list[tuple[str, int, int, int]]) -> ModalityState:
        # Run fingerprint: READY's mtime and (name, size, mtime) of each file, so a commit gives new
        # run keys (the formula of the days of one scan per patient, kept byte for byte).
        run_payload = json.dumps([self.ready_mtime_ns, sorted(entry[:3] for entry in entries)]).encode()
        # Content fingerprint: the files alone, with their ctime, which a replaced file moves even
        # when the copy keeps size and mtime (`cp -p`).
        content_payload = json.dumps(sorted(entries)).encode()
        return ModalityState(hashlib.sha256(run_payload).hexdigest()[:16], len(entries), modality, partition,
                             hashlib.sha256(content_payload).hexdigest()[:16])

    def _scan_states(self, modality: str, entries: list[tuple[str, int, int, int]]) -> dict[str, ModalityState]:
        """One state per scan of the drop, over the files of its CT and reference folders (walked
        once for the whole modality: `entries`)."""
        listed = list_drop_scans(self.path)
        self.scan_problems = list(listed.problems)
        whole_ct_refused = any(folder == CT_FOLDER for folder, _ in listed.problems)
        keys = [scan_key(self.patient_id, scan.timepoint) for scan in listed.scans]
        self.scan_keys = None if whole_ct_refused else tuple(keys)
        states = {}
        for scan, key in zip(listed.scans, keys):
            folders = (scan.ct_folder + "/", scan.reference_folder + "/")
            mine = [entry for entry in entries if entry[0].startswith(folders)]
            states[unit_name(modality, scan.timepoint)] = self._state(modality, key, mine)
        return states


@dataclass
class LandingScan:
    drops: list[PatientDrop] = field(default_factory=list)  # every valid folder with READY
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    not_ready: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, error)
    started_ns: int = field(default_factory=time.time_ns)


@dataclass(frozen=True)
class RunPlan:
    patient_id: str
    modality: str
    fingerprint: str
    partition: str = ""  # the run's partition: a scan key (per-scan modalities); empty: the patient id

    def __post_init__(self):
        if not self.partition:
            object.__setattr__(self, "partition", self.patient_id)

    @property
    def run_key(self) -> str:
        # a drop's only scan has the patient id as its partition: its run keys are those of old
        return f"{self.partition}:{self.modality}:{self.fingerprint}"

    @property
    def cursor_key(self) -> str:
        """`<patient>|<modality>`, or `<patient>|<modality>@<timepoint>` for a timepoint's scan."""
        timepoint_suffix = self.partition[len(self.patient_id):]  # "" or "@<timepoint>"
        return f"{self.patient_id}|{self.modality}{timepoint_suffix}"


@dataclass
class TickPlan:
    runs: list[RunPlan]
    deferred: int  # drops left for a later tick by the run cap
    cursor: str
    walked: int = 0  # drops whose files were walked this tick
    files: int = 0  # file entries stat'ed by those walks
    held: list[RunPlan] = field(default_factory=list)  # due, but their modality is held back
    # (patient, modality, reason) of the walked drops' modalities refused for links leaving the zone.
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    # (patient, folder relative to the drop, reason): parts of a walked drop's ct/ or ct_label/ refused.
    scan_problems: list[tuple[str, str, str]] = field(default_factory=list)
    # Patient -> the scan keys its walked drop holds now (drops whose listing is trusted, see PatientDrop).
    drop_scans: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # "<patient>|<unit>" -> content fingerprint: the memory of the units requested this tick whose
    # content differs from what the memory held (the sensor stores it).
    remember: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0  # fresh units not requested: their content is that of their last request


def scan_landing_zone(root: str | os.PathLike) -> LandingScan:
    """List the landing zone: two stats per patient folder (READY and the folder), no walks."""
    root = Path(root)
    result = LandingScan()
    if not root.is_dir():
        return result
    with os.scandir(root) as it:
        # A link is judged by where it leads before anything at its target is looked at.
        folders = sorted((e for e in it if e.is_symlink() or e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    for entry in folders:
        target = link_leaving(entry.path, root) if entry.is_symlink() else None
        if target is None and entry.is_symlink() and not os.path.isdir(entry.path):
            continue  # a link to a file inside the zone (clinical.csv) is no patient folder
        problem = patient_id_problem(entry.name)
        if problem:
            problem = f"invalid patient id ({problem})"
        if target is not None:
            problem = f"a symbolic link to {target}, outside the landing zone (never followed)"
        if problem:
            result.invalid.append((entry.path, problem))
            continue
        try:
            ready = os.stat(os.path.join(entry.path, READY_MARKER))
            folder = entry.stat(follow_symlinks=True)
        except FileNotFoundError:
            result.not_ready.append(entry.name)
            continue
        except OSError as error:  # unreadable: this drop only; the tick goes on
            result.unreadable.append((entry.path, f"{type(error).__name__}: {error}"))
            continue
        result.drops.append(PatientDrop(entry.name, Path(entry.path), ready.st_mtime_ns,
                                        max(_stat_times(ready), _stat_times(folder))))
    return result


def cursor_state(cursor: str | None) -> tuple[int, dict[str, str]]:
    """(watermark, fingerprints remembered per "patient|unit") from a cursor."""
    state = json.loads(cursor) if cursor else {}
    return int(state.get("w", 0)), dict(state.get("seen", {}))


def scans_migrated(cursor: str | None) -> bool:
    """Whether the cursor was written by a tick that knows the `ct_scans` partitions (every tick
    since writes `"scans": 1`); an older one asks the sensor to migrate once."""
    return bool(cursor) and json.loads(cursor).get("scans") == 1


@dataclass
class TickWalk:
    """The drops a tick walks (`walk_tick`) and their units whose run fingerprint the cursor has not seen."""

    watermark: int
    seen: dict[str, str]  # the cursor's "<patient>|<unit>" -> run fingerprint
    handled: list[PatientDrop]  # walked
    waiting: list[PatientDrop]  # not walked: the run cap is full
    fresh: list[tuple[PatientDrop, str, ModalityState]]  # (drop, unit, state) in commit order
    unreadable: list[tuple[str, str]]  # (folder, error) of drops that vanished or could not be read

    @property
    def memory_keys(self) -> set[str]:
        """"<patient>|<unit>" of every unit of the walked drops: what the memory is asked for."""
        return {f"{drop.patient_id}|{unit}" for drop in self.handled for unit in drop.modalities}


def walk_tick(scan: LandingScan, cursor: str | None, max_runs: int,
              held: frozenset[str] = frozenset()) -> TickWalk:
    """Walk the drops committed at or after the watermark, oldest first, until their fresh units of
    modalities not `held` reach `max_runs`; the newer ones wait unwalked. Walks are kept on the
    drops: walking the same scan again gives the same answer without touching the disk."""
    watermark, seen = cursor_state(cursor)
    candidates = sorted((d for d in scan.drops if d.changed_ns >= watermark),
                        key=lambda d: (d.changed_ns, d.patient_id))
    walk = TickWalk(watermark, seen, [], [], [], [])
    runnable = 0  # fresh units of modalities not held: at most this many are requested
    for drop in candidates:
        if runnable >= max_runs:
            walk.waiting.append(drop)
            continue
        try:
            modalities = drop.modalities
        except OSError as error:  # vanished or unreadable: reported; READY touched later retries it
            walk.unreadable.append((str(drop.path), f"{type(error).__name__}: {error}"))
            continue
        walk.handled.append(drop)
        for unit, ms in sorted(modalities.items()):
            if seen.get(f"{drop.patient_id}|{unit}") != ms.fingerprint:
                walk.fresh.append((drop, unit, ms))
                runnable += ms.modality not in held
    return walk


def plan_tick(scan: LandingScan, cursor: str | None, max_runs: int,
              held: frozenset[str] = frozenset(), memory: Mapping[str, str] | None = None) -> TickPlan:
    """Which runs this tick requests, and the cursor that remembers it.

    `memory`: "<patient>|<unit>" -> the content fingerprint the unit was last requested with, for
    the units of the walked drops (`walk_tick(...).memory_keys`; None: nothing remembered). Of a
    drop's fresh units, those whose content differs from their memory are requested; when none
    does (READY touched alone), all of them are; a held unit without memory does not count as a
    change. The fresh units not requested are remembered in the cursor as handled. The deferred ones (the run cap), and those of a `held` modality (one
    that would fail for a reason of the platform's, not the drop's), are not remembered, neither
    in the cursor nor in the memory: a later tick requests them.
    """
    walk = walk_tick(scan, cursor, max_runs, held)
    watermark, seen, handled, waiting = walk.watermark, walk.seen, walk.handled, walk.waiting
    scan.unreadable.extend(walk.unreadable)
    memory = memory or {}

    fresh_by_drop: dict[str, list[tuple[str, str, ModalityState]]] = {}  # in commit order
    for drop, unit, ms in walk.fresh:
        fresh_by_drop.setdefault(drop.patient_id, []).append((drop.changed_ns, f"{drop.patient_id}|{unit}", ms))
    fresh: list[tuple[int, RunPlan]] = []  # due: changed (or a bare READY touch) and not yet requested
    holding: list[tuple[int, RunPlan]] = []  # due, but of a held modality
    contents: dict[str, str] = {}  # "<patient>|<unit>" -> content fingerprint of each due unit
    unchanged = 0
    for patient_id, units in fresh_by_drop.items():
        changed = [unit for unit in units if memory.get(unit[1]) != unit[2].content]
        # A held unit never requested (no memory) is due either way; it does not decide whether the
        # commit changed something, or was READY touched alone to re-run the units that can run.
        decisive = any(ms.modality not in held or key in memory for _, key, ms in changed)
        due_units = changed if decisive else units
        unchanged += len(units) - len(due_units)
        for changed_ns, key, ms in due_units:
            due = (changed_ns, RunPlan(patient_id, ms.modality, ms.fingerprint, ms.partition))
            (holding if ms.modality in held else fresh).append(due)
            contents[key] = ms.content

    taken, over = fresh[:max_runs], fresh[max_runs:] + holding
    deferred_times = [t for t, _ in over] + [d.changed_ns for d in waiting]
    if deferred_times:
        new_watermark = min(deferred_times)
    elif handled:  # times the filesystem gave, not our clock: a file server's may lag
        new_watermark = max(d.changed_ns for d in handled)
    else:
        new_watermark = watermark
    new_watermark = max(watermark, min(new_watermark, scan.started_ns - SETTLE_NS))

    # Remember what is requested (now or earlier) or left as unchanged, for drops the next tick walks again.
    over_keys = {p.cursor_key for _, p in over}
    remembered: dict[str, str] = {}
    for drop in handled:
        if drop.changed_ns >= new_watermark:
            for unit, ms in drop.modalities.items():
                key = f"{drop.patient_id}|{unit}"
                if key not in over_keys:
                    remembered[key] = ms.fingerprint
    # Unwalked this tick: keep what an earlier tick requested for them (the cursor holds only the
    # few drops above the watermark, so this loop is short).
    waiting_ids = {drop.patient_id for drop in waiting}
    for key, fingerprint in seen.items():
        if key.partition("|")[0] in waiting_ids:
            remembered[key] = fingerprint

    new_cursor = json.dumps({"w": new_watermark, "seen": remembered, "scans": 1}, sort_keys=True,
                            separators=(",", ":"))
    requested_keys = (plan.cursor_key for _, plan in taken)
    return TickPlan(
        runs=[plan for _, plan in taken],
        deferred=len(waiting) + len({p.patient_id for _, p in fresh[max_runs:]}),
        cursor=new_cursor,
        walked=len(handled),
        files=sum(ms.files for d in handled for ms in d.modalities.values()),
        held=[plan for _, plan in holding],
        refused=[(d.patient_id, modality,
                  describe_links_leaving([(str(d.path / rel), target) for rel, target in links], d.path.parent))
                 for d in handled for modality, links in sorted(d.refused.items())],
        scan_problems=[(d.patient_id, folder, reason) for d in handled for folder, reason in d.scan_problems],
        drop_scans={d.patient_id: d.scan_keys for d in handled if d.scan_keys is not None},
        remember={key: contents[key] for key in requested_keys if memory.get(key) != contents[key]},
        unchanged=unchanged,
    )
