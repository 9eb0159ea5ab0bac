"""Dagster assets of the cohort group (thin wiring over clinical, fusion and modelling).

None is partitioned. They are refreshed together, in one run, by `cohort_refresh_sensor`
(`sensors.py`) once the per-patient work has settled, not after every patient. Anyone can
materialize them at any time from the UI. Each asset
keeps a manifest of what it was made from: a refresh whose inputs and settings did not change
reuses the stored files (same bytes, same data version) instead of recomputing.

fused_table uses a patient's radiomics_row / slide_vector file only when that partition's latest
materialization succeeded and passed its blocking checks (facts from the instance, decided in
`tables/soundness.py`). risk_model, trained on fused_table and read by risk_scores, is in
`risk_model_asset.py`; every asset's key, code version and files are in `gcmlm_assets/catalogue.py`.
"""

import json
from pathlib import Path

import dagster as dg

from gcmlm_assets import pictures, quarantine, step_pods
from gcmlm_assets.cohort.card import plots as model_plots
from gcmlm_assets.cohort.explain import explanation_keys
from gcmlm_assets.cohort.tables import bags, clinical, fusion, qc
from gcmlm_assets.cohort.check_results import check_result
from gcmlm_assets.catalogue import (
    Asset, CLINICAL_FILE, CLINICAL_PROBLEMS, CLINICAL_TABLE, FUSED_FILE, FUSED_TABLE, FUSION_REPORT, MODEL_FILE,
    PATIENT_FEATURES, RISK_MODEL, RISK_SCORES, SCORES_FILE, SCORES_PICTURE, UNI_FEATURES)
from gcmlm_assets.cohort.tables import score_changes
from gcmlm_assets.inputs import required_file
from gcmlm_assets.cohort.columns import CLINICAL_TABLE_COLUMNS, FUSED_TABLE_COLUMNS, RISK_SCORES_COLUMNS
from gcmlm_assets.cohort.resources import FusedTableSettings, PatientResultChecks
from gcmlm_assets.cohort.risk_model_asset import (
    current_model_version, excluded_metadata, load_patient_bags, log_left_out, train_risk_model,
    without_patients)
from gcmlm_assets.columns import column_schema_metadata
from gcmlm_assets.landing.scan import CLINICAL_CSV
from gcmlm_assets.landing_input import describe_links_leaving, link_leaving
from gcmlm_assets.lazy import lazy
from gcmlm_assets.cohort.soundness_facts import unsound_results
from gcmlm_assets.partitions import ensure_ct_scans, patients_partitions
from gcmlm_assets.policies import stored_materialization
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.reuse import StoredOutput
from gcmlm_assets.storage import (
    VERSION_POINTER, ArtifactStore, atomic_write_bytes, atomic_write_json, sha256_file, sha256_text)

# Imported by the steps that use it, not when the definitions load (gcmlm_assets/lazy.py).
pq = lazy("pyarrow.parquet")


def _stored_output(store: ArtifactStore, asset: Asset, fingerprint: str, context) -> StoredOutput:
    output = StoredOutput(store, asset, None, fingerprint)
    if output.reused:
        context.log.info(f"{asset.key}: inputs and settings unchanged, stored output reused")
    return output


# ---------------------------------------------------------------- clinical_table


