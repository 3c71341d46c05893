"""A cut stream is never a clean EOF (issue 13, finding 4).

A writer that calls ``close()`` and leaves ``async with aioxen.platform()`` without
``wait_closed()`` used to die with ``BufferError`` and leave its reader with a prefix and an
ordinary EOF.  Now closing a platform flushes a ``close()`` in progress (bounded by
``close_timeout``) and aborts everything else; a reader whose peer went away without ending
its stream gets ``ConnectionResetError``.  Real processes on the ``unix`` platform (the
writer is ``cut_peer.py``, on the test's loop kind), and both platforms of one process on
``inheap``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cut_peer import pattern
from vchan_harness import Xenstored

from aioxen import vchan
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld
from aioxen.platforms.unix import UnixPlatform

HERE = Path(__file__).resolve().parent
READER, WRITER = 10, 3
TOTAL = 8 << 20
pytestmark = [pytest.mark.timeout(120), pytest.mark.crossprocess]


class Outcome:
    """What a reader saw: the bytes, then ``"eof"`` or the exception."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.end: str | BaseException | None = None
        self.done = asyncio.Event()
        self.go = asyncio.Event()  # the reader starts reading once this is set
        self.go.set()

    async def read_all(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"G")  # the writer starts once it knows we accepted it
            await self.go.wait()
            while chunk := await reader.read(1 << 20):
                self.data += chunk
            self.end = "eof"
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.end = exc
        finally:
            writer.close()
            self.done.set()

    def assert_complete(self) -> None:
        assert self.end == "eof", self.end
        assert len(self.data) == TOTAL
        assert self.data == pattern(TOTAL)

    def assert_cut(self) -> None:
        """Never a short prefix followed by EOF: a reset, after a correct prefix."""
        assert isinstance(self.end, ConnectionResetError), (self.end, len(self.data))
        assert "without ending its stream" in str(self.end)
        assert len(self.data) < TOTAL
        assert self.data == pattern(TOTAL)[: len(self.data)]


def loop_name() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


@pytest.fixture
async def plat(xenstored: Xenstored) -> AsyncIterator[UnixPlatform]:
    """The test process as the reading domain; it must close cleanly."""
    p = UnixPlatform(domid=READER, root=str(xenstored.root))
    async with p:
        yield p
        assert p.leaks() == []


async def writer_process(
    xenstored: Xenstored, mode: str, port: str, close_timeout: float = 10.0
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "cut_peer.py"),
        loop_name(),
        mode,
        str(READER),
        port,
        str(TOTAL),
        str(close_timeout),
        env=xenstored.env(WRITER),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def serve_one(
    plat: UnixPlatform, xenstored: Xenstored, mode: str, port: str, out: Outcome, **kw: float
) -> tuple[int, bytes, bytes]:
    server = await vchan.start_server(out.read_all, WRITER, port, platform=plat)
    async with server:
        proc = await writer_process(xenstored, mode, port, **kw)
        async with asyncio.timeout(60):
            stdout, stderr = await proc.communicate()
            await out.done.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout, stderr


async def test_close_then_leave_platform_flushes(plat: UnixPlatform, xenstored: Xenstored) -> None:
    """write(8 MiB); close(); leave the platform without wait_closed(): all 8 MiB, EOF."""
    out = Outcome()
    rc, stdout, stderr = await serve_one(plat, xenstored, "close", "cutclose", out)
    assert (rc, stderr) == (0, b"")
    assert stdout == b"CONNECTED\nLEFT\n"
    out.assert_complete()


async def test_close_flush_timeout_is_a_reset(plat: UnixPlatform, xenstored: Xenstored) -> None:
    """The reader does not read until the writer has left: the bounded flush runs out, the
    writer aborts, and the reader sees the prefix that fit the ring, then a reset."""
    out = Outcome()
    out.go.clear()

    server = await vchan.start_server(out.read_all, WRITER, "cuttime", platform=plat)
    async with server:
        proc = await writer_process(xenstored, "close", "cuttime", close_timeout=0.2)
        async with asyncio.timeout(60):
            stdout, stderr = await proc.communicate()
            out.go.set()
            await out.done.wait()
    assert (proc.returncode, stderr) == (0, b"")
    assert stdout == b"CONNECTED\nLEFT\n"
    out.assert_cut()


@pytest.mark.parametrize("mode", ["open", "abort"])
async def test_leave_open_or_abort_is_a_reset(
    plat: UnixPlatform, xenstored: Xenstored, mode: str
) -> None:
    out = Outcome()
    rc, stdout, stderr = await serve_one(plat, xenstored, mode, f"cut{mode}", out)
    assert (rc, stderr) == (0, b"")
    assert stdout == b"CONNECTED\nLEFT\n"
    out.assert_cut()


