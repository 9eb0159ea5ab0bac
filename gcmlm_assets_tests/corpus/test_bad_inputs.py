"""The bad-input corpus: inputs hospitals send every day, each made from the shared real files and
run through the real assets in a real Dagster instance (or through the landing sensor).

Each case must end as a clear refusal of its own patient only, naming the file and the problem, or,
where the input is sound after all (a BOM, CRLF line ends), as a correct result. A good patient in
the same run (the batched `ct_mask` takes a range of patients), the same tick or the same file
completes untouched; where an asset takes one patient per run, the good patient has its own run and
its outputs must stay byte for byte as they were.

The corpus runs once per module; each case is then asserted by its own test, and the table
(case, outcome, message) is printed (`pytest -s`) and written as markdown to the module's tmp dir.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from gcmlm_assets import runs
from gcmlm_assets.cohort.assets import clinical_table
from gcmlm_assets.cohort.checks import clinical_rows_valid
from gcmlm_assets.pathology.assets import patch_coords
from gcmlm_assets.pathology.resources import TilingSettings
from gcmlm_assets.radiology import resources as radiology_resource_defs
from gcmlm_assets.radiology.assets import ct_image, ct_mask, radiomics_row
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.landing.drops import Ticker
from gcmlm_assets_tests.support.pathology.slide_fixtures import copy_into, real_slide

from . import inputs

pytestmark = pytest.mark.slow

REFUSED, ACCEPTED = "refused", "accepted, parsed correctly"
WARNED = "accepted with a warning"
RADIOLOGY = [ct_image, ct_mask, radiomics_row]
GOOD_CT, GOOD_SLIDE, GOOD_ROW, GOOD_DROP = "GOODCT", "GOODSLIDE", "GOOD01", "GOODDROP"
MESSAGE_SHOWN = 300  # characters of a message in the table (the tests check the whole message)


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the input, in words (the table's second column)
    outcome: str  # REFUSED, ACCEPTED or WARNED
    phrases: tuple[str, ...]  # what the message must contain: the file and the problem


@dataclass
class Row:
    case: Case
    outcome: str
    message: str
    good_ok: bool  # the good patient of the same run / tick / file completed untouched
    good_note: str


# ---------------------------------------------------------------- the cases

CT_CASES = {
    "dicom_missing_slice": (inputs.dicom_missing_slice, "DICOM series with slice 7 of 12 missing",
                            ("slice005.dcm", "slice007.dcm", "missing slice")),
    "dicom_uneven_spacing": (inputs.dicom_uneven_spacing, "DICOM series, one slice 1.2 mm off its place",
                             ("slice005.dcm", "slice006.dcm", "inconsistent slice spacing")),
    "dicom_two_series": (inputs.dicom_two_series, "two DICOM series in one ct/ folder",
                         ("/ct", "holds 2 DICOM series", "expected exactly one")),
    "dicom_truncated_file": (inputs.dicom_truncated_file, "DICOM series with one file cut in half",
                             ("slice005.dcm", "damaged or truncated DICOM file")),
    "dicom_structured_report": (inputs.dicom_structured_report, "DICOM series plus a structured report (SR)",
                                ("dose_report.dcm", "DICOM file without image data", "SR")),
    "dicom_single_slice": (inputs.dicom_single_slice, "a 1-slice DICOM CT",
                           ("CT_small.dcm", "single slice")),
    "nifti_nan_voxel": (inputs.nifti_nan_voxel, "NIfTI (.nii.gz, float) with one NaN voxel",
                        ("ct.nii.gz", "1 NaN and 0 infinite voxel", "(32, 32, 6)")),
    "nifti_inf_voxel": (inputs.nifti_inf_voxel, "NIfTI (.nii, float) with one infinite voxel",
                        ("ct.nii", "0 NaN and 1 infinite voxel", "(32, 32, 6)")),
    "nifti_zero_bytes": (inputs.nifti_zero_bytes, "zero-byte ct.nii.gz",
                         ("ct.nii.gz", "file is empty (0 bytes)")),
}
MASK_CASES = {
    "mask_empty": (inputs.mask_empty, "reference mask with no voxel set", ("stomach.nii.gz", "mask is empty")),
    "mask_outside_ct": (inputs.mask_outside_ct, "reference mask whose origin lies 1 m from the CT",
                        ("stomach.nii.gz", "does not overlap the CT")),
    "mask_other_patients_grid": (inputs.mask_other_patients_grid,
                                 "another patient's mask on its own grid (no overlap)",
                                 ("breast1_label.nrrd", "does not overlap the CT")),
}
SLIDE_CASES = {
    "slide_zero_bytes": (inputs.slide_zero_bytes, "zero-byte .svs", ("empty.svs", "empty (0 bytes)")),
    "slide_renamed_text": (inputs.slide_renamed_text, "a text file renamed .svs",
                           ("notes.svs", "does not recognise this file as a whole-slide image")),
    "slide_truncated_mid_tile": (inputs.slide_truncated_mid_tile, "the real SVS cut in the middle of a tile",
                                 ("cut.svs", "truncated")),
    "slide_all_glass": (inputs.slide_all_glass, "a slide of glass only (the real slide's background)",
                        ("glass.tiff", "no tissue")),
    "slide_one_pixel": (inputs.slide_one_pixel, "a 1 x 1 px slide", ("dot.tiff", "smaller than one patch")),
    "slide_mpp_tiny": (inputs.slide_mpp_tiny, "the real SVS claiming 1e-6 µm/px",
                       ("mpp_tiny.svs", "1e-06 x 1e-06 µm/px", "not a microscope slide scan")),
    "slide_mpp_huge": (inputs.slide_mpp_huge, "the real SVS claiming 1000 µm/px",
                       ("mpp_huge.svs", "1000 x 1000 µm/px", "not a microscope slide scan")),
}
GOOD_LINE = "GOOD01,0,61"
# clinical.csv bodies: the good patient's row and the case's rows (bytes, so BOM and CRLF are exact).
CLINICAL_CASES = {
    "clinical_duplicate_ids": (b"patient_id,mlm,age\n" + GOOD_LINE.encode() + b"\nDUP01,1,70\nDUP01,0,70\n",
                               "clinical.csv with one id on two lines", REFUSED,
                               ("clinical.csv", "'DUP01'", "repeated on lines 3, 4")),
    "clinical_label_not_binary": (b"patient_id,mlm,age\n" + GOOD_LINE.encode() + b"\nLBL01,2,70\nLBL02,yes,55\n",
                                  "clinical.csv with labels 2 and yes", REFUSED,
                                  ("clinical.csv", "'LBL01'", "mlm must be 0, 1 or empty", "a number of 1 character;",
                                   "text of 3 characters")),
    "clinical_covariate_text": (b"patient_id,mlm,age\n" + GOOD_LINE.encode() + b"\nCOV01,1,sixty\n",
                                "clinical.csv with a non-numeric covariate", REFUSED,
                                ("clinical.csv", "'COV01'", "covariate 'age'", "not a number: text of 5 characters")),
    "clinical_bom": ("\ufeffpatient_id,mlm,age\nGOOD01,0,61\nBOM01,1,\n".encode(),
                     "clinical.csv starting with a UTF-8 BOM", ACCEPTED, ("BOM01", "GOOD01")),
    "clinical_crlf": (b"patient_id,mlm,age\r\nGOOD01,0,61\r\nCRLF01,1,70.5\r\n",
                      "clinical.csv with CRLF line ends", ACCEPTED, ("CRLF01", "GOOD01")),
    "clinical_bom_crlf": ("\ufeffpatient_id,mlm,age\r\nGOOD01,0,61\r\nXLS01,,44\r\n".encode(),
                          "clinical.csv as Excel writes it (BOM and CRLF)", ACCEPTED, ("XLS01", "GOOD01")),
    "clinical_id_without_drop": (b"patient_id,mlm,age\n" + GOOD_LINE.encode() + b"\nGHOST01,1,50\n",
                                 "clinical.csv row of a patient with no drop", WARNED,
                                 ("clinical.csv", "no drop in the landing zone", "GHOST01")),
}
# What each accepted clinical file must parse to, besides the good row.
CLINICAL_PARSED = {"clinical_bom": {"BOM01": (1, None)}, "clinical_crlf": {"CRLF01": (1, 70.5)},
                   "clinical_bom_crlf": {"XLS01": (None, 44.0)}, "clinical_id_without_drop": {"GHOST01": (1, 50.0)}}
LANDING_CASES = {
    "landing_link_file_out": ("ct/ct.nii.gz a symbolic link to the real CT outside the landing zone",
                              ("LNKFILE/ct/ct.nii.gz", "is a symbolic link to", "outside the landing zone")),
    "landing_link_folder_out": ("wsi/ a symbolic link to a folder of slides outside the landing zone",
                                ("LNKDIR/wsi", "is a symbolic link to", "outside the landing zone")),
    "landing_link_patient_out": ("a patient folder that is a symbolic link out of the landing zone",
                                 ("LNKPAT", "symbolic link to", "outside the landing zone")),
    "landing_clinical_link_out": ("clinical.csv a symbolic link to a file outside the landing zone",
                                  ("clinical.csv is a symbolic link to", "outside the landing zone")),
    "landing_name_dotdot": ("a drop folder named GC..01", ("GC..01", "contains '..'")),
    "landing_name_dotdot_first": ("a drop folder named ..GC01", ("..GC01", "starts with '.'")),
    "landing_name_65_chars": ("a drop folder with a 65-character name", ("G" * 65, "longer than 64 characters (65)")),
}


def all_cases() -> list[Case]:
    cases = [Case(name, what, REFUSED, phrases)
             for table in (CT_CASES, MASK_CASES, SLIDE_CASES) for name, (_, what, phrases) in table.items()]
    cases += [Case(name, what, outcome, phrases) for name, (_, what, outcome, phrases) in CLINICAL_CASES.items()]
    cases += [Case(name, what, REFUSED, phrases) for name, (what, phrases) in LANDING_CASES.items()]
    return cases


def patient_of(case_name: str) -> str:
    """A valid patient id per case (ids are at most 64 characters)."""
    return "C-" + case_name.replace("_", "-")


# ---------------------------------------------------------------- running

def _failure_text(result: dg.ExecuteInProcessResult, step: str) -> str:
    """The failure's own description (what the UI shows first), else the error message."""
    for event in result.get_step_failure_events():
        if event.step_key == step:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            return data.error.message if data.error else ""
    return ""


