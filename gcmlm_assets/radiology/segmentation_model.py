"""The radiology group's `segmentation_model` asset (Dagster wiring over nnunet.py, nnunet_training.py and
model_lifecycle.py).

One unpartitioned model for all patients: the nnU-Net v2 model trained on the CT scans with a
reference mask (in `ct_label/`, or `ct_label/<timepoint>/` for a timepoint's scan: every timepoint
of a patient is a case of its own) and a materialized ct_image, installed under the artifact store and reused while its
inputs, settings, code and nnU-Net version stay the same; or the trained folder the segmentation
resource names. ct_mask (assets.py) predicts with it; segmentation_training_sensor (sensors.py)
decides when it trains by itself, and any run of this asset started by hand trains on the current set.

A new model is compared with the installed one on reference cases held out of its training
(model_lifecycle.choose_held_out) and installed only if its mean Dice there is at least the
installed model's; a rejected model is deleted, and `current.json` keeps the installed model and
records the rejection, so the same inputs are not trained again against it.
"""

import json

import dagster as dg

from gcmlm_assets import step_pods
from gcmlm_assets.lazy import lazy
from gcmlm_assets.partitions import ensure_ct_scans
from gcmlm_assets.landing_input import LandingInputError
from gcmlm_assets.pictures import PLOT, picture_markdown
from gcmlm_assets.policies import TRANSIENT_RETRY
from gcmlm_assets.catalogue import CT_IMAGE, CT_VOLUME, SEGMENTATION_MODEL, MissingAssetFile
from gcmlm_assets.radiology import masks, model_lifecycle
from gcmlm_assets.radiology.assets import input_failure
from gcmlm_assets.resources import ArtifactStorage, LandingZone
from gcmlm_assets.scans import InvalidScanKey, parse_scan_key, scan_folders
from gcmlm_assets.storage import sha256_file, sha256_text, write_pointer

# Imported by the step that uses it, not when the definitions load (gcmlm_assets/lazy.py).
sitk = lazy("SimpleITK")


def segmentation_model_fingerprint(nnunet_version: str, settings: dict, inputs: dict[str, dict]) -> str:
    """What a trained model is made from: its training settings (`TrainingSettings.as_dict()`) and each
    training case's input hashes. Pinned by core/test_fingerprints.py: a change retrains the model."""
    return sha256_text(SEGMENTATION_MODEL.key, SEGMENTATION_MODEL.code_version, nnunet_version,
                       json.dumps(settings, sort_keys=True, default=str), json.dumps(inputs, sort_keys=True))


