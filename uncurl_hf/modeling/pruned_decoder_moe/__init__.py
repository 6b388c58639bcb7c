"""Pruned decoder-only MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss), registered with Auto classes.

One package for the five families rather than five copies: they share the per-layer-count logic and differ only in
the upstream classes they extend (see ``modeling_pruned_decoder_moe``).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pruned_decoder_moe import (
    PRUNED_CONFIGS,
    PerLayerExpertsMixin,
    PrunedGptOssConfig,
    PrunedMixtralConfig,
    PrunedOlmoeConfig,
    PrunedQwen2MoeConfig,
    PrunedQwen3MoeConfig,
    sparse_layer_indices,
)
from .modeling_pruned_decoder_moe import (
    PRUNED_CAUSAL_LMS,
    PrunedGptOssForCausalLM,
    PrunedMixtralForCausalLM,
    PrunedOlmoeForCausalLM,
    PrunedQwen2MoeForCausalLM,
    PrunedQwen3MoeForCausalLM,
    register_weight_conversions,
    resize_sparse_layers,
)


def register() -> None:
    """Register every pruned config and causal LM with the Auto classes (idempotent).

    ``register_for_auto_class`` also makes ``save_pretrained`` copy the two module files and write ``auto_map``,
    so a checkpoint can be loaded elsewhere with ``trust_remote_code=True``.
    """
    for family, config_class in PRUNED_CONFIGS.items():
        model_class = PRUNED_CAUSAL_LMS[family]
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered (module reloaded)
            pass
        try:
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:
            pass
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")


register()

__all__ = [
    "PRUNED_CAUSAL_LMS",
    "PRUNED_CONFIGS",
    "PerLayerExpertsMixin",
    "PrunedGptOssConfig",
    "PrunedGptOssForCausalLM",
    "PrunedMixtralConfig",
    "PrunedMixtralForCausalLM",
    "PrunedOlmoeConfig",
    "PrunedOlmoeForCausalLM",
    "PrunedQwen2MoeConfig",
    "PrunedQwen2MoeForCausalLM",
    "PrunedQwen3MoeConfig",
    "PrunedQwen3MoeForCausalLM",
    "register",
    "register_weight_conversions",
    "resize_sparse_layers",
    "sparse_layer_indices",
]
