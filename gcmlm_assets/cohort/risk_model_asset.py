"""The cohort group's `risk_model` asset (thin Dagster wiring over training, crossval, metrics and model_card).

Unpartitioned, refreshed with the rest of the cohort group by `cohort_refresh_sensor` (sensors.py);
risk_scores (assets.py) scores every patient with the version it publishes. Each trained model is
published as one version folder, `<artifacts>/risk_model/<version>/`, with every file of the set;
`current.json` (replaced atomically) names the version and lists the files' hashes. Readers read
current.json once and take everything from that folder.

The model is trained on the labelled patients' rows only and refits only when they (labels or
features) or its settings change; with too few labelled patients it waits instead of failing and
keeps its last good model. A new model is published only when its cross-validated AUC is
reported (`cv_auc_reported`, checked in the step before `current.json` moves): one without is
quarantined, the step fails, and the previous version stays current.
"""

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg

from gcmlm_assets import pictures, quarantine, step_pods
from gcmlm_assets.cohort.card import plots as model_plots
from gcmlm_assets.cohort.model import model_settings
from gcmlm_assets.cohort.tables import bags, cohort_data, fusion, qc
from gcmlm_assets.cohort.check_results import check_result
from gcmlm_assets.catalogue import (
    CLINICAL_TABLE, CV_PREDICTIONS, FUSED_FILE, FUSED_TABLE, FUSION_REPORT, METRICS_FILE, MODEL_CARD,
    MODEL_CARD_MARKDOWN, MODEL_FILE, PLOTS, RISK_MODEL, UNI_FEATURES)
from gcmlm_assets.cohort.resources import RiskModelSettings
from gcmlm_assets.lazy import lazy
from gcmlm_assets.inputs import required_file
from gcmlm_assets.resources import ArtifactStorage
from gcmlm_assets.reuse import VersionedOutput
from gcmlm_assets.storage import (
    VERSION_POINTER, ArtifactStore, atomic_write_bytes, atomic_write_json, read_version_pointer, sha256_file,
    sha256_text, version_intact)

# Imported by the step that uses it, not when the definitions load (gcmlm_assets/lazy.py). The
# model/ modules (and model_card, importance, card_context over them) import scikit-learn when
# imported: the functions that use them import them.
pq = lazy("pyarrow.parquet")

MODEL_FILES = tuple(file.name for file in (MODEL_FILE, METRICS_FILE, MODEL_CARD, MODEL_CARD_MARKDOWN, CV_PREDICTIONS,
                                            *PLOTS.values()))
WAITING = "waiting for labelled patients"
REUSED = "reused: labelled data and settings unchanged"
CV_AUC_REPORTED = "cv_auc_reported"
EXCLUDED_SHOWN = 50
# Evaluated in the step on the new model's metrics before it is published: a model without a CV
# AUC never becomes current (it goes into quarantine), and risk_scores keeps the previous one.
CV_AUC_CHECK = dg.AssetCheckSpec(
    CV_AUC_REPORTED, asset=RISK_MODEL.key, blocking=True,
    description="The risk model's accuracy, estimated by cross-validation, is reported as an AUC with its 95 % "
    "confidence interval; a warning when the interval includes 0.5, i.e. no evidence that the model does better "
    "than chance. Checked before a new model is published: one without an AUC is quarantined and the previous "
    "model stays in use.")


def current_model_version(store: ArtifactStore) -> tuple[Path, dict] | None:
    """(folder, pointer) of the published risk_model version, or None when none is published."""
    root = RISK_MODEL.folder(store, create=False)
    pointer = read_version_pointer(root)
    return (root / pointer["version"], pointer) if pointer else None


