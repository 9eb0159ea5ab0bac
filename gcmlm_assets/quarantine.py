"""An output that fails a blocking QC check is moved out of where downstream assets read it.

Dagster stops the downstream steps of the same run when a blocking check fails, but the file
would stay at its canonical path, where a later run or the cohort fusion would read it. So the
asset's whole patient folder is renamed, in one step, to
`<artifacts>/_quarantine/<asset>/<patient>/<time>-<id>/` with a `quarantine.json` that says why.
A reader then finds no output (and fails or skips with "missing"); the next materialization
computes afresh. A cohort output (risk_model, risk_scores) is checked before it is published: one
that fails goes from its staging folder to `<artifacts>/_quarantine/<asset>/<time>-<id>/`, and the
published version stays the one readers see. Plain Python: the check results only need
`check_name`, `passed` and `severity`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from gcmlm_assets.storage import ArtifactStore, atomic_write_json

QUARANTINE_FOLDER = "_quarantine"
REASON_FILE = "quarantine.json"


def blocking_failures(results: Iterable, blocking_checks: Iterable[str]) -> list[str]:
    """Names of the blocking checks that failed with ERROR severity (what stops downstream)."""
    blocking = set(blocking_checks)
    return [r.check_name for r in results
            if r.check_name in blocking and not r.passed and str(getattr(r.severity, "value", r.severity)) == "ERROR"]


def quarantine_output(store: ArtifactStore, asset: str, patient_id: str | None, failed_checks: list[str],
                      detail: dict | None = None) -> Path | None:
    """Move the asset's folder of `patient_id` (None: of the unpartitioned asset) into quarantine;
    None when there is nothing to move."""
    folder = store.asset_dir(asset, patient_id, create=False)
    if not folder.is_dir():
        return None
    return _move_into_quarantine(store, asset, patient_id, folder, failed_checks, detail)


def quarantine_unpublished(store: ArtifactStore, asset: str, staging: Path, failed_checks: list[str],
                           detail: dict | None = None) -> Path:
    """Move a cohort output that failed a blocking check before it was published (its staging
    folder, on the artifact store's filesystem) into quarantine; the published output stays as it was."""
    return _move_into_quarantine(store, asset, None, staging, failed_checks, detail)


def _move_into_quarantine(store: ArtifactStore, asset: str, patient_id: str | None, folder: Path,
                          failed_checks: list[str], detail: dict | None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    destination = store.root / QUARANTINE_FOLDER / asset
    if patient_id is not None:
        destination = destination / patient_id
    destination = destination / f"{stamp}-{uuid.uuid4().hex[:8]}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, destination)  # one rename: readers see the whole output or none of it
    atomic_write_json(destination / REASON_FILE, {
        "asset": asset, "patient_id": patient_id, "failed_checks": failed_checks,
        "moved_from": str(folder), "at": stamp, **(detail or {})})
    return destination


def quarantine_if_failed(store: ArtifactStore, asset: str, patient_id: str, results: list,
                         blocking_checks: Iterable[str]) -> Path | None:
    """Quarantine the output when any blocking check failed; the new folder, or None."""
    failed = blocking_failures(results, blocking_checks)
    return quarantine_output(store, asset, patient_id, failed) if failed else None
