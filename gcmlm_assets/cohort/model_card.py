"""The risk model's card (what was fitted, how it was validated, with what software) and the
strict-JSON form of the metrics and settings.

Plain Python (no Dagster).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import sklearn
import skops

from gcmlm_assets.cohort.cohort_data import class_counts
from gcmlm_assets.cohort.modelling import FUSED, FusedRiskModel, ModelSettings, fusion_strategy

if TYPE_CHECKING:
    from gcmlm_assets.cohort.crossval import CrossValidation


def model_card(model: FusedRiskModel, settings: ModelSettings, fitted: dict, metrics: dict,
               cv: CrossValidation, data_versions: dict) -> dict:
    fused = metrics.get(FUSED, {})
    return {
        "model": "MLM risk (metachronous liver metastasis of gastric cancer)",
        "strategy": fusion_strategy(settings),
        "classifier": settings.classifier,
        "blocks": fitted,
        "risk_threshold": model.risk_threshold,
        "risk_threshold_source": ("setting risk_threshold" if settings.risk_threshold is not None
                                  else "Youden threshold of the fused model's out-of-fold predictions"),
        "validation": {"scheme": f"repeated stratified {cv.n_splits}-fold CV x {cv.n_repeats} repeats, "
                                 "patient level, all fitting inside the folds",
                       "patients": int(len(cv.labels)), **class_counts(cv.labels), "notes": cv.notes},
        "metrics": {m: {k: v for k, v in values.items() if k != "auc_per_repeat"} for m, values in metrics.items()},
        "fused_auc": fused.get("auc"),
        "settings": asdict(settings),
        "data_versions": data_versions,
        "software": {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
                     "skops": skops.__version__, "numpy": np.__version__},
        "intended_use": "research; not validated for clinical decisions",
    }


def json_safe(obj):
    """Round floats and replace NaN/inf so the metrics can be stored as strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(obj) else round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def settings_json(settings: ModelSettings) -> str:
    return json.dumps(asdict(settings), sort_keys=True)
