"""Gated-attention multiple-instance learning (ABMIL) over a patient's bag of patch embeddings.

Plain Python (no Dagster). An alternative to mean pooling for the pathology block: each patient is a
bag of patch embeddings (N_i, D), one label per bag. The network (Ilse et al. 2018, gated attention
as in CLAM) is

    h_i = ReLU(W1 x_i + b1)                         x_i: the standardised patch embedding
    a_i = w^T (tanh(V h_i + b_V) * sigmoid(U h_i + b_U))
    attention = softmax_i(a_i),   z = sum_i attention_i h_i,   logit = c^T z + d

trained with class-balanced BCE-with-logits (pos_weight = n_neg / n_pos) and Adam, one bag per step.
It is small on purpose: the cohorts are a few hundred patients at most, and it is fitted inside each
cross-validation fold on that fold's labelled training patients only.

Attention is not a contribution. The weights say where the pooling looked, not how much a patch moved
the risk: the logit is linear in z, so a patch with high attention may push the risk either way (its
h_i . c has either sign), and the softmax couples every patch's weight to the others in the bag.
Read them as a map of what the model attended to, never as per-patch evidence or a saliency score.

Early stopping uses an inner stratified split of the given patients (`validation_fraction`, at least
one patient of each class on each side): the weights of the epoch with the lowest validation loss are
kept, training stops after `patience` epochs without improvement, and nothing is refitted on the
whole set (that would need an epoch count chosen on data it then trains on). The feature mean and
scale come from the inner training bags only. If a class has fewer than 2 patients there is no split:
the model trains on all of them for `epochs_without_validation` epochs (at most `max_epochs`) and
`notes` says so.

Determinism: all randomness (initial weights, bag order, per-epoch subsampling of bags larger than
`max_train_patches`, dropout masks) comes from `settings.seed` through a numpy Generator and a
torch.Generator; torch's global random state is not touched. The fit runs with one torch CPU thread
(reduction order fixed) and restores the previous thread count afterwards, since torch.set_num_threads
is process-global. The same inputs and seed give bit-identical weights on the same machine and build.

`AbmilModel` holds only numpy arrays and plain Python values, so skops can save it with this class on
the trusted list (`TRUSTED_TYPES`); inference is pure numpy in float64 and agrees with the float32
torch forward used in training (`torch_logits`) to well under 1e-5 on the logit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

PARAMETER_NAMES = ("hidden_weight", "hidden_bias", "gate_tanh_weight", "gate_tanh_bias",
                   "gate_sigmoid_weight", "gate_sigmoid_bias", "attention_weight",
                   "classifier_weight", "classifier_bias")


@dataclass(frozen=True)
class AbmilSettings:
    hidden: int = 64  # width of h
    attention: int = 32  # width of the gated attention branch
    dropout: float = 0.1  # on h, in training only
    max_epochs: int = 60
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4  # Adam's L2 term
    patience: int = 10  # epochs without a lower validation loss before stopping
    validation_fraction: float = 0.25  # of each class, for early stopping
    max_train_patches: int = 512  # larger bags are subsampled afresh each epoch in training
    epochs_without_validation: int = 20  # fixed length when a class is too small to split
    seed: int = 0

    def __post_init__(self):
        for name in ("hidden", "attention", "max_epochs", "patience", "max_train_patches",
                     "epochs_without_validation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction!r}")


# ---------------------------------------------------------------- input checks


def check_bags(bags: Sequence[np.ndarray], n_features: int | None = None) -> int:
    """The bags' feature dimension; ValueError naming the first bad bag (by its index in `bags`)."""
    if isinstance(bags, np.ndarray) or not isinstance(bags, Sequence):
        raise ValueError(f"bags must be a list of 2-D arrays (one per patient), got {type(bags).__name__}")
    if len(bags) == 0:
        raise ValueError("no bags given")
    for index, bag in enumerate(bags):
        array = np.asarray(bag)
        if array.ndim != 2:
            raise ValueError(f"bag {index}: expected a 2-D array (patches, features), got shape {array.shape}")
        if array.dtype.kind not in "fiu":
            raise ValueError(f"bag {index}: expected real numbers, got dtype {array.dtype}")
        if array.shape[0] == 0:
            raise ValueError(f"bag {index} has no patches")
        if n_features is None:
            n_features = array.shape[1]
        if array.shape[1] != n_features:
            raise ValueError(f"bag {index} has {array.shape[1]} features per patch, expected {n_features}")
        bad = array.size - int(np.isfinite(array).sum())
        if bad:
            raise ValueError(f"bag {index} has {bad} non-finite value(s) (NaN or infinity)")
    if n_features == 0:
        raise ValueError("the bags have 0 features per patch")
    return int(n_features)


