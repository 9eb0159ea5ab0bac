"""One asset output in the artifact store, reused when it was made from the same inputs.

Every single-folder asset goes the same way: fingerprint its inputs (their hashes, the asset's code
version from catalogue.py, its settings) -> reuse the stored output if its manifest names that
fingerprint and its files still hash as recorded, else compute and write the files atomically ->
record the manifest (`fingerprint`, `files`: name -> sha256, and the asset's own facts) -> data
version from a file's sha256. `StoredOutput` is that path; `policies.stored_materialization` turns it
into the Dagster materialization (data version, checks, quarantine on a blocking failure).

An output whose files must be read together (`risk_model`) takes the same path with a versioned
folder instead of a manifest: `VersionedOutput` keeps the fingerprint and the files' hashes in the
pointer `current.json` that names the folder (storage.publish_version).

Plain Python (no Dagster). The fingerprint formula stays each asset's own: changing it recomputes
every stored output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gcmlm_assets.catalogue import Asset, AssetFile
from gcmlm_assets.storage import (
    ArtifactStore, new_version_folder, publish_version, read_version_pointer, sha256_file, sha256_text, version_intact)


def combined_digest(digests: Mapping[str, str]) -> str:
    """One hash for a set of named files' hashes (independent of their order)."""
    return sha256_text(*(f"{name}:{digest}" for name, digest in sorted(digests.items())))


class StoredOutput:
    """The output of `asset` (for `patient_id`, when partitioned) made from `fingerprint`.

    On creation the stored manifest is looked up: `reused` is True when it names `fingerprint` and
    every file it lists is intact, and `manifest` is then that manifest. Otherwise the caller writes
    the files into `folder` and calls `record`. `look_up=False` skips the lookup, for an asset that
    reuses its files one by one itself (uni_features reuses each slide's).
    """

    def __init__(self, store: ArtifactStore, asset: Asset, patient_id: str | None, fingerprint: str,
                 *, look_up: bool = True):
        self.store, self.asset, self.patient_id, self.fingerprint = store, asset, patient_id, fingerprint
        self.folder = asset.folder(store, patient_id)
        self.manifest: dict | None = store.reusable(asset.key, patient_id, fingerprint) if look_up else None
        self.reused = self.manifest is not None

    def path(self, file: AssetFile) -> Path:
        return file.in_folder(self.folder)

    def record(self, files: Iterable[AssetFile] | Mapping[str, Path], **facts: Any) -> dict:
        """Hash the written files (catalogue files in `folder`, or name -> path of files written under
        another name and renamed since) and write the manifest atomically. Returns the manifest."""
        paths = files if isinstance(files, Mapping) else {file.name: self.path(file) for file in files}
        return self.record_digests({name: sha256_file(path) for name, path in paths.items()}, **facts)

    def record_digests(self, digests: Mapping[str, str], **facts: Any) -> dict:
        """Write the manifest for files already hashed (name -> sha256). Returns the manifest."""
        manifest = {"fingerprint": self.fingerprint, "files": dict(digests), **facts}
        self.store.write_manifest(self.asset.key, self.patient_id, manifest)
        self.manifest = manifest
        return manifest

    def sha256(self, file: AssetFile) -> str:
        """The recorded hash of one of the output's files: its data version when it is the main file."""
        if self.manifest is None:
            raise RuntimeError(f"{self.asset.key}: no manifest yet (record the output first)")
        return self.manifest["files"][file.name]

    def files_digest(self) -> str:
        """One hash for all of the output's files: the data version of a multi-file output."""
        if self.manifest is None:
            raise RuntimeError(f"{self.asset.key}: no manifest yet (record the output first)")
        return combined_digest(self.manifest["files"])


class VersionedOutput:
    """The published version of the unpartitioned `asset` made from `fingerprint`: StoredOutput for
    files that are read together.

    Each version is a folder `<asset>/<version>/` named by its files' hashes; `current.json` names the
    current one and holds what a manifest holds (`fingerprint`, `files`: name -> sha256, the asset's
    facts) with `version` and `recent_versions`. On creation `reused` is True when the current version
    names `fingerprint` and its files are intact; `pointer` is then its pointer. Otherwise the caller
    writes the files into `staging()` and calls `publish`.
    """

    def __init__(self, store: ArtifactStore, asset: Asset, fingerprint: str):
        self.store, self.asset, self.fingerprint = store, asset, fingerprint
        self.root = asset.folder(store)
        current = read_version_pointer(self.root)
        self.reused = (current is not None and current.get("fingerprint") == fingerprint
                       and version_intact(self.root, current))
        self.pointer: dict | None = current if self.reused else None

    def staging(self) -> Path:
        """An empty folder to write the new version's files into (a stale temporary if never published)."""
        return new_version_folder(self.root)

    def publish(self, staging: Path, **facts: Any) -> dict:
        """Install `staging`'s files as the current version, its pointer recording the fingerprint and
        `facts`. Returns the pointer."""
        self.pointer = publish_version(self.root, staging, {"fingerprint": self.fingerprint, **facts})
        return self.pointer

    @property
    def folder(self) -> Path:
        """The current version's folder."""
        return self.root / self._pointer()["version"]

    def sha256(self, file: AssetFile) -> str:
        """The recorded hash of one of the version's files: its data version when it is the main file."""
        return self._pointer()["files"][file.name]

    def _pointer(self) -> dict:
        if self.pointer is None:
            raise RuntimeError(f"{self.asset.key}: no version yet (publish one first)")
        return self.pointer
