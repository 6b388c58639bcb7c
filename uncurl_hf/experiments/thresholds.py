"""Thresholds of a factor sweep: the largest factor a method can prune to while staying within a tolerance of the
unpruned score, and its bootstrap confidence interval (the sweep itself is :mod:`uncurl_hf.experiments.sweep`).

Everything here works on per-example score vectors already measured, so thresholds for another tolerance, or
another number of resamples, are recomputed without running any model.

Definitions (the choices, and why):

* Threshold of a method: the largest swept factor ``f`` such that ``score(g) >= score(1) - tol`` for EVERY swept
  factor ``g <= f`` ("largest factor before the first failure"). A non-monotone curve that dips below the budget
  at x4 and recovers at x8 has threshold x2, not x8: the recovery is most often evaluation noise, and a user who
  prunes at the threshold expects every milder factor to be safe too. Comparisons allow 1e-9 of float slack, so a
  drop of exactly ``tol`` passes.
* Bootstrap: ``B`` resamples (seeded) of the evaluation examples with replacement, the SAME resamples for every
  method and factor (paired, like the point estimate); the threshold is recomputed on each, and the interval is
  the 2.5th / 97.5th percentile (``inverted_cdf``, so the bounds are swept factors). Each point's score gets the
  same percentile interval.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from uncurl_hf.errors import SweepError

if TYPE_CHECKING:
    from uncurl_hf.experiments.sweep import SweepResult

CONFIDENCE = 0.95
_SLACK = 1e-9  # float slack of the tolerance comparison: a drop of exactly ``tol`` passes


def threshold_factor(factors: Sequence[float], scores: Sequence[float], tolerance: float) -> float:
    """The largest factor ``f`` with ``scores[g] >= scores[0] - tolerance`` for every ``g <= f``.

    ``factors`` ascend and start at 1 (``scores[0]`` is the unpruned score); ``tolerance`` is in metric units.
    """
    _check_factor_grid(factors, len(scores))
    floor = scores[0] - tolerance - _SLACK
    chosen = factors[0]
    for factor, score in zip(factors, scores):
        if not score >= floor:  # also stops at NaN
            break
        chosen = factor
    return float(chosen)


def bootstrap_weights(num_examples: int, num_resamples: int, seed: int) -> np.ndarray:
    """``[B, N]`` how often each example is drawn in each of ``B`` seeded resamples with replacement."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((num_resamples, num_examples), dtype=np.float64)
    for b in range(num_resamples):
        weights[b] = np.bincount(rng.integers(0, num_examples, num_examples), minlength=num_examples)
    return weights


def bootstrap_thresholds(
    factors: Sequence[float], per_example: np.ndarray, tolerance: float, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds ``[B]`` and scores ``[B, F]`` of every resample (rows of ``weights``) of a method's ``[F, N]``
    per-example matrix (row 0 = factor 1)."""
    _check_factor_grid(factors, per_example.shape[0])
    scores = weights @ per_example.T / per_example.shape[1]  # [B, F]
    ok = scores >= scores[:, :1] - tolerance - _SLACK
    passed = np.cumprod(ok, axis=1).sum(axis=1)  # factors before the first failure (>= 1: factor 1 passes)
    return np.asarray(factors, dtype=np.float64)[passed - 1], scores


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The (lower, upper) percentile interval; ``inverted_cdf`` keeps the bounds on observed values."""
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf", axis=0)
    return float(low), float(high)


def _check_factor_grid(factors: Sequence[float], n: int) -> None:
    if len(factors) != n or not factors or factors[0] != 1 or any(b <= a for a, b in itertools.pairwise(factors)):
        raise SweepError(f"Factors must ascend from 1 with one score each; got {list(factors)} for {n} scores.")


@dataclass
class Threshold:
    """A method's threshold factor, with its bootstrap interval (``None`` when ``bootstrap == 0``)."""

    method: str
    factor: float
    ci_low: float | None
    ci_high: float | None
    tolerance: float  # points
    bootstrap: int
    effective_factor: float
    censored: bool = False  # no swept factor failed: the true threshold is this factor or larger

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_thresholds(result: SweepResult) -> dict[str, Threshold]:
    """Fill ``result.thresholds`` (point estimate + bootstrap CI per method) and each point's score CI."""
    config = result.config
    tol = config.tolerance / 100.0
    factors = list(config.factors)
    weights = (bootstrap_weights(result.num_examples, config.bootstrap, config.seed)
               if config.bootstrap else None)
    thresholds: dict[str, Threshold] = {}
    for method in config.methods:
        row = [result.point(method, f) for f in factors]
        factor = threshold_factor(factors, [p.score for p in row], tol)
        low = high = None
        if weights is not None:
            resampled, scores = bootstrap_thresholds(factors, np.stack([p.per_example for p in row]), tol, weights)
            low, high = percentile_interval(resampled)
            for i, p in enumerate(row):
                p.score_ci = percentile_interval(scores[:, i])
        chosen = result.point(method, factor)
        thresholds[method] = Threshold(method, factor, low, high, config.tolerance, config.bootstrap,
                                       round(chosen.effective_factor, 6), censored=factor == factors[-1])
    result.thresholds = thresholds
    return thresholds
