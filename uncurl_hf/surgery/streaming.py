"""Out-of-core surgery: apply a :class:`PruningPlan` to a checkpoint folder without loading the model.

:func:`stream_apply_plan` reads the source safetensors lazily and writes the reduced checkpoint shard by shard:

* a dry run on the **meta device** (no memory) computes every output tensor's key, dtype and shape: the family's
  on-disk methods and the shared surgery (:func:`uncurl_hf.surgery.apply.reduce_tensors`) run on meta tensors, so the shard
  layout and every shard's safetensors header are known before a byte is written;
* tensors no sparse layer owns (embeddings, attention, norms, dense FFs) are **copied as raw bytes** from the source
  file to the output file (``copy_file_range``): they are never decoded, never held in memory, and their dtype and
  bits are the source's by construction;
* each sparse layer is read, reduced and written while it is the only layer in memory: experts are read one at a
  time, and experts the plan drops are never read at all;
* shards are written straight to their files (header first, then the tensors in the order ``safetensors`` itself
  lays them out), so no output shard is buffered: peak memory is about one layer's surviving experts plus the
  reduced layer.

The output is what the in-memory path (:func:`uncurl_hf.surgery.apply.apply_plan` + :func:`uncurl_hf.io.checkpoint
.write_checkpoint`) writes: the same tensors bit for bit (same merging code), the same ``config.json`` (the family's
:meth:`~uncurl_hf.families.base.MoEFamily.reduced_config_dict`), the modeling code and ``auto_map``, the plan, the
tokenizer and generation config of the source, a manifest, and the same atomic temp-folder-then-rename protocol
(:func:`uncurl_hf.io.checkpoint.write_atomically`). Shards follow the transformers conventions (``model.safetensors``,
or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) but group tensors in key order, so a
multi-shard output splits differently from ``save_pretrained``'s module order (same tensors, other files); a
single-shard output folder is byte-identical to the in-memory one, card and manifest included.

Why not ``safetensors.safe_open`` for reading: its default mmap backend keeps every page it touched resident
(counted in RSS) until the handle closes — reading 1.2 GB through one handle measured 1.25 GB of RSS — and its
``pread`` backend (safetensors >= 0.8 only) reads the whole tensor for a ``get_slice``. Reading exactly the byte
ranges the header gives into fresh tensors does neither, and a row of a fused ``[E, ...]`` expert tensor is one
contiguous range.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from uncurl_hf.surgery.apply import reduce_tensors
from uncurl_hf.io.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    copy_side_files,
    inspect_checkpoint,
    weights_size,
    write_atomically,
)
from uncurl_hf.errors import CheckpointError
from uncurl_hf.families import get_family
from uncurl_hf.families.base import DiskLayer, MoEFamily, ReducedLayer
from uncurl_hf.io.manifest import FileDigest, FollowingDigest
from uncurl_hf.plan import PLAN_FILENAME, PruningPlan

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes
_COPY_CHUNK = 64 << 20

# safetensors dtype names -> torch dtypes (those torch has)
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}
if hasattr(torch, "float8_e8m0fnu"):
    _TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
# safetensors' Dtype enum order: ``serialize`` lays tensors out by this rank, descending, then by name.
_DTYPE_RANK = {
    name: rank
    for rank, name in enumerate(
        "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
    )
}
_DTYPE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}


# ---- reading ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: file, absolute byte offset, size, safetensors dtype name and shape."""

    key: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """``({key: StoredTensor}, metadata)`` of one safetensors file, from its header only.

    Raises :class:`CheckpointError` for a truncated file, a malformed header, or offsets outside the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a {size}-byte file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"Weight file {path} is corrupt or truncated ({type(exc).__name__}: {exc}); re-download or re-save the "
            "checkpoint."
        ) from exc
    data_start = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, StoredTensor] = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        stored = StoredTensor(key, path, data_start + begin, end - begin, entry["dtype"], tuple(entry["shape"]))
        if begin < 0 or end < begin or data_start + end > size or stored.nbytes != _nbytes(stored.dtype, stored.shape):
            raise CheckpointError(
                f"Weight file {path}: tensor {key} has inconsistent offsets {entry['data_offsets']} for "
                f"{stored.dtype}{list(stored.shape)}; the file is corrupt. Re-download or re-save the checkpoint."
            )
        tensors[key] = stored
    return tensors, metadata


class CheckpointReader:
    """Lazy :class:`~uncurl_hf.families.base.TensorReader` over the safetensors files of a checkpoint folder.

    Only headers are read up front; :meth:`get` and :meth:`get_rows` ``pread`` exactly the bytes asked for into a
    fresh tensor, so nothing stays resident after the caller drops it. Use as a context manager (or :meth:`close`).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, StoredTensor] = {}
        for file in checkpoint_files(self.folder):
            for key, stored in read_header(file)[0].items():
                if key in self.tensors:
                    raise CheckpointError(
                        f"Tensor {key} is stored twice ({self.tensors[key].file.name} and {file.name}); remove the "
                        "stray weight file from the checkpoint folder."
                    )
                self.tensors[key] = stored
        self._handles: dict[Path, BinaryIO] = {}

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def info(self, key: str) -> StoredTensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(
                f"{self.folder} has no tensor {key!r}; the weights do not match config.json."
            ) from None

    def get(self, key: str) -> torch.Tensor:
        stored = self.info(key)
        return self._read(stored, stored.offset, stored.nbytes, stored.shape)

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        stored = self.info(key)
        if not stored.shape or not 0 <= index < stored.shape[0]:
            raise IndexError(f"{key} has shape {list(stored.shape)}; row {index} is out of range")
        row_bytes = stored.nbytes // stored.shape[0]
        return self._read(stored, stored.offset + index * row_bytes, row_bytes, stored.shape[1:])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, file: Path) -> BinaryIO:
        """An unbuffered binary handle of one weight file (opened once, kept until :meth:`close`)."""
        if file not in self._handles:
            self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        return self._handles[file]

    def _read(self, stored: StoredTensor, offset: int, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
        dtype = _TORCH_DTYPES.get(stored.dtype)
        if dtype is None:
            raise CheckpointError(
                f"Tensor {stored.key} has dtype {stored.dtype}, which torch cannot hold; uncurl-hf can copy such "
                "tensors but not merge them. Dequantize the checkpoint first."
            )
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled, unlike bytearray
        view = memoryview(buffer.numpy())
        handle = self.handle(stored.file)
        handle.seek(offset)
        done = 0
        while done < nbytes:  # unbuffered readinto: straight into the tensor's memory, no intermediate copy
            count = handle.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{stored.file} ended while reading {stored.key}; the file is truncated.")
            done += count
        return buffer.view(dtype).reshape(shape)


class MetaReader:
    """A :class:`TensorReader` that returns meta tensors of the stored shapes and dtypes: no I/O, no memory.

    Running the surgery on it gives every output tensor's key, dtype and shape (the dry run of
    :func:`stream_apply_plan`). It also remembers which stored tensor each returned tensor is and how often each key
    was asked for, so the dry run can tell an output that IS a stored tensor, unchanged (a kept expert), from one
    computed from it: :meth:`verbatim_source`.
    """

    def __init__(self, reader: CheckpointReader) -> None:
        self._reader = reader
        self._returned: dict[int, tuple[torch.Tensor, StoredTensor]] = {}  # id -> (tensor kept alive, source)
        self.reads: dict[str, int] = {}

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> torch.Tensor:
        stored = self._reader.info(key)
        tensor = torch.empty(stored.shape, dtype=_torch_dtype(stored), device="meta")
        self._returned[id(tensor)] = (tensor, stored)
        self.reads[key] = self.reads.get(key, 0) + 1
        return tensor

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        return self.get(key)[index]  # a view: never the stored tensor itself

    def verbatim_source(self, tensor: torch.Tensor) -> StoredTensor | None:
        """The stored tensor ``tensor`` is, unchanged (the very object :meth:`get` returned, read once), else None."""
        entry = self._returned.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return None
        stored = entry[1]
        return stored if self.reads[stored.key] == 1 else None

    def forget(self) -> None:
        """Drop the tensors of the layer just measured (ids stay unique only while their tensors live)."""
        self._returned.clear()


class _SkippingReader:
    """The real reader, except that the keys in ``skip`` come back as meta tensors: outputs that are stored tensors
    unchanged are copied as bytes by the writer, so reading them would be wasted I/O."""

    def __init__(self, reader: CheckpointReader, skip: set[str]) -> None:
        self._reader, self._skip = reader, skip
        self._meta = MetaReader(reader)

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> torch.Tensor:
        return self._meta.get(key) if key in self._skip else self._reader.get(key)

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        return self._meta.get_rows(key, index) if key in self._skip else self._reader.get_rows(key, index)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder: the shards its ``model.safetensors.index.json`` names, else every
    ``*.safetensors``."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            names = sorted({str(name) for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"The shard index {index} is unreadable ({exc}); re-save the checkpoint.") from exc
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder} has no *.safetensors weights; out-of-core surgery reads safetensors only (convert pickle "
            "weights once with save_pretrained)."
        )
    return files


