"""Dagster assets of the radiology group (thin wiring over the plain modules beside it).

ct_image -> ct_mask -> radiomics_row, one partition per patient. Each asset
fingerprints its inputs (content hashes + code version + settings); when the
stored output was made from the same fingerprint and is intact, it is reused
byte for byte instead of recomputed.
"""

import json
from pathlib import Path

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import LoadOnce, gpu_backfill_policy, per_patient_events
from gcmlm_assets.columns import column_schema_metadata
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.policies import TRANSIENT_RETRY, quarantine_on_blocking_failure
from gcmlm_assets.pictures import PHOTO, picture_markdown, png_markdown, save_png
from gcmlm_assets.lazy import lazy
from gcmlm_assets.radiology import checks, model_lifecycle
from gcmlm_assets.radiology.columns import RADIOMICS_ROW_COLUMNS
from gcmlm_assets.radiology.resources import RadiomicsSettings
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.storage import atomic_write_json, sha256_file, sha256_text

# Imported by the steps that use them, not when the definitions load (gcmlm_assets/lazy.py).
sitk = lazy("SimpleITK")
ct_io = lazy("gcmlm_assets.radiology.ct_io")
features = lazy("gcmlm_assets.radiology.features")
masks = lazy("gcmlm_assets.radiology.masks")

# Bump when a change of code changes an asset's output bytes: stored outputs are then recomputed.
CT_IMAGE_VERSION = "1"
CT_MASK_VERSION = "1"
RADIOMICS_ROW_VERSION = "1"

CT_FILE = "ct.nii.gz"
CT_PICTURE = "ct_thumbnail.png"
MASK_FILE = "mask.nii.gz"
MASK_PICTURE = "mask_overlay.png"
ROW_FILE = "radiomics.parquet"


def _input_failure(error: Exception) -> dg.Failure:
    """Bad input: fail this patient's step with the message (file + problem), without retries."""
    return dg.Failure(description=str(error), metadata={"problem": str(error)}, allow_retries=False)


def _upstream_file(store, asset: str, patient_id: str, name: str) -> Path:
    path = store.path(asset, patient_id, name)
    if not path.is_file():
        raise dg.Failure(description=f"{path}: missing; materialize {asset} for patient {patient_id} first",
                         allow_retries=False)
    return path


def _combined_hash(hashes: dict[str, str]) -> str:
    return sha256_text(*(f"{name}:{digest}" for name, digest in sorted(hashes.items())))


# ---------------------------------------------------------------- ct_image