@dg.asset(
    **RISK_MODEL.dagster_attributes(),
    op_tags=step_pods.op_tags(step_pods.COHORT),
    # uni_features: the attention-MIL block reads the patch features themselves
    deps=[dg.AssetDep(FUSED_TABLE.key), dg.AssetDep(UNI_FEATURES.key, partition_mapping=dg.AllPartitionMapping())],
    check_specs=[CV_AUC_CHECK],
    output_required=False,
    description="Per-modality models fused late (mean logit by default, or a stacked logistic combiner), "
    "validated by repeated stratified k-fold CV with an ablation (each block, pathology mean and ABMIL, lymph "
    "nodes, delta radiomics between a patient's first and last CT scan, both fusions) on the same folds, and saved with skops; its model card follows TRIPOD+AI. Trained on the "
    "labelled patients only: it refits when a label, a labelled patient's features or a setting changes, "
    "never for a new unlabelled patient (risk_scores scores them with the installed model). With too few "
    "labelled patients it waits (an observation says how many) and keeps the last good model.",
)
def train_risk_model(context: dg.AssetExecutionContext, storage: ArtifactStorage,
                     risk_model: RiskModelSettings) -> Iterator[dg.MaterializeResult]:
    from gcmlm_assets.cohort.card import model_card
    from gcmlm_assets.cohort.model import crossval, training

    store = storage.store()
    fused_path = required_file(FUSED_FILE, store)
    settings = risk_model.model_settings()
    # The fit reads the labelled patients' rows and nothing else; the reuse fingerprint covers exactly that.
    table = training.training_table(pq.read_table(fused_path), settings.blocks())
    # ABMIL trains on the labelled patients only: the others' bags are not read
    pathology_patients = (bags.pathology_patients(table)
                          if model_settings.PATHOLOGY_ABMIL in settings.blocks() else [])
    inputs = {"training_data_sha256": training.training_data_sha256(table), "labelled_patients": table.num_rows,
              "patch_features_sha256": (bags.bags_fingerprint(store, UNI_FEATURES.key, pathology_patients)
                                        if pathology_patients else None)}
    output = VersionedOutput(store, RISK_MODEL,
                             risk_model_fingerprint(training.fitting_library_versions(),
                                                    model_card.settings_json(settings), inputs))
    root = output.root
    if output.reused:
        context.log.info(f"risk_model: labelled data and settings unchanged, version {output.pointer['version']} "
                         "kept (patients without a label are scored with it, not trained on)")
        yield _restated_result(context, root, output.pointer, REUSED)
        return
    patient_bags, unreadable = load_patient_bags(store, pathology_patients, context, bags.TRAINING_BAG_PATCHES)
    if model_settings.PATHOLOGY_ABMIL in settings.fusion_blocks():
        # the model's own pathology block: such a patient is left out, not trained on without slides
        excluded = unreadable
        log_left_out(context, excluded, "left out")
    else:
        # ABMIL only in the ablation: its row has fewer patients (it says how many); the model is unchanged
        excluded = {}
        log_left_out(context, unreadable, "not in the ABMIL ablation row")
    data = cohort_data.CohortData.from_table(without_patients(table, excluded), settings.blocks(), bags=patient_bags)
    try:
        pointer = _train_and_publish(context, output, data, fused_path, settings, inputs, excluded)
    except model_settings.InsufficientLabels as exc:
        yield from _wait_for_labels(context, root, crossval.labelled_counts(data), settings, sha256_file(fused_path),
                                    str(exc))
        return
    except _Rejected as rejected:
        # only the failed check: no materialization, so nothing downstream sees a new model, and the
        # blocking failure fails the step
        yield rejected.result
        return
    yield _model_result(root, pointer, "trained")


class _Rejected(Exception):
    """A trained model that failed a blocking check; `result` says why and where it went."""

    def __init__(self, result: dg.AssetCheckResult):
        super().__init__(result.description)
        self.result = result


def _auc_check(folder: Path) -> dg.AssetCheckResult:
    """cv_auc_reported on a published version (its metrics.json)."""
    path = METRICS_FILE.in_folder(folder)
    if not path.is_file():
        return dg.AssetCheckResult(check_name=CV_AUC_REPORTED, passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                   description=f"{path} does not exist: the model's accuracy is unknown",
                                   metadata={"expected": f"{path.name} present", "found": "missing"})
    return check_result(qc.cv_auc_reported(json.loads(path.read_text(encoding="utf-8"))), CV_AUC_REPORTED)


def load_patient_bags(store: ArtifactStore, patient_ids: list[str], context,
                      max_patches: int | None = None) -> tuple[dict, dict[str, str]]:
    """(the patients' patch features, ABMIL's input; {patient: why left out}). A patient whose
    uni_features cannot be read (none published, e.g. quarantined by a blocking check, or a file
    that does not read) is left out with the reason, never modelled as if it had no slides."""
    if not patient_ids:
        return {}, {}
    found, problems = bags.load_bags(store, UNI_FEATURES.key, patient_ids, max_patches)
    excluded = {patient_id: f"{UNI_FEATURES.key} unreadable for the ABMIL block: {problem}"
                for patient_id, problem in sorted(problems.items())}
    return found, excluded


