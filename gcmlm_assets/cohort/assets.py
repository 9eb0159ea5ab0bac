"""Dagster assets of the cohort group (thin wiring over clinical, fusion and modelling).

None is partitioned. They are refreshed together, in one run, by `cohort_refresh_sensor`
(`sensors.py`) once the per-patient work has settled, not after every patient. Anyone can
materialize them at any time from the UI. Each asset
keeps a manifest of what it was made from: a refresh whose inputs and settings did not change
reuses the stored files (same bytes, same data version) instead of recomputing.

fused_table uses a patient's radiomics_row / slide_vector file only when that partition's latest
materialization succeeded and passed its blocking checks (facts from the instance, decided in
`soundness.py`). risk_model publishes each model as one version folder with a `current.json`
pointer; it is trained on the labelled patients' rows only and refits only when they (labels or
features) or its settings change; with too few labelled patients it waits instead of failing and
keeps its last good model.
"""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from gcmlm_assets import pictures, step_pods
from gcmlm_assets.cohort.columns import CLINICAL_TABLE_COLUMNS, FUSED_TABLE_COLUMNS, RISK_SCORES_COLUMNS
from gcmlm_assets.columns import column_schema_metadata
from gcmlm_assets.landing.scan import describe_links_leaving, link_leaving
from gcmlm_assets.lazy import lazy
from gcmlm_assets.cohort.soundness_facts import declared_blocking_checks, unsound_results
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.pathology.checks import UNI_FEATURES
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.storage import (
    VERSION_POINTER, ArtifactStore, atomic_write_bytes, atomic_write_json, new_version_folder, publish_version,
    read_version_pointer, sha256_file, sha256_text, version_intact)

# Imported by the steps that use them, not when the definitions load (gcmlm_assets/lazy.py).
pq = lazy("pyarrow.parquet")
clinical = lazy("gcmlm_assets.cohort.clinical")
fusion = lazy("gcmlm_assets.cohort.fusion")
modelling = lazy("gcmlm_assets.cohort.modelling")
model_settings = lazy("gcmlm_assets.cohort.model_settings")
training = lazy("gcmlm_assets.cohort.training")
cohort_data = lazy("gcmlm_assets.cohort.cohort_data")
crossval = lazy("gcmlm_assets.cohort.crossval")
model_metrics = lazy("gcmlm_assets.cohort.metrics")
model_plots = lazy("gcmlm_assets.cohort.plots")
model_card = lazy("gcmlm_assets.cohort.model_card")
model_importance = lazy("gcmlm_assets.cohort.importance")
card_context = lazy("gcmlm_assets.cohort.card_context")
bags = lazy("gcmlm_assets.cohort.bags")
explanation_keys = lazy("gcmlm_assets.cohort.explanation_keys")

GROUP = "cohort"
CLINICAL_CSV = "clinical.csv"
# Bump a version when its asset's output would change for the same inputs (it invalidates reuse).
CODE_VERSIONS = {"clinical_table": "1", "fused_table": "3", "risk_model": "4", "risk_scores": "3"}

CLINICAL_FILE, CLINICAL_PROBLEMS = "clinical.parquet", "problems.json"
FUSED_FILE, FUSION_REPORT = "fused.parquet", "fusion_report.json"
MODEL_FILE, METRICS_FILE, MODEL_CARD = "model.skops", "metrics.json", "model_card.json"
MODEL_CARD_MARKDOWN = "model_card.md"
CV_PREDICTIONS = "cv_predictions.parquet"
PLOTS = {"roc": "roc.png", "calibration": "calibration.png", "decision_curve": "decision_curve.png"}
SCORES_FILE = "scores.parquet"
SCORES_PICTURE = "score_distribution.png"


def _required_input(store: ArtifactStore, asset: str, filename: str) -> Path:
    path = store.path(asset, None, filename)
    if not path.is_file():
        raise dg.Failure(description=f"{path} not found: materialize {asset} first",
                         metadata={"missing": str(path)})
    return path


