"""Datagrams over a vchan (libxenvchan's "packet" mode, with explicit framing).

Theory of operation
-------------------
libxenvchan's packet calls (``libxenvchan_send``/``recv``) move exactly ``n`` bytes with
no framing: both sides must agree on sizes.  aioxen frames each datagram as

    ``u32 length`` (little-endian)  ``payload`` (``length`` bytes)

in the ordinary byte ring.  A datagram is at most ``write ring size - 4`` bytes, so a frame
always fits in the ring; the sender may publish a frame in pieces (it goes into the ring
as space appears), the receiver delivers a datagram only once the whole frame is there
(it peeks the header, requests a write notification while the frame is incomplete, then
takes header and payload).  A C peer speaks it with ``libxenvchan_send(hdr, 4)`` +
``libxenvchan_send(payload, n)`` and ``libxenvchan_recv(hdr, 4)`` + ``recv(payload, n)``.
A header announcing more than ``read ring size - 4`` bytes is a
[`ProtocolError`][aioxen.ProtocolError]; a peer that closes in the middle of a frame makes
``connection_lost`` get ``ConnectionResetError``.  Zero-length datagrams are allowed.

[`VchanDatagramTransport`][] reuses [`VchanTransport`][aioxen.vchan.transport.VchanTransport]
(write buffering, flow control, close and error handling) and replaces the read side.
The protocol is an `asyncio.DatagramProtocol`: ``datagram_received(data, addr)``
with ``addr = (peer_domid, port)``; there is no ``eof_received`` (the peer's EOF or close
ends the transport: ``connection_lost(None)``; a peer that aborted or died without its EOF
bit: ``connection_lost(ConnectionResetError)``, see [`aioxen.vchan.transport`][]).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from aioxen.errors import ProtocolError
from aioxen.platforms import resolve
from aioxen.platforms.base import Platform
from aioxen.vchan.client import DEFAULT_CONNECT_TIMEOUT, connect_client
from aioxen.vchan.endpoint import DEFAULT_SIZE, Connection
from aioxen.vchan.protocols import start_transport
from aioxen.vchan.server import accept_one
from aioxen.vchan.transport import VchanTransport, check_busy_poll

MAX_DATAGRAM_HEADER = 4
"""Bytes of framing per datagram (the u32 length)."""

_HDR = struct.Struct("<I")
_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class VchanDatagramTransport(VchanTransport, asyncio.DatagramTransport):
    """A connected datagram transport over one vchan (see the module docstring)."""

    max_datagram_size: int

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: Connection,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        *,
        busy_poll: float | None = None,
    ) -> None:
        super().__init__(loop, conn, protocol, waiter, busy_poll=busy_poll)
        self.max_datagram_size = conn.core.write_size - MAX_DATAGRAM_HEADER
        """Largest payload [`sendto`][] accepts (the peer's limit is its read ring)."""
        self._addr = (conn.peer_domid, conn.port)

    def _set_protocol_kind(self, protocol: asyncio.BaseProtocol) -> None:
        self._buffered = False
        self._trusted = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Queue one datagram.  ``addr`` must be ``None`` or ``(peer_domid, port)``."""
        if addr is not None and tuple(addr) != self._addr:
            raise ValueError(f"vchan datagram transport is connected to {self._addr}, not {addr}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        payload = bytes(data)
        if len(payload) > self.max_datagram_size:
            raise ValueError(
                f"datagram of {len(payload)} bytes exceeds the maximum of "
                f"{self.max_datagram_size} for this vchan"
            )
        super().write(_HDR.pack(len(payload)) + payload)

    def write(self, data: Any) -> None:
        raise NotImplementedError("use sendto() on a vchan datagram transport")

    def _pump(self, force: bool, arm: bool = True) -> int:
        core = self._core
        arm = arm and not force
        limit = core.read_size - MAX_DATAGRAM_HEADER
        protocol: Any = self._protocol
        self._rleft = 0
        core.writable()  # validate the write ring on every service, as the stream pump does
        while not self._conn_lost:
            eof = core.peer_eof()
            avail = core.readable()
            need = MAX_DATAGRAM_HEADER
            if avail >= MAX_DATAGRAM_HEADER:
                hdr = core.peek(MAX_DATAGRAM_HEADER)
                assert hdr is not None
                (length,) = _HDR.unpack(hdr)
                if length > limit:
                    raise ProtocolError(
                        f"{self._conn.describe()}: datagram header announces {length} "
                        f"bytes, more than the {limit} that fit the ring",
                        field="datagram length",
                    )
                need += length
                if avail >= need:
                    core.read_span()  # (re)validates and records cons for consume()
                    core.consume(MAX_DATAGRAM_HEADER)
                    data = self._take(length)
                    protocol.datagram_received(data, self._addr)
                    if not force and (self._closing or self._reading_paused):
                        return core.peer_live()
                    continue
            if eof or force:
                if avail:
                    self._force_close(
                        ConnectionResetError(
                            f"{self._conn.describe()}: peer closed in the middle of a datagram"
                        )
                    )
                elif eof:
                    self._deliver_eof()
                return 1
            avail = core.request_readable() if arm else core.readable()
            if avail < need:
                self._rleft = avail  # a poll window waits for more than this
                return core.peer_live()
        return 1

    def _take(self, n: int) -> bytes:
        core = self._core
        view = core.read_view
        assert view is not None
        parts: list[bytes] = []
        while n:
            off, span = core.read_span()
            span = min(span, n)
            chunk = view[off : off + span]
            parts.append(bytes(chunk))
            chunk.release()
            core.consume(span)
            n -= span
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _deliver_eof(self) -> None:
        self._peer_eof = True
        if not self._closing:
            self.close()

    def _peer_gone(self) -> None:
        exc: Exception | None = None
        if not self._peer_eof and not self._closing:
            self._pump(True)
            if not self._peer_eof and not self._conn_lost:
                exc = self._cut_error()  # gone without its EOF bit: datagrams may be lost
        self._closing = True
        self._peer_eof = True
        self._clear_queue()
        self._teardown(exc, set_live=True, eof=exc is None)


async def create_datagram_endpoint(
    protocol_factory: Callable[[], _P],
    domid: int,
    port: str,
    *,
    listen: bool = False,
    platform: Platform | None = None,
    read_size: int | None = None,
    write_size: int | None = None,
    timeout: float | None = None,
    initial_index: int = 0,
    busy_poll: float | None = None,
) -> tuple[VchanDatagramTransport, _P]:
    """Open a datagram vchan to domain ``domid``: ``(transport, protocol)``.

    ``listen=False`` (client): wait up to ``timeout`` (default
    `DEFAULT_CONNECT_TIMEOUT`) for the server's advertisement;
    sizes are minimums the server must offer.  ``listen=True`` (server): share the pages
    (sizes default to 64 KiB each), advertise, wait up to ``timeout`` (default: forever)
    for one client, withdraw the advertisement.  ``busy_poll``: see
    [`VchanTransport`][aioxen.vchan.VchanTransport].
    """
    plat = await resolve(platform)
    check_busy_poll(busy_poll, plat.peer_runs_concurrently)
    if listen:
        conn = await accept_one(
            plat,
            domid,
            port,
            read_size=DEFAULT_SIZE if read_size is None else read_size,
            write_size=DEFAULT_SIZE if write_size is None else write_size,
            timeout=timeout,
            initial_index=initial_index,
        )
    else:
        conn = await connect_client(
            plat,
            domid,
            port,
            read_size=read_size,
            write_size=write_size,
            timeout=DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout,
        )
    return await start_transport(
        conn, protocol_factory, VchanDatagramTransport, busy_poll=busy_poll
    )


__all__ = ["MAX_DATAGRAM_HEADER", "VchanDatagramTransport", "create_datagram_endpoint"]
