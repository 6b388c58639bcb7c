"""Weight surgery: turn a model + :class:`PruningPlan` into a new, smaller model (the input is not modified).

Per layer and per output group ``g`` with members ``m_1..m_n`` and weights ``w_1..w_n``:

* expert tensors: ``sum_i w_i * P_i(W_{m_i})`` where ``P_i`` optionally permutes the member's hidden neurons
  (``plan extras["permutations"]``) along the family's neuron axis; a singleton group is an exact copy;
* router rows: ``"weighted"`` -> ``sum_i w_i * row_{m_i}`` (bias likewise), ``"anchor"`` -> ``row_{m_1}``.

Merging happens in float32 and is cast back to the parameter dtype. Removed experts are physically absent from the
result, so the written checkpoint shrinks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from uncurl_hf.families.base import MoEFamily, MoELayer, ReducedLayer
from uncurl_hf.plan import LayerPlan, PruningPlan

logger = logging.getLogger(__name__)


def apply_plan(
    model: nn.Module,
    family: MoEFamily,
    plan: PruningPlan,
    *,
    scale_expert_capacity: bool = True,
    base_model: str | None = None,
) -> nn.Module:
    """Return a new model in which every sparse layer holds the output experts described by ``plan``.

    ``plan`` is validated against ``model`` first (:class:`~uncurl_hf.errors.InvalidPlanError`). With
    ``scale_expert_capacity`` each layer's per-sequence expert capacity grows by ``E_old / E_new`` (rounded up),
    because the surviving experts now receive the tokens of the removed ones.
    """
    plan.validate(family.layer_sizes(model))
    reduced: dict[str, ReducedLayer] = {}
    with torch.no_grad():
        for layer in family.sparse_layers(model):
            layer_plan = plan.layer(layer.name)
            reduced[layer.name] = reduce_layer(family, layer, layer_plan, scale_expert_capacity)
            logger.debug("%s: %d -> %d experts", layer.name, layer.num_experts, layer_plan.num_output_experts)
        new_model = family.build_reduced_model(model, reduced, base_model=base_model or plan.base_model)
    return new_model


def reduce_layer(
    family: MoEFamily, layer: MoELayer, plan: LayerPlan, scale_expert_capacity: bool = True
) -> ReducedLayer:
    """The experts and router rows of one layer after applying ``plan``."""
    permutations = plan.extras.get("permutations") or [None] * len(plan.groups)
    experts = [
        merge_experts(family, layer, group, weights, perms)
        for group, weights, perms in zip(plan.groups, plan.weights, permutations)
    ]
    router = {
        name: torch.stack([_router_row(tensor, g, w, plan.router) for g, w in zip(plan.groups, plan.weights)])
        for name, tensor in family.router_tensors(layer).items()
    }
    capacity = family.expert_capacity(layer)
    if capacity is not None and scale_expert_capacity:
        capacity = math.ceil(capacity * layer.num_experts / plan.num_output_experts)
    return ReducedLayer(experts=experts, router=router, expert_capacity=capacity)


def merge_experts(
    family: MoEFamily,
    layer: MoELayer,
    group: Sequence[int],
    weights: Sequence[float],
    permutations: Sequence[Sequence[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted average of the group's expert tensors (exact copy for a singleton group without permutation)."""
    permutations = permutations or [None] * len(group)
    if len(group) == 1 and permutations[0] is None:
        return {name: t.clone() for name, t in family.expert_tensors(layer, group[0]).items()}
    merged: dict[str, torch.Tensor] = {}
    for member, weight, perm in zip(group, weights, permutations):
        for name, tensor in family.expert_tensors(layer, member).items():
            value = tensor.float()
            if perm is not None:
                index = torch.as_tensor(perm, dtype=torch.long, device=value.device)
                value = value.index_select(family.neuron_axes[name], index)
            merged[name] = merged[name] + weight * value if name in merged else weight * value
    reference = family.expert_tensors(layer, group[0])
    return {name: value.to(reference[name].dtype) for name, value in merged.items()}


def _router_row(tensor: torch.Tensor, group: Sequence[int], weights: Sequence[float], rule: str) -> torch.Tensor:
    if len(group) == 1 or rule == "anchor":
        return tensor[group[0]].clone()
    rows = tensor[list(group)].float()
    scale = torch.tensor(weights, dtype=torch.float32, device=rows.device).reshape(-1, *[1] * (rows.dim() - 1))
    return (scale * rows).sum(dim=0).to(tensor.dtype)
