"""``reap``: Router-weighted Expert Activation Pruning (Cerebras, Lasby et al., "REAP the Experts: Why Pruning
Prevails for One-Shot MoE Compression", arXiv 2510.13999).

Per sparse layer, keep the ``k = floor(E / factor)`` experts with the largest saliency

    S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||E_j(x)||_2

where ``X_j`` are the calibration tokens routed to ``j`` (``j`` in the token's top-k; padding masked) and ``g_j`` the
gate that scales ``E_j``'s output. Experts never routed score 0. Ties: routing count, gate mass, lower index.

Which gate (option ``gate``):

* ``"applied"`` (default): the gate the model applies, per family (calibration accumulates it as
  ``applied_output_norm_sum``): the softmax probability for Switch (top-1) and for Qwen2-MoE/Qwen3-MoE/OLMoE without
  ``norm_topk_prob``; the top-k probability renormalized over the token's chosen experts for Mixtral, gpt-oss
  (softmax over the chosen logits) and Qwen/OLMoE with ``norm_topk_prob`` — what REAP's reference code and
  llm-compressor's REAPPruningModifier use. An expert the router picks with a small weight contributes little to the
  residual stream, which is exactly what REAP measures;
* ``"softmax"``: the softmax probability over all experts, whatever the model applies (this module's default before
  the applied gate was recorded; kept for comparison);
* ``"renormalized"``: ``g = 1`` for top-1 layers (the paper's renormalized formula at ``k = 1``: ``S_j`` is the mean
  output norm); top-1 only.

Expert outputs are computed by calibration for routed tokens only (not every expert on every token, unlike the
reference code), so the cost is one expert pass per routed token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import UncurlError
from uncurl_hf.methods import register_method
from uncurl_hf.methods.base import PruningMethod, rank_by_score
from uncurl_hf.plan import LayerPlan
from uncurl_hf.settings import setting

GATES = ("applied", "softmax", "renormalized")


@dataclass(frozen=True)
class ReapOptions:
    """REAP's options (``uniform`` is accepted, and always true, so that ``--uniform`` works with every method)."""

    gate: Literal["applied", "softmax", "renormalized"] = setting(
        "applied", help="gate weighting the output norm: the one the model applies, the softmax over all experts, "
        "or 1 (top-1 layers only)",
    )
    uniform: bool = setting(True, help="accepted for --uniform; REAP always keeps floor(E / factor) per layer")


def reap_scores(stats: ExpertStats, gate: str = "applied") -> torch.Tensor:
    """``[E]`` REAP saliency: mean of ``gate * ||expert output||`` over the tokens routed to each expert."""
    if gate == "applied":
        return stats.mean_applied_output_norm
    if gate == "softmax":
        return stats.mean_weighted_output_norm
    if gate == "renormalized":
        if stats.top_k != 1:
            raise UncurlError(
                f"reap gate='renormalized' needs top-1 routing ({stats.layer} routes top-{stats.top_k}); "
                "use gate='applied' or gate='softmax'."
            )
        return stats.mean_output_norm
    raise UncurlError(f"reap option gate must be one of {', '.join(GATES)}, got {gate!r}.")


def rank_by_reap(stats: ExpertStats, gate: str = "applied") -> list[int]:
    """Experts by REAP saliency, highest first (ties: routing count, gate mass, lower index)."""
    return rank_by_score(stats, reap_scores(stats, gate))


@register_method
class ReapPruning(PruningMethod):
    """REAP; the formula and the choice of gate are in the module docstring."""

    name = "reap"
    description = "REAP: keep the k experts with the largest mean gate * ||expert output|| over their routed tokens."
    citation = "@article{lasby2025reap, title={{REAP} the Experts: Why Pruning Prevails for One-Shot {MoE} Compression}, author={Lasby, Mike and Lazarevich, Ivan and Sinnadurai, Nish and Lie, Sean and Ioannou, Yani and Thangarasa, Vithursan}, journal={arXiv preprint arXiv:2510.13999}, year={2025}}"
    Options = ReapOptions

    def plan_layer(
        self, name: str, num_experts: int, stats: ExpertStats, k: int, model: nn.Module, family: Any, config: Any
    ) -> LayerPlan:
        gate = self.options(config).gate
        return LayerPlan.keep(name, num_experts, rank_by_reap(stats, gate)[:k])