async def test_killed_writer_is_a_reset(plat: UnixPlatform, xenstored: Xenstored) -> None:
    """SIGKILL mid-stream: whatever was read is a correct prefix, then a reset."""
    out = Outcome()
    out.go.clear()
    server = await vchan.start_server(out.read_all, WRITER, "cutkill", platform=plat)
    async with server:
        proc = await writer_process(xenstored, "forever", "cutkill")
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            assert await proc.stdout.readline() == b"CONNECTED\n"
            out.go.set()
            while len(out.data) < TOTAL // 2 and not out.done.is_set():
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await out.done.wait()
    assert proc.returncode == -signal.SIGKILL
    assert isinstance(out.end, ConnectionResetError), out.end
    assert len(out.data) >= TOTAL // 2
    # the writer repeats pattern(TOTAL); what arrived is a correct prefix of that
    whole = pattern(TOTAL)
    for off in range(0, len(out.data), TOTAL):
        piece = out.data[off : off + TOTAL]
        assert piece == whole[: len(piece)], f"corrupt data at offset {off}"


# -- one process, inheap ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "close_timeout"), [("close", 10.0), ("close", 0.0), ("open", 10.0), ("abort", 10.0)]
)
async def test_inheap_leave_platform(mode: str, close_timeout: float) -> None:
    world = InHeapWorld()
    out = Outcome()
    async with InHeapPlatform(READER, world) as rplat:
        server = await vchan.start_server(out.read_all, WRITER, "cut", platform=rplat)
        async with server:
            async with InHeapPlatform(WRITER, world) as wplat:
                wplat.close_timeout = close_timeout
                wreader, writer = await vchan.open_connection(READER, "cut", platform=wplat)
                assert await wreader.readexactly(1) == b"G"
                writer.write(pattern(TOTAL))
                if mode == "close":
                    writer.close()
                elif mode == "abort":
                    writer.transport.abort()
            # the writer's platform is closed: no BufferError, everything released
            assert wplat.leaks() == []
            async with asyncio.timeout(30):
                await out.done.wait()
            flushed = mode == "close" and close_timeout > 0
            if mode == "abort" or flushed:
                await writer.wait_closed()
            else:  # the platform aborted it: the local side learns it too
                with pytest.raises(ConnectionAbortedError, match="platform closed"):
                    await writer.wait_closed()
    world.assert_cleaned_up()
    if flushed:
        out.assert_complete()
    else:
        out.assert_cut()


@pytest.mark.parametrize("kind", ["inheap", "unix"])
async def test_leave_platform_with_a_server_still_serving(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A server nobody closed: leaving the platform closes it first (its waiting endpoint
    pins shared pages) -- no BufferError, nothing left shared or advertised."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    if kind == "inheap":
        world = InHeapWorld()
        plat: InHeapPlatform | UnixPlatform = InHeapPlatform(READER, world)
    else:
        xenstored: Xenstored = request.getfixturevalue("xenstored")
        plat = UnixPlatform(domid=READER, root=str(xenstored.root))
    async with plat:
        server = await vchan.start_server(handler, WRITER, "left", platform=plat)
        path = server.path
    assert plat.leaks() == []
    if kind == "inheap":
        world.assert_cleaned_up()
        async with InHeapPlatform(0, world) as dom0:
            assert not await dom0.store.exists(path)
    del server


def test_ends_bit_is_set_in_the_peers_byte_and_survives_clears() -> None:
    """The wire: ``announce_ends`` ORs 0x40 into the *peer's* notify byte; the reader sees
    it in its own byte, and the notify traffic (bits 0x1/0x2, set and test-and-cleared
    with atomics, as libxenvchan does) leaves it alone."""
    import mmap

    from aioxen.vchan import wire

    page = 4096
    mem = mmap.mmap(-1, page)
    ctrl = memoryview(mem)
    wire.init_server_page(ctrl, 10, 11, [], [])
    untouched = bytes(ctrl[: wire.HEADER_SIZE])  # libxenvchan's fresh page, byte for byte
    server = wire.VchanCore(ctrl, ctrl[1024:2048], ctrl[2048:4096], is_server=True)
    client = wire.VchanCore(ctrl, ctrl[2048:4096], ctrl[1024:2048], is_server=False)
    assert bytes(ctrl[: wire.HEADER_SIZE]) == untouched  # cores write nothing by themselves
    ctrl[wire.CLI_LIVE] = 1
    ctrl[wire.SRV_NOTIFY] = wire.NOTIFY_WRITE  # the client's one plain store, at connect
    client.announce_ends()
    assert ctrl[wire.SRV_NOTIFY] == wire.NOTIFY_WRITE | wire.NOTIFY_ENDS
    assert server.peer_announced_ends() and not client.peer_announced_ends()
    server.announce_ends()
    assert client.peer_announced_ends()
    for _ in range(3):  # data both ways with every notify request set: bits 0x1/0x2 cleared
        ctrl[wire.SRV_NOTIFY] |= wire.NOTIFY_READ | wire.NOTIFY_WRITE
        ctrl[wire.CLI_NOTIFY] |= wire.NOTIFY_READ | wire.NOTIFY_WRITE
        assert client.send(b"ping", 4) == 4 and server.send(b"pong", 4) == 4
        for core in (server, client):
            _, n = core.read_span()
            assert n == 4
            core.consume(n)
    assert ctrl[wire.SRV_NOTIFY] & wire.NOTIFY_ENDS and ctrl[wire.CLI_NOTIFY] & wire.NOTIFY_ENDS
    assert not server.peer_eof()  # 0x40 is not the EOF bit
    client.shutdown_write()
    assert server.peer_eof() and server.peer_announced_ends()
    server.release()
    client.release()
    ctrl.release()
    mem.close()
