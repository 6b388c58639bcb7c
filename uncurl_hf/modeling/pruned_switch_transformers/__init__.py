"""``pruned_switch_transformers``: Switch Transformers with per-layer expert counts, registered with Auto classes."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_pruned_switch_transformers import PrunedSwitchTransformersConfig, sparse_block_indices
from .modeling_pruned_switch_transformers import (
    PrunedSwitchTransformersForConditionalGeneration,
    PrunedSwitchTransformersModel,
    PrunedSwitchTransformersPreTrainedModel,
    PrunedSwitchTransformersStack,
    router_losses,
)


def register() -> None:
    """Register the config and models with the Auto classes (idempotent).

    ``register_for_auto_class`` also makes ``save_pretrained`` copy the two module files and write ``auto_map``,
    so a checkpoint can be loaded elsewhere with ``trust_remote_code=True``.
    """
    model_type = PrunedSwitchTransformersConfig.model_type
    try:
        AutoConfig.register(model_type, PrunedSwitchTransformersConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    for auto_class, model_class in (
        (AutoModel, PrunedSwitchTransformersModel),
        (AutoModelForSeq2SeqLM, PrunedSwitchTransformersForConditionalGeneration),
    ):
        try:
            auto_class.register(PrunedSwitchTransformersConfig, model_class)
        except ValueError:
            pass
    PrunedSwitchTransformersConfig.register_for_auto_class()
    PrunedSwitchTransformersModel.register_for_auto_class("AutoModel")
    PrunedSwitchTransformersForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")


register()

__all__ = [
    "PrunedSwitchTransformersConfig",
    "PrunedSwitchTransformersForConditionalGeneration",
    "PrunedSwitchTransformersModel",
    "PrunedSwitchTransformersPreTrainedModel",
    "PrunedSwitchTransformersStack",
    "register",
    "router_losses",
    "sparse_block_indices",
]