@dg.asset(
    **CLINICAL_TABLE.dagster_attributes(),
    op_tags=step_pods.op_tags(step_pods.COHORT),
    description="The landing zone's `clinical.csv`, validated: one row per patient with `patient_id`, `mlm` "
    "(0, 1 or unknown) and the numeric covariates. Bad rows are left out and named by the "
    "clinical_rows_valid check.",
    metadata=column_schema_metadata(CLINICAL_TABLE_COLUMNS),
)
def clinical_table(context: dg.AssetExecutionContext, storage: ArtifactStorage,
                   landing: LandingZone) -> dg.MaterializeResult:
    store = storage.store()
    csv_path = landing.path() / CLINICAL_CSV
    leaving = link_leaving(csv_path, landing.path())
    if leaving is not None:
        raise dg.Failure(description=describe_links_leaving([(str(csv_path), leaving)], landing.path()),
                         metadata={"file": str(csv_path)}, allow_retries=False)
    if not csv_path.is_file():
        raise dg.Failure(description=f"{csv_path}: clinical table not found (columns patient_id, mlm, "
                                     "optional numeric covariates)", metadata={"expected": str(csv_path)})
    csv_sha = sha256_file(csv_path)
    output = _stored_output(store, CLINICAL_TABLE, sha256_text(CLINICAL_TABLE.code_version, csv_sha), context)
    folder = output.folder
    if not output.reused:
        try:
            parsed, problems = clinical.read_clinical_csv(csv_path)
        except clinical.ClinicalFileError as exc:
            raise dg.Failure(description=str(exc), metadata={"file": str(csv_path)}) from None
        table_path = CLINICAL_FILE.in_folder(folder)
        fusion.write_parquet(parsed.table, table_path)
        atomic_write_json(CLINICAL_PROBLEMS.in_folder(folder), [p.as_dict() for p in problems])
        output.record([CLINICAL_FILE, CLINICAL_PROBLEMS], source={"path": str(csv_path), "sha256": csv_sha},
                      summary={"rows_read": parsed.rows_read, "patients": parsed.table.num_rows,
                               "bad_rows": len(problems), "covariates": parsed.covariates,
                               "labels": clinical.label_counts(parsed.table)})
    summary = output.manifest["summary"]
    table = pq.read_table(CLINICAL_FILE.in_folder(folder))
    for problem in json.loads(CLINICAL_PROBLEMS.in_folder(folder).read_text(encoding="utf-8"))[:20]:
        context.log.warning(f"{csv_path}: line {problem['line']}: {problem['reason']}")
    # A row whose patient has no drop yet is kept (clinical data may come first), but said: it may be a typo.
    without_drop = [pid for pid in table.column("patient_id").to_pylist() if not landing.patient_dir(pid).is_dir()]
    if without_drop:
        context.log.warning(f"{csv_path}: {len(without_drop)} patient(s) have a row but no drop in the landing zone "
                            f"(no folder {landing.path()}/<patient_id>; not scored until one arrives, check the id "
                            f"for a typo): {', '.join(without_drop[:20])}{' ...' if len(without_drop) > 20 else ''}")
    return stored_materialization(
        output,
        metadata={
            "path": dg.MetadataValue.path(str(CLINICAL_FILE.in_folder(folder))),
            "problems_path": dg.MetadataValue.path(str(CLINICAL_PROBLEMS.in_folder(folder))),
            "source_csv": dg.MetadataValue.path(str(csv_path)),
            "source_csv_sha256": csv_sha,
            "rows_read": summary["rows_read"],
            "patients": summary["patients"],
            "bad_rows": summary["bad_rows"],
            "patients_without_drop": dg.MetadataValue.json(without_drop[:200]),
            "label_balance": dg.MetadataValue.json(summary["labels"]),
            "covariates": dg.MetadataValue.json(summary["covariates"]),
            "preview": dg.MetadataValue.md(fusion.markdown_table(table, table.column_names[:8])),
            **column_schema_metadata(CLINICAL_TABLE_COLUMNS, table),
        },
        data_version=output.sha256(CLINICAL_FILE),
    )


# ---------------------------------------------------------------- fused_table


EXCLUDED_SHOWN = 50  # patients named in fused_table's metadata; the report file names them all


def _first(mapping: dict, n: int) -> dict:
    return dict(list(mapping.items())[:n])


def fused_table_fingerprint(report: "fusion.FusionReport", clinical_sha256: str | None,
                            radiology_timepoint: str = fusion.DEFAULT_RADIOLOGY_TIMEPOINT) -> str:
    """What the fused table is made from (every input file, why a result was left out, which scans fed
    each patient, the settings); pinned by core/test_fingerprints.py."""
    return sha256_text(FUSED_TABLE.code_version, report.input_fingerprint(clinical_sha256),
                       f"radiology_timepoint={radiology_timepoint}")


