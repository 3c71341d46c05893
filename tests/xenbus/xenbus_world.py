"""Shared fixtures of the xenbus and device tests: a ``World`` of platforms on inheap (in-process
XenStore engine) or unix (a real ``aioxen xenstored`` process per module), fresh domids
per test, leak checks at the end."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.xenstored import XenstoredProcess

from aioxen.platforms.base import Platform

_ids = itertools.count(1)


@dataclass
class World:
    """``await world.platform(domid)`` opens a platform playing ``domid``; ``dom(n)`` is a
    fresh domid for this test (the unix xenstored is shared by the module)."""

    kind: str
    make: Callable[[int], Platform]
    domid_base: int
    root: Path | None = None
    xenstored: XenstoredProcess | None = None
    platforms: list[Platform] = field(default_factory=list)

    async def platform(self, domid: int) -> Platform:
        p = self.make(domid)
        await p.open()
        p.store.timeout = 10
        self.platforms.append(p)
        return p

    def dom(self, n: int) -> int:
        return self.domid_base + n


@pytest.fixture(scope="module")
def xenstored_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenstoredProcess]:
    server = XenstoredProcess(tmp_path_factory.mktemp("xenbus") / "root")
    yield server
    assert server.alive(), "xenstored died during the tests"
    assert server.stop() == 0


@pytest.fixture(params=["inheap", "unix"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    n = next(_ids)
    w: World
    if request.param == "inheap":
        from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld

        hv = InHeapWorld()
        w = World("inheap", lambda d: InHeapPlatform(domid=d, world=hv), 10 + 10 * n)
    else:
        from aioxen.platforms.unix import UnixPlatform

        server: XenstoredProcess = request.getfixturevalue("xenstored_proc")
        root = server.root

        def make(d: int) -> Platform:
            return UnixPlatform(domid=d, root=str(root), xenstored_path=server.socket)

        w = World("unix", make, 10 + 10 * n, root=root, xenstored=server)
    yield w
    leaks = [f"{p!r}: {leak}" for p in w.platforms for leak in p.leaks()]  # type: ignore[attr-defined]
    for p in w.platforms:
        await p.close()
    assert not leaks, "test left open:\n  " + "\n  ".join(leaks)


async def eventually(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    """Poll ``cond`` until it holds (a hang guard for multi-party protocols: the timeout
    only bounds a failure, it is not a timing assumption)."""
    try:
        async with asyncio.timeout(timeout):
            while not await cond():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None
