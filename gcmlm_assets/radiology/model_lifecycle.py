"""When the segmentation model trains, and which masks a new model re-predicts (no Dagster).

The sensors in `sensors.py` call these with what they read from the instance and the disk; each
function decides from plain values, so every rule is testable without a daemon.

Training set: the patients that have a file under `<landing>/<patient>/ct_label/` and a
materialized `ct_image` (its `ct.nii.gz` exists). Its fingerprint uses names, sizes and times only
(no file is read), so a sensor can compute it every tick; the installed model records the
fingerprint of the set it was trained on, and a different fingerprint means "train again".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REFERENCE_FOLDER = "ct_label"


def reference_files(label_dir: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the visible files in a patient's ct_label/ folder; [] when none."""
    try:
        with os.scandir(label_dir) as entries:
            found = []
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=True):
                    continue
                st = entry.stat(follow_symlinks=True)
                found.append((entry.name, st.st_size, st.st_mtime_ns))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found)


def has_reference_mask(landing_root: Path, patient_id: str) -> bool:
    return bool(reference_files(Path(landing_root) / patient_id / REFERENCE_FOLDER))


def reference_set(landing_root: Path, ct_paths: dict[str, Path]) -> dict[str, list]:
    """patient -> [ct.nii.gz mtime, reference file stats] for every training candidate.

    `ct_paths` maps each known patient to where its canonical CT would be.
    """
    cases: dict[str, list] = {}
    for patient_id, ct_path in sorted(ct_paths.items()):
        files = reference_files(Path(landing_root) / patient_id / REFERENCE_FOLDER)
        if not files:
            continue
        try:
            ct_mtime = os.stat(ct_path).st_mtime_ns
        except FileNotFoundError:
            continue  # its ct_image is not materialized yet
        cases[patient_id] = [ct_mtime, files]
    return cases


def reference_set_fingerprint(cases: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(cases, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingDecision:
    request: bool
    reason: str
    cursor: dict
    fingerprint: str = ""


def decide_training(*, cases: dict[str, list], installed_fingerprint: str | None, min_cases: int,
                    busy_runs: int, cursor: dict, now: float, debounce_s: float,
                    requested_before: bool) -> TrainingDecision:
    """Train when at least `min_cases` reference masks exist, their set differs from the installed
    model's, no radiology run or training is queued or running, and the set has not changed for
    `debounce_s` seconds (so a cohort arriving patient by patient trains once, not per patient).

    `cursor` remembers the set being watched (`fp`) and since when (`since`).
    """
    if len(cases) < min_cases:
        return TrainingDecision(False, f"{len(cases)} of {min_cases} patients needed have a reference mask "
                                       "and a materialized ct_image", {})
    fingerprint = reference_set_fingerprint(cases)
    if fingerprint == installed_fingerprint:
        return TrainingDecision(False, f"the installed model was trained on the current {len(cases)} "
                                       "reference masks", {}, fingerprint)
    watched = cursor if cursor.get("fp") == fingerprint else {"fp": fingerprint, "since": now}
    if requested_before:
        return TrainingDecision(False, f"training on these {len(cases)} reference masks was already "
                                       "requested (see its run)", watched, fingerprint)
    if busy_runs:
        return TrainingDecision(False, f"waiting for {busy_runs} radiology or training run(s) to finish",
                                {"fp": fingerprint, "since": now}, fingerprint)
    settled_for = now - float(watched["since"])
    if settled_for < debounce_s:
        return TrainingDecision(False, f"{len(cases)} reference masks; waiting until the set is unchanged "
                                       f"for {debounce_s:.0f} s ({settled_for:.0f} s so far)", watched, fingerprint)
    return TrainingDecision(True, f"training on {len(cases)} reference masks", watched, fingerprint)


def training_run_key(fingerprint: str) -> str:
    return f"segmentation_model:{fingerprint}"


def masks_to_predict(*, model_key: str, cursor: dict, ct_done: Iterable[str], mask_done: Iterable[str],
                     in_flight: Iterable[str], has_reference, limit: int) -> tuple[list[str], dict]:
    """Patients whose mask the installed model (`model_key`) should predict, and the next cursor.

    A new model re-predicts every patient without a reference mask whose CT is materialized, in
    slices of `limit` per tick (the cursor's `offset`). Besides, patients whose ct_mask waited for a
    model (their CT is materialized, their mask is not) are predicted unless a run of theirs is in
    flight. `has_reference(patient)` is asked only for those candidates.
    """
    ct_done = sorted(set(ct_done))
    in_flight = set(in_flight)
    if cursor.get("model") != model_key:
        cursor = {"model": model_key, "offset": 0}
    chosen: list[str] = []
    offset = int(cursor.get("offset", 0))
    if offset < len(ct_done):  # the sweep after a model change is not finished
        for patient_id in ct_done[offset:]:
            offset += 1
            if not has_reference(patient_id):
                chosen.append(patient_id)
            if len(chosen) >= limit:
                break
        cursor = {"model": model_key, "offset": offset}
    else:
        waiting = sorted(set(ct_done) - set(mask_done) - in_flight)
        chosen = [pid for pid in waiting if not has_reference(pid)][:limit]
    return chosen, cursor


def mask_run_key(patient_id: str, model_key: str) -> str:
    return f"{patient_id}:predicted_mask:{model_key}"


def checkpoint_stamp(model_folder: Path) -> tuple[int, list[str]]:
    """(newest checkpoint mtime, 'name:size:mtime' per checkpoint) of an nnU-Net model folder."""
    model_folder = Path(model_folder)
    stats = [(str(p.relative_to(model_folder)), p.stat()) for p in sorted(model_folder.rglob("checkpoint*.pth"))]
    newest = max((st.st_mtime_ns for _, st in stats), default=0)
    return newest, [f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats]


def model_identity(model_folder: Path) -> str:
    """What a predicted mask was made with: the folder and its checkpoints' names, sizes and times."""
    folder = Path(model_folder).resolve()
    digest = hashlib.sha256()
    for part in (str(folder), *checkpoint_stamp(folder)[1]):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()
