"""Trained nnU-Net v2 gastric models: checking and describing a model folder, installing a
freshly trained one, and predicting masks with it.

Plain Python (no Dagster). Prediction goes through nnU-Net's own `nnUNetPredictor`;
nothing shells out to its command-line tools. nnunet_training.py trains the models.

Checkpoints are read with torch's weights-only unpickler (`read_checkpoint`), never as full
pickles: the predictor is built from them with `manual_initialization`, because its
`initialize_from_trained_model_folder` would unpickle them in full. The SHA-256 pins stay the
outer guard: a checkpoint is opened only once its bytes are the ones pinned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcmlm_assets.radiology.checkpoint_pins import (
    CHECKPOINT,
    CheckpointHashError,
    CheckpointPins,
    ModelFolderError,
    available_folds,
)
from gcmlm_assets.storage import VERSION_POINTER, DigestMismatch, read_pinned_bytes, read_pointer, write_pointer

CONFIGURATION = "3d_fullres"
STOMACH_LABEL = "stomach"
# The installed model's pointer: the name every versioned output uses, with fields of its own
# (folder, checkpoint pins, the reference set it was trained on).
CURRENT_POINTER = VERSION_POINTER
TRAIN_TMP_PREFIX = ".tmp-train-"
DEVICES = ("cpu", "cuda", "mps")
# plans.json names Python objects that nnU-Net imports by dotted path (pydoc.locate) and calls:
# only these packages may be named, so a plans file cannot make it import other code.
PLANS_IMPORT_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    folder: Path
    dataset_name: str
    plans_name: str
    trainer: str
    configuration: str
    folds: tuple[str, ...]
    foreground_label: int
    checkpoint_sha256: str  # over the checkpoints of every fold used, in fold order
    checkpoint_sha256_by_fold: dict[str, str]  # fold -> digest of its checkpoint (what was verified)

    @property
    def model_id(self) -> str:
        folds = "+".join(self.folds)
        return (f"{self.dataset_name}__{self.trainer}__{self.plans_name}__{self.configuration}"
                f"__fold_{folds}__{self.checkpoint_sha256[:12]}")


def resolve_torch_device(device: str):
    """The torch device named `device`, refused when this machine lacks it (training and prediction)."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but it is not available")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------
# Trained model folders


def _candidate_model_folders(path: Path, depth: int = 2) -> list[Path]:
    found = []
    if (path / "plans.json").is_file():
        return [path]
    if depth == 0:
        return found
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(_candidate_model_folders(child, depth - 1))
    return found


