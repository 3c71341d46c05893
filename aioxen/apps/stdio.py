"""Standard input and output as asynchronous byte streams, whatever they are connected to.

Theory of operation
-------------------
A command-line tool's stdin/stdout may be a pipe, a terminal, a socket, a regular file or
a device such as ``/dev/null``; the event loop can watch only some of these.  The
descriptor's type picks one of three backends:

* **pipe** -- FIFOs and character devices the selector accepts (terminals, ptys): the
  loop's own pipe transports (``connect_read_pipe`` / ``connect_write_pipe``), with a
  stdlib ``StreamReader`` bounding what is read ahead and the transport's write buffer
  limits (``pause_writing``) bounding what is queued.  Output to a character device
  (a terminal) is the exception: uvloop's write-pipe transport *reads* its descriptor to
  notice a closed pipe, and on a terminal -- one open file for stdin and stdout -- that
  swallows what the user types.  Such a sink writes with non-blocking ``os.write`` and
  waits for ``loop.add_writer`` readiness when the device is full (back-pressure, no
  reading);
* **socket** -- ``loop.sock_recv`` / ``loop.sock_sendall`` (a write-pipe transport would
  mistake incoming data on a bidirectional socket for the reader hanging up), and
  ``shutdown(SHUT_WR)`` as the end of stream;
* **file** -- regular files and devices the selector refuses (epoll rejects them with
  ``EPERM``; uvloop even aborts): blocking ``os.read``/``os.write`` in a worker thread.
  These never block for long.

Each object *owns* the descriptor it is given (pass a ``dup``) and closes it; closing the
last descriptor of a pipe is what tells the reader at its other end that the stream ended.
Non-blocking mode, which the first two backends set on the shared open file description
(a terminal is shared with the shell), is restored before the descriptor is closed.

A sink's [`ByteSink.write`][] raises ``BrokenPipeError`` once the reader is gone (the
pipe transport alone would drop the bytes silently).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import selectors
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import IO, TypeVar

T = TypeVar("T")

PIPE, SOCKET, FILE = "pipe", "socket", "file"


def fd_kind(fd: int) -> str:
    """``"pipe"``, ``"socket"`` or ``"file"``: which backend serves descriptor ``fd``."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        return SOCKET
    if (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)) and _pollable(fd):
        return PIPE
    return FILE


def _pollable(fd: int) -> bool:
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
    except (OSError, ValueError):
        return False
    else:
        return True
    finally:
        sel.close()


class _FdStream:
    """What sources and sinks share: the owned descriptor, its blocking mode to restore,
    and the closed flag."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.isatty = os.isatty(fd)
        self._was_blocking = os.get_blocking(fd)
        self._closed = False

    def _start_close(self) -> bool:
        """Mark the stream closed; True only the first time (then the caller releases)."""
        if self._closed:
            return False
        self._closed = True
        return True

    def _restore_blocking(self) -> None:
        with contextlib.suppress(OSError):
            os.set_blocking(self.fd, self._was_blocking)

    async def _open_pipe(self, mode: str, connect: Callable[[IO[bytes]], Awaitable[T]]) -> T:
        """Wrap the descriptor in an unbuffered file and hand it to a ``loop.connect_*_pipe``
        call; on failure restore the blocking mode and close it."""
        pipe = os.fdopen(self.fd, mode, buffering=0)
        try:
            return await connect(pipe)
        except BaseException:
            os.set_blocking(self.fd, self._was_blocking)
            pipe.close()
            raise


class ByteSource(_FdStream, abc.ABC):
    """An input stream: ``await read(n)`` returns 1..n bytes, ``b""`` at the end."""

    kind: str

    @abc.abstractmethod
    async def read(self, n: int) -> bytes: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Stop reading and close the descriptor (restoring its blocking mode)."""


class ByteSink(_FdStream, abc.ABC):
    """An output stream with back-pressure: ``await write(data)`` returns once ``data`` is
    handed over or queued within bounds."""

    kind: str

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close_write(self) -> None:
        """Flush everything written, then end the stream for the reader; closes the fd."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close at once, discarding anything queued (idempotent)."""


# -- pipes and terminals -----------------------------------------------------------------------