def stored_parameters(folder: str | Path) -> int:
    """Number of stored values in a checkpoint's weight files (tied tensors are stored, and counted, once)."""
    return sum(stored.numel for file in checkpoint_files(folder) for stored in read_header(file)[0].values())


def disk_layer_sizes(folder: str | Path, family: MoEFamily | None = None) -> dict[str, int]:
    """``{layer name: num_experts}`` of a checkpoint folder, from ``config.json`` and the tensor keys only."""
    folder = Path(folder)
    config = _config_dict(folder)
    family = family or get_family(config)
    keys = [key for file in checkpoint_files(folder) for key in read_header(file)[0]]
    return {layer.name: layer.num_experts for layer in family.disk_layers(config, keys)}


# ---- writing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its key, safetensors dtype and shape, and where its bytes come from.

    ``source`` is the stored tensor copied byte for byte; ``layer`` the sparse layer whose surgery produces it.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    source: StoredTensor | None = None
    layer: str | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


class ShardWriter:
    """Writes one safetensors file whose tensors are known in advance, tensor by tensor, never buffering the shard.

    The header (``safetensors.serialize``'s exact bytes: tensors ordered by dtype rank then name, compact JSON,
    space-padded to 8 bytes) is written first; :meth:`write` and :meth:`copy` must then follow :attr:`order`.
    A :class:`~uncurl_hf.io.manifest.FollowingDigest` hashes (and with ``sync``, syncs) the file while it is written;
    :meth:`close` returns its digest for the manifest.
    """

    def __init__(
        self, path: Path, tensors: Sequence[OutputTensor], metadata: Mapping[str, str], sync: bool = True
    ) -> None:
        self.path = path
        self.order = sorted(tensors, key=lambda t: (-_DTYPE_RANK.get(t.dtype, -1), t.key))
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for tensor in self.order:
            header[tensor.key] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                  "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % _HEADER_ALIGN)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._digest = FollowingDigest(path, sync=sync)
        except BaseException:
            os.close(self._fd)
            raise
        self._written = 0
        self._next = 0
        try:
            self._append(struct.pack("<Q", len(text)) + text)
        except BaseException:
            self.abort()
            raise

    def _append(self, data: bytes | memoryview) -> None:
        _write_all(self._fd, data)
        self._written += len(memoryview(data).cast("B"))
        self._digest.advance(self._written)

    def _expect(self, key: str) -> OutputTensor:
        if self._next >= len(self.order) or self.order[self._next].key != key:
            expected = self.order[self._next].key if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path.name}: wrote {key} where {expected} was due")  # a bug in the caller
        self._next += 1
        return self.order[self._next - 1]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append a tensor computed in memory (its dtype and shape must be the planned ones)."""
        planned = self._expect(key)
        if _SAFETENSORS_DTYPES.get(tensor.dtype) != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(
                f"{key}: computed {tensor.dtype}{list(tensor.shape)} but planned {planned.dtype}{list(planned.shape)}"
            )
        if planned.nbytes:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._append(memoryview(data))

    def copy(self, key: str, source: BinaryIO) -> None:
        """Append a stored tensor's bytes straight from the source file (no decoding, no buffering in Python)."""
        planned = self._expect(key)
        assert planned.source is not None
        _copy_range(source.fileno(), planned.source.offset, planned.nbytes, self._fd)
        self._written += planned.nbytes
        self._digest.advance(self._written)

    def close(self) -> FileDigest:
        """Finish the file and return its digest; raises if a planned tensor was not written (the caller's bug,
        never a partial shard)."""
        try:
            if self._next != len(self.order):
                raise RuntimeError(f"{self.path.name}: {len(self.order) - self._next} planned tensors were not written")
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        return self._digest.finish()

    def abort(self) -> None:
        os.close(self._fd)
        self._digest.cancel()