@dg.asset(
    **FUSED_TABLE.dagster_attributes(),
    op_tags=step_pods.op_tags(step_pods.COHORT),
    deps=[
        *(dg.AssetDep(file.asset.key, partition_mapping=dg.AllPartitionMapping())
          for file in PATIENT_FEATURES.values()),
        dg.AssetDep(CLINICAL_TABLE.key),
    ],
    description="One row per patient: `rad_*` (radiomics_row of the scan setting `radiology_timepoint` picks, "
    "default the baseline), `path_*` (slide_vector), `clin_*` (clinical_table), `ln_*` (lymph_nodes: node counts, "
    "areas, T/MLN) and `delta_*` (patients with two or more CT scans: each radiomics feature's change from the "
    "first scan to the last, the days between them, the scans' similarity) columns, availability flags and the "
    "MLM label. A patient's result (of a CT scan: that scan's) is used only "
    "when its latest materialization succeeded and passed its blocking checks; the ones left out are "
    "listed with the reason (`excluded_patients`: the first 50; the report file lists all).",
    metadata=column_schema_metadata(FUSED_TABLE_COLUMNS),
)
def fused_table(context: dg.AssetExecutionContext, storage: ArtifactStorage,
                patient_result_checks: PatientResultChecks, fused_table: FusedTableSettings) -> dg.MaterializeResult:
    # The parameter's name is the resource key (Dagster's rule), the asset's name like risk_model's settings
    # (and users' run config and profiles say `fused_table`): it is read once, here, as `settings`.
    settings = fused_table
    problem = settings.timepoint_problem()
    if problem:
        raise dg.Failure(description=problem, allow_retries=False)
    store = storage.store()
    clinical_path = required_file(CLINICAL_FILE, store)
    clinical_sha = sha256_file(clinical_path)
    known = set(context.instance.get_dynamic_partitions(patients_partitions.name))
    scans = set(ensure_ct_scans(context.instance))  # an instance from before ct_scans: its scans first
    unsound = unsound_results(context.instance, sorted(known), patient_result_checks.blocking, store, sorted(scans))
    table, report = fusion.build_fused_table(store.root, pq.read_table(clinical_path), known_patients=known,
                                             unsound=unsound, known_scans=scans,
                                             radiology_timepoint=settings.radiology_timepoint)
    output = _stored_output(store, FUSED_TABLE,
                            fused_table_fingerprint(report, clinical_sha, settings.radiology_timepoint), context)
    folder = output.folder
    if not output.reused:
        fusion.write_parquet(table, FUSED_FILE.in_folder(folder))
        atomic_write_bytes(FUSION_REPORT.in_folder(folder), fusion.report_json(report).encode())
        output.record([FUSED_FILE, FUSION_REPORT],
                      inputs={"clinical_table_sha256": clinical_sha, "feature_files": len(report.input_files)},
                      settings={"radiology_timepoint": settings.radiology_timepoint})
    for problem in report.file_problems[:20]:
        context.log.warning(f"{problem['file']}: {problem['reason']}")
    for entry in report.excluded_results[:20]:
        context.log.warning(f"left out {entry['patient_id']}'s {entry['modality']}: {entry['reason']}")
    stats = fusion.fused_stats(table)
    excluded = report.excluded_patients()
    return stored_materialization(
        output,
        metadata={
            "path": dg.MetadataValue.path(str(FUSED_FILE.in_folder(folder))),
            "report": dg.MetadataValue.path(str(FUSION_REPORT.in_folder(folder))),
            **{k: v for k, v in stats.items() if isinstance(v, int)},
            "label_balance": dg.MetadataValue.json({
                "positive": stats["label_positive"], "negative": stats["label_negative"],
                "unknown": stats["label_unknown"], "labelled_with_features": stats["labelled_with_features"]}),
            "rejected_feature_files": len(report.file_problems),
            "excluded_results": len(report.excluded_results),
            # bounded: a refresh's event must not grow with the cohort (every patient is in the report file)
            "excluded_patients": dg.MetadataValue.json(_first(excluded, EXCLUDED_SHOWN)),
            "excluded_patients_shown": f"{min(len(excluded), EXCLUDED_SHOWN)} of {len(excluded)} (all in the report)",
            "input_feature_files": len(report.input_files),
            "radiology_timepoint": settings.radiology_timepoint,
            "patients_with_several_scans": sum(1 for c in report.scans.values() if len(c["scans"]) > 1),
            "input_fingerprint": output.fingerprint,
            "clinical_table_sha256": clinical_sha,
            "preview": dg.MetadataValue.md(fusion.preview_markdown(table)),
            **column_schema_metadata(FUSED_TABLE_COLUMNS, table),
        },
        data_version=output.sha256(FUSED_FILE),
    )


