"""How many experts each layer keeps.

Rule: a layer with ``E`` experts keeps ``k = floor(E / factor)`` (computed with a 1e-9 tolerance so that
``factor = E / k`` given as a rounded float still yields ``k``). Flooring guarantees the pruned layer is at least
``factor`` times smaller, which is what "prune by a factor of 4" promises; ``k = 0`` (factor > E) is refused
rather than silently clamped to 1, because the caller asked for a compression the layer cannot give.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from uncurl_hf.errors import InvalidFactorError

if TYPE_CHECKING:
    from uncurl_hf.plan import PruningPlan

_TOLERANCE = 1e-9


def experts_to_keep(num_experts: int, factor: float) -> int:
    """``floor(num_experts / factor)``: the number of experts a layer keeps at ``factor``."""
    return int(math.floor(num_experts / factor + _TOLERANCE))


def expert_budget(
    layer_sizes: Mapping[str, int],
    factor: float | None = None,
    num_experts_per_layer: Mapping[str, int] | Sequence[int] | None = None,
) -> dict[str, int]:
    """``{layer: k}`` from a factor or from explicit counts, raising :class:`InvalidFactorError` if unrealisable.

    Explicit counts are a ``{layer: k}`` mapping (unnamed layers keep all their experts) or a list with exactly one
    count per sparse layer, in the order of ``layer_sizes`` (the family's layer order).
    """
    if num_experts_per_layer is not None and not isinstance(num_experts_per_layer, Mapping):
        counts = list(num_experts_per_layer)
        if len(counts) != len(layer_sizes):
            raise InvalidFactorError(
                f"Got {len(counts)} per-layer expert counts for a model with {len(layer_sizes)} sparse layers "
                f"({', '.join(f'{name}: {size} experts' for name, size in layer_sizes.items())}); give exactly one "
                "count per layer, in this order."
            )
        num_experts_per_layer = dict(zip(layer_sizes, counts))
    if num_experts_per_layer is not None:
        unknown = sorted(set(num_experts_per_layer) - set(layer_sizes))
        if unknown:
            raise InvalidFactorError(
                f"Per-layer counts name layers {unknown} that the model does not have; "
                f"its sparse layers are {sorted(layer_sizes)}."
            )
        budget = dict(layer_sizes)
        for name, k in num_experts_per_layer.items():
            if not 1 <= k <= layer_sizes[name]:
                raise InvalidFactorError(
                    f"Layer {name} has {layer_sizes[name]} experts; its count must be between 1 and "
                    f"{layer_sizes[name]}, got {k}."
                )
            budget[name] = int(k)
        return budget
    if factor is None:
        raise InvalidFactorError("Give a pruning factor or per-layer expert counts.")
    if not factor > 1:  # also refuses NaN
        problem = "is below 1" if factor < 1 else "keeps every expert" if factor == 1 else "is not a number > 1"
        raise InvalidFactorError(
            f"Pruning factor {factor:g} {problem}; use a factor > 1 (2 keeps half of the experts), or explicit "
            "per-layer counts to keep every expert on purpose."
        )
    budget = {name: experts_to_keep(size, factor) for name, size in layer_sizes.items()}
    empty = sorted(name for name, k in budget.items() if k < 1)
    if empty:
        smallest = min(layer_sizes[name] for name in empty)
        raise InvalidFactorError(
            f"Pruning factor {factor:g} would keep 0 experts in {len(empty)} layer(s) (e.g. {empty[0]} has "
            f"{layer_sizes[empty[0]]} experts; a layer keeps floor(experts / factor)). "
            f"Use a factor <= {smallest}."
        )
    if all(budget[name] == size for name, size in layer_sizes.items()):
        prunable = [size for size in layer_sizes.values() if size > 1]
        needed = min(size / (size - 1) for size in prunable) if prunable else None
        raise InvalidFactorError(
            f"Pruning factor {factor:g} keeps every expert of every layer (floor(experts / factor) = experts), so "
            "nothing would be pruned; "
            + (f"use a factor >= {math.ceil(needed * 1000) / 1000:g}." if needed else "no layer has 2 experts.")
        )
    return budget


def plan_bytes(model: Any, family: Any, plan: "PruningPlan") -> int:
    """Bytes of weights ``plan`` removes from ``model``: the experts it drops or merges away and their router rows.

    Computed from tensor shapes and dtypes only (a meta-device model works), for a dry run's "after" estimate.
    """
    removed = 0
    layers = {layer.name: layer for layer in family.sparse_layers(model)}
    for layer_plan in plan.layers:
        layer = layers[layer_plan.name]
        gone = layer.num_experts - layer_plan.num_output_experts
        if gone <= 0:
            continue
        expert = sum(t.numel() * t.element_size() for t in family.expert_tensors(layer, 0).values())
        router = sum(p.numel() * p.element_size() for p in layer.router.parameters()) // max(layer.num_experts, 1)
        removed += gone * (expert + router)
    return removed