def find_trained_model_folder(path: str | os.PathLike) -> Path:
    """The nnU-Net trained-model folder at `path` (or the single one below it, up to two levels).

    A trained-model folder holds `plans.json`, `dataset.json` and
    `fold_<f>/checkpoint_final.pth` for at least one fold; anything else raises
    `ModelFolderError` naming the folder and what is missing.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelFolderError(f"{path}: nnU-Net model folder does not exist or is not a folder")
    candidates = _candidate_model_folders(path)
    if not candidates:
        raise ModelFolderError(
            f"{path}: not an nnU-Net trained-model folder: expected plans.json, dataset.json and "
            f"fold_<f>/{CHECKPOINT} (e.g. nnUNet_results/Dataset501_GastricCT/nnUNetTrainer__nnUNetPlans__3d_fullres)")
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(path)) for c in candidates[:6])
        raise ModelFolderError(f"{path}: holds several nnU-Net model folders ({names}); point at one of them")
    folder = candidates[0]
    problems = []
    for name in ("plans.json", "dataset.json"):
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problems.append(f"{name} is not valid JSON ({error})")
    if not available_folds(folder):
        present = sorted(p.name for p in folder.glob("fold_*")) or ["no fold_* folder"]
        problems.append(f"no fold_<f>/{CHECKPOINT} (found: {', '.join(present)}); training may be unfinished")
    if problems:
        raise ModelFolderError(f"{folder}: not a usable nnU-Net trained-model folder: " + "; ".join(problems))
    return folder


def describe_model_folder(path: str | os.PathLike, pins: CheckpointPins) -> ModelDescription:
    """Validate a trained-model folder and say what it is (its id hashes the checkpoints).

    Its checkpoints must match `pins` (CheckpointHashError otherwise) before one is unpickled.
    """
    folder = find_trained_model_folder(path)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise ModelFolderError(f"{folder / 'dataset.json'}: the model takes {len(channels)} input channels "
                               f"({channels}); a gastric CT model takes exactly one")
    labels = dataset.get("labels") or {}
    foreground = {name: value for name, value in labels.items() if name != "background"}
    if STOMACH_LABEL in foreground:
        label = foreground[STOMACH_LABEL]
    elif len(foreground) == 1:
        label = next(iter(foreground.values()))
    else:
        raise ModelFolderError(f"{folder / 'dataset.json'}: cannot tell which label is the stomach among "
                               f"{sorted(labels)} (expected a label named '{STOMACH_LABEL}' or a single "
                               "foreground label)")
    if not isinstance(label, int):
        raise ModelFolderError(f"{folder / 'dataset.json'}: region-based label {label!r} is not supported")
    _refuse_foreign_imports(folder / "plans.json", plans)
    # The JSON files above are only parsed; the checkpoints are verified before the first unpickling.
    verified = pins.verify(folder)
    folds = tuple(verified)
    digest = hashlib.sha256()
    for fold in folds:
        digest.update(verified[fold].encode())
    trainer, configuration = _checkpoint_identity(folder / f"fold_{folds[0]}" / CHECKPOINT)
    return ModelDescription(
        folder=folder,
        dataset_name=str(plans.get("dataset_name", "unknown")),
        plans_name=str(plans.get("plans_name", "unknown")),
        trainer=trainer,
        configuration=configuration,
        folds=folds,
        foreground_label=int(label),
        checkpoint_sha256=digest.hexdigest(),
        checkpoint_sha256_by_fold=verified,
    )


def _refuse_foreign_imports(plans_file: Path, plans: dict) -> None:
    """Refuse a plans file whose network class or `_kw_requires_import` entries lie outside
    PLANS_IMPORT_PREFIXES (nnU-Net would import and call whatever they name)."""
    for name, configuration in (plans.get("configurations") or {}).items():
        architecture = configuration.get("architecture") if isinstance(configuration, dict) else None
        if not isinstance(architecture, dict):
            continue
        kwargs = architecture.get("arch_kwargs") or {}
        named = {"network_class_name": architecture.get("network_class_name")}
        named.update({key: kwargs.get(key) for key in architecture.get("_kw_requires_import") or ()})
        for key, value in named.items():
            if value is not None and not _importable_from_allowed(value):
                raise ModelFolderError(
                    f"{plans_file}: configuration {name!r} names {key}={value!r}, outside "
                    f"{', '.join(PLANS_IMPORT_PREFIXES)}; nnU-Net would import and call it, so the model is refused")


def _importable_from_allowed(value) -> bool:
    """The dotted path starts with an allowed prefix AND the object it reaches is defined there: a path
    can walk through a module's globals (`torch.nn.modules.module.torch.load` reaches `torch.load`)."""
    if not (isinstance(value, str) and value.startswith(PLANS_IMPORT_PREFIXES)):
        return False
    import pydoc

    located = pydoc.locate(value)  # imports the modules on the path, as nnU-Net would; calls nothing
    if located is None:
        return False
    home = getattr(located, "__module__", None) if not isinstance(located, type(pydoc)) else located.__name__
    return isinstance(home, str) and (home + ".").startswith(PLANS_IMPORT_PREFIXES)


def _checkpoint_globals() -> list:
    """What torch's weights-only unpickler must accept beyond tensors and plain containers to read an
    nnU-Net v2 checkpoint: numpy scalars (its training log and EMA Dice are numpy floats), i.e. the
    function that rebuilds a scalar from its bytes, `numpy.dtype` and the numeric dtype classes.
    None of them runs code or imports anything. `numpy.core...` is the same function's name in
    checkpoints written under numpy 1."""
    import numpy

    scalar = numpy._core.multiarray.scalar
    dtype_classes = [type(numpy.dtype(code)) for code in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
                                                          "f2", "f4", "f8")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), numpy.dtype, *dtype_classes]


