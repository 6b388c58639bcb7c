"""``frequency``: keep the k experts the router picks most often on the task's calibration tokens."""

from __future__ import annotations

from typing import Any

from torch import nn

from uncurl_hf.calibration.stats import ExpertStats
from uncurl_hf.methods import register_method
from uncurl_hf.methods.base import PruningMethod
from uncurl_hf.plan import LayerPlan


def rank_by_frequency(stats: ExpertStats) -> list[int]:
    """Experts ordered by routed-token count, ties broken by gate mass, then by lower index (deterministic)."""
    counts = stats.counts.tolist()
    mass = stats.gate_mass.tolist()
    return sorted(range(stats.num_experts), key=lambda e: (-counts[e], -mass[e], e))


@register_method
class FrequencyPruning(PruningMethod):
    """Task-specific expert pruning by routing frequency (the simplest baseline of the UNCURL paper).

    Gate mass breaks ties because an expert that is never the top-1 choice can still be the runner-up on many
    tokens; among never-routed experts it keeps the ones the router is closest to picking.
    """

    name = "frequency"
    description = "Keep the k most-routed experts per layer on the calibration data (ties: gate mass, then index)."
    citation = None  # a baseline with no paper of its own (the model card says so)

    def plan_layer(
        self, name: str, num_experts: int, stats: ExpertStats, k: int, model: nn.Module, family: Any, config: Any
    ) -> LayerPlan:
        return LayerPlan.keep(name, num_experts, rank_by_frequency(stats)[:k])
