"""How the blocks' logits become one fused logit: the mean-logit rule or a stacked combiner.

Plain Python (no Dagster). Both take a matrix of block logits (patients x blocks, NaN where a
patient lacks the block) and give one logit per patient (NaN where the patient has no block).

- `MeanLogitCombiner` ("mean"): the mean of the logits the patient has. Nothing is fitted; every
  block weighs the same, so a weak block dilutes a strong one.
- `StackedCombiner` ("stacked"): a logistic regression on the blocks' OUT-OF-FOLD logits (the
  caller fits it on predictions the blocks made for patients they were not trained on), so it
  learns how much to trust each block. Its block weights are kept non-negative (a block's logit
  points the same way as the label by construction; a negative weight would be fitted noise) and
  L2-penalised towards 0; the intercept is free. Classes are balanced as in the blocks.
  Missing blocks: the block's logit counts as 0 (no evidence either way) and, for a block that was
  missing for some training patients and present for others, an availability indicator (1 =
  present) with a weight of its own absorbs any shift between patients with and without it.

The fused logit is always `intercept + sum_k weight_k * logit_k + sum_k indicator_weight_k * present_k`
(`terms`), which is what the explanations report as "how the blocks combine".
"""

from __future__ import annotations

import numpy as np

FUSIONS = ("mean", "stacked")
PROBABILITY_CLIP = 1e-6  # keeps logits finite for a forest's 0/1 votes


def probability_to_logit(probabilities: np.ndarray) -> np.ndarray:
    """Logits of probabilities clipped to [1e-6, 1 - 1e-6]; NaN stays NaN."""
    p = np.asarray(probabilities, dtype=np.float64)
    clipped = np.clip(p, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(p), np.log(clipped) - np.log1p(-clipped), np.nan)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


class MeanLogitCombiner:
    """The mean of the logits of the blocks a patient has (no parameters)."""

    name = "mean"

    def __init__(self, blocks: tuple[str, ...] | list[str] = ()):
        self.blocks = list(blocks)

    def fit(self, block_logits: np.ndarray, labels: np.ndarray) -> MeanLogitCombiner:
        return self

    def terms(self, block_logits: np.ndarray) -> dict[str, np.ndarray]:
        """Per patient: intercept (n,), block weights (n, k), indicator weights (n, k) of the fused logit."""
        present = np.isfinite(block_logits)
        counts = present.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            weights = np.where(present, 1.0 / counts[:, None], 0.0)
        return {"intercept": np.zeros(len(block_logits)), "weights": weights,
                "indicator_weights": np.zeros_like(weights)}

    def fused_logit(self, block_logits: np.ndarray) -> np.ndarray:
        return _apply_terms(self.terms(block_logits), block_logits)

    def describe(self) -> dict:
        return {"rule": "mean of the logits of the blocks the patient has", "weights": "1 / blocks present"}


class StackedCombiner:
    """Non-negative, L2-penalised, class-balanced logistic regression on out-of-fold block logits."""

    name = "stacked"

    def __init__(self, blocks: tuple[str, ...] | list[str] = (), C: float = 1.0):
        self.blocks = list(blocks)
        self.C = C

    def fit(self, block_logits: np.ndarray, labels: np.ndarray) -> StackedCombiner:
        from scipy.optimize import minimize

        logits = np.asarray(block_logits, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        present = np.isfinite(logits)
        usable = present.any(axis=1)
        logits, present, y = logits[usable], present[usable], y[usable]
        k = logits.shape[1]
        # an indicator only where it can be estimated: some training patients with the block, some without
        self.indicator_blocks_ = (present.any(axis=0) & ~present.all(axis=0)).astype(bool)
        design = np.hstack([np.where(present, logits, 0.0), present[:, self.indicator_blocks_].astype(float)])
        n_pos, n_neg = max(y.sum(), 1.0), max((1 - y).sum(), 1.0)
        sample_weight = np.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
        penalty = 1.0 / (self.C * max(len(y), 1))

        def loss_and_gradient(theta):
            intercept, beta = theta[0], theta[1:]
            z = intercept + design @ beta
            # weighted mean log loss of y given z, written stably
            loss = np.sum(sample_weight * (np.logaddexp(0.0, z) - y * z)) / len(y)
            residual = sample_weight * (sigmoid(z) - y) / len(y)
            gradient = np.concatenate([[residual.sum()], design.T @ residual])
            loss += 0.5 * penalty * np.sum(beta ** 2)
            gradient[1:] += penalty * beta
            return loss, gradient

        n_terms = design.shape[1]
        start = np.concatenate([[0.0], np.full(k, 1.0 / max(k, 1)), np.zeros(n_terms - k)])
        bounds = [(None, None)] + [(0.0, None)] * k + [(None, None)] * (n_terms - k)
        result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 500, "gtol": 1e-10})
        theta = result.x
        self.intercept_ = float(theta[0])
        self.weights_ = np.asarray(theta[1:k + 1], dtype=np.float64)
        indicator = np.zeros(k)
        indicator[self.indicator_blocks_] = theta[k + 1:]
        self.indicator_weights_ = indicator
        self.n_train_ = int(len(y))
        return self

    def terms(self, block_logits: np.ndarray) -> dict[str, np.ndarray]:
        present = np.isfinite(block_logits)
        n = len(block_logits)
        return {"intercept": np.full(n, self.intercept_),
                "weights": np.where(present, self.weights_[None, :], 0.0),
                "indicator_weights": np.where(present, self.indicator_weights_[None, :], 0.0)}

    def fused_logit(self, block_logits: np.ndarray) -> np.ndarray:
        return _apply_terms(self.terms(block_logits), block_logits)

    def describe(self) -> dict:
        return {"rule": "non-negative L2 logistic regression on the blocks' out-of-fold logits "
                        "(missing block: logit 0, plus an availability indicator where training had both)",
                "C": self.C, "intercept": round(self.intercept_, 4),
                "weights": {b: round(float(w), 4) for b, w in zip(self.blocks, self.weights_)},
                "indicator_weights": {b: round(float(w), 4) for b, w, used in
                                      zip(self.blocks, self.indicator_weights_, self.indicator_blocks_) if used},
                "train_patients": self.n_train_}


def _apply_terms(terms: dict[str, np.ndarray], block_logits: np.ndarray) -> np.ndarray:
    present = np.isfinite(block_logits)
    logits = np.where(present, block_logits, 0.0)
    fused = terms["intercept"] + (terms["weights"] * logits).sum(axis=1) + terms["indicator_weights"].sum(axis=1)
    return np.where(present.any(axis=1), fused, np.nan)


def make_combiner(fusion: str, blocks: tuple[str, ...] | list[str]):
    if fusion == "mean":
        return MeanLogitCombiner(blocks)
    if fusion == "stacked":
        return StackedCombiner(blocks)
    raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