@dg.asset(
    group_name="radiology",
    retry_policy=TRANSIENT_RETRY,
    partitions_def=patients_partitions,
    check_specs=checks.CT_IMAGE_CHECK_SPECS,
    code_version=CT_IMAGE_VERSION,
    op_tags=step_pods.op_tags(step_pods.CPU),
    description="The patient's CT from `<landing>/<patient>/ct/` (a DICOM series or one NIfTI, NRRD or "
                "MHA volume), written as one canonical LPS-oriented `ct.nii.gz`.",
)
def ct_image(context: dg.AssetExecutionContext, storage: ArtifactStorage,
             landing: LandingZone) -> dg.MaterializeResult:
    patient_id = context.partition_key
    store = storage.store()
    folder = landing.patient_dir(patient_id) / "ct"
    try:
        input_hashes = {path.name: sha256_file(path) for path in ct_io.input_files(folder)}
    except ct_io.CTInputError as error:
        raise _input_failure(error) from error
    fingerprint = sha256_text("ct_image", CT_IMAGE_VERSION, json.dumps(input_hashes, sort_keys=True))
    out_dir = store.asset_dir("ct_image", patient_id)
    ct_path, picture_path = out_dir / CT_FILE, out_dir / CT_PICTURE

    manifest = store.reusable("ct_image", patient_id, fingerprint)
    reused = manifest is not None
    if not reused:
        try:
            image, source = ct_io.load_ct(folder)
        except ct_io.CTInputError as error:
            raise _input_failure(error) from error
        summary = ct_io.summarise(image, source)
        ct_io.write_volume(image, ct_path)
        save_png(ct_io.ct_thumbnail_png(image), picture_path)
        manifest = {
            "fingerprint": fingerprint,
            "files": {CT_FILE: sha256_file(ct_path), CT_PICTURE: sha256_file(picture_path)},
            "inputs": input_hashes,
            "source": source.describe(),
            "summary": summary.as_dict(),
        }
        store.write_manifest("ct_image", patient_id, manifest)
    summary = ct_io.CTSummary.from_dict(manifest["summary"])
    context.log.info(f"{patient_id}: CT {'reused' if reused else 'written'} {ct_path} "
                     f"({summary.size}, {summary.spacing} mm)")
    return quarantine_on_blocking_failure(store, "ct_image", patient_id, dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(ct_path)),
            "picture_path": dg.MetadataValue.path(str(picture_path)),
            "sha256": manifest["files"][CT_FILE],
            "input_folder": dg.MetadataValue.path(str(folder)),
            "input_files": len(input_hashes),
            "input_sha256": _combined_hash(input_hashes),
            "source": manifest["source"],
            "reused": reused,
            "size": str(summary.size),
            "spacing_mm": str(tuple(round(s, 4) for s in summary.spacing)),
            "origin_mm": str(tuple(round(o, 3) for o in summary.origin)),
            "orientation": summary.orientation,
            "original_orientation": summary.original_orientation,
            "oblique": summary.oblique,
            "pixel_type": summary.pixel_type,
            "hu_min": summary.hu_min,
            "hu_max": summary.hu_max,
            "hu_p01": summary.hu_p01,
            "hu_p50": summary.hu_p50,
            "hu_p99": summary.hu_p99,
            "picture": dg.MetadataValue.md(picture_markdown(picture_path, PHOTO, "CT thumbnail")),
        },
        data_version=dg.DataVersion(manifest["files"][CT_FILE]),
        check_results=checks.ct_image_check_results(ct_path),
    ), checks.CT_IMAGE_CHECK_SPECS)


# ---------------------------------------------------------------- ct_mask

def _load_segmenter(model_folder: Path, device_setting: str):
    from gcmlm_assets.devices import resolve_device
    from gcmlm_assets.radiology.nnunet import GastricSegmenter  # torch/nnU-Net only when predicting

    device = resolve_device(device_setting, "segmentation.device")
    return GastricSegmenter.load(model_folder, device=device.name), device


@dg.multi_asset(
    specs=[dg.AssetSpec(
        "ct_mask",
        group_name="radiology",
        # The model is an input only of predicted masks; the edge shows it in the lineage and marks
        # masks stale when the model changes (reference masks then re-materialize to the same bytes).
        deps=[ct_image, dg.AssetKey("segmentation_model")],
        code_version=CT_MASK_VERSION,
        # Skipped, not failed, while a patient without a reference mask waits for a trained model;
        # predicted_mask_sensor runs it again once one is installed.
        skippable=True,
        description="Binary gastric mask on exactly ct_image's grid: the reference mask from "
                    "`<landing>/<patient>/ct_label/` when there is one, else predicted by the installed "
                    "nnU-Net model (segmentation_model). Without either it is skipped, not failed, until a "
                    "model is installed.",
    )],
    partitions_def=patients_partitions,
    check_specs=checks.CT_MASK_CHECK_SPECS,
    # A single-asset multi_asset, subsettable only so that its check outputs may be skipped with it.
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    # A backfill predicts up to GCMLM_GPU_BATCH_PATIENTS patients per run with one loaded model;
    # each patient's mask, metadata and checks are still recorded as that patient's own.
    backfill_policy=gpu_backfill_policy(),
    pool=step_pods.GPU_POOL,
    op_tags=step_pods.op_tags(step_pods.GPU),
    required_resource_keys={"storage", "landing", "segmentation", "radiomics"},
)
def ct_mask(context: dg.AssetExecutionContext):
    from gcmlm_assets.devices import DeviceError
    from gcmlm_assets.radiology.nnunet import ModelFolderError

    segmentation = context.resources.segmentation
    segmenter = LoadOnce(lambda folder: _load_segmenter(folder, segmentation.device),
                         errors=(DeviceError, ModelFolderError))
    yield from per_patient_events(context, "ct_mask", lambda patient_id: _ct_mask_for(context, patient_id, segmenter),
                                  checks.CT_MASK_CHECK_SPECS, CT_MASK_VERSION)


