"""Which of a patient's CT scans feed fused_table (plain Python, no Dagster).

radiomics_row is stored per scan (`radiomics_row/<scan key>/radiomics.parquet`, keys as
gcmlm_assets/scans.py defines them: the patient id for a drop's only scan, `<patient>@<timepoint>`
for a timepoint). Of each patient's scans, oldest first:
- the radiology block (`rad_*`) comes from ONE scan, `scans.chosen_scan(scans, radiology_timepoint)`
  (default the baseline); when that scan is unsound or unusable the block is absent (never filled
  from another timepoint: the block would then mean different things for different patients);
- the delta block (`delta_*`) compares the first and the last of ALL the patient's scans (at least
  two); when either of those two is unsound, has no radiomics_row file or an unusable one, the block
  is absent (never taken from other scans), and `delta_pair_problems` says which scan and why.
A patient with one scan (key = patient id) gets exactly the radiology block of before and no delta.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.scans import ScanKey, chosen_scan, parse_scan_key, patient_scans, scan_key_problem


@dataclass(frozen=True)
class ScanChoice:
    """A patient's scans (oldest first) and the ones each radiology-derived block reads."""

    scans: tuple[ScanKey, ...]
    radiology: ScanKey | None  # None: the patient has no scan of the chosen timepoint
    delta: tuple[ScanKey, ScanKey] | None  # (first, last); None with fewer than 2 scans

    def as_dict(self) -> dict:
        return {"scans": [str(s) for s in self.scans],
                "radiology": None if self.radiology is None else str(self.radiology),
                "delta": None if self.delta is None else [str(s) for s in self.delta]}


def choose_scans(scan_keys: Iterable[str], radiology_timepoint: str = "baseline") -> dict[str, ScanChoice]:
    """{patient: ScanChoice} over the scan keys (keys that do not parse are left out)."""
    choices = {}
    for patient_id, scans in sorted(patient_scans(scan_keys).items()):
        delta = (scans[0], scans[-1]) if len(scans) >= 2 else None
        choices[patient_id] = ScanChoice(tuple(scans), chosen_scan(scans, radiology_timepoint), delta)
    return choices


@dataclass
class ScanFolders:
    files: dict[str, Path]  # scan key -> its feature file
    stale: list[dict]  # {folder, reason}: left out


def find_scan_files(folder: Path, filename: str, known_scans: set[str] | None,
                    known_patients: set[str] | None) -> ScanFolders:
    """The scans' files under `folder` (<asset>/<scan key>/<filename>); a folder that is not a scan
    key, or (when the caller passes them) not a known scan partition or of no known patient, is a
    stale artifact, reported and left out."""
    found = ScanFolders({}, [])
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue  # manifests and such beside the scan folders
        problem = scan_key_problem(entry.name)
        if problem:
            found.stale.append({"folder": str(entry), "reason": f"not a scan key: {problem}"})
            continue
        path = entry / filename
        if not path.is_file():
            continue  # not materialized (yet) for this scan
        patient_id = parse_scan_key(entry.name).patient_id
        if known_scans is not None and entry.name not in known_scans:
            found.stale.append({"folder": str(entry), "reason": "not a known ct_scans partition (stale artifact)"})
            continue
        if known_patients is not None and patient_id not in known_patients:
            found.stale.append({"folder": str(entry), "reason": "not a known patient partition (stale artifact)"})
            continue
        found.files[entry.name] = path
    return found


def delta_pair_problems(pair: tuple[ScanKey, ScanKey], files: Mapping[str, Path], left_out: Mapping[str, str],
                        usable: Container[str], asset: str) -> list[tuple[str, str]]:
    """[(scan key, why)] of the pair's scans (first, last) that cannot feed the delta block: left out
    as unsound (`left_out`: key -> reason), no `asset` file, or a file not `usable` (the report's
    file_problems say why); [] when both can."""
    problems = []
    for role, scan in zip(("first", "last"), pair):
        key = str(scan)
        if key in left_out:
            problems.append((key, f"the {role} scan {key} is left out: {left_out[key]}"))
        elif key not in files:
            problems.append((key, f"the {role} scan {key} has no {asset} (its CT steps failed or have not finished)"))
        elif key not in usable:
            problems.append((key, f"the {role} scan {key}'s {asset} cannot be used (file_problems says why)"))
    return problems