def _range_failures(result: dg.ExecuteInProcessResult, step: str) -> dict[str, str]:
    for event in result.get_step_failure_events():
        if event.step_key == step and event.step_failure_data.user_failure_data:
            return dict(event.step_failure_data.user_failure_data.metadata["failed_patients"].value)
    return {}


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (temporaries too) and its hash; empty when there is none."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _status(instance, asset: str, patient_id: str) -> str:
    status = instance.get_status_by_partition(dg.AssetKey(asset), [patient_id], ct_image.partitions_def)
    return str(status[patient_id].value)


class Corpus:
    def __init__(self, root: Path, data: Path, instance):
        self.root, self.data, self.instance = root, data, instance
        self.landing, self.artifacts, self.outside = root / "landing", root / "artifacts", root / "outside"
        for folder in (self.landing, self.artifacts, self.outside):
            folder.mkdir(parents=True)
        self.base = {"storage": ArtifactStorage(root=str(self.artifacts)), "landing": LandingZone(root=str(self.landing))}
        self.rows: dict[str, Row] = {}

    def add(self, *patient_ids: str) -> None:
        # A drop's only CT scan is keyed by its patient id in `ct_scans`, the radiology assets' partitions.
        for partition_set in ("patients", "ct_scans"):
            known = set(self.instance.get_dynamic_partitions(partition_set))
            self.instance.add_dynamic_partitions(partition_set, [p for p in patient_ids if p not in known])

    def materialize(self, assets, resources: dict, patient_id: str | None = None, **kwargs):
        return dg.materialize(assets, instance=self.instance, resources=resources, partition_key=patient_id,
                              raise_on_error=False, **kwargs)

    def record(self, case: Case, outcome: str, message: str, good_ok: bool, good_note: str) -> None:
        self.rows[case.name] = Row(case, outcome, message, good_ok, good_note)

    def shown(self, text: str) -> str:
        """The message as the table shows it: tmp and data paths shortened, one line, cut short, as
        markdown (a bare <...> would be dropped as HTML)."""
        text = text.replace(str(self.root), "$TMP").replace(str(self.data), "$DATA")
        text = " ".join(text.split())
        text = text if len(text) <= MESSAGE_SHOWN else text[:MESSAGE_SHOWN - 1] + "…"
        return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def run_radiology(corpus: Corpus, cases: dict[str, Case]) -> None:
    resources = {**radiology_resource_defs.resources("local"), **corpus.base}
    good = corpus.landing / GOOD_CT
    copy_into(inputs.real_ct(corpus.data), good / "ct")
    copy_into(inputs.real_stomach(corpus.data), good / "ct_label")
    (good / "READY").write_text("")
    # Bad CTs first, then the bad masks, then the good patient: the range run of ct_mask spans the last four.
    bad_ct = [patient_of(name) for name in CT_CASES]
    bad_mask = [patient_of(name) for name in MASK_CASES]
    corpus.add(*bad_ct, *bad_mask, GOOD_CT)
    assert corpus.materialize(RADIOLOGY, resources, GOOD_CT).success
    good_before = _files(corpus.artifacts)

    for name, (make, _, _) in CT_CASES.items():
        patient = corpus.landing / patient_of(name)
        (patient / "ct").mkdir(parents=True)
        make(corpus.data, patient / "ct")
        result = corpus.materialize(RADIOLOGY, resources, patient_of(name))
        refused = not result.success and result.get_failed_step_keys() == {"ct_image"}
        # Nothing of the patient is visible: no CT, and no downstream step ran.
        clean = not _files(corpus.artifacts / "ct_image" / patient_of(name)) and \
            not result.asset_materializations_for_node("ct_mask")
        corpus.record(cases[name], REFUSED if refused and clean else f"not refused ({result.success=})",
                      _failure_text(result, "ct_image"), *_good_ct_untouched(corpus, good_before))

    for name, (make, _, _) in MASK_CASES.items():
        patient = corpus.landing / patient_of(name)
        copy_into(inputs.real_ct(corpus.data), patient / "ct")
        (patient / "ct_label").mkdir()
        make(corpus.data, patient / "ct_label")
        assert corpus.materialize([ct_image], resources, patient_of(name)).success
    # One batched run of ct_mask: three bad masks and the good patient.
    ranged = corpus.materialize([ct_image, ct_mask], resources, selection=[ct_mask],
                                tags={ASSET_PARTITION_RANGE_START_TAG: bad_mask[0],
                                      ASSET_PARTITION_RANGE_END_TAG: GOOD_CT})
    failed = _range_failures(ranged, "ct_mask")
    # Read back from the run's event log, as the UI does.
    materialized = {entry.dagster_event.partition for entry in corpus.instance.all_logs(ranged.run_id)
                    if entry.dagster_event and entry.dagster_event.is_step_materialization}
    good_in_run = materialized == {GOOD_CT} and _status(corpus.instance, "ct_mask", GOOD_CT) == "MATERIALIZED"
    for name in MASK_CASES:
        patient_id = patient_of(name)
        refused = patient_id in failed and _status(corpus.instance, "ct_mask", patient_id) == "FAILED" and \
            not _files(corpus.artifacts / "ct_mask" / patient_id)
        corpus.record(cases[name], REFUSED if refused else f"not refused ({materialized=}, {failed=})",
                      failed.get(patient_id, ""), good_in_run,
                      f"{GOOD_CT} materialized in the same ct_mask run ({len(failed)} of 4 patients failed)")


