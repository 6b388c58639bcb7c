"""Switch Transformers (``google/switch-*``) and the pruned variant written by uncurl-hf.

Layout (transformers 5): every sparse FF is ``{encoder|decoder}.block.{i}.layer.{-1}.mlp`` holding
``router.classifier = Linear(d_model, E)`` and ``experts = ModuleDict(expert_{j} = DenseActDense(wi, wo))``.
Routing is top-1 over a softmax computed in ``router_dtype`` (float32); the expert output is scaled by the
winning probability; tokens beyond ``expert_capacity`` per expert *per sequence* are dropped (output 0).
A pruned checkpoint is a :class:`PrunedSwitchTransformersForConditionalGeneration` with the same module
names, so it is handled here too and can be pruned again.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from uncurl_hf.errors import UnsupportedModelError
from uncurl_hf.families import register_family
from uncurl_hf.families.base import MoEFamily, MoELayer, ReducedLayer

# Keys of ``config.to_dict()`` that must not be passed to a new config: set by transformers or derived.
DERIVED_CONFIG_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "_name_or_path",
    "encoder_sparse_step",
    "decoder_sparse_step",
)


@register_family
class SwitchTransformersFamily(MoEFamily):
    name = "switch_transformers"
    description = "Switch Transformers encoder-decoder (top-1 routing, per-expert wi/wo), and uncurl's pruned variant"
    model_types = ("switch_transformers", "pruned_switch_transformers")
    neuron_axes = {"wi": 0, "wo": 1}

    def auto_model_class(self) -> type:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def sparse_layers(self, model: nn.Module) -> list[MoELayer]:
        layers: list[MoELayer] = []
        for side, mask_key in (("encoder", "attention_mask"), ("decoder", "decoder_attention_mask")):
            stack = getattr(model, side, None)
            if stack is None:
                continue
            for i, block in enumerate(stack.block):
                ff_index = len(block.layer) - 1
                ff = block.layer[ff_index]
                if not getattr(ff, "is_sparse", False):
                    continue
                mlp = ff.mlp
                experts = [mlp.experts[f"expert_{j}"] for j in range(len(mlp.experts))]
                layers.append(
                    MoELayer(
                        name=f"{side}.block.{i}",
                        prefix=f"{side}.block.{i}.layer.{ff_index}.mlp",
                        module=mlp,
                        router=mlp.router.classifier,
                        experts=experts,
                        top_k=1,
                        mask_key=mask_key,
                    )
                )
        return layers

    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        router = layer.module.router
        return router.classifier(hidden.to(router.dtype)).float()

    def expert_tensors(self, layer: MoELayer, index: int) -> dict[str, torch.Tensor]:
        expert = layer.experts[index]
        return {"wi": expert.wi.weight.detach(), "wo": expert.wo.weight.detach()}

    def router_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        tensors = {"weight": layer.router.weight.detach()}
        if layer.router.bias is not None:
            tensors["bias"] = layer.router.bias.detach()
        return tensors

    def expert_capacity(self, layer: MoELayer) -> int | None:
        return int(layer.module.router.expert_capacity)

    def forward_inputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder inputs plus the decoder side: teacher-forced labels, explicit ids, or just the start token."""
        inputs = super().forward_inputs(model, batch)
        device = inputs["input_ids"].device
        if batch.get("decoder_input_ids") is not None:
            decoder_ids = batch["decoder_input_ids"].to(device)
            decoder_mask = batch.get("decoder_attention_mask")
        elif batch.get("labels") is not None:
            labels = batch["labels"].to(device)
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels)
            decoder_mask = batch.get("decoder_attention_mask")
            if decoder_mask is None:
                decoder_mask = (labels != -100).long()
        else:
            decoder_ids = torch.full((inputs["input_ids"].shape[0], 1), _start_token(model), device=device)
            decoder_mask = None
        inputs["decoder_input_ids"] = decoder_ids
        inputs["decoder_attention_mask"] = (
            torch.ones_like(decoder_ids) if decoder_mask is None else decoder_mask.to(device)
        )
        inputs["use_cache"] = False
        return inputs

    def dummy_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        inputs = super().dummy_inputs(model)
        start = torch.full((2, 1), _start_token(model))
        inputs["decoder_input_ids"] = torch.cat([start, inputs["input_ids"][:, :3]], dim=1)
        return inputs

    def build_reduced_model(
        self, model: nn.Module, layers: Mapping[str, ReducedLayer], base_model: str | None = None
    ) -> nn.Module:
        """Build the pruned model on the meta device (no random init), then assign its tensors.

        Every assigned tensor is a copy or a new merge result, so the input model never shares storage with it.
        """
        from transformers import SwitchTransformersForConditionalGeneration, SwitchTransformersModel

        from uncurl_hf.modeling.pruned_switch_transformers import (
            PrunedSwitchTransformersForConditionalGeneration,
            PrunedSwitchTransformersModel,
        )

        if isinstance(model, SwitchTransformersForConditionalGeneration):
            model_class: type = PrunedSwitchTransformersForConditionalGeneration
        elif isinstance(model, SwitchTransformersModel):
            model_class = PrunedSwitchTransformersModel
        else:
            raise UnsupportedModelError(
                f"Cannot prune a {type(model).__name__}; load the checkpoint with AutoModelForSeq2SeqLM "
                "(SwitchTransformersForConditionalGeneration) instead."
            )
        current = self.sparse_layers(model)
        unknown = set(layers) - {layer.name for layer in current}
        if unknown:
            raise UnsupportedModelError(f"The model has no sparse layers named {sorted(unknown)}.")
        config = self.reduced_config(model.config, current, layers, base_model)

        replaced = tuple(
            f"{layer.prefix}.{part}." for layer in current if layer.name in layers for part in ("router", "experts")
        )
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(replaced)}
        for layer in current:
            reduced = layers.get(layer.name)
            if reduced is None:
                continue
            for name, tensor in reduced.router.items():
                state[f"{layer.prefix}.router.classifier.{name}"] = tensor.contiguous()
            for j, expert in enumerate(reduced.experts):
                for name, tensor in expert.items():
                    state[f"{layer.prefix}.experts.expert_{j}.{name}.weight"] = tensor.contiguous()

        with torch.device("meta"):
            new_model = model_class(config)
        new_model.load_state_dict(state, strict=True, assign=True)
        new_model.tie_weights()
        still_meta = [name for name, p in new_model.named_parameters() if p.is_meta]
        if still_meta:  # pragma: no cover - would be a bug in the key mapping above
            raise RuntimeError(f"parameters left on the meta device: {still_meta[:5]}")
        new_model.generation_config = copy.deepcopy(model.generation_config)
        new_model.train(model.training)
        return new_model

    def reduced_config(
        self,
        config: Any,
        current: list[MoELayer],
        layers: Mapping[str, ReducedLayer],
        base_model: str | None,
    ) -> Any:
        """A ``PrunedSwitchTransformersConfig`` equal to ``config`` with the new per-layer counts/capacities."""
        from uncurl_hf.modeling.pruned_switch_transformers import PrunedSwitchTransformersConfig

        counts: dict[str, list[int]] = {"encoder": [], "decoder": []}
        capacities: dict[str, list[int]] = {"encoder": [], "decoder": []}
        for layer in current:
            side = layer.name.split(".", 1)[0]
            reduced = layers.get(layer.name)
            counts[side].append(reduced.num_experts if reduced else layer.num_experts)
            capacity = reduced.expert_capacity if reduced and reduced.expert_capacity else None
            capacities[side].append(capacity or int(self.expert_capacity(layer) or config.expert_capacity))

        values = {k: v for k, v in config.to_dict().items() if k not in DERIVED_CONFIG_KEYS}
        all_counts = counts["encoder"] + counts["decoder"]
        values.update(
            num_experts=max(all_counts),
            num_experts_per_encoder_layer=counts["encoder"],
            num_experts_per_decoder_layer=counts["decoder"],
            expert_capacity_per_encoder_layer=capacities["encoder"],
            expert_capacity_per_decoder_layer=capacities["decoder"],
        )
        previous_base = values.get("uncurl_base_model")
        values["uncurl_base_model"] = previous_base or base_model
        return PrunedSwitchTransformersConfig(**values)


def _start_token(model: nn.Module) -> int:
    """The decoder start token (Switch/T5 use the pad token when the config does not say)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "pad_token_id", None)
    return int(start or 0)
