"""The pseudonym table: the hospital's patient id -> the pseudonym that names the landing folder.

The only place the real id is kept, so it must live outside the landing zone, the artifacts and the
Dagster instance (`check_table_location`), where the platform's readers and logs never go. Pseudonyms
are random (`PS` + 10 hex digits), not derived from the id, so without the table they link to no one.
A JSON file, rewritten whole (temporary name + rename, mode 0600) when a patient is added: once per
new patient, never per instance (about 1 MB at 10,000 patients: cheap at the rate new patients
arrive, one association at a time; see the README's "Intake from a PACS").
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path

from gcmlm_assets.patients import validate_patient_id
from gcmlm_assets.storage import atomic_path

PSEUDONYM_PREFIX = "PS"
TABLE_FORMAT = 1


class PseudonymTableError(ValueError):
    """A table that cannot be used: the message names the file and the problem."""


def check_table_location(table: Path, protected: dict[str, Path]) -> None:
    """Refuse a table inside any of `protected` (name -> folder), e.g. the landing zone."""
    resolved = Path(os.path.realpath(table))
    for name, folder in protected.items():
        folder = Path(os.path.realpath(folder))
        if resolved == folder or folder in resolved.parents:
            raise PseudonymTableError(f"{table}: the pseudonym table lies inside the {name} ({folder}); keep it "
                                      "outside the landing zone, the artifacts and the Dagster instance")


def _key(patient_id: str, issuer: str) -> str:
    # The issuer keeps two hospitals' equal ids apart; a backslash is not allowed in either (LO).
    return f"{issuer}\\{patient_id}"


class PseudonymTable:
    """Thread-safe: the receiver's associations each run in their own thread."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._pseudonyms: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != TABLE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {TABLE_FORMAT}")
            entries = {_key(e["patient_id"], e.get("issuer", "")): e["pseudonym"] for e in data["patients"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise PseudonymTableError(f"{self.path}: unreadable pseudonym table ({error})") from error
        if len(set(entries.values())) != len(entries):
            raise PseudonymTableError(f"{self.path}: two patients share a pseudonym")
        return entries

    def __len__(self) -> int:
        return len(self._pseudonyms)

    def pseudonym_for(self, patient_id: str, issuer: str = "") -> str:
        """The patient's pseudonym, made and saved on first sight."""
        key = _key(patient_id.strip(), issuer.strip())
        with self._lock:
            known = self._pseudonyms.get(key)
            if known is not None:
                return known
            taken = set(self._pseudonyms.values())
            pseudonym = PSEUDONYM_PREFIX + secrets.token_hex(5).upper()
            while pseudonym in taken:
                pseudonym = PSEUDONYM_PREFIX + secrets.token_hex(5).upper()
            validate_patient_id(pseudonym, where="pseudonym")
            self._save({**self._pseudonyms, key: pseudonym})
            self._pseudonyms[key] = pseudonym
            return pseudonym

    def _save(self, pseudonyms: dict[str, str]) -> None:
        patients = []
        for key, pseudonym in sorted(pseudonyms.items(), key=lambda item: item[1]):
            issuer, patient_id = key.split("\\", 1)
            patients.append({"pseudonym": pseudonym, "patient_id": patient_id, "issuer": issuer})
        payload = json.dumps({"format": TABLE_FORMAT, "patients": patients}, indent=1).encode()
        with atomic_path(self.path, suffix=".json") as tmp:
            os.chmod(tmp, 0o600)
            tmp.write_bytes(payload)
