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

Stored keys are mapped to the model's tensors the way ``from_pretrained`` maps them: through the model's own
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

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uncurl_hf.io.checkpoint import inspect_checkpoint
from uncurl_hf.io.safetensors import SafetensorsReader
from uncurl_hf.errors import CheckpointError
from uncurl_hf.families.base import MoEFamily

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


@dataclass
class _Source:
    """Stored tensors that become model tensors together, and how: what ``from_pretrained`` does with them.

    A plain source is one stored key read as is (``converter`` None; ``outputs`` is the one model name, which may
    differ from the key when a ``WeightRenaming`` applies, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``). A
    converted source is the group of stored keys one of the model's ``WeightConverter``\\ s collects for one target
    (a layer's ``experts.{j}.w1.weight`` and ``w3`` for ``experts.gate_up_proj``), in the loader's order.
    """

    target: str  # the loader's "first param name" of the group
    outputs: tuple[str, ...]  # model names it yields (several for a one-to-many converter)
    keys: list[tuple[str, str]] = field(default_factory=list)  # (matched source pattern, stored key)
    converter: Any = None  # a transformers ``WeightConverter`` template (deep-copied per read)

    def read(self, reader: SafetensorsReader, model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The model tensors, cast like the loader casts: each stored tensor to the target parameter's dtype."""

        def load(key: str) -> torch.Tensor:
            tensor = reader.get(key)
            return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

        if self.converter is None:
            return {self.target: load(self.keys[0][1])}
        converter = copy.deepcopy(self.converter)  # it collects tensors in place: one instance per read
        for pattern, key in self.keys:
            converter.add_tensor(self.target, key, pattern, lambda key=key: load(key))
        try:
            produced = converter.convert(self.target, model=model, config=getattr(model, "config", None))
        except Exception as exc:  # transformers' conversion ops raise plain errors on inconsistent groups
            raise CheckpointError(
                f"Converting the stored tensors {[k for _, k in self.keys][:4]} into {self.target} failed "
                f"({type(exc).__name__}: {exc}); the checkpoint is incomplete or does not match its config.json. "
                "Re-save it with save_pretrained."
            ) from exc
        return {name: value[0] if isinstance(value, list) else value for name, value in produced.items()}


@dataclass
class _Slot:
    """One distinct parameter or persistent buffer: where it lives in the model and which source yields it."""

    owners: list[tuple[nn.Module, str]]
    names: list[str]  # full names of the owners (``encoder.block.1.layer.0.SelfAttention.q.weight``)
    key: str  # the model name under which ``source`` yields it
    source: _Source
    shape: torch.Size
    dtype: torch.dtype
    is_buffer: bool = False

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * torch.empty((), dtype=self.dtype).element_size()

    def put(self, tensor: torch.Tensor) -> None:
        if self.is_buffer:
            for module, name in self.owners:
                module._buffers[name] = tensor
            return
        param = nn.Parameter(tensor, requires_grad=False)
        for module, name in self.owners:
            module._parameters[name] = param


class OffloadedModel:
    """A model built on the meta device whose transformer blocks are read from disk just in time.

    Use as a context manager (or call :meth:`close`): closing removes the hooks and frees every block.
    """

    def __init__(self, model: nn.Module, family: MoEFamily, reader: SafetensorsReader,
                 blocks: dict[str, list[_Slot]], resident: list[_Slot]) -> None:
        self.model = model
        self.family = family
        self.reader = reader
        self.blocks = blocks
        self.counters = OffloadCounters()
        self._in_memory: set[str] = set()
        self._handles: list[Any] = []
        self._fill(resident)
        self.counters.resident_bytes = sum(slot.nbytes for slot in resident)
        self.counters.peak_bytes = self.counters.resident_bytes
        for name in blocks:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: self.load(name)))
            self._handles.append(module.register_forward_hook(lambda _m, _a, _o, name=name: self.free(name)))

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fill(self, slots: list[_Slot]) -> None:
        """Read every source the slots need (each once, in order) and put each slot's tensor in place."""
        produced: dict[int, dict[str, torch.Tensor]] = {}
        for slot in slots:
            source = slot.source
            if id(source) not in produced:
                produced[id(source)] = source.read(self.reader, self.model, slot.dtype)
            tensor = produced[id(source)][slot.key]
            if tensor.shape != slot.shape:
                stored = [key for _, key in source.keys]
                raise CheckpointError(
                    f"{slot.key} has shape {tuple(tensor.shape)} on disk (from {stored[:3]}{' ...' if len(stored) > 3 else ''}) "
                    f"but {tuple(slot.shape)} in the model built from config.json; restore the config that came "
                    "with the weights."
                )
            slot.put(tensor)

    def load(self, block: str) -> None:
        """Read ``block``'s parameters from disk into the model (no-op when already in memory)."""
        if block in self._in_memory:
            return
        self._fill(self.blocks[block])
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
        return module_name if module_name in self.blocks else _block_of(list(self.blocks), module_name)

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


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: children of the outermost ``nn.ModuleList``\\ s, in module order."""
    lists: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(outer + ".") for outer in lists):
            lists.append(name)
    return [f"{outer}.{child}" for outer in lists for child, _ in model.get_submodule(outer).named_children()]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory, no init compute); buffers stay real.

    Like ``accelerate.init_empty_weights(include_buffers=False)``: buffers computed in ``__init__`` and not saved
    (rotary frequencies, ...) keep their values, which a plain ``torch.device("meta")`` context would lose.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            value = module._parameters[name]
            module._parameters[name] = type(value)(value.to("meta"), requires_grad=value.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _sources(model: nn.Module, keys: set[str]) -> tuple[dict[str, _Source], list[str]]:
    """``{model tensor name: the source that yields it}`` for the stored ``keys``, and the keys the model takes none of.

    Mirrors ``transformers.core_model_loading.convert_and_load_state_dict_in_model`` without reading a tensor: keys
    in natural order (expert 10 after expert 9: the order ``MergeModulelist`` stacks them in), every renaming then at
    most one converter (:func:`~transformers.core_model_loading.rename_source_key`), the base-model prefix added or
    stripped against the model's state dict, and a key that the transforms rename away from a model name taken as
    is. The transforms are the model's own (``get_model_conversion_mapping``), so the family and the conversion
    table, not this module, decide the mapping.
    """
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms: list[Any] = []
    if hasattr(model, "base_model_prefix") and hasattr(model, "config"):  # a transformers PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    meta_state = dict.fromkeys(model.state_dict(), True)  # the loader only asks "is this a model name?"
    prefix = getattr(model, "base_model_prefix", None)
    groups: dict[str, _Source] = {}
    unused: list[str] = []
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
        if target not in meta_state:
            unused.append(key)
        elif pattern is None:  # a plain (possibly renamed) tensor; the first stored key wins, as in the loader
            source = groups.setdefault(target, _Source(target, (target,)))
            if not source.keys:
                source.keys.append((key, key))
        else:
            converter = by_pattern[pattern]
            outputs = tuple(target.replace(converter.target_patterns[0], name) for name in converter.target_patterns)
            groups.setdefault(target, _Source(target, outputs, converter=converter)).keys.append((pattern, key))
    by_output = {name: source for source in groups.values() for name in source.outputs}
    return by_output, unused


def _slots(model: nn.Module, sources: dict[str, _Source]) -> tuple[list[_Slot], set[str]]:
    """One slot per distinct parameter (tied ones share a slot) and per persistent buffer stored on disk.

    Returns the slots and the parameters no stored tensor yields.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            owners.setdefault(id(param), []).append((full, module, name))
            params[id(param)] = param
    slots: list[_Slot] = []
    missing: set[str] = set()
    for pid, places in owners.items():
        names = sorted({full for full, _, _ in places})
        key = next((n for n in names if n in sources), None)
        if key is None:
            missing.update(names)
            continue
        unique = {(id(m), n): (m, n) for _, m, n in places}
        slots.append(_Slot(list(unique.values()), names, key, sources[key], params[pid].shape, params[pid].dtype))
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            full = f"{module_name}.{name}" if module_name else name
            if buffer is not None and name not in module._non_persistent_buffers_set and full in sources:
                slots.append(
                    _Slot([(module, name)], [full], full, sources[full], buffer.shape, buffer.dtype, is_buffer=True)
                )
    return slots, missing


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
    reader = SafetensorsReader(folder)
    with _parameters_on_meta():
        model = family.auto_model_class().from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()
    sources, unused = _sources(model, reader.keys())
    slots, missing = _slots(model, sources)
    used = {slot.key for slot in slots}
    unexpected = sorted(set(unused) | (set(sources) - used - _tied_names(model)))
    if missing or unexpected:
        reader.close()
        raise CheckpointError(
            f"Offloaded calibration maps the stored tensors onto the model the way from_pretrained does, but {folder} "
            f"does not match the model built from its config (missing: {sorted(missing)[:5]}, unexpected: "
            f"{unexpected[:5]}). Re-save the checkpoint with save_pretrained, or calibrate in memory (drop --offload)."
        )
    blocks = find_blocks(model)
    by_block: dict[str, list[_Slot]] = {block: [] for block in blocks}
    resident: list[_Slot] = []
    for slot in slots:
        homes = {_block_of(blocks, name) for name in slot.names}
        home = homes.pop() if len(homes) == 1 else None
        if home is None or slot.is_buffer:
            resident.append(slot)
        else:
            by_block[home].append(slot)
    converted = {id(slot.source) for slot in slots if slot.source.converter is not None}
    offloaded = OffloadedModel(model, family, reader, by_block, resident)
    logger.info(
        "offloaded %s: %d blocks on disk, %.1f MB resident, %d tensors converted on read",
        folder, len(blocks), offloaded.counters.resident_bytes / 1e6, len(converted),
    )
    return offloaded


def _tied_names(model: nn.Module) -> set[str]:
    """Keys a checkpoint may store for tied parameters under either name (both point at one tensor)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values()) if isinstance(tied, dict) else set()


def _block_of(blocks: list[str], name: str) -> str | None:
    """The block whose module path prefixes ``name`` (a module or parameter name), if any."""
    for block in blocks:
        if name.startswith(block + "."):
            return block
    return None
