"""aioxen.qrexec.data: the data phase over a socketpair and real aioxen vchan (inheap,
unix): bulk data both ways at versions 2, 3 and 4, EOF orderings, stderr, exit codes,
back-pressure, and a peer that goes away (an error, never a hang)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from typing import Any

import pytest

from aioxen.qrexec import wire as w
from aioxen.qrexec.data import CallerEnd, ServiceEnd, data_handshake
from aioxen.qrexec.framing import read_message

pytestmark = pytest.mark.timeout(180)
PairFactory = Callable[..., Any]  # the channel_pair fixture (conftest.py)
HANG_GUARD = 60  # seconds: only ever reached if something hangs
MiB = 1 << 20
FLIP = bytes(255 - i for i in range(256))


async def open_ends(
    channel_pair: PairFactory, caller_max: int = 4, service_max: int = 4, **kw: Any
) -> tuple[CallerEnd, ServiceEnd]:
    (cr, cw), (sr, sw) = await channel_pair(**kw)
    caller, service = await asyncio.gather(
        CallerEnd.open(cr, cw, max_version=caller_max),
        ServiceEnd.open(sr, sw, max_version=service_max),
    )
    return caller, service


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def write_in_pieces(writer: asyncio.StreamWriter, data: bytes, seed: int) -> None:
    rnd = random.Random(seed)
    off = 0
    while off < len(data):
        n = rnd.choice([1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 200_000])
        writer.write(data[off : off + n])
        await writer.drain()
        off += n
    writer.write_eof()
    await writer.drain()


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_bulk_both_ways(channel_pair: PairFactory, version: int) -> None:
    """1 MiB each way at once (the service transforms stdin into stdout as it streams)
    plus 256 KiB of stderr, checksummed, at every data version."""
    caller, service = await open_ends(channel_pair, caller_max=4, service_max=version)
    assert caller.version == service.version == version
    assert caller.chunk == service.chunk == w.max_chunk_size(version)
    up = pattern(MiB, 1)
    err = pattern(256 << 10, 2)

    async def serve() -> str:
        h = hashlib.sha256()
        service.stderr.write(err)
        while data := await service.stdin.read(100_000):
            h.update(data)
            service.stdout.write(data.translate(FLIP))
            await service.stdout.drain()
        await service.exit(3)
        return h.hexdigest()

    async def call() -> tuple[bytes, bytes, int]:
        writer = asyncio.ensure_future(write_in_pieces(caller.stdin, up, 3))
        out, err_got = await asyncio.gather(caller.stdout.read(), caller.stderr.read())
        await writer
        return out, err_got, await caller.exit_code()

    async with asyncio.timeout(HANG_GUARD):
        digest, (out, err_got, code) = await asyncio.gather(serve(), call())
    assert digest == hashlib.sha256(up).hexdigest()
    assert hashlib.sha256(out).digest() == hashlib.sha256(up.translate(FLIP)).digest()
    assert err_got == err and code == 3
    await caller.aclose()


@pytest.mark.parametrize("caller_max, service_max", [(2, 4), (4, 3), (3, 3), (4, 4)])
async def test_versions_negotiated(
    channel_pair: PairFactory, caller_max: int, service_max: int
) -> None:
    caller, service = await open_ends(channel_pair, caller_max, service_max)
    assert caller.version == service.version == min(caller_max, service_max)
    await service.exit(0)
    assert await caller.exit_code() == 0
    await caller.aclose()


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_chunks_on_the_wire(channel_pair: PairFactory, version: int) -> None:
    """A 300 KiB write() leaves as messages of at most the version's chunk size (full
    chunks but the last), never a zero-length one before the EOF."""
    (cr, cw), (sr, sw) = await channel_pair()
    v, service = await asyncio.gather(
        data_handshake(cr, cw, max_version=4), ServiceEnd.open(sr, sw, max_version=version)
    )
    data = pattern(300 << 10, 5)
    chunk = w.max_chunk_size(version)

    async def produce() -> None:
        service.stdout.write(data)
        service.stdout.write(b"")  # nothing: an empty write is not an EOF
        service.stdout.write_eof()
        await service.stdout.drain()

    async def consume() -> tuple[list[int], bytes]:
        sizes = []
        got = b""
        while True:
            m = await read_message(cr, limit=chunk)
            assert m is not None and m.type == w.MSG_DATA_STDOUT
            if not m.payload:
                return sizes, got
            sizes.append(len(m.payload))
            got += m.payload

    async with asyncio.timeout(HANG_GUARD):
        _, (sizes, got) = await asyncio.gather(produce(), consume())
    assert got == data
    assert all(s == chunk for s in sizes[:-1]) and 0 < sizes[-1] <= chunk
    await service.exit(0)
    m = await read_message(cr, limit=chunk)  # stderr's EOF, then the code
    assert m is not None and (m.type, m.payload) == (w.MSG_DATA_STDERR, b"")
    m = await read_message(cr, limit=chunk)
    assert m is not None and m.type == w.MSG_DATA_EXIT_CODE and w.parse_exit_code(m.payload) == 0
    assert await read_message(cr, limit=chunk) is None  # and the service closed
    assert v == version


async def test_stdin_eof_before_output(channel_pair: PairFactory) -> None:
    caller, service = await open_ends(channel_pair)

    async def serve() -> None:
        data = await service.stdin.read()  # to EOF first
        service.stdout.write(data.upper())
        await service.exit(0)

    async with asyncio.timeout(HANG_GUARD):
        _, (out, err, code) = await asyncio.gather(serve(), caller.communicate(b"abc" * 10000))
    assert (out, err, code) == (b"ABC" * 10000, b"", 0)
    await caller.aclose()


async def test_stdin_eof_after_output(channel_pair: PairFactory) -> None:
    """The service answers, closes stdout, and only then gets (and waits for) stdin."""
    caller, service = await open_ends(channel_pair)

    async def serve() -> bytes:
        service.stdout.write(b"prompt")
        service.stdout.close()
        got = await service.stdin.read()
        await service.exit(5)
        return got

    async def call() -> tuple[bytes, int]:
        out = await caller.stdout.read()  # stdout ends while stdin is still open
        caller.stdin.write(b"answer")
        caller.stdin.write_eof()
        await caller.stdin.drain()
        return out, await caller.exit_code()

    async with asyncio.timeout(HANG_GUARD):
        got, (out, code) = await asyncio.gather(serve(), call())
    assert (got, out, code) == (b"answer", b"prompt", 5)
    await caller.aclose()


async def test_stderr_and_its_eof(channel_pair: PairFactory) -> None:
    caller, service = await open_ends(channel_pair)
    service.stderr.write(b"warning\n")
    service.stderr.write_eof()
    assert await caller.stderr.read() == b"warning\n"  # EOF before the exit code
    service.stdout.write(b"out")
    await service.exit(0)
    assert await caller.stdout.read() == b"out"
    assert await caller.exit_code() == 0
    await caller.aclose()


@pytest.mark.parametrize(
    "code", [0, 1, w.EXIT_PROBLEM, w.EXIT_REFUSED, w.EXIT_NOT_FOUND, 255, -1, 2**31 - 1]
)
async def test_exit_codes(channel_pair: PairFactory, code: int) -> None:
    caller, service = await open_ends(channel_pair)
    async with asyncio.timeout(HANG_GUARD):
        _, result = await asyncio.gather(service.exit(code), caller.communicate())
    assert result == (b"", b"", code)
    await caller.aclose()


async def test_exit_ends_unclosed_streams(channel_pair: PairFactory) -> None:
    """exit() sends stdout's and stderr's EOFs when the service did not."""
    caller, service = await open_ends(channel_pair)
    service.stdout.write(b"x")
    await service.exit(0)
    assert await caller.stdout.read() == b"x"
    assert await caller.stderr.read() == b""
    assert await caller.exit_code() == 0
    with pytest.raises(RuntimeError, match="twice"):
        await service.exit(1)
    await caller.aclose()


async def test_caller_stdin_after_exit_is_discarded(channel_pair: PairFactory) -> None:
    """A service that exits without reading: the caller's remaining input goes nowhere,
    without an error (Qubes discards it too)."""
    caller, service = await open_ends(channel_pair)
    await service.exit(0)
    assert await caller.exit_code() == 0
    caller.stdin.write(pattern(MiB, 9))
    await caller.stdin.drain()
    caller.stdin.write_eof()
    await caller.aclose()


async def test_service_ignoring_stdin_while_caller_streams(channel_pair: PairFactory) -> None:
    caller, service = await open_ends(channel_pair)

    async def serve() -> None:
        service.stdout.write(b"done")
        await service.exit(0)

    async with asyncio.timeout(HANG_GUARD):
        _, result = await asyncio.gather(serve(), caller.communicate(pattern(4 * MiB, 4)))
    assert result == (b"done", b"", 0)
    await caller.aclose()


# -- back-pressure ----------------------------------------------------------------------------


async def _stalls(task: asyncio.Future[Any], progress: Callable[[], int]) -> None:
    """Wait until ``progress()`` stops growing for a while (the writer is held back)."""
    last = -1
    still = 0
    async with asyncio.timeout(HANG_GUARD):
        while still < 20:
            await asyncio.sleep(0.01)
            now = progress()
            still = still + 1 if now == last else 0
            last = now
            assert not task.done(), "the writer finished: nothing held it back"


async def test_stdout_back_pressure(channel_pair: PairFactory) -> None:
    """A caller that does not read holds the service's writer back: memory on the caller
    stays bounded (its reader pauses the pump, the channel fills, drain() waits)."""
    caller, service = await open_ends(channel_pair)
    total = 64 * MiB
    sent = 0
    block = pattern(MiB, 6)

    async def produce() -> None:
        nonlocal sent
        while sent < total:
            service.stdout.write(block)
            await service.stdout.drain()
            sent += len(block)
        await service.exit(0)

    task = asyncio.ensure_future(produce())
    await _stalls(task, lambda: sent)
    # stdlib StreamReader pauses its "transport" above 2 * limit; one message may land after
    held = len(caller.stdout._buffer)
    assert held <= 2 * 2**16 + 65536
    assert sent < total
    h = hashlib.sha256()
    n = 0
    async with asyncio.timeout(HANG_GUARD):
        while data := await caller.stdout.read(MiB):
            h.update(data)
            n += len(data)
        await task
    assert n == total and h.hexdigest() == hashlib.sha256(block * 64).hexdigest()
    assert await caller.exit_code() == 0
    await caller.aclose()


async def test_stdin_back_pressure(channel_pair: PairFactory) -> None:
    caller, service = await open_ends(channel_pair)
    total = 64 * MiB
    sent = 0
    block = pattern(MiB, 7)

    async def produce() -> None:
        nonlocal sent
        while sent < total:
            caller.stdin.write(block)
            await caller.stdin.drain()
            sent += len(block)
        caller.stdin.write_eof()

    task = asyncio.ensure_future(produce())
    await _stalls(task, lambda: sent)
    assert len(service.stdin._buffer) <= 2 * 2**16 + 65536
    n = 0
    async with asyncio.timeout(HANG_GUARD):
        while data := await service.stdin.read(MiB):
            n += len(data)
        await task
    assert n == total
    await service.exit(0)
    assert await caller.exit_code() == 0
    await caller.aclose()


# -- a peer that goes away ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_service_gone_before_exit_code(channel_pair: PairFactory, how: str) -> None:
    caller, service = await open_ends(channel_pair)
    service.stdout.write(b"partial")
    await service.stdout.drain()
    if how == "close":
        await service.aclose()
    else:
        service.abort()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(ConnectionResetError):
            await caller.stdout.read()
        with pytest.raises(ConnectionResetError):
            await caller.exit_code()
        with pytest.raises(ConnectionResetError):
            await caller.stderr.read()
        with pytest.raises(ConnectionResetError):
            caller.stdin.write(b"more")
            await caller.stdin.drain()
    await caller.aclose()


async def test_service_gone_after_stdout_eof(channel_pair: PairFactory) -> None:
    """Complete output, then the channel ends without an exit code: output is intact,
    the exit code is an error."""
    caller, service = await open_ends(channel_pair)
    service.stdout.write(b"all of it")
    service.stdout.write_eof()
    service.stderr.write_eof()
    await service.stdout.drain()
    await service.aclose()
    async with asyncio.timeout(HANG_GUARD):
        assert await caller.stdout.read() == b"all of it"
        with pytest.raises(ConnectionResetError, match="before sending its exit code"):
            await caller.exit_code()
    await caller.aclose()


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_caller_gone_mid_call(channel_pair: PairFactory, how: str) -> None:
    """The service sees ConnectionResetError on stdin, drain() and exit()."""
    caller, service = await open_ends(channel_pair)
    caller.stdin.write(b"half")
    await caller.stdin.drain()
    assert await service.stdin.readexactly(4) == b"half"
    if how == "close":
        await caller.aclose()
    else:
        caller.abort()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(ConnectionResetError):
            await service.stdin.read()
        with pytest.raises(ConnectionResetError):
            service.stdout.write(b"x")
            await service.stdout.drain()
        with pytest.raises(ConnectionResetError):
            await service.exit(0)
        assert isinstance(await service.wait_lost(), ConnectionResetError)


async def test_caller_gone_while_service_blocked_writing(channel_pair: PairFactory) -> None:
    """A service blocked in drain() (the caller not reading) is woken with an error when
    the caller goes away."""
    caller, service = await open_ends(channel_pair)

    async def produce() -> None:
        block = bytes(MiB)
        while True:
            service.stdout.write(block)
            await service.stdout.drain()

    task = asyncio.ensure_future(produce())
    await asyncio.sleep(0.1)
    caller.abort()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(ConnectionResetError):
            await task
    service.abort()


async def test_handshake_refuses_version_1(channel_pair: PairFactory) -> None:
    (_cr, cw), (sr, sw) = await channel_pair()
    cw.write(w.frame(w.MSG_HELLO, w.encode_hello(1)))
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(w.QrexecProtocolError, match="version 1; at least 2") as e:
            await ServiceEnd.open(sr, sw)
    assert e.value.field == "version"
    with pytest.raises(ValueError, match="max_version"):
        await data_handshake(sr, sw, max_version=1)
    with pytest.raises(ValueError, match="max_version"):
        await data_handshake(sr, sw, max_version=5)


async def test_handshake_refuses_data_before_hello(channel_pair: PairFactory) -> None:
    (_cr, cw), (sr, sw) = await channel_pair()
    cw.write(w.frame(w.MSG_DATA_STDIN, b"early"))
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(w.QrexecProtocolError, match="expected MSG_HELLO first"):
            await ServiceEnd.open(sr, sw)