def _reuse_or_none(store: ArtifactStore, asset: str, fingerprint: str, context) -> dict | None:
    manifest = store.reusable(asset, None, fingerprint)
    if manifest is not None:
        context.log.info(f"{asset}: inputs and settings unchanged, stored output reused")
    return manifest


# ---------------------------------------------------------------- clinical_table


@dg.asset(
    name="clinical_table",
    group_name=GROUP,
    op_tags=step_pods.op_tags(step_pods.COHORT),
    code_version=CODE_VERSIONS["clinical_table"],
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
    folder = store.asset_dir("clinical_table")
    csv_sha = sha256_file(csv_path)
    fingerprint = sha256_text(CODE_VERSIONS["clinical_table"], csv_sha)
    manifest = _reuse_or_none(store, "clinical_table", fingerprint, context)
    if manifest is None:
        try:
            parsed, problems = clinical.read_clinical_csv(csv_path)
        except clinical.ClinicalFileError as exc:
            raise dg.Failure(description=str(exc), metadata={"file": str(csv_path)}) from None
        table_path = folder / CLINICAL_FILE
        fusion.write_parquet(parsed.table, table_path)
        atomic_write_json(folder / CLINICAL_PROBLEMS, [p.as_dict() for p in problems])
        manifest = {
            "fingerprint": fingerprint,
            "files": {CLINICAL_FILE: sha256_file(table_path),
                      CLINICAL_PROBLEMS: sha256_file(folder / CLINICAL_PROBLEMS)},
            "source": {"path": str(csv_path), "sha256": csv_sha},
            "summary": {"rows_read": parsed.rows_read, "patients": parsed.table.num_rows,
                        "bad_rows": len(problems), "covariates": parsed.covariates,
                        "labels": clinical.label_counts(parsed.table)},
        }
        store.write_manifest("clinical_table", None, manifest)
    summary = manifest["summary"]
    table = pq.read_table(folder / CLINICAL_FILE)
    for problem in json.loads((folder / CLINICAL_PROBLEMS).read_text(encoding="utf-8"))[:20]:
        context.log.warning(f"{csv_path}: line {problem['line']}: {problem['reason']}")
    # A row whose patient has no drop yet is kept (clinical data may come first), but said: it may be a typo.
    without_drop = [pid for pid in table.column("patient_id").to_pylist() if not landing.patient_dir(pid).is_dir()]
    if without_drop:
        context.log.warning(f"{csv_path}: {len(without_drop)} patient(s) have a row but no drop in the landing zone "
                            f"(no folder {landing.path()}/<patient_id>; not scored until one arrives, check the id "
                            f"for a typo): {', '.join(without_drop[:20])}{' ...' if len(without_drop) > 20 else ''}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(folder / CLINICAL_FILE)),
            "problems_path": dg.MetadataValue.path(str(folder / CLINICAL_PROBLEMS)),
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
        data_version=dg.DataVersion(manifest["files"][CLINICAL_FILE]),
    )


# ---------------------------------------------------------------- fused_table


EXCLUDED_SHOWN = 50  # patients named in fused_table's metadata; the report file names them all


def _first(mapping: dict, n: int) -> dict:
    return dict(list(mapping.items())[:n])


@dg.asset(
    name="fused_table",
    group_name=GROUP,
    op_tags=step_pods.op_tags(step_pods.COHORT),
    code_version=CODE_VERSIONS["fused_table"],
    deps=[
        dg.AssetDep("radiomics_row", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("slide_vector", partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep("clinical_table"),
    ],
    description="One row per patient: `rad_*` (radiomics_row), `path_*` (slide_vector) and `clin_*` "
    "(clinical_table) columns, availability flags and the MLM label. A patient's result is used only "
    "when its latest materialization succeeded and passed its blocking checks; the ones left out are "
    "listed with the reason (`excluded_patients`: the first 50; the report file lists all).",
    metadata=column_schema_metadata(FUSED_TABLE_COLUMNS),
)
def fused_table(context: dg.AssetExecutionContext, storage: ArtifactStorage) -> dg.MaterializeResult:
    store = storage.store()
    clinical_path = _required_input(store, "clinical_table", CLINICAL_FILE)
    clinical_sha = sha256_file(clinical_path)
    known = set(context.instance.get_dynamic_partitions(patients_partitions.name))
    unsound = unsound_results(context.instance, sorted(known), declared_blocking_checks(), store)
    table, report = fusion.build_fused_table(store.root, pq.read_table(clinical_path), known_patients=known,
                                             unsound=unsound)
    fingerprint = sha256_text(CODE_VERSIONS["fused_table"], report.input_fingerprint(clinical_sha))
    folder = store.asset_dir("fused_table")
    manifest = _reuse_or_none(store, "fused_table", fingerprint, context)
    if manifest is None:
        fusion.write_parquet(table, folder / FUSED_FILE)
        atomic_write_bytes(folder / FUSION_REPORT, fusion.report_json(report).encode())
        manifest = {"fingerprint": fingerprint,
                    "files": {FUSED_FILE: sha256_file(folder / FUSED_FILE),
                              FUSION_REPORT: sha256_file(folder / FUSION_REPORT)},
                    "inputs": {"clinical_table_sha256": clinical_sha, "feature_files": len(report.input_files)}}
        store.write_manifest("fused_table", None, manifest)
    for problem in report.file_problems[:20]:
        context.log.warning(f"{problem['file']}: {problem['reason']}")
    for entry in report.excluded_results[:20]:
        context.log.warning(f"left out {entry['patient_id']}'s {entry['modality']}: {entry['reason']}")
    stats = fusion.fused_stats(table)
    excluded = report.excluded_patients()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(folder / FUSED_FILE)),
            "report": dg.MetadataValue.path(str(folder / FUSION_REPORT)),
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
            "input_fingerprint": fingerprint,
            "clinical_table_sha256": clinical_sha,
            "preview": dg.MetadataValue.md(fusion.preview_markdown(table)),
            **column_schema_metadata(FUSED_TABLE_COLUMNS, table),
        },
        data_version=dg.DataVersion(manifest["files"][FUSED_FILE]),
    )


