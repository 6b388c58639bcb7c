"""Stored safetensors tensors mapped onto a model built on the meta device, the way ``from_pretrained`` maps them.

Two loaders share this map: offloaded calibration (:mod:`uncurl_hf.calibration.offload`: one transformer block in
memory at a time) and the in-memory prune's block-by-block load (:func:`load_resident`: every block kept). Both build
the model with its parameters on the meta device (no memory, no random init), map the stored keys through the model's
own ``transformers.conversion_mapping`` transforms (renamings, and ``WeightConverter``\\ s that fuse per-expert
tensors into ``experts.gate_up_proj``), and read each tensor into a fresh tensor with the project's one reader
(:class:`uncurl_hf.io.safetensors.SafetensorsReader`). So a model loaded either way holds, bit for bit, the tensors
``from_pretrained`` gives, but never more than the model plus one block's conversion in memory: ``from_pretrained``
itself peaks at ~2.4x the weights while it loads (touched file pages, the model being built, a temporary from fusing
per-expert tensors), and afterwards the tensors it did not convert stay views of the file's mmap.
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

from uncurl_hf.errors import CheckpointError
from uncurl_hf.io.safetensors import SafetensorsReader

logger = logging.getLogger(__name__)


class TensorMapError(CheckpointError):
    """The stored tensors (after the model's conversions) are not the parameters of the model built from config.json."""


@dataclass
class StoredGroup:
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
class Slot:
    """One distinct parameter or persistent buffer: where it lives in the model and which source yields it."""

    owners: list[tuple[nn.Module, str]]
    names: list[str]  # full names of the owners (``encoder.block.1.layer.0.SelfAttention.q.weight``)
    key: str  # the model name under which ``source`` yields it
    source: StoredGroup
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


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: children of the outermost ``nn.ModuleList``\\ s, in module order."""
    lists: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(outer + ".") for outer in lists):
            lists.append(name)
    return [f"{outer}.{child}" for outer in lists for child, _ in model.get_submodule(outer).named_children()]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
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


def stored_groups(model: nn.Module, keys: set[str]) -> tuple[dict[str, StoredGroup], list[str]]:
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
    groups: dict[str, StoredGroup] = {}
    unused: list[str] = []
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
        if target not in meta_state:
            unused.append(key)
        elif pattern is None:  # a plain (possibly renamed) tensor; the first stored key wins, as in the loader
            source = groups.setdefault(target, StoredGroup(target, (target,)))
            if not source.keys:
                source.keys.append((key, key))
        else:
            converter = by_pattern[pattern]
            outputs = tuple(target.replace(converter.target_patterns[0], name) for name in converter.target_patterns)
            groups.setdefault(target, StoredGroup(target, outputs, converter=converter)).keys.append((pattern, key))
    by_output = {name: source for source in groups.values() for name in source.outputs}
    return by_output, unused


def model_slots(model: nn.Module, sources: dict[str, StoredGroup]) -> tuple[list[Slot], set[str]]:
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
    slots: list[Slot] = []
    missing: set[str] = set()
    for pid, places in owners.items():
        names = sorted({full for full, _, _ in places})
        key = next((n for n in names if n in sources), None)
        if key is None:
            missing.update(names)
            continue
        unique = {(id(m), n): (m, n) for _, m, n in places}
        slots.append(Slot(list(unique.values()), names, key, sources[key], params[pid].shape, params[pid].dtype))
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            full = f"{module_name}.{name}" if module_name else name
            if buffer is not None and name not in module._non_persistent_buffers_set and full in sources:
                slots.append(
                    Slot([(module, name)], [full], full, sources[full], buffer.shape, buffer.dtype, is_buffer=True)
                )
    return slots, missing


def tied_names(model: nn.Module) -> set[str]:
    """Keys a checkpoint may store for tied parameters under either name (both point at one tensor)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values()) if isinstance(tied, dict) else set()


def block_of(blocks: list[str], name: str) -> str | None:
    """The block whose module path prefixes ``name`` (a module or parameter name), if any."""
    for block in blocks:
        if name.startswith(block + "."):
            return block
    return None


@dataclass
class MetaModel:
    """A model built on the meta device, the reader of its folder, and its slots split into blocks and the rest."""

    model: nn.Module
    reader: SafetensorsReader
    blocks: dict[str, list[Slot]]  # transformer block name -> the slots only that block owns
    resident: list[Slot]  # everything else: embeddings, final norms, head, tied or shared tensors, buffers

    def fill(self, slots: list[Slot]) -> None:
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


def build_on_meta(folder: Path, auto_class: Any, config: Any, *, trust_remote_code: bool = False,
                  own_mappings: bool = False) -> MetaModel:
    """Build ``auto_class.from_config(config)`` with meta parameters and map ``folder``'s stored tensors onto it.

    ``own_mappings``: the reader's large reads get their own memory mappings (see :class:`SafetensorsReader`).
    Raises :class:`TensorMapError` when the stored tensors are not the model's parameters (pickle-only checkpoints,
    renamed or missing keys); nothing is read but the headers.
    """
    reader = SafetensorsReader(folder, own_mappings=own_mappings)
    with parameters_on_meta():
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()
    sources, unused = stored_groups(model, set(reader.keys()))
    slots, missing = model_slots(model, sources)
    used = {slot.key for slot in slots}
    unexpected = sorted(set(unused) | (set(sources) - used - tied_names(model)))
    if missing or unexpected:
        reader.close()
        raise TensorMapError(
            f"The stored tensors of {folder} do not match the model built from its config (missing: "
            f"{sorted(missing)[:5]}, unexpected: {unexpected[:5]})."
        )
    blocks = find_blocks(model)
    by_block: dict[str, list[Slot]] = {block: [] for block in blocks}
    resident: list[Slot] = []
    for slot in slots:
        homes = {block_of(blocks, name) for name in slot.names}
        home = homes.pop() if len(homes) == 1 else None
        if home is None or slot.is_buffer:
            resident.append(slot)
        else:
            by_block[home].append(slot)
    return MetaModel(model, reader, by_block, resident)


def load_resident(folder: Path, auto_class: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The whole model in memory, read block by block into fresh tensors (eval mode, parameters without grad).

    What ``from_pretrained`` would give for a dense safetensors checkpoint (same tensors, dtypes, buffers and
    generation config), at about 1x the weights' bytes instead of its ~2.4x peak. Raises :class:`TensorMapError`
    when the map does not fit (the caller falls back to ``from_pretrained`` and its messages).
    """
    from transformers import AutoConfig, GenerationConfig

    from uncurl_hf.io.memory import trim_heap

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    # own mappings: the per-expert reads a fused family stacks and drops leave nothing behind (see the reader)
    built = build_on_meta(folder, auto_class, config, trust_remote_code=trust_remote_code, own_mappings=True)
    try:
        built.fill(built.resident)
        for slots in built.blocks.values():
            built.fill(slots)
            trim_heap()  # a fused family's per-expert reads are freed heap now: give it back before the next block
    finally:
        built.reader.close()
    model = built.model
    if getattr(model, "can_generate", lambda: False)() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    logger.info("read %s block by block (%d blocks)", folder, len(built.blocks))
    return model

