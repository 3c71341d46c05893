"""``aioxen.bridge`` in one process: real TCP and Unix sockets, vchans on an inheap world.

Every async test runs on asyncio's loop and on uvloop.  After each test every platform
must have released everything (no bound port, no share, no mapping left).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from aioxen import bridge, vchan
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld

SERVICE, CLIENT = 0, 2
KiB, MiB = 1024, 1024 * 1024

MakePlatform = Callable[[int], Awaitable[InHeapPlatform]]


@pytest.fixture
async def world() -> AsyncIterator[MakePlatform]:
    w = InHeapWorld()
    plats: list[InHeapPlatform] = []

    async def make(domid: int) -> InHeapPlatform:
        p = InHeapPlatform(domid=domid, world=w)
        await p.open()
        plats.append(p)
        return p

    yield make
    async with asyncio.timeout(10):  # transports release their pages on the next turns
        while any(p.leaks() for p in plats):
            await asyncio.sleep(0.01)
    for p in plats:
        await p.close()
    assert w.leaks() == []


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(64 * KiB):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    finally:
        writer.close()


async def digest_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers only after the end of its input: ``<sha256 hex> <length>``."""
    h = hashlib.sha256()
    n = 0
    while data := await reader.read(64 * KiB):
        h.update(data)
        n += len(data)
    writer.write(f"{h.hexdigest()} {n}".encode())
    await writer.drain()
    writer.close()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    """Send ``data`` then EOF while reading everything that comes back."""

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    _, got = await asyncio.gather(send(), reader.read())
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return got


async def test_tcp_clients_reach_a_vchan_service_many_at_once(world: MakePlatform) -> None:
    p0, p2 = await world(SERVICE), await world(CLIENT)
    service = await vchan.start_server(echo, CLIENT, "echo", platform=p0)
    async with service:
        b = await bridge.start_bridge("tcp:127.0.0.1:0", "vchan:0/echo", platform=p2)
        async with b:
            addr = b.listen_address
            assert isinstance(addr, bridge.TcpAddress) and addr.port != 0

            async def one(i: int) -> None:
                data = os.urandom(300 * KiB + i)
                r, w = await asyncio.open_connection(addr.host, addr.port)
                assert await exchange(r, w, data) == data

            await asyncio.gather(*(one(i) for i in range(16)))
            assert b.accepted == 16
        assert b.active == 0
        assert service.accepted == 16