def shard_layout(tensors: Sequence[OutputTensor], max_shard_size: int | str) -> list[list[OutputTensor]]:
    """Split tensors into shards exactly like ``huggingface_hub.split_torch_state_dict_into_shards``.

    Greedy in the given order: a new shard starts when the next tensor would overflow ``max_shard_size``, and a
    tensor larger than the limit gets a shard of its own.
    """
    from huggingface_hub.serialization._base import parse_size_to_int

    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    current_size = 0
    for tensor in tensors:
        if tensor.nbytes > limit:
            shards.append([tensor])
            continue
        if current_size + tensor.nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(tensor)
        current_size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """``model.safetensors``, or ``model-00001-of-0000n.safetensors`` ... like ``save_pretrained``."""
    if count == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# ---- the surgery ------------------------------------------------------------------------------------------------


def stream_apply_plan(
    source_dir: str | Path,
    plan: PruningPlan,
    output_dir: str | Path,
    *,
    family: MoEFamily | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    scale_expert_capacity: bool = True,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    validate: bool = True,
    finalize: Callable[[Path], None] | None = None,
    progress: bool = False,
    sync: bool = True,
) -> Path:
    """Write ``source_dir`` reduced by ``plan`` to ``output_dir``, never holding more than one layer in memory.

    Same result as ``write_checkpoint(apply_plan(load_model(source_dir), family, plan), output_dir, plan,
    source_dir)`` (see the module docstring for what is identical), same atomic protocol and errors:
    :class:`InvalidPlanError` when the plan does not fit the checkpoint's layers, :class:`OutputExistsError`,
    :class:`CheckpointError`. ``validate`` re-reads the written headers (exactly the planned tensors) and checks
    that the layers the new ``config.json`` describes have the plan's counts, without building a model or reading
    weights (``uncurl verify`` does the full check). ``finalize(temp_folder)`` runs before the manifest (the model
    card), as in :func:`~uncurl_hf.io.checkpoint.write_checkpoint`. Shards are hashed (and with ``sync``, synced) while
    they are written, so the manifest does not read the weights again; ``sync=False`` skips every fsync (see
    :func:`~uncurl_hf.io.checkpoint.write_atomically`).
    """
    source = Path(source_dir).expanduser().resolve()
    checked = inspect_checkpoint(source, trust_remote_code=trust_remote_code)
    family = family or checked
    config = _config_dict(source)
    with CheckpointReader(source) as reader:
        layers = family.disk_layers(config, reader.keys())
        if not layers:
            raise CheckpointError(f"{source} has no sparse MoE layers (config.json and tensors); nothing to prune.")
        plan.validate({layer.name: layer.num_experts for layer in layers})
        layer_plans = {layer.name: plan.layer(layer.name) for layer in layers}

        def reduce(layer: DiskLayer, tensors: Any) -> ReducedLayer:
            return reduce_tensors(
                layer_plans[layer.name],
                lambda index: family.read_disk_expert(layer, index, tensors),
                family.read_disk_router(layer, tensors),
                family.neuron_axes,
                num_experts=layer.num_experts,
                capacity=layer.expert_capacity,
                scale_expert_capacity=scale_expert_capacity,
                copy=False,  # the reader returns fresh tensors: a kept expert needs no second copy
            )

        outputs, reduced_meta = _plan_outputs(reader, family, layers, reduce)
        new_config = family.reduced_config_dict(config, reduced_meta, base_model=base_model or plan.base_model)
        shards = shard_layout(outputs, max_shard_size)

        def fill(temp: Path) -> dict[str, FileDigest]:
            digests = _write_shards(
                temp, shards, reader, family, {layer.name: layer for layer in layers}, reduce, progress, sync
            )
            model_class = _write_config_and_code(temp, new_config, family)
            plan.save(temp / PLAN_FILENAME)
            copy_side_files(source, temp)
            _write_generation_config(temp, model_class)
            if validate:
                _validate_written(temp, family, plan, [t.key for shard in shards for t in shard])
            return digests

        output = write_atomically(
            output_dir, fill, source_dir=source, overwrite=overwrite, finalize=finalize, sync=sync
        )
    logger.info("streamed %s -> %s (%.2f MB of weights)", source, output, weights_size(output) / 1e6)
    return output


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _SAFETENSORS_DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors by uncurl-hf.") from None


