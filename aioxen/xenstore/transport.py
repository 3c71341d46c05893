"""Byte transports for the XenStore client: Unix socket, ``/dev/xen/xenbus``, in-process.

Theory of operation
-------------------
A transport moves whole [`Message`][aioxen.xenstore.wire.Message] objects.  The client opens
it with two callbacks -- ``on_message(msg)`` for every reply or watch event, and
``on_lost(exc)`` once when the connection ends -- and then calls ``send(msg)``.

* [`SocketTransport`][] -- xenstored's Unix stream socket, read by a plain
  `asyncio.Protocol` (messages, not a byte stream, so no StreamReader) with corked
  writes ([`CorkedOutput`][aioxen.xenstore._cork.CorkedOutput]).  Replies are matched to requests
  by ``req_id``, so any number of requests may be in flight.
* [`XenbusTransport`][] -- the Linux ``/dev/xen/xenbus`` character device.  Each
  ``write`` must carry whole messages of at most 4096 bytes including the header.  The
  kernel answers WATCH/UNWATCH itself and its WATCH_EVENT headers carry garbage
  ``req_id``/``tx_id`` (reference §3.4); older kernels do not echo ``req_id`` faithfully
  either.  This transport therefore allows one request in flight ([`max_in_flight`][])
  and stamps the in-flight ``req_id`` onto whatever non-event message comes back.
* [`InProcessTransport`][] -- no bytes at all: messages go straight to an
  [`Engine`][aioxen.xenstore.engine.Engine] connection, and its output is delivered on the
  event loop with ``call_soon`` (never re-entrantly), so ``inheap`` behaves like a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from aioxen.errors import ProtocolError
from aioxen.xenstore._cork import CorkedOutput
from aioxen.xenstore.wire import HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Decoder, Message, XsType

if TYPE_CHECKING:
    from aioxen.xenstore.engine import Engine, EngineConnection

log = logging.getLogger(__name__)

OnMessage = Callable[[Message], None]
OnLost = Callable[[BaseException | None], None]

DEFAULT_SOCKET = "/var/run/xenstored/socket"
DEFAULT_XENBUS = "/dev/xen/xenbus"


def default_socket_path() -> str:
    """``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``, else the Xen default."""
    path = os.environ.get("XENSTORED_PATH")
    if path:
        return path
    rundir = os.environ.get("XENSTORED_RUNDIR")
    if rundir:
        return os.path.join(rundir, "socket")
    return DEFAULT_SOCKET


class Transport(Protocol):
    max_in_flight: int | None
    description: str

    async def open(self, on_message: OnMessage, on_lost: OnLost) -> None: ...

    def send(self, msg: Message) -> None: ...

    def backlog(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


class SocketTransport:
    """xenstored's Unix stream socket.

    The reader is a plain `asyncio.Protocol`: ``data_received`` decodes and hands
    replies to ``on_message`` directly (no reader task, no extra loop iteration per reply).
    Sends are *corked* after the first: the first message goes out at once, and every
    message sent after it before the loop runs its next callbacks goes out in one more
    ``write`` -- so requests issued together (``asyncio.gather``, a transaction's pipelined
    writes) cost two system calls here however many they are, and xenstored answers each
    batch it reads with one write.  A lone request pays no extra loop iteration.  A batch
    known as such ([`send_many`][], the client's ``read_many``/``write_many`` and
    [`Batch`][aioxen.xenstore.client.Batch]) leaves in one write.
    """

    max_in_flight: int | None = None

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"xenstored socket {path}"
        self._protocol: _SocketProtocol | None = None

    async def open(self, on_message: OnMessage, on_lost: OnLost) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_unix_connection(
                lambda: _SocketProtocol(self.description, on_message, on_lost), self.path
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "no xenstored socket (is xenstored running?)", self.path
            ) from None
        except ConnectionRefusedError:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, "xenstored refused the connection", self.path
            ) from None
        self._protocol = protocol

    def send(self, msg: Message) -> None:
        protocol = self._protocol
        if protocol is None or protocol.closing:
            raise ConnectionResetError(
                errno.ECONNRESET, "xenstored connection is closed", self.path
            )
        protocol.send(msg.encode())

    def send_many(self, msgs: list[Message]) -> None:
        """Send ``msgs`` back to back in *one* ``write`` (a pipelined batch: xenstored
        reads it at once and answers with one write)."""
        protocol = self._protocol
        if protocol is None or protocol.closing:
            raise ConnectionResetError(
                errno.ECONNRESET, "xenstored connection is closed", self.path
            )
        protocol.send(b"".join([m.encode() for m in msgs]))

    @property
    def writes(self) -> int:
        """Writes to the socket so far (a pipelined batch is one)."""
        protocol = self._protocol
        return protocol.writes if protocol is not None else 0

    def backlog(self) -> int:
        protocol = self._protocol
        return protocol.backlog() if protocol is not None else 0

    async def drain(self) -> None:
        if self._protocol is not None:
            await self._protocol.drain()

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            await protocol.close()


class _SocketProtocol(asyncio.Protocol):
    """The socket's protocol: decode replies straight to ``on_message``; cork sends."""

    def __init__(self, description: str, on_message: OnMessage, on_lost: OnLost) -> None:
        self._description = description
        self._on_message = on_message
        self._on_lost: OnLost | None = on_lost
        self._decoder = Decoder()
        self._transport: asyncio.Transport | None = None
        self._out = CorkedOutput()
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.writes = 0
        """``transport.write`` calls so far (each is one system call, one read for xenstored)."""

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        decoder.feed(data)
        try:
            messages = decoder.messages()
        except ProtocolError as e:
            self._fail(ProtocolError(f"{self._description}: {e}", field=e.field))
            return
        for msg in messages:
            self._on_message(msg)

    def eof_received(self) -> bool:
        if self._decoder.pending:
            self._fail(
                ProtocolError(
                    f"{self._description}: connection closed inside a message "
                    f"({self._decoder.pending} bytes pending)",
                    field="len",
                )
            )
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_flush()
        self._out.clear()
        self._wake_drainers()
        if not self._lost.done():
            self._lost.set_result(None)
        self._report_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

    # -- sending -------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self._flush_handle is None:
            # The first message of a burst goes out at once (no added latency); the ones
            # sent after it before the loop's next iteration are corked into one write.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
                self.writes += 1
            return
        self._out.append(data)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._out:
            self._out.write_to(self._transport)
            self.writes += 1

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def backlog(self) -> int:
        transport = self._transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        return queued + self._out.nbytes

    async def drain(self) -> None:
        self._cancel_flush()
        self._flush()
        if not self._paused or self.closing:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- closing -------------------------------------------------------------------------
    def _report_lost(self, exc: BaseException | None) -> None:
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(exc)

    def _fail(self, exc: BaseException) -> None:
        """A protocol error: report it as the reason the connection was lost, abort."""
        self._report_lost(exc)
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Send what is corked, close, wait until the connection is gone (the client's
        ``on_lost`` runs with no error)."""
        if not self.closing:
            self.closing = True
            self._cancel_flush()
            self._flush()
            if self._transport is not None:
                self._transport.close()
        with contextlib.suppress(OSError):
            await asyncio.shield(self._lost)
        self._report_lost(None)


def _open_device(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class XenbusTransport:
    """The ``/dev/xen/xenbus`` device (see the module docstring for its quirks)."""

    max_in_flight: int | None = 1

    def __init__(
        self, device: str = DEFAULT_XENBUS, opener: Callable[[str], int] | None = None
    ) -> None:
        self.device = device
        self.description = f"xenbus device {device}"
        self._opener = opener or _open_device
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = Decoder()
        self._in_flight: int | None = None
        self._on_message: OnMessage | None = None
        self._on_lost: OnLost | None = None

    async def open(self, on_message: OnMessage, on_lost: OnLost) -> None:
        self._fd = self._opener(self.device)
        os.set_blocking(self._fd, False)
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_lost = on_message, on_lost
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            while True:
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    return
                if not data:
                    self._lost(ConnectionResetError(f"{self.description}: EOF"))
                    return
                self._decoder.feed(data)
                for msg in self._decoder.messages():
                    if msg.type != XsType.WATCH_EVENT and self._in_flight is not None:
                        msg.req_id = self._in_flight
                        self._in_flight = None
                    assert self._on_message is not None
                    self._on_message(msg)
        except ProtocolError as e:
            self._lost(ProtocolError(f"{self.description}: {e}", field=e.field))
        except OSError as e:
            self._lost(e)

    def _lost(self, exc: BaseException | None) -> None:
        if self._fd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
            if self._on_lost is not None:
                self._on_lost(exc)

    def send(self, msg: Message) -> None:
        if self._fd < 0:
            raise ConnectionResetError(errno.ECONNRESET, "xenbus device is closed", self.device)
        data = msg.encode()
        if len(data) > XENSTORE_PAYLOAD_MAX:
            raise ValueError(
                f"{self.description}: message of {len(data)} bytes exceeds the device's "
                f"{XENSTORE_PAYLOAD_MAX}-byte limit "
                f"(payload <= {XENSTORE_PAYLOAD_MAX - HEADER_SIZE})"
            )
        # The kernel's synthesised WATCH/UNWATCH "OK" comes back like any other reply.
        self._in_flight = msg.req_id
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(errno.EIO, f"{self.description}: short write {written}/{len(data)}")

    def backlog(self) -> int:
        return 0

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        if self._fd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class InProcessTransport:
    """Talks to an in-process [`Engine`][aioxen.xenstore.engine.Engine]."""

    max_in_flight: int | None = None

    def __init__(self, engine: Engine, domid: int) -> None:
        self.engine = engine
        self.domid = domid
        self.description = f"in-process xenstore (domid {domid})"
        self._conn: EngineConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: OnMessage | None = None
        self._on_lost: OnLost | None = None

    async def open(self, on_message: OnMessage, on_lost: OnLost) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_lost = on_message, on_lost
        conn = self.engine.connect(self.domid, self._output)
        conn.on_kill = self._killed
        self._conn = conn

    def _output(self, msg: Message) -> None:
        assert self._loop is not None and self._on_message is not None
        self._loop.call_soon(self._on_message, msg)

    def _killed(self) -> None:
        self._conn = None
        if self._loop is not None and self._on_lost is not None:
            self._loop.call_soon(
                self._on_lost, ConnectionResetError(f"{self.description}: domain released")
            )

    def send(self, msg: Message) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionResetError(errno.ECONNRESET, f"{self.description} is closed")
        if len(msg.payload) > XENSTORE_PAYLOAD_MAX:
            raise ProtocolError(f"payload of {len(msg.payload)} bytes too long", field="len")
        conn.handle(msg)

    def backlog(self) -> int:
        return 0

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_XENBUS",
    "InProcessTransport",
    "SocketTransport",
    "Transport",
    "XenbusTransport",
    "default_socket_path",
]
