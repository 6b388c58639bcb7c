"""Memory a finished stage can give back: freed tensors stay in glibc's heap until :func:`release_memory` trims it.

Measured at Qwen3-30B-A3B layer shapes (bf16, 2.53 GB, ``benchmarks/memory.py``). Not done, on purpose:
``from_pretrained`` leaves the tensors it did not convert (embeddings, attention, norms) as views of the safetensors
mmap, which keeps the file's touched pages resident after the load (2.08x the model's bytes; 1.16x with those tensors
copied into private memory). The copies change the tensors' alignment, and with it the last bits of some CPU kernels'
sums: calibration statistics then differ from the ``--offload`` path's (tests/test_offload.py checks they are equal
bit for bit). The load's own peak (2.40x) is transformers' and is reached before that copy could happen anyway.
"""

from __future__ import annotations

import functools
from typing import Any


GC_THRESHOLD_BYTES = 256 * 2**20
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def disable_onednn_primitive_cache() -> None:
    """Turn off oneDNN's primitive cache for this process, unless the user set its size (the CLI does this first).

    Why: torch runs bfloat16 matmuls on CPU through oneDNN, which caches one primitive per distinct shape, up to
    1024 of them. An MoE forward multiplies every expert's tokens separately, a new row count each time, so the cache
    fills with primitives that are never reused. In a calibration of a bf16 32-expert Qwen3-MoE (0.86 GB,
    ``benchmarks/peer.py``) it held 0.3-0.4 GB (peak 2.33-2.78 GB with it, 1.85-2.03 GB without). The run was no
    slower and wrote the same bytes. oneDNN reads the variable when it first builds a primitive, so this works
    after ``import torch`` as long as no bf16 matmul ran before.
    """
    import os

    os.environ.setdefault(ONEDNN_CACHE_VARIABLE, "0")


def tensor_bytes(model: Any) -> int:
    """Bytes of a module's parameters and buffers (what freeing it can give back)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def release_memory(freed_bytes: int | None = None) -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere), so that
    what a finished stage freed leaves the RSS before the next stage allocates.

    ``gc.collect()`` costs ~0.3 s in a process that has imported transformers — more than a small model's whole
    prune, and half the test suite's time when it ran on every stage — so it runs only when the caller says at least
    :data:`GC_THRESHOLD_BYTES` may come free (or does not say). Trimming is cheap and always runs.
    """
    import gc

    if freed_bytes is None or freed_bytes >= GC_THRESHOLD_BYTES:
        gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand glibc's free heap pages back to the OS (``malloc_trim(0)``; a no-op elsewhere), without the garbage
    collection of :func:`release_memory`: sequential planning runs it between its calibration passes. Not after
    every calibration batch: that lowered a 0.86 GB decoder's peak by 0.2-0.35 GB but made calibration of the tiny
    decoder 1.4-1.6x a plain forward instead of 1.15-1.2x (the next batch faults the returned pages back in)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` where there is no glibc."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
