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
import functools
import json
from typing import Any, Mapping, MutableMapping

import torch
from torch import nn

from uncurl_hf.errors import CheckpointError, UnsupportedModelError
from uncurl_hf.families import register_family
from uncurl_hf.families.base import DiskLayer, MoEFamily, MoELayer, ReducedLayer, TensorReader

# Keys of ``config.to_dict()`` that must not be passed to a new config: set by transformers or derived.
DERIVED_CONFIG_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "_name_or_path",
    "encoder_sparse_step",
    "decoder_sparse_step",
    "expert_map_per_encoder_layer",
    "expert_map_per_decoder_layer",
)


@register_family
class SwitchTransformersFamily(MoEFamily):
    name = "switch_transformers"
    description = "Switch Transformers encoder-decoder (top-1 routing, per-expert wi/wo), and uncurl's pruned variant"
    model_types = ("switch_transformers", "pruned_switch_transformers")
    neuron_axes = {"wi": 0, "wo": 1}
    output_keys = ("wo",)

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
                        expert_map=getattr(mlp.router, "expert_map", None),
                    )
                )
        return layers

    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        router = layer.module.router
        return router.classifier(hidden.to(router.dtype)).float()

    def expert_tensors(self, layer: MoELayer, index: int) -> dict[str, torch.Tensor]:
        expert = layer.experts[index]
        return {"wi": expert.wi.weight.detach(), "wo": expert.wo.weight.detach()}

    def run_expert_tensors(
        self, layer: MoELayer, tensors: Mapping[str, torch.Tensor], hidden: torch.Tensor
    ) -> torch.Tensor:
        """The layer's own ``DenseActDense`` forward (activation, dtype casts) with ``tensors`` as its weights."""
        weights = {f"{part}.weight": tensors[part] for part in ("wi", "wo")}
        return torch.func.functional_call(layer.experts[0], weights, (hidden,))

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
        self, model: nn.Module, layers: MutableMapping[str, ReducedLayer], base_model: str | None = None,
        consume: bool = False, share: bool = False,
    ) -> nn.Module:
        """Build the pruned model on the meta device (no random init), then assign its tensors.

        Every assigned tensor is a copy or a new merge result, so the input model never shares storage with it
        (unless ``share``, see the base class).
        Switch experts keep their per-expert layout, so nothing is repacked and ``consume`` only empties ``layers``.
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
        config = self.reduced_config(
            model.config, [(layer.name, layer.num_experts, self.expert_capacity(layer)) for layer in current],
            layers, base_model,
        )

        replaced = tuple(
            f"{layer.prefix}.{part}." for layer in current if layer.name in layers for part in ("router", "experts")
        )
        kept = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(replaced)}
        state = kept if share else {k: v.clone() for k, v in kept.items()}
        for layer in current:
            reduced = layers.pop(layer.name, None) if consume else layers.get(layer.name)
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
        current: list[tuple[str, int, int | None]],
        layers: Mapping[str, ReducedLayer | int],
        base_model: str | None,
    ) -> Any:
        """A ``PrunedSwitchTransformersConfig`` equal to ``config`` with the new per-layer counts/capacities.

        ``current`` lists every sparse layer as ``(name, num_experts, expert_capacity)`` in model order; ``layers``
        gives the reduced ones (a :class:`ReducedLayer`, or just its expert count). A layer keeps its capacity
        unless its :class:`ReducedLayer` carries a new one.
        """
        from uncurl_hf.modeling.pruned_switch_transformers import PrunedSwitchTransformersConfig

        counts: dict[str, list[int]] = {"encoder": [], "decoder": []}
        capacities: dict[str, list[int]] = {"encoder": [], "decoder": []}
        maps: dict[str, list[list[int] | None]] = {"encoder": [], "decoder": []}
        for name, num_experts, old_capacity in current:
            side = name.split(".", 1)[0]
            reduced = layers.get(name)
            count = reduced if isinstance(reduced, int) else reduced.num_experts if reduced else num_experts
            counts[side].append(count)
            capacity = reduced.expert_capacity if isinstance(reduced, ReducedLayer) else None
            capacities[side].append(capacity or int(old_capacity or config.expert_capacity))
            maps[side].append(reduced.expert_map if isinstance(reduced, ReducedLayer) else None)

        values = {k: v for k, v in config.to_dict().items() if k not in DERIVED_CONFIG_KEYS}
        all_counts = counts["encoder"] + counts["decoder"]
        values.update(
            num_experts=max(all_counts),
            num_experts_per_encoder_layer=counts["encoder"],
            num_experts_per_decoder_layer=counts["decoder"],
            expert_capacity_per_encoder_layer=capacities["encoder"],
            expert_capacity_per_decoder_layer=capacities["decoder"],
        )
        if any(m is not None for side in maps.values() for m in side):  # a logical merge (router rule "map")
            values.update(expert_map_per_encoder_layer=maps["encoder"], expert_map_per_decoder_layer=maps["decoder"])
        previous_base = values.get("uncurl_base_model")
        values["uncurl_base_model"] = previous_base or base_model
        return PrunedSwitchTransformersConfig(**values)

    # ---- on-disk view (out-of-core surgery, uncurl_hf/surgery/streaming.py) ---------------------------------------------
    # Stored keys: ``{prefix}.router.classifier.{weight,bias}`` and ``{prefix}.experts.expert_{j}.{wi,wo}.weight``
    # with ``prefix = {side}.block.{i}.layer.{1 encoder | 2 decoder}.mlp``: one tensor per expert, no fusing.

    def disk_layers(self, config: Mapping[str, Any], keys: list[str]) -> list[DiskLayer]:
        """Sparse layers from ``config.json`` (which blocks are sparse, experts per layer), checked against ``keys``.

        A side without stored blocks (an encoder-only checkpoint has no ``decoder.*``) has no layers. A layer whose
        stored experts do not match its configured count raises :class:`CheckpointError`.
        """
        layers: list[DiskLayer] = []
        stored = set(keys)
        for side, name, prefix, num_experts, capacity in self._config_layers(_config_object(config)):
            if not any(key.startswith(f"{side}.block.") for key in stored):
                continue
            owned = frozenset(k for k in keys if k.startswith((f"{prefix}.router.", f"{prefix}.experts.")))
            expected = {f"{prefix}.router.classifier.weight"} | {
                f"{prefix}.experts.expert_{j}.{part}.weight" for j in range(num_experts) for part in ("wi", "wo")
            }
            missing = sorted(expected - owned)
            extra = sorted(k for k in owned - expected if k != f"{prefix}.router.classifier.bias")
            if missing or extra:
                raise CheckpointError(
                    f"Layer {name}: config.json says {num_experts} experts but the weights "
                    f"{'lack ' + ', '.join(missing[:3]) if missing else 'also hold ' + ', '.join(extra[:3])}"
                    f"{' ...' if len(missing or extra) > 3 else ''}. The weights do not belong to this config.json; "
                    "restore the config that came with them."
                )
            layers.append(
                DiskLayer(name=name, num_experts=num_experts, keys=owned, top_k=1, expert_capacity=int(capacity))
            )
        return layers

    def read_disk_expert(self, layer: DiskLayer, index: int, reader: TensorReader) -> dict[str, torch.Tensor]:
        prefix = _disk_prefix(layer)
        return {part: reader.get(f"{prefix}.experts.expert_{index}.{part}.weight") for part in ("wi", "wo")}

    def read_disk_router(self, layer: DiskLayer, reader: TensorReader) -> dict[str, torch.Tensor]:
        prefix = _disk_prefix(layer)
        tensors = {"weight": reader.get(f"{prefix}.router.classifier.weight")}
        if f"{prefix}.router.classifier.bias" in layer.keys:
            tensors["bias"] = reader.get(f"{prefix}.router.classifier.bias")
        return tensors

    def write_disk_layer(self, layer: DiskLayer, reduced: ReducedLayer) -> dict[str, torch.Tensor]:
        """The keys :meth:`build_reduced_model` + ``save_pretrained`` would write for this layer (same names)."""
        prefix = _disk_prefix(layer)
        tensors = {f"{prefix}.router.classifier.{name}": t.contiguous() for name, t in reduced.router.items()}
        for j, expert in enumerate(reduced.experts):
            for part, tensor in expert.items():
                tensors[f"{prefix}.experts.expert_{j}.{part}.weight"] = tensor.contiguous()
        return tensors

    def reduced_config_dict(
        self,
        config: Mapping[str, Any],
        layers: Mapping[str, ReducedLayer | int],
        base_model: str | None = None,
    ) -> dict[str, Any]:
        """Exactly the ``config.json`` the in-memory path writes: :meth:`reduced_config` plus what ``save_pretrained``
        sets (``architectures``, ``dtype``, ``auto_map`` of the pruned classes), serialized like
        ``PreTrainedConfig.save_pretrained`` (``to_json_string(use_diff=True)``)."""
        from uncurl_hf.modeling.pruned_switch_transformers import (
            PrunedSwitchTransformersForConditionalGeneration,
            PrunedSwitchTransformersModel,
        )

        source = _config_object(config)
        current = [(name, count, capacity) for _, name, _, count, capacity in self._config_layers(source)]
        reduced = self.reduced_config(source, current, layers, base_model)
        architectures = [str(a) for a in (config.get("architectures") or [])]
        model_class: type = (
            PrunedSwitchTransformersModel
            if architectures and all(a.endswith("SwitchTransformersModel") for a in architectures)
            else PrunedSwitchTransformersForConditionalGeneration
        )
        reduced.architectures = [model_class.__name__]
        reduced.dtype = _dtype_name(source.dtype, layers)
        reduced.auto_map = {
            cls._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
            for cls in (type(reduced), model_class)
        }
        if hasattr(reduced, "validate"):
            reduced.validate()  # what save_pretrained checks before writing
        return json.loads(reduced.to_json_string(use_diff=True))

    def _config_layers(self, config: Any) -> list[tuple[str, str, str, int, int]]:
        """``(side, layer name, stored prefix, num_experts, expert_capacity)`` of every sparse layer, model order.

        Same rule as ``SwitchTransformersStack`` (blocks ``i % sparse_step == 1``), with the per-layer counts and
        capacities of a pruned config.
        """
        from uncurl_hf.modeling.pruned_switch_transformers import sparse_block_indices

        records = []
        for side, num_blocks, step, ff_index in (
            ("encoder", config.num_layers, config.encoder_sparse_step, 1),
            ("decoder", config.num_decoder_layers, config.decoder_sparse_step, 2),
        ):
            blocks = sparse_block_indices(num_blocks, step)
            is_decoder = side == "decoder"
            if hasattr(config, "experts_per_layer"):
                counts, capacities = config.experts_per_layer(is_decoder), config.capacity_per_layer(is_decoder)
            else:
                counts, capacities = [config.num_experts] * len(blocks), [config.expert_capacity] * len(blocks)
            for i, count, capacity in zip(blocks, counts, capacities):
                records.append((side, f"{side}.block.{i}", f"{side}.block.{i}.layer.{ff_index}.mlp", count, capacity))
        return records


def _config_object(config: Mapping[str, Any]) -> Any:
    """The config class of ``config["model_type"]`` built from a ``config.json`` dict (no model, no weights)."""
    import uncurl_hf.modeling.pruned_switch_transformers  # noqa: F401  (registers pruned_switch_transformers)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(config)
    model_type = values.get("model_type")
    if model_type not in SwitchTransformersFamily.model_types:
        raise UnsupportedModelError(f"model_type {model_type!r} is not a Switch Transformers config.")
    return CONFIG_MAPPING[model_type].from_dict(values)


@functools.lru_cache(maxsize=256)
def _disk_prefix(layer: DiskLayer) -> str:
    """``{side}.block.{i}.layer.{k}.mlp`` of a layer, from its router key (the stored names carry the FF index)."""
    suffix = ".router.classifier.weight"
    for key in layer.keys:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise CheckpointError(f"Layer {layer.name} has no stored router weight; re-save the checkpoint.")


def _dtype_name(dtype: Any, layers: Mapping[str, ReducedLayer | int]) -> str:
    """``config.dtype`` as ``save_pretrained`` writes it (the model's float dtype, e.g. ``"bfloat16"``).

    A config without a dtype loads in the dtype of its weights (``dtype="auto"``): take it from a reduced layer.
    """
    if dtype is None:
        for reduced in layers.values():
            if isinstance(reduced, ReducedLayer) and reduced.experts:
                dtype = next(iter(reduced.experts[0].values())).dtype
                break
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


def _start_token(model: nn.Module) -> int:
    """The decoder start token (Switch/T5 use the pad token when the config does not say)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "pad_token_id", None)
    return int(start or 0)