# ---------------------------------------------------------------- risk_model
# Each trained model is published as one version folder, <artifacts>/risk_model/<version>/, with
# every file of the set; current.json (replaced atomically) names the version and lists the
# files' hashes. Readers read current.json once and take everything from that folder.

RISK_MODEL = "risk_model"
MODEL_FILES = (MODEL_FILE, METRICS_FILE, MODEL_CARD, MODEL_CARD_MARKDOWN, CV_PREDICTIONS, *PLOTS.values())
WAITING = "waiting for labelled patients"
REUSED = "reused: labelled data and settings unchanged"


def current_model_version(store: ArtifactStore) -> tuple[Path, dict] | None:
    """(folder, pointer) of the published risk_model version, or None when none is published."""
    root = store.asset_dir(RISK_MODEL, create=False)
    pointer = read_version_pointer(root)
    return (root / pointer["version"], pointer) if pointer else None


@dg.asset(
    name="risk_model",
    group_name=GROUP,
    op_tags=step_pods.op_tags(step_pods.COHORT),
    code_version=CODE_VERSIONS["risk_model"],
    # uni_features: the attention-MIL block reads the patch features themselves
    deps=[dg.AssetDep("fused_table"), dg.AssetDep(UNI_FEATURES, partition_mapping=dg.AllPartitionMapping())],
    output_required=False,
    description="Per-modality models fused late (mean logit by default, or a stacked logistic combiner), "
    "validated by repeated stratified k-fold CV with an ablation (each block, pathology mean and ABMIL, both "
    "fusions) on the same folds, and saved with skops; its model card follows TRIPOD+AI. Trained on the "
    "labelled patients only: it refits when a label, a labelled patient's features or a setting changes, "
    "never for a new unlabelled patient (risk_scores scores them with the installed model). With too few "
    "labelled patients it waits (an observation says how many) and keeps the last good model.",
)
def train_risk_model(context: dg.AssetExecutionContext, storage: ArtifactStorage,
                     risk_model: RiskModelSettings) -> Iterator[dg.MaterializeResult]:
    store = storage.store()
    fused_path = _required_input(store, "fused_table", FUSED_FILE)
    settings = risk_model.model_settings()
    # The fit reads the labelled patients' rows and nothing else; the reuse fingerprint covers exactly that.
    table = training.training_table(pq.read_table(fused_path), settings.blocks())
    # ABMIL trains on the labelled patients only: the others' bags are not read
    pathology_patients = (bags.pathology_patients(table)
                          if model_settings.PATHOLOGY_ABMIL in settings.blocks() else [])
    inputs = {"training_data_sha256": training.training_data_sha256(table), "labelled_patients": table.num_rows,
              "patch_features_sha256": (bags.bags_fingerprint(store, UNI_FEATURES, pathology_patients)
                                        if pathology_patients else None)}
    fingerprint = sha256_text(CODE_VERSIONS["risk_model"], training.fitting_library_versions(),
                              model_card.settings_json(settings), json.dumps(inputs, sort_keys=True))
    root = store.asset_dir(RISK_MODEL)
    pointer = _reusable_version(root, fingerprint)
    if pointer is not None:
        context.log.info(f"risk_model: labelled data and settings unchanged, version {pointer['version']} kept "
                         "(patients without a label are scored with it, not trained on)")
        yield _restated_result(context, root, pointer, REUSED)
        return
    data = cohort_data.CohortData.from_table(
        table, settings.blocks(), bags=_patient_bags(store, pathology_patients, context, bags.TRAINING_BAG_PATCHES))
    try:
        pointer = _train_and_publish(context, root, data, fused_path, settings, fingerprint, inputs)
    except model_settings.InsufficientLabels as exc:
        yield from _wait_for_labels(context, root, crossval.labelled_counts(data), settings, sha256_file(fused_path),
                                    str(exc))
        return
    yield _model_result(root, pointer, "trained")


