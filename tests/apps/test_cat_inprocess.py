"""``run_cat`` inside the test's event loop (asyncio and uvloop), on an inheap world, with
stdin/stdout of every kind: regular files, pipes, sockets.  The subprocess tests cover the
command; these cover each stdio backend on both loops."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from aioxen import vchan
from aioxen.apps.cat import CatOptions, run_cat
from aioxen.apps.stdio import FILE, PIPE, SOCKET, fd_kind
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld

SERVICE, CLIENT = 0, 2
MiB = 1024 * 1024


@pytest.fixture
async def plats() -> AsyncIterator[tuple[InHeapPlatform, InHeapPlatform]]:
    w = InHeapWorld()
    p0, p2 = InHeapPlatform(SERVICE, w), InHeapPlatform(CLIENT, w)
    await p0.open()
    await p2.open()
    yield p0, p2
    async with asyncio.timeout(10):
        while p0.leaks() or p2.leaks():
            await asyncio.sleep(0.01)
    await p0.close()
    await p2.close()
    assert w.leaks() == []


async def reverse_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads everything, then answers with the bytes reversed (needs the EOF)."""
    data = await reader.read()
    writer.write(data[::-1])
    await writer.drain()
    writer.close()


class Stdio:
    """A (stdin fd, stdout fd) pair of one kind, fed and collected by threads."""

    def __init__(self, kind: str, data: bytes, tmp: Path) -> None:
        self.kind = kind
        self.out = bytearray()
        self.threads: list[threading.Thread] = []
        if kind == FILE:
            (tmp / "in").write_bytes(data)
            self.stdin = os.open(tmp / "in", os.O_RDONLY)
            self.stdout = os.open(tmp / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            self._collect: Callable[[], bytes] = lambda: (tmp / "out").read_bytes()
        elif kind == PIPE:
            self.stdin, w_in = os.pipe()
            r_out, self.stdout = os.pipe()
            self._spawn(self._feed_fd, w_in, data)
            self._spawn(self._drain_fd, r_out)
            self._collect = lambda: bytes(self.out)
        else:
            ours, theirs = socket.socketpair()
            self.stdin = theirs.detach()
            self.stdout = os.dup(self.stdin)
            self._spawn(self._talk_socket, ours, data)
            self._collect = lambda: bytes(self.out)
        assert fd_kind(self.stdin) == kind and fd_kind(self.stdout) == kind

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    @staticmethod
    def _feed_fd(fd: int, data: bytes) -> None:
        with io.FileIO(fd, "wb") as f:
            f.write(data)

    def _drain_fd(self, fd: int) -> None:
        with io.FileIO(fd, "rb") as f:
            while chunk := f.read(65536):
                self.out += chunk

    def _talk_socket(self, sock: socket.socket, data: bytes) -> None:
        with sock:
            sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(1)))
            sender.start()
            while chunk := sock.recv(65536):
                self.out += chunk
            sender.join()

    async def result(self) -> bytes:
        for t in self.threads:
            await asyncio.to_thread(t.join, 30)
        return self._collect()


@pytest.mark.parametrize("kind", [FILE, PIPE, SOCKET])
async def test_client_through_each_kind_of_stdio(
    kind: str, plats: tuple[InHeapPlatform, InHeapPlatform], tmp_path: Path
) -> None:
    p0, p2 = plats
    data = os.urandom(MiB + 321)
    server = await vchan.start_server(reverse_service, CLIENT, "rev", platform=p0, write_size=4096)
    async with server:
        stdio = Stdio(kind, data, tmp_path)
        opts = CatOptions(domid=SERVICE, port="rev", timeout=10)
        err = io.StringIO()
        status = await run_cat(opts, stdio.stdin, stdio.stdout, stderr=err, platform=p2)
        assert (status, err.getvalue()) == (0, "")
        assert await stdio.result() == data[::-1]


async def test_listener_in_process(
    plats: tuple[InHeapPlatform, InHeapPlatform], tmp_path: Path
) -> None:
    """``-l`` serves one vchan client; both directions checksummed."""
    p0, p2 = plats
    data_in = os.urandom(2 * MiB)
    data_back = os.urandom(3 * MiB)
    stdio = Stdio(PIPE, data_in, tmp_path)
    opts = CatOptions(domid=CLIENT, port="lst", listen=True, buffer_size=8192, timeout=10)
    listener = asyncio.ensure_future(run_cat(opts, stdio.stdin, stdio.stdout, platform=p0))
    reader, writer = await vchan.open_connection(SERVICE, "lst", platform=p2, timeout=10)

    async def send() -> None:
        writer.write(data_back)
        await writer.drain()
        writer.write_eof()

    _, got = await asyncio.gather(send(), reader.read())
    writer.close()
    await writer.wait_closed()
    assert await listener == 0
    assert hashlib.sha256(got).digest() == hashlib.sha256(data_in).digest()
    assert await stdio.result() == data_back
