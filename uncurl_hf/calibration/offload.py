"""Out-of-core calibration: forward a model whose weights stay on disk, one transformer block in memory at a time.

llm-compressor's sequential pipeline keeps the calibration activations, loads one layer, records, frees it. The
generic form of that idea needs no per-architecture tracing: the model is built with its parameters on the meta
device (no memory, no random init), the parameters outside the transformer blocks (embeddings, final norms, head)
are read once, and every block gets two hooks:

* a forward pre-hook reads the block's parameters from the safetensors files (the byte ranges their headers give,
  into fresh tensors: :class:`uncurl_hf.io.safetensors.SafetensorsReader`) and puts them in place;
* a forward hook puts meta tensors back, releasing the memory.

So one full forward holds ``resident parameters + one block`` (:attr:`OffloadCounters.peak_bytes` records it), and
calibration hooks see exactly the tensors an in-memory model computes (same weights, same ops): statistics are
identical. Blocks are the children of the model's outermost ``nn.ModuleList``\\ s (``encoder.block.3``,
``model.layers.7``), so nothing here is family-specific.

Stored keys are mapped to the model's tensors (:mod:`uncurl_hf.io.tensor_map`, shared with the in-memory prune's
block-by-block load) the way ``from_pretrained`` maps them: through the model's own
``transformers.conversion_mapping`` transforms (:func:`transformers.conversion_mapping.get_model_conversion_mapping`
and the loader's :func:`~transformers.core_model_loading.rename_source_key`). Most checkpoints store every tensor under
its module path; Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints store one tensor per expert
(``model.layers.3.block_sparse_moe.experts.5.w1.weight``) that the model holds fused (``mlp.experts.gate_up_proj
[E, 2I, H]``). The pre-hook then reads a layer's per-expert tensors and runs the same ``WeightConverter``
(``MergeModulelist`` + ``Concatenate``) on them that the loader runs, in the loader's key order, so the block holds
bit for bit the tensors of the in-memory model; a checkpoint that stores the experts fused is read as is. While it
converts, the pre-hook briefly holds the block's per-expert tensors next to the fused ones (the byte counters count
what the model holds). Quantized checkpoints (``quantization_config``, e.g. MXFP4 gpt-oss) are refused: the loader
dequantizes or repacks them with a quantizer, which this reader does not run. Every batch reads every block again
(from the page cache after the first pass), which is the price of never holding the model.

Planning needs the weights of one layer at a time (:meth:`OffloadedModel.materialized`); the weight surgery itself
runs on the in-memory model (or out of core with the streaming writer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uncurl_hf.errors import CheckpointError
from uncurl_hf.families.base import MoEFamily
from uncurl_hf.io.checkpoint import inspect_checkpoint
from uncurl_hf.io.tensor_map import MetaModel, TensorMapError, block_of, build_on_meta, find_blocks

__all__ = ["OffloadCounters", "OffloadedModel", "find_blocks", "load_offloaded"]

logger = logging.getLogger(__name__)


@dataclass
class OffloadCounters:
    """What the block hooks did: loads/frees, blocks in memory now and at most, bytes in memory at most."""

    loads: int = 0
    frees: int = 0
    blocks_in_memory: int = 0
    peak_blocks_in_memory: int = 0
    resident_bytes: int = 0
    peak_bytes: int = 0
    loaded_blocks: list[str] = field(default_factory=list)


class OffloadedModel:
    """A model built on the meta device whose transformer blocks are read from disk just in time.

    Use as a context manager (or call :meth:`close`): closing removes the hooks and frees every block.
    """

    def __init__(self, built: MetaModel, family: MoEFamily) -> None:
        self.built = built
        self.model = built.model
        self.family = family
        self.reader = built.reader
        self.blocks = built.blocks
        self.counters = OffloadCounters()
        self._in_memory: set[str] = set()
        self._handles: list[Any] = []
        built.fill(built.resident)
        self.counters.resident_bytes = sum(slot.nbytes for slot in built.resident)
        self.counters.peak_bytes = self.counters.resident_bytes
        for name in self.blocks:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: self.load(name)))
            self._handles.append(module.register_forward_hook(lambda _m, _a, _o, name=name: self.free(name)))

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def load(self, block: str) -> None:
        """Read ``block``'s parameters from disk into the model (no-op when already in memory)."""
        if block in self._in_memory:
            return
        self.built.fill(self.blocks[block])
        self._in_memory.add(block)
        c = self.counters
        c.loads += 1
        c.loaded_blocks.append(block)
        c.blocks_in_memory = len(self._in_memory)
        c.peak_blocks_in_memory = max(c.peak_blocks_in_memory, c.blocks_in_memory)
        in_memory = c.resident_bytes + sum(s.nbytes for b in self._in_memory for s in self.blocks[b])
        c.peak_bytes = max(c.peak_bytes, in_memory)

    def free(self, block: str) -> None:
        """Put meta tensors back in place of ``block``'s parameters."""
        if block not in self._in_memory:
            return
        for slot in self.blocks[block]:
            slot.put(torch.empty(slot.shape, dtype=slot.dtype, device="meta"))
        self._in_memory.discard(block)
        self.counters.frees += 1
        self.counters.blocks_in_memory = len(self._in_memory)

    def block_of(self, module_name: str) -> str | None:
        """The block holding the module called ``module_name`` (``None`` for a resident module)."""
        return module_name if module_name in self.blocks else block_of(list(self.blocks), module_name)

    @contextmanager
    def materialized(self, module_name: str) -> Iterator[None]:
        """Hold the block containing ``module_name`` in memory for the duration (e.g. to plan that layer)."""
        block = self.block_of(module_name)
        if block is None or block in self._in_memory:
            yield
            return
        self.load(block)
        try:
            yield
        finally:
            self.free(block)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in list(self._in_memory):
            self.free(block)
        self.reader.close()


def load_offloaded(path: str | Path, *, trust_remote_code: bool = False) -> OffloadedModel:
    """Build the checkpoint's model on the meta device, read the non-block parameters, hook every block.

    Raises :class:`CheckpointError` for quantized checkpoints, when the stored tensors (after the model's weight
    conversions) are not the model's parameters (pickle-only checkpoints, renamed or missing keys) or a shape
    differs from the config.
    """
    from transformers import AutoConfig

    folder = Path(path)
    family = inspect_checkpoint(folder, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
        raise CheckpointError(
            f"{folder} is quantized ({method}); offloaded calibration reads dense weights and does not run "
            "transformers' quantizers. Dequantize it first (load it dequantized, e.g. with "
            "Mxfp4Config(dequantize=True) for gpt-oss, and save_pretrained), or drop --offload."
        )
    try:
        built = build_on_meta(folder, family.auto_model_class(), config, trust_remote_code=trust_remote_code)
    except TensorMapError as exc:
        raise CheckpointError(
            f"Offloaded calibration maps the stored tensors onto the model the way from_pretrained does, but {exc} "
            "Re-save the checkpoint with save_pretrained, or calibrate in memory (drop --offload)."
        ) from exc
    converted = {id(s.source) for slots in built.blocks.values() for s in slots if s.source.converter is not None}
    offloaded = OffloadedModel(built, family)
    logger.info(
        "offloaded %s: %d blocks on disk, %.1f MB resident, %d tensors converted on read",
        folder, len(built.blocks), offloaded.counters.resident_bytes / 1e6, len(converted),
    )
    return offloaded
