"""Configuration of a Switch Transformers model whose sparse layers hold different numbers of experts.

Upstream ``SwitchTransformersConfig`` has one ``num_experts`` for every sparse layer. Pruning gives each layer its
own count, and ``from_pretrained`` builds the modules from the config *before* loading weights, so the counts must
live in the config. This file imports only ``transformers`` and ``huggingface_hub`` so that ``save_pretrained``
can copy it next to the weights (``auto_map``).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import SwitchTransformersConfig


def sparse_block_indices(num_layers: int, sparse_step: int) -> list[int]:
    """Indices of the sparse blocks of a stack, with exactly the rule of ``SwitchTransformersStack.__init__``."""
    if sparse_step <= 0:
        return []
    return [i for i in range(num_layers) if i % sparse_step == 1 or sparse_step == 1]


@strict
class PrunedSwitchTransformersConfig(SwitchTransformersConfig):
    r"""A ``SwitchTransformersConfig`` with one expert count (and expert capacity) per sparse layer.

    num_experts_per_encoder_layer (`list[int]`, *optional*):
        Experts of each sparse encoder layer, in block order. ``None`` means ``num_experts`` everywhere.
    num_experts_per_decoder_layer (`list[int]`, *optional*):
        Experts of each sparse decoder layer, in block order. ``None`` means ``num_experts`` everywhere.
    expert_capacity_per_encoder_layer / expert_capacity_per_decoder_layer (`list[int]`, *optional*):
        Per-sequence token capacity of each expert of each sparse layer. ``None`` means ``expert_capacity``.
        Pruning may raise it, because fewer experts share the same tokens.
    expert_map_per_encoder_layer / expert_map_per_decoder_layer (`list[list[int] | None]`, *optional*):
        A *logical merge* (the ``"map"`` router rule): for each sparse layer, ``None`` or one entry per *original*
        expert naming the layer's expert that takes its tokens. Such a layer keeps the original router (one row per
        original expert, capacity counted per original expert), so tokens are routed exactly as before pruning.
    uncurl_base_model (`str`, *optional*):
        Name or path of the original (unpruned) model; kept when a pruned model is pruned again.

    The new fields must not start with ``encoder``/``decoder``: ``PreTrainedConfig.get_text_config`` treats such
    keys of a flat encoder-decoder config as prefixed copies of unprefixed ones (``decoder_num_experts`` would be
    written into ``num_experts``).

    ``num_experts`` is kept equal to the largest per-layer count, so code that reads it as an upper bound
    (e.g. a top-k check) stays correct.
    """

    model_type = "pruned_switch_transformers"

    num_experts_per_encoder_layer: list[int] | None = None
    num_experts_per_decoder_layer: list[int] | None = None
    expert_capacity_per_encoder_layer: list[int] | None = None
    expert_capacity_per_decoder_layer: list[int] | None = None
    expert_map_per_encoder_layer: list[list[int] | None] | None = None
    expert_map_per_decoder_layer: list[list[int] | None] | None = None
    uncurl_base_model: str | None = None

    @property
    def encoder_sparse_blocks(self) -> list[int]:
        return sparse_block_indices(self.num_layers, self.encoder_sparse_step)

    @property
    def decoder_sparse_blocks(self) -> list[int]:
        return sparse_block_indices(self.num_decoder_layers, self.decoder_sparse_step)

    def experts_per_layer(self, is_decoder: bool) -> list[int]:
        """Expert count of each sparse layer of the encoder (or decoder), in block order."""
        counts = self.num_experts_per_decoder_layer if is_decoder else self.num_experts_per_encoder_layer
        blocks = self.decoder_sparse_blocks if is_decoder else self.encoder_sparse_blocks
        return list(counts) if counts is not None else [self.num_experts] * len(blocks)

    def capacity_per_layer(self, is_decoder: bool) -> list[int]:
        """Expert capacity of each sparse layer of the encoder (or decoder), in block order."""
        caps = self.expert_capacity_per_decoder_layer if is_decoder else self.expert_capacity_per_encoder_layer
        blocks = self.decoder_sparse_blocks if is_decoder else self.encoder_sparse_blocks
        return list(caps) if caps is not None else [self.expert_capacity] * len(blocks)

    def expert_maps(self, is_decoder: bool) -> list[list[int] | None]:
        """Expert map of each sparse layer of the encoder (or decoder), in block order (``None``: no map)."""
        maps = self.expert_map_per_decoder_layer if is_decoder else self.expert_map_per_encoder_layer
        blocks = self.decoder_sparse_blocks if is_decoder else self.encoder_sparse_blocks
        return [None if m is None else list(m) for m in maps] if maps is not None else [None] * len(blocks)

    def validate_per_layer_counts(self) -> None:
        """Each per-layer list must have one positive entry per sparse layer and fit ``num_experts``."""
        for side, blocks in (("encoder", self.encoder_sparse_blocks), ("decoder", self.decoder_sparse_blocks)):
            for what in ("num_experts", "expert_capacity"):
                key = f"{what}_per_{side}_layer"
                values = getattr(self, key)
                if values is None:
                    continue
                if len(values) != len(blocks):
                    raise ValueError(f"{key} has {len(values)} entries but the {side} has {len(blocks)} sparse layers")
                if any(v < 1 for v in values):
                    raise ValueError(f"{key} entries must be >= 1, got {values}")
            maps = getattr(self, f"expert_map_per_{side}_layer")
            if maps is not None:
                if len(maps) != len(blocks):
                    raise ValueError(
                        f"expert_map_per_{side}_layer has {len(maps)} entries but the {side} has {len(blocks)} "
                        "sparse layers"
                    )
                for block, mapping, count in zip(blocks, maps, self.experts_per_layer(side == "decoder")):
                    if mapping is not None and sorted(set(mapping)) != list(range(count)):
                        raise ValueError(
                            f"expert_map_per_{side}_layer of block {block} must send tokens to each of its {count} "
                            f"experts and to no other, got {mapping}"
                        )
            counts = getattr(self, f"num_experts_per_{side}_layer")
            if counts is not None and max(counts, default=0) > self.num_experts:
                raise ValueError(
                    f"num_experts_per_{side}_layer {counts} exceeds num_experts={self.num_experts}; "
                    "num_experts must be the largest per-layer count"
                )


__all__ = ["PrunedSwitchTransformersConfig", "sparse_block_indices"]
