"""An asyncio transport over a byte-ring page (console, XenStore ring) and an event channel.

Theory of operation
-------------------
[`ByteRingTransport`][] moves bytes between a [`ByteRing`][aioxen.rings.byte.ByteRing]
endpoint and an ``asyncio.Protocol``.  It receives events through the channel's handler
(no task): on each event it first moves buffered outgoing bytes into the ring (the peer
may have made room), then, unless reading is paused, takes every waiting incoming byte
and hands it to ``protocol.data_received``.  It notifies the peer once per pass if it
changed an index (wrote data or freed space).  While reading is paused the bytes stay in
the ring, which is the back-pressure the peer sees.

Writes go straight into the ring when there is room; the rest waits in a buffer, and the
protocol is paused (``pause_writing``) above the high-water mark and resumed below the
low-water mark, as asyncio's own transports do
([`WriteFlowControl`][aioxen.flowcontrol.WriteFlowControl]; a failing callback goes to the loop's
exception handler).  Byte rings have no end-of-stream marker:
[`peer_closed`][] (the device's xenbus peer went ``Closing``/``Closed``) and a lost event
channel end the stream *after* draining what the peer had written (``eof_received``, then
``connection_lost``).  ``close()`` flushes the buffer first (bounded by the peer reading
it); ``abort()`` does not.  A corrupt ring index is a
[`ProtocolError`][aioxen.errors.ProtocolError] given to ``connection_lost``.

[`open_streams`][] wraps a transport in the stdlib ``StreamReader``/``StreamWriter``
once the protocol has seen ``connection_made`` ([`ByteRingTransport.wait_started`][]).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.flowcontrol import WriteFlowControl
from aioxen.platforms.base import EventChannel
from aioxen.rings.byte import ByteRing

HIGH_WATER = 64 * 1024
READ_CHUNK = 64 * 1024


class ByteRingTransport(WriteFlowControl, asyncio.Transport):
    """``asyncio.Transport`` over one byte-ring endpoint and its event channel."""

    def __init__(
        self,
        ring: ByteRing,
        channel: EventChannel,
        protocol: asyncio.BaseProtocol,
        *,
        extra: dict[str, Any] | None = None,
        on_close: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        super().__init__(extra)
        self._loop = asyncio.get_running_loop()
        self._ring = ring
        self._channel = channel
        self._protocol: Any = protocol
        self._on_close = on_close
        self._buffer = bytearray()
        self._wlen = 0  # len(self._buffer), for WriteFlowControl
        self._high = HIGH_WATER
        self._low = HIGH_WATER // 4
        self._protocol_paused = False
        self._started: asyncio.Future[None] = self._loop.create_future()
        self._reading_paused = False
        self._closing = False  # close() called: flush, then finish
        self._ending = False  # the peer is gone: drain input, then finish
        self._finished = False
        self._scratch = bytearray(READ_CHUNK)
        channel.set_handler(self._on_event)
        self._loop.call_soon(self._start)

    # -- plumbing --------------------------------------------------------------------
    def _start(self) -> None:
        try:
            if self._finished:
                return
            self._protocol.connection_made(self)
            self._on_event()  # whatever arrived before we listened
        finally:
            if not self._started.done():
                self._started.set_result(None)

    async def wait_started(self) -> None:
        """Return once ``protocol.connection_made`` ran (or the transport ended first)."""
        await asyncio.shield(self._started)

    def _on_event(self) -> None:
        if self._finished:
            return
        try:
            changed = self._pump_out()
            if not self._reading_paused:
                changed |= self._pump_in()
        except ProtocolError as exc:
            self._finish(exc)
            return
        if changed:
            self._channel.notify()
        if self._channel.peer_lost:
            self._ending = True
        if self._ending and not self._reading_paused:
            self._finish(None, eof=True)
        elif self._closing and not self._buffer:
            self._finish(None)

    def _pump_out(self) -> bool:
        if not self._buffer:
            return False
        n = self._ring.write(self._buffer)
        if n:
            del self._buffer[:n]
            self._wlen = len(self._buffer)
            if self._protocol_paused:
                self._maybe_resume_protocol()
        return n > 0

    def _pump_in(self) -> bool:
        got = False
        scratch = self._scratch
        while not self._reading_paused and not self._finished:
            n = self._ring.readinto(scratch)
            if not n:
                break
            got = True
            self._protocol.data_received(bytes(scratch[:n]))
        return got

    def _finish(self, exc: BaseException | None, eof: bool = False) -> None:
        if self._finished:
            return
        if eof:
            try:
                self._protocol.eof_received()
            except Exception as e:  # the protocol's problem; still close
                exc = e
        self._finished = True
        self._closing = True
        self._channel.set_handler(None)
        self._buffer.clear()
        self._wlen = 0
        self._loop.call_soon(self._lost, exc)

    def _lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            if self._on_close is not None:
                self._on_close(exc)

    # -- asyncio.Transport -----------------------------------------------------------
    def peer_closed(self) -> None:
        """The peer ended the session: deliver what it wrote, then end the stream."""
        if not self._finished:
            self._ending = True
            self._on_event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise RuntimeError("write() on a closing byte-ring transport")
        if not data:
            return
        if self._buffer:
            self._buffer += data
        else:
            try:
                n = self._ring.write(data)
            except ProtocolError as exc:
                self._finish(exc)
                return
            if n:
                self._channel.notify()
            if n < len(data):
                self._buffer += memoryview(data)[n:]
        self._wlen = len(self._buffer)
        if self._wlen > self._high:  # inline test: no call per write below the mark
            self._maybe_pause_protocol()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("byte rings have no end-of-stream marker; use close()")

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._loop.call_soon(self._on_event)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._finished

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._finish(None)

    def abort(self) -> None:
        self._finish(None)


async def open_streams(
    ring: ByteRing,
    channel: EventChannel,
    *,
    limit: int = 2**16,
    extra: dict[str, Any] | None = None,
    on_close: Callable[[BaseException | None], None] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ByteRingTransport]:
    """``StreamReader``/``StreamWriter`` over a byte ring (built like
    ``asyncio.open_connection`` builds them)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = ByteRingTransport(ring, channel, protocol, extra=extra, on_close=on_close)
    await transport.wait_started()
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer, transport


__all__ = ["ByteRingTransport", "open_streams"]
