"""The one safetensors reader: which files a checkpoint folder's weights are in, their headers, and lazy tensor reads.

Every part of uncurl-hf that reads weights without ``from_pretrained`` goes through here: out-of-core surgery
(:mod:`uncurl_hf.surgery.streaming`), offloaded calibration (:mod:`uncurl_hf.calibration.offload`), ``uncurl verify``
and the checkpoint inspection of :mod:`uncurl_hf.io.checkpoint`. So they all agree on what a folder's weights are:
:func:`weight_files` follows ``model.safetensors.index.json`` when there is one (as ``from_pretrained`` does: a stray
``consolidated.safetensors`` next to the shards is not part of the model), else takes every ``*.safetensors``.

Why not ``safetensors.safe_open`` for reading: its default mmap backend keeps every page it touched resident
(counted in RSS) until the handle closes — reading 1.2 GB through one handle measured 1.25 GB of RSS — and its
``pread`` backend (safetensors >= 0.8 only) reads the whole tensor for a ``get_slice``. Reading exactly the byte
ranges the header gives into fresh tensors does neither, and a row of a fused ``[E, ...]`` expert tensor is one
contiguous range. :class:`SafetensorsReader` does that, placing each tensor at the address alignment it has in a
memory-mapped file (so computations on it round exactly as on ``from_pretrained``'s tensors); :class:`MetaReader`
answers the same calls with meta tensors (shapes and dtypes, no I/O), for dry runs.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from uncurl_hf.errors import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes (those torch has)
TORCH_DTYPES: dict[str, torch.dtype] = {
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
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# safetensors' Dtype enum order: ``serialize`` lays tensors out by this rank, descending, then by name.
DTYPE_RANK = {
    name: rank
    for rank, name in enumerate(
        "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
    )
}
_DTYPE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
_ALIGN = 64  # bytes: the widest SIMD alignment (AVX-512), see _file_aligned_buffer
_OWN_MAPPING_BYTES = 2**20  # reads from this size on get their own anonymous mapping, see _file_aligned_buffer


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return SAFETENSORS_DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors by uncurl-hf.") from None


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes a tensor of safetensors dtype ``dtype`` and ``shape`` takes in a file (sub-byte dtypes rounded up)."""
    numel = math.prod(shape)
    bits = _DTYPE_BITS.get(dtype)
    if bits is None:
        torch_dtype = TORCH_DTYPES.get(dtype)
        bits = 8 * (torch_dtype.itemsize if torch_dtype is not None else 1)
    return (numel * bits + 7) // 8


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
        expected = tensor_nbytes(stored.dtype, stored.shape)
        if begin < 0 or end < begin or data_start + end > size or stored.nbytes != expected:
            raise CheckpointError(
                f"Weight file {path}: tensor {key} has inconsistent offsets {entry['data_offsets']} for "
                f"{stored.dtype}{list(stored.shape)}; the file is corrupt. Re-download or re-save the checkpoint."
            )
        tensors[key] = stored
    return tensors, metadata


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder, sorted: the shards its ``model.safetensors.index.json``
    names (whether or not they exist: :func:`~uncurl_hf.io.checkpoint.inspect_checkpoint` reports missing ones),
    else every ``*.safetensors``; ``[]`` when there are none.

    Raises :class:`CheckpointError` when the index is unreadable.
    """
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        names = sorted({str(name) for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"The shard index {index} is unreadable ({type(exc).__name__}: {exc}); re-download or re-save the "
            "checkpoint."
        ) from exc
    return [folder / name for name in names]


def stored_tensors(folder: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint folder by key, from the headers of its :func:`weight_files`.

    Raises :class:`CheckpointError` when the folder has no safetensors weights or a key is stored twice.
    """
    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder} has no *.safetensors weights; out-of-core reading (streaming, offloading) reads safetensors "
            "only (convert pickle weights once with save_pretrained)."
        )
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for key, stored in read_header(file)[0].items():
            if key in tensors:
                raise CheckpointError(
                    f"Tensor {key} is stored twice ({tensors[key].file.name} and {file.name}); remove the stray "
                    "weight file from the checkpoint folder."
                )
            tensors[key] = stored
    return tensors


