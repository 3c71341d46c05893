"""VchanChannels: listen/accept/connect on inheap and unix (the data-channel shape)."""

from __future__ import annotations

import asyncio
import contextlib
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


# -- no advertisement or grant outlives its owner ----------------------------------------
# A qrexec call's data channel is one ``accept_one`` serving in a task.  Whoever owns the
# pending channel gets it released *before* its await returns -- on success, timeout,
# cancellation and close alike -- so a platform closed right afterwards (a test's
# teardown, a program's exit) finds no share still exported (that was a ``BufferError``)
# and the XenStore advertisement is already gone.


async def advertised(world: World, path: str) -> None:
    """Wait until ``path`` is in XenStore (bounded hang guard, no timing assumption)."""
    async with asyncio.timeout(30):
        while True:
            try:
                await world.read_store(f"{path}/event-channel")  # type: ignore[attr-defined]
                return
            except FileNotFoundError:
                await asyncio.sleep(0.001)


async def gone(world: World, path: str) -> None:
    with pytest.raises(FileNotFoundError):
        await world.read_store(path)  # type: ignore[attr-defined]


async def close_now(world: World, plat: object) -> None:
    """Close ``plat`` at once (no loop iteration in between): nothing may be in use."""
    assert plat.leaks() == []  # type: ignore[attr-defined]
    await plat.close()  # type: ignore[attr-defined]


async def test_cancelled_accept_releases_before_it_returns(world: World) -> None:
    plat = await world.platform(0)
    pending = await VchanChannels(plat).listen(6, 601, buffer_size=65536)
    accepting = asyncio.ensure_future(pending.accept(timeout=30))
    await advertised(world, "/local/domain/0/data/vchan/6/601")
    assert not accepting.done()
    accepting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await accepting
    await close_now(world, plat)
    await gone(world, "/local/domain/0/data/vchan/6/601")


async def test_timed_out_accept_releases_before_it_raises(world: World) -> None:
    plat = await world.platform(0)
    pending = await VchanChannels(plat).listen(6, 602, buffer_size=65536)
    with pytest.raises(TimeoutError, match="602"):
        await pending.accept(timeout=0.01)
    await close_now(world, plat)
    await gone(world, "/local/domain/0/data/vchan/6/602")


async def test_aclose_without_accept_releases(world: World) -> None:
    plat = await world.platform(0)
    pending = await VchanChannels(plat).listen(6, 603, buffer_size=65536)
    await advertised(world, "/local/domain/0/data/vchan/6/603")
    await pending.aclose()
    await pending.aclose()  # idempotent
    pending.close()
    await close_now(world, plat)
    await gone(world, "/local/domain/0/data/vchan/6/603")


async def test_cancelled_qrexec_caller_releases_its_data_channel(world: World) -> None:
    """A qrexec call cancelled while it waits for the service to connect (the caller's
    own task, as when a program is stopped): its data channel is gone when the cancel
    has been awaited."""
    from aioxen.qrexec.client import run_call

    plat = await world.platform(0)
    call = asyncio.ensure_future(run_call(VchanChannels(plat), 6, 604, b"input"))
    await advertised(world, "/local/domain/0/data/vchan/6/604")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await close_now(world, plat)
    await gone(world, "/local/domain/0/data/vchan/6/604")


async def test_a_connection_nobody_accepts_is_closed_by_aclose(world: World) -> None:
    """The peer connected, the owner never accepted: ``aclose`` ends that connection
    too (the peer sees it end) and releases it."""
    a = await world.platform(0)
    b = VchanChannels(await world.platform(6))
    pending = await VchanChannels(a).listen(6, 605, buffer_size=4096)
    reader, writer = await b.connect(0, 605)
    await pending.aclose()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(30):
            if not await reader.read(1):  # an EOF is fine too: nothing was written
                raise ConnectionResetError
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    await close_now(world, a)
    await gone(world, "/local/domain/0/data/vchan/6/605")


async def test_accept_cancelled_again_while_releasing_still_releases(world: World) -> None:
    plat = await world.platform(0)
    pending = await VchanChannels(plat).listen(6, 606, buffer_size=65536)
    accepting = asyncio.ensure_future(pending.accept(timeout=30))
    await advertised(world, "/local/domain/0/data/vchan/6/606")
    accepting.cancel()
    for _ in range(3):  # cancelled again while it withdraws and releases
        await asyncio.sleep(0)
        accepting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await accepting
    await close_now(world, plat)
    await gone(world, "/local/domain/0/data/vchan/6/606")


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
async def test_listen_cancelled_midway_releases(world: World, steps: int) -> None:
    """``listen`` cancelled after ``steps`` loop iterations (before or after the
    advertisement is complete): nothing is left either way."""
    plat = await world.platform(0)
    listening = asyncio.ensure_future(VchanChannels(plat).listen(6, 607, buffer_size=4096))
    for _ in range(steps):
        await asyncio.sleep(0)
    listening.cancel()
    try:
        pending = await listening
    except asyncio.CancelledError:
        pass
    else:  # it had finished before the cancellation: its owner closes it
        await pending.aclose()
    await close_now(world, plat)
    await gone(world, "/local/domain/0/data/vchan/6/607")
