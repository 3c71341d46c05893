"""Busy polling: data intact with it on and off, windows bounded, notifications after.

Polling replaces notifications only while a window is open; every test here checks that
bytes, EOF and close still arrive exactly as without it, that a window ends by itself and
never holds the event loop, and that the transport falls back to the notify protocol.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import pytest
from vchan_harness import World, echo

from aioxen import vchan
from aioxen.vchan import wire
from aioxen.vchan.transport import (
    BUSY_POLL_ENV,
    CONTENDED_GAP,
    POLL_MAX_MESSAGE,
    check_busy_poll,
)

SERVER, CLIENT = 1, 2
pytestmark = pytest.mark.timeout(60)

POLL_SETTINGS = [0.0, vchan.DEFAULT_BUSY_POLL, vchan.MAX_BUSY_POLL]


@pytest.mark.parametrize("busy_poll", POLL_SETTINGS)
async def test_streams_echo_intact_near_wrap(world: World, busy_poll: float) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    server = await vchan.start_server(
        echo,
        CLIENT,
        "bp",
        platform=srv,
        read_size=1024,
        write_size=2048,
        initial_index=2**32 - 1500,
        busy_poll=busy_poll,
    )
    rng = random.Random(7)
    blob = rng.randbytes(300_000)
    async with server, vchan.connect(SERVER, "bp", platform=cli, busy_poll=busy_poll) as (r, w):
        assert w.get_extra_info("busy_poll") == busy_poll

        async def send() -> None:
            view = memoryview(blob)
            i = 0
            while i < len(blob):
                n = rng.randint(1, 5000)
                # bytes are queued without a copy, anything else is copied: both kinds
                w.write(blob[i : i + n] if n % 2 else bytearray(view[i : i + n]))
                i += n
                await w.drain()
            w.write_eof()

        sender = asyncio.ensure_future(send())
        got = bytearray()
        while chunk := await r.read(rng.randint(1, 70_000)):
            got += chunk
        await sender
    assert bytes(got) == blob


class Collect(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(3000)
        self.data = bytearray()
        self.transport: Any = None
        self.made: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[: random.randint(1, len(self.buf))]

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return True


@pytest.mark.parametrize("busy_poll", POLL_SETTINGS)
async def test_buffered_protocol_both_ways(world: World, busy_poll: float) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    accepted: asyncio.Future[Collect] = asyncio.get_running_loop().create_future()

    def factory() -> Collect:
        p = Collect()
        accepted.set_result(p)
        return p

    server = await vchan.create_server(
        factory, CLIENT, "bpp", platform=srv, write_size=4096, busy_poll=busy_poll
    )
    async with server:
        transport, client = await vchan.create_connection(
            Collect, SERVER, "bpp", platform=cli, busy_poll=busy_poll
        )
        peer = await accepted
        await peer.made
        up, down = random.randbytes(200_000), random.randbytes(150_000)
        transport.write(up)
        transport.write_eof()
        peer.transport.write(down)
        peer.transport.write_eof()
        await asyncio.gather(client.eof, peer.eof)
        assert (bytes(peer.data), bytes(client.data)) == (up, down)
        transport.close()
        peer.transport.close()


async def test_window_is_bounded_yields_and_falls_back_to_notifications(world: World) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    reply = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        await reply.wait()  # answer only once the client's poll window is over
        writer.write(b"late")
        await writer.drain()
        writer.close()

    server = await vchan.start_server(slow, CLIENT, "win", platform=srv, busy_poll=0)
    async with server:
        reader, writer = await vchan.open_connection(
            SERVER, "win", platform=cli, busy_poll=vchan.MAX_BUSY_POLL
        )
        transport: Any = writer.transport
        polls = 0
        real_poll = transport._poll

        def counting_poll() -> None:
            nonlocal polls
            polls += 1
            real_poll()

        transport._poll = counting_poll  # a spy: the real poll runs every time
        while transport._policy.polling:  # let any window from the connect run out
            await asyncio.sleep(0)
        transport._policy.window = vchan.MAX_BUSY_POLL  # (a loaded machine may have shrunk it)
        writer.write(b"?")
        assert transport._policy.polling
        # Other tasks keep running: at most one poll per event-loop iteration.
        ticks, most = 0, 0
        while transport._policy.polling:
            before = polls
            await asyncio.sleep(0)
            ticks += 1
            most = max(most, polls - before)
        assert polls >= 1 and most <= 2 and ticks >= 1
        # The window ended on its own; the client asked to be notified and re-checked.
        ctrl = transport.connection._views[0]
        assert wire.live_byte(ctrl, wire.SRV_NOTIFY) & wire.NOTIFY_WRITE
        reply.set()
        assert await reader.read() == b"late"  # the server's event wakes the client
        writer.close()
        await writer.wait_closed()


async def test_idle_peer_turns_polling_off(world: World) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)

    async def sluggish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            await asyncio.sleep(0.02)  # far longer than the client's 50 us maximum window
            writer.write(data)
        writer.close()

    server = await vchan.start_server(sluggish, CLIENT, "idle", platform=srv, busy_poll=0)
    async with server, vchan.connect(SERVER, "idle", platform=cli, busy_poll=50e-6) as (r, w):
        transport: Any = w.transport
        for i in range(12):
            w.write(b"%d" % i)
            assert await r.readexactly(len(b"%d" % i)) == b"%d" % i
        # Every reply came long after the window opened: the window halved down to 0.
        assert transport._policy.window == 0
        assert not transport._policy.polling
        w.write(b"still works")
        assert await r.readexactly(11) == b"still works"


async def test_busy_poll_argument(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (-1e-6, 2 * vchan.MAX_BUSY_POLL, float("nan")):
        with pytest.raises(ValueError, match="busy_poll"):
            check_busy_poll(bad)
    for wrong in ("50us", True, [1e-5]):
        with pytest.raises(TypeError, match="busy_poll"):
            check_busy_poll(wrong)  # type: ignore[arg-type]
    assert check_busy_poll(None) == vchan.DEFAULT_BUSY_POLL
    assert check_busy_poll(None, True) == vchan.DEFAULT_BUSY_POLL
    # a peer that cannot run while we poll (inheap: one thread): no polling by default
    assert check_busy_poll(None, False) == 0.0
    assert check_busy_poll(5e-5, False) == 5e-5
    assert check_busy_poll(0) == 0.0
    monkeypatch.setenv(BUSY_POLL_ENV, "0.0002")
    assert check_busy_poll(None) == 0.0002
    assert check_busy_poll(1e-5) == 1e-5  # an explicit value wins
    monkeypatch.setenv(BUSY_POLL_ENV, "soon")
    with pytest.raises(ValueError, match=BUSY_POLL_ENV):
        check_busy_poll(None)
    monkeypatch.delenv(BUSY_POLL_ENV)
    srv = await world.platform(SERVER)
    with pytest.raises(ValueError, match="busy_poll"):
        await vchan.start_server(echo, CLIENT, "arg", platform=srv, busy_poll=1.0)
    cli = await world.platform(CLIENT)
    with pytest.raises(ValueError, match="busy_poll"):
        await vchan.open_connection(SERVER, "arg", platform=cli, busy_poll=-1.0, timeout=1)


async def test_descheduled_poller_stops_polling(world: World) -> None:
    """Polls that run far apart (here: another callback hogs the loop, as a busy CPU
    would) and find nothing end the window at once and halve the next; at 0, polling
    stays off for a while."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    answer = asyncio.Event()

    async def later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        await answer.wait()
        writer.write(b"!")
        writer.close()

    server = await vchan.start_server(later, CLIENT, "hog", platform=srv, busy_poll=0)
    async with server:
        reader, writer = await vchan.open_connection(
            SERVER, "hog", platform=cli, busy_poll=vchan.MAX_BUSY_POLL
        )
        transport: Any = writer.transport
        loop = asyncio.get_running_loop()
        hogging = True

        def hog() -> None:
            t_end = time.perf_counter() + 2 * CONTENDED_GAP
            while time.perf_counter() < t_end and hogging:
                pass  # polls cannot run closer than this: every second one is "late"
            if hogging:
                loop.call_soon(hog)

        while transport._policy.polling:  # let any window from the connect run out
            await asyncio.sleep(0)
        transport._policy.window = vchan.MAX_BUSY_POLL  # (a loaded machine may have shrunk it)
        loop.call_soon(hog)
        windows = []
        for _ in range(40):  # each contended window halves the next; then polling stops
            windows.append(transport._policy.window)
            if not transport._policy.window:
                break
            writer.write(b"?")  # (the server reads one byte and then waits)
            while transport._policy.polling:
                await asyncio.sleep(0)
        hogging = False
        assert windows[0] > 0 and windows[-1] == 0.0
        assert all(b <= a for a, b in itertools.pairwise(windows))
        assert transport._policy.cooldown_until > 0  # the window may not grow again for a while
        answer.set()
        assert await reader.read() == b"!"  # notifications carry on
        writer.close()
        await writer.wait_closed()


async def test_only_messages_open_poll_windows(world: World) -> None:
    """Polling is for request/response traffic: a small write opens a window, a bulk write
    (more than POLL_MAX_MESSAGE bytes) does not, and both arrive intact."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    server = await vchan.start_server(echo, CLIENT, "msg", platform=srv, busy_poll=0)
    async with server:
        reader, writer = await vchan.open_connection(
            SERVER, "msg", platform=cli, busy_poll=vchan.MAX_BUSY_POLL
        )
        transport: Any = writer.transport
        while transport._policy.polling:  # let any window from the connect run out
            await asyncio.sleep(0)
        big = random.randbytes(POLL_MAX_MESSAGE + 1)
        writer.write(big)
        assert not transport._policy.polling
        assert await reader.readexactly(len(big)) == big
        while transport._policy.polling:
            await asyncio.sleep(0)
        transport._policy.window = vchan.MAX_BUSY_POLL  # (the echo may have shrunk it)
        writer.write(b"small")
        assert transport._policy.polling
        assert await reader.readexactly(5) == b"small"
        writer.close()
        await writer.wait_closed()
