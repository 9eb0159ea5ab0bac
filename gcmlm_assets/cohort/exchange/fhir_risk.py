"""Each scored patient's risk as a FHIR R4 RiskAssessment, in a Bundle with the model as its Device.

Plain Python (no Dagster; fhir.resources is imported inside the functions). The resources are built
and validated with fhir.resources' R4B models (`fhir.resources.R4B`, FHIR 4.3.0): fhir.resources 8
defaults to R5 and has no 4.0.1 package, and R4B leaves Bundle, Device and RiskAssessment as R4 has
them, so the files are R4 resources that an R4 server reads.

One Bundle (type collection) per patient, `bundles/<patient_id>.json`, holds:
- a Device: the risk_model version that scored the patient (name, version, the model file's SHA-256
  as an identifier, the platform as manufacturer);
- a RiskAssessment: status final; subject the pseudonymous patient id (an identifier reference,
  never a name); code SNOMED CT 225338004 "Risk assessment"; the outcome SNOMED CT 94381002
  "Secondary malignant neoplasm of liver" with the text "postoperative metachronous liver
  metastasis"; probabilityDecimal; qualitativeRisk (the project's risk group, and the HL7
  risk-probability code where its definition holds, see `qualitative_risk`); basis: the inputs the
  score used (fused_table row, and per modality radiomics_row / slide_vector / uni_features /
  lymph_nodes / clinical_table, each with its modality model's probability; radiomics_row is named
  by the CT scan that fed the block, `radiomics_row/<scan key>`, and the delta block by its two scans,
  the first and the last, as fused_table's report says (`scans`)); the modalities the model has but
  the patient lacked, as `missing-modality` extensions and a note saying why each is absent;
  occurrenceDateTime the scoring time; performer the Device.
`index.json` lists every patient's file, its SHA-256, scoring time, probability, risk group and
missing modalities: one small file to read instead of 10,000 bundles, and the one file a manifest
needs to hash.

Every row is checked (and each new Bundle validated and read back from its own JSON) before anything
is written; a bad row is refused with the patient and the field named. A patient whose Bundle would
say what the written one says (same score, modalities, model) keeps it, with its scoring time: a
refresh builds only the changed patients (building one takes milliseconds; 10,000 add up). Files are
written atomically; bundles of patients no longer scored are removed after the index.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gcmlm_assets.catalogue import (
    ASSESSMENT_INDEX, CLINICAL_TABLE, FUSED_TABLE, LYMPH_NODE, LYMPH_NODES, MODEL_FILE, RADIOMICS_ROW, RISK_MODEL,
    SLIDE_VECTOR, UNI_FEATURES)
from gcmlm_assets.patients import patient_id_problem
from gcmlm_assets.storage import atomic_write_bytes, sha256_file

FHIR_PACKAGE = "fhir.resources.R4B"
FHIR_VERSION = "4.3.0"  # R4B; Bundle, Device and RiskAssessment are unchanged from R4 (4.0.1)
PLATFORM = "gcmlm_assets"
# The platform's own identifier and extension namespace; a site can pass its own (a URL it owns).
DEFAULT_SYSTEM_BASE = "urn:gcmlm-assets"
MODEL_NAME = "MLM risk (metachronous liver metastasis of gastric cancer)"
INTENDED_USE = "research; not validated for clinical decisions"

SNOMED = "http://snomed.info/sct"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
ASSESSMENT_CODE = {"system": SNOMED, "code": "225338004", "display": "Risk assessment"}
OUTCOME_CODE = {"system": SNOMED, "code": "94381002", "display": "Secondary malignant neoplasm of liver"}
OUTCOME_TEXT = "postoperative metachronous liver metastasis"
RISK_GROUPS = ("high", "low")
# HL7 risk-probability: high "more likely to occur than not", low "possible but unlikely".
HL7_LIKELIHOOD = {"high": "High likelihood", "low": "Low likelihood"}

BUNDLES_FOLDER = "bundles"
BUNDLE_FORMAT = "2"  # raise when the Bundle's content changes: every patient's Bundle is rebuilt
INDEX_FILE = ASSESSMENT_INDEX.name

# The risk model's blocks (cohort/model: RADIOLOGY, PATHOLOGY, PATHOLOGY_ABMIL, CLINICAL, LYMPH_NODE, DELTA) and the
# per-patient input each reads; named here so that this module imports neither numpy nor pyarrow.
BLOCK_INPUTS = {
    "radiology": (RADIOMICS_ROW.key, "PyRadiomics features of the CT's gastric mask"),
    "pathology": (SLIDE_VECTOR.key, "mean-pooled patch features of the H&E slides"),
    "pathology_abmil": (UNI_FEATURES.key, "patch features of the H&E slides, pooled by attention (ABMIL)"),
    "clinical": (CLINICAL_TABLE.key, "clinical covariates"),
    LYMPH_NODE: (LYMPH_NODES.key, "lymph-node slides: node counts, tumour and metastatic node areas, T/MLN"),
    "delta": (RADIOMICS_ROW.key, "change of the PyRadiomics features from the first CT scan to the last, the days "
                                 "between them and the scans' similarity"),
}
PROBABILITY_PREFIX = "probability_"
# The blocks read from radiomics_row: their basis names the CT scans that fed them (fused_table's report).
RADIOLOGY_BLOCK, DELTA_BLOCK = "radiology", "delta"


class RiskAssessmentInputError(ValueError):
    """A risk_scores row or model identity that cannot become a valid RiskAssessment."""


@dataclass(frozen=True)
class RiskModel:
    """The risk_model version that scored the rows (its version pointer and manifest hold these)."""

    version: str
    sha256: str  # of model.skops
    risk_threshold: float
    name: str = MODEL_NAME
    intended_use: str = INTENDED_USE

    def problem(self) -> str | None:
        if not isinstance(self.version, str) or not self.version:
            return f"version: missing ({self.version!r})"
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64
                and all(c in "0123456789abcdef" for c in self.sha256)):
            return f"sha256: not a SHA-256 hex digest ({self.sha256!r})"
        if not _is_probability(self.risk_threshold):
            return f"risk_threshold: not a number in [0, 1] ({self.risk_threshold!r})"
        return None


def _is_probability(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= 1.0)


def _systems(base: str) -> dict[str, str]:
    return {"patient": f"{base}:patient-id", "model_sha256": f"{base}:risk-model-sha256",
            "model_version": f"{base}:risk-model-version", "input": f"{base}:asset-input",
            "risk_group": f"{base}:risk-group", "missing": f"{base}:fhir:missing-modality",
            "modality_probability": f"{base}:fhir:modality-probability"}


def _uuid(*parts: str) -> str:
    # Fixed ids from the content: the same score gives the same bytes on every refresh.
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join((PLATFORM, *parts))))


# ---------------------------------------------------------------- checking a row


def model_blocks(row: dict) -> list[str]:
    """The model's blocks, from the row's probability_<block> columns (risk_scores writes one per block)."""
    return [key[len(PROBABILITY_PREFIX):] for key in row if key.startswith(PROBABILITY_PREFIX)]


def _refuse(patient_id, field: str, problem: str) -> RiskAssessmentInputError:
    return RiskAssessmentInputError(f"risk_scores row of patient {patient_id!r}: {field}: {problem}")


def check_row(row: dict, model: RiskModel) -> tuple[list[str], list[str]]:
    """(modalities used, modalities missing) of a valid row; else RiskAssessmentInputError naming the
    patient and the field."""
    patient_id = row.get("patient_id")
    problem = patient_id_problem(patient_id)
    if problem:
        raise _refuse(patient_id, "patient_id", problem)
    version = row.get("model_version")
    if not isinstance(version, str) or not version:
        raise _refuse(patient_id, "model_version", f"missing ({version!r})")
    if version != model.version:
        raise _refuse(patient_id, "model_version", f"{version!r} is not the model given ({model.version!r})")
    probability = row.get("probability")
    if not _is_probability(probability):
        raise _refuse(patient_id, "probability", f"not a number in [0, 1] ({probability!r})")
    group = row.get("risk_group")
    expected = "high" if probability >= model.risk_threshold else "low"
    if group != expected:
        raise _refuse(patient_id, "risk_group", f"{group!r}, but probability {probability!r} against the "
                                                f"model's threshold {model.risk_threshold!r} is {expected!r}")
    blocks = model_blocks(row)
    unknown = [b for b in blocks if b not in BLOCK_INPUTS]
    if unknown or not blocks:
        raise _refuse(patient_id, "probability_<modality>", f"unknown modalities {unknown}" if unknown
                      else "no per-modality probability columns")
    used_text = row.get("modalities_used")
    used = used_text.split("+") if isinstance(used_text, str) and used_text else []
    if not used or any(b not in blocks for b in used):
        raise _refuse(patient_id, "modalities_used", f"{used_text!r} is not a '+'-joined list of the model's "
                                                     f"modalities {blocks}")
    for block in blocks:
        value = row[PROBABILITY_PREFIX + block]
        if block in used and not _is_probability(value):
            raise _refuse(patient_id, PROBABILITY_PREFIX + block, f"not a number in [0, 1] ({value!r}) "
                                                                  f"for a modality it used")
        if block not in used and value is not None:
            raise _refuse(patient_id, PROBABILITY_PREFIX + block, f"{value!r} for a modality it did not use")
    return used, [b for b in blocks if b not in used]


# ---------------------------------------------------------------- building the Bundle


def device_resource(model: RiskModel, systems: dict[str, str]) -> dict:
    return {
        "resourceType": "Device",
        "identifier": [{"system": systems["model_sha256"], "value": model.sha256},
                       {"system": systems["model_version"], "value": model.version}],
        "status": "active",
        "manufacturer": PLATFORM,
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "risk prediction software (scikit-learn model, saved with skops)"},
        "version": [{"value": model.version}],
        "note": [{"text": f"Intended use: {model.intended_use}. The model file {MODEL_FILE.name} of "
                          f"{RISK_MODEL.key} version {model.version} has SHA-256 {model.sha256}."}],
    }


def qualitative_risk(group: str, probability: float, threshold: float, systems: dict[str, str]) -> dict:
    """The project's group (at or above the model's threshold: high), and the HL7 risk-probability
    code only where its definition holds: high when also more likely than not (> 0.5), low when also
    below 0.5. A high-group patient under 0.5 gets no HL7 code: HL7's high would overstate them."""
    coding = [{"system": systems["risk_group"], "code": group, "display": f"{group} risk group"}]
    if (group == "high" and probability > 0.5) or (group == "low" and probability < 0.5):
        coding.append({"system": RISK_PROBABILITY, "code": group, "display": HL7_LIKELIHOOD[group]})
    relation = "at or above" if group == "high" else "below"
    return {"coding": coding, "text": f"{group} risk group: probability {probability:.3f} {relation} the "
                                      f"model's threshold {threshold:.3f}"}


