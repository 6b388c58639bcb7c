"""The on-disk view of the fused decoder families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss).

A mixin of :class:`~uncurl_hf.families._fused.FusedMoEFamily`: which stored tensors belong to which sparse layer,
reading one expert or router from the safetensors files (per-expert or fused layout), writing a reduced layer in the
layout ``save_pretrained`` writes, and the reduced ``config.json`` -- what the streamed surgery needs without
building a model. The loaded-model side (routing, fusing, building reduced models) stays in ``_fused.py``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from uncurl_hf.errors import UnsupportedModelError
from uncurl_hf.families.base import DiskLayer, ReducedLayer, TensorReader

# Keys of ``config.to_dict()`` that must not be passed to a new config: set by transformers, derived, or replaced.
DERIVED_CONFIG_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "_name_or_path",
    "num_experts_per_layer",
    "expert_map_per_layer",
    "uncurl_base_model",
    "quantization_config",
)


class FusedDiskView:
    """The on-disk methods of a fused family (its class attributes: ``disk_blocks``, ``disk_expert_names``,
    ``router_attr``, ``router_params``, ``fused_params``, ...)."""

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
        counts, maps = [], []
        for position, index in enumerate(indices):
            entry = layers.get(f"model.layers.{index}")
            maps.append(entry.expert_map if isinstance(entry, ReducedLayer) else None)
            if isinstance(entry, ReducedLayer):
                counts.append(entry.num_experts)
            elif entry is not None:
                counts.append(int(entry))
            else:
                counts.append(before[position] if before else int(source.num_experts))
        reduced = self.reduced_config(source, counts, base_model, maps)
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
