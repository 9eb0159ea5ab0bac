"""A deterministic synthetic gastric-cancer cohort written into a landing zone (plain Python, no Dagster).

Each patient gets what a real upload would hold (see the README's landing-zone contract):

- `ct/IM00001.dcm ...`: a small abdominal CT in HU with a stomach (synthetic_ct.py), as a DICOM
  series (synthetic_dicom.py), so that its mask goes back as a DICOM SEG of that series.
- `ct_label/stomach.nii.gz`: the reference stomach mask (uint8, the CT's grid) for half of the
  patients, balanced over the label; the others are segmented by the trained nnU-Net.
- For part of the cohort (`followup_fraction`), two CTs instead: `ct/<date>/` per scan date (ISO,
  the first exactly the CT such a patient would have had alone, the second 60-120 days later with a
  planted change, synthetic_plan.py) and, where the patient has reference masks, one per scan in
  `ct_label/<date>/stomach.nii.gz`.
- `wsi/<id>_slide<k>.tiff`: one or two pyramidal tiled TIFFs with H&E-like tissue
  (synthetic_slides.py).
- `ln_wsi/<id>_ln<k>.tiff`: for part of the cohort (`ln_fraction`), one lymph-node slide each (a
  second for a share `ln_second_slide` of them, none by default; pyramidal tiled TIFFs, 0.5 µm/px)
  with `ln_nodes` (2-3 by default) separated nodes, some holding tumour (synthetic_lymph_nodes.py).
- `ln_annotations/<id>_ln<k>.geojson`: for a few of those patients, the planted nodes and tumour
  regions as a QuPath GeoJSON export ("Lymph node" and "Tumor" annotations, level-0 px).
- `READY` (written last) and the cohort's `clinical.csv` (patient_id, mlm, age, sex, pt_stage,
  tumour_size_mm).

What is drawn for each patient, the planted signal included, is in synthetic_plan.py. Beside the
patient folders, `.lymph_node_truth.json` holds the planted lymph nodes (per slide: centre, bounding
box, area, tumour area, metastatic) and each patient's totals and T/MLN, for the demo summary to
compare against (`read_lymph_node_truth`); the landing scan does not look at it.

Everything is drawn from `numpy.random.default_rng([seed, patient_index, ...])`, so a cohort is
byte-identical for the same settings; files whose bytes would not change are left untouched
(their times too), so the landing sensor sees no change when a cohort is written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gcmlm_assets.demo.synthetic_ct import make_ct, nifti_bytes
from gcmlm_assets.demo.synthetic_dicom import dicom_series_files
from gcmlm_assets.demo.synthetic_lymph_nodes import annotation_geojson, patient_layouts, patient_truth, render_slide
from gcmlm_assets.demo.synthetic_plan import CohortSpec, PatientPlan, clinical_csv_text, plan_cohort
from gcmlm_assets.demo.synthetic_slides import make_slide, pyramidal_tiff_bytes
from gcmlm_assets.landing.scan import (
    CLINICAL_CSV,
    CT_FOLDER,
    LN_ANNOTATIONS_FOLDER,
    LN_WSI_FOLDER,
    READY_MARKER,
    WSI_FOLDER,
)
from gcmlm_assets.scans import scan_folders
from gcmlm_assets.storage import atomic_write_bytes, sha256_file

# Bump when the bytes the generator writes would change for the same settings.
# 2: the CTs (the real patient's too) are DICOM series instead of one ct.nii.gz.
# 3: lymph-node slides (ln_wsi/) and annotations (ln_annotations/) for part of the cohort.
# 4: a second CT (ct/<date>/, ct_label/<date>/) for part of the cohort; the CTs' UIDs leave out the
#    second CT's settings.
GENERATOR_VERSION = "4"
FOLLOWUP_SETTINGS = ("followup_fraction", "followup_days", "followup_signal_strength", "followup_change")
# Kept outside every patient folder; the landing scan only looks at folders and clinical.csv.
COHORT_MANIFEST = ".synthetic_cohort.json"
LYMPH_NODE_TRUTH = ".lymph_node_truth.json"
# The real patient blended in from GCMLM_TEST_DATA (label unknown: scored, never trained on).
REAL_PATIENT_ID = "REAL0001"


@dataclass
class CohortResult:
    landing: Path
    patients: list[PatientPlan]
    written: list[str] = field(default_factory=list)  # files whose bytes changed
    unchanged: int = 0
    real_patient: str | None = None

    @property
    def patient_ids(self) -> list[str]:
        ids = [p.patient_id for p in self.patients]
        return ids + ([self.real_patient] if self.real_patient else [])


# ---------------------------------------------------------------- writing


def _write_if_changed(path: Path, data: bytes, written: list[str]) -> bool:
    """Replace `path` atomically only when its bytes differ, so unchanged files keep their times."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    written.append(str(path))
    return True