def _block_scans(patient_id: str, block: str, scans: Mapping | None) -> list[str]:
    """The radiomics_row scan keys that fed the block: the radiology scan; the delta's first and last.

    `scans` is the patient's entry of fused_table's report (`scans`). Without one (a report from
    before CT timepoints) the patient's only scan, keyed by the patient id, fed radiology."""
    if scans is None and block == RADIOLOGY_BLOCK:
        return [patient_id]
    named = None if scans is None else scans.get(block)
    keys = [named] if block == RADIOLOGY_BLOCK else list(named or [])
    if len(keys) != (1 if block == RADIOLOGY_BLOCK else 2) or not all(isinstance(k, str) and k for k in keys):
        raise _refuse(patient_id, PROBABILITY_PREFIX + block,
                      f"the score used {block}, but fused_table's report names no scan for it ({named!r}): "
                      f"the report is not of the fused table that was scored")
    return keys


def _basis(row: dict, used: list[str], systems: dict[str, str], scans: Mapping | None = None) -> list[dict]:
    patient_id = row["patient_id"]
    basis = [{"identifier": {"system": systems["input"], "value": f"{FUSED_TABLE.key}/{patient_id}"},
              "display": f"{FUSED_TABLE.key} row of {patient_id} (the inputs of every modality model)"}]
    for block in used:
        asset, what = BLOCK_INPUTS[block]
        probability = row[PROBABILITY_PREFIX + block]
        extension = [{"url": systems["modality_probability"], "valueDecimal": probability}]
        said = f"{block} model probability {probability:.3f}"
        if block == RADIOLOGY_BLOCK:
            (key,) = _block_scans(patient_id, block, scans)
            inputs = [(key, f"{asset} of CT scan {key} ({what}): {said}")]
        elif block == DELTA_BLOCK:
            first, last = _block_scans(patient_id, block, scans)
            inputs = [(first, f"{asset} of the first CT scan, {first} ({what}): {said}"),
                      (last, f"{asset} of the last CT scan, {last} ({what}): {said}")]
        else:
            inputs = [(patient_id, f"{asset} ({what}): {said}")]
        basis += [{"extension": extension, "identifier": {"system": systems["input"], "value": f"{asset}/{key}"},
                   "display": display} for key, display in inputs]
    return basis


