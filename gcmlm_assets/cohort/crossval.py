"""Cross-validation of the risk model's ablation (each block alone, fused), at patient level.

Plain Python (no Dagster). Repeated stratified k-fold over the labelled patients that have at
least one block (one row per patient, so no patient is ever in both parts of a fold). Every model
of the ablation is fitted and evaluated in the SAME folds, every step fitted on the training
patients only. The "fused" model is the late-fusion rule (modelling.combine_probabilities)
applied to the out-of-fold block predictions, so its figures include the patients who lack a
modality; `fused_all_modalities` restricts them to the patients who have every modality.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from sklearn.model_selection import RepeatedStratifiedKFold
from threadpoolctl import threadpool_limits

from gcmlm_assets.cohort.clinical import ID_COLUMN, LABEL_COLUMN
from gcmlm_assets.cohort.cohort_data import CohortData, class_counts
from gcmlm_assets.cohort.modelling import (
    FUSED, FUSED_COMPLETE, InsufficientLabels, ModelSettings, combine_probabilities, fit_block)


@dataclass
class CrossValidation:
    patient_ids: np.ndarray  # the labelled patients with at least one block, in table order
    labels: np.ndarray
    available: dict[str, np.ndarray]  # block -> bool per patient
    predictions: dict[str, np.ndarray]  # model -> (n_repeats, n_patients), NaN: no prediction
    n_splits: int
    n_repeats: int
    notes: list[str] = field(default_factory=list)

    def models(self) -> list[str]:
        names = [b for b in self.available] + [FUSED]
        complete = np.logical_and.reduce(list(self.available.values()))
        if len(self.available) > 1 and complete.any() and not complete.all():
            names.append(FUSED_COMPLETE)
        return names

    def model_predictions(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, predictions) over the patients the model is evaluated on."""
        source = FUSED if model == FUSED_COMPLETE else model
        predictions = self.predictions[source]
        rows = np.isfinite(predictions).all(axis=0)
        if model == FUSED_COMPLETE:
            rows &= np.logical_and.reduce(list(self.available.values()))
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
    blocks = settings.blocks()
    X = {b: data.blocks[b].X[rows] for b in blocks}
    available = {b: data.blocks[b].available[rows] for b in blocks}
    predictions = {m: np.full((settings.n_repeats, len(labels)), np.nan) for m in (*blocks, FUSED)}
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=settings.n_repeats,
                                       random_state=settings.seed)
    for fold, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        repeat = fold // n_splits
        for block in blocks:
            block_train = train[available[block][train]]
            block_test = test[available[block][test]]
            if len(block_test) == 0:
                continue
            pipeline = fit_block(block, X[block][block_train], labels[block_train].astype(float), settings)
            if pipeline is None:
                notes.append(f"repeat {repeat + 1}, fold {fold % n_splits + 1}: {block} not fitted "
                             f"(fewer than 2 training patients of a class)")
                continue
            with threadpool_limits(1):
                predictions[block][repeat, block_test] = pipeline.predict_proba(X[block][block_test])[:, 1]
        predictions[FUSED][repeat, test] = combine_probabilities([predictions[b][repeat, test] for b in blocks])
    return CrossValidation(data.patient_ids[rows], labels, available, predictions, n_splits,
                           settings.n_repeats, notes)



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

