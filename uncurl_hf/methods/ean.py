"""``ean``: EAN (expert activation norm), the activation-norm criterion compared in the REAP paper (Lasby et al.,
"REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression", arXiv 2510.13999), whose reference code
records it as ``ean_mean`` (the default here) and ``ean_sum`` (``reduce="sum"``).

Per sparse layer, keep the ``k = floor(E / factor)`` experts with the largest

    EAN_j = 1/|X_j| * sum_{x in X_j} ||E_j(x)||_2          (reduce="mean", default)
    EAN_j =           sum_{x in X_j} ||E_j(x)||_2          (reduce="sum": also rewards frequent experts)

where ``X_j`` are the calibration tokens routed to ``j`` (``j`` in the token's top-k; padding masked) and ``E_j(x)``
the expert's output before the gate scales it. It is REAP without the gate: an expert that writes large vectors into
the residual stream matters, however softly the router weighs it. Experts never routed score 0. Ties: routing count,
gate mass, lower index. Calibration accumulates ``sum ||E_j(x)||`` for routed tokens (``output_norm_sum``), so the
criterion costs nothing beyond calibration.

``protect_super_experts=true`` keeps the layer's super experts whatever their score (:mod:`.super_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.errors import UncurlError
from uncurl_hf.methods import register_method
from uncurl_hf.methods._merging import find_layer
from uncurl_hf.methods.base import PruningMethod, rank_by_score
from uncurl_hf.methods.super_experts import (
    SuperExpertOptions,
    check_super_expert_options,
    keep_protected,
    protected_for,
)
from uncurl_hf.plan import LayerPlan
from uncurl_hf.settings import setting

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class EANOptions(SuperExpertOptions):
    """EAN's options (``uniform`` is accepted, and always true, so that ``--uniform`` works with every method)."""

    reduce: Literal["mean", "sum"] = setting(
        "mean", help="mean of ||expert output|| over the expert's routed tokens, or their sum",
    )
    uniform: bool = setting(True, help="accepted for --uniform; EAN always keeps floor(E / factor) per layer")


def ean_scores(stats: ExpertStats, reduce: str = "mean") -> torch.Tensor:
    """``[E]`` float64 EAN scores: mean (or sum) of ``||expert output||`` over each expert's routed tokens."""
    if reduce == "mean":
        return stats.mean_output_norm
    if reduce == "sum":
        return stats.output_norm_sum
    raise UncurlError(f"ean option reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}.")


def rank_by_ean(stats: ExpertStats, reduce: str = "mean") -> list[int]:
    """Experts by EAN, highest first (ties: routing count, gate mass, lower index)."""
    return rank_by_score(stats, ean_scores(stats, reduce))


@register_method
class EANPruning(PruningMethod):
    """EAN; the formula is in the module docstring."""

    name = "ean"
    description = "EAN: keep the k experts with the largest mean ||expert output|| over their routed tokens."
    citation = "@article{jaiswal2025finding, title={Finding Fantastic Experts in {MoEs}: A Unified Study for Expert Dropping Strategies and Observations}, author={Jaiswal, Ajay and Wang, Jianyu and Li, Yixiao and Li, Pingzhi and Chen, Tianlong and Wang, Zhangyang and Wang, Chong and Pang, Ruoming and Du, Xianzhi}, journal={arXiv preprint arXiv:2504.05586}, year={2025}}"
    Options = EANOptions

    def check_options(self, options: EANOptions) -> None:
        check_super_expert_options(options, self.name)

    def plan_layer(
        self, name: str, num_experts: int, stats: ExpertStats, k: int, model: nn.Module, family: Any, config: Any
    ) -> LayerPlan:
        options = self.options(config)
        ranking = rank_by_ean(stats, options.reduce)
        if options.protect_super_experts and k < num_experts:
            protected = protected_for(options, find_layer(model, family, name), stats, family)
            ranking = keep_protected(ranking, protected, k, name)
        return LayerPlan.keep(name, num_experts, ranking[:k])
