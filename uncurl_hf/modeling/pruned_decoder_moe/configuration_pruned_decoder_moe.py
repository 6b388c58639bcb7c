"""Configurations of decoder-only MoE models whose sparse layers hold different numbers of experts.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss configs have one expert count for every sparse layer. Pruning gives
each layer its own count, and ``from_pretrained`` builds the modules from the config *before* loading weights, so
the counts must live in the config: each ``Pruned*Config`` is the upstream config plus ``num_experts_per_layer``.

One file serves the five families because they differ only in which upstream config they extend; the per-layer
logic (which layers are sparse, the count of each, validation) is the same. This file imports only
``transformers`` and ``huggingface_hub`` so that ``save_pretrained`` can copy it next to the weights (``auto_map``).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig


def sparse_layer_indices(config: Any) -> list[int]:
    """Indices of the decoder layers whose MLP is sparse, with exactly the rule of the upstream decoder layers.

    Mixtral, OLMoE and gpt-oss make every layer sparse; Qwen2-/Qwen3-MoE skip ``mlp_only_layers`` and layers not on
    the ``decoder_sparse_step`` grid (and every layer when ``num_experts`` is 0).
    """
    num_layers = int(config.num_hidden_layers)
    step = getattr(config, "decoder_sparse_step", None)
    if step is None:
        return list(range(num_layers))
    if int(config.num_experts) <= 0:
        return []
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return [i for i in range(num_layers) if i not in dense and (i + 1) % int(step) == 0]


def layer_router_widths(counts: list[int], maps: list[list[int] | None]) -> list[int]:
    """Router rows of each sparse layer: its original expert count under an expert map, else its expert count."""
    return [len(m) if m is not None else c for m, c in zip(maps, counts)]


class PerLayerExpertsMixin:
    """``num_experts_per_layer`` (one count per sparse layer, in layer order) on top of an upstream MoE config.

    ``num_experts`` is kept equal to the largest per-layer count, or router width under an expert map (code that reads
    it as an upper bound, e.g. the load-balancing loss over the padded router logits, stays correct) and
    ``num_experts_per_tok`` keeps the original top-k: a layer with fewer experts than that routes each token to all
    of them (top-k clamped to the layer's count).

    ``expert_map_per_layer`` (a *logical merge*, the ``"map"`` router rule): per sparse layer ``None`` or one entry
    per *original* expert naming the layer's expert that takes its tokens. Such a layer keeps the original router
    (one row per original expert, the original top-k), so tokens are routed exactly as before pruning.
    """

    num_experts_per_layer: list[int] | None
    expert_map_per_layer: list[list[int] | None] | None
    uncurl_base_model: str | None

    def expert_maps(self) -> list[list[int] | None]:
        """Expert map of each sparse layer, in layer order (``None``: the router has one row per expert)."""
        if self.expert_map_per_layer is None:
            return [None] * len(sparse_layer_indices(self))
        return [None if m is None else list(m) for m in self.expert_map_per_layer]

    def router_widths(self) -> list[int]:
        """Router rows of each sparse layer (:func:`layer_router_widths`)."""
        return layer_router_widths(self.experts_per_layer(), self.expert_maps())

    def experts_per_layer(self) -> list[int]:
        """Expert count of each sparse layer, in layer order."""
        if self.num_experts_per_layer is not None:
            return list(self.num_experts_per_layer)
        return [int(self.num_experts)] * len(sparse_layer_indices(self))

    def top_k_per_layer(self) -> list[int]:
        """Experts each token is routed to in each sparse layer: ``min(num_experts_per_tok, router rows)``."""
        return [min(int(self.num_experts_per_tok), width) for width in self.router_widths()]

    def validate_num_experts_per_layer(self) -> None:
        """One positive count per sparse layer, the largest equal to ``num_experts``."""
        counts = self.num_experts_per_layer
        if counts is None:
            return
        layers = sparse_layer_indices(self)
        if len(counts) != len(layers):
            raise ValueError(
                f"num_experts_per_layer has {len(counts)} entries but the model has {len(layers)} sparse layers"
            )
        if any(count < 1 for count in counts):
            raise ValueError(f"num_experts_per_layer entries must be >= 1, got {counts}")
        if counts and max(self.router_widths()) != int(self.num_experts):
            raise ValueError(
                f"num_experts_per_layer {counts}: the largest count must equal num_experts={self.num_experts} "
                "(with expert_map_per_layer: the largest router)"
            )

    def validate_expert_map_per_layer(self) -> None:
        """One map (or ``None``) per sparse layer, each sending tokens to every one of the layer's experts."""
        maps = self.expert_map_per_layer
        if maps is None:
            return
        if self.num_experts_per_layer is None:
            raise ValueError("expert_map_per_layer needs num_experts_per_layer (the experts each layer holds)")
        layers = sparse_layer_indices(self)
        if len(maps) != len(layers):
            raise ValueError(
                f"expert_map_per_layer has {len(maps)} entries but the model has {len(layers)} sparse layers"
            )
        for index, mapping, count in zip(layers, maps, self.experts_per_layer()):
            if mapping is not None and sorted(set(mapping)) != list(range(count)):
                raise ValueError(
                    f"expert_map_per_layer of layer {index} must send tokens to each of its {count} experts and to "
                    f"no other, got {mapping}"
                )


@strict
class PrunedMixtralConfig(PerLayerExpertsMixin, MixtralConfig):
    r"""A ``MixtralConfig`` with one expert count per sparse layer.

    num_experts_per_layer (`list[int]`, *optional*):
        Experts of each sparse layer, in layer order. ``None`` means ``num_local_experts`` everywhere.
    expert_map_per_layer (`list[list[int] | None]`, *optional*):
        Per sparse layer, ``None`` or the output expert of each original expert (a logical merge).
    uncurl_base_model (`str`, *optional*):
        Name or path of the original (unpruned) model; kept when a pruned model is pruned again.
    """

    model_type = "pruned_mixtral"

    num_experts_per_layer: list[int] | None = None
    expert_map_per_layer: list[list[int] | None] | None = None
    uncurl_base_model: str | None = None


@strict
class PrunedQwen2MoeConfig(PerLayerExpertsMixin, Qwen2MoeConfig):
    r"""A ``Qwen2MoeConfig`` with one expert count per sparse layer (the shared expert is unchanged).

    num_experts_per_layer (`list[int]`, *optional*):
        Experts of each sparse layer, in layer order. ``None`` means ``num_experts`` everywhere.
    expert_map_per_layer (`list[list[int] | None]`, *optional*):
        Per sparse layer, ``None`` or the output expert of each original expert (a logical merge).
    uncurl_base_model (`str`, *optional*):
        Name or path of the original (unpruned) model; kept when a pruned model is pruned again.
    """

    model_type = "pruned_qwen2_moe"

    num_experts_per_layer: list[int] | None = None
    expert_map_per_layer: list[list[int] | None] | None = None
    uncurl_base_model: str | None = None


@strict
class PrunedQwen3MoeConfig(PerLayerExpertsMixin, Qwen3MoeConfig):
    r"""A ``Qwen3MoeConfig`` with one expert count per sparse layer.

    num_experts_per_layer (`list[int]`, *optional*):
        Experts of each sparse layer, in layer order. ``None`` means ``num_experts`` everywhere.
    expert_map_per_layer (`list[list[int] | None]`, *optional*):
        Per sparse layer, ``None`` or the output expert of each original expert (a logical merge).
    uncurl_base_model (`str`, *optional*):
        Name or path of the original (unpruned) model; kept when a pruned model is pruned again.
    """

    model_type = "pruned_qwen3_moe"

    num_experts_per_layer: list[int] | None = None
    expert_map_per_layer: list[list[int] | None] | None = None
    uncurl_base_model: str | None = None


@strict
class PrunedOlmoeConfig(PerLayerExpertsMixin, OlmoeConfig):
    r"""An ``OlmoeConfig`` with one expert count per sparse layer.

    num_experts_per_layer (`list[int]`, *optional*):
        Experts of each sparse layer, in layer order. ``None`` means ``num_experts`` everywhere.
    expert_map_per_layer (`list[list[int] | None]`, *optional*):
        Per sparse layer, ``None`` or the output expert of each original expert (a logical merge).
    uncurl_base_model (`str`, *optional*):
        Name or path of the original (unpruned) model; kept when a pruned model is pruned again.
    """

    model_type = "pruned_olmoe"

    num_experts_per_layer: list[int] | None = None
    expert_map_per_layer: list[list[int] | None] | None = None
    uncurl_base_model: str | None = None


@strict
class PrunedGptOssConfig(PerLayerExpertsMixin, GptOssConfig):
    r"""A ``GptOssConfig`` with one expert count per sparse layer.

    num_experts_per_layer (`list[int]`, *optional*):
        Experts of each sparse layer, in layer order. ``None`` means ``num_local_experts`` everywhere.
    expert_map_per_layer (`list[list[int] | None]`, *optional*):
        Per sparse layer, ``None`` or the output expert of each original expert (a logical merge).
    uncurl_base_model (`str`, *optional*):
        Name or path of the original (unpruned) model; kept when a pruned model is pruned again.
    """

    model_type = "pruned_gpt_oss"

    num_experts_per_layer: list[int] | None = None
    expert_map_per_layer: list[list[int] | None] | None = None
    uncurl_base_model: str | None = None


PRUNED_CONFIGS: dict[str, type] = {
    "mixtral": PrunedMixtralConfig,
    "qwen2_moe": PrunedQwen2MoeConfig,
    "qwen3_moe": PrunedQwen3MoeConfig,
    "olmoe": PrunedOlmoeConfig,
    "gpt_oss": PrunedGptOssConfig,
}

__all__ = [
    "PRUNED_CONFIGS",
    "PerLayerExpertsMixin",
    "layer_router_widths",
    "PrunedGptOssConfig",
    "PrunedMixtralConfig",
    "PrunedOlmoeConfig",
    "PrunedQwen2MoeConfig",
    "PrunedQwen3MoeConfig",
    "sparse_layer_indices",
]