def _patient_bags(store: ArtifactStore, patient_ids: list[str], context, max_patches: int | None = None) -> dict:
    """The patients' patch features (ABMIL's input); a patient whose files cannot be read has no bag."""
    if not patient_ids:
        return {}
    found, problems = bags.load_bags(store, UNI_FEATURES, patient_ids, max_patches)
    for patient_id, problem in sorted(problems.items())[:20]:
        context.log.warning(f"{patient_id}: no patch features for ABMIL: {problem}")
    return found


def _reusable_version(root: Path, fingerprint: str) -> dict | None:
    """The current version's pointer when it was made from `fingerprint` and its files are intact."""
    pointer = read_version_pointer(root)
    if pointer is None or pointer.get("fingerprint") != fingerprint:
        return None
    return pointer if version_intact(root, pointer) else None


def _wait_for_labels(context, root: Path, counts: dict[str, int], settings: "model_settings.ModelSettings",
                     fused_sha: str, why: str) -> Iterator[dg.MaterializeResult]:
    """Too few labelled patients: not a failure. Say so; re-state the last good model if any (so
    risk_scores scores the new table with it), else yield nothing (risk_scores is skipped)."""
    needed = settings.min_labelled_per_class
    pointer = read_version_pointer(root)
    previous = pointer if pointer is not None and version_intact(root, pointer) else None
    waiting = (f"{WAITING}: {counts['positive']} with MLM and {counts['negative']} without are labelled "
               f"and have features; each class needs {needed} (risk_model.min_labelled_per_class)")
    if previous is not None:
        kept = f"the previous model {previous['version']} stays in use"
    elif pointer is not None:
        kept = (f"the previous model {pointer['version']} cannot stay in use: its files differ from "
                f"{root / VERSION_POINTER}; risk_scores waits too")
    else:
        kept = "no model has been trained yet, so risk_scores waits too"
    context.log.warning(f"risk_model is {waiting}; {kept}")
    context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata={
        "status": WAITING,
        "present_per_class": dg.MetadataValue.json(counts),
        "needed_per_class": needed,
        "fused_table_sha256": fused_sha,
        "detail": why,
        "model_in_use": previous["version"] if previous else "none",
    }))
    if previous is not None:
        yield _restated_result(context, root, previous, f"kept previous model, {waiting}",
                               {"waiting_on_fused_table_sha256": fused_sha,
                                "present_per_class": dg.MetadataValue.json(counts), "needed_per_class": needed})


