"""Named settings profiles: what the definitions' resources and automation are built from.

`GCMLM_PROFILE` picks one (`production` when unset):

- `production`: the real models (UNI ViT-L/16 from a local checkpoint, nnU-Net's own full
  training, which needs a GPU), the risk model's full cross-validation, and automation that waits
  a few minutes for drops to settle.
- `demo`: a laptop without a GPU or model weights: an untrained ViT-Ti encoder, a tiny nnU-Net
  trained in about a minute on CPU, a smaller cross-validation, and automation that reacts in
  seconds. `make demo` and `make ui` use it unless told otherwise.

A profile holds resource field values only (never code), so that the daemon's runs, the UI's
Launchpad and tests all get the same settings without any run config. Like timm's model registry,
adding a profile is adding an entry to `PROFILES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

PROFILE_ENV = "GCMLM_PROFILE"
DEFAULT_PROFILE = "production"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    # Resource key -> field values that differ from the resource's own defaults.
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Why each resource differs from production, shown to users (demo banner, UI descriptions).
    notes: Mapping[str, str] = field(default_factory=dict)
    # How often the training, predicted-mask and cohort-refresh sensors look (landing_sensor: 30 s).
    sensor_interval_s: int = 30

    def resource_settings(self, key: str) -> dict[str, Any]:
        return dict(self.resources.get(key, {}))


def _frozen(values: dict[str, dict[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({key: MappingProxyType(dict(v)) for key, v in values.items()})


PRODUCTION = Profile(
    name="production",
    description="UNI ViT-L/16 (local checkpoint), nnU-Net's full 3d_fullres training on a GPU, "
                "full risk-model cross-validation",
)

DEMO = Profile(
    name="demo",
    description="untrained ViT-Ti encoder, tiny CPU nnU-Net, small cross-validation, fast automation",
    resources=_frozen({
        "encoder": {"name": "vit-tiny-random", "batch_size": 32, "num_workers": 0, "random_weights_allowed": True},
        # A tiny real nnU-Net v2 that a CPU trains in minutes (SegmentationModelResource.cpu_demo()
        # builds it). AdamW (nnU-Net's nnUNetTrainerAdam) rather than SGD: in our trials SGD with
        # nnU-Net's momentum still predicted only background after 300 iterations; AdamW first predicts
        # only background too and finds the stomach after 50-110 iterations on the tests' small crops
        # (they train 240; 150 missed it in 1 of 9 runs), after up to 150 on the demo's larger CTs
        # (seen once: Dice 0.26 after 300 iterations), so 450.
        # Retraining: the demo's dozen reference masks gain a few at a time, so 3 new (or a quarter
        # more) retrain; one case is held out for the comparison, leaving the others to the new model.
        "segmentation": {"trainer": "nnUNetTrainerAdam", "epochs": 30, "iterations_per_epoch": 15,
                         "val_iterations": 2, "tiny_plans": True, "device": "cpu",
                         "preprocessing_workers": 1, "augmentation_workers": 0, "torch_threads": 2,
                         "min_training_cases": 3, "retrain_min_new_cases": 3, "retrain_min_growth_fraction": 0.25,
                         "holdout_min_cases": 1},
        "risk_model": {"n_repeats": 3, "n_bootstrap": 300, "min_labelled_per_class": 3},
        # The phantom's anatomy is sized for a 19 cm field: its stomachs measure 35-90 ml, below an
        # adult's 50 ml minimum.
        "radiomics": {"mask_volume_min_ml": 20.0},
        "automation": {"training_debounce_s": 20, "cohort_quiet_s": 25},
    }),
    sensor_interval_s=10,
    notes=MappingProxyType({
        "encoder": "untrained ViT-Ti/16 (fixed-seed random weights) instead of UNI ViT-L/16: no weights "
                   "to download, ~60x less compute; its pooled features still carry the slides' "
                   "tissue composition",
        "segmentation": "a tiny nnU-Net v2 (4 stages, 4..32 features, patch <= 32x64x64, AdamW) trained "
                        "for 30 x 15 iterations on CPU instead of nnU-Net's 1000 x 250 full-size "
                        "training on a GPU; trains once 3 patients have a reference mask, retrains after 3 "
                        "new ones (or a quarter more) instead of 25 (or a fifth more), holding out at "
                        "least 1 case for the comparison instead of 5",
        "risk_model": "3 x repeated CV, 300 bootstrap resamples, 3 labelled patients per class suffice",
        "radiomics": "gastric masks from 20 ml instead of 50 ml: the synthetic patients are small, their "
                     "stomachs measure 35-90 ml",
        "automation": "training waits 20 s for more reference masks, the cohort refresh 25 s of quiet; "
                      "those sensors tick every 10 s (landing_sensor every 30 s)",
    }),
)

PROFILES: dict[str, Profile] = {profile.name: profile for profile in (PRODUCTION, DEMO)}


def chosen_profile_name() -> str | None:
    """`GCMLM_PROFILE` as set (None when unset or empty), before any default."""
    return os.environ.get(PROFILE_ENV) or None


def profile_name() -> str:
    name = os.environ.get(PROFILE_ENV, DEFAULT_PROFILE).strip().lower() or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV} must be one of {', '.join(sorted(PROFILES))}, got {name!r}")
    return name


def get_profile(name: str | None = None) -> Profile:
    """The named profile, or the one `GCMLM_PROFILE` selects."""
    name = name or profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: one of {', '.join(sorted(PROFILES))}")
    return PROFILES[name]
