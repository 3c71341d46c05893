"""Protocol-level API: transports, BufferedProtocol, flow control, datagrams."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from vchan_harness import World

from aioxen import vchan

SERVER, CLIENT = 1, 2
pytestmark = pytest.mark.timeout(60)


class Recorder(asyncio.Protocol):
    """Records every callback; ``done`` resolves on connection_lost."""

    def __init__(self, keep_open: bool = True) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.keep_open = keep_open
        self.transport: Any = None
        self.done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof = asyncio.Event()
        self.got = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data
        self.got.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.eof.set()
        return self.keep_open

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.done.done():
            self.done.set_result(exc)


class Sink(asyncio.BufferedProtocol):
    """A BufferedProtocol handing out small, odd-sized buffers."""

    def __init__(self, bufsize: int = 1000) -> None:
        self.buf = bytearray(bufsize)
        self.data = bytearray()
        self.sizehints: list[int] = []
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        self.sizehints.append(sizehint)
        return memoryview(self.buf)[: random.randint(1, len(self.buf))]

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.eof.set_result(bytes(self.data))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def _pair(
    world: World, port: str, server_factory: Any, client_factory: Any, **server_kw: Any
) -> tuple[Any, Any, Any, Any]:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    protos: list[Any] = []

    def factory() -> Any:
        p = server_factory()
        protos.append(p)
        return p

    server = await vchan.create_server(factory, CLIENT, port, platform=srv_plat, **server_kw)
    transport, protocol = await vchan.create_connection(
        client_factory, SERVER, port, platform=cli_plat
    )
    assert isinstance(transport, vchan.VchanTransport)
    while not protos or protos[0].transport is None:
        await asyncio.sleep(0.005)
    return server, protos[0], transport, protocol


async def test_buffered_protocol_gets_everything(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    sinks: list[Sink] = []

    def factory() -> Sink:
        sinks.append(Sink())
        return sinks[-1]

    data = random.Random(3).randbytes(700_000)
    async with await vchan.create_server(
        factory, CLIENT, "buf", platform=srv_plat, read_size=4096, initial_index=2**32 - 100
    ):
        transport, _ = await vchan.create_connection(
            asyncio.Protocol, SERVER, "buf", platform=cli_plat
        )
        for i in range(0, len(data), 50_000):
            transport.write(memoryview(data)[i : i + 50_000])
        transport.write_eof()
        while not sinks:
            await asyncio.sleep(0.005)
        assert await sinks[0].eof == data
        assert await sinks[0].lost is None  # eof_received returned False: closed
        assert max(sinks[0].sizehints) <= 4096  # never more than one ring's worth
        transport.close()


async def test_data_received_protocol_and_callbacks_order(world: World) -> None:
    server, sp, ct, cp = await _pair(world, "order", Recorder, Recorder)
    async with server:
        ct.write(b"abc")
        ct.writelines([b"d", bytearray(b"e"), memoryview(b"f")])
        await sp.got.wait()
        while len(sp.data) < 6:
            sp.got.clear()
            await sp.got.wait()
        assert bytes(sp.data) == b"abcdef"
        ct.write_eof()
        await sp.eof.wait()
        assert sp.events == ["made", "eof"]
        sp.transport.write(b"reply")
        sp.transport.close()
        assert await cp.done is None
        assert bytes(cp.data) == b"reply"
        assert cp.events == ["made", "eof", "lost"]
        assert await sp.done is None
        assert ct.is_closing()


async def test_write_flow_control_and_pause_reading(world: World) -> None:
    server, sp, ct, cp = await _pair(
        world, "flow", Recorder, Recorder, read_size=1024, write_size=1024
    )
    async with server:
        ct.pause_reading()
        assert not ct.is_reading()
        st = sp.transport
        st.set_write_buffer_limits(high=4000)
        assert st.get_write_buffer_limits() == (1000, 4000)
        with pytest.raises(ValueError):
            st.set_write_buffer_limits(high=10, low=20)
        blob = bytes(range(256)) * 40  # 10240 bytes: 2 KiB ring (order 11) + 8 KiB queued
        st.write(blob)
        assert st.get_extra_info("write_size") == 2048
        assert st.get_write_buffer_size() == len(blob) - 2048
        assert "pause" in sp.events
        await asyncio.sleep(0.05)
        assert cp.data == b""  # paused: nothing delivered, the ring stays full
        ct.resume_reading()
        while len(cp.data) < len(blob):
            cp.got.clear()
            await cp.got.wait()
        assert bytes(cp.data) == blob
        assert sp.events[-2:] == ["pause", "resume"]
        assert st.get_write_buffer_size() == 0
        ct.close()
        await cp.done


async def test_abort_discards_queue_peer_sees_reset(world: World) -> None:
    server, sp, ct, cp = await _pair(world, "abort", Recorder, Recorder, read_size=1024)
    async with server:
        ct.write(b"x" * 5000)  # 1024 into the ring, the rest queued
        ct.abort()
        assert await cp.done is None
        # the stream was cut: the peer never sees a clean EOF (issue 13, finding 4)
        exc = await sp.done
        assert isinstance(exc, ConnectionResetError), exc
        assert "without ending its stream" in str(exc)
        assert "eof" not in sp.events
        assert sp.events[-1] == "lost"
        assert len(sp.data) <= 5000


async def test_write_after_close_is_dropped_and_write_eof_twice(world: World) -> None:
    server, sp, ct, cp = await _pair(world, "after", Recorder, Recorder)
    async with server:
        ct.write_eof()
        ct.write_eof()  # idempotent
        with pytest.raises(RuntimeError, match="write_eof"):
            ct.write(b"no")
        await sp.eof.wait()
        sp.transport.close()
        await cp.done
        sp.transport.write(b"dropped")  # after connection_lost: silently dropped
        with pytest.raises(TypeError):
            sp.transport.write("text")  # type: ignore[arg-type]


async def test_protocol_factory_error_cleans_up(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)

    def broken() -> asyncio.Protocol:
        raise RuntimeError("factory failed")

    async with await vchan.create_server(Recorder, CLIENT, "fe", platform=srv_plat):
        with pytest.raises(RuntimeError, match="factory failed"):
            await vchan.create_connection(broken, SERVER, "fe", platform=cli_plat)
        # a good client is still served afterwards
        t, p = await vchan.create_connection(Recorder, SERVER, "fe", platform=cli_plat)
        t.close()
        await p.done


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait((data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.parametrize("size", [1024, 65536])
async def test_datagrams(world: World, size: int) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    listener = asyncio.ensure_future(
        vchan.create_datagram_endpoint(
            Datagrams,
            CLIENT,
            "dg",
            listen=True,
            platform=srv_plat,
            read_size=size,
            write_size=size,
            initial_index=2**32 - 10,
        )
    )
    ct, cp = await vchan.create_datagram_endpoint(Datagrams, SERVER, "dg", platform=cli_plat)
    st, sp = await listener
    assert ct.max_datagram_size == size - 4  # the client writes the LEFT ring
    assert st.max_datagram_size == (2048 if size == 1024 else size) - 4
    rng = random.Random(size)
    msgs = [b""] + [rng.randbytes(rng.randint(0, ct.max_datagram_size)) for _ in range(60)]
    msgs.append(bytes(ct.max_datagram_size))
    for m in msgs:
        ct.sendto(m)
    for m in msgs:
        data, addr = await sp.got.get()
        assert data == m
        assert addr == (CLIENT, "dg")
    st.sendto(b"pong", (CLIENT, "dg"))
    assert await cp.got.get() == (b"pong", (SERVER, "dg"))
    with pytest.raises(ValueError, match="exceeds the maximum"):
        ct.sendto(bytes(ct.max_datagram_size + 1))
    with pytest.raises(ValueError, match="connected to"):
        ct.sendto(b"x", (7, "elsewhere"))
    with pytest.raises(NotImplementedError):
        ct.write(b"x")
    ct.close()
    assert await cp.lost is None
    assert await sp.lost is None  # the peer's EOF ends a datagram transport