def _good_ct_untouched(corpus: Corpus, before: dict[str, str]) -> tuple[bool, str]:
    now = {k: v for k, v in _files(corpus.artifacts).items() if k.split("/")[1] == GOOD_CT}
    ok = now == {k: v for k, v in before.items() if k.split("/")[1] == GOOD_CT} and all(
        _status(corpus.instance, asset, GOOD_CT) == "MATERIALIZED" for asset in ("ct_image", "ct_mask",
                                                                                "radiomics_row"))
    return ok, f"{GOOD_CT}'s ct_image, ct_mask and radiomics_row (own run) stay materialized, byte for byte"


def run_pathology(corpus: Corpus, cases: dict[str, Case]) -> None:
    resources = {**corpus.base, "pathology": TilingSettings()}
    copy_into(real_slide(corpus.data), corpus.landing / GOOD_SLIDE / "wsi")
    (corpus.landing / GOOD_SLIDE / "READY").write_text("")
    corpus.add(GOOD_SLIDE, *(patient_of(name) for name in SLIDE_CASES))
    assert corpus.materialize([patch_coords], resources, GOOD_SLIDE).success
    good_folder = corpus.artifacts / "patch_coords" / GOOD_SLIDE
    good_before = _files(good_folder)
    for name, (make, _, _) in SLIDE_CASES.items():
        wsi = corpus.landing / patient_of(name) / "wsi"
        wsi.mkdir(parents=True)
        make(corpus.data, wsi)
        result = corpus.materialize([patch_coords], resources, patient_of(name))
        leftovers = _files(corpus.artifacts / "patch_coords" / patient_of(name))
        refused = not result.success and not result.get_asset_materialization_events() and not leftovers
        ok = _files(good_folder) == good_before and _status(corpus.instance, "patch_coords", GOOD_SLIDE) == "MATERIALIZED"
        corpus.record(cases[name], REFUSED if refused else "not refused", _failure_text(result, "patch_coords"), ok,
                      f"{GOOD_SLIDE}'s patch_coords (own run) stays materialized, byte for byte")


