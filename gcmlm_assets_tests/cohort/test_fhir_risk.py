"""FHIR RiskAssessment bundles from a real risk_scores table: the values, the missing modalities, refusals."""

import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.riskassessment import RiskAssessment

from gcmlm_assets.cohort.exchange import fhir_risk
from gcmlm_assets.cohort.columns import RISK_SCORES_COLUMNS
from gcmlm_assets.cohort.model import modelling, training
from gcmlm_assets.cohort.model.model_settings import ModelSettings
from gcmlm_assets.cohort.tables import cohort_data, fusion
from gcmlm_assets.columns import problems, table_fields
from gcmlm_assets.storage import sha256_file
from gcmlm_assets_tests.support.cohort.synthetic import cohort_table, make_cohort

NO_RADIOLOGY, NO_PATHOLOGY = "P004", "P009"
SCORED_AT = datetime(2026, 12, 6, 21, 30, 5, tzinfo=timezone.utc)
VERSION = "20261206T213005-abc"
SYSTEMS = fhir_risk._systems(fhir_risk.DEFAULT_SYSTEM_BASE)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(risk_scores rows as risk_scores writes them, the RiskModel identity) from a real fitted model."""
    ids, labels, radiomics, pathology = make_cohort(24, seed=9)
    table = cohort_table(ids, labels, radiomics, pathology, without_radiology={NO_RADIOLOGY},
                         without_pathology={NO_PATHOLOGY})
    settings = ModelSettings(n_splits=3, n_repeats=1, n_bootstrap=50)
    model, _ = training.fit_risk_model(cohort_data.CohortData.from_table(table, settings.blocks()), settings, 0.4)
    path = modelling.save_model(model, tmp_path_factory.mktemp("model") / "model.skops")
    scores = model.score_table(table)
    # as risk_scores adds them (assets._with_versions)
    scores = (scores.append_column("model_version", pa.array([VERSION] * scores.num_rows, pa.string()))
              .append_column("explanation_key", pa.array(["k"] * scores.num_rows, pa.string())))
    assert problems(RISK_SCORES_COLUMNS, table_fields(scores)) == []
    identity = fhir_risk.RiskModel(version=VERSION, sha256=sha256_file(path), risk_threshold=model.risk_threshold)
    return scores.to_pylist(), identity


def _resources(bundle: Bundle) -> tuple[Device, RiskAssessment]:
    device, assessment = (entry.resource for entry in bundle.entry)
    assert isinstance(device, Device) and isinstance(assessment, RiskAssessment)
    return device, assessment


def test_every_bundle_holds_the_tables_values(scored, tmp_path):
    rows, model = scored
    meta = fhir_risk.write_risk_assessments(rows, model, SCORED_AT, tmp_path)
    assert meta["bundles"] == meta["written"] == len(rows) and meta["removed"] == 0
    index = json.loads((tmp_path / fhir_risk.INDEX_FILE).read_text(encoding="utf-8"))
    assert sorted(index["patients"]) == sorted(r["patient_id"] for r in rows)
    for row in rows:
        entry = index["patients"][row["patient_id"]]
        path = tmp_path / entry["file"]
        assert sha256_file(path) == entry["sha256"]
        bundle = Bundle.model_validate_json(path.read_bytes())  # fhir.resources reads the written file
        assert bundle.type == "collection" and len(bundle.entry) == 2
        device, ra = _resources(bundle)
        assert [(i.system, i.value) for i in device.identifier] == [
            (SYSTEMS["model_sha256"], model.sha256), (SYSTEMS["model_version"], row["model_version"])]
        assert device.version[0].value == VERSION and device.manufacturer == fhir_risk.PLATFORM
        assert ra.performer.reference == bundle.entry[0].fullUrl
        assert ra.status == "final"
        assert ra.subject.type == "Patient" and ra.subject.reference is None and ra.subject.display is None
        assert (ra.subject.identifier.system, ra.subject.identifier.value) == (SYSTEMS["patient"], row["patient_id"])
        assert ra.occurrenceDateTime == SCORED_AT
        prediction = ra.prediction[0]
        assert float(prediction.probabilityDecimal) == row["probability"] == entry["probability"]
        assert [(c.system, c.code) for c in prediction.outcome.coding] == [(fhir_risk.SNOMED, "94381002")]
        assert prediction.outcome.text == "postoperative metachronous liver metastasis"
        assert [(c.system, c.code) for c in ra.code.coding] == [(fhir_risk.SNOMED, "225338004")]
        groups = {c.system: c.code for c in prediction.qualitativeRisk.coding}
        assert groups[SYSTEMS["risk_group"]] == row["risk_group"] == entry["risk_group"]
        assert groups.get(fhir_risk.RISK_PROBABILITY) in (row["risk_group"], None)
        used = row["modalities_used"].split("+")
        basis = {b.identifier.value: b for b in ra.basis}
        assert set(basis) == {f"fused_table/{row['patient_id']}",
                              *(f"{fhir_risk.BLOCK_INPUTS[b][0]}/{row['patient_id']}" for b in used)}
        for block in used:
            reference = basis[f"{fhir_risk.BLOCK_INPUTS[block][0]}/{row['patient_id']}"]
            assert float(reference.extension[0].valueDecimal) == row[f"probability_{block}"]
        missing = [e.valueCode for e in ra.extension or [] if e.url == SYSTEMS["missing"]]
        assert missing == entry["modalities_missing"] == [b for b in ("radiology", "pathology") if b not in used]


def test_a_patient_without_radiology_says_so(scored, tmp_path):
    rows, model = scored
    fhir_risk.write_risk_assessments(rows, model, SCORED_AT, tmp_path)
    _, ra = _resources(fhir_risk.read_bundle(tmp_path / "bundles" / f"{NO_RADIOLOGY}.json"))
    assert [e.valueCode for e in ra.extension] == ["radiology"]
    assert not any(b.identifier.value.startswith("radiomics_row/") for b in ra.basis)
    assert ra.note[0].text.startswith("Scored without radiology (radiology: no usable radiomics_row); ")
    assert "missing: radiology" in ra.prediction[0].rationale
    _, complete = _resources(fhir_risk.read_bundle(tmp_path / "bundles" / "P000.json"))
    assert complete.extension is None and "every modality" in complete.note[0].text


@pytest.mark.parametrize("field, value, message", [
    ("probability", 1.2, "probability: not a number in [0, 1] (1.2)"),
    ("probability", float("nan"), "probability: not a number in [0, 1]"),
    ("model_version", None, "model_version: missing (None)"),
    ("model_version", "other", "model_version: 'other' is not the model given"),
    ("risk_group", "medium", "risk_group: 'medium'"),
    ("patient_id", "../P001", "patient_id: contains a path separator"),
    ("modalities_used", "radiology+ct", "modalities_used: 'radiology+ct'"),
    ("probability_radiology", None, "probability_radiology: not a number in [0, 1] (None) for a modality it used"),
])
def test_a_bad_row_is_refused_naming_the_patient_and_field(scored, tmp_path, field, value, message):
    rows, model = scored
    bad = [dict(r) for r in rows]
    bad[3] = {**bad[3], field: value}
    patient = bad[3]["patient_id"]
    with pytest.raises(fhir_risk.RiskAssessmentInputError) as refused:
        fhir_risk.write_risk_assessments(bad, model, SCORED_AT, tmp_path / "out")
    assert f"risk_scores row of patient {patient!r}: {message}" in str(refused.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_bad_model_identity_or_time_is_refused(scored, tmp_path):
    rows, model = scored
    for identity, message in [(fhir_risk.RiskModel("", model.sha256, 0.4), "risk model: version: missing"),
                              (fhir_risk.RiskModel(VERSION, "abc", 0.4), "risk model: sha256"),
                              (fhir_risk.RiskModel(VERSION, model.sha256, 1.5), "risk model: risk_threshold")]:
        with pytest.raises(fhir_risk.RiskAssessmentInputError, match=message):
            fhir_risk.write_risk_assessments(rows, identity, SCORED_AT, tmp_path)
    with pytest.raises(fhir_risk.RiskAssessmentInputError, match="scored_at: .* time zone"):
        fhir_risk.write_risk_assessments(rows, model, datetime(2026, 12, 6), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_refresh_rebuilds_only_changed_patients_and_removes_those_no_longer_scored(scored, tmp_path):
    rows, model = scored
    fhir_risk.write_risk_assessments(rows, model, SCORED_AT, tmp_path)
    bundles = tmp_path / "bundles"
    before = {p.name: p.read_bytes() for p in bundles.iterdir()}
    later = datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc)
    changed = dict(rows[5], probability=0.999, risk_group="high")
    damaged = rows[6]["patient_id"]
    (bundles / f"{damaged}.json").write_text("{}")
    again = fhir_risk.write_risk_assessments([*rows[:5], changed, *rows[6:]], model, later, tmp_path)
    assert (again["written"], again["unchanged"], again["removed"]) == (2, len(rows) - 2, 0)
    after = {p.name: p.read_bytes() for p in bundles.iterdir()}
    assert {name for name in after if after[name] != before[name]} == {f"{changed['patient_id']}.json"}
    index = json.loads((tmp_path / fhir_risk.INDEX_FILE).read_text(encoding="utf-8"))["patients"]
    assert index[changed["patient_id"]]["scored_at"] == later.isoformat()
    assert index[damaged]["scored_at"] == index[rows[0]["patient_id"]]["scored_at"] == SCORED_AT.isoformat()
    _, ra = _resources(fhir_risk.read_bundle(bundles / f"{changed['patient_id']}.json"))
    assert ra.occurrenceDateTime == later and float(ra.prediction[0].probabilityDecimal) == 0.999
    fewer = fhir_risk.write_risk_assessments(rows[1:], model, later, tmp_path)
    assert (fewer["written"], fewer["removed"]) == (1, 1)  # P005 back to its first score, P000 gone
    assert not (bundles / f"{rows[0]['patient_id']}.json").exists()
    assert rows[0]["patient_id"] not in json.loads((tmp_path / fhir_risk.INDEX_FILE).read_text(encoding="utf-8"))["patients"]


TWO_SCANS = {"scans": ["P000@2024-01-10", "P000@2024-04-10"], "radiology": "P000@2024-01-10",
             "delta": ["P000@2024-01-10", "P000@2024-04-10"]}


def test_the_basis_names_the_ct_scan_that_fed_radiology(scored, tmp_path):
    rows, model = scored

    def inputs(patient_id):
        _, ra = _resources(fhir_risk.read_bundle(tmp_path / "bundles" / f"{patient_id}.json"))
        return [b.identifier.value for b in ra.basis]

    fhir_risk.write_risk_assessments(rows, model, SCORED_AT, tmp_path, scans={"P000": TWO_SCANS})
    assert "radiomics_row/P000@2024-01-10" in inputs("P000") and "radiomics_row/P000" not in inputs("P000")
    assert "radiomics_row/P001" in inputs("P001")  # no entry in the report: its only scan, keyed by its id
    # another scan feeding the block is another Bundle: only that patient's is rebuilt
    last = dict(TWO_SCANS, radiology="P000@2024-04-10")
    again = fhir_risk.write_risk_assessments(rows, model, SCORED_AT, tmp_path, scans={"P000": last})
    assert again["written"] == 1 and "radiomics_row/P000@2024-04-10" in inputs("P000")
    with pytest.raises(fhir_risk.RiskAssessmentInputError,
                       match="'P000'.*probability_radiology: the score used radiology, but fused_table's report names "
                             "no scan for it"):
        fhir_risk.write_risk_assessments(rows, model, SCORED_AT, tmp_path, scans={"P000": dict(TWO_SCANS, radiology=None)})


@pytest.mark.parametrize("scans, reason", [
    ({"scans": ["P000"], "radiology": "P000", "delta": None}, "delta: only one CT scan"),
    (dict(TWO_SCANS, delta=None), "delta: no usable radiomics_row of its first or last CT scan"),
])
def test_a_missing_delta_block_says_why(scored, scans, reason):
    rows, model = scored
    row = dict(rows[0], probability_delta=None)  # a model with a delta block, the patient without it
    text, missing = fhir_risk.risk_assessment_bundle(row, model, SCORED_AT, scans=scans)
    note = json.loads(text)["entry"][1]["resource"]["note"][0]["text"]
    assert missing == ["delta"] and note.startswith(f"Scored without delta ({reason}); the probability comes from ")


def test_the_hl7_likelihood_code_is_given_only_where_its_definition_holds():
    def codes(group, probability, threshold):
        risk = fhir_risk.qualitative_risk(group, probability, threshold, SYSTEMS)
        return [c["code"] for c in risk["coding"] if c["system"] == fhir_risk.RISK_PROBABILITY]

    assert codes("high", 0.8, 0.3) == ["high"]
    assert codes("high", 0.35, 0.3) == []  # in the high group, yet not "more likely than not"
    assert codes("low", 0.2, 0.3) == ["low"]
    assert codes("low", 0.55, 0.6) == []


def test_the_block_names_are_the_models():
    from gcmlm_assets.cohort.tables.cohort_data import PATHOLOGY_ABMIL

    assert set(fhir_risk.BLOCK_INPUTS) == {fusion.RADIOLOGY, fusion.PATHOLOGY, fusion.CLINICAL, PATHOLOGY_ABMIL,
                                           fusion.LYMPH_NODE, fusion.DELTA}


def test_the_fhir_models_refuse_a_damaged_bundle(scored, tmp_path):
    from pydantic import ValidationError

    rows, model = scored
    fhir_risk.write_risk_assessments(rows[:1], model, SCORED_AT, tmp_path)
    path = tmp_path / "bundles" / f"{rows[0]['patient_id']}.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["entry"][1]["resource"]["prediction"][0]["probabilityDecimal"] = "likely"
    path.write_text(json.dumps(document))
    with pytest.raises(ValidationError, match="probabilityDecimal"):
        fhir_risk.read_bundle(path)


def test_the_module_imports_neither_dagster_nor_fhir_resources_until_used():
    import subprocess
    import sys

    probe = ("import sys, gcmlm_assets.cohort.exchange.fhir_risk; "
             "print(sorted(m for m in ('dagster', 'fhir.resources', 'numpy', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