# ---------------------------------------------------------------- risk_scores


SCORES_VALID = "scores_valid"
# Evaluated in the step on the new scores before they are written where readers (the explanations'
# sensor, the demo's watcher) look: scores that fail are quarantined and the published ones stay.
SCORES_VALID_CHECK = dg.AssetCheckSpec(
    SCORES_VALID, asset=RISK_SCORES.key, blocking=True,
    description="Every patient with CT or slide features has exactly one risk score, a probability between 0 and "
    "1, and a risk group of high or low. Checked before new scores are published: scores that fail are "
    "quarantined and the previous scores stay where the explanations read them.")


def risk_scores_fingerprint(model_sha256: str, fused_sha256: str, bags_sha256: str, model_version: str) -> str:
    """What the scores are made from (see risk_scores); pinned by core/test_fingerprints.py."""
    return sha256_text(RISK_SCORES.code_version, model_sha256, fused_sha256, bags_sha256,
                       explanation_keys.CODE_VERSION, model_version)


@dg.asset(
    **RISK_SCORES.dagster_attributes(),
    op_tags=step_pods.op_tags(step_pods.COHORT),
    deps=[dg.AssetDep(RISK_MODEL.key), dg.AssetDep(FUSED_TABLE.key),
          dg.AssetDep(UNI_FEATURES.key, partition_mapping=dg.AllPartitionMapping())],
    description="MLM probability and risk group (high: at or above the model's threshold) for every "
    "patient with radiology or pathology features, from the current risk_model version (an ABMIL model "
    "reads the patch features too). A patient lacking a modality (a failed CT, no slides, no lymph-node slides) "
    "is scored from the others and says so (`modalities_missing`; `scored_without` counts them). Each score "
    "records the model version it came from and the key of "
    "the explanation it needs (risk_explanations_sensor explains the patients whose key changed).",
    metadata=column_schema_metadata(RISK_SCORES_COLUMNS),
    check_specs=[SCORES_VALID_CHECK],
    output_required=False,  # scores that fail scores_valid are not materialized
)
def risk_scores(context: dg.AssetExecutionContext, storage: ArtifactStorage):
    from gcmlm_assets.cohort.model import modelling  # scikit-learn at import: only in this step

    store = storage.store()
    model_folder, pointer = _current_model_or_fail(store)
    model_path = MODEL_FILE.in_folder(model_folder)
    fused_path = required_file(FUSED_FILE, store)
    model_sha, fused_sha = pointer["files"][MODEL_FILE.name], sha256_file(fused_path)
    fused = pq.read_table(fused_path)
    # the explanation keys' inputs: the model file, the fused rows, the pathology patients' feature
    # files (the bags) and the explanation code; the version name is written beside each score
    fingerprint = risk_scores_fingerprint(
        model_sha, fused_sha, bags.bags_fingerprint(store, UNI_FEATURES.key, bags.pathology_patients(fused)),
        pointer["version"])
    output = _stored_output(store, RISK_SCORES, fingerprint, context)
    folder = output.folder
    if not output.reused:
        if not model_path.is_file():
            raise dg.Failure(description=f"{model_path} (named by {model_folder.parent / VERSION_POINTER}) is "
                                         f"missing: re-materialize {RISK_MODEL.key}",
                             metadata={"model": str(model_path)})
        try:  # checked against the hash current.json recorded, then loaded from the same bytes
            model = modelling.load_model(model_path, model_sha, str(model_folder.parent / VERSION_POINTER))
        except modelling.UntrustedModelFile as exc:
            raise dg.Failure(description=str(exc), metadata={"model": str(model_path)}) from None
        patient_bags, excluded = (load_patient_bags(store, bags.pathology_patients(fused), context)
                                  if model.needs_bags() else (None, {}))
        log_left_out(context, excluded, "left out")
        scored = without_patients(fused, excluded)  # left out with the reason, never scored without their slides
        scores = _with_versions(model.score_table(scored, patient_bags), pointer["version"],
                                explanation_keys.explanation_keys(scored, model_sha, store, UNI_FEATURES.key))
        verdict = qc.scores_valid(scores, _expected_scored(fused, excluded))
        if verdict.outcome == qc.ERROR:
            yield _quarantined_scores(context, store, scores, verdict)
            return
        # against the scores being replaced (their id and probability columns only), before they are
        changes = score_changes.score_changes(SCORES_FILE.in_folder(folder), scores)
        fusion.write_parquet(scores, SCORES_FILE.in_folder(folder))
        _save_score_picture(scores, model.risk_threshold, SCORES_PICTURE.in_folder(folder))
        output.record([SCORES_FILE, SCORES_PICTURE],
                      inputs={"risk_model_sha256": model_sha, "risk_model_version": pointer["version"],
                              "fused_table_sha256": fused_sha},
                      risk_threshold=model.risk_threshold, model_blocks=list(model.blocks),
                      excluded_patients=excluded, changes=changes)
    manifest = output.manifest
    scores = pq.read_table(SCORES_FILE.in_folder(folder))
    excluded = manifest.get("excluded_patients") or {}
    verdict = qc.scores_valid(scores, _expected_scored(fused, excluded))
    if verdict.outcome == qc.ERROR:  # stored scores that no longer pass (a damaged file): out of readers' way
        moved = quarantine.quarantine_output(store, RISK_SCORES.key, None, [SCORES_VALID],
                                             {"description": verdict.description})
        context.log.error(f"risk_scores: the stored scores failed {SCORES_VALID}; moved to {moved}")
        yield check_result(verdict, SCORES_VALID, {"quarantined_to": dg.MetadataValue.path(str(moved))})
        return
    check = check_result(verdict, SCORES_VALID)
    if not SCORES_PICTURE.in_folder(folder).is_file():  # reused scores stored before risk_scores had a picture
        _save_score_picture(scores, manifest["risk_threshold"], SCORES_PICTURE.in_folder(folder))
    groups = scores.column("risk_group").to_pylist()
    used = scores.column("modalities_used").to_pylist()
    # scores written before the column existed lack it (their code version differs: not reused)
    missing = scores.column("modalities_missing").to_pylist() if "modalities_missing" in scores.column_names else []
    scored_without = {}
    for blocks in missing:
        for block in filter(None, (blocks or "").split("+")):
            scored_without[block] = scored_without.get(block, 0) + 1
    yield stored_materialization(
        output,
        metadata={
            "path": dg.MetadataValue.path(str(SCORES_FILE.in_folder(folder))),
            "risk_model_version": pointer["version"],
            "risk_model_path": dg.MetadataValue.path(str(model_path)),
            "risk_model_sha256": model_sha,
            "fused_table_sha256": fused_sha,
            "scored": scores.num_rows,
            **excluded_metadata(excluded),
            "risk_threshold": manifest["risk_threshold"],
            "risk_groups": dg.MetadataValue.json({g: groups.count(g) for g in ("high", "low")}),
            "modalities_used": dg.MetadataValue.json({u: used.count(u) for u in sorted(set(used))}),
            # patients scored WITHOUT a modality of the model (a failed CT scores from the slides alone)
            "scored_without": dg.MetadataValue.json(dict(sorted(scored_without.items()))),
            **_changes_metadata(scores, manifest.get("changes") or {}),
            **column_schema_metadata(RISK_SCORES_COLUMNS, scores),
            "picture": dg.MetadataValue.md(pictures.picture_markdown(SCORES_PICTURE.in_folder(folder), pictures.PLOT,
                                                                     "risk score distribution")),
            "picture_path": dg.MetadataValue.path(str(SCORES_PICTURE.in_folder(folder))),
        },
        data_version=output.sha256(SCORES_FILE),
        check_results=[check],
    )