def run_clinical(corpus: Corpus, cases: dict[str, Case]) -> None:
    for name, (body, _, expected, _) in CLINICAL_CASES.items():
        root = corpus.root / "clinical" / name
        landing = root / "landing"
        (landing / GOOD_ROW).mkdir(parents=True)  # the good patient has a drop
        (landing / "clinical.csv").write_bytes(body)
        resources = {"storage": ArtifactStorage(root=str(root / "artifacts")), "landing": LandingZone(root=str(landing))}
        result = corpus.materialize([clinical_table, clinical_rows_valid], resources)
        [check] = result.get_asset_check_evaluations() or [None]
        table = pq.read_table(root / "artifacts" / "clinical_table" / "clinical.parquet").to_pylist() \
            if result.success else []
        rows = {row["patient_id"]: (row["mlm"], row["age"]) for row in table}
        good_ok = rows.get(GOOD_ROW) == (0, 61.0)
        others = set(rows) - {GOOD_ROW}
        logged = [e.message for e in corpus.instance.all_logs(result.run_id) if e.message and "clinical.csv" in e.message]
        if expected == REFUSED:
            # The bad rows are left out (none of their ids in the table) and named by the ERROR check.
            outcome = REFUSED if result.success and check and not check.passed and not others else "not refused"
            message = f"clinical.csv: {check.description}" if check else ""
        elif expected == WARNED:
            warning = [m for m in logged if "no drop" in m]
            outcome = WARNED if warning and rows == {GOOD_ROW: (0, 61.0), **CLINICAL_PARSED[name]} else "not warned"
            message = warning[0] if warning else ""
        else:
            parsed = rows == {GOOD_ROW: (0, 61.0), **CLINICAL_PARSED[name]} and check and check.passed
            outcome = ACCEPTED if parsed else f"not parsed correctly: {rows}"
            message = f"parsed: {sorted(rows.items())}; check: {check.description if check else ''}"
        corpus.record(cases[name], outcome, message, good_ok, f"{GOOD_ROW}'s row kept, mlm 0, age 61")


