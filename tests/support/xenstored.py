"""A real ``aioxen xenstored`` process for tests, started the way a user would start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class XenstoredProcess:
    """``aioxen xenstored --root ROOT``; parses the export lines it prints when ready."""

    def __init__(self, root: Path) -> None:
        self.root = root
        args = [sys.executable, "-m", "aioxen", "xenstored", "--root", str(root)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        exports: dict[str, str] = {}
        for _ in range(2):
            line = self.proc.stdout.readline().decode()
            assignment = line.split(";", 1)[0]
            key, _, value = assignment.partition("=")
            exports[key] = value
        assert set(exports) == {"XEN_ROOT", "XENSTORED_PATH"}, (exports, self.proc.poll())
        assert exports["XEN_ROOT"] == str(root)
        self.socket = exports["XENSTORED_PATH"]

    def env(self, domid: int) -> dict[str, str]:
        """Environment for a child process playing ``domid`` on the unix platform."""
        return {
            **os.environ,
            "XEN_ROOT": str(self.root),
            "XENSTORED_PATH": self.socket,
            "AIOXEN_PLATFORM": "unix",
            "AIOXEN_DOMID": str(domid),
        }

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc
