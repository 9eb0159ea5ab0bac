"""risk_assessments: the scores as FHIR R4 RiskAssessments, one Bundle per scored patient.

Thin wiring over `exchange/fhir_risk.py`. It reads risk_scores' file and manifest (the model version,
its file's hash and the threshold that made those scores, so the bundles can never name another
model than the one that scored) and is refreshed in the cohort's run, after risk_scores. It reads
fused_table's report once, for the CT scans that fed each patient's radiology and delta blocks
(the basis names them), after checking that the fused table is the one risk_scores scored. A
refresh rewrites only the bundles whose score, modalities, scans or model changed; its data
version is the index's hash.
"""

import json

from datetime import datetime, timezone

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.catalogue import (
    ASSESSMENT_INDEX, FUSED_FILE, FUSED_TABLE, FUSION_REPORT, RISK_ASSESSMENTS, RISK_MODEL, RISK_SCORES, SCORES_FILE)
from gcmlm_assets.cohort.exchange import fhir_risk
from gcmlm_assets.inputs import required_file
from gcmlm_assets.lazy import lazy
from gcmlm_assets.policies import TRANSIENT_RETRY, stored_materialization
from gcmlm_assets.resources import ArtifactStorage
from gcmlm_assets.reuse import StoredOutput
from gcmlm_assets.storage import sha256_file, sha256_text

pq = lazy("pyarrow.parquet")

PREVIEW_ROWS = 10


def _scored_at(context: dg.AssetExecutionContext) -> datetime:
    """When risk_scores' latest materialization was recorded (now, for files made outside Dagster)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(RISK_SCORES.key))
    return datetime.fromtimestamp(event.timestamp if event else datetime.now(timezone.utc).timestamp(), timezone.utc)


def _scores_and_model(store) -> tuple:
    """risk_scores' rows and the model that scored them, from its manifest (checked against the file)."""
    path = required_file(SCORES_FILE, store)
    manifest = store.read_manifest(RISK_SCORES.key, None) or {}
    recorded = (manifest.get("files") or {}).get(SCORES_FILE.name)
    digest = sha256_file(path)
    if recorded != digest:
        raise dg.Failure(description=f"{path} is not the file risk_scores recorded (sha256 {digest[:12]}…, "
                                     f"recorded {str(recorded)[:12]}…): materialize {RISK_SCORES.key} again",
                         allow_retries=False)
    inputs = manifest.get("inputs") or {}
    model = fhir_risk.RiskModel(version=inputs.get("risk_model_version"), sha256=inputs.get("risk_model_sha256"),
                                risk_threshold=manifest.get("risk_threshold"))
    return path, digest, model, inputs.get("fused_table_sha256")


def _scored_fusion_report(store, scored_fused_sha: str | None) -> tuple:
    """(fused_table's report, its recorded hash) beside the fused table risk_scores scored; refused
    when fused_table changed since (the report's scans would not be the scored table's)."""
    manifest = store.read_manifest(FUSED_TABLE.key, None) or {}
    files = manifest.get("files") or {}
    if scored_fused_sha is not None and files.get(FUSED_FILE.name) != scored_fused_sha:
        raise dg.Failure(description=f"{FUSED_TABLE.key} changed since {RISK_SCORES.key} scored it ({FUSED_FILE.name} "
                                     f"sha256 {str(files.get(FUSED_FILE.name))[:12]}…, scored "
                                     f"{scored_fused_sha[:12]}…): materialize {RISK_SCORES.key} again",
                         allow_retries=False)
    path = FUSION_REPORT.path(store)
    if not path.is_file():  # a fused table from before the report: each patient's only scan is keyed by its id
        return None, ""
    return path, str(files.get(FUSION_REPORT.name) or sha256_file(path))


def _scans(report_path) -> dict:
    """The report's `scans` ({patient: {scans, radiology, delta}}): read once per build, never per patient."""
    if report_path is None:
        return {}
    try:
        scans = json.loads(report_path.read_text(encoding="utf-8")).get("scans") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise dg.Failure(description=f"{report_path}: not a readable fusion report ({error}): materialize "
                                     f"{FUSED_TABLE.key} again", allow_retries=False) from None
    if not isinstance(scans, dict):
        raise dg.Failure(description=f"{report_path}: `scans` is not a mapping of patients: materialize "
                                     f"{FUSED_TABLE.key} again", allow_retries=False)
    return scans


