"""When the segmentation model trains, whether a new model replaces the installed one, and which
masks a new model re-predicts (no Dagster).

The sensors in `sensors.py` and the `segmentation_model` asset call these with what they read from
the instance and the disk; each function decides from plain values, so every rule is testable
without a daemon.

Training set: the CT scans (`ct_scans` partitions, gcmlm_assets/scans.py) that have a file in their
reference folder (`<landing>/<patient>/ct_label/`, or `ct_label/<timepoint>/` for a timepoint's
scan) and a materialized `ct_image` (its `ct.nii.gz` exists): a case per scan, keyed by its scan key,
so a patient's timepoints are cases of their own. Its fingerprint and each case's stamp use names,
sizes and times only (no file is read), so a sensor can compute them every tick. `current.json`
records the stamps of the set the last training saw (`reference_cases`, whether its model was
installed or rejected); the automatic path retrains when enough cases were added, changed or
removed since (`RetrainPolicy`). A run of segmentation_model started by a user trains whenever
its inputs differ from the installed model's (`training_action`).

Installing: a new model is compared with the installed one on reference cases held out of its
training that the installed model did not train on either (`choose_held_out`: whole patients,
all of a patient's timepoints together), by the mean Dice of
their predictions with the reference masks (`held_out_dice`, `install_decision`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gcmlm_assets.model_sweeps import patients_to_rerun
from gcmlm_assets.scans import InvalidScanKey, parse_scan_key, scan_folders

# nnU-Net trains on at least this many cases: the held-out cases leave them to the new model.
MIN_TRAINING_CASES = 2


def reference_dir(landing_root: Path, scan_key: str) -> Path | None:
    """The reference-mask folder of a scan in the landing zone (None for a key that is no scan's)."""
    try:
        scan = parse_scan_key(scan_key)
    except InvalidScanKey:
        return None
    return Path(landing_root) / scan.patient_id / scan_folders(scan.timepoint)[1]


def reference_files(label_dir: Path | None) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the visible files directly in a scan's reference folder; [] when none.
    A timepoint's folder in ct_label/ is no file of the drop's only scan's."""
    if label_dir is None:
        return []
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


def has_reference_mask(landing_root: Path, scan_key: str) -> bool:
    return bool(reference_files(reference_dir(landing_root, scan_key)))


def reference_set(landing_root: Path, ct_paths: dict[str, Path]) -> dict[str, list]:
    """scan key -> [ct.nii.gz mtime, reference file stats] for every training candidate.

    `ct_paths` maps each known scan to where its canonical CT would be.
    """
    cases: dict[str, list] = {}
    for key, ct_path in sorted(ct_paths.items()):
        files = reference_files(reference_dir(landing_root, key))
        if not files:
            continue
        try:
            ct_mtime = os.stat(ct_path).st_mtime_ns
        except FileNotFoundError:
            continue  # its ct_image is not materialized yet
        cases[key] = [ct_mtime, files]
    return cases


def reference_set_fingerprint(cases: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(cases, sort_keys=True).encode()).hexdigest()[:16]


def case_stamps(cases: dict[str, list]) -> dict[str, str]:
    """patient -> a short digest of its case's stamp (CT time, mask names, sizes, times)."""
    return {pid: hashlib.sha256(json.dumps(entry).encode()).hexdigest()[:12] for pid, entry in sorted(cases.items())}


def trained_case_stamps(pointer: dict | None) -> dict[str, str | None] | None:
    """The stamps of the set the last training saw, from `current.json`; None when no model is installed.

    A pointer written before stamps were recorded names only the patients it trained on (stamp None:
    those count as unchanged).
    """
    if not pointer:
        return None
    if isinstance(pointer.get("reference_cases"), dict):
        return pointer["reference_cases"]
    return {pid: None for pid in (pointer.get("training") or {}).get("cases", [])}


@dataclass(frozen=True)
class RetrainPolicy:
    """Retrain automatically once this many reference cases, or this fraction of the last training's
    set, were added, changed or removed since that training (whichever is reached first)."""

    min_new_cases: int
    min_growth_fraction: float

    def needed(self, trained_size: int) -> int:
        return max(1, min(int(self.min_new_cases), math.ceil(self.min_growth_fraction * trained_size)))


@dataclass(frozen=True)
class SetChanges:
    added: list[str]
    changed: list[str]  # the CT or the reference mask of a case the last training saw was replaced
    removed: list[str]

    @property
    def count(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed)

    def describe(self) -> str:
        return ", ".join(f"{len(ids)} {what}" for what, ids in
                         (("added", self.added), ("changed", self.changed), ("removed", self.removed))
                         if ids) or "none"


def set_changes(cases: dict[str, list], trained: dict[str, str | None]) -> SetChanges:
    current = case_stamps(cases)
    return SetChanges(
        added=sorted(set(current) - set(trained)),
        changed=sorted(pid for pid in set(current) & set(trained)
                       if trained[pid] is not None and trained[pid] != current[pid]),
        removed=sorted(set(trained) - set(current)))


@dataclass(frozen=True)
class TrainingDecision:
    request: bool
    reason: str
    cursor: dict
    fingerprint: str = ""
    due: bool = False  # the policy calls for a training (it may still wait to settle or for runs)


def decide_training(*, cases: dict[str, list], trained: dict[str, str | None] | None,
                    trained_fingerprint: str | None, policy: RetrainPolicy, min_cases: int, busy_runs: int,
                    cursor: dict, now: float, debounce_s: float, requested_before: bool) -> TrainingDecision:
    """The automatic path: train when at least `min_cases` reference masks exist and either no model
    is installed (`trained` is None) or the set changed by what `policy` asks since the last training
    (`trained`: its case stamps); then only once no radiology run or training is queued or running
    and the set has not changed for `debounce_s` seconds (so a cohort arriving patient by patient
    trains once, not per patient).

    `cursor` remembers the set being watched (`fp`) and since when (`since`).
    """
    if len(cases) < min_cases:
        return TrainingDecision(False, f"{len(cases)} of {min_cases} patients needed have a reference mask "
                                       "and a materialized ct_image", {})
    fingerprint = reference_set_fingerprint(cases)
    if fingerprint == trained_fingerprint:
        return TrainingDecision(False, f"the last training saw the current {len(cases)} reference masks",
                                {}, fingerprint)
    if trained is not None:
        changes, needed = set_changes(cases, trained), policy.needed(len(trained))
        if changes.count < needed:
            return TrainingDecision(
                False, f"{changes.count} reference case(s) changed since the last training ({changes.describe()}); "
                       f"the policy retrains from {needed} (segmentation.retrain_min_new_cases="
                       f"{policy.min_new_cases}, retrain_min_growth_fraction={policy.min_growth_fraction} of "
                       f"{len(trained)}). Materialize segmentation_model to train now.", {}, fingerprint)
    watched = cursor if cursor.get("fp") == fingerprint else {"fp": fingerprint, "since": now}
    if requested_before:
        return TrainingDecision(False, f"training on these {len(cases)} reference masks was already "
                                       "requested (see its run)", watched, fingerprint, due=True)
    if busy_runs:
        return TrainingDecision(False, f"waiting for {busy_runs} radiology or training run(s) to finish",
                                {"fp": fingerprint, "since": now}, fingerprint, due=True)
    settled_for = now - float(watched["since"])
    if settled_for < debounce_s:
        return TrainingDecision(False, f"{len(cases)} reference masks; waiting until the set is unchanged "
                                       f"for {debounce_s:.0f} s ({settled_for:.0f} s so far)", watched, fingerprint,
                                due=True)
    why = ("the first model" if trained is None
           else f"{set_changes(cases, trained).describe()} since the last training")
    return TrainingDecision(True, f"training on {len(cases)} reference masks ({why})", watched, fingerprint,
                            due=True)


def training_run_key(fingerprint: str) -> str:
    return f"segmentation_model:{fingerprint}"


REUSE, REJECTED_BEFORE, TRAIN = "reuse", "rejected before", "train"


def training_action(*, fingerprint: str, pointer: dict | None) -> str:
    """What a run of segmentation_model does, whoever started it: `REUSE` the installed model when it
    was trained on exactly these inputs and settings, `REJECTED_BEFORE` when a model trained on them
    against the same installed model was rejected (it would be the same model: training is seeded),
    else `TRAIN`. No retraining policy here: a run a user starts is the request to train.

    `pointer` is `current.json` when its model is usable, else None.
    """
    if not pointer:
        return TRAIN
    if pointer.get("fingerprint") == fingerprint:
        return REUSE
    rejected = pointer.get("rejected") or {}
    if rejected.get("fingerprint") == fingerprint and rejected.get("against") == pointer.get("checkpoint_sha256"):
        return REJECTED_BEFORE
    return TRAIN


def _hash_order(patient_id: str) -> str:
    return hashlib.sha256(patient_id.encode()).hexdigest()


@dataclass(frozen=True)
class HoldOut:
    cases: list[str] = field(default_factory=list)  # left out of the new model's training
    seen_by_installed: list[str] = field(default_factory=list)  # of those, the installed model trained on


def choose_held_out(inputs: dict[str, dict], installed_inputs: dict[str, dict], *, fraction: float,
                    min_cases: int) -> HoldOut:
    """Which reference cases the new model does not train on, to compare it with the installed model.

    `inputs`: scan key -> digests of its CT and reference mask for every usable reference case;
    `installed_inputs`: the same for the cases the installed model trained on. Cases are held out by
    patient, all of a patient's scans together: a timepoint of the patient left in the training set
    would leak its anatomy into the held-out score. The candidates are the patients with a case the
    installed model did not train on (new, changed, or held out before), in the order of the SHA-256
    of the patient id (stable whatever else arrives): whole patients are taken until
    max(`min_cases`, ceil(`fraction` x their cases)) cases are held out, at most all, leaving nnU-Net
    its 2 training cases (a patient with more scans than the room left is passed over). Held-out
    scans the installed model trained on (a known timepoint of a held-out patient) are marked
    `seen_by_installed`. When every case is one the installed model trained on (only settings
    changed), the first `min_cases` cases' patients of all are held out, all marked: that comparison
    favours the installed model.
    """
    room = max(0, len(inputs) - MIN_TRAINING_CASES)
    by_patient: dict[str, list[str]] = {}
    for key in sorted(inputs):
        by_patient.setdefault(_patient_of(key), []).append(key)
    seen = {key for key in inputs if installed_inputs.get(key) == inputs[key]}
    unseen = [p for p in by_patient if any(key not in seen for key in by_patient[p])]
    if unseen:
        candidates = sum(len(by_patient[p]) for p in unseen)
        wanted = max(int(min_cases), math.ceil(fraction * candidates))
        cases = _whole_patients(by_patient, unseen, wanted, room)
    else:
        cases = _whole_patients(by_patient, list(by_patient), int(min_cases), room)
    return HoldOut(cases, [key for key in cases if key in seen])


def _patient_of(scan_key: str) -> str:
    try:
        return parse_scan_key(scan_key).patient_id
    except InvalidScanKey:
        return scan_key  # not a scan key: a case of its own


def _whole_patients(by_patient: dict[str, list[str]], patients: list[str], wanted: int, room: int) -> list[str]:
    """The cases of `patients`, taken whole in the hash order of their ids, until `wanted` cases (at
    most `room`) are held; sorted."""
    held: list[str] = []
    for patient in sorted(patients, key=_hash_order):
        if len(held) >= min(wanted, room):
            break
        if len(held) + len(by_patient[patient]) <= room:
            held += by_patient[patient]
    return sorted(held)


def held_out_dice(model_folder: Path, pins, cases: dict[str, tuple[Path, Path]], device: str) -> dict[str, float]:
    """patient -> Dice of the model's prediction (nnU-Net's single-array predictor, as ct_mask uses it)
    with the reference mask, for `cases` (patient -> (CT, reference mask on the CT's grid))."""
    import SimpleITK as sitk

    from gcmlm_assets.radiology.masks import dice
    from gcmlm_assets.radiology.nnunet import GastricSegmenter

    model = GastricSegmenter.load(Path(model_folder), device=device, pins=pins)
    scores = {}
    for patient_id, (ct_path, mask_path) in sorted(cases.items()):
        predicted = model.predict(sitk.ReadImage(str(ct_path)))
        # Both images named: masks.dice reads them through array views, which need the images alive.
        reference = sitk.ReadImage(str(mask_path))
        scores[patient_id] = round(dice(predicted, reference), 6)
    return scores


def install_decision(new: dict[str, float], installed: dict[str, float]) -> tuple[bool, str]:
    """Install the new model when its mean Dice on the held-out cases is at least the installed one's
    (no tolerance: an equal score, e.g. the same model again, installs)."""
    new_mean, installed_mean = sum(new.values()) / len(new), sum(installed.values()) / len(installed)
    if new_mean >= installed_mean:
        return True, (f"installed: mean Dice {new_mean:.3f} on {len(new)} held-out case(s), at least the "
                      f"installed model's {installed_mean:.3f}")
    return False, (f"rejected: mean Dice {new_mean:.3f} on {len(new)} held-out case(s), below the installed "
                   f"model's {installed_mean:.3f}; the installed model stays")


def masks_to_predict(*, model_key: str, cursor: dict, ct_done: Iterable[str], mask_done: Iterable[str],
                     in_flight, has_reference, limit: int) -> tuple[list[str], dict]:
    """Patients whose mask the installed model (`model_key`) should predict, and the next cursor:
    every patient without a reference mask whose CT is materialized, swept once per model, and those
    whose ct_mask waited for a model (model_sweeps.patients_to_rerun)."""
    return patients_to_rerun(model_key=model_key, cursor=cursor, upstream_done=ct_done, downstream_done=mask_done,
                             in_flight=in_flight, excluded=has_reference, limit=limit)


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