PREVIEW_COLUMNS = ["patient_id", "probability", "risk_group", "modalities_used", "modalities_missing", "mlm"]


def _changes_metadata(scores, changes: dict) -> dict:
    """The preview with the new and changed scores first, and their counts (from the manifest, so a
    reused materialization shows what the run that wrote the scores saw)."""
    rows = score_changes.preview_table(scores, changes, [c for c in PREVIEW_COLUMNS if c in scores.column_names])
    more = scores.num_rows - rows.num_rows
    preview = fusion.markdown_table(rows, rows.column_names, rows.num_rows)
    if more > 0:
        preview += f"\n\n{more} more rows; {scores.num_columns} columns in all."
    return {
        "newly_scored": int(changes.get("new", 0)),
        "score_changed": int(changes.get("changed", 0)),
        "preview": dg.MetadataValue.md(score_changes.changes_line(changes, scores.num_rows) + "\n\n" + preview),
    }


def _expected_scored(fused, excluded: dict[str, str]) -> list[str]:
    """The patients who must have a score: those with CT or slide features, but the ones left out
    with a reason (their patch features could not be read for an ABMIL model). Lymph-node features
    alone do not oblige: a model may lack that block (too few labelled patients have it)."""
    flags = [fusion.AVAILABILITY[fusion.RADIOLOGY], fusion.AVAILABILITY[fusion.PATHOLOGY]]
    rows = fused.select(["patient_id", *flags]).to_pylist()
    return [row["patient_id"] for row in rows if any(row[flag] for flag in flags) and row["patient_id"] not in excluded]


