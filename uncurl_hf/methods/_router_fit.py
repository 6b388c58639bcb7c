"""A merged layer's router rows fitted so that every calibration token keeps its routing over groups, and what a
merge costs the routing (:func:`merge_diagnostics`, recorded in every merged layer's plan).

Merging replaces a group's experts by one expert, and the router by one row per group. The default row is the
usage-weighted average of the members' rows (``router="weighted"``). A single averaged row cannot reproduce the
members' logits: measured on the study zoo's E=64 Switch (topic, x2), tokens migrate between groups and the top-1
gate's scale changes, which is what makes merging lose where pruning (which keeps rows exactly) does not.

``router="fitted"`` keeps the row a linear combination of the members' rows, ``row_g = sum_m c_m r_m`` (bias
likewise), but fits the coefficients ``c`` (one per original expert, so a plan stays a small JSON file and a
re-applied plan needs no calibration data) on the calibration tokens' router logits ``L [S, E]``:

    minimize  mean_s KL( q_s || softmax_g(z_s) ) + lam * ||c - c0||^2
    q_s[g] = sum_{m in g, m in top_k(s)} p_s[m] / sum_{m in top_k(s)} p_s[m],   p_s = softmax(L_s)
    z_s[g] = sum_{m in g} c_m L_s[m]               (the merged router's logit of group g: linear in c)

``q_s`` is the gate the original model applied to token ``s`` (its top-k probabilities, renormalized), summed per
group: for a top-1 Switch layer the one-hot of the group of the token's expert, for a top-8 decoder the share of the
token's applied gate each group holds. Fitting the full softmax mass instead (every expert's probability, selected or
not) keeps the merged router as soft as the original, but on a crafted case (two collinear members, tested) it
moved tokens to the other group as often as the weighted row did: the tokens' selections are what the merged model
must reproduce. Fitting selections alone sharpens the router (larger coefficients), which scales the gate every
expert output is multiplied by; so the fitted coefficients are then rescaled by one temperature ``t > 0`` per layer,
chosen to match the full softmax mass per group (``min_t KL(sum_{m in g} p_s[m] || softmax(t z_s))``). A positive
scale changes no token's top-k groups, so the selections fitted above are kept exactly.

``c0`` are the usage weights (the ``weighted`` rule, the starting point); the small ridge keeps rows of groups the
calibration never reached where they were. The objective is convex in ``c`` (a softmax cross-entropy of a linear
map), so L-BFGS in float64 reaches the same optimum from the same start: the coefficients are deterministic for the
same statistics. Only the sampled logits are needed: a group logit is a combination of member logits, so the hidden
states themselves never enter the fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from uncurl_hf.calibration.stats import ExpertStats

logger = logging.getLogger(__name__)

RIDGE = 1e-3
MAX_ITERATIONS = 200


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def applied_group_gates(
    logits: np.ndarray, probs: np.ndarray, groups: Sequence[Sequence[int]], top_k: int
) -> np.ndarray:
    """``[S, G]``: the renormalized top-k gate of every token (``probs = softmax(logits)``), summed over each group's
    members (rows sum to 1; a token whose selected experts are all outside the groups is spread uniformly)."""
    selected = np.argsort(-logits, axis=1, kind="stable")[:, : max(1, top_k)]
    applied = np.zeros_like(probs)
    np.put_along_axis(applied, selected, np.take_along_axis(probs, selected, axis=1), axis=1)
    target = np.stack([applied[:, list(group)].sum(axis=1) for group in groups], axis=1)
    total = target.sum(axis=1, keepdims=True)
    return np.where(total > 0, target / np.where(total > 0, total, 1.0), 1.0 / len(groups))


def fit_router_coefficients(
    logits: np.ndarray, groups: Sequence[Sequence[int]], initial: Sequence[Sequence[float]], top_k: int = 1
) -> list[list[float]]:
    """Per group, per member, the coefficient of the member's router row in the group's row (see the module doc).

    ``logits`` is ``[S, E]`` (float64), ``groups`` partition (a subset of) the experts, ``initial`` are the starting
    coefficients in the groups' shape, ``top_k`` the experts each token is routed to. Without sampled tokens the starting coefficients are returned unchanged.
    """
    from scipy.optimize import minimize  # lazy: keeps `import uncurl_hf` light

    logits = np.asarray(logits, dtype=np.float64)
    if logits.size == 0 or len(groups) < 2:
        return [[float(c) for c in row] for row in initial]
    members = [m for group in groups for m in group]
    owner = np.array([g for g, group in enumerate(groups) for _ in group])
    member_logits = logits[:, members]  # [S, M]: the members' logits in the groups' order
    probs = _softmax(logits)  # the original router's distribution: the targets of both fits below
    target = applied_group_gates(logits, probs, groups, top_k)
    start = np.array([float(c) for row in initial for c in row])
    onehot = np.zeros((len(members), len(groups)))
    onehot[np.arange(len(members)), owner] = 1.0
    count = logits.shape[0]

    def objective(c: np.ndarray) -> tuple[float, np.ndarray]:
        z = (member_logits * c) @ onehot  # [S, G]
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        loss = -(target * log_p).sum() / count + RIDGE * float(((c - start) ** 2).sum())
        residual = (np.exp(log_p) - target) / count  # d loss / d z
        grad = (member_logits * (residual @ onehot.T)).sum(axis=0) + 2 * RIDGE * (c - start)
        return loss, grad

    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITERATIONS})
    if not np.all(np.isfinite(result.x)):
        logger.warning("router fit diverged; keeping the usage-weighted rows")
        return [[float(c) for c in row] for row in initial]
    fitted = result.x * _temperature(member_logits * result.x @ onehot, probs, owner, members)
    out, position = [], 0
    for group in groups:
        out.append([float(v) for v in fitted[position : position + len(group)]])
        position += len(group)
    return out


def _temperature(z: np.ndarray, probs: np.ndarray, owner: np.ndarray, members: list[int]) -> float:
    """The scale ``t`` in ``[1/20, 20]`` whose ``softmax(t z)`` is closest (KL) to the groups' full softmax mass."""
    from scipy.optimize import minimize_scalar

    mass = np.zeros((probs.shape[0], int(owner.max()) + 1))
    np.add.at(mass.T, owner, probs[:, members].T)
    mass /= np.clip(mass.sum(axis=1, keepdims=True), 1e-300, None)

    def kl(log_t: float) -> float:
        scaled = np.exp(log_t) * z
        log_p = scaled - scaled.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        return float(-(mass * log_p).sum() / z.shape[0])

    best = minimize_scalar(kl, bounds=(-np.log(20.0), np.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(best.x)) if np.isfinite(best.x) else 1.0


def group_agreement(
    logits: np.ndarray, groups: Sequence[Sequence[int]], coefficients: Sequence[Sequence[float]] | None
) -> float:
    """Share of sampled tokens whose top group under the merged router is the group of their top original expert.

    The diagnostic behind ``router="fitted"``: 1.0 means no calibration token changes group at top-1.
    ``coefficients=None`` is the ``"map"`` router (original rows plus an expert map), which agrees by construction.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.size == 0:
        return float("nan")
    if coefficients is None:
        return 1.0
    group_of = {m: g for g, group in enumerate(groups) for m in group}
    z = np.stack([logits[:, list(group)] @ np.asarray(c, dtype=np.float64) for group, c in zip(groups, coefficients)], 1)
    original = logits.argmax(axis=1)
    kept = np.array([group_of.get(int(e), -1) for e in original])
    return float((z.argmax(axis=1) == kept).mean())


def merge_diagnostics(
    stats: "ExpertStats",
    groups: Sequence[Sequence[int]],
    logits: np.ndarray,
    coefficients: Sequence[Sequence[float]] | None,
) -> dict[str, Any]:
    """What a merge costs the routing, recorded in the plan (``extras["diagnostics"]``) and printed by the benchmark.

    * ``merged_away``: share of the layer's routing decisions that went to a member other than its group's most-used
      one (the tokens whose expert is replaced by an average), from the integer counts;
    * ``group_sizes``: members per output expert, largest first;
    * ``dead_groups``: groups whose members together got under 0.1% of the routing decisions (slots spent on
      experts the task does not use);
    * ``router_agreement``: share of sampled tokens whose top group under the merged router rows is the group of
      their top original expert (NaN without sampled tokens).
    """
    counts = stats.counts.double()
    total = float(counts.sum())
    away = sum(float(counts[list(g)].sum() - counts[list(g)].max()) for g in groups)
    shares = [float(counts[list(g)].sum()) / total if total > 0 else 0.0 for g in groups]
    return {
        "merged_away": round(away / total, 6) if total > 0 else 0.0,
        "group_sizes": sorted((len(g) for g in groups), reverse=True),
        "dead_groups": sum(1 for share in shares if share < 1e-3),
        "router_agreement": round(group_agreement(logits, groups, coefficients), 6),
    }
