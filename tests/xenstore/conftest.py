"""Fixtures for the XenStore tests: in-process engines and a real ``aioxen xenstored``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aioxen.xenstore import XenStoreClient
from aioxen.xenstore.engine import Engine, Quotas

ClientFactory = Callable[[int], XenStoreClient]


@dataclass
class Xenstored:
    """A running ``aioxen xenstored`` process."""

    root: Path
    socket: str
    proc: subprocess.Popen[bytes]
    args: list[str]

    def env(self) -> dict[str, str]:
        return {**os.environ, "XENSTORED_PATH": self.socket, "XEN_ROOT": str(self.root)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_xenstored(root: Path, *extra: str) -> Xenstored:
    """Start ``aioxen xenstored --root ROOT`` and wait for its export lines."""
    args = [sys.executable, "-m", "aioxen", "xenstored", "--root", str(root), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line1 = proc.stdout.readline().decode()
    line2 = proc.stdout.readline().decode()
    assert line1 == f"XEN_ROOT={root}; export XEN_ROOT;\n", (line1, proc.poll())
    assert line2.startswith("XENSTORED_PATH=") and line2.endswith("; export XENSTORED_PATH;\n")
    sock = line2[len("XENSTORED_PATH=") : -len("; export XENSTORED_PATH;\n")]
    assert sock == str(root / "xenstored" / "socket")
    return Xenstored(root, sock, proc, args)


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    """One real xenstored process per test module (tests use distinct paths)."""
    server = start_xenstored(tmp_path_factory.mktemp("xs") / "root")
    yield server
    assert server.alive(), "xenstored died during the tests"
    assert server.stop() == 0


@pytest.fixture
async def unix_clients(xenstored: Xenstored) -> AsyncIterator[ClientFactory]:
    """``make(domid)`` -> a socket client of the module's xenstored, closed after the test."""
    made: list[XenStoreClient] = []

    def make(domid: int = 0) -> XenStoreClient:
        c = XenStoreClient.for_unix_socket(xenstored.socket, domid, timeout=10)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture
def engine() -> Engine:
    return Engine(Quotas())


@pytest.fixture
async def inproc(engine: Engine) -> AsyncIterator[ClientFactory]:
    """``make(domid)`` -> an in-process client of ``engine``."""
    made: list[XenStoreClient] = []

    def make(domid: int = 0) -> XenStoreClient:
        c = XenStoreClient.in_process(engine, domid, timeout=10)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()
