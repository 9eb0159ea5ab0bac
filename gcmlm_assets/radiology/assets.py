"""Dagster assets of the radiology group (thin wiring over the plain modules beside it).

ct_image -> ct_mask -> radiomics_row, one partition per CT scan (`ct_scans`: the patient id for a
drop's only scan in `ct/`, `<patient>@<timepoint>` for `ct/<timepoint>/`, gcmlm_assets/scans.py), so
each timepoint of a patient is materialized, checked, failed and retried on its own. Each asset
fingerprints its inputs (content hashes + code version + settings); when the
stored output was made from the same fingerprint and is intact, it is reused
byte for byte instead of recomputed. The model ct_mask predicts with is the
unpartitioned `segmentation_model` asset, in segmentation_model.py.
"""

import json
from pathlib import Path

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.batching import LoadOnce, gpu_backfill_policy, per_patient_events
from gcmlm_assets.catalogue import (
    CT_IMAGE, CT_MASK, CT_THUMBNAIL, CT_VOLUME, MASK_OVERLAY, MASK_VOLUME, RADIOMICS_ROW, RADIOMICS_TABLE,
    SEGMENTATION_MODEL)
from gcmlm_assets.columns import column_schema_metadata
from gcmlm_assets.inputs import required_file
from gcmlm_assets.partitions import ct_scans_partitions
from gcmlm_assets.policies import TRANSIENT_RETRY, stored_materialization
from gcmlm_assets.pictures import PHOTO, patient_picture_markdown, save_png
from gcmlm_assets.lazy import lazy
from gcmlm_assets.landing_input import LandingInputError
from gcmlm_assets.radiology import checks, ct_io, features, masks, model_lifecycle
from gcmlm_assets.radiology.columns import RADIOMICS_ROW_COLUMNS
from gcmlm_assets.radiology.resources import RadiomicsSettings
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.reuse import StoredOutput, combined_digest
from gcmlm_assets.scans import InvalidScanKey, ScanKey, parse_scan_key, scan_folders, timepoint_date
from gcmlm_assets.storage import files_replaced_together, sha256_file, sha256_text

# Imported by the steps that use it, not when the definitions load (gcmlm_assets/lazy.py).
sitk = lazy("SimpleITK")


def input_failure(error: Exception) -> dg.Failure:
    """Bad input: fail the step with the message (file + problem), without retries
    (segmentation_model.py raises it too)."""
    return dg.Failure(description=str(error), metadata={"problem": str(error)}, allow_retries=False)


def scan_of(scan_key: str) -> ScanKey:
    """The patient and timepoint of a partition of `ct_scans`; a Failure for a key that is none
    (added by hand)."""
    try:
        return parse_scan_key(scan_key)
    except InvalidScanKey as error:
        raise input_failure(error) from error


def refuse_scan_links(landing: LandingZone, scan_key: str, *, ct: bool = True, reference: bool = True) -> None:
    """`LandingInputError` when the patient's folder, or the scan's CT folder (`ct`) or reference-mask
    folder (`reference`), holds a link leading outside the landing zone; the other timepoints' folders
    are not looked at (their own partitions are)."""
    scan = scan_of(scan_key)
    ct_folder, reference_folder = scan_folders(scan.timepoint)
    landing.refuse_links_leaving(scan.patient_id, *([ct_folder] if ct else []),
                                 *([reference_folder] if reference else []))


def scan_metadata(scan_key: str) -> dict:
    """Whose scan a partition is, for the asset page: the patient, the timepoint and, for a
    dated timepoint, the scan's date."""
    scan = scan_of(scan_key)
    date = timepoint_date(scan.timepoint)
    return {"patient_id": scan.patient_id, "timepoint": scan.timepoint or "only scan",
            **({"scan_date": date.isoformat()} if date else {})}


# What each output is made from (reuse.py). Any change to a formula recomputes every stored output
# (nnU-Net on every patient for ct_mask): gcmlm_assets_tests/core/test_fingerprints.py pins them.

