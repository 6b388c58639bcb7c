"""Stable seeds: the same (seed, name) gives the same stream in every process and on every machine.

Python's ``hash()`` of a string is salted per process (PYTHONHASHSEED), so it must never feed a RNG whose output
ends up in a plan or a checkpoint.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit integer derived from ``parts`` with SHA-256 (usable by ``random``, numpy and torch)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