def log_left_out(context, excluded: Mapping[str, str], what: str) -> None:
    for patient_id, reason in list(excluded.items())[:20]:
        context.log.warning(f"{patient_id}: {what}: {reason}")
    if len(excluded) > 20:
        context.log.warning(f"... and {len(excluded) - 20} more patients ({what})")


def without_patients(table, excluded: Mapping[str, str]):
    """The table's rows of the patients not in `excluded`."""
    if not excluded:
        return table
    import pyarrow as pa
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table.column("patient_id"), value_set=pa.array(sorted(excluded)))))


def excluded_metadata(excluded: Mapping[str, str]) -> dict:
    """The left-out patients in a materialization: their count and the first EXCLUDED_SHOWN with reasons
    (bounded: an event must not grow with the cohort; the stored pointer or manifest lists all)."""
    shown = dict(list(sorted(excluded.items()))[:EXCLUDED_SHOWN])
    return {"excluded_patients_count": len(excluded), "excluded_patients": dg.MetadataValue.json(shown)}


def risk_model_fingerprint(library_versions: str, settings_json: str, inputs: dict) -> str:
    """What a trained model is made from: the fitting libraries' versions, the settings (as
    `model_card.settings_json` writes them) and the labelled patients' data (`inputs`). Pinned by
    core/test_fingerprints.py: a change refits the model."""
    return sha256_text(RISK_MODEL.code_version, library_versions, settings_json, json.dumps(inputs, sort_keys=True))


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
    else:
        # no model to report an AUC for: a warning while it waits, not a blocking failure
        yield dg.AssetCheckResult(check_name=CV_AUC_REPORTED, passed=False, severity=dg.AssetCheckSeverity.WARN,
                                  description=f"No model in use: risk_model is {waiting}",
                                  metadata={"expected": "a cross-validated AUC whose 95 % CI lies above 0.5",
                                            "found": "no model trained yet"})


def _train_and_publish(context, output: VersionedOutput, data: "cohort_data.CohortData", fused_path: Path,
                       settings: "model_settings.ModelSettings", inputs: dict, excluded: Mapping[str, str]) -> dict:
    from gcmlm_assets.cohort.card import card_context, model_card
    from gcmlm_assets.cohort.explain import importance as model_importance
    from gcmlm_assets.cohort.model import crossval, modelling, training
    from gcmlm_assets.cohort.model import metrics as model_metrics

    root = output.root
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
                                               clinical_asset=CLINICAL_TABLE.key, fusion_report=FUSION_REPORT.name,
                                               features_asset=UNI_FEATURES.key)
    training_data = {"sha256": inputs["training_data_sha256"],
                     "patch_features_sha256": inputs["patch_features_sha256"]}
    card = model_card.model_card(
        model, settings, fitted, metrics, cv,
        {"training_data_sha256": inputs["training_data_sha256"], FUSED_TABLE.key: str(fused_path)},
        **card_context.card_context(records, data, cv, settings, model, metrics, training_data),
        permutation_importance=importance)
    labels = card["model_labels"]
    staging = output.staging()
    try:
        modelling.save_model(model, MODEL_FILE.in_folder(staging))
        atomic_write_json(METRICS_FILE.in_folder(staging), model_card.json_safe(metrics))
        atomic_write_json(MODEL_CARD.in_folder(staging), model_card.json_safe(card))
        atomic_write_bytes(MODEL_CARD_MARKDOWN.in_folder(staging),
                           model_card.model_card_markdown(model_card.json_safe(card)).encode())
        fusion.write_parquet(crossval.cv_predictions_table(cv), CV_PREDICTIONS.in_folder(staging))
        for kind, plot in PLOTS.items():
            pictures.save_png(model_plots.plot_curves(curves, kind, labels), plot.in_folder(staging))
        verdict = qc.cv_auc_reported(json.loads(METRICS_FILE.in_folder(staging).read_text(encoding="utf-8")))
        if verdict.outcome == qc.ERROR:
            raise _Rejected(_quarantined(context, root, staging, verdict))
        pointer = output.publish(staging, inputs=inputs, excluded_patients=dict(excluded))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once published
    _remove_unversioned_files(root)
    context.log.info(f"risk_model version {pointer['version']} published "
                     f"(kept: {', '.join(pointer['recent_versions'])})")
    return pointer


