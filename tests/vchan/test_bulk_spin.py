"""Bulk spin-waits: bounded, never trusted, and notifications still work after them.

A bulk writer that finds the ring full, or a reader that emptied it in the middle of a bulk
delivery, spins briefly on the ring's indices (``ax_vchan_spin``,
[`SpinPolicy`][aioxen.pollpolicy.SpinPolicy]) before asking the peer for a
notification.  The spin only decides when to look again: what it saw is re-read and
validated by the ordinary step/send path, so a peer scribbling on the page still gets
``ProtocolError``, and a peer that never moves costs at most one bounded spin.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from typing import Any

import pytest
from vchan_harness import World

from aioxen import ProtocolError, vchan
from aioxen.native import ffi, lib
from aioxen.vchan import transport as transport_module
from aioxen.vchan import wire
from aioxen.vchan.endpoint import Connection, PendingServer, attach_client
from aioxen.vchan.transport import VchanTransport

SERVER, CLIENT = 1, 2
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def cpu_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spinning is gated on a calm machine (load average <= CPUs); these tests are about
    what spinning does, so they spin whatever the load."""
    monkeypatch.setattr(transport_module, "_cpu_to_spare", lambda: True)


async def raw_pair(world: World, read_size: int, write_size: int) -> tuple[Connection, Connection]:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(
        srv, CLIENT, "evil", read_size=read_size, write_size=write_size, initial_index=2**32 - 9
    )
    client = await attach_client(cli, SERVER, "evil", pending.ring_ref, pending.event_channel)
    server = await pending.wait_connected(timeout=5)
    return server, client


def ctrl_of(conn: Connection) -> memoryview:
    return conn._views[0]


def test_native_spin_times_out_on_a_stuck_ring_and_stops_on_any_change() -> None:
    page = bytearray(4096)
    p = ffi.from_buffer(page)
    struct.pack_into("<II", page, 0, 2**32 - 5, 2**32 - 5)  # cons, prod: empty, near wrap
    t0 = time.monotonic()
    assert lib.ax_vchan_spin(p, 0, 4, 0, 2_000_000) == -1  # 2 ms: nothing moved
    assert time.monotonic() - t0 < 10  # bounded (generous: the machine may be busy)
    # a full ring of 4096 bytes: the writer's wait
    struct.pack_into("<II", page, 0, 2**32 - 5, (2**32 - 5 + 4096) & 0xFFFFFFFF)
    assert lib.ax_vchan_spin(p, 0, 4, 4096, 1_000_000) == -1
    # garbage indices (prod - cons far beyond the ring): the spin just stops looking...
    struct.pack_into("<II", page, 0, 7, 0xDEADBEEF)
    r = lib.ax_vchan_spin(p, 0, 4, 0, 10**9)
    assert r >= 0 and r & 0xFFFFFF < 10**9
    # ...and nothing is trusted: the validated read path rejects the page
    assert lib.ax_bring_used(p, 0, 4, 4096) == -1