def _ct_mask_for(context: dg.AssetExecutionContext, patient_id: str, segmenter: LoadOnce):
    from gcmlm_assets.step_output import stdout_to_log

    storage: ArtifactStorage = context.resources.storage
    landing: LandingZone = context.resources.landing
    segmentation = context.resources.segmentation
    radiomics: RadiomicsSettings = context.resources.radiomics
    store = storage.store()
    ct_path = _upstream_file(store, "ct_image", patient_id, CT_FILE)
    ct_sha = sha256_file(ct_path)
    label_dir = landing.patient_dir(patient_id) / "ct_label"
    try:
        reference = masks.find_reference_mask(label_dir)
    except masks.MaskInputError as error:
        raise _input_failure(error) from error

    model_folder = None
    if reference is not None:
        source_id = sha256_file(reference)
    else:
        model_folder = segmentation.model_folder(store)
        if model_folder is None:
            context.log.info(
                f"{patient_id}: waiting for a segmentation model: {label_dir} has no reference mask and no "
                "model is installed yet. segmentation_training_sensor trains one once enough patients have a "
                "reference mask (or point the segmentation resource at a trained nnU-Net folder); "
                "predicted_mask_sensor then runs this mask and its radiomics_row.")
            return
        model_folder = Path(model_folder)
        source_id = model_lifecycle.model_identity(model_folder)
    mode = "reference" if reference is not None else "predicted"
    fingerprint = sha256_text("ct_mask", CT_MASK_VERSION, ct_sha, mode, source_id)
    out_dir = store.asset_dir("ct_mask", patient_id)
    mask_path, picture_path = out_dir / MASK_FILE, out_dir / MASK_PICTURE

    manifest = store.reusable("ct_mask", patient_id, fingerprint)
    reused = manifest is not None
    if not reused:
        image = sitk.ReadImage(str(ct_path))
        if reference is not None:
            try:
                conformed = masks.conform_mask(masks.load_mask(reference), image, reference)
            except masks.MaskInputError as error:
                raise _input_failure(error) from error
            mask, provenance = conformed.image, {"reference_file": str(reference), "model_id": "",
                                                 **conformed.provenance()}
        else:
            # nnU-Net's loading and prediction print: to the step's debug log, not raw stdout.
            with stdout_to_log(context.log.debug):
                model, device = segmenter.get(model_folder)
                predicted = model.predict(image)
            try:
                mask = masks.validate_prediction(predicted, image, f"model {model.model_id} on {ct_path}")
            except masks.MaskInputError as error:
                raise _input_failure(error) from error
            provenance = {"model_id": model.model_id, "model_folder": str(model_folder), "device": device.reason,
                          "resampled_to_ct_grid": False, "resampling": "none (predicted on the CT grid)"}
        stats = masks.mask_stats(mask)
        masks.write_mask(mask, mask_path)
        save_png(masks.mask_overlay_png(image, mask), picture_path)
        manifest = {
            "fingerprint": fingerprint,
            "files": {MASK_FILE: sha256_file(mask_path), MASK_PICTURE: sha256_file(picture_path)},
            "inputs": {"ct_image": ct_sha, mode: source_id},
            "source": mode,
            "provenance": provenance,
            "stats": stats.as_dict(),
        }
        store.write_manifest("ct_mask", patient_id, manifest)
    stats, provenance = manifest["stats"], manifest["provenance"]
    if provenance.get("resampled_to_ct_grid"):
        context.log.warning(f"{patient_id}: reference mask {provenance.get('reference_file')} was on another grid "
                            "and was resampled onto the CT grid with nearest neighbour")
    yield quarantine_on_blocking_failure(store, "ct_mask", patient_id, dg.MaterializeResult(
        asset_key="ct_mask",
        metadata={
            "path": dg.MetadataValue.path(str(mask_path)),
            "picture_path": dg.MetadataValue.path(str(picture_path)),
            "sha256": manifest["files"][MASK_FILE],
            "input_ct_sha256": ct_sha,
            "input_source_sha256": source_id,
            "source": manifest["source"],
            "model_id": provenance.get("model_id") or "reference mask",
            "reference_file": provenance.get("reference_file", ""),
            "resampled_to_ct_grid": bool(provenance.get("resampled_to_ct_grid", False)),
            "resampling": provenance.get("resampling", ""),
            "reoriented_from": provenance.get("reoriented_from", ""),
            "reused": reused,
            "voxels": stats["voxels"],
            "voxel_volume_ml": stats["voxel_volume_ml"],
            "volume_ml": stats["volume_ml"],
            "connected_components": stats["components"],
            "largest_component_voxels": stats["largest_component_voxels"],
            "picture": dg.MetadataValue.md(picture_markdown(picture_path, PHOTO, "gastric mask")),
        },
        data_version=dg.DataVersion(manifest["files"][MASK_FILE]),
        check_results=checks.ct_mask_check_results(mask_path, ct_path, radiomics.mask_volume_min_ml,
                                                   radiomics.mask_volume_max_ml),
    ), checks.CT_MASK_CHECK_SPECS)


