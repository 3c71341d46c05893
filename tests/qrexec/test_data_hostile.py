"""Hostile messages on a data channel: a raw peer speaking framed bytes to a CallerEnd or
a ServiceEnd.  Every violation is a QrexecProtocolError naming it (the channel is dropped);
nothing hangs; Qubes' tolerated quirk (STDIN/STDOUT mixed up) is accepted."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioxen.qrexec import wire as w
from aioxen.qrexec.data import CallerEnd, ServiceEnd, data_handshake
from aioxen.qrexec.framing import read_message
from aioxen.qrexec.wire import QrexecProtocolError

pytestmark = pytest.mark.timeout(180)
PairFactory = Callable[..., Any]
HANG_GUARD = 60

OUT, ERR, IN, CODE = w.MSG_DATA_STDOUT, w.MSG_DATA_STDERR, w.MSG_DATA_STDIN, w.MSG_DATA_EXIT_CODE


def msg(t: int, payload: bytes = b"") -> bytes:
    return struct.pack("<II", t, len(payload)) + payload


def code(n: int) -> bytes:
    return msg(CODE, struct.pack("<i", n))


async def caller_vs_raw(
    channel_pair: PairFactory, version: int = 4, **kw: Any
) -> tuple[CallerEnd, asyncio.StreamReader, asyncio.StreamWriter]:
    (cr, cw), (sr, sw) = await channel_pair()
    caller, _ = await asyncio.gather(
        CallerEnd.open(cr, cw, **kw), data_handshake(sr, sw, max_version=version)
    )
    return caller, sr, sw


async def service_vs_raw(
    channel_pair: PairFactory, version: int = 4
) -> tuple[ServiceEnd, asyncio.StreamReader, asyncio.StreamWriter]:
    (cr, cw), (sr, sw) = await channel_pair()
    service, _ = await asyncio.gather(
        ServiceEnd.open(sr, sw), data_handshake(cr, cw, max_version=version)
    )
    return service, cr, cw


@pytest.mark.parametrize(
    "sent, match",
    [
        (msg(w.MSG_HELLO, b"\4\0\0\0"), "unexpected MSG_HELLO on a data channel"),
        (msg(0x999, b"x"), "unexpected message type 0x999"),
        (msg(w.MSG_EXEC_CMDLINE, b"\0" * 9), "unexpected MSG_EXEC_CMDLINE"),
        (struct.pack("<II", OUT, 65537), "declares 65537 bytes, more than its limit of 65536"),
        (struct.pack("<II", ERR, 0xFFFFFFFF), "declares 4294967295 bytes"),
        (code(0) + code(1), "sent MSG_DATA_EXIT_CODE after its exit code"),
        (code(0) + msg(OUT, b"late"), "sent MSG_DATA_STDOUT after its exit code"),
        (code(0) + msg(OUT), "after its exit code"),
        (msg(CODE, b"\0\0\0"), "MSG_DATA_EXIT_CODE payload must be 4 bytes, got 3"),
        (msg(CODE, b"\0" * 5), "must be 4 bytes, got 5"),
        (msg(OUT, b"a") + msg(OUT) + msg(OUT, b"b"), "stdout after its EOF"),
        (msg(OUT) + msg(OUT), "stdout after its EOF"),
        (msg(ERR) + msg(ERR, b"e"), "stderr after its EOF"),
    ],
)
async def test_caller_refuses(channel_pair: PairFactory, sent: bytes, match: str) -> None:
    """The service's bytes stay sent and the channel open: the caller must decide alone."""
    caller, _, sw = await caller_vs_raw(channel_pair)
    sw.write(sent)
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(QrexecProtocolError, match=match):
            await caller.exit_code()
        assert isinstance(await caller.wait_lost(), QrexecProtocolError)
        with pytest.raises(QrexecProtocolError):
            caller.stdin.write(b"x")
            await caller.stdin.drain()
    await caller.aclose()


@pytest.mark.parametrize("version, limit", [(2, 4096), (3, 65536), (4, 65536)])
async def test_chunk_limit_per_version(channel_pair: PairFactory, version: int, limit: int) -> None:
    caller, _, sw = await caller_vs_raw(channel_pair, version)
    sw.write(msg(OUT, bytes(limit)))  # exactly the limit: fine
    assert await caller.stdout.readexactly(limit) == bytes(limit)
    sw.write(struct.pack("<II", OUT, limit + 1))
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(QrexecProtocolError, match=f"more than its limit of {limit}"):
            await caller.stdout.read()
    await caller.aclose()


async def test_caller_streams_get_the_error(channel_pair: PairFactory) -> None:
    caller, _, sw = await caller_vs_raw(channel_pair)
    sw.write(msg(OUT, b"ok") + msg(0x999))
    async with asyncio.timeout(HANG_GUARD):
        assert await caller.stdout.readexactly(2) == b"ok"
        with pytest.raises(QrexecProtocolError, match="0x999"):
            await caller.stdout.read()
        with pytest.raises(QrexecProtocolError, match="0x999"):
            await caller.stderr.read()
    await caller.aclose()