def _absence(block: str, scans: Mapping | None) -> str:
    """Why the patient lacks the block, as far as the inputs tell."""
    if block == DELTA_BLOCK:
        if scans is not None and len(scans.get("scans") or []) < 2:
            return "delta: only one CT scan"
        if scans is not None:
            return "delta: no usable radiomics_row of its first or last CT scan"
        return "delta: fewer than two CT scans with a usable radiomics_row"
    return f"{block}: no usable {BLOCK_INPUTS[block][0]}"


def risk_assessment_resource(row: dict, used: list[str], missing: list[str], model: RiskModel,
                             scored_at: str, device_url: str, systems: dict[str, str],
                             scans: Mapping | None = None) -> dict:
    probability = row["probability"]
    missing_text = (f"Scored without {', '.join(missing)} ({'; '.join(_absence(b, scans) for b in missing)}); "
                    f"the probability comes from {', '.join(used)} alone." if missing
                    else "Scored with every modality of the model.")
    resource = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "method": {"text": f"{model.name}, risk_model version {model.version}: late fusion of the "
                           f"per-modality models ({', '.join(model_blocks(row))})"},
        "code": {"coding": [ASSESSMENT_CODE], "text": "MLM risk assessment"},
        "subject": {"type": "Patient", "identifier": {"system": systems["patient"], "value": row["patient_id"]}},
        "occurrenceDateTime": scored_at,
        "performer": {"reference": device_url, "display": f"{model.name}, version {model.version}"},
        "basis": _basis(row, used, systems, scans),
        "prediction": [{
            "outcome": {"coding": [OUTCOME_CODE], "text": OUTCOME_TEXT},
            "probabilityDecimal": probability,
            "qualitativeRisk": qualitative_risk(row["risk_group"], probability, model.risk_threshold, systems),
            "rationale": f"Modalities used: {'+'.join(used)}; missing: {', '.join(missing) or 'none'}. "
                         f"High risk group at probability >= {model.risk_threshold!r}.",
        }],
        "note": [{"text": missing_text}, {"text": f"Intended use: {model.intended_use}."}],
    }
    if missing:  # FHIR JSON has no empty arrays
        resource["extension"] = [{"url": systems["missing"], "valueCode": block} for block in missing]
    return resource