def _preview(rows: list[dict]) -> str:
    lines = ["| patient_id | probability | risk_group | modalities missing |", "|---|---|---|---|"]
    for row in rows[:PREVIEW_ROWS]:
        missing = ", ".join(row["modalities_missing"]) or "–"
        lines.append(f"| {row['patient_id']} | {row['probability']:.3f} | {row['risk_group']} | {missing} |")
    if len(rows) > PREVIEW_ROWS:
        lines.append(f"\n{len(rows) - PREVIEW_ROWS} more patients (the index lists all).")
    return "\n".join(lines)


@dg.asset(
    **RISK_ASSESSMENTS.dagster_attributes(),
    deps=[RISK_SCORES.key, RISK_MODEL.key],
    op_tags=step_pods.op_tags(step_pods.COHORT),
    retry_policy=TRANSIENT_RETRY,
    description="Each scored patient's risk as a FHIR R4 RiskAssessment (with the model as its Device) in one "
                "Bundle per patient, validated with fhir.resources, and an index of them all. A patient "
                "scored without a modality says so in the assessment.",
)
def risk_assessments(context: dg.AssetExecutionContext, storage: ArtifactStorage) -> dg.MaterializeResult:
    store = storage.store()
    scores_path, scores_sha, model, scored_fused_sha = _scores_and_model(store)
    report_path, report_sha = _scored_fusion_report(store, scored_fused_sha)
    fingerprint = sha256_text(RISK_ASSESSMENTS.code_version, fhir_risk.BUNDLE_FORMAT, scores_sha, report_sha)
    output = StoredOutput(store, RISK_ASSESSMENTS, None, fingerprint)
    if output.reused:
        context.log.info(f"{RISK_ASSESSMENTS.key}: scores unchanged, stored bundles reused")
    else:
        rows = pq.read_table(scores_path).to_pylist()
        try:
            written = fhir_risk.write_risk_assessments(rows, model, _scored_at(context), output.folder,
                                                       scans=_scans(report_path))
        except fhir_risk.RiskAssessmentInputError as error:
            raise dg.Failure(description=f"{scores_path}: {error}", allow_retries=False) from error
        context.log.info(f"{RISK_ASSESSMENTS.key}: {written['written']} bundle(s) written, "
                         f"{written['unchanged']} unchanged, {written['removed']} removed")
        summary = {key: written[key] for key in ("bundles", "written", "unchanged", "removed", "risk_groups",
                                                 "patients_with_missing_modalities", "missing_modalities_shown",
                                                 "example", "fhir", "model_version")}
        # the preview is made once, here: a reused materialization shows it without reading the index
        index = fhir_risk.read_index(ASSESSMENT_INDEX.in_folder(output.folder))
        shown = [{"patient_id": patient_id, **entry} for patient_id, entry in index["patients"].items()]
        shown.sort(key=lambda row: (not row["modalities_missing"], row["patient_id"]))  # the incomplete first
        summary["preview"] = _preview(shown)
        output.record([ASSESSMENT_INDEX], inputs={"risk_scores_sha256": scores_sha, "fusion_report_sha256": report_sha},
                      summary=summary)
    summary = output.manifest["summary"]
    return stored_materialization(
        output,
        metadata={
            "path": dg.MetadataValue.path(str(ASSESSMENT_INDEX.in_folder(output.folder))),
            "example_bundle": dg.MetadataValue.path(summary["example"] or ""),
            "bundles": summary["bundles"],
            "written": summary["written"] if not output.reused else 0,
            "fhir": summary["fhir"],
            "risk_model_version": summary["model_version"],
            "risk_groups": dg.MetadataValue.json(summary["risk_groups"]),
            "patients_with_missing_modalities": summary["patients_with_missing_modalities"],
            "reused": output.reused,
            "preview": dg.MetadataValue.md(summary["preview"]),
        },
        data_version=output.sha256(ASSESSMENT_INDEX),
    )


ASSETS: list[dg.AssetsDefinition] = [risk_assessments]
