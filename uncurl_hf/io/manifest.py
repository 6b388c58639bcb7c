"""The integrity manifest of an output folder: the sha256 and size of every file, recorded at write time.

:func:`uncurl_hf.io.checkpoint.write_checkpoint` writes ``uncurl_manifest.json`` inside the temporary folder as the last
step before the atomic rename, so the manifest describes exactly the bytes that were validated (reloaded and run) and
covers the model card too. ``uncurl verify`` (:mod:`uncurl_hf.io.verify`) recomputes the hashes later: a truncated copy,
a bit flip or a hand edit of weights, config or plan shows up as a mismatch.

The manifest holds no timestamps or paths, so identical runs still give byte-identical folders. Hashing reads every
byte once; the same pass ``fsync``s each file, so after the rename the folder survives a power loss as well as a kill.
A writer that produces large files sequentially (the streaming writer's shards) hashes them while they are written
with :class:`FollowingDigest`, a background thread that trails the writer through the page cache, and hands the
digests to :func:`write_manifest` so that the weights are not read a second time at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILENAME = "uncurl_manifest.json"
MANIFEST_FORMAT_VERSION = 1
_CHUNK = 1 << 20
_FOLLOW_CHUNK = 8 << 20  # hashlib releases the GIL on large updates: big reads keep the thread off the writer's path
_SYNC_EVERY = 256 << 20  # a following digest starts writeback every this many bytes, so the final fsync is short


@dataclass(frozen=True)
class FileDigest:
    """The sha256 and size of a finished file, and whether its data was synced to disk."""

    sha256: str
    size: int
    synced: bool = False


class FollowingDigest:
    """sha256 of a file that is still being appended to, computed by a background thread that trails the writer.

    The writer calls :meth:`advance` with the number of bytes written so far and :meth:`finish` once the file is
    complete; the thread reads each new range (from the page cache: the bytes were just written) and hashes it while
    the writer goes on, so hashing overlaps writing instead of re-reading every byte at the end. With ``sync``, it
    also calls ``fdatasync`` every 256 MiB (writeback overlaps writing too) and ``fsync`` at the end.
    The file must only ever be appended to, in order, while it is followed.
    """

    def __init__(self, path: str | Path, sync: bool = False) -> None:
        self.path = Path(path)
        self._sync = sync
        self._fd = os.open(self.path, os.O_RDONLY)
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._done = 0
        self._thread = threading.Thread(target=self._run, name=f"digest-{self.path.name}", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        """The file now holds ``written`` bytes (a running total, never decreasing)."""
        self._queue.put(written)

    def finish(self) -> FileDigest:
        """Wait for the thread to hash (and sync) everything announced; raises what the thread raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return FileDigest(self._hash.hexdigest(), self._done, synced=self._sync)

    def cancel(self) -> None:
        """Stop following (the file is being abandoned); never raises."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        synced = 0
        try:
            while (target := self._queue.get()) is not None:  # runs until finish()/cancel(), even after an error
                if self._error is not None:
                    continue
                try:
                    synced = self._hash_to(target, synced)
                except BaseException as exc:  # handed to finish(): the writer's thread raises it
                    self._error = exc
            if self._sync and self._error is None:
                os.fsync(self._fd)
        except BaseException as exc:
            self._error = exc
        finally:
            os.close(self._fd)

    def _hash_to(self, target: int, synced: int) -> int:
        """Hash up to byte ``target``; returns the offset up to which data was last synced."""
        while self._done < target:
            chunk = os.pread(self._fd, min(target - self._done, _FOLLOW_CHUNK), self._done)
            if not chunk:
                raise OSError(f"{self.path} is shorter than the {target} bytes written to it")
            self._hash.update(chunk)
            self._done += len(chunk)
            if self._sync and self._done - synced >= _SYNC_EVERY:
                os.fdatasync(self._fd)
                synced = self._done
        return synced


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


def build_manifest(
    folder: str | Path, sync: bool = False, known: Mapping[str, FileDigest] | None = None
) -> dict[str, Any]:
    """``{"format_version", "algorithm", "files": {path: {"sha256", "size"}}}`` for every file of ``folder``.

    ``known`` digests (relative path -> :class:`FileDigest`, e.g. from a :class:`FollowingDigest`) are used as they
    are when the file still has the recorded size (and, with ``sync``, was synced); other files are read and hashed.
    """
    root = Path(folder)
    known = known or {}
    files = {}
    for name in manifest_files(root):
        size = (root / name).stat().st_size
        digest = known.get(name)
        if digest is None or digest.size != size or (sync and not digest.synced):
            digest = FileDigest(file_digest(root / name, sync=sync), size)
        files[name] = {"sha256": digest.sha256, "size": size}
    return {"format_version": MANIFEST_FORMAT_VERSION, "algorithm": "sha256", "files": files}


def write_manifest(folder: str | Path, sync: bool = True, known: Mapping[str, FileDigest] | None = None) -> Path:
    """Hash (and by default ``fsync``) every file of ``folder`` and write ``uncurl_manifest.json`` into it.

    ``known`` digests skip re-reading files hashed while they were written (:func:`build_manifest`).
    """
    root = Path(folder)
    path = root / MANIFEST_FILENAME
    text = json.dumps(build_manifest(root, sync=sync, known=known), indent=2, sort_keys=True) + "\n"
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
