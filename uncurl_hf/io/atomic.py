"""The one atomic-output protocol: build a folder under a hidden temporary name next to the output, then rename it.

Every writer of an output folder (the in-memory :func:`~uncurl_hf.io.checkpoint.write_checkpoint`, the out-of-core
:func:`~uncurl_hf.surgery.streaming.stream_apply_plan`, recovery's adapter writer, sweeps) goes through here, so a
crash or a kill never leaves a half-written output: the folder is assembled as ``.uncurl-tmp-<name>-<pid>-*`` on the
same filesystem, gets its integrity manifest (:mod:`uncurl_hf.io.manifest`), and only then replaces the output. An
overwrite moves the previous output aside as ``.uncurl-old-<name>-<pid>-*`` for the instant between the two renames;
leftovers of killed runs (their pid is gone) are swept, or restored, by the next write of the same output. Every
file and folder of the output gets the mode a plain write gives (``0666``/``0777`` less the umask), whatever the
temporary machinery used (:func:`normalize_modes`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from uncurl_hf.errors import CheckpointError, OutputExistsError, UncurlError
from uncurl_hf.io.manifest import FileDigest, fsync_dir, write_manifest

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".uncurl-tmp-"
OLD_PREFIX = ".uncurl-old-"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder (``uncurl recover --save adapter``) has no config.json
DRY_RUN_PLAN = "uncurl_plan.json"  # a dry run's folder holds only the plan (and recipe): ours to replace too


def write_atomically(
    output_dir: str | Path,
    fill: Callable[[Path], Mapping[str, FileDigest] | None],
    *,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
    sync: bool = True,
) -> Path:
    """Run ``fill(temp_folder)`` and ``finalize(temp_folder)``, add the manifest, then rename the folder into place.

    ``fill`` may return the digests of files it hashed while writing them (``manifest.FollowingDigest``); the
    manifest then reads only the other files. ``sync`` (the default) fsyncs every file and the
    parent folder, so the output also survives a power loss; ``sync=False`` leaves that to the kernel's writeback (the
    rename is still atomic against a killed process, and ``uncurl verify`` detects a folder a crash left incomplete).

    The one atomic-output protocol of every writer (in-memory :func:`~uncurl_hf.io.checkpoint.write_checkpoint`,
    out-of-core :func:`uncurl_hf.surgery.streaming.stream_apply_plan`): stale temporary folders are swept and the output
    is checked first (:class:`OutputExistsError`); on any failure the temporary folder is removed and nothing reaches
    ``output_dir`` (:class:`CheckpointError` naming disk space and permissions, unless ``fill`` raised an
    ``UncurlError`` itself).
    """
    output = Path(output_dir).expanduser().resolve()
    source = Path(source_dir).expanduser().resolve() if source_dir is not None else None
    sweep_stale_temp_dirs(output)  # first: it may restore an output that an interrupted overwrite moved aside
    check_output_dir(output, source, overwrite)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
        os.chmod(temp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700; the final folder should look normal
    except OSError as exc:
        raise CheckpointError(
            f"Cannot create the output folder next to {output} ({type(exc).__name__}: {exc}). Choose an -o whose "
            "parent is a writable directory."
        ) from exc
    try:
        digests = fill(temp)
        if finalize is not None:
            finalize(temp)
        normalize_modes(temp)
        write_manifest(temp, sync=sync, known=digests)  # last: hashes exactly the validated files and the card
        move_into_place(temp, output)
        if sync:
            fsync_dir(output.parent)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, UncurlError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(
            f"Writing the checkpoint to {output} failed: {type(exc).__name__}: {exc}. Nothing was written to "
            f"{output}; check free disk space, quotas and write permission for {output.parent}, then rerun."
        ) from exc
    return output


def check_output_dir(
    output: Path,
    source: Path | None,
    overwrite: bool,
    markers: tuple[str, ...] = ("config.json", ADAPTER_CONFIG, DRY_RUN_PLAN),
    kind: str = "model folder",
) -> None:
    """Refuse an output that is (inside) the source, contains it, or exists without ``overwrite``; with
    ``overwrite``, replace only a folder of the same ``kind`` (one holding one of the ``markers``) or an empty one."""
    if source is not None:
        if output == source:
            raise OutputExistsError(f"The output folder {output} is the input model folder; choose another -o.")
        if source.is_relative_to(output):
            raise OutputExistsError(f"The output folder {output} contains the input model {source}; choose another -o.")
        if output.is_relative_to(source):
            raise OutputExistsError(f"The output folder {output} is inside the input model folder; choose another -o.")
    if not output.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"Output folder {output} already exists; pass --overwrite or choose another -o.")
    if not output.is_dir():
        raise OutputExistsError(f"Output path {output} exists and is a file; remove it or choose another -o.")
    if any(output.iterdir()) and not any((output / marker).exists() for marker in markers):
        raise OutputExistsError(
            f"Output folder {output} is not empty and is not a {kind}; refusing to replace it (a {kind} holds "
            f"{' or '.join(markers)}). Choose another -o."
        )


def sweep_stale_temp_dirs(output: Path) -> list[Path]:
    """Clean up after runs of ``output`` that no longer exist; return the leftover folders handled.

    ``.uncurl-tmp-<name>-<pid>-*`` (a write that never finished) is removed. ``.uncurl-old-<name>-<pid>-*`` is the
    previous output moved aside by an overwrite: if the run died between the two renames, ``output`` is missing and
    the old folder (complete: it was the output) is renamed back, otherwise it is removed.
    """
    removed = []
    if not output.parent.is_dir():
        return removed
    pattern = re.compile(rf"^({re.escape(TEMP_PREFIX)}|{re.escape(OLD_PREFIX)}){re.escape(output.name)}-(\d+)-")
    for entry in sorted(output.parent.iterdir()):
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(2))):
            if match.group(1) == OLD_PREFIX and not output.exists():
                os.replace(entry, output)
                logger.info("restored %s from %s, left by an interrupted overwrite", output, entry)
            else:
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("removed leftover temporary folder %s", entry)
            removed.append(entry)
    return removed


def move_into_place(temp: Path, output: Path) -> None:
    """Rename the finished folder ``temp`` to ``output``; an existing output is moved aside first and removed after,
    or put back if the second rename fails (a kill in between is repaired by :func:`sweep_stale_temp_dirs`)."""
    if not output.exists():
        os.replace(temp, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{output.name}-{os.getpid()}-", dir=output.parent))
    old.rmdir()
    os.replace(output, old)
    try:
        os.replace(temp, output)
    except OSError:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def normalize_modes(folder: Path) -> None:
    """Give every file under ``folder`` mode ``0666 & ~umask`` and every folder ``0777 & ~umask``: what ``open()``
    and ``mkdir()`` give, so the output is as readable as anything else the user writes.

    Two writers do otherwise: ``safetensors``' ``save_file`` (used by ``save_pretrained``) creates the weights
    through a private 0600 temporary file, and ``mkdtemp`` makes the temporary folder 0700. Symlinks are left alone.
    """
    mask = _current_umask()
    for root, folders, files in os.walk(folder):
        for name in folders:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "ADAPTER_CONFIG",
    "OLD_PREFIX",
    "TEMP_PREFIX",
    "check_output_dir",
    "move_into_place",
    "normalize_modes",
    "sweep_stale_temp_dirs",
    "write_atomically",
]