# ---------------------------------------------------------------- radiomics_row


@dg.asset(
    group_name="radiology",
    retry_policy=TRANSIENT_RETRY,
    partitions_def=patients_partitions,
    deps=[ct_image, ct_mask],
    check_specs=checks.RADIOMICS_ROW_CHECK_SPECS,
    code_version=RADIOMICS_ROW_VERSION,
    op_tags=step_pods.op_tags(step_pods.CPU),
    description="PyRadiomics features inside the gastric mask as one parquet row: `patient_id`, then one "
                "column per feature (107 with the default params).",
    metadata=column_schema_metadata(RADIOMICS_ROW_COLUMNS),
)
def radiomics_row(context: dg.AssetExecutionContext, storage: ArtifactStorage,
                  radiomics: RadiomicsSettings) -> dg.MaterializeResult:
    patient_id = context.partition_key
    store = storage.store()
    ct_path = _upstream_file(store, "ct_image", patient_id, CT_FILE)
    mask_path = _upstream_file(store, "ct_mask", patient_id, MASK_FILE)
    ct_sha, mask_sha = sha256_file(ct_path), sha256_file(mask_path)
    params = radiomics.load_params()
    settings_sha = features.settings_hash(params)
    version = features.pyradiomics_version()
    fingerprint = sha256_text("radiomics_row", RADIOMICS_ROW_VERSION, ct_sha, mask_sha, settings_sha, version)
    row_path = store.asset_dir("radiomics_row", patient_id) / ROW_FILE

    manifest = store.reusable("radiomics_row", patient_id, fingerprint)
    reused = manifest is not None
    if not reused:
        extractor = features.extractor_from_params(params)
        try:
            # The very files the mask was made on: no geometry tolerance can trip.
            row = features.extract_features(extractor, ct_path, mask_path)
        except features.RadiomicsError as error:
            raise _input_failure(error) from error
        features.write_row(row_path, patient_id, row.features, {
            "pyradiomics_version": version, "settings_sha256": settings_sha, "params": radiomics.params})
        manifest = {
            "fingerprint": fingerprint,
            "files": {ROW_FILE: sha256_file(row_path)},
            "inputs": {"ct_image": ct_sha, "ct_mask": mask_sha},
            "seconds": row.seconds,
            "features": len(row.features),
            "diagnostics": row.diagnostics,
        }
        store.write_manifest("radiomics_row", patient_id, manifest)
    table = features.read_row(row_path)
    took = "reused" if reused else f"{manifest['seconds']:.1f} s"
    context.log.info(f"{patient_id}: {manifest['features']} radiomics features ({took})")
    return quarantine_on_blocking_failure(store, "radiomics_row", patient_id, dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(row_path)),
            "sha256": manifest["files"][ROW_FILE],
            "input_ct_sha256": ct_sha,
            "input_mask_sha256": mask_sha,
            "pyradiomics_version": version,
            "params": radiomics.params,
            "params_file": dg.MetadataValue.path(str(radiomics.params_path())),
            "settings_sha256": settings_sha,
            "features": manifest["features"],
            "extraction_seconds": manifest["seconds"],
            "reused": reused,
            "resampled_roi_voxels": manifest["diagnostics"].get("diagnostics_Mask-interpolated_VoxelNum", ""),
            **column_schema_metadata(RADIOMICS_ROW_COLUMNS, table),
        },
        data_version=dg.DataVersion(manifest["files"][ROW_FILE]),
        check_results=checks.radiomics_row_check_results(table, patient_id,
                                                         features.expected_feature_names(params)),
    ), checks.RADIOMICS_ROW_CHECK_SPECS)


