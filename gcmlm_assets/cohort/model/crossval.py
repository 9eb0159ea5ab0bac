"""Cross-validation of the risk model's ablation (each block alone, both fusions), at patient level.

Plain Python (no Dagster). Repeated stratified k-fold over the labelled patients that have at
least one block (one row per patient, so no patient is ever in both parts of a fold). Every model
of the ablation is fitted and evaluated in the SAME folds, every step fitted on the training
patients only:
- each block (radiology, pathology mean, pathology ABMIL when bags are given, clinical) alone;
- "fused": the configured fusion of the fused model's blocks, and beside it the other fusion
  (`fused_mean` or `fused_stacked`). The stacked combiner of an outer fold is fitted on the
  out-of-fold logits of an inner CV of that fold's training patients (training.out_of_fold_logits),
  then applied to the test patients' logits from the blocks fitted on the whole training part;
- `fused_all_modalities`: the configured fusion restricted to the patients with every block but the
  optional ones (lymph nodes, delta: only part of a cohort has lymph-node slides or a second CT scan,
  and requiring them would make this row that part);
- `fused_with_lymph_node` / `fused_with_delta`: the configured fusion restricted to the patients with
  lymph-node slides / two or more CT scans (the lymph_node / delta row's patients), when only some have them.
The fused rows include the patients who lack a block (scored from the blocks they have). An optional
block that no cross-validated patient has is not evaluated at all: the other rows are then exactly
those of a model without it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from sklearn.model_selection import RepeatedStratifiedKFold

from gcmlm_assets.cohort.tables.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.tables.cohort_data import OPTIONAL_BLOCKS, CohortData, class_counts
from gcmlm_assets.cohort.model.combiners import make_combiner, sigmoid
from gcmlm_assets.cohort.model.model_settings import (
    FUSED, FUSED_COMPLETE, FUSED_WITH, InsufficientLabels, ModelSettings)
from gcmlm_assets.cohort.model.modelling import block_logits, fit_block
from gcmlm_assets.cohort.model.training import out_of_fold_logits


@dataclass
class CrossValidation:
    patient_ids: np.ndarray  # the labelled patients with at least one block, in table order
    labels: np.ndarray
    available: dict[str, np.ndarray]  # block -> bool per patient
    predictions: dict[str, np.ndarray]  # model -> (n_repeats, n_patients), NaN: no prediction
    n_splits: int
    n_repeats: int
    notes: list[str] = field(default_factory=list)
    fusion_blocks: tuple[str, ...] = ()

    def models(self) -> list[str]:
        """The ablation's rows: blocks with patients, then the fusions."""
        names = [b for b, rows in self.available.items() if rows.any()]
        names += [m for m in self.predictions if m not in self.available]
        fused_blocks = [self.available[b] for b in self.fusion_blocks
                        if b in self.available and b not in OPTIONAL_BLOCKS]
        complete = np.logical_and.reduce(fused_blocks) if fused_blocks else np.zeros(len(self.labels), bool)
        if len(fused_blocks) > 1 and complete.any() and not complete.all():
            names.append(FUSED_COMPLETE)
        for block, row in FUSED_WITH.items():
            with_block = self.available.get(block)
            if block in self.fusion_blocks and with_block is not None and with_block.any() and not with_block.all():
                names.append(row)
        return names

    def model_predictions(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, predictions) over the patients the model is evaluated on."""
        restricted_to = {row: block for block, row in FUSED_WITH.items()}
        source = FUSED if model == FUSED_COMPLETE or model in restricted_to else model
        predictions = self.predictions[source]
        rows = np.isfinite(predictions).all(axis=0)
        if model == FUSED_COMPLETE:
            rows &= np.logical_and.reduce([self.available[b] for b in self.fusion_blocks
                                           if b in self.available and b not in OPTIONAL_BLOCKS])
        elif model in restricted_to:
            rows &= self.available[restricted_to[model]]
        return self.labels[rows], predictions[:, rows]


def labelled_counts(data: CohortData) -> dict[str, int]:
    """Labelled patients with at least one feature block, per class: what training can use."""
    return class_counts(data.labels[data.labelled & data.any_block()])


def check_enough_labels(data: CohortData, settings: ModelSettings) -> dict[str, int]:
    counts = labelled_counts(data)
    short = {k: v for k, v in counts.items() if v < settings.min_labelled_per_class}
    if short:
        raise InsufficientLabels(
            f"too few labelled patients with features to train: {counts} (each class needs at least "
            f"{settings.min_labelled_per_class}, setting min_labelled_per_class)")
    return counts


def cross_validate(data: CohortData, settings: ModelSettings) -> CrossValidation:
    counts = check_enough_labels(data, settings)
    rows = data.labelled & data.any_block()
    labels = data.labels[rows].astype(int)
    n_splits = min(settings.n_splits, min(counts.values()))
    notes = []
    if n_splits < settings.n_splits:
        notes.append(f"n_splits lowered from {settings.n_splits} to {n_splits}: the smaller class has "
                     f"{min(counts.values())} patients")
    # an optional block (lymph nodes, delta) that no patient of the CV has is not evaluated, nor fused
    blocks = tuple(b for b in settings.blocks() if b in data.blocks
                   and (b not in OPTIONAL_BLOCKS or data.blocks[b].available[rows].any()))
    fusion_blocks = tuple(b for b in settings.fusion_blocks() if b in blocks or
                          (b in data.blocks and b not in OPTIONAL_BLOCKS))
    indices = np.flatnonzero(rows)  # the CV's patients, as rows of `data`
    available = {b: data.blocks[b].available[rows] for b in blocks}
    fusions = (FUSED, settings.other_fusion())
    logits = {b: np.full((settings.n_repeats, len(labels)), np.nan) for b in blocks}
    fused_logits = {m: np.full((settings.n_repeats, len(labels)), np.nan) for m in fusions}
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=settings.n_repeats,
                                       random_state=settings.seed)
    for fold, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        repeat = fold // n_splits
        for block in blocks:
            block_train = train[available[block][train]]
            block_test = test[available[block][test]]
            if len(block_test) == 0:
                continue
            model = fit_block(block, data.inputs(block, indices[block_train]), labels[block_train].astype(float),
                              settings)
            if model is None:
                notes.append(f"repeat {repeat + 1}, fold {fold % n_splits + 1}: {block} not fitted "
                             f"(fewer than 2 training patients of a class)")
                continue
            logits[block][repeat, block_test] = block_logits(model, data.inputs(block, indices[block_test]))
        test_logits = np.column_stack([logits[b][repeat, test] for b in fusion_blocks])
        for name, fusion in zip(fusions, (settings.fusion, "mean" if settings.fusion == "stacked" else "stacked")):
            combiner = make_combiner(fusion, fusion_blocks)
            if fusion == "stacked":
                # inner CV of this fold's training patients only: the test fold never shapes the weights
                inner = out_of_fold_logits(data, indices[train], fusion_blocks, settings, settings.seed + fold)
                combiner.fit(inner, labels[train])
            fused_logits[name][repeat, test] = combiner.fused_logit(test_logits)
    predictions = {m: sigmoid(v) for m, v in {**logits, **fused_logits}.items()}
    return CrossValidation(data.patient_ids[rows], labels, available, predictions, n_splits,
                           settings.n_repeats, notes, fusion_blocks)


def cv_predictions_table(cv: CrossValidation) -> pa.Table:
    """Out-of-fold probabilities (mean over repeats) per patient and model."""
    columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(cv.patient_ids.tolist(), pa.string()),
                                    LABEL_COLUMN: pa.array(cv.labels, pa.int8())}
    for model, predictions in cv.predictions.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no prediction
            mean = np.nanmean(predictions, axis=0)
        columns[f"oof_probability_{model}"] = pa.array(mean, pa.float64(), mask=~np.isfinite(mean))
    return pa.table(columns)