def _training_candidates(scans: list[str], store, landing: LandingZone):
    """(scan key, canonical CT, reference mask file) for every scan with a reference mask,
    and why the others that have one cannot be used."""
    usable, skipped = [], {}
    for patient_id in scans:
        try:
            scan = parse_scan_key(patient_id)
            label_dir = landing.scan_folders(patient_id)[1]
            # nothing outside the landing zone is read
            landing.refuse_links_leaving(scan.patient_id, scan_folders(scan.timepoint)[1])
            reference = masks.find_reference_mask(label_dir)
        except (masks.MaskInputError, LandingInputError, InvalidScanKey) as error:
            skipped[patient_id] = str(error)
            continue
        if reference is None:
            continue
        try:
            ct_path = CT_VOLUME.required(store, patient_id)
        except MissingAssetFile as missing:
            skipped[patient_id] = str(missing)
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
    **SEGMENTATION_MODEL.dagster_attributes(),
    retry_policy=TRANSIENT_RETRY,
    deps=[dg.AssetDep(CT_IMAGE.key, partition_mapping=dg.AllPartitionMapping())],
    pool=step_pods.GPU_POOL,
    op_tags=step_pods.op_tags(step_pods.GPU),
    # radiomics: which label of a reference label map is the stomach, as ct_mask takes it.
    required_resource_keys={"storage", "landing", "segmentation", "radiomics"},
    description="The nnU-Net v2 gastric segmentation model (`3d_fullres`), trained on the current reference "
                "masks (installed only if it predicts held-out reference cases at least as well as the installed "
                "model, by mean Dice), or the trained folder that `segmentation.trained_model_folder` "
                "(`GCMLM_NNUNET_MODEL_FOLDER`) names. Warning: the production profile trains nnU-Net's "
                "full-size network for 1000 x 250 iterations, which takes a day or more on a GPU and is "
                "refused on a CPU. For a quick model use `GCMLM_PROFILE=demo` (or `segmentation.tiny_plans` "
                "with a few epochs), or point `trained_model_folder` at a trained model.",
)
def segmentation_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    import shutil
    import uuid

    from gcmlm_assets.devices import require_gpu_step_device
    from gcmlm_assets.radiology import nnunet, nnunet_training
    from gcmlm_assets.step_output import stdout_to_log

    storage: ArtifactStorage = context.resources.storage
    landing: LandingZone = context.resources.landing
    segmentation = context.resources.segmentation
    # On Kubernetes a GPU pod without a GPU is misplaced: fail now, not after the inputs are read.
    require_gpu_step_device(segmentation.device, "segmentation.device")
    if segmentation.trained_model_folder:
        return _configured_model_result(context, segmentation.trained_model_folder,
                                        segmentation.trained_model_sha256)

    store = storage.store()
    models_root = SEGMENTATION_MODEL.folder(store)
    patients = sorted(ensure_ct_scans(context.instance))
    candidates, skipped = _training_candidates(patients, store, landing)
    # The set as segmentation_training_sensor sees it (names, sizes, times over every scan): recorded
    # for the training that saw it, installed or not, so the sensor measures changes from here.
    reference_cases = model_lifecycle.reference_set(landing.path(),
                                                    {pid: CT_VOLUME.path(store, pid) for pid in patients})
    seen_set = {"reference_set": model_lifecycle.reference_set_fingerprint(reference_cases),
                "reference_cases": model_lifecycle.case_stamps(reference_cases)}
    settings = segmentation.training_settings()
    inputs = {pid: {CT_IMAGE.key: sha256_file(ct), "reference_mask": sha256_file(ref)} for pid, ct, ref in candidates}
    label_setting = context.resources.radiomics.reference_mask_label or None
    if label_setting:  # the stomach is one label of the masks: which one is an input of the training
        for pid, _, ref in candidates:
            inputs[pid]["reference_label"] = label_setting
            inputs[pid].update({p.name: sha256_file(p) for p in masks.label_sidecars(ref) if p.is_file()})
    # Same inputs, settings, code and nnU-Net version: the installed model is reused, not retrained.
    fingerprint = segmentation_model_fingerprint(_nnunet_version(), settings.as_dict(), inputs)

    pointer = nnunet.read_current_model(models_root)
    installed = _installed_model(context, models_root, pointer)
    action = model_lifecycle.training_action(fingerprint=fingerprint, pointer=pointer if installed else None)
    if action != model_lifecycle.TRAIN:
        if pointer.get("reference_set") != seen_set["reference_set"]:
            # The same inputs under new names or times: keep the model, remember the set it now covers.
            pointer = {**pointer, **seen_set}
            write_pointer(models_root, pointer)
        if action == model_lifecycle.REUSE:
            decision = "reused: the installed model was trained on exactly these inputs and settings"
        else:
            decision = (f"not retrained: a model trained on these inputs and settings was rejected before "
                        f"({pointer['rejected']['evaluation']['decision']})")
        context.log.info(decision)
        return _installed_model_result(installed, models_root, pointer, decision=decision, trained=False)

    refusal = segmentation.training_refusal()
    if refusal:
        raise dg.Failure(description=refusal, allow_retries=False)
    if len(candidates) < 2:
        raise dg.Failure(
            description=f"segmentation_model needs at least 2 CT scans with a reference mask in "
                        f"<landing>/<patient>/ct_label/ (or ct_label/<timepoint>/) and a materialized ct_image; "
                        f"found {len(candidates)} "
                        f"({', '.join(pid for pid, _, _ in candidates) or 'none'}) under {landing.path()}"
                        + (f"; unusable: {json.dumps(skipped)}" if skipped else ""),
            allow_retries=False)
    work_dir = models_root / f"{nnunet.TRAIN_TMP_PREFIX}{uuid.uuid4().hex[:12]}"
    try:  # everything trained lands in work_dir: a rejected model leaves with it
        labelled = {}
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
            labelled[patient_id] = (ct_path, label_path)
        # The first model has nothing to be compared with: it trains on every case.
        held_out = (model_lifecycle.choose_held_out(
            {pid: inputs[pid] for pid in labelled}, pointer["training"]["inputs"],
            fraction=segmentation.holdout_fraction, min_cases=segmentation.holdout_min_cases)
            if installed else model_lifecycle.HoldOut())
        cases = [nnunet_training.TrainingCase(pid, ct_path, label_path)
                 for pid, (ct_path, label_path) in labelled.items() if pid not in held_out.cases]
        if len(cases) < 2:
            raise dg.Failure(description=f"segmentation_model: only {len(cases)} usable reference mask(s) "
                                         f"(need 2); unusable: {json.dumps(skipped)}", allow_retries=False)
        if held_out.cases:
            context.log.info(f"holding out {len(held_out.cases)} reference case(s) to compare the new model with "
                             f"{installed.model_id}: {', '.join(held_out.cases)}")
        try:
            # Phases and epochs as info lines; what nnU-Net prints as debug lines (not raw stdout).
            with stdout_to_log(context.log.debug):
                result = nnunet_training.train_segmentation_model(cases, work_dir / "nnunet", settings,
                                                                  progress=context.log.info)
                evaluation = _evaluate(installed, models_root, pointer, result.model_folder, held_out,
                                       {pid: labelled[pid] for pid in held_out.cases}, settings.device)
        except nnunet_training.TrainingDataError as error:
            raise input_failure(error) from error
        context.log.info(f"trained on {len(cases)} cases in {result.seconds['total']:.0f} s; "
                         f"{evaluation['decision']}")
        training = {
            "cases": [case.case_id for case in cases],
            "held_out": held_out.cases,
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
            "evaluation": evaluation,
        }
        if evaluation["installed"]:
            model = nnunet.install_trained_model(result.model_folder, models_root,
                                                 {"fingerprint": fingerprint, "training": training, **seen_set})
            pointer = nnunet.read_current_model(models_root)
            return _installed_model_result(model, models_root, pointer, decision=evaluation["decision"], trained=True)
        candidate = nnunet.describe_model_folder(result.model_folder,
                                                 nnunet.CheckpointPins.of_fresh_training(result.model_folder))
        # Kept: the installed model. Remembered: the set this training saw (the sensor does not ask for it
        # again) and what was rejected (the same inputs are not trained again against the same model).
        pointer = {**pointer, **seen_set,
                   "rejected": {"fingerprint": fingerprint, "against": pointer["checkpoint_sha256"],
                                "model_id": candidate.model_id, "checkpoint_sha256": candidate.checkpoint_sha256,
                                "evaluation": evaluation, "cases": training["cases"],
                                "seconds": result.seconds}}
        write_pointer(models_root, pointer)
        return _installed_model_result(installed, models_root, pointer, decision=evaluation["decision"],
                                       trained=True, rejected=pointer["rejected"])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _installed_model(context: dg.AssetExecutionContext, models_root, pointer: dict | None):
    """The installed model, verified against the digests recorded at install (before anything is
    unpickled), or None when there is none or it is unusable (then the next model installs as a first)."""
    from gcmlm_assets.radiology import nnunet

    if not pointer or not isinstance(pointer.get("training"), dict):
        return None
    try:
        model = nnunet.describe_model_folder(models_root / pointer["folder"],
                                             nnunet.installed_model_pins(models_root, pointer))
    except nnunet.ModelFolderError as error:
        context.log.warning(f"installed model unusable, a new one replaces it without comparison: {error}")
        return None
    return model if model.checkpoint_sha256 == pointer.get("checkpoint_sha256") else None


