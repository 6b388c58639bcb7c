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
import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from uncurl_hf.errors import UnsupportedModelError
from uncurl_hf.families.base import DiskLayer, MoEFamily, MoELayer, ReducedLayer, TensorReader, _device_of

logger = logging.getLogger(__name__)

# Keys of ``config.to_dict()`` that must not be passed to a new config: set by transformers, derived, or replaced.
DERIVED_CONFIG_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "_name_or_path",
    "num_experts_per_layer",
    "uncurl_base_model",
    "quantization_config",
)


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


class FusedMoEFamily(MoEFamily):
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
            layers.append(
                MoELayer(
                    name=f"model.layers.{i}",
                    prefix=f"model.layers.{i}.mlp",
                    module=mlp,
                    router=router,
                    experts=[FusedExpert(self, experts, j) for j in range(count)],
                    top_k=min(int(router.top_k), count),
                    renormalized=self.renormalizes(router),
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
        return self.expert_forward(layer.module.experts, index, hidden)

    def expert_forward(self, experts: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """One expert's output, computed like the upstream eager experts loop (``act(gate x) * up x``, then down)."""
        gate_up = experts.gate_up_proj[index]
        gate, up = F.linear(hidden.to(gate_up.dtype), gate_up).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[index])

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
        self, model: nn.Module, layers: Mapping[str, ReducedLayer], base_model: str | None = None
    ) -> nn.Module:
        """Build the reduced model on the meta device (no random init), then assign its tensors.

        Every assigned tensor is a copy or a new merge result, so the input model never shares storage with it.
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
        config = self.reduced_config(model.config, counts, base_model)
        model_class = self.pruned_model_class() if config.model_type == self.pruned_model_type else stock_class

        replaced = tuple(
            f"{layer.prefix}.{part}." for layer in current if layer.name in layers for part in (self.router_attr, "experts")
        )
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(replaced)}
        for layer in current:
            reduced = layers.get(layer.name)
            if reduced is None:
                continue
            for name, tensor in reduced.router.items():
                state[f"{layer.prefix}.{self.router_attr}.{name}"] = tensor.contiguous()
            for name, tensor in self.fuse(reduced.experts).items():
                state[f"{layer.prefix}.experts.{name}"] = tensor

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

    def reduced_config(self, config: Any, counts: list[int], base_model: str | None = None) -> Any:
        """The config of a model equal to ``config``'s except that its sparse layers hold ``counts`` experts.

        Equal counts give a stock config (top-k clamped to the count); unequal counts give the pruned config with
        ``num_experts_per_layer`` (``num_experts`` = the largest count, top-k clamped per layer by the model).
        """
        values = {k: v for k, v in config.to_dict().items() if k not in DERIVED_CONFIG_KEYS}
        if getattr(config, "quantization_config", None) is not None:
            logger.warning("the reduced checkpoint is written dequantized (quantization_config dropped)")
        count_key = "num_local_experts" if "num_local_experts" in values else "num_experts"
        top_k = int(config.num_experts_per_tok)
        if len(set(counts)) <= 1:
            k = counts[0] if counts else int(values[count_key])
            values.update({count_key: k, "num_experts_per_tok": min(top_k, k)})
            return self.stock_config_class()(**values)
        values.update(
            {
                count_key: max(counts),
                "num_experts_per_layer": list(counts),
                "uncurl_base_model": getattr(config, "uncurl_base_model", None) or base_model,
            }
        )
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

    # ---- the on-disk view --------------------------------------------------------------------------------------

    def disk_layers(self, config: Mapping[str, Any], keys: list[str]) -> list[DiskLayer]:
        cfg = self._config_from_dict(config)
        from uncurl_hf.modeling.pruned_decoder_moe import sparse_layer_indices

        indices = sparse_layer_indices(cfg)
        counts = cfg.experts_per_layer() if hasattr(cfg, "experts_per_layer") else [int(cfg.num_experts)] * len(indices)
        quantized = [key for key in keys if ".experts." in key and key.endswith(("_blocks", "_scales"))]
        if quantized:
            raise UnsupportedModelError(
                f"The checkpoint stores quantized experts ({quantized[0]}); out-of-core surgery needs dense weights. "
                "Dequantize it first (load it dequantized and save_pretrained), or prune it in memory."
            )
        owned = self._keys_by_layer(keys)
        layers = []
        for index, count in zip(indices, counts):
            layer_keys = owned.get(index, set())
            name = f"model.layers.{index}"
            self._check_disk_layer(name, layer_keys)
            top_k = min(int(cfg.num_experts_per_tok), count)
            layers.append(DiskLayer(name=name, num_experts=count, keys=frozenset(layer_keys), top_k=top_k))
        return layers

    def read_disk_expert(self, layer: DiskLayer, index: int, reader: TensorReader) -> dict[str, torch.Tensor]:
        if not 0 <= index < layer.num_experts:
            raise IndexError(f"{layer.name} has {layer.num_experts} experts; no expert {index}")
        block, fused = self._disk_layout(layer)
        if fused:
            return self.unfuse(
                {name: reader.get_rows(f"{layer.name}.{block}.experts.{name}", index) for name in self.fused_params}
            )
        assert self.disk_expert_names is not None
        return {
            ours: reader.get(f"{layer.name}.{block}.experts.{index}.{stored}.weight")
            for ours, stored in self.disk_expert_names.items()
        }

    def read_disk_router(self, layer: DiskLayer, reader: TensorReader) -> dict[str, torch.Tensor]:
        block, _ = self._disk_layout(layer)
        return {name: reader.get(f"{layer.name}.{block}.{self.router_attr}.{name}") for name in self.router_params}

    def write_disk_layer(self, layer: DiskLayer, reduced: ReducedLayer) -> dict[str, torch.Tensor]:
        """The layer's tensors exactly as ``save_pretrained`` of the reduced model stores them."""
        block = self.disk_blocks[0]
        prefix = f"{layer.name}.{block}"
        tensors = {f"{prefix}.{self.router_attr}.{name}": t.contiguous() for name, t in reduced.router.items()}
        if self.disk_expert_names is None:
            tensors.update({f"{prefix}.experts.{name}": t for name, t in self.fuse(reduced.experts).items()})
            return tensors
        for j, expert in enumerate(reduced.experts):
            for ours, stored in self.disk_expert_names.items():
                tensors[f"{prefix}.experts.{j}.{stored}.weight"] = expert[ours].contiguous()
        return tensors

    def reduced_config_dict(
        self,
        config: Mapping[str, Any],
        layers: Mapping[str, ReducedLayer | int],
        base_model: str | None = None,
    ) -> dict[str, Any]:
        """The ``config.json`` that ``save_pretrained`` writes for the reduced model (architectures, auto_map)."""
        from uncurl_hf.modeling.pruned_decoder_moe import sparse_layer_indices

        source = self._config_from_dict(config)
        indices = sparse_layer_indices(source)
        before = source.experts_per_layer() if hasattr(source, "experts_per_layer") else None
        counts = []
        for position, index in enumerate(indices):
            entry = layers.get(f"model.layers.{index}")
            if isinstance(entry, ReducedLayer):
                counts.append(entry.num_experts)
            elif entry is not None:
                counts.append(int(entry))
            else:
                counts.append(before[position] if before else int(source.num_experts))
        reduced = self.reduced_config(source, counts, base_model)
        pruned = reduced.model_type == self.pruned_model_type
        model_class = self.pruned_model_class() if pruned else self.stock_model_class()
        reduced.architectures = [model_class.__name__]
        if pruned:
            reduced.auto_map = {
                "AutoConfig": f"configuration_pruned_decoder_moe.{type(reduced).__name__}",
                "AutoModelForCausalLM": f"modeling_pruned_decoder_moe.{model_class.__name__}",
            }
        return json.loads(reduced.to_json_string(use_diff=True))

    # ---- disk helpers ------------------------------------------------------------------------------------------

    def _config_from_dict(self, config: Mapping[str, Any]) -> Any:
        model_type = config.get("model_type")
        if model_type == self.pruned_model_type:
            config_class = self.pruned_config_class()
        elif model_type == self.stock_model_type:
            config_class = self.stock_config_class()
        else:
            raise UnsupportedModelError(f"config model_type {model_type!r} is not a {self.name} checkpoint")
        values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
        return config_class(**values)

    def _keys_by_layer(self, keys: list[str]) -> dict[int, set[str]]:
        """``{layer index: stored keys of its router and experts}`` in either layout (shared experts excluded)."""
        blocks = "|".join(map(re.escape, self.disk_blocks))
        alternatives = [
            rf"{re.escape(self.router_attr)}\.(?:{'|'.join(self.router_params)})",
            rf"experts\.(?:{'|'.join(self.fused_params)})",
        ]
        if self.disk_expert_names is not None:
            alternatives.append(rf"experts\.\d+\.(?:{'|'.join(self.disk_expert_names.values())})\.weight")
        pattern = re.compile(rf"^model\.layers\.(\d+)\.(?:{blocks})\.(?:{'|'.join(alternatives)})$")
        owned: dict[int, set[str]] = defaultdict(set)
        for key in keys:
            match = pattern.match(key)
            if match:
                owned[int(match.group(1))].add(key)
        return owned

    def _check_disk_layer(self, name: str, layer_keys: set[str]) -> None:
        has_router = any(f".{self.router_attr}." in key for key in layer_keys)
        has_experts = any(".experts." in key for key in layer_keys)
        if not (has_router and has_experts):
            raise UnsupportedModelError(
                f"{name}: the checkpoint holds no {'router' if not has_router else 'expert'} tensors in a layout "
                f"uncurl-hf reads for {self.name}; is the config.json the one saved with these weights?"
            )

    def _disk_layout(self, layer: DiskLayer) -> tuple[str, bool]:
        """``(block module name, fused?)`` of a stored layer."""
        for block in self.disk_blocks:
            if f"{layer.name}.{block}.experts.{self.fused_params[0]}" in layer.keys:
                return block, True
            if any(key.startswith(f"{layer.name}.{block}.experts.") for key in layer.keys):
                return block, False
        raise UnsupportedModelError(f"{layer.name}: no expert tensors among the layer's keys")


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

