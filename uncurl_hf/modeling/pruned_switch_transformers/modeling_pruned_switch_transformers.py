"""Switch Transformers with a different number of experts in each sparse layer.

Design: reuse every upstream module. A :class:`PrunedSwitchTransformersStack` lets the upstream stack build its
blocks (with ``num_experts`` = the largest per-layer count, weight init disabled), then swaps each sparse
layer's router and expert dict for right-sized upstream ``SwitchTransformersTop1Router`` /
``SwitchTransformersExperts`` built from a per-layer copy of the config. Because the module classes and names
are the upstream ones, state-dict keys are identical to a Switch checkpoint's (``...mlp.experts.expert_3.wi``),
``OutputRecorder`` still captures router logits, and ``forward``/``generate`` are upstream code.

A layer with an expert map (a *logical merge*, see the config) gets a :class:`MappedSwitchTransformersTop1Router`:
the upstream router over the original experts (same rows, same capacity per original expert) whose one-hot choice
is folded onto the layer's experts, so every token reaches the expert its original expert was merged into.

Three upstream pieces assume one expert count and are overridden here:
``_init_weights`` (loops over ``config.num_experts``), the router-loss computation in ``forward`` (it
``torch.cat``\\ s the router logits of all layers) and ``__init__`` (builds upstream stacks). The overriding
``forward`` repeats upstream's signature parameter for parameter, since callers (``Trainer``'s column filter,
``generate``) read it.

Only ``torch``/``transformers`` are imported, so ``save_pretrained`` can copy this file next to the weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import Seq2SeqMoEOutput
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersExperts,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersModel,
    SwitchTransformersPreTrainedModel,
    SwitchTransformersSparseMLP,
    SwitchTransformersStack,
    SwitchTransformersTop1Router,
    load_balancing_loss_func,
    router_z_loss_func,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_pruned_switch_transformers import PrunedSwitchTransformersConfig


def _layer_config(
    config: PrunedSwitchTransformersConfig, num_experts: int, capacity: int
) -> PrunedSwitchTransformersConfig:
    """A shallow copy of ``config`` with this layer's expert count and capacity (read only at construction)."""
    layer_config = copy.copy(config)
    layer_config.num_experts = num_experts
    layer_config.expert_capacity = capacity
    return layer_config


class MappedSwitchTransformersTop1Router(SwitchTransformersTop1Router):
    """Upstream top-1 router over the original experts, whose dispatch mask is folded onto fewer experts.

    ``num_experts`` stays the original count (the upstream forward one-hots over it, and capacity is counted per
    original expert, as before pruning); ``expert_map[e]`` is the output expert of original expert ``e``. The
    returned logits are the original experts' (router losses and ``output_router_logits`` see the original routing).
    """

    def __init__(self, config: PrunedSwitchTransformersConfig, expert_map: list[int]):
        super().__init__(config)
        self.expert_map = list(expert_map)
        self.num_output_experts = max(self.expert_map) + 1

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        expert_index, router_probs, router_logits = super().forward(hidden_states)
        index = torch.as_tensor(self.expert_map, device=expert_index.device)
        folded = expert_index.new_zeros(*expert_index.shape[:-1], self.num_output_experts)
        return folded.index_add_(-1, index, expert_index), router_probs, router_logits


class PrunedSwitchTransformersSparseMLP(SwitchTransformersSparseMLP):
    """Upstream sparse MLP, reshaping the dispatch mask by the experts it holds (not the router's width).

    Built from its two (right-sized) modules rather than from a config, which would build full-size ones first.
    """

    def __init__(self, router: SwitchTransformersTop1Router, experts: SwitchTransformersExperts):
        nn.Module.__init__(self)
        self.router = router
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        selected_experts, routing_weights, _ = self.router(hidden_states)
        selected_experts = selected_experts.view(-1, 1, len(self.experts))
        hidden_states = self.experts(hidden_states.view(-1, hidden_dim), selected_experts, routing_weights.view(-1, 1))
        return hidden_states.reshape(batch_size, sequence_length, hidden_dim)


def router_losses(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor] | None) -> tuple:
    """Router z-loss and Switch load-balancing loss computed per sparse layer, then averaged over layers.

    Upstream concatenates the logits of all layers along the sequence axis before computing the losses,
    which fails when layers have different expert counts. Per layer the formulas are upstream's; the z-loss
    average equals upstream's value exactly, the balancing loss is the mean of the per-layer Switch losses
    (each scaled by its own ``E_l ** 2``, so a perfectly balanced layer scores 1 whatever ``E_l``).
    Returns ``(0, 0)`` when there are no sparse layers, like upstream.
    """
    if not router_logits:
        return 0, 0
    z_losses, aux_losses = [], []
    for logits in router_logits:
        z_losses.append(router_z_loss_func(logits))
        aux_losses.append(load_balancing_loss_func(nn.functional.softmax(logits, dim=-1), logits.argmax(dim=-1)))
    return torch.stack(z_losses).mean(), torch.stack(aux_losses).mean()


