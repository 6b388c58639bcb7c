"""Decoder-only MoE language models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss) with per-layer expert counts.

Design: reuse every upstream module. Each ``Pruned*ForCausalLM`` lets the upstream ``*ForCausalLM`` build itself
(with ``num_experts`` = the largest per-layer count, weight init disabled), then replaces each sparse layer's router
and fused experts module by right-sized upstream ones built from a per-layer copy of the config (top-k clamped to
the layer's count). Module classes and names are the upstream ones, so state-dict keys are a stock checkpoint's,
``forward``/``generate`` are upstream code, and ``_init_weights`` (which initialises by module type) needs no change.

A layer with an expert map (a *logical merge*, see the config) keeps a router over the original experts whose
chosen indices are sent through the map (:class:`_PaddedLogitsRouter`), so routing is exactly the original's.

One file serves the five families: they differ only in the upstream classes and the router's attribute name
(``mlp.gate`` vs gpt-oss's ``mlp.router``), which :data:`_LAYOUTS` records. Two upstream pieces assume one expert
count and are handled here:

* the load-balancing loss (``output_router_logits=True``) stacks the router logits of all layers: the routers of
  smaller layers return their logits padded to the largest count with ``-inf`` (probability exactly 0, never in a
  top-k), so the upstream loss runs unchanged over ``num_experts`` = the largest count;
* the on-disk layout: ``save_pretrained`` writes stock checkpoints of Mixtral/Qwen/OLMoE with one tensor per expert
  (``transformers.conversion_mapping``) but skips those conversions for custom classes; registering the upstream
  conversions under the pruned model types (when the first pruned model is built, also as remote code) makes pruned
  checkpoints use exactly the stock layout.

The experts kernel (``set_experts_implementation``: eager loop, ``batched_mm``, ``grouped_mm``) is chosen by the
upstream experts modules, which dispatch on ``config._experts_implementation``; whether the model may set it,
transformers decides from the source of the class's module. That answer is delegated to the stock class (see
``_PrunedCausalLM._can_set_experts_implementation``), so a pruned model offers and defaults to its family's kernels.

Only ``torch``/``transformers`` are imported, so ``save_pretrained`` can copy this file next to the weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssForCausalLM, GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralForCausalLM, MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts, OlmoeForCausalLM, OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeExperts,
    Qwen2MoeForCausalLM,
    Qwen2MoeTopKRouter,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeExperts,
    Qwen3MoeForCausalLM,
    Qwen3MoeTopKRouter,
)

from .configuration_pruned_decoder_moe import (
    PerLayerExpertsMixin,
    PrunedGptOssConfig,
    PrunedMixtralConfig,
    PrunedOlmoeConfig,
    PrunedQwen2MoeConfig,
    PrunedQwen3MoeConfig,
    sparse_layer_indices,
)


class _PaddedLogitsRouter:
    """Router mixin: logits padded with ``-inf`` to ``padded_num_experts`` columns; scores unchanged; indices
    unchanged, or sent through ``expert_map`` (a logical merge: the router chooses among the original experts, each
    choice goes to the expert that original was merged into; two choices may then name the same expert, whose
    output the experts module adds with both gates, exactly as for the two originals)."""

    padded_num_experts: int = 0
    expert_map: list[int] | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits, router_scores, router_indices = super().forward(hidden_states)
        missing = self.padded_num_experts - router_logits.shape[-1]
        if missing > 0:
            router_logits = nn.functional.pad(router_logits, (0, missing), value=float("-inf"))
        if self.expert_map is not None:
            router_indices = torch.as_tensor(self.expert_map, device=router_indices.device)[router_indices]
        return router_logits, router_scores, router_indices


class PrunedMixtralTopKRouter(_PaddedLogitsRouter, MixtralTopKRouter):
    pass


class PrunedQwen2MoeTopKRouter(_PaddedLogitsRouter, Qwen2MoeTopKRouter):
    pass


class PrunedQwen3MoeTopKRouter(_PaddedLogitsRouter, Qwen3MoeTopKRouter):
    pass


class PrunedOlmoeTopKRouter(_PaddedLogitsRouter, OlmoeTopKRouter):
    pass


class PrunedGptOssTopKRouter(_PaddedLogitsRouter, GptOssTopKRouter):
    pass


@dataclass(frozen=True)
class _SparseLayout:
    """Where one family keeps a sparse layer's router and experts, and the classes that build them."""

    router_attr: str
    router_class: type
    experts_class: type


_LAYOUTS: dict[str, _SparseLayout] = {
    "pruned_mixtral": _SparseLayout("gate", PrunedMixtralTopKRouter, MixtralExperts),
    "pruned_qwen2_moe": _SparseLayout("gate", PrunedQwen2MoeTopKRouter, Qwen2MoeExperts),
    "pruned_qwen3_moe": _SparseLayout("gate", PrunedQwen3MoeTopKRouter, Qwen3MoeExperts),
    "pruned_olmoe": _SparseLayout("gate", PrunedOlmoeTopKRouter, OlmoeExperts),
    "pruned_gpt_oss": _SparseLayout("router", PrunedGptOssTopKRouter, GptOssExperts),
}

# The stock model type whose checkpoint conversions (one tensor per expert on disk) a pruned type reuses.
_STOCK_TYPES = {
    "pruned_mixtral": "mixtral",
    "pruned_qwen2_moe": "qwen2_moe",
    "pruned_qwen3_moe": "qwen3_moe",
    "pruned_olmoe": "olmoe",
    "pruned_gpt_oss": "gpt_oss",
}


