"""The radiology group's `segmentation_model` asset (Dagster wiring over nnunet.py, nnunet_training.py and
model_lifecycle.py).

One unpartitioned model for all patients: the nnU-Net v2 model trained on every patient with a
reference mask and a materialized ct_image, installed under the artifact store and reused while its
inputs, settings, code and nnU-Net version stay the same; or the trained folder the segmentation
resource names. ct_mask (assets.py) predicts with it; segmentation_training_sensor (sensors.py)
decides when it trains.
"""

import json

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.lazy import lazy
from gcmlm_assets.partitions import patients_partitions
from gcmlm_assets.landing.scan import LandingInputError
from gcmlm_assets.pictures import PLOT, picture_markdown
from gcmlm_assets.policies import TRANSIENT_RETRY
from gcmlm_assets.radiology import model_lifecycle
from gcmlm_assets.radiology.assets import CT_FILE, input_failure
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.storage import atomic_write_json, sha256_file, sha256_text

# Imported by the step that uses them, not when the definitions load (gcmlm_assets/lazy.py).
sitk = lazy("SimpleITK")
masks = lazy("gcmlm_assets.radiology.masks")

# Bump when a change of code changes the trained model: the installed model is then retrained.
SEGMENTATION_MODEL_VERSION = "1"
# The asset's name, and its folder in the artifact store (sensors.py reads the installed model there).
MODELS_ASSET = "segmentation_model"


def _training_candidates(context: dg.AssetExecutionContext, store, landing: LandingZone):
    """(patient, canonical CT, reference mask file) for every patient with a reference mask,
    and why the others that have one cannot be used."""
    usable, skipped = [], {}
    for patient_id in sorted(context.instance.get_dynamic_partitions(patients_partitions.name)):
        label_dir = landing.patient_dir(patient_id) / "ct_label"
        try:
            landing.refuse_links_leaving(patient_id, "ct_label")  # nothing outside the landing zone is read
            reference = masks.find_reference_mask(label_dir)
        except (masks.MaskInputError, LandingInputError) as error:
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


def _configured_model_result(context: dg.AssetExecutionContext, folder: str,
                             pinned: str | None) -> dg.MaterializeResult:
    from gcmlm_assets.radiology import nnunet

    try:
        # The pinned digests are checked before nnU-Net's checkpoint is unpickled.
        model = nnunet.describe_model_folder(folder, nnunet.CheckpointPins.from_setting(pinned))
    except nnunet.ModelFolderError as error:
        raise input_failure(error) from error
    context.log.info(f"segmentation resource points at trained model {model.folder}: no training")
    return dg.MaterializeResult(
        metadata={
            "source": "configured trained_model_folder",
            "trained": False,
            "reused": True,
            "model_id": model.model_id,
            "model_folder": dg.MetadataValue.path(str(model.folder)),
            "checkpoint_sha256": model.checkpoint_sha256,
            "checkpoint_sha256_by_fold": dg.MetadataValue.json(model.checkpoint_sha256_by_fold),
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
    # radiomics: which label of a reference label map is the stomach, as ct_mask takes it.
    required_resource_keys={"storage", "landing", "segmentation", "radiomics"},
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

    from gcmlm_assets.radiology import nnunet, nnunet_training
    from gcmlm_assets.step_output import stdout_to_log

    storage: ArtifactStorage = context.resources.storage
    landing: LandingZone = context.resources.landing
    segmentation = context.resources.segmentation
    if segmentation.trained_model_folder:
        return _configured_model_result(context, segmentation.trained_model_folder,
                                        segmentation.trained_model_sha256)

    store = storage.store()
    models_root = store.asset_dir(MODELS_ASSET)
    candidates, skipped = _training_candidates(context, store, landing)
    # What segmentation_training_sensor compares with the installed model (names, sizes, times).
    reference_set = model_lifecycle.reference_set_fingerprint(model_lifecycle.reference_set(
        landing.path(), {pid: ct_path for pid, ct_path, _ in candidates}))
    settings = segmentation.training_settings()
    inputs = {pid: {"ct_image": sha256_file(ct), "reference_mask": sha256_file(ref)} for pid, ct, ref in candidates}
    label_setting = context.resources.radiomics.reference_mask_label or None
    if label_setting:  # the stomach is one label of the masks: which one is an input of the training
        for pid, _, ref in candidates:
            inputs[pid]["reference_label"] = label_setting
            inputs[pid].update({p.name: sha256_file(p) for p in masks.label_sidecars(ref) if p.is_file()})
    # Same inputs, settings, code and nnU-Net version: the installed model is reused, not retrained.
    fingerprint = sha256_text(MODELS_ASSET, SEGMENTATION_MODEL_VERSION, _nnunet_version(),
                              json.dumps(settings.as_dict(), sort_keys=True, default=str),
                              json.dumps(inputs, sort_keys=True))

    pointer = nnunet.read_current_model(models_root)
    reused = bool(pointer and pointer.get("fingerprint") == fingerprint)
    if reused:
        try:
            # Verified against the digests recorded at install before anything is unpickled.
            model = nnunet.describe_model_folder(models_root / pointer["folder"],
                                                 nnunet.installed_model_pins(models_root, pointer))
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
                    conformed = masks.conform_mask(masks.load_mask(reference), image, reference, label_setting)
                except masks.MaskInputError as error:
                    skipped[patient_id] = str(error)
                    continue
                if conformed.resampled:
                    context.log.info(f"{patient_id}: reference mask {reference} resampled onto the CT grid "
                                     "(nearest neighbour)")
                label_path = work_dir / "labels" / f"{patient_id}.nii.gz"
                masks.write_mask(conformed.image, label_path)
                cases.append(nnunet_training.TrainingCase(patient_id, ct_path, label_path))
            if len(cases) < 2:
                raise dg.Failure(description=f"segmentation_model: only {len(cases)} usable reference mask(s) "
                                             f"(need 2); unusable: {json.dumps(skipped)}", allow_retries=False)
            try:
                # Phases and epochs as info lines; what nnU-Net prints as debug lines (not raw stdout).
                with stdout_to_log(context.log.debug):
                    result = nnunet_training.train_segmentation_model(cases, work_dir / "nnunet", settings,
                                                                      progress=context.log.info)
            except nnunet_training.TrainingDataError as error:
                raise input_failure(error) from error
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
        "checkpoint_sha256_by_fold": dg.MetadataValue.json(model.checkpoint_sha256_by_fold),
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
        # nnU-Net's own plot (about 2000 px of losses and Dice), shrunk to the UI's size rules like ours.
        metadata["training_progress"] = dg.MetadataValue.md(picture_markdown(progress, PLOT, "nnU-Net progress"))
        metadata["training_progress_path"] = dg.MetadataValue.path(str(progress))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(model.checkpoint_sha256))


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")
