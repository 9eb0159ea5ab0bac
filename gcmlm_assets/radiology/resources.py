"""Resources of the radiology group, keyed by resource name."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from gcmlm_assets.catalogue import SEGMENTATION_MODEL
from gcmlm_assets.profiles import DEMO, PRODUCTION, Profile
from gcmlm_assets.radiology.nnunet_settings import NnunetTrainingFields
from gcmlm_assets.setting_fields import values_of
from gcmlm_assets.settings import nnunet_model_folder, nnunet_model_sha256


class RadiomicsSettings(dg.ConfigurableResource):
    """How radiomics rows are extracted, which label of a reference mask is the stomach, and what
    a plausible gastric mask is.

    `params`: `default` (unfiltered image only, seconds per case), `rich` (adds LoG
    and wavelet images, minutes per case) or a path to a PyRadiomics params YAML.
    The plausibility limits are explained, with their sources, in the README's radiology settings.
    """

    params: str = Field(default="default", description="default | rich | path to a PyRadiomics params YAML")
    reference_mask_label: str | None = Field(
        default=None, description="Which label of a reference mask is the stomach. Empty (the default): only "
                                  "binary masks are accepted, and a mask with several labels (a multi-organ "
                                  "map) is refused, listing its labels. A number (`6`, the stomach in "
                                  "TotalSegmentator's maps) keeps the voxels of that value. A name (`stomach`) "
                                  "is looked up in a JSON beside the mask, `dataset.json` or `<mask>.json`, "
                                  "whose `labels` map names to values as nnU-Net's dataset.json does.")
    mask_volume_min_ml: float = Field(
        default=50.0, description="Smallest plausible gastric mask volume (ml); below it ct_mask's check fails. "
                                  "50 ml is a third of an empty adult stomach (README, radiology settings).")
    mask_volume_max_ml: float = Field(
        default=3000.0, description="Largest plausible gastric mask volume (ml); above it ct_mask's check "
                                    "fails. 3000 ml is above the largest measured gastric capacity (README, "
                                    "radiology settings); raise it for a cohort with gastric outlet obstruction.")
    mask_bone_fraction_max: float = Field(
        default=0.02, description="Largest share of mask voxels above 300 HU (bone density) that ct_mask's "
                                  "content check accepts (0.02 = 2 %). Raise it for scans with positive oral "
                                  "contrast in the stomach, which is as dense as bone.")
    mask_outside_air_fraction_max: float = Field(
        default=0.05, description="Largest share of mask voxels that are air outside the body (below -500 HU "
                                  "and joined to the image's edge within their slice) that ct_mask's content "
                                  "check accepts (0.05 = 5 %). Gas inside the stomach does not count.")

    def params_path(self) -> Path:
        from gcmlm_assets.radiology.features import resolve_params

        return resolve_params(self.params)

    def load_params(self) -> dict:
        from gcmlm_assets.radiology.features import load_params

        return load_params(self.params)


# nnU-Net's default trainer: 1000 epochs of 250 iterations.
NNUNET_DEFAULT_EPOCHS, NNUNET_DEFAULT_ITERATIONS = 1000, 250
# Full-size plans on a CPU: more training iterations than this are refused (nnU-Net's default is
# 250,000; a user who tried it saw epoch 0 still running after 9.5 minutes).
CPU_FULL_PLANS_MAX_ITERATIONS = 1000


class SegmentationModelResource(dg.ConfigurableResource, NnunetTrainingFields):
    """The nnU-Net gastric segmentation model: an existing trained folder, or how to train one.

    With `trained_model_folder` set (an nnU-Net results folder holding `plans.json`,
    `dataset.json` and `fold_<f>/checkpoint_final.pth`), `segmentation_model` trains
    nothing and `ct_mask` predicts with that folder. Otherwise `segmentation_model`
    trains on the patients with a reference mask and installs the result under
    `<artifacts>/segmentation_model/<model_id>/` with a `current.json` pointer.

    The defaults (the production profile) are nnU-Net's own: its default trainer, 1000 epochs
    of 250 iterations, on full-size plans. That takes a day or more on a GPU (`device="auto"`
    uses one where the step runs) and is refused on a CPU. For a quick model use
    `GCMLM_PROFILE=demo` (`tiny_plans=true` and a few epochs: minutes on a CPU; `cpu_demo()`
    builds it), or point `trained_model_folder` (`GCMLM_NNUNET_MODEL_FOLDER`) at a model
    trained elsewhere, with its checkpoints' SHA-256 in `trained_model_sha256`
    (`GCMLM_NNUNET_MODEL_SHA256`): nnU-Net checkpoints are pickles that run code when loaded,
    so a folder whose checkpoints do not match is refused before anything loads them.
    """

    # How nnU-Net trains: NnunetTrainingFields' fields (declared there once). The model's own:
    trained_model_folder: str | None = Field(
        default=None, description="Existing nnU-Net trained-model folder (also GCMLM_NNUNET_MODEL_FOLDER); when "
                                  "set, nothing is trained and ct_mask predicts with it. The quickest way to a "
                                  "production model: train it where a GPU is and point this at it, with "
                                  "trained_model_sha256.")
    trained_model_sha256: str | None = Field(
        default=None, description="SHA-256 of the trained folder's checkpoint(s) (also GCMLM_NNUNET_MODEL_SHA256), "
                                  "required with trained_model_folder: one digest when the model loads one "
                                  "checkpoint (fold_all or a single fold), else `fold_<f>=<digest>` for each "
                                  "fold, separated by commas (`sha256sum fold_*/checkpoint_final.pth`). The "
                                  "checkpoints are pickles that run code when loaded: a folder whose "
                                  "checkpoints do not match is refused before anything loads them.")
    agreement_min_dice: float = Field(
        default=0.7, description="For a patient with a reference mask, ct_mask also runs the installed model and "
                                 "records the Dice overlap of the two masks; below this value its "
                                 "`mask_agrees_with_model` check warns (it never blocks).")
    min_training_cases: int = Field(
        default=5, description="segmentation_model trains by itself once this many patients have a reference "
                               "mask and a materialized ct_image and no model is installed.")
    retrain_min_new_cases: int = Field(
        default=25, ge=1, description="With a model installed, segmentation_training_sensor retrains once this "
                                      "many reference cases were added, changed or removed since the last "
                                      "training (or retrain_min_growth_fraction of its set, whichever comes "
                                      "first). A run started by hand trains regardless.")
    retrain_min_growth_fraction: float = Field(
        default=0.2, gt=0, description="... or once that many cases, as a fraction of the last training's "
                                       "set, were added, changed or removed (0.2: a fifth of it).")
    holdout_fraction: float = Field(
        default=0.2, ge=0, le=1, description="A new model is installed only if it predicts reference cases "
                                             "held out of its training at least as well (mean Dice) as the "
                                             "installed model: this fraction of the cases the installed model "
                                             "did not train on is held out ...")
    holdout_min_cases: int = Field(
        default=5, ge=1, description="... but at least this many (all of them when fewer), always leaving "
                                     "nnU-Net 2 training cases.")

    @classmethod
    def cpu_demo(cls, **overrides) -> "SegmentationModelResource":
        """The demo profile's model (profiles.DEMO: a tiny nnU-Net that a CPU trains in minutes),
        `overrides` on top."""
        return cls(**{**DEMO.resource_settings("segmentation"), **overrides})

    def training_refusal(self) -> str | None:
        """Why training with these settings cannot finish on this machine, or None.

        nnU-Net's default training (full-size plans, 1000 x 250 iterations) is made for a GPU; on a
        CPU it would run for days, so it is refused before it starts, naming the settings to change.
        """
        from gcmlm_assets.devices import DeviceError, resolve_device

        try:
            device = resolve_device(self.device, "segmentation.device", gpu_step=True).name
        except DeviceError as error:
            return str(error)
        if device == "cuda":
            return None
        iterations = (self.epochs or NNUNET_DEFAULT_EPOCHS) * (self.iterations_per_epoch or NNUNET_DEFAULT_ITERATIONS)
        if device == "cpu" and not self.tiny_plans and iterations > CPU_FULL_PLANS_MAX_ITERATIONS:
            return (f"nnU-Net training with full-size plans for {iterations} iterations on the CPU "
                    f"(segmentation.device={self.device!r}) would take "
                    f"days (segmentation.tiny_plans=false, epochs={self.epochs or NNUNET_DEFAULT_EPOCHS}, "
                    f"iterations_per_epoch={self.iterations_per_epoch or NNUNET_DEFAULT_ITERATIONS}); refused. "
                    "Run the step where a GPU is (segmentation.device='auto' then uses it), point segmentation.trained_model_folder "
                    "(GCMLM_NNUNET_MODEL_FOLDER) at a trained nnU-Net model, or use GCMLM_PROFILE=demo "
                    "(segmentation.tiny_plans=true, a few epochs) for a small CPU model")
        return None

    def configured_model(self) -> dict[str, str]:
        """The model these settings name, as the asset pages show it before any run (reads no file)."""
        if self.trained_model_folder:
            return {"nnunet_trained_model_folder": self.trained_model_folder,
                    "nnunet_trained_model_sha256": self.trained_model_sha256 or
                    "not set: the folder is refused until its checkpoints' SHA-256 is pinned "
                    "(segmentation.trained_model_sha256 or GCMLM_NNUNET_MODEL_SHA256)",
                    "nnunet_training": "none: ct_mask predicts with the trained folder",
                    "nnunet_device": self.device}
        epochs = self.epochs or NNUNET_DEFAULT_EPOCHS
        iterations = self.iterations_per_epoch or NNUNET_DEFAULT_ITERATIONS
        return {
            "nnunet_plans": ("tiny (4 stages, 4..32 features, patch at most 32x64x64)" if self.tiny_plans
                             else "full-size (nnU-Net's own plans)") + f", planner {self.planner}",
            "nnunet_configuration": "3d_fullres",
            "nnunet_trainer": self.trainer,
            "nnunet_training": f"{epochs} epochs x {iterations} iterations, fold {self.fold}",
            "nnunet_device": self.device,
            "nnunet_trained_model_folder": "none: segmentation_model trains the model here",
        }

    def retrain_policy(self):
        from gcmlm_assets.radiology.model_lifecycle import RetrainPolicy

        return RetrainPolicy(self.retrain_min_new_cases, self.retrain_min_growth_fraction)

    def training_settings(self):
        from gcmlm_assets.devices import resolve_device
        from gcmlm_assets.radiology.nnunet_training import TinyPlans, TrainingSettings

        return TrainingSettings(**{
            **values_of(self, NnunetTrainingFields),
            "device": resolve_device(self.device, "segmentation.device", gpu_step=True).name,
            "tiny_plans": TinyPlans() if self.tiny_plans else None,
            "intensity_samples": 1_000_000 if self.tiny_plans else None})

    def model_folder(self, store) -> Path | None:
        """The configured trained folder, else the one `current.json` points at, else None.

        Raises `ModelFolderError` (naming the folder and the problem) when the folder is not usable.
        Reads no checkpoint (the sensors call it every tick).
        """
        from gcmlm_assets.radiology.nnunet import (
            CURRENT_POINTER,
            ModelFolderError,
            find_trained_model_folder,
            read_current_model,
        )

        if self.trained_model_folder:
            return find_trained_model_folder(self.trained_model_folder)
        models_root = SEGMENTATION_MODEL.folder(store, create=False)
        pointer = read_current_model(models_root)
        if pointer is None:
            return None
        try:
            return find_trained_model_folder(models_root / pointer["folder"])
        except ModelFolderError as error:
            raise ModelFolderError(f"{models_root / CURRENT_POINTER} points at an unusable model: {error}") from error

    def pinned_model(self, store):
        """(model folder, the `CheckpointPins` its checkpoints must match before loading), or None.

        The pins come from `trained_model_sha256` for a configured folder, from `current.json`
        for a model installed here. Nothing is verified yet: `GastricSegmenter.load` does that.
        """
        from gcmlm_assets.radiology.nnunet import CheckpointPins, installed_model_pins, read_current_model

        folder = self.model_folder(store)
        if folder is None:
            return None
        if self.trained_model_folder:
            return folder, CheckpointPins.from_setting(self.trained_model_sha256)
        models_root = SEGMENTATION_MODEL.folder(store, create=False)
        return folder, installed_model_pins(models_root, read_current_model(models_root) or {})


def resources(env: str, profile: Profile = PRODUCTION) -> dict[str, dg.ConfigurableResource]:
    # The device is "auto" everywhere (a GPU pod uses its GPU); a trained folder can be given with
    # GCMLM_NNUNET_MODEL_FOLDER and its checkpoints' digests with GCMLM_NNUNET_MODEL_SHA256. The
    # profile's settings come last (the demo profile trains a tiny CPU model).
    segmentation = {"trained_model_folder": nnunet_model_folder(),
                    "trained_model_sha256": nnunet_model_sha256(),
                    **profile.resource_settings("segmentation")}
    return {
        "radiomics": RadiomicsSettings(**profile.resource_settings("radiomics")),
        "segmentation": SegmentationModelResource(**segmentation),
    }
