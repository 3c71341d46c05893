"""aioxen.qrexec.framing: messages over real stream pairs (socketpair, inheap and unix
vchan) and over a fed StreamReader (hypothesis: any byte stream ends in a message, None,
QrexecProtocolError or ConnectionResetError -- never a hang, never an oversized read)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioxen.qrexec import wire as w
from aioxen.qrexec.framing import (
    Message,
    exchange_hello,
    read_message,
    send_message,
    write_message,
)
from aioxen.qrexec.wire import QrexecProtocolError

pytestmark = pytest.mark.timeout(120)
PairFactory = Callable[..., Any]  # the channel_pair fixture (conftest.py)


def fed(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


async def test_round_trip_over_channels(channel_pair: PairFactory) -> None:
    (_cr, cw), (sr, _sw) = await channel_pair()
    big = bytes(range(256)) * 300  # > the join threshold: header and body written apart
    write_message(cw, w.MSG_DATA_STDIN, b"hello")
    write_message(cw, w.MSG_DATA_STDIN)
    await send_message(cw, w.MSG_DATA_STDOUT, big)
    assert await read_message(sr, limit=100_000) == Message(w.MSG_DATA_STDIN, b"hello")
    assert await read_message(sr, limit=100_000) == Message(w.MSG_DATA_STDIN, b"")
    assert await read_message(sr, limit=100_000) == Message(w.MSG_DATA_STDOUT, big)
    cw.close()
    assert await read_message(sr, limit=100_000) is None  # clean EOF between messages


async def test_cut_inside_header() -> None:
    with pytest.raises(ConnectionResetError, match="inside a message header \\(3 of 8"):
        await read_message(fed(b"\x90\x01\0"), limit=10, what="svc")


async def test_cut_inside_body() -> None:
    r = fed(struct.pack("<II", w.MSG_DATA_STDOUT, 10) + b"abc")
    with pytest.raises(ConnectionResetError, match="inside MSG_DATA_STDOUT \\(3 of 10"):
        await read_message(r, limit=10)


async def test_oversized_refused_before_the_body() -> None:
    """The header alone (no body ever comes, the stream stays open) is refused at once."""
    r = fed(struct.pack("<II", w.MSG_DATA_STDOUT, 0xFFFFFFFF), eof=False)
    with pytest.raises(QrexecProtocolError, match="declares 4294967295 bytes") as e:
        async with asyncio.timeout(10):
            await read_message(r, limit=65536, what="the service")
    assert e.value.field == "len" and "the service" in str(e.value)


async def test_type_refused_by_limit_function() -> None:
    r = fed(struct.pack("<II", 0x999, 0), eof=False)
    with pytest.raises(QrexecProtocolError, match="agent: unexpected message type 0x999") as e:
        async with asyncio.timeout(10):
            await read_message(r, limit=w.control_payload_limit, what="agent")
    assert e.value.field == "type"


async def test_exactly_at_the_limit() -> None:
    r = fed(struct.pack("<II", 1, 4) + b"abcd")
    assert await read_message(r, limit=4) == Message(1, b"abcd")


@pytest.mark.parametrize("a, b, expect", [(4, 4, 4), (4, 3, 3), (2, 4, 2), (3, 2, 2)])
async def test_hello_both_ways(channel_pair: PairFactory, a: int, b: int, expect: int) -> None:
    (cr, cw), (sr, sw) = await channel_pair()
    got = await asyncio.gather(
        exchange_hello(cr, cw, version=a, min_version=2),
        exchange_hello(sr, sw, version=b, min_version=2),
    )
    assert got == [expect, expect]


async def test_hello_sent_first_before_reading() -> None:
    """A peer that only reads (Qubes' dom0 side with remote_send_first) gets our HELLO."""
    r = asyncio.StreamReader()
    sent: list[bytes] = []

    class W:
        def write(self, data: bytes) -> None:
            sent.append(data)

        async def drain(self) -> None:
            pass

    task = asyncio.ensure_future(exchange_hello(r, W(), version=4, min_version=2))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert b"".join(sent) == struct.pack("<III", w.MSG_HELLO, 4, 4)
    r.feed_data(struct.pack("<III", w.MSG_HELLO, 4, 3))
    assert await task == 3


@pytest.mark.parametrize(
    "first, match",
    [
        (struct.pack("<III", w.MSG_HELLO, 4, 1), "version 1; at least 2"),
        (struct.pack("<III", w.MSG_DATA_STDOUT, 4, 4), "expected MSG_HELLO first"),
        (struct.pack("<II", w.MSG_HELLO, 5) + b"\4\0\0\0\0", "more than its limit of 4"),
        (struct.pack("<II", w.MSG_HELLO, 2) + b"\4\0", "must be 4 bytes"),
    ],
)
async def test_hello_refused(first: bytes, match: str) -> None:
    r = fed(first, eof=False)

    class W:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            pass

    with pytest.raises(QrexecProtocolError, match=match):
        async with asyncio.timeout(10):
            await exchange_hello(r, W(), version=4, min_version=2, what="peer")  # type: ignore[arg-type]


async def test_hello_peer_closes(channel_pair: PairFactory) -> None:
    (cr, cw), (_sr, sw) = await channel_pair()
    sw.close()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(30):
            await exchange_hello(cr, cw, version=4, min_version=2)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([w.MSG_DATA_STDIN, w.MSG_HELLO, w.MSG_EXEC_CMDLINE, 0, 0x999]),
            st.integers(0, 70_000) | st.just(0xFFFFFFFF),
            st.binary(max_size=64),
        ),
        max_size=5,
    ),
    st.binary(max_size=20),
)
async def test_hostile_streams(msgs: list[tuple[int, int, bytes]], tail: bytes) -> None:
    raw = b"".join(struct.pack("<II", t, n) + body for t, n, body in msgs) + tail
    r = fed(raw)
    got = 0
    async with asyncio.timeout(10):
        while True:
            try:
                m = await read_message(r, limit=w.control_payload_limit)
            except (QrexecProtocolError, ConnectionResetError):
                return
            if m is None:
                return
            assert len(m.payload) <= w.control_payload_limit(m.type)
            got += 1
            assert got <= len(msgs)