async def bulk_then(evil: Any, n: int) -> None:
    """The attacker writes ``n`` bytes honestly, in ring-sized pieces, with events."""
    data = bytes(range(256)) * (n // 256)
    while data:
        put = evil.core.send(data, len(data))
        if put:
            data = data[put:]
            evil.channel.notify()
        await asyncio.sleep(0)


class Sink(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(1 << 16)
        self.got = 0
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.parametrize("victim", ["server", "client"])
async def test_spinning_reader_still_fails_on_a_scribbled_page(world: World, victim: str) -> None:
    server, client = await raw_pair(world, 4096, 4096)
    good, evil = (server, client) if victim == "server" else (client, server)
    loop = asyncio.get_running_loop()
    sink = Sink()
    transport = VchanTransport(loop, good, sink, busy_poll=vchan.MAX_BUSY_POLL)
    await bulk_then(evil, 3 * 4096 + 4096)  # bulk: the reader spins when it empties the ring
    async with asyncio.timeout(30):
        while sink.got < 4 * 4096:
            await asyncio.sleep(0)
    assert transport._spin.score < 1.0  # it spun (in one process the writer cannot move)
    prod_off = wire.LEFT_PROD if victim == "server" else wire.RIGHT_PROD
    ctrl = ctrl_of(evil)
    (prod,) = struct.unpack_from("<I", ctrl, prod_off)
    struct.pack_into("<I", ctrl, prod_off, (prod + 4096 + 1) & 0xFFFFFFFF)
    evil.channel.notify()
    async with asyncio.timeout(30):
        exc = await sink.lost
    assert isinstance(exc, ProtocolError) and exc.field is not None and "prod" in exc.field
    await asyncio.sleep(0)
    assert good.released
    evil.release()


@pytest.mark.parametrize("victim", ["server", "client"])
async def test_spinning_writer_still_fails_on_a_scribbled_page(world: World, victim: str) -> None:
    server, client = await raw_pair(world, 4096, 4096)
    good, evil = (server, client) if victim == "server" else (client, server)
    loop = asyncio.get_running_loop()
    sink = Sink()
    transport = VchanTransport(loop, good, sink, busy_poll=vchan.MAX_BUSY_POLL)
    await asyncio.sleep(0)
    transport.write(bytes(5 * 4096))  # fills the ring, spins (nobody reads), then arms
    assert transport.get_write_buffer_size() > 0
    assert transport._spin.score < 1.0
    cons_off = wire.RIGHT_CONS if victim == "server" else wire.LEFT_CONS
    ctrl = ctrl_of(evil)
    (cons,) = struct.unpack_from("<I", ctrl, cons_off)
    struct.pack_into("<I", ctrl, cons_off, (cons - 1) & 0xFFFFFFFF)  # more than the ring in use
    evil.channel.notify()
    async with asyncio.timeout(30):
        exc = await sink.lost
    assert isinstance(exc, ProtocolError) and exc.field is not None and "prod" in exc.field
    await asyncio.sleep(0)
    assert good.released
    evil.release()


@pytest.mark.parametrize("api", ["streams", "protocol"])
async def test_bulk_through_small_rings_with_spinning_is_intact(world: World, api: str) -> None:
    """Spins that find nothing (the peer shares our thread here) fall back to the notify
    protocol; every byte arrives, in order, both ways, and the spinning is paused."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    rng = random.Random(18)
    blob = rng.randbytes(600_000)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await vchan.start_server(
        echo,
        CLIENT,
        "spin",
        platform=srv,
        read_size=4096,
        write_size=1024,
        initial_index=2**32 - 3000,
        busy_poll=vchan.MAX_BUSY_POLL,
    )
    async with server:
        if api == "streams":
            r, w = await vchan.open_connection(
                SERVER, "spin", platform=cli, busy_poll=vchan.MAX_BUSY_POLL
            )

            async def send() -> None:
                i = 0
                while i < len(blob):
                    n = rng.randint(20_000, 70_000)
                    w.write(blob[i : i + n])
                    i += n
                    await w.drain()
                w.write_eof()

            task = asyncio.ensure_future(send())
            got = await r.read()
            await task
            transport: Any = w.transport
            w.close()
        else:
            got_buf = bytearray()
            done = asyncio.get_running_loop().create_future()

            class Proto(asyncio.Protocol):
                def data_received(self, data: bytes) -> None:
                    got_buf.extend(data)
                    if len(got_buf) == len(blob) and not done.done():
                        done.set_result(None)

            transport, _ = await vchan.create_connection(
                Proto, SERVER, "spin", platform=cli, busy_poll=vchan.MAX_BUSY_POLL
            )
            transport.write(blob)  # one big write: flushed as the ring drains
            async with asyncio.timeout(60):
                await done
            got = bytes(got_buf)
            transport.close()
        assert got == blob
        assert transport._spin.score < 1.0  # spins were tried, and failed here


@pytest.mark.parametrize("reader", ["stream", "buffered"])
async def test_only_a_buffered_reader_spins_for_bulk(
    world: World, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``StreamReader`` (``data_received``) never spin-waits on an emptied read ring: a
    spinning reader takes each small write as it lands instead of the ring's worth that
    piles up while it sleeps (streams bulk at 4/16 KiB writes ran at about half speed).
    A BufferedProtocol reader does spin in bulk.  Either way every byte arrives."""
    reads: list[int] = []
    real = wire.VchanCore.spin_readable

    def counting(self: wire.VchanCore, max_ns: int) -> int:
        reads.append(max_ns)
        return real(self, max_ns)

    monkeypatch.setattr(wire.VchanCore, "spin_readable", counting)
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    blob = random.Random(7).randbytes(300_000)
    got = bytearray()
    done = asyncio.get_running_loop().create_future()

    def arrived(n: int) -> None:
        if len(got) >= len(blob) and not done.done():
            done.set_result(None)

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(1 << 16)

        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(self.buf)

        def buffer_updated(self, nbytes: int) -> None:
            got.extend(self.buf[:nbytes])
            arrived(nbytes)

    async def on_stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            got.extend(data)
            arrived(len(data))
        w.close()

    opts: dict[str, Any] = dict(read_size=4096, write_size=4096, busy_poll=vchan.MAX_BUSY_POLL)
    if reader == "stream":
        server: Any = await vchan.start_server(on_stream, CLIENT, "rspin", platform=srv, **opts)
    else:
        server = await vchan.create_server(Buffered, CLIENT, "rspin", platform=srv, **opts)
    async with server:
        _, w = await vchan.open_connection(
            SERVER, "rspin", platform=cli, busy_poll=vchan.MAX_BUSY_POLL
        )
        for i in range(0, len(blob), 4096):
            w.write(blob[i : i + 4096])
            await w.drain()
        async with asyncio.timeout(60):
            await done
        w.close()
    assert bytes(got) == blob
    if reader == "stream":
        assert reads == []
    else:
        assert reads, "a buffered reader emptying the ring mid-bulk spins first"


async def test_stream_reader_looks_again_unarmed_after_bulk_and_then_arms(world: World) -> None:
    """A ``StreamReader`` that took bulk does not ask the writer for a notification when it
    empties the ring: it looks again, unarmed, in the next loop iteration (after its
    consumer ran) -- bytes a writer adds meanwhile arrive without any event.  When that
    look finds nothing it arms and re-checks, so a writer that notifies later is heard."""
    server, client = await raw_pair(world, 4096, 4096)
    evil = server  # writes by hand, notifying only when the test says
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport = VchanTransport(loop, client, asyncio.StreamReaderProtocol(reader))
    ctrl = ctrl_of(evil)

    def armed() -> bool:  # the reader asked the writer to notify it after a write
        return bool(ctrl[wire.SRV_NOTIFY] & wire.NOTIFY_WRITE)

    async def until(cond: Any) -> None:
        for _ in range(1000):
            if cond():
                return
            await asyncio.sleep(0)
        raise AssertionError("condition not reached within 1,000 loop iterations")

    await asyncio.sleep(0)
    blob = random.Random(5).randbytes(3 * 4096)
    assert evil.core.send(blob, 4096) == 4096  # a ring's worth: bulk
    evil.channel.notify()
    await until(lambda: len(reader._buffer) >= 4096)  # type: ignore[attr-defined]
    assert not armed(), "emptied after bulk: no notification asked for yet"
    # the writer refills the ring without an event: the reader's second look takes it
    assert evil.core.send(blob[4096:], 4096) == 4096
    await until(lambda: len(reader._buffer) >= 8192)  # type: ignore[attr-defined]
    # nothing more comes: the look finds the ring empty, arms, re-checks
    await until(armed)
    assert evil.core.send(blob[8192:], 4096) == 4096
    evil.channel.notify()
    async with asyncio.timeout(30):
        got = await reader.readexactly(3 * 4096)
    assert got == blob
    transport.abort()
    await asyncio.sleep(0)
    evil.release()
