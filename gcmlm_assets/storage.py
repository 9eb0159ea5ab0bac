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
from gcmlm_assets.scans import SEPARATOR, InvalidScanKey, parse_scan_key

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


@contextlib.contextmanager
def files_replaced_together(folder: str | os.PathLike, names: list[str],
                            withdraw: str | os.PathLike | None = None) -> Iterator[dict[str, Path]]:
    """Yield a temporary path for each of `names` (files of one output in `folder`); once the block
    succeeds, rename them all onto their final names.

    For rewriting an output that already exists: while the block writes, the previous files stay
    untouched and complete. The renames come last and close together; `withdraw` (the output's
    manifest) is removed before the first, so a kill between two renames leaves files without a
    manifest (recomputed on the next run), never a manifest that lists other files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for name in names:
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + name.split(".")[0] + "-",
                                            suffix="".join(Path(name).suffixes) or ".tmp", dir=folder)
            os.close(fd)
            staged[name] = Path(tmp_name)
        yield staged
        for name, tmp in staged.items():
            if tmp.stat().st_size == 0 and not _allow_empty(folder / name):
                raise OSError(f"writer produced no data for {folder / name}")
            _fsync_file(tmp)
        if withdraw is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(withdraw)
        for name, tmp in staged.items():
            _rename_into_place(tmp, folder / name)
        _fsync_dir(folder)
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def _rename_into_place(tmp: Path, final: Path) -> None:
    # A function of its own so that the kill tests can pause between two renames.
    os.replace(tmp, final)


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


def _partition_folder(key: str, where: str) -> str:
    """A partition key as a folder name: a patient id, or a CT scan's key (`<patient>@<timepoint>`,
    gcmlm_assets/scans.py) for the radiology assets; anything else is refused naming `where`."""
    if SEPARATOR not in key:
        return validate_patient_id(key, where=where)
    try:
        parse_scan_key(key)
    except InvalidScanKey as error:
        raise InvalidScanKey(f"{error} ({where})") from error
    return key


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DigestMismatch(ValueError):
    """A pinned file's bytes are not the ones its pin names."""

    def __init__(self, path: str | os.PathLike, expected: str, found: str):
        super().__init__(f"{path}: SHA-256 {found}, expected {expected}")
        self.path, self.expected, self.found = Path(path), expected, found


def read_pinned_bytes(path: str | os.PathLike, sha256: str) -> bytes:
    """The file's bytes, read once and checked against its pin: a loader that then reads from these
    bytes loads exactly what was checked, even if the file is swapped meanwhile. Raises DigestMismatch."""
    data = Path(path).read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DigestMismatch(path, sha256, found)
    return data


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
            folder = folder / _partition_folder(patient_id, f"artifact folder of {asset}")
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
            return json.loads(path.read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------- versioned multi-file outputs
# An output made of several files is written into a temporary folder, renamed to a folder named
# by its content, and published by atomically replacing a small pointer file. A reader that reads
# the pointer once and then only that folder always sees one complete, consistent set.
# `publish_version` / `read_version_pointer` are risk_model's and risk_explanations' pointer;
# segmentation_model's (radiology/nnunet.py) names a model folder and pins its checkpoints, and is
# read and written through the same `read_pointer` / `write_pointer`.

VERSION_POINTER = "current.json"
VERSIONS_KEPT = 3
_VERSION_NAME_LENGTH = 16


def new_version_folder(root: str | os.PathLike) -> Path:
    """An empty folder inside `root` to write one version's files into before `publish_version`.

    Its name starts with TMP_PREFIX, so a killed writer's folder is removed as a stale temporary.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "version-", dir=root))


def read_pointer(root: str | os.PathLike) -> dict | None:
    """The `current.json` in `root` as a dict, or None when there is none (or it is not a JSON object)."""
    try:
        pointer = json.loads((Path(root) / VERSION_POINTER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return pointer if isinstance(pointer, dict) else None


def write_pointer(root: str | os.PathLike, pointer: dict) -> Path:
    """Replace `root`'s `current.json` atomically: a reader sees the previous pointer or this one."""
    return atomic_write_json(Path(root) / VERSION_POINTER, pointer)


def read_version_pointer(root: str | os.PathLike) -> dict | None:
    """The pointer of a versioned output, or None when there is none (or it is not a pointer)."""
    pointer = read_pointer(root)
    if pointer is None or not _is_version_name(pointer.get("version")):
        return None
    return pointer


def version_intact(root: str | os.PathLike, pointer: dict) -> bool:
    """Every file the pointer lists is in its version folder with the recorded hash."""
    folder = Path(root) / pointer["version"]
    for name, digest in pointer.get("files", {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def publish_version(root: str | os.PathLike, staging: Path, extra: dict | None = None,
                    keep: int = VERSIONS_KEPT) -> dict:
    """Install the files in `staging` as a new version of the output in `root`, point at it, prune.

    The version's name is a short hash of its files' names and contents; an identical version
    already installed is reused. Returns the new pointer: `version`, `files` (name -> sha256),
    `recent_versions` (newest first, at most `keep`, the current one first) and `extra`'s keys.
    """
    root = Path(root)
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    if not files:
        raise OSError(f"{staging}: no files to publish")
    version = sha256_text(*(f"{name}={digest}" for name, digest in sorted(files.items())))[:_VERSION_NAME_LENGTH]
    final = root / version
    _install_folder(staging, final, files)
    previous = read_version_pointer(root) or {}
    recent = [version] + [v for v in previous.get("recent_versions", []) if v != version]
    pointer = {**(extra or {}), "version": version, "files": files, "recent_versions": recent[:max(keep, 1)]}
    write_pointer(root, pointer)
    prune_versions(root, pointer, dropped=set(recent[max(keep, 1):]))
    return pointer


def _install_folder(staging: Path, final: Path, files: dict[str, str]) -> None:
    import shutil

    if final.is_dir() and version_intact(final.parent, {"version": final.name, "files": files}):
        shutil.rmtree(staging)  # the same content is installed already
        return
    if final.exists():
        shutil.rmtree(final)  # a damaged copy of this version: replaced by the complete one
    os.replace(staging, final)
    _fsync_dir(final.parent)


def prune_versions(root: str | os.PathLike, pointer: dict, dropped: set[str] = frozenset(),
                   older_than_s: float = STALE_TEMPORARY_S) -> list[str]:
    """Remove version folders the pointer no longer keeps: at once for those in `dropped` (just
    pushed out of `recent_versions`), after `older_than_s` for unlisted ones (they may be a
    concurrent writer's, renamed but not yet pointed at). Never the current or a kept version."""
    import shutil
    import time

    root = Path(root)
    kept = {pointer["version"], *pointer.get("recent_versions", [])}
    cutoff = time.time() - older_than_s
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name in kept or not _is_version_name(entry.name) or not entry.is_dir() or entry.is_symlink():
            continue
        with contextlib.suppress(OSError):
            if entry.name in dropped or _newest_mtime(entry) < cutoff:
                shutil.rmtree(entry)
                removed.append(entry.name)
    return removed


def _is_version_name(name) -> bool:
    return (isinstance(name, str) and len(name) == _VERSION_NAME_LENGTH
            and all(c in "0123456789abcdef" for c in name))
