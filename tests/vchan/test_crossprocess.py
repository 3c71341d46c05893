"""vchan between real processes on the ``unix`` platform, through one ``aioxen xenstored``.

The peer process (``vchan_peer.py``) runs the same event loop kind as the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from vchan_harness import StoreWired, Xenstored
from vchan_peer import BLOCK, pattern_block

from aioxen import vchan
from aioxen.platforms.unix import UnixPlatform
from aioxen.xenstore import XenStoreClient

HERE = Path(__file__).resolve().parent
PARENT = 10  # the test process's domid
pytestmark = [pytest.mark.timeout(180), pytest.mark.crossprocess]


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            return (await self.proc.stdout.readline()).decode().strip()

    async def finish(self, timeout: float = 30) -> str:
        """Close stdin (servers exit) and return the rest of stdout."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        async with asyncio.timeout(timeout):
            out = await self.proc.stdout.read()
            assert await self.proc.wait() == 0
        return out.decode()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
async def spawn(xenstored: Xenstored) -> AsyncIterator[Spawn]:
    children: list[Child] = []
    loop_name = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"

    async def start(domid: int, *args: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "vchan_peer.py"),
            loop_name,
            *args,
            env=xenstored.env(domid),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = Child(proc)
        children.append(child)
        return child

    yield start
    for c in children:
        if c.proc.returncode is None:
            c.kill()
            await c.proc.wait()


@pytest.fixture
async def plat(xenstored: Xenstored) -> AsyncIterator[StoreWired]:
    """The test process as domain PARENT; what it opened must all be closed again."""
    inner = UnixPlatform(domid=PARENT, root=str(xenstored.root))
    p = StoreWired(inner, XenStoreClient.for_unix_socket(xenstored.socket, PARENT, timeout=10))
    await p.open()
    yield p
    leaks = p.leaks()
    await p.close()
    assert leaks == [], leaks


def stream_crc(seed: int, total: int) -> int:
    block = pattern_block(seed)
    crc = 0
    full, rest = divmod(total, BLOCK)
    for _ in range(full):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(block[:rest], crc)


@pytest.mark.parametrize(
    ("rsize", "wsize"), [(1024, 2048), (2048, 1024), (4096, 65536), (1 << 20, 1 << 20)]
)
async def test_echo_random_chunks_ring_sizes(
    spawn: Spawn, plat: StoreWired, rsize: int, wsize: int
) -> None:
    port = f"echo{rsize}-{wsize}"
    index = 2**32 - 2 * max(rsize, wsize) - 7
    server = await spawn(1, "serve-echo", str(PARENT), port, str(rsize), str(wsize), str(index))
    assert await server.line() == "READY"
    rng = random.Random(rsize ^ wsize)
    data = rng.randbytes(4 * max(rsize, wsize) + 100_003)
    async with vchan.connect(1, port, platform=plat) as (reader, writer):

        async def send() -> None:
            i = 0
            while i < len(data):
                n = rng.randint(1, 2 * max(rsize, wsize))
                writer.write(data[i : i + n])
                i += n
                await writer.drain()
            writer.write_eof()  # half-close: the echo ends when the server sees EOF

        task = asyncio.ensure_future(send())
        got = bytearray()
        while chunk := await reader.read(rng.randint(1, 300_000)):
            got += chunk
        await task
    assert bytes(got) == data
    assert "ACCEPTED 1" in await server.finish()


async def test_one_gib_with_checksum(spawn: Spawn, plat: StoreWired) -> None:
    total = 1 << 30
    result: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        crc = n = 0
        while data := await reader.read(1 << 20):
            crc = zlib.crc32(data, crc)
            n += len(data)
        writer.close()
        await writer.wait_closed()
        result.set_result((n, crc))

    server = await vchan.start_server(
        sink,
        2,
        "gib",
        platform=plat,
        read_size=1 << 20,
        write_size=1 << 20,
        initial_index=2**32 - 12345,
        limit=1 << 20,
    )
    async with server:
        child = await spawn(2, "source", str(PARENT), "gib", str(total), "7")
        assert await child.line() == "CONNECTED"
        expected = stream_crc(7, total)
        t0 = time.perf_counter()
        n, crc = await result
        elapsed = time.perf_counter() - t0
        assert n == total
        assert crc == expected
        assert await child.line() == f"SENT {total}"
        await child.finish()
    print(f"1 GiB cross-process: {total / elapsed / 2**30:.2f} GiB/s (incl. crc32)")


