"""Make a forked test child obey permission bits, even when the suite runs as root.

Root ignores permission bits because it holds CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so "chmod 000 and see what
uncurl says" proves nothing as root. :func:`drop_file_privileges` removes exactly those two capabilities (effective
and permitted, so ``access(2)`` answers for them too) with ``capset(2)`` in the calling process: it stays uid 0 and
still reads its own files (owner bits), but a mode-000 file or a 0555 folder now refuses it like any user. Run it
only in a child (``forked.run``): the capabilities cannot be taken back. A non-root runner already obeys the bits,
so for it this is a no-op. :func:`available` says (once per session) whether it works here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile

import forked

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_file_privileges() -> None:
    """Remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process (no-op unless euid is 0)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _probe(folder: str) -> bool:
    drop_file_privileges()
    try:
        open(os.path.join(folder, "locked"), "rb").close()
    except PermissionError:
        return True
    return False


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether a child that called :func:`drop_file_privileges` is really refused a mode-000 file."""
    with tempfile.TemporaryDirectory() as folder:
        locked = os.path.join(folder, "locked")
        with open(locked, "wb") as handle:
            handle.write(b"x")
        os.chmod(locked, 0)
        try:
            return bool(forked.run(_probe, folder, timeout=60))
        except RuntimeError:
            return False


def run(target, *args):
    """``target(*args)`` in a forked child that obeys permission bits; its result (see ``forked.run``)."""
    return forked.run(_unprivileged, target, *args)


def _unprivileged(target, *args):
    drop_file_privileges()
    return target(*args)


__all__ = ["available", "drop_file_privileges", "run"]