async def test_vchan_clients_reach_a_tcp_service_with_half_close(world: MakePlatform) -> None:
    """The TCP service answers only after EOF: the vchan EOF bit must become a TCP FIN,
    and the answer must come back through the still-open other direction."""
    p0, p2 = await world(SERVICE), await world(CLIENT)
    tcp = await asyncio.start_server(digest_service, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    async with tcp:
        b = await bridge.start_bridge(
            bridge.VchanAddress(CLIENT, "svc"), f"tcp:127.0.0.1:{port}", platform=p0
        )
        async with b:

            async def one(i: int) -> None:
                data = os.urandom(MiB + 17 * i)
                r, w = await vchan.open_connection(SERVICE, "svc", platform=p2, timeout=10)
                answer = await exchange(r, w, data)
                assert answer.decode() == f"{hashlib.sha256(data).hexdigest()} {len(data)}"

            await asyncio.gather(*(one(i) for i in range(6)))
        assert b.active == 0


async def test_unix_socket_listener(world: MakePlatform, tmp_path: Path) -> None:
    p0, p2 = await world(SERVICE), await world(CLIENT)
    path = tmp_path / "bridge.sock"
    service = await vchan.start_server(echo, CLIENT, "echo", platform=p0)
    async with service:
        b = await bridge.start_bridge(f"unix:{path}", "vchan:0/echo", platform=p2)
        async with b:
            assert str(b.listen_address) == f"unix:{path}"
            data = os.urandom(2 * MiB)
            r, w = await asyncio.open_unix_connection(str(path))
            assert await exchange(r, w, data) == data
        assert not path.exists(), "the socket file was left behind"


async def test_back_pressure_reaches_the_sender(world: MakePlatform) -> None:
    """A vchan service that does not read: the bridge must stop reading the TCP client
    (so the client's own buffers fill and its drain() blocks) while holding no more than
    one write buffer plus one read chunk -- and then deliver every byte intact."""
    p0, p2 = await world(SERVICE), await world(CLIENT)
    go = asyncio.Event()

    async def slow_digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        await digest_service(reader, writer)

    total = 32 * MiB
    chunk = 64 * KiB
    service = await vchan.start_server(slow_digest, CLIENT, "slow", platform=p0)
    async with service:
        b = await bridge.start_bridge("tcp:127.0.0.1:0", "vchan:0/slow", platform=p2)
        async with b:
            addr = b.listen_address
            assert isinstance(addr, bridge.TcpAddress)
            r, w = await asyncio.open_connection(addr.host, addr.port)
            sent = hashlib.sha256()

            async def send() -> None:
                for i in range(total // chunk):
                    data = i.to_bytes(8, "little") * (chunk // 8)
                    sent.update(data)
                    w.write(data)
                    await w.drain()
                w.write_eof()

            sender = asyncio.ensure_future(send())
            high = w.transport.get_write_buffer_limits()[1]

            def stalled() -> bool:
                """The client is paused and the connected bridge stopped reading it."""
                infos = b.connections()
                return (
                    w.transport.get_write_buffer_size() > high
                    and len(infos) == 1
                    and infos[0].reading == (False, True)
                )

            async with asyncio.timeout(30):  # hang guard: fails if back-pressure is broken
                while not stalled():
                    await asyncio.sleep(0.01)
                    assert not sender.done()
            (info,) = b.connections()
            # all the bridge took in: the service's ring (64 KiB) and stream buffer (2 x 64
            # KiB), the bridge's own write buffer and at most one read chunk (256 KiB)
            assert info.queued <= 64 * KiB + 256 * KiB
            assert info.bytes_in <= 3 * 64 * KiB + info.queued + 256 * KiB
            go.set()
            answer = await r.read()
            await sender
            assert answer.decode() == f"{sent.hexdigest()} {total}"
            w.close()


async def test_close_ends_every_bridged_connection(world: MakePlatform) -> None:
    p0, p2 = await world(SERVICE), await world(CLIENT)
    service_saw_eof = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal service_saw_eof
        writer.write(b"hello")
        await reader.read()  # until the bridge closes us
        service_saw_eof += 1
        writer.close()

    service = await vchan.start_server(hold, CLIENT, "hold", platform=p0)
    async with service:
        b = await bridge.start_bridge("tcp:127.0.0.1:0", "vchan:0/hold", platform=p2)
        addr = b.listen_address
        assert isinstance(addr, bridge.TcpAddress)
        clients = [await asyncio.open_connection(addr.host, addr.port) for _ in range(6)]
        for r, _ in clients:
            assert await r.readexactly(5) == b"hello"
        assert b.active == 6
        await b.aclose()
        assert b.active == 0
        for r, w in clients:
            assert await r.read() == b""  # a clean end, not a reset
            w.close()
        async with asyncio.timeout(10):
            while service_saw_eof < 6:
                await asyncio.sleep(0.01)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(addr.host, addr.port)


async def test_unreachable_target_drops_the_client(world: MakePlatform) -> None:
    p2 = await world(CLIENT)
    b = await bridge.start_bridge(
        "tcp:127.0.0.1:0", "vchan:0/nobody", platform=p2, connect_timeout=0.2
    )
    async with b:
        addr = b.listen_address
        assert isinstance(addr, bridge.TcpAddress)
        r, w = await asyncio.open_connection(addr.host, addr.port)
        w.write(b"anyone there?")
        # the bridge aborts the accepted connection: a reset, or an end without data
        with contextlib.suppress(ConnectionResetError):
            assert await r.read() == b""
        w.close()
        async with asyncio.timeout(10):
            while b.active:
                await asyncio.sleep(0.01)


def test_addresses_parse_and_print() -> None:
    cases = {
        "tcp:127.0.0.1:8080": bridge.TcpAddress("127.0.0.1", 8080),
        "tcp:[::1]:80": bridge.TcpAddress("::1", 80),
        "tcp:localhost:0": bridge.TcpAddress("localhost", 0),
        "unix:/run/x.sock": bridge.UnixAddress("/run/x.sock"),
        "unix:relative/p": bridge.UnixAddress("relative/p"),
        "vchan:0/web": bridge.VchanAddress(0, "web"),
        "vchan:12/a_b-C9": bridge.VchanAddress(12, "a_b-C9"),
    }
    for text, addr in cases.items():
        assert bridge.parse_address(text) == addr
        assert bridge.parse_address(str(addr)) == addr
    for bad, why in {
        "8080": "expected",
        "udp:1.2.3.4:5": "unknown scheme",
        "tcp:1.2.3.4": "expected tcp:HOST:PORT",
        "tcp:host:http": "not a number",
        "tcp:host:70000": "out of range",
        "unix:": "expected unix:PATH",
        "vchan:0": "expected vchan:DOMID/PORT",
        "vchan:x/web": "not a number",
        "vchan:0/bad/port": "invalid vchan port",
        "vchan:0/": "invalid vchan port",
        "vchan:99999/web": "out of range",
    }.items():
        with pytest.raises(ValueError, match=why):
            bridge.parse_address(bad)


async def test_target_speaks_first_and_early_client_data_keeps_order(world: MakePlatform) -> None:
    """A TCP service that greets on connect, and a vchan client that writes before the
    bridge has connected: both byte streams arrive whole and in order."""
    p0, p2 = await world(SERVICE), await world(CLIENT)

    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\n")
        while data := await reader.read(64 * KiB):
            writer.write(data)
            await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(greeter, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    async with tcp:
        b = await bridge.start_bridge("vchan:2/greet", f"tcp:127.0.0.1:{port}", platform=p0)
        async with b:
            data = os.urandom(MiB)
            r, w = await vchan.open_connection(SERVICE, "greet", platform=p2, timeout=10)
            assert await exchange(r, w, data) == b"220 hello\n" + data


async def test_client_that_leaves_before_the_target_is_up_still_delivers(
    world: MakePlatform,
) -> None:
    """A libxenvchan-style client writes and closes at once (no EOF bit, just gone): what
    it wrote still reaches the TCP service."""
    p0, p2 = await world(SERVICE), await world(CLIENT)
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())
        writer.close()

    tcp = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    async with tcp:
        b = await bridge.start_bridge("vchan:2/drop", f"tcp:127.0.0.1:{port}", platform=p0)
        async with b:
            data = os.urandom(16 * KiB)
            _, w = await vchan.open_connection(SERVICE, "drop", platform=p2, timeout=10)
            w.write(data)
            w.close()
            async with asyncio.timeout(10):
                assert await received == data


async def test_max_connections_closes_the_one_too_many_and_keeps_serving(
    world: MakePlatform,
) -> None:
    """With ``max_connections=2`` a third connection is closed as soon as it is accepted
    (EOF for its client, counted in ``refused``) while the two open ones keep working;
    once one of them ends, a new connection is bridged again."""
    p0, p2 = await world(SERVICE), await world(CLIENT)
    service = await vchan.start_server(echo, CLIENT, "echo", platform=p0)
    async with service:
        b = await bridge.start_bridge(
            "tcp:127.0.0.1:0", "vchan:0/echo", platform=p2, max_connections=2
        )
        async with b:
            addr = b.listen_address
            assert isinstance(addr, bridge.TcpAddress)

            async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                r, w = await asyncio.open_connection(addr.host, addr.port)
                w.write(b"ping\n")
                assert await asyncio.wait_for(r.readline(), 30) == b"ping\n"  # bridged
                return r, w

            first, second = await opened(), await opened()
            for _ in range(3):  # each one too many: closed at once, nothing bridged
                r, w = await asyncio.open_connection(addr.host, addr.port)
                with contextlib.suppress(ConnectionError):
                    w.write(b"ping\n")
                    assert await asyncio.wait_for(r.read(), 30) == b""
                w.close()
            assert (b.accepted, b.refused, b.active) == (2, 3, 2)
            assert service.accepted == 2
            assert await exchange(*second, b"bye") == b"bye"  # still bridged
            async with asyncio.timeout(30):
                while b.active > 1:
                    await asyncio.sleep(0.01)
            third = await opened()  # room again
            assert b.accepted == 3
            for _r, w in (first, third):
                w.close()
        assert b.active == 0


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        bridge.Bridge("tcp:127.0.0.1:0", "tcp:127.0.0.1:9", max_connections=0)
