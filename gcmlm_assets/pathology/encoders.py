"""Patch encoders: a name -> spec registry, built from local weights only.

Nothing here downloads: every architecture is built with `pretrained=False`
and weights come from a local checkpoint file (`pytorch_model.bin` loaded with
`torch.load(weights_only=True)`, or `.safetensors`), loaded strictly. Encoders
that may run without weights (the test/demo encoder, and CLAM's ResNet-50
baseline when no ImageNet checkpoint is configured) are random-initialised
from a fixed seed and say so (`untrained=True`, `checkpoint_sha256="untrained"`).
An encoder whose features only mean something with its weights (it names a checkpoint
setting) runs on random weights only when the caller allows it (the demo profile does):
elsewhere a missing checkpoint is an error, never a silent random encoder.

Every encoder takes RGB patches resized to `input_size` (antialiased bilinear,
as PIL/torchvision `Resize` does) and normalised with `mean`/`std`; the
extractor (`extract.py`) applies that transform in batch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcmlm_assets import settings
from gcmlm_assets.lazy import lazy

# torch when an encoder is built or loaded, not when the registry is read (the landing sensor asks
# it every tick whether the configured encoder has its weights).
torch = lazy("torch")
nn = lazy("torch.nn")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNTRAINED = "untrained"
# Seed of the random initialisation of encoders that run without weights: a
# fixed seed makes their features reproducible (and so reusable) across runs.
RANDOM_INIT_SEED = 0


class EncoderError(RuntimeError):
    """An encoder cannot be built: unknown name, missing or mismatched weights."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    embedding_dim: int
    build: Callable[[], nn.Module]
    description: str
    # Loads a state dict into the built module (`assign`: adopt the tensors
    # rather than copy them); raises on any key or shape mismatch.
    load_weights: Callable[[nn.Module, Mapping[str, torch.Tensor], bool], None]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    requires_checkpoint: bool = False
    # Environment variable that names the checkpoint when the resource leaves it empty.
    checkpoint_env: str | None = None


@dataclass
class LoadedEncoder:
    """A built encoder in eval mode plus what identifies its weights."""

    spec: EncoderSpec
    module: nn.Module
    checkpoint: Path | None
    checkpoint_sha256: str  # file digest, or "untrained"
    weights_sha256: str  # digest of the parameters actually in the module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    @property
    def untrained(self) -> bool:
        return self.checkpoint is None

    def identity(self) -> dict[str, Any]:
        """What downstream metadata and fingerprints record about this encoder."""
        return {
            "encoder": self.spec.name,
            "embedding_dim": self.spec.embedding_dim,
            "checkpoint": str(self.checkpoint) if self.checkpoint else "",
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights_sha256": self.weights_sha256,
            "untrained": self.untrained,
            "input_size": self.spec.input_size,
            "mean": list(self.spec.mean),
            "std": list(self.spec.std),
        }


# ---------------------------------------------------------------- architectures


def _build_uni() -> nn.Module:
    import timm

    # UNI's published configuration (MahmoodLab/UNI model card): ViT-L/16 with
    # LayerScale, no classifier head, 1024-D class-token output.
    return timm.create_model(
        "vit_large_patch16_224",
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
        pretrained=False,
    )


def _build_resnet50_trunc() -> nn.Module:
    import timm

    class TruncatedResNet50(nn.Module):
        """CLAM's `resnet50_trunc`: ResNet-50 up to layer3, then global average pooling (1024-D)."""

        def __init__(self) -> None:
            super().__init__()
            # features_only stops the network after the last requested stage;
            # index 3 is layer3 (1024 channels, stride 16).
            self.trunk = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            (layer3,) = self.trunk(images)
            return self.pool(layer3).flatten(1)

    return TruncatedResNet50()


def _build_vit_tiny() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False)


def _load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool) -> None:
    module.load_state_dict(state_dict, strict=True, assign=assign)


# A full ResNet-50 checkpoint (torchvision or timm naming, which agree) also
# holds layer4 and the classifier; the truncated network drops exactly those.
_RESNET50_DROPPED_PREFIXES = ("layer4.", "fc.")


