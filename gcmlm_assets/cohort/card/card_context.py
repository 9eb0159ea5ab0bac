"""What the risk model's TRIPOD+AI card records beyond the fit: the training data's sources and
hash, the labelled patients' flow to the cross-validation, the fusion rule and why, the
explanation method, and the limitations (the patch encoder's among them).

Plain Python (no Dagster): the risk_model asset hands it what the cohort assets stored. The card
describes the data the model was trained on, the labelled patients, and nothing else: patients
without a label are scored by the model, so the card (and the version's name, a hash of its
files) stays the same when they come and go.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from gcmlm_assets.catalogue import FUSED_TABLE
from gcmlm_assets.cohort.card import model_card
from gcmlm_assets.cohort.model import model_settings
from gcmlm_assets.cohort.tables.fusion import PATHOLOGY


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

    clinical_manifest: dict  # clinical_table's manifest: its source csv
    fusion_report: dict  # fused_table's report: why a patient's modality was left out
    fused_path: Path
    encoder: dict | None  # the patch encoder's identity from a uni_features manifest (None: no pathology)


def read_cohort_records(store, data, fused_path: Path, *, clinical_asset: str, fusion_report: str,
                        features_asset: str) -> CohortRecords:
    """The records from the store: `clinical_asset` names clinical_table (its manifest names the
    source csv), `fusion_report` the report's file name beside the fused table, `features_asset`
    the patch features' asset (its manifests name the encoder)."""
    return CohortRecords(
        clinical_manifest=store.read_manifest(clinical_asset, None) or {},
        fusion_report=_read_json(fused_path.parent / fusion_report) or {}, fused_path=fused_path,
        encoder=_encoder_identity(store, data, features_asset))


def _encoder_identity(store, data, features_asset: str) -> dict | None:
    """The patch encoder the pathology features came from (its name, and whether it was untrained)."""
    for patient_id, has in zip(data.patient_ids, data.blocks[PATHOLOGY].available):
        encoder = (store.read_manifest(features_asset, str(patient_id)) or {}).get("encoder") if has else None
        if encoder:
            return {"name": encoder.get("encoder"), "untrained": bool(encoder.get("untrained"))}
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def card_context(records: CohortRecords, data, cv, settings, model, metrics: dict, training: dict) -> dict:
    """What the TRIPOD+AI card needs beyond the fit: sources, the training data and its flow, fusion,
    explanation and limitations. `data` holds the labelled patients only (training.training_table);
    `training`: {"sha256": the training table's hash, "patch_features_sha256": the bags' hash or None}."""
    source = records.clinical_manifest.get("source") or {}
    csv_path = Path(source["path"]) if source.get("path") else None
    has_block = data.any_block()
    labelled = [(str(p), int(y), bool(has)) for p, y, has in zip(data.patient_ids, data.labels, has_block)]
    flow = model_card.training_flow(labelled, records.fusion_report, int(len(cv.labels)))
    counts = {"positive": sum(1 for _, y, _ in labelled if y == 1),
              "negative": sum(1 for _, y, _ in labelled if y == 0)}
    exact = settings.classifier == "logistic"
    patches = ("and one share per patch of the pathology logit (mean pooling is affine)"
               if settings.pathology_pooling == "mean" else
               "(the ABMIL pathology block is not linear: attention maps, not contributions)")
    method = ("exact contributions (risk_explanations): coefficient x standardised value per radiology, "
              f"clinical, lymph-node (T/MLN's indicator one of them) and delta (change between CT scans) feature "
              f"{patches}, each scaled by the block's fusion weight; the parts add up to the fused logit" if exact else
              f"no exact contributions: the {settings.classifier} classifier is not linear; cohort-level "
              "permutation importance instead")
    attention = ("; ABMIL attention maps (where the attention model looked; not contributions)"
                 if model_settings.PATHOLOGY_ABMIL in settings.blocks() else "")
    return {
        "limitations": model_card.default_limitations({**asdict(settings), "encoder": records.encoder}, metrics),
        "data": {"landing_zone": str(csv_path.parent) if csv_path else None,
                 "clinical_csv": {"path": source.get("path")},
                 FUSED_TABLE.key: {"path": str(records.fused_path)},
                 "training_data": {
                     "rows": (f"the labelled rows of the fused table, sorted by patient id: {len(labelled)} "
                              f"patients ({counts['positive']} MLM, {counts['negative']} no MLM)"),
                     "patients": len(labelled), **counts, "sha256": training["sha256"],
                     "patch_features_sha256": training.get("patch_features_sha256") or "none (no patch features read)"},
                 "patients_added_later": ("without a label: scored by this model as it is, no refit; with a "
                                          "label, or a labelled patient's features changed: a new model"),
                 "not_in_flow": [model_card.NOT_TRAINING_DATA, model_card.NOT_IN_TABLE],
                 # no clock time of this run: the same inputs must give the same model files (and
                 # version name); Dagster records when each materialization happened
                 "trained_at": SEE_DAGSTER},
        "flow": flow,
        "fusion": {"rule": model_settings.fusion_strategy(settings), "default": settings.fusion,
                   "why": WHY_STACKED if settings.fusion == "stacked" else WHY_MEAN,
                   "combiner": model.combiner.describe()},
        "explanation": {"method": method + attention,
                        "notes": "permutation importance: drop in AUC of the final model when a block (or a "
                                 "feature) is shuffled across the labelled patients it was trained on (in-sample)"},
    }
