"""Training an nnU-Net v2 gastric model: dataset assembly, planning, preprocessing, training.

Plain Python (no Dagster). Everything goes through nnU-Net's own Python API
(fingerprint extraction, experiment planning, preprocessing, trainer); nothing
shells out to its command-line tools. nnunet.py installs the trained folder,
describes it and predicts with it.

nnU-Net finds its folders through the environment variables `nnUNet_raw`,
`nnUNet_preprocessed` and `nnUNet_results`, read each time they are used.
`nnunet_folders(work_dir)` sets them to folders inside one work directory only
for the duration of a `with` block and restores the previous values after, so
two trainings never share folders and nothing leaks into the rest of the process.

Tiny plans (for tests and the CPU demo): after nnU-Net has planned the dataset,
`shrink_plans` keeps only the `3d_fullres` configuration, cuts the U-Net to
`TinyPlans.n_stages` stages with `base_features * 2**i` features (capped at
`max_features`), clips the patch size to `max_patch_size` (z, y, x; rounded
down to what the remaining poolings divide) and sets the batch size. The result
is saved as its own plans identifier (`<plans>_tiny`, data identifier
`<plans>_tiny_3d_fullres`) before preprocessing, so the model folder and the
model id say that a tiny network was trained.

Progress: the training functions take `progress`, a callable that receives one
line per phase (planning, preprocessing) and per epoch; nnU-Net's own printing
is not redirected here (the caller decides where standard output goes).

Seeded: the same cases and settings (`TrainingSettings.seed` included) give the same
checkpoint, byte for byte (nnunet_seeding.py says how).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.scans import SEPARATOR
from gcmlm_assets.settings import scoped_environment
from gcmlm_assets.radiology import nnunet_seeding
from gcmlm_assets.radiology.nnunet import CONFIGURATION, STOMACH_LABEL, resolve_torch_device
from gcmlm_assets.radiology.nnunet_settings import NnunetTrainingFields

CHANNEL_NAME = "CT"
FILE_ENDING = ".nii.gz"
# Same-grid test for an image and its label (fraction of a voxel / direction cosine).
GRID_TOLERANCE = 1e-4
_NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class TrainingDataError(ValueError):
    """A training case that nnU-Net cannot use; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class TrainingCase:
    """One labelled CT: `mask` must lie on exactly the grid of `image` (any non-zero voxel is stomach)."""

    case_id: str
    image: Path
    mask: Path


@dataclasses.dataclass(frozen=True)
class TinyPlans:
    """How far `shrink_plans` cuts the planned U-Net (see the module docstring)."""

    n_stages: int = 4
    base_features: int = 4
    max_features: int = 32
    max_patch_size: tuple[int, int, int] = (32, 64, 64)  # z, y, x in voxels
    batch_size: int = 2


@dataclasses.dataclass(frozen=True)
class TrainingSettings(NnunetTrainingFields):
    """What to train: the user's settings (NnunetTrainingFields) with `device` resolved to the one
    that trains (cpu, cuda or mps) and `tiny_plans` the sizes that `shrink_plans` cuts to (None: nnU-Net's
    own plans). `None` keeps nnU-Net's own default (1000 epochs of 250 + 50 iterations)."""

    tiny_plans: TinyPlans | None = None  # in NnunetTrainingFields' place: as_dict() keeps its order
    # Foreground intensities the dataset fingerprint samples (nnU-Net: 1e8 over the dataset,
    # i.e. hundreds of MB for a handful of small cases); None keeps nnU-Net's number.
    intensity_samples: int | None = None
    # Seeds the weights' initialisation, the patch sampling and the augmentation (module docstring).
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NnunetFolders:
    raw: Path
    preprocessed: Path
    results: Path


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    model_folder: Path  # the nnU-Net results folder: plans.json, dataset.json, fold_<f>/checkpoint_final.pth
    dataset_name: str
    plans_name: str
    trainer: str
    fold: str
    n_cases: int
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    metrics: dict  # final train/val loss, pseudo Dice (nnU-Net's online validation)
    seconds: dict  # wall time of each phase
    cpu_seconds: float