def _check_labels(labels, n_bags: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n_bags,):
        raise ValueError(f"labels must have shape ({n_bags},) (one per bag), got {y.shape}")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()))[:5]}")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ValueError(f"ABMIL needs patients of both classes; all {n_bags} labels are {int(y[0])}")
    return y


# ---------------------------------------------------------------- pieces of the fit


def stratified_inner_split(labels: np.ndarray, fraction: float,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """(train rows, validation rows) with every class on both sides; None if a class has < 2 patients."""
    train, validation = [], []
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        if len(members) < 2:
            return None
        members = rng.permutation(members)
        n_validation = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        validation.append(members[:n_validation])
        train.append(members[n_validation:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


def patch_mean_scale(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation over all patches of `bags` (two passes, float64);
    a constant feature gets scale 1 so that standardising leaves it at 0."""
    n_patches = sum(len(bag) for bag in bags)
    mean = sum(np.asarray(bag).sum(axis=0, dtype=np.float64) for bag in bags) / n_patches
    variance = sum(((np.asarray(bag, dtype=np.float64) - mean) ** 2).sum(axis=0) for bag in bags) / n_patches
    scale = np.sqrt(variance)
    scale[~(scale > 1e-12)] = 1.0
    return mean, scale


def _standardised_float32(bag: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return ((np.asarray(bag, dtype=np.float64) - mean) / scale).astype(np.float32)


def _initial_parameters(torch, n_features: int, settings: AbmilSettings, generator) -> dict:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases (torch.nn.Linear's default),
    drawn from the fit's own generator."""
    hidden, attention = settings.hidden, settings.attention
    shapes = {"hidden_weight": ((hidden, n_features), n_features), "hidden_bias": ((hidden,), n_features),
              "gate_tanh_weight": ((attention, hidden), hidden), "gate_tanh_bias": ((attention,), hidden),
              "gate_sigmoid_weight": ((attention, hidden), hidden), "gate_sigmoid_bias": ((attention,), hidden),
              "attention_weight": ((attention,), attention),
              "classifier_weight": ((hidden,), hidden), "classifier_bias": ((), hidden)}
    parameters = {}
    for name in PARAMETER_NAMES:
        shape, fan_in = shapes[name]
        bound = 1.0 / math.sqrt(fan_in)
        values = (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        parameters[name] = values.requires_grad_(True)
    return parameters


def _torch_forward(torch, parameters: dict, x, dropout_mask=None):
    """(logit, attention) of one bag; x: (N, D) standardised float32 tensor."""
    h = torch.relu(x @ parameters["hidden_weight"].T + parameters["hidden_bias"])
    if dropout_mask is not None:
        h = h * dropout_mask
    gate = (torch.tanh(h @ parameters["gate_tanh_weight"].T + parameters["gate_tanh_bias"])
            * torch.sigmoid(h @ parameters["gate_sigmoid_weight"].T + parameters["gate_sigmoid_bias"]))
    attention = torch.softmax(gate @ parameters["attention_weight"], dim=0)
    pooled = attention @ h
    return pooled @ parameters["classifier_weight"] + parameters["classifier_bias"], attention


def _balanced_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of the per-class mean BCE: each class counts equally, as pos_weight makes it in training."""
    per_patient = np.logaddexp(0.0, logits) - labels * logits  # -log p(label), stable
    return float(np.mean([per_patient[labels == cls].mean() for cls in (0, 1)]))


# ---------------------------------------------------------------- the fitted model


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic function, without exp overflow


class AbmilModel:
    """A fitted ABMIL: float32 weights, the standardisation, settings and the training record.

    Its state is only numpy arrays and plain Python values (skops-safe); inference is numpy only.
    """

    def __init__(self, *, parameters: dict[str, np.ndarray], feature_mean: np.ndarray,
                 feature_scale: np.ndarray, settings: dict, training: dict, notes: list[str]):
        self.parameters = parameters
        self.feature_mean = feature_mean
        self.feature_scale = feature_scale
        self.settings = settings
        self.training = training
        self.notes = notes

    @property
    def n_features(self) -> int:
        return int(self.feature_mean.shape[0])

    def _forward(self, bag: np.ndarray) -> tuple[float, np.ndarray]:
        p = {name: value.astype(np.float64) for name, value in self.parameters.items()}
        x = (np.asarray(bag, dtype=np.float64) - self.feature_mean) / self.feature_scale
        h = np.maximum(x @ p["hidden_weight"].T + p["hidden_bias"], 0.0)
        gate = (np.tanh(h @ p["gate_tanh_weight"].T + p["gate_tanh_bias"])
                * _sigmoid(h @ p["gate_sigmoid_weight"].T + p["gate_sigmoid_bias"]))
        scores = gate @ p["attention_weight"]
        weights = np.exp(scores - scores.max())
        attention = weights / weights.sum()
        return float(attention @ h @ p["classifier_weight"] + p["classifier_bias"]), attention

    def logits(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """The logit of each bag, shape (n,)."""
        check_bags(bags, self.n_features)
        return np.array([self._forward(bag)[0] for bag in bags])

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """The probability of the positive class for each bag, shape (n,)."""
        return _sigmoid(self.logits(bags))

    def attention(self, bag: np.ndarray) -> np.ndarray:
        """The attention weights over the bag's patches, shape (N,): non-negative, summing to 1."""
        check_bags([bag], self.n_features)
        return self._forward(bag)[1]

    def describe(self) -> dict:
        n_parameters = int(sum(value.size for value in self.parameters.values()))
        return {"model": "gated-attention MIL (ABMIL)", "n_features": self.n_features,
                "hidden": int(self.settings["hidden"]), "attention": int(self.settings["attention"]),
                "n_parameters": n_parameters,
                **{key: self.training[key] for key in ("n_train_patients", "n_validation_patients",
                                                       "early_stopping", "epochs_run", "best_epoch",
                                                       "best_validation_loss")},
                "settings": dict(self.settings), "notes": list(self.notes)}


TRUSTED_TYPES = [f"{__name__}.{AbmilModel.__name__}"]  # for skops.io.load; numpy arrays are trusted by default


# ---------------------------------------------------------------- training


def fit_abmil(bags: Sequence[np.ndarray], labels, settings: AbmilSettings = AbmilSettings()) -> AbmilModel:
    """Train ABMIL on the given (labelled, training) patients; see the module docstring."""
    import torch

    n_features = check_bags(bags)
    y = _check_labels(labels, len(bags))
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    split = stratified_inner_split(y, settings.validation_fraction, rng)
    notes: list[str] = []
    if split is None:
        train_rows, validation_rows = np.arange(len(y)), np.array([], dtype=np.int64)
        notes.append(f"a class has fewer than 2 patients ({int((y == 0).sum())} negative, "
                     f"{int((y == 1).sum())} positive): no validation split, no early stopping; "
                     f"trained on all {len(y)} patients for a fixed {_fixed_epochs(settings)} epochs")
    else:
        train_rows, validation_rows = split
    mean, scale = patch_mean_scale([bags[i] for i in train_rows])

    with _one_torch_thread(torch):
        parameters, record = _train(torch, bags, y, train_rows, validation_rows, mean, scale,
                                    n_features, settings, rng, generator)
    record.update(train_rows=train_rows.tolist(), validation_rows=validation_rows.tolist(),
                  n_train_patients=len(train_rows), n_validation_patients=len(validation_rows))
    return AbmilModel(parameters=parameters, feature_mean=mean, feature_scale=scale,
                      settings=asdict(settings), training=record, notes=notes)


@contextmanager
def _one_torch_thread(torch):
    """One intra-op thread (a fixed reduction order, and no oversubscription of small matrices),
    then the process-wide setting as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fixed_epochs(settings: AbmilSettings) -> int:
    return min(settings.epochs_without_validation, settings.max_epochs)


def _train(torch, bags, y, train_rows, validation_rows, mean, scale, n_features,
           settings: AbmilSettings, rng: np.random.Generator, generator) -> tuple[dict, dict]:
    parameters = _initial_parameters(torch, n_features, settings, generator)
    optimiser = torch.optim.Adam(list(parameters.values()), lr=settings.learning_rate,
                                 weight_decay=settings.weight_decay)
    n_positive = int(y[train_rows].sum())
    pos_weight = torch.tensor((len(train_rows) - n_positive) / n_positive, dtype=torch.float32)
    early_stopping = len(validation_rows) > 0
    n_epochs = settings.max_epochs if early_stopping else _fixed_epochs(settings)
    validation_x = [torch.from_numpy(_standardised_float32(bags[i], mean, scale)) for i in validation_rows]
    keep_probability = 1.0 - settings.dropout

    train_losses: list[float] = []
    validation_losses: list[float] = []
    best_loss, best_epoch, best = math.inf, 0, None
    for epoch in range(1, n_epochs + 1):
        epoch_loss = 0.0
        for row in rng.permutation(train_rows):
            bag = np.asarray(bags[row])
            if len(bag) > settings.max_train_patches:
                bag = bag[np.sort(rng.choice(len(bag), settings.max_train_patches, replace=False))]
            x = torch.from_numpy(_standardised_float32(bag, mean, scale))
            mask = None
            if settings.dropout > 0:
                draws = torch.rand((len(bag), settings.hidden), generator=generator)
                mask = (draws < keep_probability).to(torch.float32) / keep_probability
            logit, _ = _torch_forward(torch, parameters, x, mask)
            target = torch.tensor(float(y[row]))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, pos_weight=pos_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            epoch_loss += loss.item()
        if not math.isfinite(epoch_loss):
            raise RuntimeError(f"ABMIL training diverged (non-finite loss in epoch {epoch}); "
                               f"lower the learning rate")
        train_losses.append(epoch_loss / len(train_rows))
        if not early_stopping:
            continue
        with torch.no_grad():
            logits = np.array([float(_torch_forward(torch, parameters, x)[0]) for x in validation_x])
        validation_losses.append(_balanced_loss(logits, y[validation_rows]))
        if not math.isfinite(validation_losses[-1]):
            raise RuntimeError(f"ABMIL training diverged (non-finite validation loss in epoch {epoch})")
        if validation_losses[-1] < best_loss:
            best_loss, best_epoch = validation_losses[-1], epoch
            best = {name: value.detach().clone() for name, value in parameters.items()}
        elif epoch - best_epoch >= settings.patience:
            break
    if best is None:  # no validation: the last epoch's weights
        best, best_epoch = {name: value.detach() for name, value in parameters.items()}, len(train_losses)
    arrays = {name: value.numpy().astype(np.float32, copy=True) for name, value in best.items()}
    record = {"early_stopping": early_stopping, "epochs_run": len(train_losses), "best_epoch": best_epoch,
              "best_validation_loss": best_loss if early_stopping else None,
              "train_losses": [round(v, 6) for v in train_losses],
              "validation_losses": [round(v, 6) for v in validation_losses]}
    return arrays, record


def torch_logits(model: AbmilModel, bags: Sequence[np.ndarray]) -> np.ndarray:
    """The logits of the torch forward used in training (eval mode: no dropout, whole bags), float32;
    a check that the numpy inference computes the same network."""
    import torch

    check_bags(bags, model.n_features)
    parameters = {name: torch.from_numpy(value) for name, value in model.parameters.items()}
    logits = []
    with torch.no_grad(), _one_torch_thread(torch):
        for bag in bags:
            x = torch.from_numpy(_standardised_float32(bag, model.feature_mean, model.feature_scale))
            logits.append(float(_torch_forward(torch, parameters, x)[0]))
    return np.array(logits)