def _load_resnet50_trunc(module: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool) -> None:
    if any(key.startswith("trunk.") for key in state_dict):
        module.load_state_dict(state_dict, strict=True, assign=assign)
        return
    kept = {k: v for k, v in state_dict.items() if not k.startswith(_RESNET50_DROPPED_PREFIXES)}
    module.trunk.load_state_dict(kept, strict=True, assign=assign)


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            name="uni",
            embedding_dim=1024,
            build=_build_uni,
            load_weights=_load_strict,
            description="UNI (MahmoodLab), ViT-L/16 pretrained on 100M H&E patches",
            requires_checkpoint=True,
            checkpoint_env="GCMLM_UNI_CHECKPOINT",
        ),
        EncoderSpec(
            name="resnet50-trunc",
            embedding_dim=1024,
            build=_build_resnet50_trunc,
            load_weights=_load_resnet50_trunc,
            description="CLAM baseline: ImageNet ResNet-50 truncated after layer3, average-pooled",
            checkpoint_env="GCMLM_RESNET50_CHECKPOINT",
        ),
        EncoderSpec(
            name="vit-tiny-random",
            embedding_dim=192,
            build=_build_vit_tiny,
            load_weights=_load_strict,
            description="ViT-Ti/16 with fixed-seed random weights, for tests and the demo (untrained)",
        ),
    )
}


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}") from None


# ---------------------------------------------------------------- weights


def resolve_checkpoint(spec: EncoderSpec, checkpoint: str | os.PathLike | None, *,
                       random_weights_allowed: bool = False) -> Path | None:
    """The checkpoint to load: the explicit setting, else the spec's environment variable.

    None (random weights) for an encoder that needs none; for one that names a checkpoint setting
    but may run without it (resnet50-trunc) only when `random_weights_allowed`."""
    setting = _setting_names(spec)
    value = str(checkpoint) if checkpoint else (settings.encoder_checkpoint(spec.checkpoint_env) if spec.checkpoint_env
                                                 else "")
    if not value:
        if spec.requires_checkpoint:
            raise EncoderError(
                f"encoder {spec.name!r} needs local weights but no checkpoint is configured: set {setting} "
                "to its pytorch_model.bin or .safetensors file (weights are never downloaded at run time)"
            )
        if spec.checkpoint_env and not random_weights_allowed:
            raise EncoderError(
                f"encoder {spec.name!r} has no checkpoint configured and would run on random weights, whose "
                f"features mean nothing: set {setting} to its pytorch_model.bin or .safetensors file. Random "
                "weights are allowed only in the demo profile (GCMLM_PROFILE=demo)"
            )
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise EncoderError(f"checkpoint file {path} for encoder {spec.name!r} does not exist (set by {setting})")
    return path


def _setting_names(spec: EncoderSpec) -> str:
    names = "the `encoder.checkpoint` resource field"
    if spec.checkpoint_env:
        names += f" or {spec.checkpoint_env}"
    return names


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, without executing any pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # weights_only refuses pickles that would run code; mmap avoids a
            # second in-memory copy of a large checkpoint.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad checkpoint file
        raise EncoderError(f"checkpoint file {path} cannot be read as weights: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"checkpoint file {path} is not a state dict (a mapping of names to tensors)")
    return dict(state)


_digest_lock = threading.Lock()
_file_digests: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, computed once per process per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digest_lock:
        if key not in _file_digests:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
            _file_digests[key] = digest.hexdigest()
        return _file_digests[key]


def state_sha256(module: nn.Module) -> str:
    """Digest of a module's parameters and buffers (identifies random-init weights)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _build_without_init(spec: EncoderSpec) -> nn.Module:
    """The architecture on the meta device: no time spent on a random init that weights replace."""
    with torch.device("meta"):
        return spec.build()


def load_encoder(name: str, checkpoint: str | os.PathLike | None = None, device: str = "cpu", *,
                 random_weights_allowed: bool = False) -> LoadedEncoder:
    """Build encoder `name` with its weights (strict) on `device`, in eval mode
    (`random_weights_allowed`: see `resolve_checkpoint`)."""
    spec = get_spec(name)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"encoder {spec.name!r}: device {device!r} requested (the `encoder.device` resource "
                           "field) but this process sees no CUDA device")
    path = resolve_checkpoint(spec, checkpoint, random_weights_allowed=random_weights_allowed)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            module = spec.build()
        digest = UNTRAINED
    else:
        state = read_state_dict(path)
        module = _build_without_init(spec)
        try:
            # assign=True adopts the checkpoint's tensors instead of copying
            # into meta parameters; key and shape checks stay strict.
            spec.load_weights(module, state, True)
        except RuntimeError as exc:
            raise EncoderError(
                f"checkpoint file {path} does not match encoder {spec.name!r} ({spec.description}): {exc}"
            ) from exc
        digest = checkpoint_sha256(path)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise EncoderError(f"encoder {spec.name!r}: tensors not set by checkpoint {path}: {leftover[:5]}")
    module = module.float().to(torch_device).eval().to(memory_format=torch.channels_last)
    weights = state_sha256(module) if path is None else digest
    return LoadedEncoder(spec, module, path, digest, weights, torch_device)