def dataset_name(dataset_id: int) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset id must be 1..999, got {dataset_id}")
    return f"Dataset{int(dataset_id):03d}_GastricCT"


@contextlib.contextmanager
def nnunet_folders(work_dir: Path) -> Iterator[NnunetFolders]:
    """Point nnU-Net at `<work_dir>/nnUNet_{raw,preprocessed,results}` for the block only."""
    work_dir = Path(work_dir)
    folders = NnunetFolders(work_dir / "nnUNet_raw", work_dir / "nnUNet_preprocessed", work_dir / "nnUNet_results")
    for path in (folders.raw, folders.preprocessed, folders.results):
        path.mkdir(parents=True, exist_ok=True)
    with scoped_environment(dict(zip(_NNUNET_ENV, (str(folders.raw), str(folders.preprocessed),
                                                    str(folders.results))))):
        yield folders


# ---------------------------------------------------------------------------------------------
# Dataset assembly


def _grid(reader_or_image) -> tuple:
    return (tuple(reader_or_image.GetSize()), np.array(reader_or_image.GetSpacing()),
            np.array(reader_or_image.GetOrigin()), np.array(reader_or_image.GetDirection()))


def _image_header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise TrainingDataError(f"{path}: cannot read the image header ({str(error).strip().splitlines()[-1]})")
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise TrainingDataError(f"{path}: expected a 3-D single-channel CT, found {reader.GetDimension()}-D with "
                                f"{reader.GetNumberOfComponents()} component(s)")
    return reader


def _label_on_image_grid(case: TrainingCase, header: sitk.ImageFileReader) -> sitk.Image:
    try:
        mask = sitk.ReadImage(str(case.mask))
    except RuntimeError as error:
        raise TrainingDataError(f"{case.mask}: cannot read the mask ({str(error).strip().splitlines()[-1]})")
    size, spacing, origin, direction = _grid(header)
    m_size, m_spacing, m_origin, m_direction = _grid(mask)
    if (m_size != size or not np.allclose(m_spacing, spacing, rtol=GRID_TOLERANCE, atol=0)
            or np.abs(m_origin - origin).max() > GRID_TOLERANCE * spacing.min()
            or not np.allclose(m_direction, direction, atol=GRID_TOLERANCE)):
        raise TrainingDataError(
            f"{case.mask}: mask grid (size {m_size}, spacing {tuple(m_spacing)}, origin {tuple(m_origin)}) differs "
            f"from its CT {case.image} (size {size}, spacing {tuple(spacing)}, origin {tuple(origin)}); "
            f"resample the mask onto the CT first")
    label = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(label).any():
        raise TrainingDataError(f"{case.mask}: mask is empty (no stomach voxel)")
    # nnU-Net compares image and label headers exactly: give the label the CT's own geometry.
    label.SetSpacing(header.GetSpacing())
    label.SetOrigin(header.GetOrigin())
    label.SetDirection(header.GetDirection())
    return label


# What a case's `@` (scan keys: `<patient>@<timepoint>`, gcmlm_assets/scans.py) becomes in its nnU-Net
# file names, which keep to [A-Za-z0-9._-]: no patient id holds `..` and no timepoint name a `.`, so
# the ids stay distinct and the last `..` of one splits it back (`case_of_nnunet_id`).
NNUNET_SEPARATOR = ".."


def nnunet_case_id(case_id: str) -> str:
    """The case's identifier in nnU-Net's dataset (its file names): a patient id unchanged."""
    return case_id.replace(SEPARATOR, NNUNET_SEPARATOR)


def case_of_nnunet_id(nnunet_id: str) -> str:
    """The case id (scan key) an nnU-Net identifier was made from (`nnunet_case_id` reversed)."""
    head, separator, timepoint = nnunet_id.rpartition(NNUNET_SEPARATOR)
    return f"{head}{SEPARATOR}{timepoint}" if separator else nnunet_id