def resize_sparse_layers(layers: nn.ModuleList, config: PerLayerExpertsMixin) -> None:
    """Give every sparse layer of ``layers`` a router and experts sized by ``config.experts_per_layer()``."""
    layout = _LAYOUTS[config.model_type]
    indices = sparse_layer_indices(config)
    counts = config.experts_per_layer()
    if len(counts) != len(indices):
        raise ValueError(f"config lists {len(counts)} expert counts for {len(indices)} sparse layers")
    widths = config.router_widths()
    width = max(widths, default=0)
    for index, count, top_k, rows, expert_map in zip(
        indices, counts, config.top_k_per_layer(), widths, config.expert_maps()
    ):
        mlp = layers[index].mlp
        layer_config = copy.copy(config)
        layer_config.num_experts_per_layer = None
        layer_config.expert_map_per_layer = None
        layer_config.num_experts = rows
        layer_config.num_experts_per_tok = top_k
        router = layout.router_class(layer_config)
        router.padded_num_experts = width
        router.expert_map = expert_map
        setattr(mlp, layout.router_attr, router)
        layer_config.num_experts = count
        experts = layout.experts_class(layer_config)
        experts.config = config  # forward dispatch reads config._experts_implementation: follow the model's setting
        mlp.experts = experts
        if hasattr(mlp, "top_k"):  # Mixtral's block keeps a copy (unused by its forward)
            mlp.top_k = top_k


class _PrunedCausalLM:
    """Mixin: build the upstream model without initialising it, resize the sparse layers, then initialise."""

    def __init__(self, config: PerLayerExpertsMixin) -> None:
        register_weight_conversions()  # before from_pretrained / save_pretrained look the conversions up
        with init.no_init_weights():
            super().__init__(config)
        resize_sparse_layers(self.model.layers, config)
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """Whether the experts kernel may be chosen: the stock family's answer, whichever class is asked first.

        transformers answers by searching the source of the class's module for the experts-dispatch decorator and
        caches the answer on the class asked. The decorated experts classes live in the stock modules, not this one,
        so the search alone says no: a pruned model would run the eager loop where its family runs ``grouped_mm``,
        ignore ``set_experts_implementation("batched_mm")`` and refuse ``"grouped_mm"`` -- unless the stock class
        had been asked first in the process, whose cached yes the subclass then inherits. The experts modules are
        the stock ones (and read the model's config), so the stock answer is the right one.
        """
        return _stock_class(cls)._can_set_experts_implementation()


def _stock_class(cls: type) -> type:
    """The upstream ``*ForCausalLM`` a pruned class (or a subclass of one) extends."""
    return next(
        base for base in cls.__mro__ if issubclass(base, PreTrainedModel) and not issubclass(base, _PrunedCausalLM)
    )


class PrunedMixtralForCausalLM(_PrunedCausalLM, MixtralForCausalLM):
    """Mixtral with per-layer expert counts."""

    config: PrunedMixtralConfig
    config_class = PrunedMixtralConfig


class PrunedQwen2MoeForCausalLM(_PrunedCausalLM, Qwen2MoeForCausalLM):
    """Qwen2-MoE with per-layer expert counts (shared experts unchanged)."""

    config: PrunedQwen2MoeConfig
    config_class = PrunedQwen2MoeConfig


class PrunedQwen3MoeForCausalLM(_PrunedCausalLM, Qwen3MoeForCausalLM):
    """Qwen3-MoE with per-layer expert counts."""

    config: PrunedQwen3MoeConfig
    config_class = PrunedQwen3MoeConfig


class PrunedOlmoeForCausalLM(_PrunedCausalLM, OlmoeForCausalLM):
    """OLMoE with per-layer expert counts."""

    config: PrunedOlmoeConfig
    config_class = PrunedOlmoeConfig


class PrunedGptOssForCausalLM(_PrunedCausalLM, GptOssForCausalLM):
    """gpt-oss with per-layer expert counts."""

    config: PrunedGptOssConfig
    config_class = PrunedGptOssConfig


PRUNED_CAUSAL_LMS: dict[str, type] = {
    "mixtral": PrunedMixtralForCausalLM,
    "qwen2_moe": PrunedQwen2MoeForCausalLM,
    "qwen3_moe": PrunedQwen3MoeForCausalLM,
    "olmoe": PrunedOlmoeForCausalLM,
    "gpt_oss": PrunedGptOssForCausalLM,
}


_conversions_registered = False


def register_weight_conversions() -> None:
    """Give each pruned model type the stock type's checkpoint conversions (once).

    transformers applies conversions to custom classes only when they are registered for their model type; without
    this, pruned checkpoints would be written fused while stock ones are written per expert. Called when a pruned
    model is built (``from_pretrained`` builds the model before it looks conversions up), not at import: building
    transformers' conversion table takes a noticeable fraction of a second, which ``import uncurl_hf`` should not pay.
    """
    global _conversions_registered
    if _conversions_registered:
        return
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for pruned_type, stock_type in _STOCK_TYPES.items():
        conversions = get_checkpoint_conversion_mapping(stock_type)
        if conversions is not None:
            register_checkpoint_conversion_mapping(pruned_type, conversions, overwrite=True)
    _conversions_registered = True

__all__ = [
    "PRUNED_CAUSAL_LMS",
    "PrunedGptOssForCausalLM",
    "PrunedGptOssTopKRouter",
    "PrunedMixtralForCausalLM",
    "PrunedMixtralTopKRouter",
    "PrunedOlmoeForCausalLM",
    "PrunedOlmoeTopKRouter",
    "PrunedQwen2MoeForCausalLM",
    "PrunedQwen2MoeTopKRouter",
    "PrunedQwen3MoeForCausalLM",
    "PrunedQwen3MoeTopKRouter",
    "register_weight_conversions",
    "resize_sparse_layers",
]
