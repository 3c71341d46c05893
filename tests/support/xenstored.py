"""A real ``aioxen xenstored`` process for tests, started the way a user would start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from aioxen.xenstore import XenStoreClient

ClientFactory = Callable[[int], XenStoreClient]
"""``make(domid)`` -> a XenStore client acting as ``domid`` (closed by the fixture)."""


class Xenstored:
    """``aioxen xenstored --root ROOT [EXTRA...]`` as a running process.

    The constructor starts it and waits for the export lines it prints when ready.
    """

    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.args = [sys.executable, "-m", "aioxen", "xenstored", "--root", str(root), *extra]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line1 = self.proc.stdout.readline().decode()
        line2 = self.proc.stdout.readline().decode()
        assert line1 == f"XEN_ROOT={root}; export XEN_ROOT;\n", (line1, self.proc.poll())
        prefix, suffix = "XENSTORED_PATH=", "; export XENSTORED_PATH;\n"
        assert line2.startswith(prefix) and line2.endswith(suffix), line2
        self.socket = line2[len(prefix) : -len(suffix)]
        assert self.socket == str(root / "xenstored" / "socket")

    def env(self, domid: int | None = None) -> dict[str, str]:
        """Environment for a child process; with ``domid``, one playing that domain on the
        unix platform."""
        env = {**os.environ, "XENSTORED_PATH": self.socket, "XEN_ROOT": str(self.root)}
        if domid is not None:
            env.update(AIOXEN_PLATFORM="unix", AIOXEN_DOMID=str(domid))
        return env

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM and wait: 0 after a clean stop (the command's 143, 128 + SIGTERM, the
        CLI standard's status for it), else the exit status."""
        signalled = self.proc.poll() is None
        if signalled:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return 0 if signalled and rc == 128 + signal.SIGTERM else rc


XenstoredProcess = Xenstored


def start_xenstored(root: Path, *extra: str) -> Xenstored:
    """Start ``aioxen xenstored --root ROOT [EXTRA...]`` (see :class:`Xenstored`)."""
    return Xenstored(root, *extra)