def _scoring_time(scored_at: datetime) -> str:
    if not isinstance(scored_at, datetime) or scored_at.tzinfo is None:
        raise RiskAssessmentInputError(f"scored_at: {scored_at!r} is not a datetime with a time zone "
                                       "(FHIR dateTime with a time needs one)")
    return scored_at.isoformat()


def risk_assessment_bundle(row: dict, model: RiskModel, scored_at: datetime, *,
                           system_base: str = DEFAULT_SYSTEM_BASE, scans: Mapping | None = None) -> tuple[str, list[str]]:
    """(the Bundle's JSON text, the modalities missing) for one risk_scores row, validated by
    fhir.resources' R4B models and read back from the text to the same values. `scans`: the
    patient's entry of fused_table's report (`scans`: the CT scans that fed radiology and delta)."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    problem = model.problem()
    if problem:
        raise RiskAssessmentInputError(f"risk model: {problem}")
    used, missing = check_row(row, model)
    systems, when = _systems(system_base), _scoring_time(scored_at)
    device_url = _uuid("device", model.version, model.sha256)
    document = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": when,
        "entry": [
            {"fullUrl": device_url, "resource": device_resource(model, systems)},
            {"fullUrl": _uuid("risk-assessment", model.sha256, row["patient_id"], when),
             "resource": risk_assessment_resource(row, used, missing, model, when, device_url, systems, scans)},
        ],
    }
    try:
        bundle = Bundle.model_validate(document)
    except ValidationError as exc:
        raise _refuse(row["patient_id"], "FHIR Bundle", f"not a valid R4 Bundle: {exc}") from None
    text = bundle.model_dump_json(indent=2, exclude_none=True)
    # against a model not yet serialized: serializing leaves flags on the instance that == compares
    if Bundle.model_validate_json(text) != Bundle.model_validate(document):
        raise _refuse(row["patient_id"], "FHIR Bundle", "its JSON does not read back to the same values")
    return text + "\n", missing


# ---------------------------------------------------------------- the folder


def content_key(row: dict, model: RiskModel, system_base: str, scans: Mapping | None = None) -> str:
    """What a patient's Bundle says, but its scoring time: an unchanged key keeps the Bundle written
    before (and its time: the same model gave the same score then)."""
    import hashlib

    said = {key: row.get(key) for key in ("patient_id", "probability", "risk_group", "modalities_used",
                                          *(PROBABILITY_PREFIX + b for b in model_blocks(row)))}
    said["scans"] = None if scans is None else {k: scans.get(k) for k in ("scans", RADIOLOGY_BLOCK, DELTA_BLOCK)}
    text = json.dumps([BUNDLE_FORMAT, system_base, model.version, model.sha256, model.risk_threshold, model.name,
                       model.intended_use, said], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _previous_entries(folder: Path) -> dict[str, tuple[dict, bool]]:
    """The index's entries, each with whether its bundle file is still as recorded."""
    try:
        patients = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["patients"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    previous = {}
    for patient_id, entry in patients.items() if isinstance(patients, dict) else ():
        path = folder / BUNDLES_FOLDER / f"{patient_id}.json"
        if isinstance(entry, dict):
            previous[patient_id] = (entry, path.is_file() and sha256_file(path) == entry.get("sha256"))
    return previous


def _recorded_time(entry: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(entry["scored_at"])
    except (KeyError, TypeError, ValueError):
        return None


def write_risk_assessments(rows: list[dict], model: RiskModel, scored_at: datetime, folder: str | Path, *,
                           system_base: str = DEFAULT_SYSTEM_BASE, scans: Mapping[str, Mapping] | None = None) -> dict:
    """Write a Bundle per risk_scores row to `folder`/bundles/<patient_id>.json and the index to
    `folder`/index.json; return small metadata for the asset page.

    `scans`: fused_table's report's `scans` ({patient: {scans, radiology, delta}}), read once by the
    caller: the basis names the CT scans that fed each patient's radiology and delta blocks (a
    patient it lacks: the only scan, keyed by the patient id).

    `scored_at` is the time of this scoring; a patient whose Bundle would say the same as the one
    written before (same score, modalities and model) keeps that Bundle and its time, so a refresh
    builds and writes only the patients whose score changed. Every row is checked and every new
    Bundle built before any file is written."""
    import hashlib

    folder = Path(folder)
    _scoring_time(scored_at)  # a time without a zone is refused before any work
    problem = model.problem()
    if problem:
        raise RiskAssessmentInputError(f"risk model: {problem}")
    previous = _previous_entries(folder)
    entries: dict[str, dict] = {}
    new_bundles: dict[str, bytes] = {}
    for row in rows:
        _, missing = check_row(row, model)
        patient_id = row["patient_id"]
        if patient_id in entries:
            raise _refuse(patient_id, "patient_id", "appears in more than one row")
        patient_scans = (scans or {}).get(patient_id)
        key = content_key(row, model, system_base, patient_scans)
        entry, intact = previous.get(patient_id, ({}, False))
        same = entry.get("key") == key
        if same and intact:
            entries[patient_id] = entry
            continue
        # a damaged or missing file of an unchanged score is rewritten as it was, with its recorded time
        made_at = (_recorded_time(entry) if same else None) or scored_at
        text, _ = risk_assessment_bundle(row, model, made_at, system_base=system_base, scans=patient_scans)
        new_bundles[patient_id] = text.encode()
        entries[patient_id] = {"file": f"{BUNDLES_FOLDER}/{patient_id}.json", "key": key,
                               "sha256": hashlib.sha256(new_bundles[patient_id]).hexdigest(),
                               "scored_at": _scoring_time(made_at),
                               "probability": row["probability"], "risk_group": row["risk_group"],
                               "modalities_missing": missing}
    bundles = folder / BUNDLES_FOLDER
    for patient_id, data in new_bundles.items():
        atomic_write_bytes(bundles / f"{patient_id}.json", data)
    index = {"fhir": {"package": FHIR_PACKAGE, "version": FHIR_VERSION, "bundle_type": "collection"},
             "model": {"name": model.name, "version": model.version, "sha256": model.sha256,
                       "risk_threshold": model.risk_threshold},
             "system_base": system_base, "patients": dict(sorted(entries.items()))}
    index_path = atomic_write_bytes(folder / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())
    removed = 0
    if bundles.is_dir():  # patients no longer scored: their bundles go once the index no longer lists them
        for stale in bundles.glob("*.json"):
            if not stale.name.startswith(".") and stale.stem not in entries:
                stale.unlink()
                removed += 1
    groups = [entry["risk_group"] for entry in entries.values()]
    with_missing = [pid for pid, entry in sorted(entries.items()) if entry["modalities_missing"]]
    return {"bundles": len(entries), "written": len(new_bundles), "unchanged": len(entries) - len(new_bundles),
            "removed": removed, "index": str(index_path), "index_sha256": sha256_file(index_path),
            "fhir": f"{FHIR_PACKAGE} (FHIR {FHIR_VERSION}, R4)", "model_version": model.version,
            "risk_groups": {group: groups.count(group) for group in RISK_GROUPS},
            "patients_with_missing_modalities": len(with_missing),
            "missing_modalities_shown": with_missing[:20],
            "example": str(bundles / f"{min(entries)}.json") if entries else None}


def read_index(path: str | Path) -> dict:
    """The index `write_risk_assessments` wrote: the FHIR package, the model and per patient its file,
    hash, scoring time, probability, risk group and missing modalities."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_bundle(path: str | Path):
    """A written Bundle parsed by fhir.resources' R4B model (raises if it is not a valid Bundle)."""
    from fhir.resources.R4B.bundle import Bundle

    return Bundle.model_validate_json(Path(path).read_bytes())