class _PipeSource(ByteSource):
    kind = PIPE

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__(fd)
        self._limit = limit
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = reader = asyncio.StreamReader(limit=self._limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        self._transport, _ = await self._open_pipe(
            "rb", lambda pipe: loop.connect_read_pipe(lambda: protocol, pipe)
        )

    async def read(self, n: int) -> bytes:
        assert self._reader is not None
        return await self._reader.read(n)

    def close(self) -> None:
        if self._start_close() and self._transport is not None:
            self._restore_blocking()
            self._transport.close()  # stops reading now, closes the fd on the next turn


class _SinkProtocol(asyncio.Protocol):
    """Flow control and loss for a write-pipe transport."""

    def __init__(self) -> None:
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self.lost = False
        self.exc: BaseException | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        while self._paused and not self.lost:
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w
        if self.lost:
            raise BrokenPipeError(32, "the reader of the output closed it") from self.exc


class _PipeSink(ByteSink):
    kind = PIPE

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._transport: asyncio.WriteTransport | None = None
        self._protocol: _SinkProtocol | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, self._protocol = await self._open_pipe(
            "wb", lambda pipe: loop.connect_write_pipe(_SinkProtocol, pipe)
        )

    async def write(self, data: bytes) -> None:
        transport, protocol = self._transport, self._protocol
        assert transport is not None and protocol is not None
        if protocol.lost or self._closed:
            raise BrokenPipeError(32, "the reader of the output closed it")
        transport.write(data)
        await protocol.drain()

    async def close_write(self) -> None:
        transport, protocol = self._transport, self._protocol
        assert transport is not None and protocol is not None
        if self._closed:
            return
        transport.set_write_buffer_limits(high=0)  # drain() now waits for an empty buffer
        await protocol.drain()
        self._closed = True
        self._restore_blocking()
        transport.close()
        await protocol.closed
        if protocol.exc is not None:
            raise BrokenPipeError(32, "the reader of the output closed it") from protocol.exc

    def abort(self) -> None:
        if self._closed or self._transport is None:
            return
        self._closed = True
        self._restore_blocking()
        self._transport.abort()


class _DeviceSink(ByteSink):
    """A pollable character device (a terminal): non-blocking ``os.write``, waiting for
    writability with ``loop.add_writer`` when it is full -- never reading from it."""

    kind = PIPE

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        os.set_blocking(fd, False)

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise BrokenPipeError(32, "output already closed")
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await self._writable()
                continue
            view = view[n:]

    async def _writable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(self.fd, ready)
        try:
            await fut
        finally:
            loop.remove_writer(self.fd)

    async def close_write(self) -> None:
        self.abort()  # nothing is queued: write() returns once the device took it all

    def abort(self) -> None:
        if self._start_close():
            self._restore_blocking()
            os.close(self.fd)


# -- sockets ---------------------------------------------------------------------------------


def _nonblocking_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _close_socket(sock: socket.socket, was_blocking: bool) -> None:
    with contextlib.suppress(OSError):
        sock.setblocking(was_blocking)
    sock.close()


class _SocketSource(ByteSource):
    kind = SOCKET

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._sock = _nonblocking_socket(fd)

    async def read(self, n: int) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self._sock, n)

    def close(self) -> None:
        if self._start_close():
            _close_socket(self._sock, self._was_blocking)


class _SocketSink(ByteSink):
    kind = SOCKET

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._sock = _nonblocking_socket(fd)

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise BrokenPipeError(32, "output already closed")
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def close_write(self) -> None:
        if not self._start_close():
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if not isinstance(exc, (BrokenPipeError, ConnectionError)) and exc.errno != 107:
                raise  # ENOTCONN (107): the peer already went away -- nothing to end
        finally:
            _close_socket(self._sock, self._was_blocking)

    def abort(self) -> None:
        if self._start_close():
            _close_socket(self._sock, self._was_blocking)


# -- regular files and unpollable devices ------------------------------------------------------


class _FileSource(ByteSource):
    kind = FILE

    async def read(self, n: int) -> bytes:
        return await asyncio.to_thread(os.read, self.fd, n)

    def close(self) -> None:
        if self._start_close():
            os.close(self.fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _FileSink(ByteSink):
    kind = FILE

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise BrokenPipeError(32, "output already closed")
        await asyncio.to_thread(_write_all, self.fd, data)

    async def close_write(self) -> None:
        self.abort()  # writes are synchronous: nothing is queued

    def abort(self) -> None:
        if self._start_close():
            os.close(self.fd)


# -- constructors ----------------------------------------------------------------------------


async def open_source(fd: int, *, limit: int = 2**16) -> ByteSource:
    """An input stream over ``fd`` (which it takes over and closes).  ``limit`` bounds the
    bytes read ahead from a pipe (the StreamReader pauses reading above twice that)."""
    kind = fd_kind(fd)
    if kind == SOCKET:
        return _SocketSource(fd)
    if kind == PIPE:
        src = _PipeSource(fd, limit)
        await src.start()
        return src
    return _FileSource(fd)


async def open_sink(fd: int) -> ByteSink:
    """An output stream over ``fd`` (which it takes over and closes)."""
    kind = fd_kind(fd)
    if kind == SOCKET:
        return _SocketSink(fd)
    if kind == PIPE:
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            return _DeviceSink(fd)
        sink = _PipeSink(fd)
        await sink.start()
        return sink
    return _FileSink(fd)


__all__ = [
    "FILE",
    "PIPE",
    "SOCKET",
    "ByteSink",
    "ByteSource",
    "fd_kind",
    "open_sink",
    "open_source",
]
