"""aioxen.qrexec.data: how an end reads its channel -- the transport taken over from its
``StreamReaderProtocol`` (the fast path) on sockets and aioxen vchan, messages that
arrived before the end started, and the task pump for a stream that is not a plain
stdlib one."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from aioxen.qrexec import wire as w
from aioxen.qrexec.data import CallerEnd, ServiceEnd

pytestmark = pytest.mark.timeout(120)
PairFactory = Callable[..., Any]  # the channel_pair fixture (conftest.py)
HANG_GUARD = 60


def frame(msg_type: int, payload: bytes = b"") -> bytes:
    return w.HEADER.pack(msg_type, len(payload)) + payload


async def test_both_ends_take_the_channel_transport_over(channel_pair: PairFactory) -> None:
    """On sockets and vchan the ends read with their own protocol (no
    ``StreamReaderProtocol`` left on the transport), and a call works through it."""
    (cr, cw), (sr, sw) = await channel_pair()
    async with asyncio.timeout(HANG_GUARD):
        caller, service = await asyncio.gather(CallerEnd.open(cr, cw), ServiceEnd.open(sr, sw))
        for writer in (cw, sw):
            assert not isinstance(writer.transport.get_protocol(), asyncio.StreamReaderProtocol)

        async def serve() -> None:
            data = await service.stdin.read()
            service.stdout.write(data[::-1])
            await service.exit(5)

        _, result = await asyncio.gather(serve(), caller.communicate(b"abc" * 50_000))
    assert result == ((b"abc" * 50_000)[::-1], b"", 5)
    await caller.aclose()


async def test_messages_sent_before_the_end_starts_are_delivered() -> None:
    """The peer's HELLO, its whole input and its close arrive before the service end is
    made: what the channel's StreamReader already holds is delivered, then the end."""
    a, b = socket.socketpair()
    peer_reader, peer_writer = await asyncio.open_connection(sock=a)
    reader, writer = await asyncio.open_connection(sock=b)
    stdin = b"x" * 70_000  # two messages at v4
    peer_writer.write(
        frame(w.MSG_HELLO, w.encode_hello(4))
        + frame(w.MSG_DATA_STDIN, stdin[:65536])
        + frame(w.MSG_DATA_STDIN, stdin[65536:])
        + frame(w.MSG_DATA_STDIN)
    )
    await peer_writer.drain()
    async with asyncio.timeout(HANG_GUARD):
        while len(reader._buffer) < 12 + 8 + 70_000 + 8:  # all in the StreamReader first
            await asyncio.sleep(0.01)
        service = await ServiceEnd.open(reader, writer)
        assert await service.stdin.read() == stdin
        await service.exit(0)
        answer = await peer_reader.read()
    assert answer.endswith(frame(w.MSG_DATA_EXIT_CODE, w.encode_exit_code(0)))
    peer_writer.close()


async def test_a_stream_that_is_not_a_plain_one_uses_the_pump_task() -> None:
    """A ``StreamReader`` fed by hand (no transport of its own) is read by the pump task:
    the same messages, the same errors."""
    a, b = socket.socketpair()
    _, peer_writer = await asyncio.open_connection(sock=a)
    _, writer = await asyncio.open_connection(sock=b)
    reader = asyncio.StreamReader()
    reader.feed_data(frame(w.MSG_HELLO, w.encode_hello(4)))
    async with asyncio.timeout(HANG_GUARD):
        service = await ServiceEnd.open(reader, writer)
        reader.feed_data(frame(w.MSG_DATA_STDIN, b"hello") + frame(w.MSG_DATA_STDIN))
        assert await service.stdin.read() == b"hello"
        reader.feed_data(frame(w.MSG_DATA_STDIN, b"late"))  # after its EOF: refused
        assert isinstance(await service.wait_lost(), w.QrexecProtocolError)
    peer_writer.close()
    writer.close()