def run_landing(corpus: Corpus, cases: dict[str, Case]) -> None:
    """One sensor tick over the corpus's landing zone (every patient above plus these drops)."""
    outside_drop = corpus.outside / "drop"
    copy_into(inputs.real_ct(corpus.data), outside_drop / "ct")
    copy_into(real_slide(corpus.data), outside_drop / "wsi")
    (outside_drop / "READY").write_text("")
    good = corpus.landing / GOOD_DROP
    copy_into(inputs.real_ct(corpus.data), good / "ct")
    copy_into(real_slide(corpus.data), good / "wsi")
    (good / "READY").write_text("")

    link_file = corpus.landing / "LNKFILE"
    (link_file / "ct").mkdir(parents=True)
    (link_file / "ct" / "ct.nii.gz").symlink_to(inputs.real_ct(corpus.data))  # the shared file itself
    copy_into(real_slide(corpus.data), link_file / "wsi")
    (link_file / "READY").write_text("")
    link_dir = corpus.landing / "LNKDIR"
    copy_into(inputs.real_ct(corpus.data), link_dir / "ct")
    (link_dir / "wsi").symlink_to(outside_drop / "wsi", target_is_directory=True)
    (link_dir / "READY").write_text("")
    (corpus.landing / "LNKPAT").symlink_to(outside_drop, target_is_directory=True)
    for name in ("GC..01", "..GC01", "G" * 65):
        copy_into(inputs.real_ct(corpus.data), corpus.landing / name / "ct")
        (corpus.landing / name / "READY").write_text("")
    secret = corpus.outside / "other_study.csv"
    secret.write_text("patient_id,mlm\nOUT01,1\n")
    (corpus.landing / "clinical.csv").symlink_to(secret)

    ticker = Ticker(corpus.instance, corpus.landing)
    result = ticker.tick()
    order = list(corpus.instance.get_dynamic_partitions("patients"))
    partitions = set(order)
    # (patient, modality) of every request: a batch's range covers several patients
    requested = {(patient_id, r.tags["gcmlm/modality"]) for r in result.run_requests
                 for patient_id in ([r.partition_key] if r.partition_key is not None else
                                    runs.range_run_patients(r.tags, order, {p: i for i, p in enumerate(order)}))}
    good_ok = {(GOOD_DROP, "radiology"), (GOOD_DROP, "pathology")} <= requested and GOOD_DROP in partitions
    good_note = f"{GOOD_DROP}'s radiology and pathology requested in the same tick"

    def logged(*needles: str) -> str:
        return next((m for m in ticker.messages if all(n in m for n in needles)), "")

    # A link out of the zone: the modality holding it is not requested, and its asset refuses it too.
    resources = {**radiology_resource_defs.resources("local"), **corpus.base}
    asset_runs = {"landing_link_file_out": ("LNKFILE", "radiology", [ct_image], resources, "ct_image"),
                  "landing_link_folder_out": ("LNKDIR", "pathology", [patch_coords],
                                              {**corpus.base, "pathology": TilingSettings()}, "patch_coords")}
    for name, (patient_id, modality, assets, res, step) in asset_runs.items():
        message = logged(f"{patient_id} {modality} not requested")
        # the tick made the patient a partition but not its refused scan: run the asset on it anyway
        corpus.add(patient_id)
        run = corpus.materialize(assets, res, patient_id)
        asset_refused = not run.success and "outside the landing zone" in _failure_text(run, step) and \
            not _files(corpus.artifacts / step / patient_id)
        refused = bool(message) and (patient_id, modality) not in requested and asset_refused
        other = "pathology" if modality == "radiology" else "radiology"
        corpus.record(cases[name], REFUSED if refused else "not refused",
                      f"tick: {message} | {step}: {_failure_text(run, step)}",
                      good_ok and (patient_id, other) in requested, good_note + f"; {patient_id}'s {other} too")
    for name, folder in (("landing_link_patient_out", "LNKPAT"), ("landing_name_dotdot", "GC..01"),
                         ("landing_name_dotdot_first", "..GC01"), ("landing_name_65_chars", "G" * 65)):
        message = logged(f"folder '{corpus.landing / folder}' ignored")
        refused = bool(message) and folder not in partitions and folder not in {p for p, _ in requested}
        corpus.record(cases[name], REFUSED if refused else "not refused", message, good_ok, good_note)

    csv_run = corpus.materialize([clinical_table], corpus.base)
    refused = not csv_run.success and not (corpus.artifacts / "clinical_table").exists()
    corpus.record(cases["landing_clinical_link_out"], REFUSED if refused else "not refused",
                  _failure_text(csv_run, "clinical_table"), good_ok, good_note)


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def corpus(test_data: Path, tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    (root / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        corpus = Corpus(root, test_data, instance)
        cases = {case.name: case for case in all_cases()}
        for run in (run_radiology, run_pathology, run_clinical, run_landing):
            run(corpus, cases)
        markdown = corpus_table(corpus)
        (root / "refused_inputs.md").write_text(markdown + "\n", encoding="utf-8")
        shown = f"\nbad-input corpus ({len(corpus.rows)} cases; table in {root / 'refused_inputs.md'}):\n{markdown}"
        encoding = sys.stdout.encoding or "utf-8"  # an ASCII terminal gets \xb5 instead of µ, not an error
        print(shown.encode(encoding, "backslashreplace").decode(encoding))
        yield corpus


def corpus_table(corpus: Corpus) -> str:
    lines = ["| case | input | outcome | message |", "|---|---|---|---|"]
    for row in corpus.rows.values():
        lines.append(f"| `{row.case.name}` | {row.case.what} | {row.outcome} | {corpus.shown(row.message)} |")
    return "\n".join(lines)


def test_the_corpus_has_every_kind_of_bad_input(corpus: Corpus):
    assert len(corpus.rows) >= 25
    assert set(corpus.rows) == {case.name for case in all_cases()}
    assert sum(row.case.outcome == REFUSED for row in corpus.rows.values()) >= 25


@pytest.mark.parametrize("name", [case.name for case in all_cases()])
def test_case_ends_as_expected_naming_file_and_problem(corpus: Corpus, name: str):
    row = corpus.rows[name]
    assert row.outcome == row.case.outcome, f"{name}: {row.outcome}: {row.message}"
    for phrase in row.case.phrases:
        assert phrase in row.message, f"{name}: {phrase!r} not in {row.message!r}"
    assert row.good_ok, f"{name}: the good patient did not complete untouched ({row.good_note})"


def test_no_file_outside_the_landing_zone_was_followed(corpus: Corpus):
    """The links' targets were never turned into partitions, runs or artifacts."""
    partitions = set(corpus.instance.get_dynamic_partitions("patients"))
    assert "LNKPAT" not in partitions and "OUT01" not in os.listdir(corpus.artifacts)
    for step, patient_id in (("ct_image", "LNKFILE"), ("patch_coords", "LNKDIR")):
        assert not (corpus.artifacts / step / patient_id).exists()