ASSETS: list[dg.AssetsDefinition] = [ct_image, ct_mask, radiomics_row]


# ---------------------------------------------------------------- segmentation_model

SEGMENTATION_MODEL_VERSION = "1"
MODELS_ASSET = "segmentation_model"


def _training_candidates(context: dg.AssetExecutionContext, store, landing: LandingZone):
    """(patient, canonical CT, reference mask file) for every patient with a reference mask,
    and why the others that have one cannot be used."""
    usable, skipped = [], {}
    for patient_id in sorted(context.instance.get_dynamic_partitions(patients_partitions.name)):
        label_dir = landing.patient_dir(patient_id) / "ct_label"
        try:
            reference = masks.find_reference_mask(label_dir)
        except masks.MaskInputError as error:
            skipped[patient_id] = str(error)
            continue
        if reference is None:
            continue
        ct_path = store.path("ct_image", patient_id, CT_FILE)
        if not ct_path.is_file():
            skipped[patient_id] = f"{ct_path}: missing; materialize ct_image for this patient first"
            continue
        usable.append((patient_id, ct_path, reference))
    return usable, skipped


def _model_table(rows: dict[str, object]) -> dg.MetadataValue:
    """The model's identity as a two-column table: what the asset page shows first."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"property": name, "value": str(value)}) for name, value in rows.items()],
        schema=dg.TableSchema(columns=[dg.TableColumn("property", "string"), dg.TableColumn("value", "string")]))


def _configured_model_result(context: dg.AssetExecutionContext, folder: str) -> dg.MaterializeResult:
    from gcmlm_assets.radiology import nnunet

    try:
        model = nnunet.describe_model_folder(folder)
    except nnunet.ModelFolderError as error:
        raise _input_failure(error) from error
    context.log.info(f"segmentation resource points at trained model {model.folder}: no training")
    return dg.MaterializeResult(
        metadata={
            "source": "configured trained_model_folder",
            "trained": False,
            "reused": True,
            "model_id": model.model_id,
            "model_folder": dg.MetadataValue.path(str(model.folder)),
            "checkpoint_sha256": model.checkpoint_sha256,
            "trainer": model.trainer,
            "plans": model.plans_name,
            "configuration": model.configuration,
            "folds": ", ".join(model.folds),
            "model": _model_table({
                "model id": model.model_id, "plans": model.plans_name, "configuration": model.configuration,
                "trainer": model.trainer, "folds": ", ".join(model.folds),
                "epochs": "not recorded (trained outside this platform)",
                "iterations per epoch": "not recorded (trained outside this platform)",
                "training cases": "not recorded (trained outside this platform)",
                "device": f"predicts on segmentation.device={context.resources.segmentation.device}",
                "checkpoint sha256": model.checkpoint_sha256}),
        },
        data_version=dg.DataVersion(model.checkpoint_sha256),
    )


@dg.asset(
    group_name="radiology",
    retry_policy=TRANSIENT_RETRY,
    deps=[dg.AssetDep("ct_image", partition_mapping=dg.AllPartitionMapping())],
    code_version=SEGMENTATION_MODEL_VERSION,
    pool=step_pods.GPU_POOL,
    op_tags=step_pods.op_tags(step_pods.GPU),
    required_resource_keys={"storage", "landing", "segmentation"},
    description="The nnU-Net v2 gastric segmentation model (`3d_fullres`), trained on every patient with a "
                "reference mask, or the trained folder that `segmentation.trained_model_folder` "
                "(`GCMLM_NNUNET_MODEL_FOLDER`) names. Warning: the production profile trains nnU-Net's "
                "full-size network for 1000 x 250 iterations, which takes a day or more on a GPU and is "
                "refused on a CPU. For a quick model use `GCMLM_PROFILE=demo` (or `segmentation.tiny_plans` "
                "with a few epochs), or point `trained_model_folder` at a trained model.",
)
def segmentation_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    import shutil
    import uuid

    from gcmlm_assets.radiology import nnunet
    from gcmlm_assets.step_output import stdout_to_log

    storage: ArtifactStorage = context.resources.storage
    landing: LandingZone = context.resources.landing
    segmentation = context.resources.segmentation
    if segmentation.trained_model_folder:
        return _configured_model_result(context, segmentation.trained_model_folder)

    store = storage.store()
    models_root = store.asset_dir(MODELS_ASSET)
    candidates, skipped = _training_candidates(context, store, landing)
    # What segmentation_training_sensor compares with the installed model (names, sizes, times).
    reference_set = model_lifecycle.reference_set_fingerprint(model_lifecycle.reference_set(
        landing.path(), {pid: ct_path for pid, ct_path, _ in candidates}))
    settings = segmentation.training_settings()
    inputs = {pid: {"ct_image": sha256_file(ct), "reference_mask": sha256_file(ref)} for pid, ct, ref in candidates}
    # Same inputs, settings, code and nnU-Net version: the installed model is reused, not retrained.
    fingerprint = sha256_text(MODELS_ASSET, SEGMENTATION_MODEL_VERSION, _nnunet_version(),
                              json.dumps(settings.as_dict(), sort_keys=True, default=str),
                              json.dumps(inputs, sort_keys=True))

    pointer = nnunet.read_current_model(models_root)
    reused = bool(pointer and pointer.get("fingerprint") == fingerprint)
    if reused:
        try:
            model = nnunet.describe_model_folder(models_root / pointer["folder"])
            reused = model.checkpoint_sha256 == pointer.get("checkpoint_sha256")
        except nnunet.ModelFolderError as error:
            context.log.warning(f"stored model unusable, retraining: {error}")
            reused = False
    if reused and pointer.get("reference_set") != reference_set:
        # The same bytes under new names or times: keep the model, remember the set it now covers.
        atomic_write_json(models_root / nnunet.CURRENT_POINTER, {**pointer, "reference_set": reference_set})
    if not reused:
        refusal = segmentation.training_refusal()
        if refusal:
            raise dg.Failure(description=refusal, allow_retries=False)
        if len(candidates) < 2:
            raise dg.Failure(
                description=f"segmentation_model needs at least 2 patients with a reference mask in "
                            f"<landing>/<patient>/ct_label/ and a materialized ct_image; found {len(candidates)} "
                            f"({', '.join(pid for pid, _, _ in candidates) or 'none'}) under {landing.path()}"
                            + (f"; unusable: {json.dumps(skipped)}" if skipped else ""),
                allow_retries=False)
        work_dir = models_root / f"{nnunet.TRAIN_TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            cases = []
            for patient_id, ct_path, reference in candidates:
                image = sitk.ReadImage(str(ct_path))
                try:
                    conformed = masks.conform_mask(masks.load_mask(reference), image, reference)
                except masks.MaskInputError as error:
                    skipped[patient_id] = str(error)
                    continue
                if conformed.resampled:
                    context.log.info(f"{patient_id}: reference mask {reference} resampled onto the CT grid "
                                     "(nearest neighbour)")
                label_path = work_dir / "labels" / f"{patient_id}.nii.gz"
                masks.write_mask(conformed.image, label_path)
                cases.append(nnunet.TrainingCase(patient_id, ct_path, label_path))
            if len(cases) < 2:
                raise dg.Failure(description=f"segmentation_model: only {len(cases)} usable reference mask(s) "
                                             f"(need 2); unusable: {json.dumps(skipped)}", allow_retries=False)
            try:
                # Phases and epochs as info lines; what nnU-Net prints as debug lines (not raw stdout).
                with stdout_to_log(context.log.debug):
                    result = nnunet.train_segmentation_model(cases, work_dir / "nnunet", settings,
                                                             progress=context.log.info)
            except nnunet.TrainingDataError as error:
                raise _input_failure(error) from error
            training = {
                "cases": [case.case_id for case in cases],
                "skipped": skipped,
                "inputs": {case.case_id: inputs[case.case_id] for case in cases},
                "trainer": result.trainer,
                "plans": result.plans_name,
                "fold": result.fold,
                "epochs": result.epochs,
                "iterations_per_epoch": result.iterations_per_epoch,
                "val_iterations": result.val_iterations,
                "metrics": result.metrics,
                "seconds": result.seconds,
                "cpu_seconds": result.cpu_seconds,
                "settings": settings.as_dict(),
                "nnunetv2_version": _nnunet_version(),
            }
            model = nnunet.install_trained_model(result.model_folder, models_root,
                                                 {"fingerprint": fingerprint, "training": training,
                                                  "reference_set": reference_set})
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        pointer = nnunet.read_current_model(models_root)
        context.log.info(f"trained {model.model_id} on {len(cases)} cases in {result.seconds['total']:.0f} s")

    training = pointer["training"]
    metrics = training["metrics"]
    metadata = {
        "source": "trained here",
        "trained": not reused,
        "reused": reused,
        "model_id": model.model_id,
        "model_folder": dg.MetadataValue.path(str(model.folder)),
        "current_pointer": dg.MetadataValue.path(str(models_root / nnunet.CURRENT_POINTER)),
        "checkpoint_sha256": model.checkpoint_sha256,
        "n_training_cases": len(training["cases"]),
        "training_cases": ", ".join(training["cases"]),
        "skipped_cases": dg.MetadataValue.json(training["skipped"]),
        "input_sha256": dg.MetadataValue.json(training["inputs"]),
        "trainer": training["trainer"],
        "plans": training["plans"],
        "configuration": model.configuration,
        "fold": training["fold"],
        "epochs": training["epochs"],
        "iterations_per_epoch": training["iterations_per_epoch"],
        "val_iterations": training["val_iterations"],
        "tiny_plans": bool(training["settings"].get("tiny_plans")),
        "device": training["settings"]["device"],
        "wall_time_s": training["seconds"]["total"],
        "train_time_s": training["seconds"]["train"],
        "plan_and_preprocess_time_s": training["seconds"]["plan_and_preprocess"],
        "cpu_time_s": training["cpu_seconds"],
        "nnunetv2_version": training["nnunetv2_version"],
        **{name: value for name, value in metrics.items() if value is not None},
        "model": _model_table({
            "model id": model.model_id, "plans": training["plans"], "configuration": model.configuration,
            "trainer": training["trainer"], "folds": ", ".join(model.folds), "epochs": training["epochs"],
            "iterations per epoch": training["iterations_per_epoch"],
            "training cases": f"{len(training['cases'])}: {', '.join(training['cases'])}",
            "device": training["settings"]["device"], "checkpoint sha256": model.checkpoint_sha256}),
    }
    progress = model.folder / f"fold_{model.folds[0]}" / "progress.png"
    if progress.is_file():
        metadata["training_progress"] = dg.MetadataValue.md(png_markdown(progress.read_bytes(), "nnU-Net progress"))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(model.checkpoint_sha256))


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


ASSETS.append(segmentation_model)
