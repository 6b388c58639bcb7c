"""``naee``: the expert-pruning stage of NAEE (Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and
Skipping for Mixture-of-Experts Large Language Models", ACL 2024, arXiv 2402.14800).

Per sparse layer, keep the subset ``S`` of ``k = floor(E / factor)`` experts whose layer output best reconstructs the
full layer's on the calibration tokens (the paper's ``min_S ||F(x; theta) - F(x; theta_S)||_F``):

    F(x)   = sum_{e in topk_E(x)} g_e(x) E_e(x)          (the full MoE block)
    F_S(x) = sum_{e in topk_S(x)} g^S_e(x) E_e(x)        (the block after pruning to S)
    err(S) = ||F(X) - F_S(X)||_F = sqrt(sum_t ||F(x_t) - F_S(x_t)||^2)

where ``F_S`` routes exactly as the pruned checkpoint will: router logits restricted to ``S`` (the kept rows),
softmax over ``S``, the top ``min(top_k, |S|)`` of them, and the gate the family applies (the softmax probability
over ``S`` for Switch and Qwen/OLMoE without ``norm_topk_prob``; renormalized over the chosen experts for Mixtral,
gpt-oss and ``norm_topk_prob``; :meth:`MoEFamily.routing` picks the experts). A shared expert (Qwen2-MoE) is the
same in ``F`` and ``F_S`` and cancels. Switch's per-sequence capacity is ignored (tokens are scored one by one).

Search: every subset (lexicographic order, first one wins a tie) when ``C(E, k) <= max_combinations`` (default
4096, e.g. E = 16 at k = 8 is 12870: greedy); beyond, where enumeration is infeasible, greedy elimination: start
from all experts and remove, one at a time, the expert whose removal gives the smallest ``err`` (ties: the least
routed). With ``k = E - 1`` greedy *is* the exhaustive search; otherwise it is an upper bound of the optimum.

Computation: the tokens are the seeded sample of layer inputs calibration records (``stats.hidden_sample``; the
calibration statistics hold no layer outputs, so every expert is run on every sampled token here, as HC-SMoE does),
cut to ``max_tokens``. Expert outputs are computed in float32 whatever the model dtype (a float32 copy of one
layer's experts when the model is in half precision), and each token's ``[E, E]`` Gram matrix of expert outputs
``K_t = O_t O_t^T`` is kept in float64, so that ``||F - F_S||^2 = sum_t d_t^T K_t d_t`` with ``d_t = g_t - g^S_t``
(the gate vectors, at most ``2 top_k`` nonzeros) costs ``O(top_k^2)`` per token and subset, whatever the hidden size;
float64 because the quadratic form subtracts large terms. Memory: ``max_tokens * E^2 * 8`` bytes per layer; time:
``E * max_tokens`` expert calls plus ``C(E, k)`` (exhaustive) or ``(E^2 - k^2) / 2`` (greedy) subset evaluations.

The chosen subset's error is recorded in the layer plan (``extras["naee"]``: ``error``, ``relative_error`` =
``err / ||F||_F``, ``search``, ``subsets`` evaluated, ``tokens``), rounded to 4 significant digits: a diagnostic, never
read by the surgery (float sums are not bit-stable across thread counts, see ``ExpertStats.summary``).

Not part of the baseline: the paper's dynamic expert skipping at inference. ``protect_super_experts=true`` restricts
the search to subsets holding every super expert (:mod:`.super_experts`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import UncurlError
from uncurl_hf.families.base import MoEFamily, MoELayer
from uncurl_hf.methods import register_method
from uncurl_hf.methods._merging import find_layer
from uncurl_hf.methods.base import PruningMethod
from uncurl_hf.methods.frequency import rank_by_frequency
from uncurl_hf.methods.hcsmoe import token_subset
from uncurl_hf.methods.super_experts import (
    SuperExpertOptions,
    check_super_expert_options,
    keep_protected,
    protected_for,
)
from uncurl_hf.plan import LayerPlan
from uncurl_hf.seeding import stable_seed
from uncurl_hf.settings import setting

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22  # bound of the temporary tensors (expert outputs, gathered Gram blocks) per step


@dataclass(frozen=True)
class NAEEOptions(SuperExpertOptions):
    """NAEE's options (``uniform`` is accepted, and always true: the paper's counts are uniform)."""

    max_combinations: int = setting(
        4096, help="enumerate every subset of k experts when C(E, k) is at most this; greedy elimination beyond",
    )
    max_tokens: int = setting(2048, help="sampled calibration tokens the reconstruction is measured on")
    uniform: bool = setting(True, help="accepted for --uniform; NAEE always keeps floor(E / factor) per layer")


def float32_layer(layer: MoELayer, family: MoEFamily) -> MoELayer:
    """``layer`` itself when its experts and router are float32, else a float32 copy of it (one layer's weights)."""
    params = list(layer.module.parameters()) + list(layer.router.parameters())
    if all(p.dtype == torch.float32 for p in params):
        return layer
    copied = copy.deepcopy(layer, memo={id(family): family})
    copied.module.float()
    copied.router.float()
    return copied


def routed_gates(
    family: MoEFamily, layer: MoELayer, logits: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected [B, T, k], gates [B, T, k] float64)``: the experts each token goes to and the gates scaling them
    in the model pruned to each row of ``keep [B, E]`` (``None``: the full layer, ``B = 1``).

    Dropped experts get a logit of ``-inf``: the softmax over the others is then exactly the pruned router's, and
    no top-k ever picks them (``k = min(top_k, |S|)``; every row of ``keep`` must keep the same number of experts).
    """
    if keep is None:
        keep = torch.ones(1, logits.shape[-1], dtype=torch.bool)
    top_k = min(layer.top_k, int(keep[0].sum()))
    masked = logits.unsqueeze(0).masked_fill(~keep[:, None, :], float("-inf"))
    probs, selected = family.routing(masked, top_k)
    gates = probs.gather(-1, selected).double()
    if layer.renormalized:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return selected, gates


@torch.no_grad()
def expert_grams(family: MoEFamily, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """``[T, E, E]`` float64: per token, the Gram matrix of every expert's (float32) output on it."""
    e, (t, d) = layer.num_experts, hidden.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, e * d))
    grams = []
    for start in range(0, t, step):
        x = hidden[start : start + step]
        outs = torch.stack([family.run_expert(layer, j, x).float() for j in range(e)], dim=1).double().cpu()
        grams.append(outs @ outs.transpose(1, 2))
    return torch.cat(grams) if grams else torch.zeros(0, e, e, dtype=torch.float64)


