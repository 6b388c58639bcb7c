"""How many experts each layer keeps.

Rule: a layer with ``E`` experts keeps ``k = floor(E / factor)`` (computed with a 1e-9 tolerance so that
``factor = E / k`` given as a rounded float still yields ``k``). Flooring guarantees the pruned layer is at least
``factor`` times smaller, which is what "prune by a factor of 4" promises; ``k = 0`` (factor > E) is refused
rather than silently clamped to 1, because the caller asked for a compression the layer cannot give.
"""

from __future__ import annotations

import math
from typing import Mapping

from uncurl_hf.errors import InvalidFactorError

_TOLERANCE = 1e-9


def experts_to_keep(num_experts: int, factor: float) -> int:
    """``floor(num_experts / factor)``: the number of experts a layer keeps at ``factor``."""
    return int(math.floor(num_experts / factor + _TOLERANCE))


def expert_budget(
    layer_sizes: Mapping[str, int],
    factor: float | None = None,
    num_experts_per_layer: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """``{layer: k}`` from a factor or from explicit counts, raising :class:`InvalidFactorError` if unrealisable."""
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
    if factor < 1:
        raise InvalidFactorError(f"Pruning factor {factor:g} is below 1; use a factor >= 1 (2 keeps half).")
    budget = {name: experts_to_keep(size, factor) for name, size in layer_sizes.items()}
    empty = sorted(name for name, k in budget.items() if k < 1)
    if empty:
        smallest = min(layer_sizes[name] for name in empty)
        raise InvalidFactorError(
            f"Pruning factor {factor:g} would keep 0 experts in {len(empty)} layer(s) (e.g. {empty[0]} has "
            f"{layer_sizes[empty[0]]} experts; a layer keeps floor(experts / factor)). "
            f"Use a factor <= {smallest}."
        )
    return budget
