"""risk_explanations: why each patient got their score (thin wiring over explain/patient_explanation.py).

Partitioned by patient, in the cohort group, so that each patient's explanation has its own page
in the UI. `risk_explanations_sensor` (explanation_sensors.py) asks for the patients whose
explanation key (explain/explanation_keys.py: the code version, the risk model file, the patient's own
fused_table row and patch features) differs from the one last recorded, many patients per run.
A run explains its patients one by one with one loaded model and one read of the fused table; a
patient whose key is recorded already is skipped without an event. Each explanation is published
as one version folder, `<artifacts>/risk_explanations/<patient>/<version>/`, named by
`current.json` (as risk_model's), which records the key it was made for; the materialization's
data version is that key.
"""


import json
import shutil
from pathlib import Path

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import DATA_VERSION_TAG, LoadOnce, batch_patients, per_patient_events
from gcmlm_assets.catalogue import (
    EXPLANATION_FILE, FUSED_FILE, FUSED_TABLE, FUSION_REPORT, MODEL_FILE, PATCHES_FILE, RISK_EXPLANATIONS, RISK_MODEL, RISK_SCORES,
    UNI_FEATURES)
from gcmlm_assets.cohort.explain import explanation_keys, heatmaps
from gcmlm_assets.cohort.assets import _current_model_or_fail
from gcmlm_assets.cohort.tables import fusion
from gcmlm_assets.lazy import lazy
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.inputs import required_file
from gcmlm_assets import patch_features
from gcmlm_assets.policies import TRANSIENT_RETRY
from gcmlm_assets.pictures import PHOTO, patient_picture_markdown, save_png
from gcmlm_assets.storage import (
    VERSION_POINTER, atomic_write_json, new_version_folder, publish_version, read_version_pointer, version_intact)

# Imported by the step that uses them, not when the definitions load (gcmlm_assets/lazy.py); the
# model and explanation modules import scikit-learn, so the functions that use them import them.
np = lazy("numpy")
pa = lazy("pyarrow")
pq = lazy("pyarrow.parquet")

KEY_FIELD = "explanation_key"  # in current.json: the key the published explanation was made for
# Heatmaps embedded in the metadata: the first one (the first slide's contribution map, else its
# attention map). Every map of every slide is in the folder, its path in the metadata: each embedded
# picture is stored with every explanation of every patient, which the instance's budget allows once.
PICTURES_IN_METADATA = 1
TOP_FEATURES = 10
REFERENCE = ("the training cohort's average patient with the same modalities (each block's input at its training "
             "mean): every part is this patient's difference from that patient")
# Above this many patients a run asks for every patient's recorded key (one query either way):
# a list of thousands of partitions would not fit SQLite's limit on a query's parameters.
RECORDED_KEYS_BY_NAME = 500


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **RISK_EXPLANATIONS.dagster_attributes(),
        deps=[dg.AssetDep(RISK_SCORES.key), dg.AssetDep(RISK_MODEL.key), dg.AssetDep(FUSED_TABLE.key),
              dg.AssetDep(UNI_FEATURES.key)],
        # Nothing is yielded for a patient whose explanation is recorded already, nor by a range step
        # (per_patient_events logs each patient's materialization on its own).
        skippable=True,
        description="Why this patient got their score, each part relative to the training cohort's average patient "
        "with the same modalities (red: raises the risk above that patient's), with the patient's probability, the "
        "decision threshold and the modalities scored without: how the blocks' logits combine; the radiology, "
        "clinical, lymph-node and delta (change between CT scans) features' exact contributions (top 10); each "
        "patch's exact contribution to the pathology logit, beside its coordinates and drawn over the slide (centred "
        "on zero); ABMIL attention maps, labelled as attention. Non-linear classifiers get no contributions (see risk_model's permutation importance). Made "
        "again only when the patient's explanation key changes (the model file, the patient's fused_table row or "
        "patch features).",
    )],
    name=RISK_EXPLANATIONS.key,
    partitions_def=patients_partitions,
    retry_policy=TRANSIENT_RETRY,
    # A backfill from the UI explains up to GCMLM_GPU_BATCH_PATIENTS patients per run, as the sensor does.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=batch_patients()),
    op_tags=step_pods.op_tags(step_pods.COHORT),
    required_resource_keys={"storage"},
)
def risk_explanations(context: dg.AssetExecutionContext):
    run = _ExplanationRun(context, context.resources.storage.store())
    yield from per_patient_events(context, RISK_EXPLANATIONS, run.explain, [])