def _quarantined_scores(context, store: ArtifactStore, scores, verdict: "qc.Verdict") -> dg.AssetCheckResult:
    """New scores that failed scores_valid: written into quarantine, never where readers look."""
    from gcmlm_assets.storage import new_version_folder

    staging = new_version_folder(RISK_SCORES.folder(store))
    fusion.write_parquet(scores, SCORES_FILE.in_folder(staging))
    published = SCORES_FILE.path(store)
    kept = str(published) if published.is_file() else "none"
    moved = quarantine.quarantine_unpublished(store, RISK_SCORES.key, staging, [SCORES_VALID],
                                              {"description": verdict.description, "scores_in_use": kept})
    context.log.error(f"risk_scores: the new scores failed {SCORES_VALID} ({verdict.description}); they are not "
                      f"published (moved to {moved}); the scores in use stay {kept}")
    return check_result(verdict, SCORES_VALID, {"quarantined_to": dg.MetadataValue.path(str(moved)),
                                                "scores_in_use": kept})


def _with_versions(scores, model_version: str, keys: dict[str, str]):
    """The scores with the model version they came from and each patient's explanation key."""
    import pyarrow as pa

    ids = scores.column("patient_id").to_pylist()
    return (scores.append_column("model_version", pa.array([model_version] * len(ids), pa.string()))
            .append_column("explanation_key", pa.array([keys[patient_id] for patient_id in ids], pa.string())))


def _save_score_picture(scores, threshold: float, path: Path) -> None:
    pictures.save_png(model_plots.plot_score_distribution(
        scores.column("probability").to_pylist(), threshold, scores.column("mlm").to_pylist()), path)


def _current_model_or_fail(store: ArtifactStore) -> tuple[Path, dict]:
    current = current_model_version(store)
    if current is None:
        pointer = store.path(RISK_MODEL.key, None, VERSION_POINTER)
        raise dg.Failure(description=f"{pointer} not found: materialize {RISK_MODEL.key} first",
                         metadata={"missing": str(pointer)})
    return current


ASSETS: list[dg.AssetsDefinition] = [clinical_table, fused_table, train_risk_model, risk_scores]