def _plan_outputs(
    reader: CheckpointReader,
    family: MoEFamily,
    layers: list[DiskLayer],
    reduce: Callable[[DiskLayer, Any], ReducedLayer],
) -> tuple[list[OutputTensor], dict[str, ReducedLayer]]:
    """Every output tensor, in key order (a layer's outputs where its first stored key was), and the meta
    :class:`ReducedLayer` of each layer (counts and capacities for the config).

    The surgery runs on meta tensors; a family whose methods cannot (an op without a meta kernel) gets a real run of
    that layer instead, which costs one extra read of it but still holds one layer at a time.
    """
    owner = {key: layer for layer in layers for key in layer.keys}
    meta = MetaReader(reader)
    reduced_meta: dict[str, ReducedLayer] = {}
    outputs: list[OutputTensor] = []
    for key in reader.keys():
        layer = owner.get(key)
        if layer is None:
            stored = reader.info(key)
            outputs.append(OutputTensor(key, stored.dtype, stored.shape, source=stored))
            continue
        if layer.name in reduced_meta:
            continue
        sources: dict[str, StoredTensor] = {}
        try:
            reduced = reduce(layer, meta)
            written = family.write_disk_layer(layer, reduced)
            for out_key, tensor in written.items():
                stored = meta.verbatim_source(tensor)
                if stored is not None and stored.dtype == safetensors_dtype(tensor.dtype) \
                        and stored.shape == tuple(tensor.shape):
                    sources[out_key] = stored
        except (NotImplementedError, RuntimeError) as exc:
            logger.debug("%s: meta dry run failed (%s); measuring the layer on real tensors", layer.name, exc)
            reduced = reduce(layer, reader)
            written = family.write_disk_layer(layer, reduced)
            reduced = _to_meta(reduced)
        meta.forget()
        reduced_meta[layer.name] = reduced
        for out_key in sorted(written):
            tensor = written[out_key]
            dtype = safetensors_dtype(tensor.dtype)
            # an output that is a stored tensor unchanged (a kept expert) is copied as bytes, like non-layer tensors
            outputs.append(OutputTensor(out_key, dtype, tuple(tensor.shape), source=sources.get(out_key),
                                        layer=layer.name))
        del written
    keys = [t.key for t in outputs]
    if len(set(keys)) != len(keys):
        clashes = sorted({key for key in keys if keys.count(key) > 1})
        raise CheckpointError(f"Output tensor names collide ({clashes[:3]}): a bug in the {family.name} family.")
    return outputs, reduced_meta


