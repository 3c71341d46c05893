"""Stream API over real platforms (``inheap`` and ``unix``), in one process."""

from __future__ import annotations

import asyncio
import random

import pytest
from vchan_harness import World, echo

from aioxen import vchan
from aioxen.platforms.base import Platform

SERVER, CLIENT = 1, 2
pytestmark = pytest.mark.timeout(60)


async def test_roundtrip_and_eof(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    got: list[bytes] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        got.append(data)
        writer.write(data[::-1])
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await vchan.start_server(handle, CLIENT, "rt", platform=srv_plat)
    async with server:
        async with vchan.connect(SERVER, "rt", platform=cli_plat) as (reader, writer):
            assert writer.can_write_eof()
            writer.write(b"hello vchan")
            writer.write_eof()
            assert await reader.read() == b"nahcv olleh"
        await done.wait()
    assert got == [b"hello vchan"]


@pytest.mark.parametrize(
    ("read_size", "write_size"),
    [(1024, 2048), (2048, 1024), (1024, 65536), (4096, 8192), (1 << 20, 1 << 20)],
)
async def test_random_chunks_all_ring_sizes_near_wrap(
    world: World, read_size: int, write_size: int
) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    server = await vchan.start_server(
        echo,
        CLIENT,
        "sizes",
        platform=srv_plat,
        read_size=read_size,
        write_size=write_size,
        initial_index=2**32 - 3 * max(read_size, write_size) // 2,
    )
    rng = random.Random(read_size * 7 + write_size)
    data = rng.randbytes(3 * max(read_size, write_size) + 12345)
    async with server, vchan.connect(SERVER, "sizes", platform=cli_plat) as (reader, writer):
        assert writer.get_extra_info("read_size") == max(2048, write_size) or write_size <= 2048
        expected = vchan.select_orders(read_size, write_size)
        assert writer.get_extra_info("write_size") == 1 << expected[0]
        assert writer.get_extra_info("read_size") == 1 << expected[1]

        async def send() -> None:
            i = 0
            while i < len(data):
                n = rng.randint(1, 3 * write_size)
                writer.write(data[i : i + n])
                i += n
                if rng.random() < 0.5:
                    await writer.drain()
            writer.write_eof()

        task = asyncio.ensure_future(send())
        echoed = bytearray()
        while chunk := await reader.read(rng.randint(1, 100000)):
            echoed += chunk
        await task
        assert bytes(echoed) == data


async def test_half_close_both_directions(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    server_saw: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_saw.append(await reader.read())  # until the client's write_eof
        assert reader.at_eof()
        # our direction is still open: answer after the client finished
        for i in range(50):
            writer.write(b"%d," % i)
        writer.write_eof()
        with pytest.raises(RuntimeError):
            writer.write(b"late")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await vchan.start_server(handle, CLIENT, "half", platform=srv_plat)
    async with server, vchan.connect(SERVER, "half", platform=cli_plat) as (reader, writer):
        writer.write(b"question")
        writer.write_eof()
        answer = await reader.read()
    assert server_saw == [b"question"]
    assert answer == b"".join(b"%d," % i for i in range(50))


async def test_close_flushes_everything_written(world: World) -> None:
    """close() right after a large write: the peer still reads every byte, then EOF."""
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    blob = random.Random(1).randbytes(900_000)
    received = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)  # let the client queue and close first
        received.set_result(await reader.read())
        writer.close()

    async with await vchan.start_server(handle, CLIENT, "flush", platform=srv_plat, read_size=4096):
        _reader, writer = await vchan.open_connection(SERVER, "flush", platform=cli_plat)
        writer.write(blob)
        assert writer.transport.get_write_buffer_size() > 0
        writer.close()
        await writer.wait_closed()
        assert await received == blob


async def test_successive_and_concurrent_clients(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    server = await vchan.start_server(echo, CLIENT, "many", platform=srv_plat, read_size=1024)

    async def one(i: int) -> None:
        async with vchan.connect(SERVER, "many", platform=cli_plat, timeout=20) as (r, w):
            msg = b"client %d " % i * (i + 1)
            w.write(msg)
            w.write_eof()
            assert await r.read() == msg

    async with server:
        for i in range(5):
            await one(i)
        await asyncio.gather(*(one(i) for i in range(5, 30)))
        assert server.accepted == 30


async def test_server_close_withdraws_advertisement_keeps_connections(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    server = await vchan.start_server(echo, CLIENT, "wd", platform=srv_plat)
    path = vchan.vchan_path(SERVER, CLIENT, "wd")
    assert int(await world.read_store(f"{path}/ring-ref")) > 0  # type: ignore[attr-defined]
    reader, writer = await vchan.open_connection(SERVER, "wd", platform=cli_plat)
    writer.write(b"1")
    assert await reader.readexactly(1) == b"1"  # the server has accepted us
    server.close()
    await server.wait_closed()
    assert not server.is_serving()
    with pytest.raises(FileNotFoundError):
        await world.read_store(f"{path}/ring-ref")  # type: ignore[attr-defined]
    writer.write(b"still here")
    assert await reader.readexactly(10) == b"still here"
    with pytest.raises(TimeoutError, match="no vchan server"):
        await vchan.open_connection(SERVER, "wd", platform=cli_plat, timeout=0.3)
    writer.close()
    await writer.wait_closed()


async def test_close_clients(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    server = await vchan.start_server(echo, CLIENT, "cc", platform=srv_plat)
    conns = [await vchan.open_connection(SERVER, "cc", platform=cli_plat) for _ in range(3)]
    for reader, writer in conns:  # make sure the server has accepted each one
        writer.write(b"?")
        assert await reader.readexactly(1) == b"?"
    server.close_clients()
    for reader, writer in conns:
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_serve_forever_and_cancel(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    server = await vchan.start_server(echo, CLIENT, "sf", platform=srv_plat, start_serving=False)
    assert not server.is_serving()
    task = asyncio.ensure_future(server.serve_forever())
    async with vchan.connect(SERVER, "sf", platform=cli_plat) as (reader, writer):
        assert server.is_serving()
        with pytest.raises(RuntimeError):
            await server.serve_forever()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.is_serving()


async def test_connect_timeout_names_path(world: World) -> None:
    cli_plat = await world.platform(CLIENT)
    with pytest.raises(TimeoutError, match=r"/local/domain/1/data/vchan/2/nobody"):
        await vchan.open_connection(SERVER, "nobody", platform=cli_plat, timeout=0.2)


async def test_cancelled_connect_and_accept_leave_nothing(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    task = asyncio.ensure_future(vchan.open_connection(SERVER, "cx", platform=cli_plat))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    acc = asyncio.ensure_future(vchan.accept(CLIENT, "cx", platform=srv_plat))
    await asyncio.sleep(0.1)
    acc.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acc
    with pytest.raises(FileNotFoundError):
        await world.read_store(vchan.vchan_path(SERVER, CLIENT, "cx") + "/ring-ref")  # type: ignore[attr-defined]
    # (the world fixture checks that no port, share or mapping is left)


async def test_accept_one_client(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    acc = asyncio.ensure_future(vchan.accept(CLIENT, "one", platform=srv_plat, timeout=10))
    _reader, writer = await vchan.open_connection(SERVER, "one", platform=cli_plat)
    sreader, swriter = await acc
    writer.write(b"ping")
    assert await sreader.readexactly(4) == b"ping"
    assert swriter.get_extra_info("role") == "server"
    assert writer.get_extra_info("role") == "client"
    with pytest.raises(FileNotFoundError):  # a one-shot server withdraws its advertisement
        await world.read_store(vchan.vchan_path(SERVER, CLIENT, "one") + "/ring-ref")  # type: ignore[attr-defined]
    for w in (writer, swriter):
        w.close()
        await w.wait_closed()


async def test_client_size_minimums(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    async with await vchan.start_server(
        echo, CLIENT, "small", platform=srv_plat, read_size=1024, write_size=2048
    ):
        with pytest.raises(ConnectionRefusedError, match="2048-byte read ring, 4096 required"):
            await vchan.open_connection(SERVER, "small", platform=cli_plat, read_size=4096)
        # the refused attempt left the server serving
        async with vchan.connect(
            SERVER, "small", platform=cli_plat, read_size=2048, write_size=1024
        ) as (reader, writer):
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"ok"


@pytest.mark.parametrize("port", ["", "a/b", "x y", "dot.dot", "é"])
async def test_invalid_port(world: World, port: str) -> None:
    plat: Platform = await world.platform(CLIENT)
    with pytest.raises(ValueError, match="invalid vchan port"):
        await vchan.open_connection(SERVER, port, platform=plat)
    with pytest.raises(ValueError, match="invalid vchan port"):
        await vchan.start_server(echo, SERVER, port, platform=plat)


async def test_invalid_sizes(world: World) -> None:
    plat = await world.platform(SERVER)
    for bad in (0, (1 << 20) + 1):
        with pytest.raises(ValueError):
            await vchan.start_server(echo, CLIENT, "p", platform=plat, read_size=bad)
        with pytest.raises(ValueError):
            await vchan.open_connection(CLIENT, "p", platform=plat, write_size=bad)


async def test_extra_info(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    async with (
        await vchan.start_server(echo, CLIENT, "info", platform=srv_plat),
        vchan.connect(SERVER, "info", platform=cli_plat) as (_, writer),
    ):
        assert writer.get_extra_info("peer_domid") == SERVER
        assert writer.get_extra_info("port") == "info"
        assert writer.get_extra_info("platform") is cli_plat
        assert writer.get_extra_info("peername") == (SERVER, "info")
        assert writer.get_extra_info("sockname") == (CLIENT, "info")
        assert writer.get_extra_info("nonexistent", 42) == 42
        assert "vchan client domid 2 port 'info'" in repr(writer.transport)


async def test_platform_close_right_after_transport_close(world: World) -> None:
    """close() releases the shared memory at once, so closing the platform next works."""
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    async with await vchan.start_server(echo, CLIENT, "pc", platform=srv_plat):
        reader, writer = await vchan.open_connection(SERVER, "pc", platform=cli_plat)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        writer.close()
        await cli_plat.close()  # no BufferError: nothing of ours is pinned any more
        await writer.wait_closed()


async def test_accept_timeout_withdraws(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    with pytest.raises(TimeoutError, match="no vchan client of domid 2"):
        await vchan.accept(CLIENT, "lonely", platform=srv_plat, timeout=0.2)
    with pytest.raises(FileNotFoundError):
        await world.read_store(vchan.vchan_path(SERVER, CLIENT, "lonely") + "/ring-ref")  # type: ignore[attr-defined]


async def test_platform_none_uses_the_default_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """``platform=None``: the loop's default platform, chosen from the environment."""
    import aioxen
    from aioxen.platforms.inheap import default_world

    world = default_world()  # what aioxen.platform("inheap") uses without world=
    monkeypatch.setenv("AIOXEN_PLATFORM", "inheap")
    monkeypatch.setenv("AIOXEN_DOMID", str(CLIENT))
    async with aioxen.platform("inheap", domid=SERVER, world=world) as srv_plat:
        server = await vchan.start_server(echo, CLIENT, "dflt", platform=srv_plat)
        async with server, vchan.connect(SERVER, "dflt") as (reader, writer):
            assert writer.get_extra_info("platform") is await aioxen.default_platform()
            writer.write(b"default")
            assert await reader.readexactly(7) == b"default"
    await (await aioxen.default_platform()).close()
    world.assert_cleaned_up()


def test_large_endpoints_keep_no_spare() -> None:
    """A spare endpoint is made ahead only for small rings: two 1 MiB endpoints would
    exceed Xen's default per-process grant limit (1,024 pages)."""
    from aioxen.vchan.server import SPARE_MAX_PAGES, endpoint_pages

    assert endpoint_pages(0, 0) == 1  # both rings in the control page
    assert endpoint_pages(65536, 65536) == 33
    assert endpoint_pages(1 << 20, 1 << 20) == 513 > SPARE_MAX_PAGES
    assert 2 * endpoint_pages(1 << 20, 1 << 20) > 1024
    assert endpoint_pages(65536, 65536) <= SPARE_MAX_PAGES
