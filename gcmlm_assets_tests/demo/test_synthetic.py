"""The synthetic cohort generator: deterministic bytes, readable files, a signal in both modalities."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import openslide
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from gcmlm_assets.cohort.tables.clinical import read_clinical_csv
from gcmlm_assets.demo import synthetic
from gcmlm_assets.demo.synthetic_ct import make_ct
from gcmlm_assets.demo.synthetic_plan import CLINICAL_COLUMNS, CohortSpec, plan_cohort
from gcmlm_assets.demo.synthetic_slides import make_slide
from gcmlm_assets.landing.scan import MODALITY_FOLDERS, scan_landing_zone
from gcmlm_assets.radiology import dicom_seg
from gcmlm_assets.scans import list_drop_scans

SPEC = CohortSpec.small(6, slide_width=(800, 900))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> synthetic.CohortResult:
    return synthetic.write_cohort(tmp_path_factory.mktemp("a") / "landing", SPEC)


def test_same_settings_give_identical_bytes(cohort, tmp_path):
    again = synthetic.write_cohort(tmp_path / "landing", SPEC)
    assert tree_digest(again.landing) == tree_digest(cohort.landing)
    other_seed = synthetic.write_cohort(tmp_path / "other", CohortSpec.small(
        6, slide_width=(800, 900), seed=SPEC.seed + 1))
    assert (tree_digest(other_seed.landing)["GC0001/ct/IM00010.dcm"]
            != tree_digest(cohort.landing)["GC0001/ct/IM00010.dcm"])


def test_rewriting_touches_nothing_and_repairs_a_damaged_drop(tmp_path):
    landing = tmp_path / "landing"
    synthetic.write_cohort(landing, SPEC)
    times = {p: p.stat().st_mtime_ns for p in landing.rglob("*") if p.is_file()}
    second = synthetic.write_cohort(landing, SPEC)
    assert second.written == [] and second.unchanged == SPEC.n_patients
    del times[landing / synthetic.COHORT_MANIFEST]  # bookkeeping, outside every patient folder
    assert all(p.stat().st_mtime_ns == t for p, t in times.items())

    damaged = landing / "GC0002" / "ct" / "IM00003.dcm"
    original = damaged.read_bytes()
    damaged.write_bytes(b"not a volume")
    third = synthetic.write_cohort(landing, SPEC)
    assert damaged.read_bytes() == original
    assert str(damaged) in third.written and third.unchanged == SPEC.n_patients - 1


def test_smaller_cohort_removes_the_extra_patients(tmp_path):
    landing = tmp_path / "landing"
    synthetic.write_cohort(landing, SPEC)
    smaller = CohortSpec.small(4, slide_width=(800, 900))
    synthetic.write_cohort(landing, smaller)
    assert sorted(p.name for p in landing.iterdir() if p.is_dir()) == ["GC0001", "GC0002", "GC0003", "GC0004"]
    table, problems = read_clinical_csv(landing / "clinical.csv")
    assert problems == [] and table.patient_ids == ["GC0001", "GC0002", "GC0003", "GC0004"]


def test_drops_follow_the_landing_contract(cohort):
    plans = {p.patient_id: p for p in cohort.patients}
    scan = scan_landing_zone(cohort.landing)
    assert scan.invalid == [] and scan.not_ready == []
    assert sorted(d.patient_id for d in scan.drops) == sorted(plans)
    # Lymph-node slides (ln_wsi/) only for part of the cohort: their own modality where the scan has it.
    for drop in scan.drops:
        extra = {"lymph_node"} if plans[drop.patient_id].ln_slides and "lymph_node" in MODALITY_FOLDERS else set()
        assert set(drop.modalities) == {"radiology", "pathology"} | extra
    with_mask = [pid for pid, p in plans.items() if p.has_reference_mask]
    assert sorted(with_mask) == sorted(pid for pid in plans if (cohort.landing / pid / "ct_label").is_dir())
    # Half of each class has a reference mask, so which CTs nnU-Net segments does not follow the label.
    for label in (0, 1):
        members = [p for p in plans.values() if p.mlm == label]
        assert sum(p.has_reference_mask for p in members) == (len(members) + 1) // 2

    table, problems = read_clinical_csv(cohort.landing / "clinical.csv")
    assert problems == []
    assert table.patient_ids == sorted(plans)
    assert table.table.column("mlm").to_pylist() == [plans[p].mlm for p in sorted(plans)]
    assert set(table.table.column_names) == set(CLINICAL_COLUMNS)


def test_ct_and_mask_are_readable_and_aligned(cohort):
    plan = next(p for p in cohort.patients if p.has_reference_mask)
    ct_folder = cohort.landing / plan.patient_id / "ct"
    ct = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ct_folder)))
    mask = sitk.ReadImage(str(cohort.landing / plan.patient_id / "ct_label" / "stomach.nii.gz"))
    assert ct.GetSize() == SPEC.ct_size and ct.GetSpacing() == pytest.approx(SPEC.ct_spacing)
    # A DICOM series with its study, series and frame of reference: what a SEG can reference.
    assert dicom_seg.seg_absent_reason(ct_folder) is None
    assert sitk.GetArrayFromImage(ct).tolist() == sitk.GetArrayFromImage(make_ct(plan, SPEC)[0]).tolist()
    assert mask.GetPixelID() == sitk.sitkUInt8
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, attribute)() == pytest.approx(getattr(ct, attribute)())
    hu = sitk.GetArrayFromImage(ct)
    inside = sitk.GetArrayFromImage(mask).astype(bool)
    assert set(np.unique(inside)) == {False, True}
    assert hu.min() <= -950 and hu.max() >= 200  # air and bone
    # The stomach (wall + contents) is soft tissue, darker than bone and far brighter than fat or air.
    assert -40 < float(np.median(hu[inside])) < 110
    # Reoriented to LPS (what ct_image stores), the stomach lies on the patient's left.
    lps = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS"))
    columns = np.nonzero(lps)[2]
    assert columns.mean() > (SPEC.ct_size[0] - 1) / 2 - 4


def test_slides_open_in_openslide_with_resolution_and_pyramid(cohort):
    plan = cohort.patients[0]
    slides = sorted((cohort.landing / plan.patient_id / "wsi").glob("*.tiff"))
    assert len(slides) == plan.n_slides
    with openslide.OpenSlide(slides[0]) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(SPEC.mpp, rel=1e-3)
        assert slide.level_count == SPEC.pyramid_levels
        assert [round(d) for d in slide.level_downsamples] == [1, 2, 4][: slide.level_count]
        width, height = slide.dimensions
        assert SPEC.slide_width[0] <= width <= SPEC.slide_width[1]
        region = np.asarray(slide.read_region((width // 2 - 64, height // 2 - 64), 0, (128, 128)).convert("RGB"))
        corner = np.asarray(slide.read_region((0, 0), 0, (32, 32)).convert("RGB"))
    # H&E-like: the centre is tissue (pink/purple: red and blue above green), the corner is glass.
    assert region[..., 0].mean() > region[..., 1].mean() + 30 and region[..., 2].mean() > region[..., 1].mean() + 20
    assert corner.mean() > 225


def _purple_fraction(rgb: np.ndarray) -> float:
    return float(((rgb[..., 1] < 110) & (rgb[..., 2] > rgb[..., 0] - 20)).mean())


def test_planted_signal_is_in_both_modalities():
    """Measured on the generated images (not on the latent severities): the stomach volume and the
    share of nuclear (dark purple) pixels separate the classes, neither perfectly."""
    spec = CohortSpec.small(16)
    plans = plan_cohort(spec)
    labels = np.array([p.mlm for p in plans])
    assert labels.sum() == 8
    volumes, heterogeneity, nuclei = [], [], []
    for plan in plans:
        ct, mask = make_ct(plan, spec)
        inside = sitk.GetArrayFromImage(mask).astype(bool)
        volumes.append(inside.sum())
        heterogeneity.append(float(sitk.GetArrayFromImage(ct)[inside].std()))
        rng = np.random.default_rng([spec.seed, 3, plan.index])
        nuclei.append(_purple_fraction(make_slide(rng, 700, 520, plan.pathology_severity, spec.mpp)))
    for name, values in (("stomach volume", volumes), ("stomach HU SD", heterogeneity), ("nuclear pixels", nuclei)):
        auc = roc_auc_score(labels, values)
        assert 0.7 <= auc < 1.0, f"{name}: AUC {auc:.2f}"


def test_real_patient_is_blended_in_with_unknown_label(test_data, tmp_path):
    real = synthetic.RealFiles.find(test_data)
    assert real is not None
    result = synthetic.write_cohort(tmp_path / "landing", CohortSpec.small(2, slide_width=(600, 700)),
                                    real=real)
    folder = tmp_path / "landing" / synthetic.REAL_PATIENT_ID
    assert result.patient_ids[-1] == synthetic.REAL_PATIENT_ID
    # The real CT as a DICOM series of exactly its voxels, on its grid.
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "ct")))
    original = sitk.ReadImage(str(real.ct))
    assert (sitk.GetArrayFromImage(series) == sitk.GetArrayFromImage(original)).all()
    assert series.GetOrigin() == pytest.approx(original.GetOrigin(), abs=1e-6)
    assert series.GetDirection() == pytest.approx(original.GetDirection())
    assert (folder / "ct_label" / "stomach.nii.gz").read_bytes() == real.stomach_mask.read_bytes()
    assert (folder / "wsi" / real.slide.name).read_bytes() == real.slide.read_bytes()
    table, problems = read_clinical_csv(tmp_path / "landing" / "clinical.csv")
    assert problems == []
    row = table.table.to_pylist()[table.patient_ids.index(synthetic.REAL_PATIENT_ID)]
    assert row["mlm"] is None
    # Without the real files, the next write takes the real patient out again.
    synthetic.write_cohort(tmp_path / "landing", CohortSpec.small(2, slide_width=(600, 700)))
    assert not folder.exists()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 2 patients"):
        CohortSpec(n_patients=1)
    with pytest.raises(ValueError, match="followup_fraction"):
        CohortSpec(followup_fraction=1.5)
    with pytest.raises(ValueError, match="followup_days"):
        CohortSpec(followup_days=(90, 30))
    with pytest.raises(ValueError, match="ct_size"):
        CohortSpec(ct_size=(8, 8, 8))


# ---------------------------------------------------------------- a second CT for part of the cohort

FOLLOWUP_SPEC = CohortSpec.small(4, slide_width=(600, 700), followup_fraction=0.5)


def test_small_cohorts_have_one_ct_and_the_same_draws():
    """small() asks for no second CT, and asking for one changes no other draw."""
    assert CohortSpec.small().followup_fraction == 0.0 and CohortSpec().followup_fraction > 0
    single, followed = plan_cohort(CohortSpec.small(8)), plan_cohort(CohortSpec.small(8, followup_fraction=0.5))
    assert all(p.scan_dates == () and p.radiology_change == 0.0 for p in single)
    assert [replace(p, scan_dates=(), radiology_change=0.0) for p in followed] == single
    # A share of each class, dated 60-120 days apart.
    with_two = [p for p in followed if p.scan_dates]
    assert sorted(p.mlm for p in with_two) == [0, 0, 1, 1]
    for plan in with_two:
        first, second = (dt.date.fromisoformat(d) for d in plan.scan_dates)
        assert 60 <= (second - first).days <= 120


def test_a_two_timepoint_drop_holds_one_folder_per_scan_date(tmp_path):
    result = synthetic.write_cohort(tmp_path / "landing", FOLLOWUP_SPEC)
    single = synthetic.write_cohort(tmp_path / "single", CohortSpec.small(4, slide_width=(600, 700)))
    plans = [p for p in result.patients if p.scan_dates]
    assert plans and len(plans) < len(result.patients)
    assert any(p.has_reference_mask for p in plans)
    for plan in result.patients:
        drop = result.landing / plan.patient_id
        scans = list_drop_scans(drop)
        assert scans.problems == []
        if not plan.scan_dates:  # one CT directly in ct/, as before: the same files, byte for byte
            assert [s.timepoint for s in scans.scans] == [None]
            assert tree_digest(drop / "ct") == tree_digest(single.landing / plan.patient_id / "ct")
            continue
        first, second = plan.scan_dates
        assert [s.timepoint for s in scans.scans] == [first, second]
        assert not any(p.is_file() for p in (drop / "ct").iterdir())
        # The first CT is exactly the CT the patient has in a cohort without second CTs.
        assert tree_digest(drop / "ct" / first) == tree_digest(single.landing / plan.patient_id / "ct")
        later = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(drop / "ct" / second)))
        assert sitk.GetArrayFromImage(later).tolist() == sitk.GetArrayFromImage(
            make_ct(plan, FOLLOWUP_SPEC, followup=True)[0]).tolist()
        assert dicom_seg.seg_absent_reason(drop / "ct" / second) is None
        labels = sorted(str(p.relative_to(drop)) for p in drop.rglob("stomach.nii.gz"))
        assert labels == ([f"ct_label/{first}/stomach.nii.gz", f"ct_label/{second}/stomach.nii.gz"]
                          if plan.has_reference_mask else [])
    # Written again: nothing changes.
    assert synthetic.write_cohort(tmp_path / "landing", FOLLOWUP_SPEC).written == []


def test_planted_change_is_between_the_two_cts():
    """Measured on the generated images: the relative change of the stomach's volume between the two
    CTs separates the classes; the first CT does not depend on the change at all."""
    spec = CohortSpec.small(12, followup_fraction=1.0)
    plans = plan_cohort(spec)
    labels = np.array([p.mlm for p in plans])
    change = []
    for plan in plans:
        volumes = [sitk.GetArrayFromImage(make_ct(plan, spec, followup=f)[1]).sum() for f in (False, True)]
        change.append(volumes[1] / volumes[0] - 1)
    assert roc_auc_score(labels, change) >= 0.85
    plan = plans[0]
    other_change = replace(plan, radiology_change=-plan.radiology_change)
    for image, other in zip(make_ct(plan, spec), make_ct(other_change, spec), strict=True):
        assert sitk.GetArrayFromImage(image).tolist() == sitk.GetArrayFromImage(other).tolist()
    assert (sitk.GetArrayFromImage(make_ct(plan, spec, followup=True)[1]).sum()
            != sitk.GetArrayFromImage(make_ct(other_change, spec, followup=True)[1]).sum())
    with pytest.raises(ValueError, match="no second CT"):
        make_ct(plan_cohort(CohortSpec.small(2))[0], CohortSpec.small(2), followup=True)
