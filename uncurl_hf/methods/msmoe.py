"""``msmoe``: M-SMoE, the merging stage of MC-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy", ICLR 2024, arXiv 2310.01334).

Per sparse layer, on the task's calibration tokens:

* usage ``u_e`` = share of top-k routing decisions that picked expert ``e`` (normalized counts);
* dominant experts: ONE global usage threshold across all layers selects the ``sum_l floor(E_l / factor)`` most-used
  experts of the model (each layer keeping at least its most-used one), so per-layer counts differ by layer
  (``uniform=True`` keeps ``floor(E_l / factor)`` in every layer); the dominant experts are the group centres;
* similarity ``s(a, b) = (cos(L[:, a], L[:, b]) + 1) / 2`` of the experts' raw router-logit columns ``L [S, E]``;
  every non-dominant expert joins its most similar centre (ties: the more used centre);
* members' hidden neurons are aligned to the centre with ``linear_sum_assignment`` on ``Wi_c Wi_m^T + Wo_c^T Wo_m``;
* merged expert ``sum_m u_m P_m(W_m) / sum_m u_m`` (uniform for a never-routed group).

Unlike the reference implementation, which keeps the router and ties the merged slots to one module (the checkpoint
never shrinks), the group's experts are physically replaced by one expert and the router gets one row per group:
``router="weighted"`` (usage-weighted member rows, default, as for UNCURL) or ``"anchor"`` (the centre's row).
The compression stage of MC-SMoE (low-rank + pruning of the merged experts) is not part of this baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from uncurl_hf.calibration import ExpertStats
from uncurl_hf.methods import register_method
from uncurl_hf.methods._merging import (
    adaptive_budget,
    check_router_rule,
    cosine_affinity,
    find_layer,
    logit_profiles,
    merged_layer_plan,
)
from uncurl_hf.methods.base import PruningMethod, method_options
from uncurl_hf.methods.frequency import rank_by_frequency
from uncurl_hf.plan import LayerPlan

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"router": "weighted", "uniform": False}


def groups_around_centres(similarity: np.ndarray, centres: list[int]) -> list[list[int]]:
    """One group per centre; every other expert joins the centre it is most similar to (first centre on ties)."""
    groups = {c: [c] for c in centres}
    for expert in range(similarity.shape[0]):
        if expert in groups:
            continue
        best = max(centres, key=lambda c: (similarity[expert, c], -centres.index(c)))
        groups[best].append(expert)
    return [groups[c] for c in centres]


@register_method
class MSMoEMerging(PruningMethod):
    """M-SMoE; the formula is in the module docstring."""

    name = "msmoe"
    description = (
        "M-SMoE (MC-SMoE's merge): most-used experts are centres (one global usage threshold), the rest join the "
        "most similar centre by router logits; aligned, usage-weighted merge."
    )
    merges = True

    def options(self, config: Any) -> dict[str, Any]:
        options = method_options(config, self.name, DEFAULTS)
        check_router_rule(self.name, options["router"])
        return options

    def allocate(self, stats: Any, budget: Mapping[str, int], config: Any) -> dict[str, int]:
        return adaptive_budget(stats, budget, config, uniform=self.options(config)["uniform"])

    def plan_layer(
        self, name: str, num_experts: int, stats: ExpertStats, k: int, model: nn.Module, family: Any, config: Any
    ) -> LayerPlan:
        options = self.options(config)
        if k >= num_experts:
            return LayerPlan.keep(name, num_experts, range(num_experts))
        layer = find_layer(model, family, name)
        similarity = cosine_affinity(logit_profiles(stats, layer.router.weight, "raw"))
        centres = rank_by_frequency(stats)[:k]
        groups = groups_around_centres(similarity, centres)
        logger.debug("%s: groups %s", name, groups)
        return merged_layer_plan(name, num_experts, groups, stats, options["router"], family, layer)
