"""``random``: keep k experts per layer drawn uniformly at random — the floor any real method must beat."""

from __future__ import annotations

import random as _stdlib_random
from typing import Any

from torch import nn

from uncurl_hf.methods import register_method
from uncurl_hf.methods.base import PruningMethod
from uncurl_hf.plan import LayerPlan
from uncurl_hf.seeding import stable_seed


@register_method
class RandomPruning(PruningMethod):
    """Seeded per layer with SHA-256 of ``(config.seed, layer name)``: identical across runs and processes."""

    name = "random"
    description = "Keep k experts per layer chosen uniformly at random (seeded); a lower-bound baseline."
    citation = None  # a baseline with no paper of its own (the model card says so)
    needs_calibration = False

    def plan_layer(
        self, name: str, num_experts: int, stats: Any, k: int, model: nn.Module, family: Any, config: Any
    ) -> LayerPlan:
        rng = _stdlib_random.Random(stable_seed(config.seed, "random-pruning", name))
        return LayerPlan.keep(name, num_experts, rng.sample(range(num_experts), k))