def ct_image_fingerprint(input_hashes: dict[str, str]) -> str:
    return sha256_text(CT_IMAGE.key, CT_IMAGE.code_version, json.dumps(input_hashes, sort_keys=True))


def ct_mask_fingerprint(ct_sha: str, mode: str, source_id: str, extra: tuple[str, ...]) -> str:
    return sha256_text(CT_MASK.key, CT_MASK.code_version, ct_sha, mode, source_id, *extra)


def radiomics_row_fingerprint(ct_sha: str, mask_sha: str, settings_sha: str, pyradiomics_version: str) -> str:
    return sha256_text(RADIOMICS_ROW.key, RADIOMICS_ROW.code_version, ct_sha, mask_sha, settings_sha,
                       pyradiomics_version)


# ---------------------------------------------------------------- ct_image


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **CT_IMAGE.dagster_attributes(),
        # Not yielded by a range step: each patient's materialization is logged on its own (batching.py).
        skippable=True,
        description="One CT scan of a patient from `<landing>/<patient>/ct/` (the drop's only scan) or "
                    "`ct/<timepoint>/` (a DICOM series or one NIfTI, NRRD or MHA volume), written as one "
                    f"canonical LPS-oriented `{CT_VOLUME.name}`.",
    )],
    partitions_def=ct_scans_partitions,
    check_specs=checks.CT_IMAGE_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def ct_image(context: dg.AssetExecutionContext, storage: ArtifactStorage, landing: LandingZone):
    yield from per_patient_events(context, CT_IMAGE, lambda patient_id: [_ct_image_for(context, patient_id, storage,
                                                                                          landing)],
                                  checks.CT_IMAGE_CHECK_SPECS)


def _ct_image_for(context: dg.AssetExecutionContext, patient_id: str, storage: ArtifactStorage,
                  landing: LandingZone) -> dg.MaterializeResult:
    store = storage.store()
    scan_of(patient_id)  # a partition that is no scan's fails here, named
    folder = landing.scan_folders(patient_id)[0]
    try:
        # The scan's whole radiology drop: ct_mask, which runs after this step, reads its reference folder.
        refuse_scan_links(landing, patient_id)
        input_hashes = {path.name: sha256_file(path) for path in ct_io.input_files(folder)}
    except (ct_io.CTInputError, LandingInputError) as error:
        raise input_failure(error) from error
    output = StoredOutput(store, CT_IMAGE, patient_id, ct_image_fingerprint(input_hashes))
    ct_path, picture_path = output.path(CT_VOLUME), output.path(CT_THUMBNAIL)
    if not output.reused:
        try:
            image, source = ct_io.load_ct(folder)
        except ct_io.CTInputError as error:
            raise input_failure(error) from error
        summary = ct_io.summarise(image, source)
        ct_io.write_volume(image, ct_path)
        save_png(ct_io.ct_thumbnail_png(image), picture_path)
        output.record([CT_VOLUME, CT_THUMBNAIL], inputs=input_hashes, source=source.describe(),
                      summary=summary.as_dict())
    manifest = output.manifest
    summary = ct_io.CTSummary.from_dict(manifest["summary"])
    context.log.info(f"{patient_id}: CT {'reused' if output.reused else 'written'} {ct_path} "
                     f"({summary.size}, {summary.spacing} mm)")
    return stored_materialization(
        output,
        metadata={
            **scan_metadata(patient_id),
            "path": dg.MetadataValue.path(str(ct_path)),
            "picture_path": dg.MetadataValue.path(str(picture_path)),
            "sha256": output.sha256(CT_VOLUME),
            "input_folder": dg.MetadataValue.path(str(folder)),
            "input_files": len(input_hashes),
            "input_sha256": combined_digest(input_hashes),
            "source": manifest["source"],
            "reused": output.reused,
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
            "picture": dg.MetadataValue.md(patient_picture_markdown(picture_path, PHOTO, "CT thumbnail")),
        },
        data_version=output.sha256(CT_VOLUME),
        check_results=checks.ct_image_check_results(ct_path),
        specs=checks.CT_IMAGE_CHECK_SPECS)


