"""A stderr nobody reads, for tests of services that must not block on it.

[`small_pipe`][] makes the smallest pipe the kernel allows (4 KiB), so a bounded flood of
log lines fills it; [`leftover`][] reads, without blocking, what a finished test's pipe
still holds and closes it.
"""

from __future__ import annotations

import fcntl
import os

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def small_pipe(size: int = 4096) -> tuple[int, int]:
    """``(read_fd, write_fd)`` of a new pipe holding at most ``size`` bytes."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w


def leftover(r: int) -> bytes:
    """Everything the pipe's read end ``r`` holds now (no waiting); closes ``r``."""
    os.set_blocking(r, False)
    out = b""
    try:
        while chunk := os.read(r, 65536):
            out += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(r)
    return out
