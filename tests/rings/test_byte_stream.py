"""ByteRingTransport's flow control is asyncio's (aioxen.flowcontrol.WriteFlowControl,
failing callbacks go to the loop's exception handler) and open_streams waits for
connection_made instead of yielding once and hoping."""

from __future__ import annotations

import asyncio
from typing import Any

from ring_helpers import BE, FE

from aioxen.rings.byte import CONSOLE, ByteRing
from aioxen.rings.stream import ByteRingTransport, open_streams


async def _ring_pair(harness: Any) -> tuple[ByteRing, ByteRing, Any, Any, list[Any]]:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    share = fp.grants.share(BE, 1)
    front = ByteRing(share.buf, CONSOLE, side="front", init=True)
    mapping = bp.grants.map(FE, share.refs)
    back = ByteRing(mapping.buf, CONSOLE, side="back")
    fch = await fp.events.listen(BE)
    bch = await bp.events.connect(FE, fch.port)
    return front, back, fch, bch, [bch, fch, back, front, mapping, share]


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.made = asyncio.get_running_loop().create_future()
        self.data = bytearray()
        self.pauses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def pause_writing(self) -> None:
        self.pauses += 1
        raise RuntimeError("pause_writing exploded")


async def test_flow_control_callback_errors_go_to_the_exception_handler(harness: Any) -> None:
    front, back, fch, bch, owned = await _ring_pair(harness)
    loop = asyncio.get_running_loop()
    caught: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: caught.append(ctx))
    proto = _Recorder()
    peer = _Recorder()
    tr = ByteRingTransport(front, fch, proto)
    peer_tr = ByteRingTransport(back, bch, peer)
    try:
        await asyncio.wait_for(tr.wait_started(), 10)
        assert proto.made.done()
        tr.set_write_buffer_limits(high=100)
        assert tr.get_write_buffer_limits() == (25, 100)
        peer_tr.pause_reading()  # the peer does not read: the ring fills, the buffer grows
        tr.write(b"x" * (CONSOLE.in_.size + CONSOLE.out.size + 1000))  # no exception here
        assert proto.pauses == 1 and tr.get_write_buffer_size() > 100
        assert [c["message"] for c in caught] == ["protocol.pause_writing() failed"]
        assert isinstance(caught[0]["exception"], RuntimeError)
        peer_tr.resume_reading()  # the bytes still flow
        async with asyncio.timeout(10):
            while len(peer.data) < CONSOLE.in_.size + CONSOLE.out.size + 1000:
                await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(old)
        tr.abort()
        peer_tr.abort()
        await asyncio.sleep(0)
        for r in owned:
            r.close()


async def test_open_streams_waits_for_connection_made(harness: Any) -> None:
    front, back, fch, bch, owned = await _ring_pair(harness)
    try:
        reader, writer, tr = await open_streams(front, fch)
        _r2, w2, tr2 = await open_streams(back, bch)
        assert writer.transport is tr and tr.is_reading()
        w2.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        tr.abort()
        await tr.wait_started()  # already started: returns at once, also after the end
        tr2.abort()
        await asyncio.sleep(0)
    finally:
        for r in owned:
            r.close()