class _ExplanationRun:
    """What every patient of one run shares: the model (loaded once, when a patient first needs
    it), the fused table's rows of the run's patients (read once) and their recorded keys."""

    def __init__(self, context: dg.AssetExecutionContext, store):
        self.context, self.store = context, store
        self.model_folder, pointer = _current_model_or_fail(store)
        self.model_sha, self.model_version = pointer["files"][MODEL_FILE.name], pointer["version"]
        self.fused_path = required_file(FUSED_FILE, store)
        patients = list(context.partition_keys)
        rows = explanation_keys.read_patient_rows(self.fused_path, patients)
        ids = rows.column(explanation_keys.ID_COLUMN).to_pylist()
        self.rows = {patient_id: (rows.slice(i, 1), digest)
                     for i, (patient_id, digest) in enumerate(zip(ids, explanation_keys.row_digests(rows)))}
        self.recorded = _recorded_keys(context.instance, patients)
        self._model: LoadOnce | None = None  # made when a patient first needs the model
        self._left_out: dict | None = None  # fused_table's report, read when a patient first lacks a modality

    def missing_reasons(self, patient_id: str, blocks: list[str]) -> dict[str, str]:
        """{block: why the patient was scored without it}, from fused_table's report (read once)."""
        if not blocks:
            return {}
        if self._left_out is None:
            self._left_out = _left_out_by_patient(FUSION_REPORT.path(self.store))
        known = self._left_out.get(patient_id, {})
        return {block: known.get(_MODALITY.get(block, block), _NO_RESULT.get(_MODALITY.get(block, block), "no input"))
                for block in blocks}

    def model(self):
        from gcmlm_assets.cohort.model import modelling

        if self._model is None:
            # the file must still hash to what risk_model's current.json recorded (read once, then loaded)
            self._model = LoadOnce(modelling.load_model, errors=(modelling.UntrustedModelFile, OSError))
        return self._model.get(MODEL_FILE.in_folder(self.model_folder), self.model_sha,
                               str(self.model_folder.parent / VERSION_POINTER))

    def explain(self, patient_id: str):
        if patient_id not in self.rows and not self.context.has_partition_key:
            # a range covers every partition between its changed patients, scored or not: one that
            # is not in the fused table (not yet processed, or left out) has nothing to explain
            self.context.log.info(f"{patient_id}: not in {self.fused_path}; nothing to explain")
            return
        if patient_id not in self.rows:
            raise dg.Failure(description=f"patient {patient_id} is not in {self.fused_path} (no usable radiomics or "
                                         "slide features): nothing to explain", allow_retries=False)
        row_table, digest = self.rows[patient_id]
        has_pathology = bool(row_table.column(explanation_keys.PATHOLOGY_FLAG)[0].as_py())
        files = (explanation_keys.patient_feature_files(self.store, UNI_FEATURES.key, patient_id) if has_pathology
                 else None)
        key = explanation_keys.explanation_key(self.model_sha, digest, files)
        root = RISK_EXPLANATIONS.folder(self.store, patient_id)
        stored = read_version_pointer(root)
        if stored and stored.get(KEY_FIELD) == key and self.recorded.get(patient_id) == key:
            # recorded and published for this key: nothing new to say (its files are not re-hashed here)
            self.context.log.info(f"{patient_id}: model, fused_table row and patch features unchanged; the "
                                  f"recorded explanation stands")
            return
        if stored and stored.get(KEY_FIELD) == key and version_intact(root, stored):
            self.context.log.info(f"{patient_id}: explanation for these inputs found in {root}; reused")
        else:
            staging = new_version_folder(root)
            try:
                _explain_and_write(self.context, self.model(), row_table, patient_id, staging, self.store,
                                   self.model_version, self.missing_reasons)
                stored = publish_version(root, staging, {KEY_FIELD: key})
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already once published
        folder = root / stored["version"]
        summary = json.loads(EXPLANATION_FILE.in_folder(folder).read_text(encoding="utf-8"))
        yield dg.MaterializeResult(asset_key=RISK_EXPLANATIONS.key, metadata=_metadata(folder, summary),
                                   data_version=dg.DataVersion(key))


def _recorded_keys(instance: dg.DagsterInstance, patients: list[str]) -> dict[str, str]:
    """{patient: the key of its latest explanation}, in one query."""
    by_name = patients if len(patients) <= RECORDED_KEYS_BY_NAME else None
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        dg.AssetKey(RISK_EXPLANATIONS.key), dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG],
        asset_partitions=by_name)
    return {patient_id: values[DATA_VERSION_TAG] for patient_id, values in tags.items() if DATA_VERSION_TAG in values}