def _write_shards(
    folder: Path,
    shards: list[list[OutputTensor]],
    reader: CheckpointReader,
    family: MoEFamily,
    layers: Mapping[str, DiskLayer],
    reduce: Callable[[DiskLayer, Any], ReducedLayer],
    progress: bool,
    sync: bool = True,
) -> dict[str, FileDigest]:
    """Write every shard (and the index when there are several), computing one layer's tensors at a time; return
    the shards' digests (hashed while written).

    A layer's outputs are cached only until they are all written; if a shard's layout interleaves two layers (mixed
    dtypes), the cache is dropped and the later layer recomputed when needed again, so memory stays one layer.
    Outputs that are stored tensors unchanged (``source`` set: kept experts) are copied as bytes and never read.
    """
    from tqdm.auto import tqdm

    copied = {t.source.key for shard in shards for t in shard if t.layer is not None and t.source is not None}
    skipping = _SkippingReader(reader, copied)

    names = shard_names(len(shards))
    total = sum(t.nbytes for shard in shards for t in shard)
    cache_name: str | None = None
    cache: dict[str, torch.Tensor] = {}
    digests: dict[str, FileDigest] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            writer = ShardWriter(folder / name, shard, {"format": "pt"}, sync=sync)
            try:
                for tensor in writer.order:
                    if tensor.source is not None:
                        writer.copy(tensor.key, reader.handle(tensor.source.file))
                    else:
                        assert tensor.layer is not None
                        if cache_name != tensor.layer or tensor.key not in cache:
                            cache, cache_name = {}, None  # free the previous layer before computing the next
                            layer = layers[tensor.layer]
                            with torch.no_grad():
                                cache = dict(family.write_disk_layer(layer, reduce(layer, skipping)))
                            cache_name = tensor.layer
                            logger.debug("%s: reduced to %d tensors", tensor.layer, len(cache))
                        writer.write(tensor.key, cache.pop(tensor.key))
                    bar.update(tensor.nbytes)
            except BaseException:
                writer.abort()
                raise
            digests[name] = writer.close()
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(math.prod(t.shape) for shard in shards for t in shard),
                "total_size": total,
            },
            "weight_map": {t.key: name for name, shard in zip(names, shards) for t in shard},
        }
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", "utf-8")
    return digests


