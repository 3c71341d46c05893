"""VchanChannels: listen/accept/connect on inheap and unix (the data-channel shape)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from platform_harness import leak_checked
from vchan_harness import InHeapWorld, UnixWorld, World, Xenstored

from aioxen.qrexec.channels import ChannelFactory, VchanChannels


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = Xenstored(tmp_path_factory.mktemp("qrx") / "root")
    yield server
    assert server.stop() == 0


@pytest.fixture(params=["inheap", "unix"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    w: World = (
        InHeapWorld()
        if request.param == "inheap"
        else UnixWorld(request.getfixturevalue("xenstored"))
    )
    async with leak_checked(w):
        yield w


async def test_listen_then_connect_then_accept(world: World) -> None:
    a = VchanChannels(await world.platform(0))
    b = VchanChannels(await world.platform(3))
    assert isinstance(a, ChannelFactory)
    pending = await a.listen(3, 513, buffer_size=4096)
    r2, w2 = await b.connect(0, 513)
    r1, w1 = await pending.accept(timeout=30)
    w2.write(b"ping")
    assert await r1.readexactly(4) == b"ping"
    w1.write(b"pong")
    w1.write_eof()
    assert await r2.read() == b"pong"
    for w in (w1, w2):
        w.close()
    await asyncio.gather(w1.wait_closed(), w2.wait_closed(), return_exceptions=True)


async def test_accept_times_out_naming_the_port(world: World) -> None:
    a = VchanChannels(await world.platform(0))
    pending = await a.listen(4, 600, buffer_size=4096)
    with pytest.raises(TimeoutError, match="600"):
        await pending.accept(timeout=0.05)
