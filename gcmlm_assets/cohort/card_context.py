"""What the risk model's TRIPOD+AI card records beyond the fit: the data's sources and dates, the
patients' flow from clinical.csv to the cross-validation, the fusion rule and why, the
explanation method, and the limitations (the patch encoder's among them).

Plain Python (no Dagster): the risk_model asset hands it what the cohort assets stored.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from gcmlm_assets.cohort import crossval, fusion, model_card, model_settings
from gcmlm_assets.cohort.fusion import PATHOLOGY


SEE_DAGSTER = "the time of this materialization in Dagster (kept out of the card: same inputs, same files)"

# Chosen on simulated cohorts, never on a model's own folds (README "Fusion", benchmarks/fusion_rules.py).
WHY_MEAN = ("each block's logistic penalty is chosen by inner-fold log loss, so a block without signal already "
            "gives logits near 0 and cannot dilute a strong one; on simulated cohorts of 24-80 patients the "
            "stacked combiner's extra weights cost more in variance than they gained (README: Fusion)")
WHY_STACKED = ("set by risk_model.fusion: weights learned from the blocks' out-of-fold logits (inner CV inside "
               "each training part), non-negative and shrunk towards 0")


@dataclass(frozen=True)
class CohortRecords:
    """What the cohort assets stored about the data the model was trained on."""

    clinical_manifest: dict  # clinical_table's manifest: its source csv and the rows' summary
    clinical_problems: list | None  # clinical_table's rejected rows
    fusion_report: dict  # fused_table's report: rejected files, left-out results, ids without a match
    fused_path: Path
    fused_sha256: str
    encoder: dict | None  # the patch encoder's identity from a uni_features manifest (None: no pathology)


def read_cohort_records(store, data, fused_path: Path, fused_sha: str, *, clinical_problems: tuple[str, str],
                        fusion_report: str, features_asset: str) -> CohortRecords:
    """The records from the store: `clinical_problems` is (asset, file name) of clinical_table's rejected
    rows, `fusion_report` the report's file name beside the fused table, `features_asset` the patch
    features' asset (its manifests name the encoder)."""
    asset, problems_file = clinical_problems
    return CohortRecords(
        clinical_manifest=store.read_manifest(asset, None) or {},
        clinical_problems=_read_json(store.path(asset, None, problems_file)),
        fusion_report=_read_json(fused_path.parent / fusion_report) or {}, fused_path=fused_path,
        fused_sha256=fused_sha, encoder=_encoder_identity(store, data, features_asset))


def _encoder_identity(store, data, features_asset: str) -> dict | None:
    """The patch encoder the pathology features came from (its name, and whether it was untrained)."""
    for patient_id, has in zip(data.patient_ids, data.blocks[PATHOLOGY].available):
        encoder = (store.read_manifest(features_asset, str(patient_id)) or {}).get("encoder") if has else None
        if encoder:
            return {"name": encoder.get("encoder"), "untrained": bool(encoder.get("untrained"))}
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def card_context(records: CohortRecords, data, cv, settings, model, metrics: dict) -> dict:
    """What the TRIPOD+AI card needs beyond the fit: sources and dates, the patient flow, fusion,
    explanation and limitations."""
    source = records.clinical_manifest.get("source") or {}
    csv_path = Path(source["path"]) if source.get("path") else None
    flow = model_card.cohort_flow(records.clinical_manifest.get("summary") or {}, records.fusion_report,
                                  fusion.fused_stats(pq.read_table(records.fused_path)),
                                  crossval.labelled_counts(data), int(len(cv.labels)), records.clinical_problems,
                                  [str(p) for p in data.patient_ids[data.any_block() & ~data.labelled]])
    exact = settings.classifier == "logistic"
    patches = ("and one share per patch of the pathology logit (mean pooling is affine)"
               if settings.pathology_pooling == "mean" else
               "(the ABMIL pathology block is not linear: attention maps, not contributions)")
    method = ("exact contributions (risk_explanations): coefficient x standardised value per radiology and "
              f"clinical feature {patches}, each scaled by the block's fusion weight; the parts add up to the "
              "fused logit" if exact else
              f"no exact contributions: the {settings.classifier} classifier is not linear; cohort-level "
              "permutation importance instead")
    attention = ("; ABMIL attention maps (where the attention model looked; not contributions)"
                 if model_settings.PATHOLOGY_ABMIL in settings.blocks() else "")
    return {
        "limitations": model_card.default_limitations({**asdict(settings), "encoder": records.encoder}, metrics),
        "data": {"landing_zone": str(csv_path.parent) if csv_path else None,
                 "clinical_csv": {"path": source.get("path"), "sha256": source.get("sha256"),
                                  "modified": _modified(csv_path) if csv_path else None},
                 # no clock time of this run: the same inputs must give the same model files (and
                 # version name); Dagster records when each materialization happened
                 "fused_table": {"path": str(records.fused_path), "sha256": records.fused_sha256,
                                 "built": SEE_DAGSTER},
                 "trained_at": SEE_DAGSTER},
        "flow": flow,
        "fusion": {"rule": model_settings.fusion_strategy(settings), "default": settings.fusion,
                   "why": WHY_STACKED if settings.fusion == "stacked" else WHY_MEAN,
                   "combiner": model.combiner.describe()},
        "explanation": {"method": method + attention,
                        "notes": "permutation importance: drop in AUC of the final model when a block (or a "
                                 "feature) is shuffled across the labelled patients it was trained on (in-sample)"},
    }


def _modified(path: Path) -> str | None:
    try:
        return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC).isoformat(timespec="seconds")
    except OSError:
        return None
