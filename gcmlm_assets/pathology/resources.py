"""Resources of the pathology group, keyed by resource name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from gcmlm_assets.devices import ResolvedDevice, resolve_device
from gcmlm_assets.profiles import PRODUCTION, Profile
from gcmlm_assets.settings import encoder_checkpoint
from gcmlm_assets.pathology.lymph_nodes.settings import LymphNodeFields
from gcmlm_assets.pathology.lymph_nodes.tumour_classifier import TumourClassifierFields
from gcmlm_assets.pathology.tiling_settings import TilingFields

if TYPE_CHECKING:  # torch only when a step loads the encoder
    from gcmlm_assets.pathology.encoders import LoadedEncoder


class TilingSettings(dg.ConfigurableResource, TilingFields):
    """How `patch_coords` finds tissue and lays patches (resource key "pathology").

    `mode="default"` tiles at `target_mpp` with a tissue-fraction rule;
    `mode="clam"` reproduces CLAM's create_patches_fp.py with CLAM's parameters
    (the `clam_*` fields, or a CLAM preset CSV in `clam_preset`).
    """

    # The fields and tiling_params() are TilingFields' (tiling_settings.py: declared there once).


class LymphNodeSettings(dg.ConfigurableResource, LymphNodeFields):
    """How `lymph_nodes` finds nodes and tumour regions on the lymph-node slides (resource key "lymph_node").

    The fields are LymphNodeFields' (lymph_nodes/settings.py: declared there once)."""


class TumourClassifierSettings(dg.ConfigurableResource, TumourClassifierFields):
    """How `tumour_classifier` trains on the annotated lymph-node slides (resource key "ln_classifier").

    The fields are TumourClassifierFields' (lymph_nodes/tumour_classifier.py: declared there once)."""


class PatchEncoder(dg.ConfigurableResource):
    """Which encoder `uni_features` runs and how (resource key "encoder").

    Weights are never downloaded: `checkpoint` names a local `pytorch_model.bin`
    or `.safetensors`; when empty, the encoder's environment variable is used
    (`GCMLM_UNI_CHECKPOINT` for "uni"). Tests and the demo use
    "vit-tiny-random", an untrained encoder that needs no file.
    """

    name: str = Field(default="uni", description='"uni", "resnet50-trunc" or "vit-tiny-random"')
    checkpoint: str = Field(default="", description="local weights file; empty: the encoder's env variable")
    batch_size: int = Field(default=32, description="patches per forward pass (32 is fastest on CPU; the k8s GPU pod uses 256)")
    num_workers: int = Field(
        default=0,
        description="DataLoader worker processes reading ahead (GPU); 0: read between forward passes in the "
                    "run's own process, which is faster when the encoder runs on the CPU")
    read_threads: int = Field(
        default=0, description="with num_workers=0, threads decoding each batch; 0: torch's intra-op thread count")
    float16_features: bool = Field(default=False, description="store features as float16 instead of float32")
    scaled_decode: bool = Field(
        default=True,
        description="decode JPEG tiles at 1/2 (1/4, 1/8) of their size when the read size is that many times "
                    "the encoder input (e.g. 512 px at 0.25 µm/px -> 224 px); false: full decode + resize")
    device: str = Field(default="auto", description='"auto" (CUDA where the process sees a GPU, else CPU), '
                                                     '"cuda" (bf16 autocast) or "cpu"')
    random_weights_allowed: bool = Field(
        default=False,
        description="let an encoder that names a checkpoint setting (resnet50-trunc) run on fixed-seed random "
                    "weights when none is configured; only the demo profile sets it, elsewhere that is an error")

    def missing_weights(self) -> str | None:
        """Why the encoder cannot load its weights here (unknown name, no or unreadable checkpoint), or None."""
        from gcmlm_assets.pathology.encoders import EncoderError, get_spec, resolve_checkpoint

        try:
            resolve_checkpoint(get_spec(self.name), self.checkpoint or None,
                               random_weights_allowed=self.random_weights_allowed)
        except EncoderError as error:
            return str(error)
        return None

    def configured_encoder(self) -> dict:
        """The encoder these settings name, as the asset page shows it before any run.

        The checkpoint is named, not hashed: a UNI checkpoint is 1.2 GB and every step process loads
        the definitions. uni_features' materializations record the hash.
        """
        from gcmlm_assets.pathology.encoders import ENCODERS  # the registry only; torch stays unloaded

        spec = ENCODERS.get(self.name)
        if spec is None:
            return {"encoder": f"{self.name} (unknown: one of {', '.join(sorted(ENCODERS))})"}
        path = self.checkpoint or (encoder_checkpoint(spec.checkpoint_env) if spec.checkpoint_env else "")
        if path:
            weights = path
        elif spec.requires_checkpoint or (spec.checkpoint_env and not self.random_weights_allowed):
            weights = f"not configured: set encoder.checkpoint or {spec.checkpoint_env}"
        else:
            weights = "random init (test only)"
        return {"encoder": f"{spec.name}: {spec.description}", "encoder_embedding_dim": spec.embedding_dim,
                "encoder_checkpoint": weights, "encoder_device": self.device}

    def load(self) -> "tuple[LoadedEncoder, ResolvedDevice]":
        """The encoder on its device. A step loads it once and encodes every patient of its run with it."""
        from gcmlm_assets.pathology.encoders import get_spec, load_encoder, resolve_checkpoint

        device = resolve_device(self.device, "encoder.device", gpu_step=True)
        path = resolve_checkpoint(get_spec(self.name), self.checkpoint or None,
                                  random_weights_allowed=self.random_weights_allowed)
        return load_encoder(self.name, path, device.name, random_weights_allowed=self.random_weights_allowed), device


def resources(env: str, profile: Profile = PRODUCTION) -> dict[str, dg.ConfigurableResource]:
    # A GPU pod (step_pods.GPU: 8 CPUs) reads with many workers and feeds larger batches; the device
    # is "auto": CUDA when the pod has a GPU; on Kubernetes a GPU pod without one fails the step at
    # once (devices.require_gpu_step_device), locally the CPU is used and the metadata say so.
    encoder = {"batch_size": 256, "num_workers": 8} if env == "k8s" else {}
    encoder.update(profile.resource_settings("encoder"))
    return {"pathology": TilingSettings(**profile.resource_settings("pathology")),
            "encoder": PatchEncoder(**encoder),
            "lymph_node": LymphNodeSettings(**profile.resource_settings("lymph_node")),
            "ln_classifier": TumourClassifierSettings(**profile.resource_settings("ln_classifier"))}
