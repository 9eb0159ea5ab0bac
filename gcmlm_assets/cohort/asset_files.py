"""What the cohort assets share: their group, their code versions, the files each one writes in the
artifact store, and how one reads another's file.

Both asset modules take these from here: risk_model_asset.py (risk_model) cannot import them from
assets.py (clinical_table, fused_table, risk_scores), which imports risk_model to list the group's
ASSETS. checks.py and explanation_assets.py read the same files by the same names.
"""

from pathlib import Path

import dagster as dg

from gcmlm_assets.storage import ArtifactStore

GROUP = "cohort"
# Bump a version when its asset's output would change for the same inputs (it invalidates reuse).
CODE_VERSIONS = {"clinical_table": "1", "fused_table": "3", "risk_model": "4", "risk_scores": "3"}

CLINICAL_FILE, CLINICAL_PROBLEMS = "clinical.parquet", "problems.json"
FUSED_FILE, FUSION_REPORT = "fused.parquet", "fusion_report.json"
MODEL_FILE, METRICS_FILE, MODEL_CARD = "model.skops", "metrics.json", "model_card.json"
MODEL_CARD_MARKDOWN = "model_card.md"
CV_PREDICTIONS = "cv_predictions.parquet"
PLOTS = {"roc": "roc.png", "calibration": "calibration.png", "decision_curve": "decision_curve.png"}
SCORES_FILE = "scores.parquet"
SCORES_PICTURE = "score_distribution.png"


def required_input(store: ArtifactStore, asset: str, filename: str) -> Path:
    path = store.path(asset, None, filename)
    if not path.is_file():
        raise dg.Failure(description=f"{path} not found: materialize {asset} first",
                         metadata={"missing": str(path)})
    return path
