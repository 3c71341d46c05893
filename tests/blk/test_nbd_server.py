"""The NBD server against real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img, qemu-io)
and against a raw-protocol client sending bad input.  The exported device here is a local
memory source; the blkfront export is tested in test_blk_nbd_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blk_helpers import run

from aioxen.blk import nbdwire as W
from aioxen.blk.device import SourceDevice
from aioxen.blk.nbd import start_server
from aioxen.blk.source import MemorySource

SIZE = 8 << 20


@contextlib.asynccontextmanager
async def served(source: MemorySource, name: str = "disk") -> AsyncIterator[str]:
    server = await start_server({name: SourceDevice(source)}, "127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"nbd://127.0.0.1:{port}/{name}"
    finally:
        server.close()
        await server.wait_closed()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_nbdinfo_reports_the_export() -> None:
    async with served(MemorySource(SIZE, sector_size=4096)) as uri:
        info = json.loads(await run("nbdinfo", "--json", uri))
    exp = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed"
    assert exp["export-size"] == SIZE
    assert exp["block_size_minimum"] == 4096
    assert exp["is_read_only"] is False
    assert exp["can_flush"] is True and exp["can_trim"] is True and exp["can_zero"] is True


async def test_nbdcopy_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "in.img"
    data = random.Random(7).randbytes(SIZE)
    src.write_bytes(data)
    out = tmp_path / "out.img"
    source = MemorySource(SIZE)
    async with served(source) as uri:
        await run("nbdcopy", str(src), uri)
        assert sha(bytes(source.data)) == sha(data)
        await run("nbdcopy", uri, str(out))
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "q.img"))
    assert sha(out.read_bytes()) == sha(data)
    assert sha((tmp_path / "q.img").read_bytes()) == sha(data)


async def test_qemu_io_random_io_matches_reference() -> None:
    rng = random.Random(11)
    ref = bytearray(SIZE)
    source = MemorySource(SIZE)
    cmds: list[str] = []
    for _ in range(60):
        off = rng.randrange(0, SIZE - 70000)
        length = rng.randrange(1, 65536)  # unaligned offsets and lengths on purpose
        kind = rng.random()
        if kind < 0.5:
            pat = rng.randrange(1, 256)
            cmds.append(f"write -P {pat} {off} {length}")
            ref[off : off + length] = bytes([pat]) * length
        elif kind < 0.6:
            cmds.append(f"write -z {off} {length}")
            ref[off : off + length] = bytes(length)
        elif kind < 0.7:
            cmds.append("flush")
        else:
            # read back a region we know: -P checks it holds one byte value
            pat = ref[off]
            run_len = 1
            while run_len < length and ref[off + run_len] == pat:
                run_len += 1
            cmds.append(f"read -P {pat} {off} {run_len}")
    async with served(source) as uri:
        args = ["qemu-io", "-f", "raw", uri]
        for c in cmds:
            args += ["-c", c]
        out = await run(*args)
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    assert bytes(source.data) == bytes(ref)


async def test_read_only_export() -> None:
    source = MemorySource(SIZE, readonly=True)
    async with served(source) as uri:
        info = json.loads(await run("nbdinfo", "--json", uri))
        assert info["exports"][0]["is_read_only"] is True
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", uri, "-c", "write -P 1 0 4096",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert b"wrote" not in out
    assert not any(source.data)


# ---------------------------------------------------------------------------- raw client


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    async def greet(self, flags: int = W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES) -> None:
        magic, opt, hflags = W.GREETING.unpack(await self.r.readexactly(18))
        assert (magic, opt) == (W.NBDMAGIC, W.IHAVEOPT)
        assert hflags & W.FLAG_FIXED_NEWSTYLE
        self.w.write(struct.pack(">I", flags))

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.w.write(W.OPTION_HEADER.pack(W.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, kind, length = W.OPTION_REPLY.unpack(await self.r.readexactly(20))
            assert magic == W.OPTION_REPLY_MAGIC and o == opt
            replies.append((kind, await self.r.readexactly(length)))
            if kind == W.REP_ACK or kind & W.REP_ERR:
                return replies

    async def go(self, name: str = "disk") -> tuple[int, int]:
        raw = name.encode()
        replies = await self.option(W.OPT_GO, struct.pack(">I", len(raw)) + raw + b"\0\0")
        assert replies[-1][0] == W.REP_ACK, replies
        for kind, data in replies:
            if kind == W.REP_INFO and struct.unpack_from(">H", data)[0] == W.INFO_EXPORT:
                _, size, flags = W.INFO_EXPORT_ITEM.unpack(data)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT")

    async def cmd(
        self, kind: int, offset: int, length: int, data: bytes = b"", cookie: int = 1
    ) -> tuple[int, bytes]:
        self.w.write(W.request(kind, cookie, offset, length) + data)
        magic, err, ck = W.SIMPLE_REPLY.unpack(await self.r.readexactly(16))
        assert magic == W.SIMPLE_REPLY_MAGIC and ck == cookie
        body = await self.r.readexactly(length) if kind == W.CMD_READ and err == 0 else b""
        return err, body


@contextlib.asynccontextmanager
async def raw_client(source: MemorySource) -> AsyncIterator[RawClient]:
    server = await start_server({"disk": SourceDevice(source)}, "127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_raw_options_and_errors() -> None:
    async with raw_client(MemorySource(1 << 20, readonly=True)) as c:
        await c.greet()
        assert (await c.option(99))[-1][0] == W.REP_ERR_UNSUP
        assert (await c.option(W.OPT_GO, b"\x00\x00\x00\x09ab"))[-1][0] == W.REP_ERR_INVALID
        assert (await c.option(W.OPT_GO, b"\0\0\0\x04nope\0\0"))[-1][0] == W.REP_ERR_UNKNOWN
        listing = await c.option(W.OPT_LIST)
        assert listing[0] == (W.REP_SERVER, b"\0\0\0\x04disk")
        assert (await c.option(W.OPT_STARTTLS))[-1][0] == W.REP_ERR_UNSUP
        size, flags = await c.go()
        assert size == 1 << 20 and flags & W.FLAG_READ_ONLY
        assert (await c.cmd(W.CMD_READ, (1 << 20) - 512, 1024))[0] == W.EINVAL
        assert (await c.cmd(W.CMD_WRITE, 0, 512, bytes(512)))[0] == W.EPERM
        assert (await c.cmd(W.CMD_TRIM, 0, 512))[0] == W.EPERM
        assert (await c.cmd(77, 0, 0))[0] == W.EINVAL
        err, body = await c.cmd(W.CMD_READ, 100, 1000)  # the session survived the errors
        assert err == 0 and body == bytes(1000)


async def test_raw_unaligned_and_concurrent_writes() -> None:
    source = MemorySource(1 << 20)
    async with raw_client(source) as c:
        await c.greet()
        await c.go()
        rng = random.Random(3)
        pending = {}
        for cookie in range(1, 200):  # many requests in flight, unaligned, some overlapping
            off = rng.randrange(0, (1 << 20) - 3000)
            data = rng.randbytes(rng.randrange(1, 3000))
            c.w.write(W.request(W.CMD_WRITE, cookie, off, len(data)) + data)
            pending[cookie] = (off, data)
        seen = set()
        for _ in pending:
            magic, err, ck = W.SIMPLE_REPLY.unpack(await c.r.readexactly(16))
            assert magic == W.SIMPLE_REPLY_MAGIC and err == 0
            seen.add(ck)
        assert seen == set(pending)
        # overlapping writes in flight together have no defined order: check every byte
        # that exactly one write covered
        cover = bytearray(1 << 20)
        for off, data in pending.values():
            for i in range(off, off + len(data)):
                cover[i] = min(cover[i] + 1, 2)
        for off, data in pending.values():
            for i in range(len(data)):
                if cover[off + i] == 1:
                    assert source.data[off + i] == data[i], f"byte {off + i}"
        err, body = await c.cmd(W.CMD_READ, 0, 4096, cookie=999)
        assert err == 0 and body == bytes(source.data[:4096])


async def test_bad_magic_and_client_flags_close_the_session() -> None:
    async with raw_client(MemorySource(1 << 20)) as c:
        await c.greet(flags=0x80)  # unknown client flag: server hangs up
        assert await asyncio.wait_for(c.r.read(), 10) == b""
    async with raw_client(MemorySource(1 << 20)) as c:
        await c.greet()
        await c.go()
        c.w.write(b"\xde\xad\xbe\xef" + bytes(24))
        assert await asyncio.wait_for(c.r.read(), 10) == b""


@pytest.mark.parametrize("structured", [True, False])
async def test_structured_replies(structured: bool) -> None:
    source = MemorySource(1 << 20)
    source.data[:8] = b"abcdefgh"
    async with raw_client(source) as c:
        await c.greet()
        if structured:
            assert (await c.option(W.OPT_STRUCTURED_REPLY))[-1][0] == W.REP_ACK
        await c.go()
        c.w.write(W.request(W.CMD_READ, 5, 2, 4))
        if structured:
            magic, flags, kind, cookie, length = W.STRUCTURED_REPLY.unpack(
                await c.r.readexactly(20)
            )
            assert (magic, kind, cookie, length) == (
                W.STRUCTURED_REPLY_MAGIC, W.REPLY_TYPE_OFFSET_DATA, 5, 12,
            )  # fmt: skip
            assert flags & W.REPLY_FLAG_DONE
            assert await c.r.readexactly(12) == struct.pack(">Q", 2) + b"cdef"
            c.w.write(W.request(W.CMD_READ, 6, 1 << 20, 4))
            magic, flags, kind, cookie, length = W.STRUCTURED_REPLY.unpack(
                await c.r.readexactly(20)
            )
            assert kind == W.REPLY_TYPE_ERROR and cookie == 6
            err, _mlen = struct.unpack(">IH", (await c.r.readexactly(length))[:6])
            assert err == W.EINVAL
        else:
            magic, err, cookie = W.SIMPLE_REPLY.unpack(await c.r.readexactly(16))
            assert (err, cookie) == (0, 5)
            assert await c.r.readexactly(4) == b"cdef"


def test_os_error_mapping() -> None:
    from aioxen.blk.nbd import nbd_errno

    assert nbd_errno(PermissionError()) == W.EPERM
    assert nbd_errno(OSError(errno.ENOSPC, "full")) == W.ENOSPC
    assert nbd_errno(OSError(errno.EOPNOTSUPP, "no")) == W.ENOTSUP
    assert nbd_errno(RuntimeError()) == W.EIO


# ---------------------------------------------------------------------------- shutdown


class GatedDevice(SourceDevice):
    """Reads wait until ``gate`` opens (a request kept in flight on purpose)."""

    def __init__(self, source: MemorySource) -> None:
        super().__init__(source)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def read_into(self, sector: int, buf: memoryview | bytearray) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().read_into(sector, buf)


async def test_shutdown_answers_in_flight_then_closes() -> None:
    """Server shutdown (what ``blkfront nbd`` does on SIGTERM): a request in flight is
    answered in full, a request sent after the shutdown began gets no reply and the
    client sees the connection close -- never a clean-looking success."""
    source = MemorySource(1 << 20)
    source.data[:4096] = bytes(range(256)) * 16
    dev = GatedDevice(source)
    server = await start_server({"disk": dev}, "127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        c = RawClient(reader, writer)
        await c.greet()
        await c.go()
        c.w.write(W.request(W.CMD_READ, 1, 0, 4096))
        await asyncio.wait_for(dev.waiting.wait(), 10)
        stopping = asyncio.ensure_future(server.shutdown(timeout=30))
        await asyncio.sleep(0)
        c.w.write(W.request(W.CMD_READ, 2, 0, 512))  # after the shutdown began
        dev.gate.set()
        reply = await asyncio.wait_for(c.r.readexactly(16), 10)
        _, err, cookie = W.SIMPLE_REPLY.unpack(reply)
        assert (err, cookie) == (0, 1)
        assert await c.r.readexactly(4096) == bytes(source.data[:4096])
        assert await asyncio.wait_for(c.r.read(), 10) == b""  # no reply to cookie 2: closed
        writer.close()  # as an NBD client does at the server's EOF
        await asyncio.wait_for(stopping, 30)
        assert not server.is_serving()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        server.close()


async def test_shutdown_cuts_a_request_that_does_not_finish() -> None:
    """A request still running when the shutdown's bound expires: the connection is
    aborted, so the client gets an error (reset / EOF without the reply)."""
    dev = GatedDevice(MemorySource(1 << 20))
    server = await start_server({"disk": dev}, "127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        c = RawClient(reader, writer)
        await c.greet()
        await c.go()
        c.w.write(W.request(W.CMD_READ, 1, 0, 4096))
        await asyncio.wait_for(dev.waiting.wait(), 10)
        await asyncio.wait_for(server.shutdown(timeout=0.2), 30)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(c.r.readexactly(16), 10)
    finally:
        dev.gate.set()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        server.close()


async def test_unix_listen_path_is_owned(tmp_path: Path) -> None:
    """A Unix socket path a live server listens on is refused (EADDRINUSE naming the pid,
    the live socket untouched); a dead server's socket is replaced; close removes only
    the server's own socket."""
    import os

    path = str(tmp_path / "nbd.sock")
    dev = SourceDevice(MemorySource(1 << 20))
    first = await start_server({"disk": dev}, f"unix:{path}")
    try:
        inode = os.lstat(path).st_ino
        with pytest.raises(OSError) as info:
            await start_server({"disk": dev}, f"unix:{path}")
        assert info.value.errno == errno.EADDRINUSE
        assert path in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert os.lstat(path).st_ino == inode
        r, w = await asyncio.open_unix_connection(path)  # the first still answers
        assert (await r.readexactly(8)) == struct.pack(">Q", W.NBDMAGIC)
        w.close()
    finally:
        first.close()
        await first.wait_closed()
    assert not os.path.exists(path)  # its own socket, removed on close
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket nobody listens on any more: a dead server's
    stale.close()
    second = await start_server({"disk": dev}, f"unix:{path}")
    try:
        assert os.path.exists(path)
    finally:
        second.close()
        await second.wait_closed()
    with pytest.raises(FileExistsError):  # not a socket: never removed
        (tmp_path / "plain").write_text("keep")
        await start_server({"disk": dev}, f"unix:{tmp_path / 'plain'}")
    assert (tmp_path / "plain").read_text() == "keep"


async def test_max_connections_closes_the_one_too_many_before_the_greeting() -> None:
    """``max_connections=2``: two sessions get the greeting and stay served; more are
    closed at once (EOF, no greeting) until one of the two ends; then a real NBD client
    (nbdinfo) is served again."""
    server = await start_server(
        {"disk": SourceDevice(MemorySource(SIZE))}, "127.0.0.1:0", max_connections=2
    )
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:

        async def greeted() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            (magic,) = struct.unpack(">Q", await asyncio.wait_for(r.readexactly(8), 30))
            assert magic == W.NBDMAGIC
            return r, w

        held = [await greeted(), await greeted()]
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(), 30) == b""  # no greeting
            w.close()
        assert len(server.connections) == 2
        _r, w = held.pop()
        w.close()
        async with asyncio.timeout(30):
            while len(server.connections) > 1:
                await asyncio.sleep(0.01)
        info = json.loads(await run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/disk"))
        assert info["exports"][0]["export-size"] == SIZE
        for _r, w in held:
            w.close()
    finally:
        server.close()
        await server.wait_closed()


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(start_server({"disk": SourceDevice(MemorySource(SIZE))}, max_connections=0))