# a block's modality, and what its absence means when fused_table's report names no reason
_MODALITY = {"pathology_abmil": "pathology"}
_NO_RESULT = {
    "radiology": "no usable radiomics_row: no CT in the drop, or the CT's steps (ct_image, ct_mask, radiomics_row) "
                 "failed or have not finished",
    "pathology": "no usable slide features: no slides in the drop, or their steps failed or have not finished",
    "clinical": "no clinical_table row",
    "lymph_node": "no usable lymph_nodes row: no lymph-node slides in the drop (ln_wsi/), or their steps failed or "
                  "have not finished",
    "delta": "no change over time: fewer than two CT scans (ct/<timepoint>/ folders), or the first or last scan's "
             "steps failed or have not finished",
}


def _left_out_by_patient(report_path: Path) -> dict[str, dict[str, str]]:
    """{patient: {modality: reason}} for the results fused_table left out or rejected."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, str]] = {}
    for key, how in (("excluded_results", "its result was left out"), ("file_problems", "its feature file was "
                                                                                         "rejected")):
        for entry in report.get(key) or []:
            out.setdefault(entry["patient_id"], {})[entry["modality"]] = f"{how}: {entry['reason']}"
    return out


def _explain_and_write(context, model, row_table, patient_id: str, folder: Path, store, model_version: str,
                       missing_reasons) -> None:
    from gcmlm_assets.cohort.explain import patient_explanation

    slides = _slide_patches(store, patient_id) if bool(row_table.column("has_pathology")[0].as_py()) else []
    # {} (not None): "this patient has no bag", which an ABMIL model accepts for a patient without slides
    bags = {patient_id: np.concatenate([s.features for s in slides]).astype(np.float32)} if slides else {}
    data = model.cohort_data(row_table, bags)
    try:
        explanation = patient_explanation.explain_patient(model, data, 0, slides)
    except (patient_explanation.ExplanationError, ValueError) as error:  # ValueError: bags the model refuses
        raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from None
    missing = missing_reasons(patient_id, explanation.modalities_missing)
    for note in explanation.notes:
        context.log.info(f"{patient_id}: {note}")
    _write_patches(explanation, slides, PATCHES_FILE.in_folder(folder))
    pictures = _draw_heatmaps(explanation, slides, folder)
    summary = {
        "probability": explanation.probability,
        "risk_group": explanation.risk_group,
        "risk_threshold": model.risk_threshold,
        "reference": REFERENCE,
        "reference_probability": explanation.reference_probability,
        "reference_fused_logit": explanation.reference_fused_logit,
        "reading": explanation.reading(),
        "modalities_missing": missing,
        "fused_logit": explanation.fused_logit,
        "combination": explanation.combination,
        "combination_markdown": explanation.combination_markdown(),
        "features": {block: [{"feature": name, "value": value, "coefficient": coefficient, "contribution": part}
                             for name, value, coefficient, part in parts.top(len(parts.names))]
                     for block, parts in explanation.feature_contributions.items()},
        "features_markdown": {block: parts.markdown(TOP_FEATURES)
                              for block, parts in explanation.feature_contributions.items()},
        "pathology_constant": explanation.pathology_constant,
        "pathology_reference_logit": explanation.pathology_reference_logit,
        "pathology_weight": explanation.pathology_weight,
        "residuals": explanation.residuals,
        "attention_role": explanation.attention_role,
        "notes": explanation.notes,
        "pictures": pictures,
        "patches": int(sum(len(s.features) for s in slides)),
        "model_version": model_version,
    }
    atomic_write_json(EXPLANATION_FILE.in_folder(folder), summary)


def _slide_patches(store, patient_id: str) -> list:
    from gcmlm_assets.cohort.explain import patient_explanation

    slides = []
    for features in patch_features.patient_slides(store, UNI_FEATURES.key, patient_id):
        try:
            values, coords = features.read()
            slides.append(patient_explanation.SlidePatches(features.name, features.slide_path(),
                                                           features.patch_side_level0(), coords, values))
        except patch_features.PoolingError as error:
            raise dg.Failure(description=f"patient {patient_id}: {error}", allow_retries=False) from None
    return slides


def _write_patches(explanation, slides: list, path: Path) -> None:
    """Each patch's parts beside its coordinates (empty without pathology); the contributions are
    relative to the training cohort's average patient (they sum to the pathology logit minus
    that patient's, explanation.json's pathology_reference_logit)."""
    columns: dict[str, list] = {"slide": [], "x": [], "y": [], "contribution_pathology_logit": [],
                                "contribution_fused_logit": [], "attention": []}
    for slide in slides:
        n = len(slide.coords)
        parts = explanation.patch_contributions.get(slide.name)
        attention = explanation.attention.get(slide.name)
        columns["slide"] += [slide.name] * n
        columns["x"] += slide.coords[:, 0].tolist()
        columns["y"] += slide.coords[:, 1].tolist()
        columns["contribution_pathology_logit"] += [None] * n if parts is None else parts.tolist()
        columns["contribution_fused_logit"] += ([None] * n if parts is None
                                                else (parts * explanation.pathology_weight).tolist())
        columns["attention"] += [None] * n if attention is None else attention.tolist()
    table = pa.table({"slide": pa.array(columns["slide"], pa.string()), "x": pa.array(columns["x"], pa.int64()),
                      "y": pa.array(columns["y"], pa.int64()),
                      **{name: pa.array(columns[name], pa.float64()) for name in
                         ("contribution_pathology_logit", "contribution_fused_logit", "attention")}})
    fusion.write_parquet(table, path)


def _draw_heatmaps(explanation, slides: list, folder: Path) -> list[dict]:
    """One contribution map and/or one attention map per slide, each as UI and full-resolution PNG."""
    drawn = []
    for slide in slides:
        maps = []
        if slide.name in explanation.patch_contributions:
            maps.append(("contribution", explanation.patch_contributions[slide.name],
                         f"{slide.name}: each patch's contribution to the pathology logit relative to the training "
                         f"cohort's average patient\npathology logit: this patient "
                         f"{_block_logit(explanation, 'pathology'):+.3f}, average patient "
                         f"{explanation.pathology_reference_logit:+.3f}; {_probability_line(explanation)}"))
        if slide.name in explanation.attention:
            maps.append(("attention", explanation.attention[slide.name],
                         f"{slide.name}: ABMIL attention ({explanation.attention_role})\n"
                         f"{_probability_line(explanation)}"))
        for kind, values, title in maps:
            names = {}
            for size, suffix in (("ui", ""), ("full", "_full")):
                png = heatmaps.patch_value_heatmap(slide.slide_path, slide.coords, slide.patch_side_level0, values,
                                                   kind, title, full_resolution=size == "full")
                names[size] = f"{kind}_{slide.name}{suffix}.png"
                save_png(png, folder / names[size])
            drawn.append({"slide": slide.name, "kind": kind, "title": title, **names})
    return drawn


def _block_logit(explanation, block: str) -> float:
    return next(row["block_logit"] for row in explanation.combination if row["term"] == block)


def _probability_line(explanation) -> str:
    line = f"scored WITHOUT {' and '.join(explanation.modalities_missing)}; " if explanation.modalities_missing else ""
    line += (f"probability {explanation.probability:.3f} ({explanation.risk_group} risk; decision threshold "
            f"{explanation.risk_threshold:.3f})")
    if explanation.reference_probability is not None:
        line += f"; average training patient {explanation.reference_probability:.3f}"
    return line


def _metadata(folder: Path, summary: dict) -> dict:
    metadata = {
        "reading": dg.MetadataValue.md(summary["reading"]),
        "modalities_missing": dg.MetadataValue.md(
            "\n".join(f"- **Scored WITHOUT {block}**: {why}" for block, why in summary["modalities_missing"].items())
            or "none: scored with every modality of the model"),
        "probability": summary["probability"],
        "risk_group": summary["risk_group"],
        "risk_threshold": summary["risk_threshold"],
        "reference": summary["reference"],
        "reference_probability": dg.MetadataValue.float(summary["reference_probability"])
        if summary["reference_probability"] is not None else "none (an ABMIL block has no training average)",
        "risk_model_version": summary.get("model_version", ""),
        "how_the_blocks_combine": dg.MetadataValue.md(summary["combination_markdown"]),
        "exactness": dg.MetadataValue.json({b: f"{r:.2e}" for b, r in summary["residuals"].items()}),
        "patch_contributions_path": dg.MetadataValue.path(str(PATCHES_FILE.in_folder(folder))),
        "explanation_path": dg.MetadataValue.path(str(EXPLANATION_FILE.in_folder(folder))),
        "patches": summary["patches"],
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in summary["notes"]) or "none"),
    }
    for block, table in summary["features_markdown"].items():
        metadata[f"{block}_top_features"] = dg.MetadataValue.md(table)
    for i, picture in enumerate(summary["pictures"]):
        name = f"{picture['kind']}_{picture['slide']}"
        if i < PICTURES_IN_METADATA:
            metadata[name] = dg.MetadataValue.md(patient_picture_markdown(folder / picture["ui"], PHOTO,
                                                                          picture["title"]))
        else:
            metadata[f"{name}_path"] = dg.MetadataValue.path(str(folder / picture["ui"]))
        metadata[f"{name}_full_path"] = dg.MetadataValue.path(str(folder / picture["full"]))
    return metadata


ASSETS: list[dg.AssetsDefinition] = [risk_explanations]