# ---------------------------------------------------------------- ct_mask

def _load_segmenter(model_folder: Path, pins, device_setting: str):
    from gcmlm_assets.devices import resolve_device
    from gcmlm_assets.radiology.nnunet import GastricSegmenter  # torch/nnU-Net only when predicting

    device = resolve_device(device_setting, "segmentation.device", gpu_step=True)
    return GastricSegmenter.load(model_folder, device=device.name, pins=pins), device


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **CT_MASK.dagster_attributes(),
        # The model is an input only of predicted masks; the edge shows it in the lineage and marks
        # masks stale when the model changes (reference masks then re-materialize to the same bytes).
        deps=[ct_image, dg.AssetKey(SEGMENTATION_MODEL.key)],
        # Skipped, not failed, while a patient without a reference mask waits for a trained model;
        # predicted_mask_sensor runs it again once one is installed.
        skippable=True,
        description="Binary gastric mask on exactly ct_image's grid: the reference mask from "
                    "`<landing>/<patient>/ct_label/` (`ct_label/<timepoint>/` for a timepoint's scan) when "
                    "there is one (a label map narrowed to the label `radiomics.reference_mask_label` names), "
                    "else predicted by the installed nnU-Net model (segmentation_model). Without either it is "
                    "skipped, not failed, until a model is installed. With both, the model's Dice agreement "
                    "with the reference is recorded.",
    )],
    partitions_def=ct_scans_partitions,
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
    from gcmlm_assets.devices import DeviceError, require_gpu_step_device
    from gcmlm_assets.radiology.nnunet import ModelFolderError

    segmentation = context.resources.segmentation
    # On Kubernetes a GPU pod without a GPU is misplaced: the whole step fails now, naming its settings.
    require_gpu_step_device(segmentation.device, "segmentation.device")
    segmenter = LoadOnce(lambda folder, pins: _load_segmenter(folder, pins, segmentation.device),
                         errors=(DeviceError, ModelFolderError))
    yield from per_patient_events(context, CT_MASK, lambda patient_id: _ct_mask_for(context, patient_id, segmenter),
                                  checks.CT_MASK_CHECK_SPECS)