def write_raw_dataset(cases: Sequence[TrainingCase], raw_root: Path, dataset_id: int) -> Path:
    """Write `<raw_root>/DatasetNNN_GastricCT/` (imagesTr, labelsTr, dataset.json); return that folder.
    Each case is named `nnunet_case_id(case.case_id)` there."""
    if len(cases) < 2:
        raise TrainingDataError(f"nnU-Net needs at least 2 training cases, got {len(cases)}")
    ids = [nnunet_case_id(case.case_id) for case in cases]
    if len(set(ids)) != len(ids):
        raise TrainingDataError(f"duplicate case ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    folder = Path(raw_root) / dataset_name(dataset_id)
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    listing = {}
    for case, name in zip(cases, ids):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise TrainingDataError(f"case id {case.case_id!r} is not usable as an nnU-Net file name")
        header = _image_header(case.image)
        label = _label_on_image_grid(case, header)
        image_file = images_dir / f"{name}_0000{FILE_ENDING}"
        label_file = labels_dir / f"{name}{FILE_ENDING}"
        if "".join(Path(case.image).suffixes[-2:]) == FILE_ENDING:
            shutil.copyfile(case.image, image_file)
        else:
            sitk.WriteImage(sitk.ReadImage(str(case.image)), str(image_file), True)
        sitk.WriteImage(label, str(label_file), True)
        listing[name] = {"images": [f"imagesTr/{image_file.name}"], "label": f"labelsTr/{label_file.name}"}
    dataset_json = {
        "channel_names": {"0": CHANNEL_NAME},  # "CT" selects nnU-Net's CT intensity normalisation
        "labels": {"background": 0, STOMACH_LABEL: 1},
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
        # An explicit case listing: nnU-Net otherwise discovers the cases with a 12-process pool.
        "dataset": listing,
        "description": "Gastric (stomach) masks on CT, assembled by gcmlm_assets",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# Planning and preprocessing


def shrink_plans(plans: dict, tiny: TinyPlans, configuration: str = CONFIGURATION) -> dict:
    """A copy of `plans` with one small `configuration` saved under `<plans>_tiny` (see module docstring)."""
    plans = copy.deepcopy(plans)
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    planned_stages = int(arch["n_stages"])
    n_stages = max(2, min(tiny.n_stages, planned_stages))
    # Per-stage lists (kernel sizes, strides, convolutions or blocks per stage) have n_stages
    # entries, the decoder's n_stages - 1: cut both to the new depth.
    for key, value in list(arch.items()):
        if isinstance(value, (list, tuple)) and key != "features_per_stage":
            if len(value) == planned_stages:
                arch[key] = list(value[:n_stages])
            elif len(value) == planned_stages - 1:
                arch[key] = list(value[:n_stages - 1])
    arch["n_stages"] = n_stages
    arch["features_per_stage"] = [min(tiny.max_features, tiny.base_features * 2 ** i) for i in range(n_stages)]
    divisor = np.prod(np.array(arch["strides"], dtype=int), axis=0)
    config["patch_size"] = [int(max(d, (min(p, m) // d) * d))
                            for p, m, d in zip(config["patch_size"], tiny.max_patch_size, divisor)]
    config["batch_size"] = int(tiny.batch_size)
    plans_name = f"{plans['plans_name']}_tiny"
    config["data_identifier"] = f"{plans_name}_{configuration}"
    config.pop("next_stage", None)
    plans["plans_name"] = plans_name
    plans["configurations"] = {configuration: config}
    return plans


def plan_and_preprocess(folders: NnunetFolders, settings: TrainingSettings,
                        progress: Callable[[str], None] = lambda line: None) -> str:
    """Fingerprint, plan and preprocess `3d_fullres` (inside `nnunet_folders`); return the plans identifier."""
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    planner_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                                                settings.planner, current_module="nnunetv2.experiment_planning")
    if planner_class is None:
        raise ValueError(f"unknown nnU-Net experiment planner {settings.planner!r}")
    workers = max(1, int(settings.preprocessing_workers))
    start = time.perf_counter()
    # The dataset was checked while it was written (write_raw_dataset), so nnU-Net's own
    # integrity check, another process pool, is not run.
    extractor = DatasetFingerprintExtractor(settings.dataset_id, workers, verbose=False)
    extractor.show_progress_bar = False
    if settings.intensity_samples is not None:
        extractor.num_foreground_voxels_for_intensitystats = int(settings.intensity_samples)
    extractor.run(overwrite_existing=True)
    plans, plans_identifier = plan_experiment_dataset(settings.dataset_id, planner_class)
    if CONFIGURATION not in plans["configurations"]:
        raise TrainingDataError(f"nnU-Net planned no {CONFIGURATION} configuration for these cases "
                                f"(are they 2-D?): {sorted(plans['configurations'])}")
    if settings.tiny_plans is not None:
        tiny = shrink_plans(load_json(str(folders.preprocessed / dataset_name(settings.dataset_id)
                                          / f"{plans_identifier}.json")), settings.tiny_plans)
        plans_identifier = tiny["plans_name"]
        save_json(tiny, str(folders.preprocessed / dataset_name(settings.dataset_id) / f"{plans_identifier}.json"),
                  sort_keys=False)
    config = load_json(str(folders.preprocessed / dataset_name(settings.dataset_id)
                           / f"{plans_identifier}.json"))["configurations"][CONFIGURATION]
    progress(f"planning: fingerprint and {plans_identifier} {CONFIGURATION} plans (patch {config['patch_size']}, "
             f"batch {config['batch_size']}, spacing {config['spacing']} mm), {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    preprocess_dataset(settings.dataset_id, plans_identifier, configurations=(CONFIGURATION,),
                       num_processes=(workers,), verbose=False, show_progress_bar=False)
    progress(f"preprocessing: {CONFIGURATION} with {workers} process(es), {time.perf_counter() - start:.1f} s")
    return plans_identifier


# ---------------------------------------------------------------------------------------------
# Training


def _parse_fold(fold: str | int) -> str | int:
    if str(fold) == "all":
        return "all"
    if str(fold).isdigit():
        return int(fold)
    raise ValueError(f"fold must be 'all' or a non-negative integer, got {fold!r}")


def _epoch_line(trainer) -> str:
    """One finished epoch, from the values nnU-Net's trainer logged for it (its `logger`)."""
    logged = trainer.logger

    def latest(key: str) -> float:
        return float(np.asarray(logged.get_value(key, step=-1)).mean())

    seconds = latest("epoch_end_timestamps") - latest("epoch_start_timestamps")
    # on_epoch_end has already advanced current_epoch past the epoch it ended.
    return (f"epoch {trainer.current_epoch}/{trainer.num_epochs}: train loss {latest('train_losses'):.4f}, "
            f"val loss {latest('val_losses'):.4f}, pseudo Dice {latest('mean_fg_dice'):.4f}, {seconds:.1f} s")


def _report_epochs(trainer, progress: Callable[[str], None]) -> None:
    """Call `progress` after each epoch of this trainer object (its own attribute, nothing global)."""
    end_epoch = trainer.on_epoch_end

    def on_epoch_end() -> None:
        end_epoch()
        progress(_epoch_line(trainer))

    trainer.on_epoch_end = on_epoch_end


def _refuse_full_unpickling(trainer) -> None:
    """Training always starts fresh: nothing may load a checkpoint through the trainer, whose
    `load_checkpoint` unpickles in full, running whatever the pickle names. Checkpoints are read by
    `nnunet.read_checkpoint` only."""
    def load_checkpoint(filename_or_checkpoint) -> None:
        raise RuntimeError(f"{filename_or_checkpoint}: nnU-Net's trainer would unpickle this checkpoint in full; "
                           "training here starts fresh and loads no checkpoint")

    trainer.load_checkpoint = load_checkpoint


def train_model(plans_identifier: str, settings: TrainingSettings, n_cases: int,
                progress: Callable[[str], None] = lambda line: None) -> TrainingResult:
    """Train `3d_fullres` with nnU-Net's trainer (inside `nnunet_folders`); `progress` gets a line per epoch."""
    from nnunetv2.run.run_training import get_trainer_from_args

    fold = _parse_fold(settings.fold)
    if fold != "all" and n_cases < 5:
        raise TrainingDataError(f"fold {fold} needs nnU-Net's 5-fold split, i.e. at least 5 cases; "
                                f"got {n_cases}: use fold 'all'")
    device = resolve_torch_device(settings.device)
    # continue_training=False: a fresh training (nnU-Net 2.8 reads it from the plans).
    trainer = get_trainer_from_args(dataset_name(settings.dataset_id), CONFIGURATION, fold, settings.trainer,
                                    plans_identifier, False, device=device)
    # Set before run_training: the optimiser's learning-rate schedule is built from num_epochs.
    if settings.epochs is not None:
        trainer.num_epochs = int(settings.epochs)
    if settings.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = int(settings.iterations_per_epoch)
    if settings.val_iterations is not None:
        trainer.num_val_iterations_per_epoch = int(settings.val_iterations)
    _report_epochs(trainer, progress)
    _refuse_full_unpickling(trainer)
    nnunet_seeding.seed_dataloaders(trainer, settings.seed)
    nnunet_seeding.clockless_checkpoints(trainer)
    progress(f"training: {trainer.num_epochs} epochs of {trainer.num_iterations_per_epoch} + "
             f"{trainer.num_val_iterations_per_epoch} iterations, {type(trainer).__name__} on {device}, "
             f"seed {settings.seed}")
    # Only around training: nnU-Net's planner also reads nnUNet_n_proc_DA, as a torch thread count.
    augmentation = ({} if settings.augmentation_workers is None
                    else {"nnUNet_n_proc_DA": str(int(settings.augmentation_workers))})
    with scoped_environment(augmentation), nnunet_seeding.seeded(settings.seed):
        trainer.run_training()

    def last(key: str) -> float | None:
        values = trainer.logger.get_value(key, step=None)
        return float(np.asarray(values[-1]).mean()) if len(values) else None

    metrics = {
        "final_train_loss": last("train_losses"),
        "final_val_loss": last("val_losses"),
        "final_pseudo_dice": last("mean_fg_dice"),
        "final_ema_pseudo_dice": last("ema_fg_dice"),
    }
    return TrainingResult(
        model_folder=Path(trainer.output_folder_base),
        dataset_name=dataset_name(settings.dataset_id),
        plans_name=plans_identifier,
        trainer=type(trainer).__name__,
        fold=str(fold),
        n_cases=n_cases,
        epochs=int(trainer.num_epochs),
        iterations_per_epoch=int(trainer.num_iterations_per_epoch),
        val_iterations=int(trainer.num_val_iterations_per_epoch),
        metrics=metrics,
        seconds={},
        cpu_seconds=0.0,
    )


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished (reaped) worker processes, user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def train_segmentation_model(cases: Sequence[TrainingCase], work_dir: Path, settings: TrainingSettings,
                             progress: Callable[[str], None] = lambda line: None) -> TrainingResult:
    """Assemble the dataset, plan, preprocess and train; the model lands in `<work_dir>/nnUNet_results/`.

    `progress` receives one line per phase and per epoch (module docstring).
    """
    wall, cpu = time.perf_counter(), _cpu_seconds()
    seconds = {}
    with nnunet_folders(work_dir) as folders, _torch_threads(settings.torch_threads):
        start = time.perf_counter()
        write_raw_dataset(cases, folders.raw, settings.dataset_id)
        seconds["dataset"] = time.perf_counter() - start
        progress(f"dataset: {len(cases)} cases written as {dataset_name(settings.dataset_id)}, "
                 f"{seconds['dataset']:.1f} s")
        start = time.perf_counter()
        plans_identifier = plan_and_preprocess(folders, settings, progress)
        seconds["plan_and_preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        result = train_model(plans_identifier, settings, len(cases), progress)
        seconds["train"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - wall
    cpu_seconds = _cpu_seconds() - cpu
    return dataclasses.replace(result, seconds={k: round(v, 2) for k, v in seconds.items()},
                               cpu_seconds=round(cpu_seconds, 2))