def _evaluate(installed, models_root, pointer: dict | None, new_folder, held_out, held_cases: dict,
              device: str) -> dict:
    """Whether the freshly trained model replaces the installed one, with the Dice values it rests on."""
    from gcmlm_assets.radiology import nnunet

    if installed is None:
        return {"installed": True, "decision": "installed: the first model (none installed to compare with)"}
    if not held_out.cases:
        return {"installed": False, "held_out": [],
                "decision": "rejected: no reference case could be held out to compare with the installed "
                            "model (nnU-Net needs 2 training cases); the installed model stays"}
    new = model_lifecycle.held_out_dice(new_folder, nnunet.CheckpointPins.of_fresh_training(new_folder),
                                        held_cases, device)
    old = model_lifecycle.held_out_dice(installed.folder, nnunet.installed_model_pins(models_root, pointer),
                                        held_cases, device)
    accepted, decision = model_lifecycle.install_decision(new, old)
    return {"installed": accepted, "decision": decision, "held_out": held_out.cases,
            "held_out_seen_by_installed": held_out.seen_by_installed,
            "new_model_dice": new, "installed_model_dice": old, "installed_model_id": installed.model_id,
            "new_model_mean_dice": round(sum(new.values()) / len(new), 6),
            "installed_model_mean_dice": round(sum(old.values()) / len(old), 6)}


def _evaluation_metadata(evaluation: dict) -> dict:
    if "new_model_dice" not in evaluation:
        return {}
    return {
        "held_out_cases": ", ".join(evaluation["held_out"]),
        "new_model_mean_dice": evaluation["new_model_mean_dice"],
        "installed_model_mean_dice": evaluation["installed_model_mean_dice"],
        "compared_with_model_id": evaluation["installed_model_id"],
        "held_out_dice": dg.MetadataValue.json({pid: {"new": evaluation["new_model_dice"][pid],
                                                      "installed": evaluation["installed_model_dice"][pid]}
                                                for pid in evaluation["held_out"]}),
        **({"held_out_seen_by_installed": ", ".join(evaluation["held_out_seen_by_installed"])}
           if evaluation.get("held_out_seen_by_installed") else {}),
    }


def _installed_model_result(model, models_root, pointer: dict, *, decision: str, trained: bool,
                            rejected: dict | None = None) -> dg.MaterializeResult:
    """The materialization: the model now installed, what this step decided and, when it trained, why."""
    from gcmlm_assets.radiology import nnunet

    training = pointer["training"]
    metrics = training["metrics"]
    evaluation = (rejected or {}).get("evaluation") or (training.get("evaluation", {}) if trained else {})
    metadata = {
        "source": "trained here",
        "trained": trained,
        # The installed model was kept (reused, or a newly trained one was rejected).
        "reused": not trained or rejected is not None,
        "decision": decision,
        **_evaluation_metadata(evaluation),
        **({"rejected_model_id": rejected["model_id"],
            "rejected_model_training_cases": ", ".join(rejected["cases"])} if rejected else {}),
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
            "held-out cases": ", ".join(training.get("held_out", [])) or "none",
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