def _ct_mask_for(context: dg.AssetExecutionContext, patient_id: str, segmenter: LoadOnce):
    from gcmlm_assets.radiology.nnunet import ModelFolderError
    from gcmlm_assets.step_output import stdout_to_log

    storage: ArtifactStorage = context.resources.storage
    landing: LandingZone = context.resources.landing
    segmentation = context.resources.segmentation
    radiomics: RadiomicsSettings = context.resources.radiomics
    store = storage.store()
    ct_path = required_file(CT_VOLUME, store, patient_id)
    ct_sha = sha256_file(ct_path)
    scan_of(patient_id)
    label_dir = landing.scan_folders(patient_id)[1]
    try:
        # Checked again here: ct_mask may run without ct_image (by hand, or after the drop changed).
        refuse_scan_links(landing, patient_id, ct=False)
        reference = masks.find_reference_mask(label_dir)
    except (masks.MaskInputError, LandingInputError) as error:
        raise input_failure(error) from error

    model_folder = pins = None
    model_error = ""
    label_setting = radiomics.reference_mask_label or None
    if reference is not None:
        source_id = sha256_file(reference)
        # An installed model is not used for this mask, only compared with it (a WARN check).
        try:
            pinned = segmentation.pinned_model(store)
        except ModelFolderError as error:
            model_error = str(error)
        else:
            # Compared only under the same checkpoint pins as a prediction (GastricSegmenter.load).
            model_folder, pins = pinned if pinned is not None else (None, None)
        compared_with = model_lifecycle.model_identity(Path(model_folder)) if model_folder else model_error
        extra = (_label_key(label_setting, reference), compared_with or "no model")
    else:
        pinned = segmentation.pinned_model(store)
        if pinned is None:
            context.log.info(
                f"{patient_id}: waiting for a segmentation model: {label_dir} has no reference mask and no "
                "model is installed yet. segmentation_training_sensor trains one once enough patients have a "
                "reference mask (or point the segmentation resource at a trained nnU-Net folder); "
                "predicted_mask_sensor then runs this mask and its radiomics_row.")
            return
        model_folder, pins = Path(pinned[0]), pinned[1]
        source_id = model_lifecycle.model_identity(model_folder)
        extra = ()
    mode = "reference" if reference is not None else "predicted"
    output = StoredOutput(store, CT_MASK, patient_id, ct_mask_fingerprint(ct_sha, mode, source_id, extra))
    out_dir = output.folder
    mask_path, picture_path = output.path(MASK_VOLUME), output.path(MASK_OVERLAY)
    if not output.reused:
        image = sitk.ReadImage(str(ct_path))
        if reference is not None:
            try:
                conformed = masks.conform_mask(masks.load_mask(reference), image, reference, label_setting)
            except masks.MaskInputError as error:
                raise input_failure(error) from error
            mask, provenance = conformed.image, {"reference_file": str(reference), "model_id": "",
                                                 **conformed.provenance()}
            agreement = _model_agreement(context, segmenter, model_folder, pins, model_error, image, mask,
                                         reference)
        else:
            # nnU-Net's loading and prediction print: to the step's debug log, not raw stdout.
            with stdout_to_log(context.log.debug):
                model, device = segmenter.get(model_folder, pins)
                predicted = model.predict(image)
            try:
                mask = masks.validate_prediction(predicted, image, f"model {model.model_id} on {ct_path}")
            except masks.MaskInputError as error:
                raise input_failure(error) from error
            provenance = {"model_id": model.model_id, "model_folder": str(model_folder), "device": device.reason,
                          "resampled_to_ct_grid": False, "resampling": "none (predicted on the CT grid)"}
            agreement = {"status": "predicted"}
        stats = masks.mask_stats(mask)
        # A new model's mask replaces the previous one: both files are written beside it first, so a
        # killed step leaves the previous mask and picture whole (storage.files_replaced_together).
        with files_replaced_together(out_dir, [MASK_VOLUME.name, MASK_OVERLAY.name],
                                     withdraw=out_dir / store.MANIFEST) as staged:
            masks.write_mask(mask, staged[MASK_VOLUME.name])
            save_png(masks.mask_overlay_png(image, mask), staged[MASK_OVERLAY.name])
            files = {name: sha256_file(path) for name, path in staged.items()}
        output.record_digests(files, inputs={CT_IMAGE.key: ct_sha, mode: source_id}, source=mode,
                              provenance=provenance, stats=stats.as_dict(), model_agreement=agreement)
    manifest = output.manifest
    stats, provenance = manifest["stats"], manifest["provenance"]
    if provenance.get("resampled_to_ct_grid"):
        context.log.warning(f"{patient_id}: reference mask {provenance.get('reference_file')} was on another grid "
                            "and was resampled onto the CT grid with nearest neighbour")
    yield stored_materialization(
        output,
        metadata={
            "path": dg.MetadataValue.path(str(mask_path)),
            "picture_path": dg.MetadataValue.path(str(picture_path)),
            "sha256": output.sha256(MASK_VOLUME),
            "input_ct_sha256": ct_sha,
            "input_source_sha256": source_id,
            "source": manifest["source"],
            "model_id": provenance.get("model_id") or "reference mask",
            "reference_file": provenance.get("reference_file", ""),
            "resampled_to_ct_grid": bool(provenance.get("resampled_to_ct_grid", False)),
            "resampling": provenance.get("resampling", ""),
            "reoriented_from": provenance.get("reoriented_from", ""),
            "reference_label": provenance.get("label", ""),
            **_agreement_metadata(manifest["model_agreement"]),
            "reused": output.reused,
            "voxels": stats["voxels"],
            "voxel_volume_ml": stats["voxel_volume_ml"],
            "volume_ml": stats["volume_ml"],
            "connected_components": stats["components"],
            "largest_component_voxels": stats["largest_component_voxels"],
            "picture": dg.MetadataValue.md(patient_picture_markdown(picture_path, PHOTO, "gastric mask")),
        },
        data_version=output.sha256(MASK_VOLUME),
        check_results=[
            *checks.ct_mask_check_results(mask_path, ct_path, radiomics.mask_volume_min_ml,
                                          radiomics.mask_volume_max_ml, radiomics.mask_bone_fraction_max,
                                          radiomics.mask_outside_air_fraction_max),
            checks.mask_agreement_result(mask_path, manifest["model_agreement"], segmentation.agreement_min_dice),
        ],
        specs=checks.CT_MASK_CHECK_SPECS)


