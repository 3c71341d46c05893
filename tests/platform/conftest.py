"""Platform harnesses for the conformance suite, with leak detection.

Every conformance test takes the ``harness`` fixture, which is parametrised over the
platform harnesses ``inheap`` and ``unix`` (``AIOXEN_TEST_PLATFORMS=inheap`` selects a
subset).  The Xen lab runs the suite on ``xen`` through its own module,
``tests/xenlab/guest/test_conformance.py``.

A harness creates opened platforms (``await harness.platform(domid)``) that share one
"world" (one ``InHeapWorld``, one ``$XEN_ROOT``).  At teardown it

1. records what each platform still has open (``platform.leaks()``) — the test leaked it;
2. closes every platform (which must release everything);
3. checks the world is empty (``harness.world_leaks()``) — the platform's ``close`` leaked;

and fails the test if either list is non-empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from peer_process import PeerProcess
from support.harness import harness  # noqa: F401 - the leak-checked fixture


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[PeerProcess]]]:
    """``await spawn(domid)`` starts ``peer.py`` as ``domid`` under ``tmp_path/"xenroot"``;
    every peer is killed and reaped at teardown."""
    peers: list[PeerProcess] = []

    async def start(domid: int, loop: str = "uvloop") -> PeerProcess:
        p = await PeerProcess.start(tmp_path / "xenroot", domid, loop)
        peers.append(p)
        return p

    yield start
    for p in peers:
        await p.reap()