def _drop_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _stale_files(folder: Path, keep: set[str]) -> list[Path]:
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(folder)) not in keep]


def write_patient(landing: Path, plan: PatientPlan, spec: CohortSpec, written: list[str]) -> bool:
    """Write one patient's drop; READY last. Returns whether any file changed."""
    folder = landing / plan.patient_id
    files: dict[str, bytes] = {}
    # The first CT is the same bytes whether or not a second follows (`_scan_identity`).
    timepoints = plan.scan_dates or (None,)
    for k, timepoint in enumerate(timepoints):
        ct_folder, reference_folder = scan_folders(timepoint)
        ct, mask = make_ct(plan, spec, followup=k > 0)
        identity = _scan_identity(spec, plan) + (f"@{timepoint}" if k > 0 else "")
        series = dicom_series_files(ct, plan.patient_id, identity, "synthetic abdominal CT")
        files.update({f"{ct_folder}/{name}": data for name, data in series.items()})
        if plan.has_reference_mask:
            files[f"{reference_folder}/stomach.nii.gz"] = nifti_bytes(mask)
    rng = np.random.default_rng([spec.seed, 3, plan.index])
    for k in range(plan.n_slides):
        width = int(rng.integers(spec.slide_width[0], spec.slide_width[1] + 1))
        height = int(width * spec.slide_aspect)
        rgb = make_slide(rng, width, height, plan.pathology_severity, spec.mpp)
        files[f"{WSI_FOLDER}/{plan.patient_id}_slide{k + 1}.tiff"] = pyramidal_tiff_bytes(
            rgb, spec.mpp, spec.pyramid_levels, spec.jpeg_quality)
    for k, layout in enumerate(patient_layouts(plan, spec)):
        rgb = render_slide(layout, plan, k, spec)
        files[f"{LN_WSI_FOLDER}/{layout.name}.tiff"] = pyramidal_tiff_bytes(rgb, spec.mpp, spec.pyramid_levels,
                                                                            spec.jpeg_quality)
        del rgb
        if plan.ln_annotated:
            files[f"{LN_ANNOTATIONS_FOLDER}/{layout.name}.geojson"] = annotation_geojson(layout)
    return _write_drop(folder, files, written)


def _write_drop(folder: Path, files: dict[str, bytes], written: list[str]) -> bool:
    before = len(written)
    stale = _stale_files(folder, set(files) | {READY_MARKER}) if folder.is_dir() else []
    changes = stale or any(not (folder / rel).is_file() or (folder / rel).read_bytes() != data
                           for rel, data in files.items())
    if changes:
        # Like an uploader replacing a drop: withdraw READY, write, then READY again.
        (folder / READY_MARKER).unlink(missing_ok=True)
        for path in stale:
            path.unlink()
            written.append(f"removed {path}")
        for rel, data in files.items():
            _write_if_changed(folder / rel, data, written)
    if not (folder / READY_MARKER).is_file():
        atomic_write_bytes(folder / READY_MARKER, b"complete\n")
        written.append(str(folder / READY_MARKER))
    return len(written) > before


@dataclass(frozen=True)
class RealFiles:
    """Real test files (GCMLM_TEST_DATA) that make up one extra patient."""

    ct: Path
    stomach_mask: Path
    slide: Path

    @classmethod
    def find(cls, test_data: str | os.PathLike | None) -> RealFiles | None:
        if not test_data:
            return None
        root = Path(test_data)
        files = cls(root / "ct/totalsegmentator/example_ct_sm.nii.gz",
                    root / "ct/totalsegmentator/example_ct_sm_stomach.nii.gz",
                    root / "wsi/cmu-1-small-region.svs")
        return files if all(p.is_file() for p in (files.ct, files.stomach_mask, files.slide)) else None


def write_real_patient(landing: Path, real: RealFiles, written: list[str]) -> bool:
    """The real TotalSegmentator CT (as a DICOM series of its voxels) with its stomach mask and the
    real CMU-1 H&E region."""
    import SimpleITK as sitk

    series = dicom_series_files(sitk.ReadImage(str(real.ct)), REAL_PATIENT_ID, sha256_file(real.ct),
                                f"TotalSegmentator {real.ct.name}")
    files = {
        **{f"{CT_FOLDER}/{name}": data for name, data in series.items()},
        "ct_label/stomach.nii.gz": real.stomach_mask.read_bytes(),
        f"{WSI_FOLDER}/{real.slide.name}": real.slide.read_bytes(),
    }
    return _write_drop(landing / REAL_PATIENT_ID, files, written)


