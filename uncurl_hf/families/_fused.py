"""Shared adapter for decoder-only MoE families whose experts are fused tensors in memory (transformers 5).

Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (and gpt-oss, with its own tensor layout, see ``gpt_oss.py``) hold every
sparse layer as ``model.layers.{i}.mlp`` with a router module (``mlp.gate.weight [E, H]``; gpt-oss ``mlp.router``
with a bias) and one experts module with fused parameters: ``experts.gate_up_proj [E, 2I, H]`` (gate rows first,
then up rows; ``act(gate x) * up x``) and ``experts.down_proj [E, H, I]``. The adapter exchanges one expert as
``{"gate": [I, H], "up": [I, H], "down": [H, I]}`` with hidden neurons on axes ``{gate: 0, up: 0, down: 1}``, so a
neuron permutation moves a gate row, the matching up row and the matching down column together.

On disk, ``save_pretrained`` reverses ``transformers.conversion_mapping``: stock checkpoints of these four families
store one tensor per expert (``model.layers.{i}.mlp.experts.{j}.gate_proj.weight`` ...; Mixtral
``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w3/w2.weight`` and ``block_sparse_moe.gate``), which the loader
fuses again. Both layouts are read (a fused ``experts.gate_up_proj`` on disk also loads); the reduced layer is written
in the per-expert layout ``save_pretrained`` writes, for stock and pruned outputs alike (the pruned model types
reuse the stock conversions, see :mod:`uncurl_hf.modeling.pruned_decoder_moe`).

Output configs: when every sparse layer keeps the same count ``k``, the reduced model is a stock model
(``num_experts``/``num_local_experts = k``, ``num_experts_per_tok = min(top_k, k)``) that stock transformers loads
without uncurl-hf; otherwise it is the family's ``Pruned*ForCausalLM`` with ``num_experts_per_layer``.

Routing (:meth:`MoEFamily.routing`): softmax over all experts in float32, then top-k of the probabilities, exactly
as the Mixtral/Qwen/OLMoE routers pick experts. (What they do with the top-k probabilities differs: Mixtral
renormalises them; Qwen/OLMoE only when ``norm_topk_prob`` — without it a token's gate weights are its softmax over
*all* experts, so removing experts, even never-routed ones, scales the surviving gates up slightly.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from uncurl_hf.errors import UnsupportedModelError
from uncurl_hf.families._fused_disk import DERIVED_CONFIG_KEYS, FusedDiskView
from uncurl_hf.families.base import MoEFamily, MoELayer, ReducedLayer, _device_of

logger = logging.getLogger(__name__)



class FusedExpert(nn.Module):
    """Expert ``index`` of a fused experts module, as the per-expert module :class:`MoELayer` lists.

    It holds the fused module, so ``parameters()`` reports the experts' dtype and device; calling it runs that one
    expert (no gate scaling). It is a view made on demand, never attached to the model.
    """

    def __init__(self, family: FusedMoEFamily, experts: nn.Module, index: int) -> None:
        super().__init__()
        self.experts = experts
        self.index = index
        self._family = family

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._family.expert_forward(self.experts, self.index, hidden)


class FusedMoEFamily(FusedDiskView, MoEFamily):
    """Adapter for one decoder-only family with fused experts; subclasses set the class variables below."""

    stock_model_type: ClassVar[str]  # "mixtral"
    stock_lm_class: ClassVar[str]  # "MixtralForCausalLM" (an attribute of the transformers package)
    router_attr: ClassVar[str] = "gate"
    # Module names a sparse block has in stored keys; the first is what save_pretrained writes.
    disk_blocks: ClassVar[tuple[str, ...]] = ("mlp",)
    # Per-expert stored tensor names {our key: stored name}; None when the family stores experts fused.
    disk_expert_names: ClassVar[dict[str, str] | None] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    fused_params: ClassVar[tuple[str, ...]] = ("gate_up_proj", "down_proj")
    router_params: ClassVar[tuple[str, ...]] = ("weight",)
    neuron_axes: ClassVar[dict[str, int]] = {"gate": 0, "up": 0, "down": 1}
    output_keys: ClassVar[tuple[str, ...]] = ("down",)

    @property
    def pruned_model_type(self) -> str:
        return f"pruned_{self.stock_model_type}"

    def auto_model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    # ---- classes ----------------------------------------------------------------------------------------------

    def stock_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.stock_lm_class)

    def stock_config_class(self) -> type:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[self.stock_model_type]

    def pruned_config_class(self) -> type:
        from uncurl_hf.modeling.pruned_decoder_moe import PRUNED_CONFIGS

        return PRUNED_CONFIGS[self.stock_model_type]

    def pruned_model_class(self) -> type:
        from uncurl_hf.modeling.pruned_decoder_moe import PRUNED_CAUSAL_LMS

        return PRUNED_CAUSAL_LMS[self.stock_model_type]

    # ---- the loaded model -------------------------------------------------------------------------------------

    def sparse_layers(self, model: nn.Module) -> list[MoELayer]:
        layers: list[MoELayer] = []
        for i, decoder_layer in enumerate(_decoder_layers(model)):
            mlp = getattr(decoder_layer, "mlp", None)
            router = getattr(mlp, self.router_attr, None)
            experts = getattr(mlp, "experts", None)
            if router is None or experts is None:  # a dense layer (Qwen2-MoE mlp_only_layers, decoder_sparse_step)
                continue
            count = int(getattr(experts, self.fused_params[0]).shape[0])
            expert_map = getattr(router, "expert_map", None)
            choices = len(expert_map) if expert_map is not None else count  # a logical merge routes over the originals
            layers.append(
                MoELayer(
                    name=f"model.layers.{i}",
                    prefix=f"model.layers.{i}.mlp",
                    module=mlp,
                    router=router,
                    experts=[FusedExpert(self, experts, j) for j in range(count)],
                    top_k=min(int(router.top_k), choices),
                    renormalized=self.renormalizes(router),
                    expert_map=expert_map,
                )
            )
        return layers

    def renormalizes(self, router: nn.Module) -> bool:
        """Whether the router renormalizes the chosen experts' probabilities (the gate the experts are scaled by):
        Qwen/OLMoE only with ``norm_topk_prob``; Mixtral and gpt-oss override this (always)."""
        return bool(getattr(router, "norm_topk_prob", False))

    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T (+ b)`` in the router's dtype, like the upstream router, then float32."""
        weight = layer.router.weight
        bias = getattr(layer.router, "bias", None)
        return F.linear(hidden.to(weight.dtype), weight, bias).float()

    def run_expert(self, layer: MoELayer, index: int, hidden: torch.Tensor) -> torch.Tensor:
        # the listed expert's own index: under MoELayer.per_router_row, entry ``index`` is expert ``expert_map[index]``
        return self.expert_forward(layer.module.experts, layer.experts[index].index, hidden)

    def fused_experts(self, layer: MoELayer) -> nn.Module | None:
        return layer.module.experts

    def expert_forward(self, experts: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """One expert's output, computed like the upstream eager experts loop (``act(gate x) * up x``, then down)."""
        gate_up = experts.gate_up_proj[index]
        gate, up = F.linear(hidden.to(gate_up.dtype), gate_up).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[index])

    def run_expert_tensors(
        self, layer: MoELayer, tensors: Mapping[str, torch.Tensor], hidden: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`expert_forward` on a one-expert view of the layer's experts module holding ``tensors`` (its
        activation, biases and gate function stay the module's)."""
        return self.expert_forward(_ExpertsView(layer.module.experts, self.fuse([dict(tensors)])), 0, hidden)

    def expert_tensors(self, layer: MoELayer, index: int) -> dict[str, torch.Tensor]:
        experts = layer.module.experts
        return self.unfuse({name: getattr(experts, name)[index].detach() for name in self.fused_params})

    def router_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        return {name: getattr(layer.router, name).detach() for name in self.router_params}

    # ---- fused <-> per-expert tensors (the only layout-specific part; gpt-oss overrides both) -------------------

    def unfuse(self, rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's slices of the fused parameters (``{"gate_up_proj": [2I, H], ...}``) -> our keys (views)."""
        gate_up = rows["gate_up_proj"]
        half = gate_up.shape[0] // 2
        return {"gate": gate_up[:half], "up": gate_up[half:], "down": rows["down_proj"]}

    def fuse(self, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-expert tensors (our keys) -> the fused parameters ``{"gate_up_proj": [E, 2I, H], ...}``."""
        return {
            "gate_up_proj": torch.stack([torch.cat([e["gate"], e["up"]], dim=0) for e in experts]).contiguous(),
            "down_proj": torch.stack([e["down"] for e in experts]).contiguous(),
        }

    # ---- building the reduced model ----------------------------------------------------------------------------

    def build_reduced_model(
        self, model: nn.Module, layers: MutableMapping[str, ReducedLayer], base_model: str | None = None,
        consume: bool = False, share: bool = False,
    ) -> nn.Module:
        """Build the reduced model on the meta device (no random init), then assign its tensors.

        Every assigned tensor is a copy or a new merge result, so the input model never shares storage with it
        (unless ``share``, see the base class).
        Fusing a layer's experts into ``[E', ...]`` copies them; with ``consume`` the per-expert tensors of a layer
        are dropped as soon as its fused ones exist.
        """
        stock_class = self.stock_model_class()
        if not isinstance(model, stock_class):
            raise UnsupportedModelError(
                f"Cannot prune a {type(model).__name__}; load the checkpoint with AutoModelForCausalLM "
                f"({self.stock_lm_class}) instead."
            )
        current = self.sparse_layers(model)
        unknown = set(layers) - {layer.name for layer in current}
        if unknown:
            raise UnsupportedModelError(f"The model has no sparse layers named {sorted(unknown)}.")
        counts = [layers[layer.name].num_experts if layer.name in layers else layer.num_experts for layer in current]
        maps = [layers[layer.name].expert_map if layer.name in layers else None for layer in current]
        config = self.reduced_config(model.config, counts, base_model, maps)
        model_class = self.pruned_model_class() if config.model_type == self.pruned_model_type else stock_class

        replaced = tuple(
            f"{layer.prefix}.{part}." for layer in current if layer.name in layers for part in (self.router_attr, "experts")
        )
        kept = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(replaced)}
        state = kept if share else {k: v.clone() for k, v in kept.items()}
        for layer in current:
            reduced = layers.pop(layer.name, None) if consume else layers.get(layer.name)
            if reduced is None:
                continue
            for name, tensor in reduced.router.items():
                state[f"{layer.prefix}.{self.router_attr}.{name}"] = tensor.contiguous()
            for name, tensor in self.fuse(reduced.experts).items():
                state[f"{layer.prefix}.experts.{name}"] = tensor
            del reduced

        with torch.device("meta"):
            new_model = model_class(config)
        new_model.load_state_dict(state, strict=True, assign=True)
        _copy_non_persistent_buffers(model, new_model)
        new_model.tie_weights()
        still_meta = [name for name, t in [*new_model.named_parameters(), *new_model.named_buffers()] if t.is_meta]
        if still_meta:  # pragma: no cover - would be a bug in the key mapping above
            raise RuntimeError(f"tensors left on the meta device: {still_meta[:5]}")
        new_model.generation_config = copy.deepcopy(model.generation_config)
        new_model.train(model.training)
        return new_model

    def reduced_config(
        self,
        config: Any,
        counts: list[int],
        base_model: str | None = None,
        maps: list[list[int] | None] | None = None,
    ) -> Any:
        """The config of a model equal to ``config``'s except that its sparse layers hold ``counts`` experts.

        Equal counts give a stock config (top-k clamped to the count); unequal counts give the pruned config with
        ``num_experts_per_layer`` (``num_experts`` = the largest count, top-k clamped per layer by the model). Expert
        maps (a logical merge, one per layer or ``None``) always give the pruned config, with
        ``expert_map_per_layer`` and ``num_experts`` = the largest router (a stock config has no map).
        """
        values = {k: v for k, v in config.to_dict().items() if k not in DERIVED_CONFIG_KEYS}
        if getattr(config, "quantization_config", None) is not None:
            logger.warning("the reduced checkpoint is written dequantized (quantization_config dropped)")
        count_key = "num_local_experts" if "num_local_experts" in values else "num_experts"
        top_k = int(config.num_experts_per_tok)
        mapped = maps is not None and any(m is not None for m in maps)
        if len(set(counts)) <= 1 and not mapped:
            k = counts[0] if counts else int(values[count_key])
            values.update({count_key: k, "num_experts_per_tok": min(top_k, k)})
            return self.stock_config_class()(**values)
        from uncurl_hf.modeling.pruned_decoder_moe.configuration_pruned_decoder_moe import layer_router_widths

        widths = layer_router_widths(counts, maps or [None] * len(counts))
        values.update(
            {
                count_key: max(widths),
                "num_experts_per_layer": list(counts),
                "uncurl_base_model": getattr(config, "uncurl_base_model", None) or base_model,
            }
        )
        if mapped:
            values["expert_map_per_layer"] = list(maps)
        return self.pruned_config_class()(**values)

    # ---- calibration inputs ------------------------------------------------------------------------------------

    def forward_inputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each example as one sequence: its source tokens, then its target tokens when the batch has ``labels``.

        A causal LM has no decoder side: the task's target is text that follows the prompt, so calibration sees the
        model route the source and the answer. Rows are re-packed with right padding (real tokens at positions
        ``0..n-1``, whatever side the tokenizer padded), a leading BOS of the target is dropped, and the
        ``attention_mask`` marks the real tokens the hooks keep.
        """
        device = _device_of(model)
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        labels = batch.get("labels")
        bos = getattr(model.config, "bos_token_id", None)
        rows = []
        for i in range(input_ids.shape[0]):
            row = input_ids[i][mask[i].bool()]
            if labels is not None:
                target = labels[i][labels[i] != -100]
                if bos is not None and target.numel() and int(target[0]) == int(bos):
                    target = target[1:]
                row = torch.cat([row, target.to(row.dtype)])
            rows.append(row)
        width = max(1, max(row.numel() for row in rows))
        pad = getattr(model.config, "pad_token_id", None)
        pad = int(pad) if isinstance(pad, int) and 0 <= pad < int(model.config.vocab_size) else 0
        ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype)
        packed_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : row.numel()] = row
            packed_mask[i, : row.numel()] = 1
        return {"input_ids": ids.to(device), "attention_mask": packed_mask.to(device), "use_cache": False}


class _ExpertsView:
    """An experts module's attributes, with its fused parameters replaced by ``params`` (read-only, never attached)."""

    def __init__(self, experts: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
        self._experts, self._params = experts, dict(params)

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__["_params"]
        return params[name] if name in params else getattr(self.__dict__["_experts"], name)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a ``*ForCausalLM`` (the decoder stack the families share)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder stack at model.layers; load the checkpoint with "
            "AutoModelForCausalLM."
        )
    return layers


def _copy_non_persistent_buffers(source: nn.Module, target: nn.Module) -> None:
    """Copy buffers that ``state_dict`` leaves out (rotary ``inv_freq``) into a model built on the meta device."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(target.named_buffers()):
        if not buffer.is_meta or name not in source_buffers:
            continue
        module_name, _, leaf = name.rpartition(".")
        module = target.get_submodule(module_name) if module_name else target
        module._buffers[leaf] = source_buffers[name].detach().clone()