def check_prefix(got: bytes | bytearray, block: bytes) -> None:
    for off in range(0, len(got), BLOCK):
        piece = got[off : off + BLOCK]
        assert piece == block[: len(piece)], f"corrupt data at offset {off}"


async def test_kill_server_mid_stream(spawn: Spawn, plat: StoreWired) -> None:
    server = await spawn(1, "serve-source", str(PARENT), "killsrv")
    assert await server.line() == "READY"
    block = pattern_block(1)
    reader, writer = await vchan.open_connection(1, "killsrv", platform=plat)
    got = bytearray()
    while len(got) < 8 * BLOCK:
        got += await reader.read(1 << 20)
    server.kill()
    t0 = time.perf_counter()
    reset = False
    async with asyncio.timeout(1.0):  # the spec: ConnectionResetError within 1 s
        try:
            while data := await reader.read(1 << 20):
                got += data
        except ConnectionResetError:
            reset = True
    elapsed = time.perf_counter() - t0
    assert reset, "a killed peer's cut stream must not end in a clean EOF"
    check_prefix(got, block)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    assert elapsed < 1.0


async def test_kill_client_mid_stream(spawn: Spawn, plat: StoreWired) -> None:
    seen: asyncio.Queue[tuple[int, float | None]] = asyncio.Queue()
    got = bytearray()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        flowing = False
        try:
            while data := await reader.read(1 << 20):
                if len(got) < 4 * BLOCK:
                    got.extend(data)
                n += len(data)
                if n >= 4 * BLOCK and not flowing:
                    flowing = True
                    await seen.put((n, None))
        except ConnectionResetError:
            pass
        await seen.put((n, time.perf_counter()))
        writer.close()

    server = await vchan.start_server(handle, 3, "killcli", platform=plat)
    async with server:
        child = await spawn(3, "source", str(PARENT), "killcli", str(1 << 40), "1")
        assert await child.line() == "CONNECTED"
        await seen.get()  # data is flowing
        child.kill()
        t0 = time.perf_counter()
        async with asyncio.timeout(1.0):
            _, when = await seen.get()
        assert when is not None and when - t0 < 1.0
        check_prefix(got[: 4 * BLOCK], pattern_block(1))
        # the server keeps serving: a new client works
        child2 = await spawn(3, "source", str(PARENT), "killcli", "1000", "1")
        assert await child2.line() == "CONNECTED"
        assert await child2.line() == "SENT 1000"
        await child2.finish()
        assert server.accepted == 2


async def test_200_concurrent_connections(spawn: Spawn, plat: StoreWired) -> None:
    """200 connections open at the same time through one xenstored: 50 from this process
    and 50 from each of three client processes, to one server process."""
    server = await spawn(1, "serve-echo", f"{PARENT},4,5,6", "cc", "1024", "2048", "0")
    assert await server.line() == "READY"
    kids = [await spawn(d, "clients", "1", "cc", "50") for d in (4, 5, 6)]
    conns = await asyncio.gather(
        *(vchan.open_connection(1, "cc", platform=plat, timeout=60) for _ in range(50))
    )
    for i, (reader, writer) in enumerate(conns):
        msg = b"parent %d " % i * (i + 1)
        writer.write(msg)
        writer.write_eof()
        assert await reader.read() == msg
        writer.close()
        await writer.wait_closed()
    for kid in kids:
        assert await kid.line(timeout=120) == "OK 50"
        await kid.finish()
    assert "ACCEPTED 200" in await server.finish()
