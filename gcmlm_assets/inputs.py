"""How a step finds another asset's file: the catalogue's path, or a Failure that names the file
and what to materialize first (without retries: a retry cannot make the file appear)."""

from pathlib import Path

import dagster as dg

from gcmlm_assets.catalogue import AssetFile, MissingAssetFile
from gcmlm_assets.storage import ArtifactStore


def required_file(file: AssetFile, store: ArtifactStore, patient_id: str | None = None) -> Path:
    try:
        return file.required(store, patient_id)
    except MissingAssetFile as missing:
        raise dg.Failure(description=str(missing), metadata={"missing": str(file.path(store, patient_id))},
                         allow_retries=False) from missing