def squared_errors(
    grams: torch.Tensor, full: tuple[torch.Tensor, torch.Tensor], pruned: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``[B]`` float64 ``||F - F_S||_F^2`` per subset: ``sum_t d_t^T K_t d_t`` on the union of the chosen experts.

    ``d_t`` is written as the concatenation of (full choices, +full gates) and (pruned choices, -pruned gates); a
    repeated index just adds its entries, so gathering ``K_t`` on the concatenated indices gives the exact form.
    """
    selected, gates = pruned
    b = selected.shape[0]
    index = torch.cat([full[0].expand(b, -1, -1), selected], dim=-1)
    value = torch.cat([full[1].expand(b, -1, -1), -gates], dim=-1)
    tokens = torch.arange(grams.shape[0])[None, :, None, None]
    block = grams[tokens, index[..., :, None], index[..., None, :]]
    return torch.einsum("btm,btmn,btn->b", value, block, value).clamp(min=0.0)


class Reconstruction:
    """``err(S)^2`` for batches of subsets of one layer, on fixed sampled tokens (module docstring)."""

    @torch.no_grad()
    def __init__(self, family: MoEFamily, layer: MoELayer, hidden: torch.Tensor) -> None:
        self.family, self.layer = family, float32_layer(layer, family)
        weight = self.layer.router.weight
        hidden = hidden.to(device=weight.device, dtype=torch.float32)
        self.num_experts = layer.num_experts
        self.logits = family.router_logits(self.layer, hidden).float().cpu()
        self.grams = expert_grams(family, self.layer, hidden)
        self.full = routed_gates(family, self.layer, self.logits)
        zero = (self.full[0][:, :, :0], self.full[1][:, :, :0])
        self.total = float(squared_errors(self.grams, self.full, zero)[0])  # ||F||_F^2
        self.evaluated = 0

    @torch.no_grad()
    def __call__(self, subsets: list[list[int]]) -> torch.Tensor:
        """``[len(subsets)]`` float64 squared errors; every subset has the same size."""
        out = []
        tokens = max(1, self.grams.shape[0])
        m = 2 * self.layer.top_k
        step = max(1, _CHUNK_ELEMENTS // (tokens * max(self.num_experts, m * m)))
        for start in range(0, len(subsets), step):
            chunk = subsets[start : start + step]
            keep = torch.zeros(len(chunk), self.num_experts, dtype=torch.bool)
            for row, subset in enumerate(chunk):
                keep[row, subset] = True
            out.append(squared_errors(self.grams, self.full, routed_gates(self.family, self.layer, self.logits, keep)))
        self.evaluated += len(subsets)
        return torch.cat(out)


def exhaustive_subset(score: Reconstruction, k: int, protected: Set[int] = frozenset()) -> tuple[list[int], float]:
    """The subset of ``k`` experts (holding ``protected``) with the smallest squared error, and that error; every
    subset is evaluated, in lexicographic order, and the first one wins a tie."""
    fixed = sorted(protected)
    free = [e for e in range(score.num_experts) if e not in protected]
    subsets = [sorted(fixed + list(c)) for c in itertools.combinations(free, k - len(fixed))]
    errors = score(subsets)
    best = int(torch.argmin(errors))  # the first minimum
    return subsets[best], float(errors[best])


def greedy_subset(
    score: Reconstruction, k: int, order: list[int], protected: Set[int] = frozenset()
) -> tuple[list[int], float]:
    """Greedy elimination down to ``k`` experts: remove the expert whose removal gives the smallest squared error
    (ties: the one latest in ``order``, i.e. the least routed); ``protected`` experts are never removed."""
    position = {e: i for i, e in enumerate(order)}
    kept, error = list(range(score.num_experts)), 0.0
    while len(kept) > k:
        candidates = [e for e in kept if e not in protected]
        errors = score([[j for j in kept if j != e] for e in candidates]).tolist()
        error, _, removed = min((err, -position[e], e) for err, e in zip(errors, candidates))
        kept.remove(removed)
    return kept, error


def naee_subset(
    score: Reconstruction, k: int, order: list[int], max_combinations: int, protected: Set[int] = frozenset()
) -> tuple[list[int], float, str]:
    """``(kept, squared error, "exhaustive" | "greedy")`` for one layer."""
    if math.comb(score.num_experts - len(protected), k - len(protected)) <= max_combinations:
        return (*exhaustive_subset(score, k, protected), "exhaustive")
    return (*greedy_subset(score, k, order, protected), "greedy")


def _rounded(value: float) -> float:
    return float(f"{value:.4g}")


@register_method
class NAEEPruning(PruningMethod):
    """NAEE expert pruning; the formula and the search are in the module docstring."""

    name = "naee"
    description = (
        "NAEE: keep the k experts whose layer output best reconstructs the full layer's on the calibration tokens "
        "(every subset when few, greedy elimination beyond)."
    )
    citation = "@article{lu2024not, title={Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large Language Models}, author={Lu, Xudong and Liu, Qi and Xu, Yuhui and Zhou, Aojun and Huang, Siyuan and Zhang, Bo and Yan, Junchi and Li, Hongsheng}, journal={arXiv preprint arXiv:2402.14800}, year={2024}}"
    Options = NAEEOptions

    def check_options(self, options: NAEEOptions) -> None:
        check_super_expert_options(options, self.name)
        if options.max_combinations < 1:
            raise UncurlError(f"naee option max_combinations must be >= 1, got {options.max_combinations}.")
        if options.max_tokens < 1:
            raise UncurlError(f"naee option max_tokens must be >= 1, got {options.max_tokens}.")

    @torch.no_grad()
    def plan_layer(
        self, name: str, num_experts: int, stats: ExpertStats, k: int, model: nn.Module, family: Any, config: Any
    ) -> LayerPlan:
        options = self.options(config)
        if k >= num_experts:
            return LayerPlan.keep(name, num_experts, range(num_experts))
        order = rank_by_frequency(stats)
        hidden = token_subset(stats.hidden_sample, options.max_tokens, stable_seed(config.seed, self.name, name))
        if hidden.shape[0] == 0:
            logger.warning("%s: no sampled calibration tokens; NAEE falls back to routing frequency", name)
            return LayerPlan.keep(name, num_experts, order[:k])
        layer = find_layer(model, family, name)
        protected = protected_for(options, layer, stats, family)
        if len(protected) >= k:
            kept = keep_protected(order, protected, k, name)
            return LayerPlan(name, num_experts, [[e] for e in sorted(kept)], extras={"naee": {"search": "protected"}})
        score = Reconstruction(family, layer, hidden)
        kept, error, search = naee_subset(score, k, order, options.max_combinations, protected)
        relative = math.sqrt(error / score.total) if score.total > 0 else 0.0
        logger.debug("%s (naee, %s): kept %s, relative error %.4g", name, search, kept, relative)
        extras = {
            "naee": {
                "search": search,
                "subsets": score.evaluated,
                "tokens": int(hidden.shape[0]),
                "error": _rounded(math.sqrt(error)),
                "relative_error": _rounded(relative),
            }
        }
        return LayerPlan(name, num_experts, [[e] for e in sorted(kept)], extras=extras)