def _label_key(label_setting: str | None, reference: Path) -> str:
    """What the chosen label depends on: the setting and, for a name, the sidecars it is looked up in."""
    if not label_setting:
        return "binary"
    return sha256_text(label_setting, *(sha256_file(p) for p in masks.label_sidecars(reference) if p.is_file()))


def _model_agreement(context, segmenter: LoadOnce, model_folder, pins, model_error: str, image, mask,
                     reference: Path) -> dict:
    """Dice of the installed model's prediction with the reference mask, or why there is none."""
    from gcmlm_assets.batching import StepFailure
    from gcmlm_assets.step_output import stdout_to_log

    if model_folder is None:
        return ({"status": "unavailable", "reason": model_error, "reference_file": str(reference)} if model_error
                else {"status": "no model"})
    try:
        with stdout_to_log(context.log.debug):
            model, _ = segmenter.get(Path(model_folder), pins)
    except StepFailure as error:  # the model cannot load here: the reference mask is still good
        return {"status": "unavailable", "reason": f"the model could not be loaded: {error.description}",
                "reference_file": str(reference)}
    try:
        with stdout_to_log(context.log.debug):
            predicted = model.predict(image)
    except Exception as error:  # noqa: BLE001 - a failed comparison must not cost the reference mask
        context.log.warning(f"reference mask {reference}: model {model.model_id} failed to predict: {error!r}")
        return {"status": "unavailable", "reference_file": str(reference),
                "reason": f"model {model.model_id} failed to predict: {type(error).__name__}: {error}"}
    if not masks.same_grid(predicted, image):
        return {"status": "unavailable", "reference_file": str(reference),
                "reason": f"model {model.model_id} predicted on another grid than the CT's"}
    score = masks.dice(predicted, mask)
    context.log.info(f"reference mask {reference}: Dice {score:.3f} with model {model.model_id}")
    return {"status": "compared", "dice": score, "model_id": model.model_id, "reference_file": str(reference)}


def _agreement_metadata(agreement: dict) -> dict:
    status = agreement.get("status", "no model")
    if status == "compared":
        return {"model_agreement": f"Dice {agreement['dice']:.3f} with model {agreement['model_id']}",
                "model_agreement_dice": float(agreement["dice"]), "agreement_model_id": agreement["model_id"]}
    # Said of the moment the mask was made: a model trained later (often on these very reference
    # masks) is compared only when ct_mask is materialized again.
    text = {"no model": "not compared: no segmentation model was installed when this mask was made; "
                        "materialize ct_mask again to compare with the model installed now",
            "predicted": "the mask is the model's own"}.get(status, f"not compared: {agreement.get('reason', '')}")
    return {"model_agreement": text}


# ---------------------------------------------------------------- radiomics_row