def read_checkpoint(checkpoint: Path, *, mmap: bool = False, sha256: str | None = None) -> dict:
    """An nnU-Net checkpoint's dict, read by torch's weights-only unpickler (tensors, plain values,
    numpy scalars; a pickle naming anything else is refused before it runs). `mmap` maps the tensors
    instead of reading them (for a look at the small header entries). With `sha256` (its pin), the
    file is read once, its bytes checked against the pin and unpickled from memory, so a file swapped
    after the pins were verified cannot be what is loaded. Raises ModelFolderError."""
    import io

    import torch

    source = checkpoint
    if sha256 is not None:
        try:
            data = read_pinned_bytes(checkpoint, sha256)
        except DigestMismatch as mismatch:
            raise CheckpointHashError(f"{checkpoint}: SHA-256 mismatch: expected {sha256}, found {mismatch.found} (it "
                                      "changed after its pins were verified); nothing was loaded") from None
        source, mmap = io.BytesIO(data), False
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            try:
                state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # a checkpoint in torch's legacy (non-zip) format cannot be mapped
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long and advises allowlisting the object or a full unpickling: keep the reason.
        reason = str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(error)
        reason = reason.split(" was not an allowed global")[0]
        raise ModelFolderError(f"{checkpoint}: refused by torch's weights-only loader: it holds Python objects "
                               f"an nnU-Net checkpoint does not ({reason}); nothing of it was run") from error
    except Exception as error:
        raise ModelFolderError(
            f"{checkpoint}: not a readable nnU-Net checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise ModelFolderError(f"{checkpoint}: not an nnU-Net checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def _checkpoint_identity(checkpoint: Path) -> tuple[str, str]:
    """Trainer class and configuration that nnU-Net recorded in a checkpoint (verified by the caller)."""
    state = read_checkpoint(checkpoint, mmap=True)  # mapped: only the small header entries are read
    try:
        return str(state["trainer_name"]), str(state["init_args"]["configuration"])
    except (KeyError, TypeError) as error:
        raise ModelFolderError(f"{checkpoint}: not an nnU-Net checkpoint (no {error} entry)") from error


def read_current_model(models_root: Path) -> dict | None:
    """The `current.json` pointer of an artifact folder of trained models, or None."""
    pointer = read_pointer(models_root)
    return pointer if pointer is not None and pointer.get("folder") else None


def install_trained_model(trained_folder: Path, models_root: Path,
                          pointer_extra: dict | None = None) -> ModelDescription:
    """Move a freshly trained folder to `<models_root>/<model_id>/` and point `current.json` at it.

    `trained_folder` must be on the same filesystem (train inside `models_root`):
    the rename is atomic, and `current.json` is replaced atomically after it, so a
    reader sees either the previous model or the complete new one. `current.json` records each
    checkpoint's SHA-256: every later load verifies the installed files against it.
    """
    fresh = CheckpointPins.of_fresh_training(Path(trained_folder))
    description = describe_model_folder(trained_folder, fresh)
    final = Path(models_root) / description.model_id
    if final.exists() and _same_checkpoints(final, description.checkpoint_sha256_by_fold):
        # Same checkpoint hash: the identical model is already installed.
        shutil.rmtree(trained_folder)
    else:
        if final.exists():
            # A folder of that name whose checkpoints were changed since: replaced, never reused.
            stale = final.with_name(f"{TRAIN_TMP_PREFIX}stale-{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(trained_folder, final)
    installed = describe_model_folder(final, CheckpointPins(description.checkpoint_sha256_by_fold,
                                                            f"training output {trained_folder}", ""))
    pointer = {"model_id": installed.model_id, "folder": installed.model_id,
               "checkpoint_sha256": installed.checkpoint_sha256,
               "checkpoint_sha256_by_fold": installed.checkpoint_sha256_by_fold, **(pointer_extra or {})}
    write_pointer(models_root, pointer)
    return installed


def _same_checkpoints(folder: Path, digests: dict[str, str]) -> bool:
    try:
        return CheckpointPins(digests, "", "").verify(folder) == digests
    except (CheckpointHashError, OSError):
        return False


def installed_model_pins(models_root: Path, pointer: dict) -> CheckpointPins:
    """The digests `current.json` recorded when the model it points at was installed."""
    return CheckpointPins.from_install(Path(models_root) / CURRENT_POINTER, pointer.get("checkpoint_sha256_by_fold"))


# ---------------------------------------------------------------------------------------------
# Prediction


class GastricSegmenter:
    """A trained nnU-Net loaded once; `predict` maps a CT to its gastric mask on the same grid."""

    def __init__(self, predictor, description: ModelDescription, device: str):
        self._predictor = predictor
        self.description = description
        self.device = device

    @property
    def model_id(self) -> str:
        return self.description.model_id

    @property
    def model_folder(self) -> Path:
        return self.description.folder

    @classmethod
    def load(cls, model_folder: Path, device: str = "cpu", *, pins: CheckpointPins, use_mirroring: bool = True,
             tile_step_size: float = 0.5) -> GastricSegmenter:
        """Load the model once its checkpoints match `pins`, each read with torch's weights-only unpickler."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        description = describe_model_folder(model_folder, pins)
        torch_device = resolve_torch_device(device)
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        weights, mirroring_axes = [], None
        for index, fold in enumerate(description.folds):
            checkpoint = description.folder / f"fold_{fold}" / CHECKPOINT
            state = read_checkpoint(checkpoint, sha256=description.checkpoint_sha256_by_fold[fold])
            if "network_weights" not in state:
                raise ModelFolderError(f"{checkpoint}: not an nnU-Net checkpoint (no 'network_weights' entry)")
            if index == 0:
                mirroring_axes = state.get("inference_allowed_mirroring_axes")
            weights.append(state["network_weights"])  # the optimiser state and training log are dropped
        try:
            _initialize_predictor(predictor, description, weights, mirroring_axes)
        except Exception as error:
            raise ModelFolderError(f"{description.folder}: nnU-Net could not load the model "
                                   f"({type(error).__name__}: {error})") from error
        return cls(predictor, description, device)

    def predict(self, image: sitk.Image) -> sitk.Image:
        """uint8 0/1 mask with exactly `image`'s size, spacing, origin and direction."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"expected a 3-D single-channel CT, got {image.GetDimension()}-D with "
                             f"{image.GetNumberOfComponentsPerPixel()} component(s)")
        # The training CTs were canonical LPS (identity direction) and nnU-Net works on array
        # axes: present every input in that orientation, then undo it on the mask.
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        oriented = sitk.DICOMOrient(image, "LPS") if orientation != "LPS" else image
        volume = sitk.GetArrayFromImage(oriented).astype(np.float32)[None]  # (1, z, y, x)
        # SimpleITK's spacing is (x, y, z); nnU-Net wants it in array order (z, y, x).
        properties = {"spacing": [float(s) for s in oriented.GetSpacing()[::-1]]}
        labels = self._predictor.predict_single_npy_array(volume, properties, None, None, False)
        labels = np.asarray(labels)
        if labels.shape != volume.shape[1:]:
            raise RuntimeError(f"nnU-Net returned a {labels.shape} prediction for a {volume.shape[1:]} image")
        mask = sitk.GetImageFromArray((labels == self.description.foreground_label).astype(np.uint8))
        mask.CopyInformation(oriented)
        if oriented is not image:
            mask = sitk.DICOMOrient(mask, orientation)
        if mask.GetSize() != image.GetSize():
            raise RuntimeError(f"mask size {mask.GetSize()} differs from image size {image.GetSize()}")
        # Reorienting back is a pure permutation/flip; copy the header so the grid is bit-identical.
        mask.CopyInformation(image)
        return mask


def _initialize_predictor(predictor, description: ModelDescription, weights: list[dict],
                          mirroring_axes: tuple[int, ...] | None) -> None:
    """Give `predictor` the network of `description`'s plans with the checkpoints' `weights` (one set per
    fold), as its `initialize_from_trained_model_folder` would, without letting it unpickle anything."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(json.loads((description.folder / "plans.json").read_text(encoding="utf-8")))
    dataset = json.loads((description.folder / "dataset.json").read_text(encoding="utf-8"))
    configuration = plans.get_configuration(description.configuration)
    trainer_class = recursive_find_trainer_class_by_name(description.trainer)
    network = trainer_class.build_network_architecture(
        plans, configuration, determine_num_input_channels(plans, configuration, dataset),
        plans.get_label_manager(dataset).num_segmentation_heads, enable_deep_supervision=False)
    # The predictor loads each fold's weights before predicting; loading the first here makes weights
    # that do not fit the plans fail now, at load time.
    network.load_state_dict(weights[0])
    predictor.manual_initialization(network, plans, configuration, weights, dataset, description.trainer,
                                    mirroring_axes)
