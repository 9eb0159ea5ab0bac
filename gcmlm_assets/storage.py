"""Artifact storage: where each asset's files live, atomic writes, content hashes.

Plain Python (no Dagster): the `ArtifactStorage` resource in `resources.py` wraps it.
Layout: `<root>/<asset>/<patient_id>/<file>` for partitioned assets and
`<root>/<asset>/<file>` for cohort-level ones. Every write goes to a temporary
name in the destination folder and is renamed into place, so a reader never
sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gcmlm_assets.patients import validate_patient_id

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    The temporary name keeps the final suffix (e.g. `.nii.gz`) so that writers
    that choose a format from the extension still work.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + final.name.split(".")[0] + "-",
                                    suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0 and not _allow_empty(final):
            raise OSError(f"writer produced no data for {final}")
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _allow_empty(final: Path) -> bool:
    return final.suffix in (".txt", ".csv")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_json(final: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write_bytes(final, text.encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


# A temporary untouched this long belongs to a killed writer. Younger ones may belong to a run
# still writing (two runs of one patient can overlap), so they are left alone.
STALE_TEMPORARY_S = 24 * 3600


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def remove_stale_temporaries(folder: Path, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Delete temporaries (files, or folders such as a training's work folder) that a killed writer
    left behind: never read, and removed once nothing in them changed for `older_than_s`."""
    import shutil
    import time

    removed = 0
    if folder.is_dir():
        cutoff = time.time() - older_than_s
        for entry in folder.iterdir():
            if not entry.name.startswith(TMP_PREFIX):
                continue
            with contextlib.suppress(OSError):
                if _newest_mtime(entry) >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    return removed


class ArtifactStore:
    """Paths and manifests under one root folder (local disk or a mounted volume)."""

    MANIFEST = "_manifest.json"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def asset_dir(self, asset: str, patient_id: str | None = None, *, create: bool = True) -> Path:
        folder = self.root / asset
        if patient_id is not None:
            folder = folder / validate_patient_id(patient_id, where=f"artifact folder of {asset}")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
        return folder

    def path(self, asset: str, patient_id: str | None, filename: str) -> Path:
        return self.asset_dir(asset, patient_id, create=False) / filename

    # A manifest records what an output was made from; an unchanged fingerprint
    # lets an asset skip recomputation and reuse its bytes.
    def read_manifest(self, asset: str, patient_id: str | None) -> dict | None:
        path = self.path(asset, patient_id, self.MANIFEST)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, asset: str, patient_id: str | None, manifest: dict) -> Path:
        return atomic_write_json(self.path(asset, patient_id, self.MANIFEST), manifest)

    def reusable(self, asset: str, patient_id: str | None, fingerprint: str) -> dict | None:
        """The manifest, if the stored output was made from `fingerprint` and its files are intact."""
        manifest = self.read_manifest(asset, patient_id)
        if not manifest or manifest.get("fingerprint") != fingerprint:
            return None
        for name, digest in manifest.get("files", {}).items():
            path = self.path(asset, patient_id, name)
            if not path.is_file() or sha256_file(path) != digest:
                return None
        return manifest