class SafetensorsReader:
    """Lazy :class:`~uncurl_hf.families.base.TensorReader` over the safetensors files of a checkpoint folder.

    Only headers are read up front; :meth:`get` and :meth:`get_rows` ``pread`` exactly the bytes asked for into a
    fresh tensor, so nothing stays resident after the caller drops it. Use as a context manager (or :meth:`close`).
    """

    def __init__(self, folder: str | Path, *, own_mappings: bool = False) -> None:
        self.folder = Path(folder)
        self.tensors = stored_tensors(self.folder)
        self.own_mappings = own_mappings  # large reads in their own mmap: see _file_aligned_buffer
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

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, file: Path) -> BinaryIO:
        """An unbuffered binary handle of one weight file (opened once, kept until :meth:`close`)."""
        if file not in self._handles:
            self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        return self._handles[file]

    def _read(self, stored: StoredTensor, offset: int, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
        dtype = TORCH_DTYPES.get(stored.dtype)
        if dtype is None:
            raise CheckpointError(
                f"Tensor {stored.key} has dtype {stored.dtype}, which torch cannot hold; uncurl-hf can copy such "
                "tensors but not merge them. Dequantize the checkpoint first."
            )
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = _file_aligned_buffer(offset, nbytes, dtype.itemsize, own_mapping=self.own_mappings)
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


def _file_aligned_buffer(offset: int, nbytes: int, itemsize: int, own_mapping: bool = False) -> torch.Tensor:
    """An uninitialised ``nbytes`` uint8 tensor whose address is ``offset`` modulo 64, as in a memory-mapped file.

    Why: CPU kernels (matmul and reductions with SIMD head/tail handling) can round differently depending on where
    their operands start. ``from_pretrained`` leaves same-dtype tensors in the memory-mapped file, at the file offset
    modulo the page size, so a tensor read here sits at the same alignment modulo 64 (the widest SIMD alignment) and
    a model fed from this reader (offloaded calibration) computes bit for bit what the loaded model computes.

    ``own_mapping``: reads of :data:`_OWN_MAPPING_BYTES` or more get their own anonymous ``mmap``, unmapped when the
    tensor is freed, instead of glibc's heap. Why: a fused family's loader reads a layer's per-expert tensors (3 MB
    each at Qwen3-30B-A3B shapes) only to stack them and drop them. From the heap, depending on glibc's adaptive mmap
    threshold, those freed reads stayed resident until the block was done, and the block-by-block load of a 2.5 GB
    model peaked at 4.1 GB in some runs and 3.35 GB in others (``benchmarks/memory.py``). Unmapped on free, they
    never outlive their use. Not the default: each fresh mapping faults its pages in, and the streaming surgery,
    which reads and drops one tensor at a time from a heap that stays small, took 0.32-0.46 s instead of 0.27 s at
    0.5 GB with it (``benchmarks/scale.py``).
    """
    if own_mapping and nbytes + _ALIGN >= _OWN_MAPPING_BYTES:
        region = mmap.mmap(-1, nbytes + _ALIGN, flags=mmap.MAP_PRIVATE)  # anonymous (fd -1), zero pages
        raw = torch.frombuffer(region, dtype=torch.uint8)  # the tensor holds the mapping
    else:
        raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)  # not zero-filled, unlike bytearray
    shift = (offset - raw.data_ptr()) % _ALIGN
    if shift % itemsize:  # a tensor the file stores misaligned for its dtype: dtype views need itemsize alignment
        shift = (-raw.data_ptr()) % _ALIGN
    return raw[shift:shift + nbytes]


class MetaReader:
    """A :class:`TensorReader` that returns meta tensors of the stored shapes and dtypes: no I/O, no memory.

    Running the surgery on it gives every output tensor's key, dtype and shape (the dry run of
    :func:`~uncurl_hf.surgery.streaming.stream_apply_plan`). It also remembers which stored tensor each returned tensor
    is and how often each key was asked for, so the dry run can tell an output that IS a stored tensor, unchanged (a
    kept expert), from one computed from it: :meth:`verbatim_source`.
    """

    def __init__(self, reader: SafetensorsReader) -> None:
        self._reader = reader
        self._returned: dict[int, tuple[torch.Tensor, StoredTensor]] = {}  # id -> (tensor kept alive, source)
        self.reads: dict[str, int] = {}

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> torch.Tensor:
        stored = self._reader.info(key)
        tensor = torch.empty(stored.shape, dtype=_meta_dtype(stored), device="meta")
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


def _meta_dtype(stored: StoredTensor) -> torch.dtype:
    """The torch dtype of a stored tensor; ``NotImplementedError`` (the dry run then measures the layer on real
    tensors) when torch has none."""
    dtype = TORCH_DTYPES.get(stored.dtype)
    if dtype is None:
        raise NotImplementedError(f"{stored.key}: dtype {stored.dtype} has no torch equivalent")
    return dtype


__all__ = [
    "DTYPE_RANK",
    "MetaReader",
    "SAFETENSORS_DTYPES",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "SafetensorsReader",
    "StoredTensor",
    "TORCH_DTYPES",
    "read_header",
    "safetensors_dtype",
    "stored_tensors",
    "tensor_nbytes",
    "weight_files",
]
