"""The reconstruction guard of the merging methods (``guard=true``): per layer, merge or prune, whichever the layer's
output says is better.

A merge replaces a group by one averaged expert; when a group's members compute very different functions the
average can be worse than keeping the group's most salient member alone and letting the router send the others'
tokens elsewhere (plain pruning, e.g. REAP). Which is better differs from layer to layer, so the guard measures it:
for each candidate plan of a layer it runs the *reduced* layer (the surgery's own tensors:
:func:`uncurl_hf.surgery.apply.reduce_layer`, routed as the checkpoint will route) and the original layer on the
sampled calibration tokens that entered the layer (``stats.hidden_sample``, at most :data:`GUARD_TOKENS`, seeded),
and keeps the plan with the smallest relative error

    err(P) = ||F(X) - F_P(X)||_F / ||F(X)||_F,    F(x) = sum_{e in topk(x)} g_e(x) E_e(x)

(the family's gate: softmax probability, or renormalized over the chosen experts). Candidates: the method's merge,
and the same groups pruned (each group's member with the highest REAP score kept alone: with UNCURL's default
REAP centres, exactly REAP's kept set). The first candidate wins a tie, so the guard never returns a plan whose error
exceeds any candidate's on this proxy. The errors are recorded in the plan (``extras["guard"]``, 4 significant
digits; a diagnostic the surgery never reads).

The proxy's tokens are calibration tokens, not held out: the groups were built from statistics of the same text,
but no candidate was fitted to this error, so it ranks them without favouring one. Switch's per-sequence capacity
is ignored (tokens are scored one by one), as in NAEE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch.nn import functional as F

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods.hcsmoe import token_subset
from uncurl_hf.methods.naee import routed_gates
from uncurl_hf.methods.reap import reap_scores
from uncurl_hf.plan import LayerPlan
from uncurl_hf.surgery.apply import reduce_layer

GUARD_TOKENS = 1024  # sampled calibration tokens per layer the candidates are compared on


@torch.no_grad()
def moe_output(
    family: MoEFamily,
    layer: MoELayer,
    hidden: torch.Tensor,
    router: Mapping[str, torch.Tensor],
    expert: Callable[[int, torch.Tensor], torch.Tensor],
    expert_map: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[T, D]`` float32: the MoE block with router tensors ``router`` (``weight [R, D]``, optional ``bias``) and
    ``expert(j, x)`` as its experts, on ``hidden [T, D]``; with ``expert_map`` the router's choice ``r`` runs
    expert ``expert_map[r]`` (a logical merge)."""
    bias = router.get("bias")
    logits = F.linear(hidden.float(), router["weight"].float(), None if bias is None else bias.float())
    selected, gates = (t[0] for t in routed_gates(family, layer, logits))  # top-min(k, rows), the family's gate
    if expert_map is not None:
        selected = torch.as_tensor(list(expert_map), device=selected.device)[selected]
    out = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for j in torch.unique(selected).tolist():
        token, slot = torch.nonzero(selected == j, as_tuple=True)
        value = expert(j, hidden[token]).float() * gates[token, slot, None].float()
        out.index_add_(0, token, value)
    return out


def guard_candidates(plan: LayerPlan, stats: ExpertStats) -> list[tuple[str, LayerPlan]]:
    """``[("merge", plan), ("prune", each group's highest-REAP member kept alone)]``, in tie-breaking order."""
    scores = reap_scores(stats).tolist()
    kept = [max(group, key=lambda e: (scores[e], -e)) for group in plan.groups]
    return [("merge", plan), ("prune", LayerPlan.keep(plan.name, plan.num_experts, kept))]


@torch.no_grad()
def relative_errors(
    family: MoEFamily, layer: MoELayer, candidates: Sequence[tuple[str, LayerPlan]], hidden: torch.Tensor
) -> dict[str, float]:
    """``{candidate name: err}`` on ``hidden`` (module docstring); ``nan`` without tokens."""
    if hidden.shape[0] == 0:
        return {name: float("nan") for name, _ in candidates}
    hidden = family.expert_input(layer, hidden)
    full = moe_output(family, layer, hidden, family.router_tensors(layer), lambda j, x: family.run_expert(layer, j, x))
    norm = float(full.double().norm()) or 1.0
    errors = {}
    for name, plan in candidates:
        reduced = reduce_layer(family, layer, plan, scale_expert_capacity=False)
        approx = moe_output(family, layer, hidden, reduced.router,
                            lambda j, x: family.run_expert_tensors(layer, reduced.experts[j], x), reduced.expert_map)
        errors[name] = float((full - approx).double().norm()) / norm
    return errors


def guarded_plan(family: MoEFamily, layer: MoELayer, plan: LayerPlan, stats: ExpertStats, seed: int) -> LayerPlan:
    """The candidate of :func:`guard_candidates` with the smallest error (the first on a tie), its ``extras["guard"]``
    recording every candidate's error."""
    candidates = guard_candidates(plan, stats)
    hidden = token_subset(stats.hidden_sample, GUARD_TOKENS, seed)
    errors = relative_errors(family, layer, candidates, hidden)
    chosen, best = candidates[0]
    for name, candidate in candidates[1:]:
        if errors[name] < errors[chosen]:
            chosen, best = name, candidate
    best.extras["guard"] = {
        "chosen": chosen,
        "errors": {name: float(f"{error:.4g}") for name, error in errors.items()},
        "tokens": int(hidden.shape[0]),
    }
    return best
