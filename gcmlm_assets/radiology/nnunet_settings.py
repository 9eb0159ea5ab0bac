"""How nnU-Net trains the gastric model: the settings a user sets, declared once.

Plain Python (no Dagster, nothing heavy imported). The `segmentation` resource
(SegmentationModelResource) inherits these fields as they are, and nnunet_training.TrainingSettings
derives from them, with `device` resolved and `tiny_plans` turned into the plans' sizes.
`None` keeps nnU-Net's own choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gcmlm_assets.setting_fields import setting


@dataclass(frozen=True)
class NnunetTrainingFields:
    dataset_id: Annotated[int, setting("nnU-Net dataset id: the dataset is `DatasetNNN_GastricCT`.")] = 501
    trainer: Annotated[str, setting(
        "nnU-Net trainer class name (the demo profile: nnUNetTrainerAdam).")] = "nnUNetTrainer"
    planner: Annotated[str, setting("nnU-Net experiment planner class name.")] = "ExperimentPlanner"
    epochs: Annotated[int | None, setting(
        "Training epochs; empty keeps nnU-Net's 1000. With full-size plans that is a day or more on a GPU "
        "and refused on a CPU: for a quick model set a few epochs with tiny_plans=true (the demo profile: 30).")] = None
    iterations_per_epoch: Annotated[int | None, setting(
        "Training iterations per epoch; empty keeps nnU-Net's 250 (the demo profile: 15). Full-size "
        "plans on a CPU are refused above 1000 iterations in all.")] = None
    val_iterations: Annotated[int | None, setting("Validation iterations per epoch; empty: 50.")] = None
    fold: Annotated[str, setting(
        "`all` trains on every case; `0`..`4` a 5-fold split (at least 5 cases).")] = "all"
    device: Annotated[str, setting(
        "auto (CUDA where the process sees a GPU, else CPU) | cuda | cpu | mps, for training and "
        "prediction. Full-size training on a CPU is refused: set tiny_plans=true with a few epochs, or use "
        "trained_model_folder.")] = "auto"
    tiny_plans: Annotated[bool, setting(
        "false (production): nnU-Net's full-size 3d_fullres U-Net, made for a GPU (a day or more of "
        "training; refused on a CPU). true: shrink the plans to a tiny U-Net (4 stages, 4..32 features, patch "
        "at most 32x64x64) that a CPU trains in minutes, as GCMLM_PROFILE=demo does.")] = False
    preprocessing_workers: Annotated[int, setting("nnU-Net fingerprint/preprocessing processes.")] = 2
    augmentation_workers: Annotated[int | None, setting(
        "nnU-Net data-augmentation processes (nnUNet_n_proc_DA); 0: in-process.")] = None
    torch_threads: Annotated[int | None, setting("Torch CPU threads while training; empty: torch's own.")] = None
