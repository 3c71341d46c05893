"""Fixtures for the qrexec tests: data-channel stream pairs over a socketpair and over real
aioxen vchan on ``inheap`` and ``unix`` (one ``aioxen xenstored`` per module).

``channel_pair()`` returns ``(caller, service)`` stream pairs shaped like a qrexec data
channel: the caller side is the vchan server (it listens), the service side connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from platform_harness import leak_checked
from vchan_harness import InHeapWorld, UnixWorld, World, Xenstored

from aioxen.qrexec.channels import VchanChannels

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
PairFactory = Callable[..., Awaitable[tuple[Streams, Streams]]]

_ports = itertools.count(700)


@pytest.fixture(scope="module")
def qrexec_xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    server = Xenstored(tmp_path_factory.mktemp("qrexec") / "root")
    yield server
    assert server.alive(), "xenstored died during the tests"
    assert server.stop() == 0


@pytest.fixture(params=["socketpair", "inheap", "unix"])
async def channel_pair(request: pytest.FixtureRequest) -> AsyncIterator[PairFactory]:
    """A factory of connected ``(caller_streams, service_streams)``; every writer is
    closed at the end and (on vchan) leaks fail the test."""
    writers: list[asyncio.StreamWriter] = []

    async def done() -> None:
        for w in writers:
            w.transport.abort()
        for w in writers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await w.wait_closed()

    if request.param == "socketpair":

        async def make_sock(buffer_size: int = 65536) -> tuple[Streams, Streams]:
            a, b = socket.socketpair()
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
            ca = await asyncio.open_connection(sock=a)
            sv = await asyncio.open_connection(sock=b)
            writers.extend([ca[1], sv[1]])
            return ca, sv

        yield make_sock
        await done()
        return

    world: World = (
        InHeapWorld()
        if request.param == "inheap"
        else UnixWorld(request.getfixturevalue("qrexec_xenstored"))
    )
    async with leak_checked(world):
        caller_side = VchanChannels(await world.platform(0))
        service_side = VchanChannels(await world.platform(5))

        async def make_vchan(buffer_size: int = 65536) -> tuple[Streams, Streams]:
            port = next(_ports)
            pending = await caller_side.listen(5, port, buffer_size=buffer_size)
            sv = await service_side.connect(0, port)
            ca = await pending.accept(timeout=30)
            writers.extend([ca[1], sv[1]])
            return ca, sv

        yield make_vchan
        await done()