class PrunedSwitchTransformersPreTrainedModel(SwitchTransformersPreTrainedModel):
    config: PrunedSwitchTransformersConfig
    config_class = PrunedSwitchTransformersConfig

    def _init_weights(self, module: nn.Module) -> None:
        """Upstream init, except sparse MLPs: iterate the experts the layer has, not ``config.num_experts``."""
        if isinstance(module, SwitchTransformersSparseMLP):
            factor = self.config.initializer_factor
            d_model = self.config.d_model
            init.normal_(module.router.classifier.weight, mean=0.0, std=factor * 1)
            if module.router.classifier.bias is not None:
                init.zeros_(module.router.classifier.bias)
            for expert in module.experts.values():
                init.normal_(expert.wi.weight, mean=0.0, std=factor * (d_model**-0.5))
                init.normal_(expert.wo.weight, mean=0.0, std=factor * (d_model**-0.5))
            return
        super()._init_weights(module)


class PrunedSwitchTransformersStack(PrunedSwitchTransformersPreTrainedModel, SwitchTransformersStack):
    """Upstream stack whose sparse layers are resized to the per-layer counts of the config."""

    def __init__(self, config: PrunedSwitchTransformersConfig):
        with init.no_init_weights():
            SwitchTransformersStack.__init__(self, config)
        counts = config.experts_per_layer(config.is_decoder)
        capacities = config.capacity_per_layer(config.is_decoder)
        maps = config.expert_maps(config.is_decoder)
        sparse = [block.layer[-1] for block in self.block if block.layer[-1].is_sparse]
        if len(sparse) != len(counts):
            raise ValueError(f"config lists {len(counts)} expert counts for {len(sparse)} sparse layers")
        for ff, num_experts, capacity, expert_map in zip(sparse, counts, capacities, maps):
            layer_config = _layer_config(config, num_experts, capacity)
            experts = SwitchTransformersExperts(layer_config)
            if expert_map is None:
                ff.mlp.router = SwitchTransformersTop1Router(layer_config)
                ff.mlp.experts = experts
            else:
                router_config = _layer_config(config, len(expert_map), capacity)
                router = MappedSwitchTransformersTop1Router(router_config, expert_map)
                ff.mlp = PrunedSwitchTransformersSparseMLP(router, experts)
        self.post_init()


class PrunedSwitchTransformersModel(PrunedSwitchTransformersPreTrainedModel, SwitchTransformersModel):
    """Bare encoder-decoder (no LM head) with per-layer expert counts."""

    def __init__(self, config: PrunedSwitchTransformersConfig):
        PrunedSwitchTransformersPreTrainedModel.__init__(self, config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = _build_stacks(config)
        self.post_init()


class PrunedSwitchTransformersForConditionalGeneration(
    PrunedSwitchTransformersPreTrainedModel, SwitchTransformersForConditionalGeneration
):
    """Switch Transformers LM with per-layer expert counts; router losses computed per layer."""

    def __init__(self, config: PrunedSwitchTransformersConfig):
        PrunedSwitchTransformersPreTrainedModel.__init__(self, config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = _build_stacks(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.router_z_loss_coef = config.router_z_loss_coef
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor] | Seq2SeqMoEOutput:
        """Upstream forward without labels, then the LM loss plus per-layer router losses (see ``router_losses``).

        The parameters are exactly upstream's, named rather than left in ``**kwargs``: ``Trainer`` keeps only the
        dataset columns named in ``inspect.signature(model.forward)`` (a ``decoder_attention_mask`` column would be
        dropped silently) and ``generate`` checks its model kwargs against the same signature. The
        ``past_key_values`` alias is renamed to ``cache`` here, as upstream does, so that it is not lost when the
        named ``cache=None`` is passed on.
        """
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        if output_router_logits:
            outputs.encoder_z_loss, outputs.encoder_aux_loss = router_losses(outputs.encoder_router_logits)
            outputs.decoder_z_loss, outputs.decoder_aux_loss = router_losses(outputs.decoder_router_logits)
        if labels is not None:
            logits = outputs.logits
            loss = CrossEntropyLoss(ignore_index=-100)(
                logits.view(-1, logits.size(-1)), labels.to(logits.device).view(-1)
            )
            if output_router_logits:
                loss = loss + self.router_z_loss_coef * (outputs.encoder_z_loss + outputs.decoder_z_loss)
                loss = loss + self.router_aux_loss_coef * (outputs.encoder_aux_loss + outputs.decoder_aux_loss)
            outputs.loss = loss
        return outputs

    def _unpack_router_logits(self, router_outputs):
        """Only reached from upstream ``forward``; its values are replaced by :func:`router_losses`.

        Pads every layer to the largest count with ``-inf`` logits so the upstream concatenation cannot fail.
        """
        width = max(logits.shape[-1] for logits in router_outputs)
        padded = [
            nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf")) for logits in router_outputs
        ]
        router_logits = torch.cat(padded, dim=1)
        return router_logits, router_logits.argmax(dim=-1)


def _build_stacks(config: PrunedSwitchTransformersConfig) -> tuple[PrunedSwitchTransformersStack, ...]:
    """Encoder and decoder stacks, configured exactly as upstream ``__init__`` does."""
    encoder_config = copy.deepcopy(config)
    encoder_config.is_decoder = False
    encoder_config.use_cache = False
    decoder_config = copy.deepcopy(config)
    decoder_config.is_decoder = True
    decoder_config.num_layers = config.num_decoder_layers
    return PrunedSwitchTransformersStack(encoder_config), PrunedSwitchTransformersStack(decoder_config)


__all__ = [
    "MappedSwitchTransformersTop1Router",
    "PrunedSwitchTransformersForConditionalGeneration",
    "PrunedSwitchTransformersModel",
    "PrunedSwitchTransformersPreTrainedModel",
    "PrunedSwitchTransformersSparseMLP",
    "PrunedSwitchTransformersStack",
    "router_losses",
]