def _scan_identity(spec: CohortSpec, plan: PatientPlan) -> str:
    """What the first CT's DICOM UIDs derive from: the plan and settings without the second CT's, so
    that a patient's first CT is the same bytes with or without a second one."""
    spec_values = {k: v for k, v in spec.as_dict().items() if k not in FOLLOWUP_SETTINGS}
    plan_values = {k: v for k, v in asdict(plan).items() if k not in ("scan_dates", "radiology_change")}
    text = json.dumps({"version": GENERATOR_VERSION, "spec": spec_values, "plan": plan_values}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _plan_digest(spec: CohortSpec, plan: PatientPlan) -> str:
    text = json.dumps({"version": GENERATOR_VERSION, "spec": spec.as_dict(), "plan": asdict(plan)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def lymph_node_truth_bytes(plans: list[PatientPlan], spec: CohortSpec) -> bytes:
    """The planted lymph nodes of every patient with lymph-node slides (shapes only, no pixels)."""
    truth = {p.patient_id: patient_truth(p, spec) for p in plans if p.ln_slides}
    return json.dumps({"generator_version": GENERATOR_VERSION, "mpp": spec.mpp, "patients": truth},
                      indent=1, sort_keys=True).encode()


def read_lymph_node_truth(landing: str | os.PathLike) -> dict[str, dict]:
    """Patient id -> {"annotated", "slides": [{"name", "width", "height", "mpp", "nodes": [{"id",
    "centre_level0", "bbox_level0", "area_mm2", "tumour_area_mm2", "metastatic", "tumour_regions"}]}],
    "totals": the lymph_nodes row's values}, as `write_cohort` left it in `landing`."""
    path = Path(landing) / LYMPH_NODE_TRUTH
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no lymph-node truth; write the synthetic cohort first") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("patients"), dict):
        raise ValueError(f"{path}: no 'patients' mapping; not a lymph-node truth file")
    return document["patients"]


def write_cohort(landing: str | os.PathLike, spec: CohortSpec | None = None, *,
                 real: RealFiles | None = None, progress=None) -> CohortResult:
    """Write (or confirm) the cohort in `landing`.

    A patient whose folder still holds exactly the bytes recorded for the same generator version,
    settings and plan is skipped without regenerating it; otherwise it is regenerated and only
    files whose bytes differ are replaced. Patients of an earlier, larger cohort with the same id
    prefix are removed, so the landing zone holds exactly this cohort.
    """
    spec = spec or CohortSpec()
    landing = Path(landing)
    landing.mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(spec)
    manifest_path = landing / COHORT_MANIFEST
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8")).get("patients", {})
    except (FileNotFoundError, json.JSONDecodeError):
        recorded = {}
    result = CohortResult(landing, plans)
    manifest: dict[str, dict] = {}
    for plan in plans:
        folder = landing / plan.patient_id
        digest = _plan_digest(spec, plan)
        entry = recorded.get(plan.patient_id, {})
        if (entry.get("plan") == digest and folder.is_dir() and (folder / READY_MARKER).is_file()
                and _drop_digest(folder) == entry.get("files")):
            result.unchanged += 1
            changed = False
        else:
            changed = write_patient(landing, plan, spec, result.written)
        manifest[plan.patient_id] = {"plan": digest, "files": _drop_digest(folder)}
        if progress:
            progress(plan, changed)
    ours = {p.patient_id for p in plans}
    for old in sorted(set(recorded) - ours - {REAL_PATIENT_ID}):
        if (landing / old).is_dir():
            shutil.rmtree(landing / old)
            result.written.append(f"removed {landing / old}")
    if real is not None:
        write_real_patient(landing, real, result.written)
        result.real_patient = REAL_PATIENT_ID
    elif REAL_PATIENT_ID in recorded and (landing / REAL_PATIENT_ID).is_dir():
        shutil.rmtree(landing / REAL_PATIENT_ID)
        result.written.append(f"removed {landing / REAL_PATIENT_ID}")
    if result.real_patient:
        manifest[REAL_PATIENT_ID] = {"plan": "real", "files": _drop_digest(landing / REAL_PATIENT_ID)}
    _write_if_changed(landing / CLINICAL_CSV, clinical_csv_text(plans, result.real_patient).encode(),
                      result.written)
    _write_if_changed(landing / LYMPH_NODE_TRUTH, lymph_node_truth_bytes(plans, spec), result.written)
    atomic_write_bytes(manifest_path, json.dumps(
        {"generator_version": GENERATOR_VERSION, "spec": spec.as_dict(), "patients": manifest},
        indent=1, sort_keys=True).encode())
    return result


__all__ = ["CohortResult", "LYMPH_NODE_TRUTH", "RealFiles", "read_lymph_node_truth", "write_cohort",
           "REAL_PATIENT_ID"]