@dg.multi_asset(
    specs=[dg.AssetSpec(
        **RADIOMICS_ROW.dagster_attributes(),
        deps=[ct_image, ct_mask],
        skippable=True,
        description="PyRadiomics features inside the gastric mask as one parquet row: `patient_id` (the scan's "
                    "partition key), then one column per feature (107 with the default params).",
        metadata=column_schema_metadata(RADIOMICS_ROW_COLUMNS),
    )],
    partitions_def=ct_scans_partitions,
    check_specs=checks.RADIOMICS_ROW_CHECK_SPECS,
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
    op_tags=step_pods.op_tags(step_pods.CPU),
)
def radiomics_row(context: dg.AssetExecutionContext, storage: ArtifactStorage, radiomics: RadiomicsSettings):
    yield from per_patient_events(context, RADIOMICS_ROW,
                                  lambda patient_id: [_radiomics_row_for(context, patient_id, storage, radiomics)],
                                  checks.RADIOMICS_ROW_CHECK_SPECS)


def _radiomics_row_for(context: dg.AssetExecutionContext, patient_id: str, storage: ArtifactStorage,
                       radiomics: RadiomicsSettings) -> dg.MaterializeResult:
    store = storage.store()
    ct_path = required_file(CT_VOLUME, store, patient_id)
    mask_path = required_file(MASK_VOLUME, store, patient_id)
    ct_sha, mask_sha = sha256_file(ct_path), sha256_file(mask_path)
    params = radiomics.load_params()
    settings_sha = features.settings_hash(params)
    version = features.pyradiomics_version()
    output = StoredOutput(store, RADIOMICS_ROW, patient_id,
                          radiomics_row_fingerprint(ct_sha, mask_sha, settings_sha, version))
    row_path = output.path(RADIOMICS_TABLE)
    if not output.reused:
        extractor = features.extractor_from_params(params)
        try:
            # The very files the mask was made on: no geometry tolerance can trip.
            row = features.extract_features(extractor, ct_path, mask_path)
        except features.RadiomicsError as error:
            raise input_failure(error) from error
        features.write_row(row_path, patient_id, row.features, {
            "pyradiomics_version": version, "settings_sha256": settings_sha, "params": radiomics.params})
        output.record([RADIOMICS_TABLE], inputs={CT_IMAGE.key: ct_sha, CT_MASK.key: mask_sha},
                      seconds=row.seconds, features=len(row.features), diagnostics=row.diagnostics)
    manifest = output.manifest
    table = features.read_row(row_path)
    took = "reused" if output.reused else f"{manifest['seconds']:.1f} s"
    context.log.info(f"{patient_id}: {manifest['features']} radiomics features ({took})")
    return stored_materialization(
        output,
        metadata={
            "path": dg.MetadataValue.path(str(row_path)),
            "sha256": output.sha256(RADIOMICS_TABLE),
            "input_ct_sha256": ct_sha,
            "input_mask_sha256": mask_sha,
            "pyradiomics_version": version,
            "params": radiomics.params,
            "params_file": dg.MetadataValue.path(str(radiomics.params_path())),
            "settings_sha256": settings_sha,
            "features": manifest["features"],
            "extraction_seconds": manifest["seconds"],
            "reused": output.reused,
            "resampled_roi_voxels": manifest["diagnostics"].get("diagnostics_Mask-interpolated_VoxelNum", ""),
            **column_schema_metadata(RADIOMICS_ROW_COLUMNS, table),
        },
        data_version=output.sha256(RADIOMICS_TABLE),
        check_results=checks.radiomics_row_check_results(table, patient_id,
                                                         features.expected_feature_names(params)),
        specs=checks.RADIOMICS_ROW_CHECK_SPECS)


# The per-scan assets; segmentation_model.py holds the group's fourth, the model ct_mask predicts with.
ASSETS: list[dg.AssetsDefinition] = [ct_image, ct_mask, radiomics_row]
