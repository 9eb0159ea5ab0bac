"""Resources of the pathology group, keyed by resource name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import dagster as dg
from pydantic import Field

from gcmlm_assets.devices import ResolvedDevice, resolve_device
from gcmlm_assets.profiles import PRODUCTION, Profile
from gcmlm_assets.settings import encoder_checkpoint
from gcmlm_assets.pathology.tiling_params import ClamParams, TilingParams
from gcmlm_assets.pathology.tissue import SegmentationParams

if TYPE_CHECKING:  # torch only when a step loads the encoder
    from gcmlm_assets.pathology.encoders import LoadedEncoder

TILING = TilingParams()  # the tiling defaults


class TilingSettings(dg.ConfigurableResource):
    """How `patch_coords` finds tissue and lays patches (resource key "pathology").

    `mode="default"` tiles at `target_mpp` with a tissue-fraction rule;
    `mode="clam"` reproduces CLAM's create_patches_fp.py with CLAM's parameters
    (the `clam_*` fields, or a CLAM preset CSV in `clam_preset`).
    """

    # The defaults are TilingParams', SegmentationParams' and ClamParams' own (one definition each);
    # only the settings that no plain class has are set here.
    mode: str = Field(default=TILING.mode, description='"default" or "clam"')
    patch_size: int = Field(default=TILING.patch_size, description="patch side in px at target_mpp")
    target_mpp: float = Field(default=TILING.target_mpp, description="µm per pixel of the patches (0.5 ~ 20x)")
    min_tissue: float = Field(default=TILING.min_tissue, description="minimum tissue fraction of a kept patch")
    default_mpp: float = Field(default=TILING.default_mpp,
                               description="µm/px assumed (with a WARN) for slides without resolution")
    min_plausible_mpp: float = TILING.plausible_mpp[0]
    max_plausible_mpp: float = TILING.plausible_mpp[1]
    level_match_tolerance: float = TILING.level_match_tolerance
    seg_mpp: float = Field(default=TILING.seg_mpp, description="µm per pixel of the image tissue is segmented on")
    sthresh: int = TILING.segmentation.sthresh
    mthresh: int = TILING.segmentation.mthresh
    close: int = TILING.segmentation.close
    use_otsu: bool = TILING.segmentation.use_otsu
    min_tissue_area: float = Field(default=TILING.min_tissue_area,
                                   description="drop tissue regions under this many patch areas")
    min_hole_area: float = Field(default=TILING.min_hole_area, description="fill holes under this many patch areas")
    max_n_holes: Optional[int] = Field(default=TILING.max_n_holes,
                                       description="keep only the largest N holes per region")
    clam_preset: Optional[str] = Field(default=None, description="CLAM preset CSV; overrides the `clam_*` fields")
    clam_seg_level: int = TILING.clam.seg_level
    clam_a_t: float = TILING.clam.a_t
    clam_a_h: float = TILING.clam.a_h
    clam_max_n_holes: int = TILING.clam.max_n_holes
    clam_contour_fn: str = TILING.clam.contour_fn
    clam_use_padding: bool = TILING.clam.use_padding
    min_patches_per_slide: int = Field(default=10, description="patch_count_in_bounds warns below this")
    max_patches_per_slide: int = Field(default=200_000, description="patch_count_in_bounds warns above this")

    def tiling_params(self) -> TilingParams:
        clam = ClamParams(seg_level=self.clam_seg_level, sthresh=self.sthresh, mthresh=self.mthresh,
                          close=self.close, use_otsu=self.use_otsu, a_t=self.clam_a_t, a_h=self.clam_a_h,
                          max_n_holes=self.clam_max_n_holes, contour_fn=self.clam_contour_fn,
                          use_padding=self.clam_use_padding, patch_size=self.patch_size,
                          step_size=self.patch_size)
        if self.clam_preset:
            clam = ClamParams.from_preset_csv(self.clam_preset, base=clam)
        return TilingParams(
            mode=self.mode, patch_size=self.patch_size, target_mpp=self.target_mpp,
            min_tissue=self.min_tissue, default_mpp=self.default_mpp,
            plausible_mpp=(self.min_plausible_mpp, self.max_plausible_mpp),
            level_match_tolerance=self.level_match_tolerance, seg_mpp=self.seg_mpp,
            segmentation=SegmentationParams(sthresh=self.sthresh, mthresh=self.mthresh, close=self.close,
                                            use_otsu=self.use_otsu),
            min_tissue_area=self.min_tissue_area, min_hole_area=self.min_hole_area,
            max_n_holes=self.max_n_holes, clam=clam,
        )


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
            "encoder": PatchEncoder(**encoder)}
