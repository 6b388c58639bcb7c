"""Writing safetensors shards whose tensors are known in advance, one tensor at a time, never buffering a shard.

The streaming surgery (:mod:`uncurl_hf.surgery.streaming`) plans every output tensor (key, dtype, shape, and where its
bytes come from) before writing a byte; this module turns that plan into files exactly like transformers does:
:func:`shard_layout` splits like ``huggingface_hub.split_torch_state_dict_into_shards``, :func:`shard_names` names like
``save_pretrained``, :class:`ShardWriter` writes the header ``safetensors.serialize`` writes and then the tensors in
its layout order (computed tensors from memory, stored ones copied byte for byte with ``copy_file_range``), and
:func:`write_shard_index` writes ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from uncurl_hf.errors import CheckpointError
from uncurl_hf.io.manifest import FileDigest, FollowingDigest
from uncurl_hf.io.safetensors import (
    DTYPE_RANK,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SAFETENSORS_DTYPES,
    StoredTensor,
    tensor_nbytes,
)

_HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes
_COPY_CHUNK = 64 << 20


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
        return tensor_nbytes(self.dtype, self.shape)


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
        self.order = sorted(tensors, key=lambda t: (-DTYPE_RANK.get(t.dtype, -1), t.key))
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
        if SAFETENSORS_DTYPES.get(tensor.dtype) != planned.dtype or tuple(tensor.shape) != planned.shape:
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


def write_shard_index(folder: Path, names: Sequence[str], shards: Sequence[Sequence[OutputTensor]]) -> Path:
    """``model.safetensors.index.json`` for shards written under ``names``: totals and the key -> file map."""
    index = {
        "metadata": {
            "total_parameters": sum(math.prod(t.shape) for shard in shards for t in shard),
            "total_size": sum(t.nbytes for shard in shards for t in shard),
        },
        "weight_map": {t.key: name for name, shard in zip(names, shards) for t in shard},
    }
    path = folder / SAFE_WEIGHTS_INDEX_NAME
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", "utf-8")
    return path


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


__all__ = ["OutputTensor", "ShardWriter", "shard_layout", "shard_names", "write_shard_index"]