def _quarantined(context, root: Path, staging: Path, verdict: "qc.Verdict") -> dg.AssetCheckResult:
    """Move a trained version that failed cv_auc_reported into quarantine, unpublished; its check result."""
    current = read_version_pointer(root)
    in_use = current["version"] if current else "none"
    moved = quarantine.quarantine_unpublished(ArtifactStore(root.parent), RISK_MODEL.key, staging, [CV_AUC_REPORTED],
                                              {"description": verdict.description, "model_in_use": in_use})
    context.log.error(f"risk_model: the new model failed {CV_AUC_REPORTED} ({verdict.description}); it is not "
                      f"published (moved to {moved}) and the model in use stays {in_use}")
    return check_result(verdict, CV_AUC_REPORTED, {"quarantined_to": dg.MetadataValue.path(str(moved)),
                                                   "model_in_use": in_use})


def _remove_unversioned_files(root: Path) -> None:
    """The files of the layout before versions (model files and a manifest beside current.json):
    nothing reads them, and a stale metrics.json there would look current."""
    for name in (*MODEL_FILES, ArtifactStore.MANIFEST):
        (root / name).unlink(missing_ok=True)


def _card_markdown(folder: Path, card: dict) -> str:
    """The stored TRIPOD+AI card (versions published before it existed: rendered from the JSON card)."""
    from gcmlm_assets.cohort.card import model_card

    path = MODEL_CARD_MARKDOWN.in_folder(folder)
    return path.read_text(encoding="utf-8") if path.is_file() else model_card.model_card_markdown(card)


def _model_summary(root: Path, pointer: dict, status: str) -> tuple[dict, dict]:
    """(the metadata every risk_model materialization carries, the stored card)."""
    from gcmlm_assets.cohort.model import metrics as model_metrics

    folder = root / pointer["version"]
    metrics = json.loads(METRICS_FILE.in_folder(folder).read_text(encoding="utf-8"))
    card = json.loads(MODEL_CARD.in_folder(folder).read_text(encoding="utf-8"))
    fused = metrics.get(model_settings.FUSED, {})
    inputs = pointer.get("inputs") or {}
    return {
        "status": status,
        "version": pointer["version"],
        "path": dg.MetadataValue.path(str(MODEL_FILE.in_folder(folder))),
        "pointer": dg.MetadataValue.path(str(root / VERSION_POINTER)),
        **({"training_data_sha256": inputs["training_data_sha256"], "labelled_patients": inputs["labelled_patients"]}
           if "training_data_sha256" in inputs else {}),
        "fused_auc": fused.get("auc"),
        "fused_auc_ci": dg.MetadataValue.json([fused.get("auc_ci_low"), fused.get("auc_ci_high")]),
        "ablation": dg.MetadataValue.md(model_metrics.ablation_markdown(metrics, card.get("model_labels"))),
        "model_card_path": dg.MetadataValue.path(str(MODEL_CARD_MARKDOWN.in_folder(folder))),
        **excluded_metadata(pointer.get("excluded_patients") or {}),
        **{f"plot_{kind}_path": dg.MetadataValue.path(str(plot.in_folder(folder))) for kind, plot in PLOTS.items()},
    }, card


def _model_result(root: Path, pointer: dict, status: str, extra: dict | None = None) -> dg.MaterializeResult:
    """The version's materialization with everything the UI shows: the card, the plots, the settings."""
    folder = root / pointer["version"]
    summary, card = _model_summary(root, pointer, status)
    return dg.MaterializeResult(
        metadata={
            **summary,
            "files": dg.MetadataValue.json({name: str(folder / name) for name in pointer["files"]}),
            **{f"plot_{kind}": dg.MetadataValue.md(pictures.picture_markdown(plot.in_folder(folder), pictures.PLOT,
                                                                             kind))
               for kind, plot in PLOTS.items()},
            "model_card": dg.MetadataValue.md(_card_markdown(folder, card)),
            "model_card_json": dg.MetadataValue.json(card),
            "settings": dg.MetadataValue.json(card["settings"]),
            **(extra or {}),
        },
        data_version=dg.DataVersion(pointer["files"][MODEL_FILE.name]),
        check_results=[_auc_check(folder)],
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
        data_version=dg.DataVersion(pointer["files"][MODEL_FILE.name]),
        check_results=[_auc_check(root / pointer["version"])])


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

