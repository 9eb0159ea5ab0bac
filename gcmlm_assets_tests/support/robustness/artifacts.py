"""A small cohort materialized into a data root, and what the robustness tests check of its artifacts:
that every visible file is complete, and whether two trees hold the same outputs.

"Visible" means every file under the artifacts root whose path has no component with the storage's
temporary prefix (`.tmp-`): readers only ever open final names (storage.py).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gcmlm_assets.storage import TMP_PREFIX, VERSION_POINTER, ArtifactStore, read_version_pointer, sha256_file, \
    version_intact

PATIENT_ASSETS = ("ct_image", "ct_mask", "radiomics_row", "patch_coords", "uni_features", "slide_vector")
RADIOLOGY = ("ct_image", "ct_mask", "radiomics_row")
PATHOLOGY = ("patch_coords", "uni_features", "slide_vector")
COHORT_ASSETS = ("clinical_table", "fused_table", "risk_model", "risk_scores")


@dataclass(frozen=True)
class DataRoot:
    """One data root: the shared landing zone, its own artifacts and Dagster instance."""

    root: Path
    landing: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def env(self) -> dict[str, str]:
        return {"GCMLM_DATA_ROOT": str(self.root), "GCMLM_LANDING_ROOT": str(self.landing),
                "GCMLM_ARTIFACTS_ROOT": str(self.artifacts), "DAGSTER_HOME": str(self.home)}


def scan_keys(landing: Path, patient_id: str) -> list[str]:
    """The `ct_scans` partition keys of a patient's drop (its only scan: the patient id)."""
    from gcmlm_assets.scans import list_drop_scans, scan_key

    return [scan_key(patient_id, scan.timepoint) for scan in list_drop_scans(landing / patient_id).scans]


def prepare_root(root: Path, landing: Path, patient_ids: list[str]) -> DataRoot:
    """A fresh artifacts folder and Dagster instance (SQLite) with the patients' partitions and
    their CT scans'."""
    import dagster as dg

    from gcmlm_assets.demo.daemon import prepare_dagster_home
    from gcmlm_assets.partitions import ct_scans_partitions, patients_partitions

    data = DataRoot(root, landing)
    data.artifacts.mkdir(parents=True)
    prepare_dagster_home(data.home)
    with dg.DagsterInstance.from_config(str(data.home)) as instance:
        instance.add_dynamic_partitions(patients_partitions.name, patient_ids)
        instance.add_dynamic_partitions(ct_scans_partitions.name,
                                        [key for pid in patient_ids for key in scan_keys(landing, pid)])
    return data


def materialize_cohort(server, data: DataRoot, plans) -> None:
    """Every patient (radiology only for its scans with a reference mask, so no nnU-Net is trained; a
    run per scan, the radiology assets' partitions), then the cohort."""
    from gcmlm_assets.radiology.model_lifecycle import has_reference_mask

    for plan in plans:
        for key in scan_keys(data.landing, plan.patient_id):
            if has_reference_mask(data.landing, key):
                server.materialize(data.env, list(RADIOLOGY), key)
        server.materialize(data.env, list(PATHOLOGY), plan.patient_id)
    server.materialize(data.env, list(COHORT_ASSETS))


# ---------------------------------------------------------------- what is visible


def is_temporary(path: Path, root: Path) -> bool:
    return any(part.startswith(TMP_PREFIX) for part in path.relative_to(root).parts)


def temporaries(root: Path) -> list[str]:
    """Leftover temporaries (top-most temporary entries only), relative to `root`."""
    found = set()
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        for i, part in enumerate(parts):
            if part.startswith(TMP_PREFIX):
                found.add("/".join(parts[: i + 1]))
                break
    return sorted(found)


def visible_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not is_temporary(p, root))


def _open_fully(path: Path) -> None:
    """Read the whole file in its own format; raises on a truncated or damaged one."""
    name = path.name
    if name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"))
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.read_table(path)
    elif name.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as handle:
            for key in handle:
                handle[key][()]
            if "features" in handle and handle["features"].shape[0] != handle["coords"].shape[0]:
                raise ValueError(f"{path}: {handle['features'].shape[0]} feature rows for "
                                 f"{handle['coords'].shape[0]} coordinates")
    elif name.endswith(".nii.gz"):
        import SimpleITK as sitk

        sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif name.endswith(".skops"):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad:
                raise ValueError(f"{path}: member {bad} is damaged")
    elif path.stat().st_size == 0:
        raise ValueError(f"{path}: empty")


def visible_damage(artifacts: Path) -> list[str]:
    """Every problem a reader could meet: a visible file that does not open in full, a manifest or
    version pointer whose listed files are missing or differ from the recorded sha256."""
    problems = []
    for path in visible_files(artifacts):
        try:
            _open_fully(path)
        except Exception as error:  # any failure to read is what this looks for
            problems.append(f"{path.relative_to(artifacts)}: {type(error).__name__}: {error}")
        if path.name == ArtifactStore.MANIFEST:
            for name, digest in json.loads(path.read_text(encoding="utf-8")).get("files", {}).items():
                listed = path.parent / name
                if not listed.is_file() or sha256_file(listed) != digest:
                    problems.append(f"{listed.relative_to(artifacts)}: not the file its manifest lists")
        if path.name == VERSION_POINTER and "folder" in json.loads(path.read_text(encoding="utf-8")):
            problems += _model_pointer_damage(path, artifacts)
        elif path.name == VERSION_POINTER:
            pointer = read_version_pointer(path.parent)
            if pointer is None or not version_intact(path.parent, pointer):
                problems.append(f"{path.relative_to(artifacts)}: points at a missing or changed version")
    return problems


def _model_pointer_damage(path: Path, artifacts: Path) -> list[str]:
    """segmentation_model's current.json: the folder it names holds the checkpoints it pins."""
    from gcmlm_assets.radiology.nnunet import ModelFolderError, installed_model_pins

    pointer = json.loads(path.read_text(encoding="utf-8"))
    try:
        installed_model_pins(path.parent, pointer).verify(path.parent / pointer["folder"])
    except (ModelFolderError, OSError) as error:
        return [f"{path.relative_to(artifacts)}: names an incomplete or changed model: {error}"]
    return []


# ---------------------------------------------------------------- comparing outputs


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every visible file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in visible_files(folder)} if folder.is_dir() else {}


def without_timing(manifest: Path) -> dict:
    """A manifest without the wall-clock seconds some record (radiomics_row's `seconds`)."""
    content = json.loads(manifest.read_text(encoding="utf-8"))
    content.pop("seconds", None)
    return content
