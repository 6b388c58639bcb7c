"""Can this process read the model and write the output? Answered cheaply, before any heavy work.

Permission bits, read-only filesystems and broken symlinks otherwise surface deep inside transformers or
safetensors as an unexpected ``PermissionError``, or as a misleading "corrupt or truncated (No such file or
directory)" for a weight file that is really a symlink loop. These checks turn each into a message that names the
path and the fix. Readability is tested by opening (not only ``os.access``, which asks about the *real* user and
misses effective ids and capabilities); writability of an output's folder by ``os.access`` *and* a real probe file,
because ACLs, read-only mounts and quotas can make ``os.access`` say yes where creating a file fails.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from uncurl_hf.errors import AccessDeniedError, BrokenSymlinkError, CheckpointError

PROBE_PREFIX = ".uncurl-probe-"


def describe(path: Path) -> str:
    """``mode drwx------, owner root`` for a path (what ``ls -l`` would show), or ``""`` when it cannot be stat'ed."""
    try:
        info = path.lstat()
    except OSError:
        return ""
    try:
        import pwd

        owner = pwd.getpwuid(info.st_uid).pw_name
    except (ImportError, KeyError):
        owner = str(info.st_uid)
    return f"mode {stat.filemode(info.st_mode)}, owner {owner}"


def check_readable_folder(folder: Path, what: str = "model folder") -> None:
    """The folder can be listed and entered; :class:`AccessDeniedError` naming it and the fix otherwise."""
    try:
        os.listdir(folder)
        os.stat(folder / "config.json")  # needs search (x) permission, which listing alone does not
    except FileNotFoundError:
        pass
    except PermissionError as exc:
        raise AccessDeniedError(
            f"Cannot read the {what} {folder}: permission denied ({describe(folder)}). Make it readable for this "
            f"user (e.g. `chmod -R u+rX {folder}`, or ask its owner), or copy it somewhere you can read."
        ) from exc


def check_readable_file(path: Path, what: str) -> bool:
    """Whether ``path`` exists; raise when it exists but cannot be read: a symlink loop or a dangling symlink
    (:class:`BrokenSymlinkError`), or no read permission (:class:`AccessDeniedError`). ``what`` names it."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        raise _denied(path, what, exc) from exc
    if stat.S_ISLNK(info.st_mode):
        _check_link(path, what)
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))  # a FIFO must not block the check
    except PermissionError as exc:
        raise _denied(path, what, exc) from exc
    except IsADirectoryError:
        return True  # a folder where a file is expected is reported by the caller's own checks
    except OSError as exc:
        raise CheckpointError(f"Cannot open the {what} {path} ({exc.strerror}); check the file and its disk.") from exc
    return True


def _check_link(path: Path, what: str) -> None:
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BrokenSymlinkError(
                f"The {what} {path} is a symlink loop ({path.name} -> {target} leads back to itself); replace it "
                "with the real file (re-download the checkpoint, or copy it with `cp -L` from where it came)."
            ) from exc
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BrokenSymlinkError(
                f"The {what} {path} is a dangling symlink: it points to {target}, which does not exist (a cleaned "
                "cache or a moved folder). Put the target back, or re-download the checkpoint."
            ) from exc
        if isinstance(exc, PermissionError):
            raise _denied(path, what, exc) from exc
        raise


def _denied(path: Path, what: str, exc: OSError) -> AccessDeniedError:
    where = describe(path) or f"a folder above it is not searchable: {exc.strerror}"
    return AccessDeniedError(
        f"Cannot read the {what} {path}: permission denied ({where}). Make it readable for this user "
        f"(e.g. `chmod u+r {path}`, or ask its owner), or copy the checkpoint somewhere you can read."
    )


def check_writable_parent(output: Path) -> Path:
    """The folder that will receive ``output`` (its parent, or the nearest existing ancestor that the missing ones
    will be created in) accepts new entries; returns it. Probed for real: a temporary file is created and removed.

    :class:`CheckpointError` when that ancestor is a file, :class:`AccessDeniedError` when it is not writable.
    """
    folder = output.parent
    while not os.path.lexists(folder) and folder != folder.parent:  # os.path: False, not an error, below a 000 folder
        folder = folder.parent
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"Cannot create the output folder {output}: {folder} exists and is not a directory. Choose an -o whose "
            "parent is a writable directory."
        )
    problem = None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"
    if problem is None:
        try:
            handle, probe = tempfile.mkstemp(prefix=f"{PROBE_PREFIX}{os.getpid()}-", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
    if problem is not None:
        raise AccessDeniedError(
            f"Cannot write the output {output}: the folder {folder} is not writable for this user ({problem}; "
            f"{describe(folder)}). Choose an -o in a folder you can write to, or make it writable "
            f"(e.g. `chmod u+w {folder}`)."
        )
    return folder


__all__ = ["PROBE_PREFIX", "check_readable_file", "check_readable_folder", "check_writable_parent", "describe"]