async def test_caller_accepts_stdin_for_stdout(channel_pair: PairFactory) -> None:
    """Qubes accepts MSG_DATA_STDIN where STDOUT belongs (Qubes Windows Tools mix them)."""
    caller, _, sw = await caller_vs_raw(channel_pair)
    sw.write(msg(IN, b"hi") + msg(IN) + msg(ERR) + code(4))
    sw.close()
    async with asyncio.timeout(HANG_GUARD):
        assert await caller.stdout.read() == b"hi"
        assert await caller.exit_code() == 4
    await caller.aclose()


async def test_errors_name_the_peer(channel_pair: PairFactory) -> None:
    (cr, cw), (sr, sw) = await channel_pair()
    caller, _ = await asyncio.gather(
        CallerEnd.open(cr, cw, what="qrexec service in domain 3 (port 513)"),
        data_handshake(sr, sw),
    )
    sw.write(msg(0x999))
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(QrexecProtocolError, match=r"^qrexec service in domain 3 \(port 513\)"):
            await caller.exit_code()
    await caller.aclose()


async def test_exit_code_without_close(channel_pair: PairFactory) -> None:
    """A service that sends its code but keeps the channel open: the caller returns the
    code after its grace period, never hangs."""
    caller, _, sw = await caller_vs_raw(channel_pair, exit_grace=0.2)
    sw.write(code(9))
    async with asyncio.timeout(HANG_GUARD):
        assert await caller.exit_code() == 9
    await caller.aclose()


@pytest.mark.parametrize(
    "sent, match",
    [
        (msg(ERR, b"x"), "sent MSG_DATA_STDERR \\(only stdin flows to a service\\)"),
        (code(0), "sent MSG_DATA_EXIT_CODE"),
        (msg(w.MSG_HELLO, b"\4\0\0\0"), "unexpected MSG_HELLO"),
        (struct.pack("<II", IN, 65537), "declares 65537 bytes"),
    ],
)
async def test_service_refuses(channel_pair: PairFactory, sent: bytes, match: str) -> None:
    service, _, cw = await service_vs_raw(channel_pair)
    cw.write(sent)
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(QrexecProtocolError, match=match):
            await service.stdin.read()
        with pytest.raises(QrexecProtocolError, match=match):
            await service.exit(0)


async def test_service_refuses_stdin_after_eof(channel_pair: PairFactory) -> None:
    service, _, cw = await service_vs_raw(channel_pair)
    cw.write(msg(IN, b"a") + msg(IN) + msg(IN, b"more"))
    async with asyncio.timeout(HANG_GUARD):
        assert await service.stdin.read() == b"a"  # the reader saw its EOF
        err = await service.wait_lost()
        assert isinstance(err, QrexecProtocolError) and "stdin after its EOF" in str(err)
        with pytest.raises(QrexecProtocolError):
            await service.exit(0)


async def test_service_accepts_stdout_for_stdin(channel_pair: PairFactory) -> None:
    service, cr, cw = await service_vs_raw(channel_pair)
    cw.write(msg(OUT, b"in") + msg(OUT))
    async with asyncio.timeout(HANG_GUARD):
        assert await service.stdin.read() == b"in"
        await service.exit(0)
        seen = []
        while (m := await read_message(cr, limit=65536)) is not None:
            seen.append((m.type, m.payload))
    assert seen == [(OUT, b""), (ERR, b""), (CODE, b"\0\0\0\0")]


_types = st.sampled_from([OUT, ERR, IN, CODE, w.MSG_HELLO, 0, 0x194, 0xFFFFFFFF])
_msgs = st.tuples(_types, st.binary(max_size=8) | st.just(b"\0\0\0\0"))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(_msgs, max_size=8),
    st.sampled_from([b"", b"\x91\x01", struct.pack("<II", OUT, 70000)]),
    st.sampled_from(["close", "abort"]),
)
async def test_caller_against_random_services(
    msgs: list[tuple[int, bytes]], tail: bytes, end: str
) -> None:
    """Any message sequence from a service that then closes (or aborts) ends the caller
    with a code, a protocol error or a reset -- and the code only for a valid sequence."""
    a, b = socket.socketpair()
    (cr, cw), (sr, sw) = await asyncio.gather(
        asyncio.open_connection(sock=a), asyncio.open_connection(sock=b)
    )
    try:
        caller, _ = await asyncio.gather(
            CallerEnd.open(cr, cw, exit_grace=0.05), data_handshake(sr, sw)
        )
        sw.write(b"".join(msg(t, p) for t, p in msgs) + tail)
        if end == "close":
            sw.close()
        else:
            sw.transport.abort()
        async with asyncio.timeout(HANG_GUARD):
            try:
                got = await caller.exit_code()
            except (QrexecProtocolError, ConnectionResetError):
                return
        # a code: the sequence up to the first exit code was valid
        first = next(i for i, (t, _) in enumerate(msgs) if t == CODE)
        assert msgs[first][1] and len(msgs[first][1]) == 4
        assert struct.unpack("<i", msgs[first][1])[0] == got
        assert all(t in (OUT, ERR, IN) for t, _ in msgs[:first])
        assert first == len(msgs) - 1 and not tail
        await caller.aclose()
    finally:
        for wr in (cw, sw):
            wr.transport.abort()