def _write_config_and_code(folder: Path, config_dict: Mapping[str, Any], family: MoEFamily) -> type | None:
    """``config.json`` as the family computed it, plus the modeling code its ``auto_map`` names; returns the model
    class ``config.json`` loads as (``None`` when transformers does not know it).

    The code files are the ones ``save_pretrained`` copies (``custom_object_save`` of the config and model classes,
    found through the Auto registries). No model is built: a meta-device model of a large MoE takes seconds per
    thousand experts to construct.
    """
    from transformers.dynamic_module_utils import custom_object_save
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", "utf-8")
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None
    config_class = CONFIG_MAPPING[model_type]
    try:
        config = config_class.from_dict(dict(config_dict))
        model_class = _get_model_class(config, family.auto_model_class()._model_mapping)
    except (KeyError, ValueError):
        model_class = None
    auto_map = config_dict.get("auto_map") or {}
    for cls in (config_class, model_class):
        if cls is not None and getattr(cls, "_auto_class", None) is not None and cls._auto_class in auto_map:
            custom_object_save(cls, folder)
    return model_class


def _write_generation_config(folder: Path, model_class: type | None) -> None:
    """The source's ``generation_config.json`` (copied with the side files) or, for a generative model without one,
    the one transformers derives from the config, as ``save_pretrained`` writes it."""
    if (folder / "generation_config.json").exists() or model_class is None or not model_class.can_generate():
        return
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    GenerationConfig.from_model_config(config).save_pretrained(str(folder))


def _validate_written(folder: Path, family: MoEFamily, plan: PruningPlan, planned: list[str]) -> None:
    """The written folder, re-read from disk, holds exactly the planned tensors, and the layers its ``config.json``
    describes (family's view) have the plan's counts. No model is built, no weight read; ``uncurl verify`` adds
    the meta-model shape check and a forward pass."""
    written: list[str] = []
    for file in checkpoint_files(folder):
        written += read_header(file)[0]
    if sorted(written) != sorted(planned):
        raise CheckpointError(f"The streamed shards in {folder} do not hold the planned tensors.")
    counts = {layer.name: layer.num_experts for layer in family.disk_layers(_config_dict(folder), written)}
    if counts != plan.counts:
        raise CheckpointError(f"The streamed checkpoint has expert counts {counts}, the plan says {plan.counts}.")


def _config_dict(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {folder / 'config.json'}: {exc}. Restore a valid config.json.") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object; restore a valid config.json.")
    return config


def _to_meta(reduced: ReducedLayer) -> ReducedLayer:
    return ReducedLayer(
        experts=[{k: torch.empty_like(v, device="meta") for k, v in e.items()} for e in reduced.experts],
        router={k: torch.empty_like(v, device="meta") for k, v in reduced.router.items()},
        expert_capacity=reduced.expert_capacity,
    )


def _torch_dtype(stored: StoredTensor) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(stored.dtype)
    if dtype is None:
        raise NotImplementedError(f"{stored.key}: dtype {stored.dtype} has no torch equivalent")
    return dtype


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    numel = math.prod(shape)
    bits = _DTYPE_BITS.get(dtype)
    if bits is None:
        torch_dtype = _TORCH_DTYPES.get(dtype)
        bits = 8 * (torch_dtype.itemsize if torch_dtype is not None else 1)
    return (numel * bits + 7) // 8


def _copy_range(src: int, offset: int, nbytes: int, dst: int) -> None:
    """Append ``nbytes`` at ``offset`` of file ``src`` to file ``dst`` (at its offset), in the kernel when it can."""
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    while done < nbytes and copy_file_range is not None:
        try:
            count = copy_file_range(src, dst, min(nbytes - done, _COPY_CHUNK), offset + done)
        except OSError:  # other filesystems, old kernels: fall back to read/write
            break
        if count <= 0:
            break
        done += count
    while done < nbytes:
        chunk = os.pread(src, min(nbytes - done, _COPY_CHUNK), offset + done)
        if not chunk:
            raise CheckpointError("A source weight file ended early while copying; it is truncated.")
        _write_all(dst, chunk)
        done += len(chunk)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is out (a single write may be short, e.g. above 2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


__all__ = [
    "CheckpointReader",
    "MetaReader",
    "OutputTensor",
    "ShardWriter",
    "StoredTensor",
    "checkpoint_files",
    "disk_layer_sizes",
    "read_header",
    "safetensors_dtype",
    "shard_layout",
    "shard_names",
    "stored_parameters",
    "stream_apply_plan",
]
