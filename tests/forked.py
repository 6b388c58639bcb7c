"""Run a function in a forked child process: a real, separate process that can be SIGKILLed, resource-limited or
given its own torch thread count, without paying for a fresh interpreter.

Starting ``python -m uncurl_hf`` imports torch and transformers, which takes 30-50 s on the shared 2-core test
machine; a fork of the test process (already importing both) starts in milliseconds. The child runs ``target`` and
leaves through ``os._exit`` (no pytest teardown in the child); its JSON-able return value, or the exception it
raised, comes back through a pipe. The parent enforces a timeout, so a stuck child can never hang the suite.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

CHILD_TIMEOUT_S = 300.0


@dataclass
class Child:
    """A started child: its pid and the read end of its result pipe; ``events`` are progress marks it sent."""

    pid: int
    read_fd: int
    buffer: bytes = b""

    def wait_for_line(self, timeout: float = CHILD_TIMEOUT_S) -> str | None:
        """The next line the child wrote with :func:`send`, or ``None`` if it exited (or timed out) first."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def kill(self) -> None:
        """SIGKILL the child (a no-op if it is already gone)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def join(self, timeout: float = CHILD_TIMEOUT_S) -> tuple[int, list[str]]:
        """Wait for the child (killing it after ``timeout``); return its exit status and the lines it sent.

        The status is the exit code, or minus the signal number when a signal ended it (like ``Popen.returncode``).
        """
        lines = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.wait_for_line(max(deadline - time.monotonic(), 0.01))
            if line is None:
                break
            lines.append(line)
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.kill()
            time.sleep(0.02)
        os.close(self.read_fd)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return code, lines


_WRITE_FD: int | None = None


def send(message: Any) -> None:
    """From inside a child: send one JSON line to the parent (e.g. "the write started")."""
    assert _WRITE_FD is not None, "send() only works inside a child started by start()"
    os.write(_WRITE_FD, (json.dumps(message) + "\n").encode())


def start(target: Callable[..., Any], *args: Any) -> Child:
    """Fork; the child runs ``target(*args)`` and sends ``{"result": value}`` or ``{"error": ..., "type": ...}``."""
    global _WRITE_FD
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        _WRITE_FD = write_fd
        code = 0
        try:
            send({"result": target(*args)})
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            send({"error": str(exc), "type": type(exc).__name__, "traceback": traceback.format_exc()})
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    return Child(pid, read_fd)


def run(target: Callable[..., Any], *args: Any, timeout: float = CHILD_TIMEOUT_S) -> Any:
    """Run ``target(*args)`` in a forked child and return its result (re-raising its error as RuntimeError)."""
    code, lines = start(target, *args).join(timeout)
    messages = [json.loads(line) for line in lines]
    final = messages[-1] if messages else {}
    if "result" in final:
        return final["result"]
    raise RuntimeError(f"child failed (exit {code}): {final.get('traceback') or final or 'no result'}")
