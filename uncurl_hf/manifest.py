"""The integrity manifest of an output folder: the sha256 and size of every file, recorded at write time.

:func:`uncurl_hf.checkpoint.write_checkpoint` writes ``uncurl_manifest.json`` inside the temporary folder as the last
step before the atomic rename, so the manifest describes exactly the bytes that were validated (reloaded and run) and
covers the model card too. ``uncurl verify`` (:mod:`uncurl_hf.verify`) recomputes the hashes later: a truncated copy,
a bit flip or a hand edit of weights, config or plan shows up as a mismatch.

The manifest holds no timestamps or paths, so identical runs still give byte-identical folders. Hashing reads every
byte once; the same pass ``fsync``s each file, so after the rename the folder survives a power loss as well as a kill.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILENAME = "uncurl_manifest.json"
MANIFEST_FORMAT_VERSION = 1
_CHUNK = 1 << 20


def file_digest(path: str | Path, sync: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights can be many GB); ``sync`` also ``fsync``s it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def manifest_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``folder`` except the manifest itself, sorted."""
    root = Path(folder)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() != MANIFEST_FILENAME
    )


def build_manifest(folder: str | Path, sync: bool = False) -> dict[str, Any]:
    """``{"format_version", "algorithm", "files": {path: {"sha256", "size"}}}`` for every file of ``folder``."""
    root = Path(folder)
    files = {
        name: {"sha256": file_digest(root / name, sync=sync), "size": (root / name).stat().st_size}
        for name in manifest_files(root)
    }
    return {"format_version": MANIFEST_FORMAT_VERSION, "algorithm": "sha256", "files": files}


def write_manifest(folder: str | Path, sync: bool = True) -> Path:
    """Hash (and by default ``fsync``) every file of ``folder`` and write ``uncurl_manifest.json`` into it."""
    root = Path(folder)
    path = root / MANIFEST_FILENAME
    text = json.dumps(build_manifest(root, sync=sync), indent=2, sort_keys=True) + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
    return path


def fsync_dir(folder: str | Path) -> None:
    """``fsync`` a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