def _train_and_publish(context, root: Path, data: "cohort_data.CohortData", fused_path: Path,
                       settings: "model_settings.ModelSettings", fingerprint: str, inputs: dict) -> dict:
    cv = crossval.cross_validate(data, settings)
    context.log.info(f"cross-validated {len(cv.labels)} patients: {cv.n_splits} folds x {cv.n_repeats} repeats")
    for note in cv.notes:
        context.log.warning(note)
    metrics, curves = model_metrics.evaluate_cross_validation(cv, settings)
    fused = metrics.get(model_settings.FUSED, {})
    threshold = settings.risk_threshold if settings.risk_threshold is not None else fused.get("youden_threshold", 0.5)
    model, fitted = training.fit_risk_model(data, settings, threshold)
    importance = model_importance.permutation_importance(model_importance.model_predictor(model), data,
                                                         model.blocks, seed=settings.seed)
    records = card_context.read_cohort_records(ArtifactStore(root.parent), data, fused_path,
                                               clinical_asset="clinical_table", fusion_report=FUSION_REPORT,
                                               features_asset=UNI_FEATURES)
    training_data = {"sha256": inputs["training_data_sha256"],
                     "patch_features_sha256": inputs["patch_features_sha256"]}
    card = model_card.model_card(
        model, settings, fitted, metrics, cv,
        {"training_data_sha256": inputs["training_data_sha256"], "fused_table": str(fused_path)},
        **card_context.card_context(records, data, cv, settings, model, metrics, training_data),
        permutation_importance=importance)
    labels = card["model_labels"]
    staging = new_version_folder(root)
    try:
        modelling.save_model(model, staging / MODEL_FILE)
        atomic_write_json(staging / METRICS_FILE, model_card.json_safe(metrics))
        atomic_write_json(staging / MODEL_CARD, model_card.json_safe(card))
        atomic_write_bytes(staging / MODEL_CARD_MARKDOWN,
                           model_card.model_card_markdown(model_card.json_safe(card)).encode())
        fusion.write_parquet(crossval.cv_predictions_table(cv), staging / CV_PREDICTIONS)
        for kind, name in PLOTS.items():
            pictures.save_png(model_plots.plot_curves(curves, kind, labels), staging / name)
        pointer = publish_version(root, staging, {"fingerprint": fingerprint, "inputs": inputs})
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once published
    _remove_unversioned_files(root)
    context.log.info(f"risk_model version {pointer['version']} published "
                     f"(kept: {', '.join(pointer['recent_versions'])})")
    return pointer


def _remove_unversioned_files(root: Path) -> None:
    """The files of the layout before versions (model files and a manifest beside current.json):
    nothing reads them, and a stale metrics.json there would look current."""
    for name in (*MODEL_FILES, ArtifactStore.MANIFEST):
        (root / name).unlink(missing_ok=True)


def _card_markdown(folder: Path, card: dict) -> str:
    """The stored TRIPOD+AI card (versions published before it existed: rendered from the JSON card)."""
    path = folder / MODEL_CARD_MARKDOWN
    return path.read_text(encoding="utf-8") if path.is_file() else model_card.model_card_markdown(card)


def _model_summary(root: Path, pointer: dict, status: str) -> tuple[dict, dict]:
    """(the metadata every risk_model materialization carries, the stored card)."""
    folder = root / pointer["version"]
    metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    card = json.loads((folder / MODEL_CARD).read_text(encoding="utf-8"))
    fused = metrics.get(model_settings.FUSED, {})
    inputs = pointer.get("inputs") or {}
    return {
        "status": status,
        "version": pointer["version"],
        "path": dg.MetadataValue.path(str(folder / MODEL_FILE)),
        "pointer": dg.MetadataValue.path(str(root / VERSION_POINTER)),
        **({"training_data_sha256": inputs["training_data_sha256"], "labelled_patients": inputs["labelled_patients"]}
           if "training_data_sha256" in inputs else {}),
        "fused_auc": fused.get("auc"),
        "fused_auc_ci": dg.MetadataValue.json([fused.get("auc_ci_low"), fused.get("auc_ci_high")]),
        "ablation": dg.MetadataValue.md(model_metrics.ablation_markdown(metrics, card.get("model_labels"))),
        "model_card_path": dg.MetadataValue.path(str(folder / MODEL_CARD_MARKDOWN)),
        **{f"plot_{kind}_path": dg.MetadataValue.path(str(folder / name)) for kind, name in PLOTS.items()},
    }, card


def _model_result(root: Path, pointer: dict, status: str, extra: dict | None = None) -> dg.MaterializeResult:
    """The version's materialization with everything the UI shows: the card, the plots, the settings."""
    folder = root / pointer["version"]
    summary, card = _model_summary(root, pointer, status)
    return dg.MaterializeResult(
        metadata={
            **summary,
            "files": dg.MetadataValue.json({name: str(folder / name) for name in pointer["files"]}),
            **{f"plot_{kind}": dg.MetadataValue.md(pictures.picture_markdown(folder / name, pictures.PLOT, kind))
               for kind, name in PLOTS.items()},
            "model_card": dg.MetadataValue.md(_card_markdown(folder, card)),
            "model_card_json": dg.MetadataValue.json(card),
            "settings": dg.MetadataValue.json(card["settings"]),
            **(extra or {}),
        },
        data_version=dg.DataVersion(pointer["files"][MODEL_FILE]),
    )


def _restated_result(context, root: Path, pointer: dict, status: str,
                     extra: dict | None = None) -> dg.MaterializeResult:
    """The installed version stated again (same data version), so that risk_scores runs after it.
    The card and the plots (about 140 KB) are not copied into the event log once more when a run
    that still exists shows them for this very version: a link to that run stands in for them."""
    shown_in = _run_showing_version(context.instance.get_latest_materialization_event(context.asset_key),
                                    pointer["version"])
    if shown_in is None or not context.instance.has_run(shown_in):
        return _model_result(root, pointer, status, extra)
    summary, _ = _model_summary(root, pointer, status)
    return dg.MaterializeResult(
        metadata={**summary, "card_and_plots_in_run": dg.MetadataValue.dagster_run(shown_in), **(extra or {})},
        data_version=dg.DataVersion(pointer["files"][MODEL_FILE]))


def _run_showing_version(latest: "dg.EventLogEntry | None", version: str) -> str | None:
    """The run whose risk_model materialization shows `version`'s card and plots, from the latest
    materialization (a full one, or a re-statement that links to one); None when it is of another version."""
    materialization = latest.asset_materialization if latest is not None else None
    if materialization is None:
        return None
    metadata = materialization.metadata
    if "version" not in metadata or metadata["version"].value != version:
        return None
    if "model_card" in metadata:
        return latest.run_id
    link = metadata.get("card_and_plots_in_run")
    return link.value if link is not None else None


# ---------------------------------------------------------------- risk_scores


@dg.asset(
    name="risk_scores",
    group_name=GROUP,
    op_tags=step_pods.op_tags(step_pods.COHORT),
    code_version=CODE_VERSIONS["risk_scores"],
    deps=[dg.AssetDep("risk_model"), dg.AssetDep("fused_table"),
          dg.AssetDep(UNI_FEATURES, partition_mapping=dg.AllPartitionMapping())],
    description="MLM probability and risk group (high: at or above the model's threshold) for every "
    "patient with radiology or pathology features, from the current risk_model version (an ABMIL model "
    "reads the patch features too). Each score records the model version it came from and the key of "
    "the explanation it needs (risk_explanations_sensor explains the patients whose key changed).",
    metadata=column_schema_metadata(RISK_SCORES_COLUMNS),
)
def risk_scores(context: dg.AssetExecutionContext, storage: ArtifactStorage) -> dg.MaterializeResult:
    store = storage.store()
    model_folder, pointer = _current_model_or_fail(store)
    model_path = model_folder / MODEL_FILE
    fused_path = _required_input(store, "fused_table", FUSED_FILE)
    model_sha, fused_sha = pointer["files"][MODEL_FILE], sha256_file(fused_path)
    fused = pq.read_table(fused_path)
    # the explanation keys' inputs: the model file, the fused rows, the pathology patients' feature
    # files (the bags) and the explanation code; the version name is written beside each score
    fingerprint = sha256_text(CODE_VERSIONS["risk_scores"], model_sha, fused_sha,
                              bags.bags_fingerprint(store, UNI_FEATURES, bags.pathology_patients(fused)),
                              explanation_keys.CODE_VERSION, pointer["version"])
    folder = store.asset_dir("risk_scores")
    manifest = _reuse_or_none(store, "risk_scores", fingerprint, context)
    if manifest is None:
        if not model_path.is_file() or sha256_file(model_path) != model_sha:
            raise dg.Failure(description=f"{model_path} does not match {model_folder.parent / VERSION_POINTER}: "
                                         "re-materialize risk_model", metadata={"model": str(model_path)})
        try:
            model = modelling.load_model(model_path)
        except modelling.UntrustedModelFile as exc:
            raise dg.Failure(description=str(exc)) from None
        patient_bags = _patient_bags(store, bags.pathology_patients(fused), context) if model.needs_bags() else None
        scores = _with_versions(model.score_table(fused, patient_bags), pointer["version"],
                                explanation_keys.explanation_keys(fused, model_sha, store, UNI_FEATURES))
        fusion.write_parquet(scores, folder / SCORES_FILE)
        _save_score_picture(scores, model.risk_threshold, folder / SCORES_PICTURE)
        manifest = {"fingerprint": fingerprint, "files": {SCORES_FILE: sha256_file(folder / SCORES_FILE),
                                                          SCORES_PICTURE: sha256_file(folder / SCORES_PICTURE)},
                    "inputs": {"risk_model_sha256": model_sha, "risk_model_version": pointer["version"],
                               "fused_table_sha256": fused_sha},
                    "risk_threshold": model.risk_threshold, "model_blocks": list(model.blocks)}
        store.write_manifest("risk_scores", None, manifest)
    scores = pq.read_table(folder / SCORES_FILE)
    if not (folder / SCORES_PICTURE).is_file():  # reused scores stored before risk_scores had a picture
        _save_score_picture(scores, manifest["risk_threshold"], folder / SCORES_PICTURE)
    groups = scores.column("risk_group").to_pylist()
    used = scores.column("modalities_used").to_pylist()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(folder / SCORES_FILE)),
            "risk_model_version": pointer["version"],
            "risk_model_path": dg.MetadataValue.path(str(model_path)),
            "risk_model_sha256": model_sha,
            "fused_table_sha256": fused_sha,
            "scored": scores.num_rows,
            "risk_threshold": manifest["risk_threshold"],
            "risk_groups": dg.MetadataValue.json({g: groups.count(g) for g in ("high", "low")}),
            "modalities_used": dg.MetadataValue.json({u: used.count(u) for u in sorted(set(used))}),
            "preview": dg.MetadataValue.md(fusion.markdown_table(
                scores, ["patient_id", "probability", "risk_group", "modalities_used", "mlm"], rows=10)),
            **column_schema_metadata(RISK_SCORES_COLUMNS, scores),
            "picture": dg.MetadataValue.md(pictures.picture_markdown(folder / SCORES_PICTURE, pictures.PLOT,
                                                                     "risk score distribution")),
            "picture_path": dg.MetadataValue.path(str(folder / SCORES_PICTURE)),
        },
        data_version=dg.DataVersion(manifest["files"][SCORES_FILE]),
    )


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
        pointer = store.path(RISK_MODEL, None, VERSION_POINTER)
        raise dg.Failure(description=f"{pointer} not found: materialize risk_model first",
                         metadata={"missing": str(pointer)})
    return current


ASSETS: list[dg.AssetsDefinition] = [clinical_table, fused_table, train_risk_model, risk_scores]
