"""The qrexec data phase: one call's stdin/stdout/stderr and exit code over a data channel.

Theory of operation
-------------------
Every call gets its own data channel (a stream pair).  After
[`data_handshake`][aioxen.qrexec.data.data_handshake] (HELLO both ways, version >= 2;
we send ours first) two ends talk:

* the **service end** ([`ServiceEnd`][aioxen.qrexec.data.ServiceEnd]) runs the service:
  it receives ``MSG_DATA_STDIN`` and sends ``MSG_DATA_STDOUT``/``MSG_DATA_STDERR``, then
  one ``MSG_DATA_EXIT_CODE``, then closes the channel;
* the **caller end** ([`CallerEnd`][aioxen.qrexec.data.CallerEnd]) sends stdin and
  receives the rest.

Each end is plain stdlib streams for its user: the streams it receives are
`asyncio.StreamReader` objects fed with the payloads of the messages read from the
channel -- by a small protocol that takes the channel's transport over from its
``StreamReaderProtocol`` (for speed: the transport reads into one reused buffer and each
payload is copied once, into its reader, with no task; writing-side calls go on to the
original protocol), or, on a stream that is not a plain stdlib one, by a pump task that
reads messages from the channel's ``StreamReader``; the streams it
sends are `asyncio.StreamWriter` objects ([`DataWriter`][aioxen.qrexec.data.DataWriter])
over a small framing transport that cuts ``write()`` into messages of at most the
version's chunk size (4 KiB at v2, 64 KiB at v3+) -- never a zero-length one, which is
reserved for EOF: ``write_eof()`` (or ``close()``) sends it once.  ``drain()`` is the data
channel's own flow control (its writer's ``drain()``), so back-pressure reaches the
writer of a stream.  The other way, a reader whose buffer is over twice its limit stops
delivery and pauses the channel (through the stdlib's own ``StreamReader`` pause/resume
hooks), so a stream nobody reads stops the channel instead of growing memory.  Read
stdout and stderr concurrently
([`CallerEnd.communicate`][aioxen.qrexec.data.CallerEnd.communicate] does).

What an end accepts (everything else is a
[`QrexecProtocolError`][aioxen.qrexec.wire.QrexecProtocolError] that tears the channel
down): a payload no larger than the chunk size; on the service end STDIN (and STDOUT,
which Qubes also accepts there, for Qubes Windows Tools) until its EOF; on the caller
end STDOUT (or STDIN, likewise) and STDERR until their EOFs, then one 4-byte exit code,
then nothing but the end of the channel.  The exit code also ends stdout and stderr
(Qubes' services send both EOFs first; the code is the end of the call either way).

A peer that goes away is an error, never a hang: on the service end a channel that
ends before stdin's EOF gives ``ConnectionResetError`` to stdin's reader, and once the
caller is gone ``drain()``/``exit()`` raise it too; on the caller end a channel that ends
before the exit code makes the unfinished readers and
[`CallerEnd.exit_code`][aioxen.qrexec.data.CallerEnd.exit_code] raise
``ConnectionResetError``.  After the exit code the caller's stdin is a sink (the service
is gone; Qubes discards such input too).

[`relay_process`][aioxen.qrexec.data.relay_process] connects a service end to a
subprocess's pipes and reports its exit status the Qubes way (128+N for signal N).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any, Self

from aioxen.qrexec.framing import (
    TruncatedMessage,
    check_header,
    exchange_hello,
    read_message,
)
from aioxen.qrexec.wire import (
    DATA_MIN_VERSION,
    HEADER,
    HEADER_SIZE,
    MAX_DATA_CHUNK_V3,
    MSG_DATA_EXIT_CODE,
    MSG_DATA_STDERR,
    MSG_DATA_STDIN,
    MSG_DATA_STDOUT,
    PROTOCOL_VERSION,
    QrexecProtocolError,
    data_payload_limit,
    encode_exit_code,
    exit_code_from_returncode,
    max_chunk_size,
    message_name,
    parse_exit_code,
)

_JOIN_BELOW = 4096  # a chunk up to this size is joined with its header into one write
_INLINE_INPUT = 1 << 16  # communicate() writes input up to this size without a task
DEFAULT_EXIT_GRACE = 10.0
"""How long a caller waits, after the exit code, for the service to close the channel."""


async def data_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    max_version: int = PROTOCOL_VERSION,
    what: str = "qrexec data channel",
) -> int:
    """HELLO on a data channel; returns the version both ends use (2, 3 or 4).

    Sends ``max_version`` first, then reads the peer's HELLO (the same on both ends; see
    [`exchange_hello`][aioxen.qrexec.framing.exchange_hello]).  A peer below version 2,
    or anything but a 4-byte HELLO first, is a ``QrexecProtocolError``."""
    if not DATA_MIN_VERSION <= max_version <= PROTOCOL_VERSION:
        raise ValueError(f"max_version must be 2..{PROTOCOL_VERSION}, not {max_version}")
    return await exchange_hello(
        reader, writer, version=max_version, min_version=DATA_MIN_VERSION, what=what
    )


# -- stream plumbing ----------------------------------------------------------------------


class _Valve(asyncio.ReadTransport):
    """The "transport" a received stream's `asyncio.StreamReader` pauses: the end stops
    delivering messages (and reading the channel) until it opens again."""

    def __init__(self, on_open: Callable[[], None]) -> None:
        super().__init__()
        self.open = True
        self.unbounded = False  # set when everything is collected anyway: never pause
        self._on_open = on_open

    def pause_reading(self) -> None:
        if not self.unbounded:
            self.open = False

    def resume_reading(self) -> None:
        if not self.open:
            self.open = True
            self._on_open()

    def is_reading(self) -> bool:
        return self.open


_READ_FIRST = 16384  # the channel reader's first buffer (a call's small messages fit)
_READ_MAX = 4 * (MAX_DATA_CHUNK_V3 + HEADER_SIZE)  # its largest: four 64 KiB messages


class _ChannelReader(asyncio.BufferedProtocol):
    """Reads a data channel's messages in place of the channel's own
    ``StreamReaderProtocol`` (installed with ``transport.set_protocol``), for speed: the
    transport reads straight into one reused buffer, payloads are fed to the end's
    readers from there (one copy, no allocation per read, no task); writing-side calls
    (flow control, ``connection_lost``) go on to the original protocol, so the channel's
    ``StreamWriter`` works as before.

    Messages are delivered whole (a cut one never reaches a reader) in order; while a
    reader of the end is full, delivery stops and the transport is paused.  A clean EOF
    is handled after the messages before it; a transport error at once (as a
    ``StreamReader`` raises it before its buffered bytes)."""

    def __init__(self, end: _End, inner: asyncio.BaseProtocol, buffered: bytes, eof: bool) -> None:
        self._end = end
        self._inner: Any = inner
        self._transport: Any = end.writer.transport
        self._buf = bytearray(max(_READ_FIRST, len(buffered) + HEADER_SIZE))
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._stop = 0  # end of the received bytes
        self._need = HEADER_SIZE  # bytes from _start the next step needs
        self._filled = False  # the last read filled the buffer: bulk, grow it
        self._eof = eof  # the peer's EOF, handled once the buffer is parsed
        self._done = False  # the end of the channel was reported
        self._paused = False  # we paused the transport
        self._scheduled = False
        self._limit = end.payload_limit
        n = len(buffered)
        self._view[:n] = buffered
        self._stop = n

    # -- the transport's calls -------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        stop = self._stop
        size = len(self._buf)
        if not self._filled and size - stop >= max(self._need - (stop - self._start), size >> 2):
            return self._view[stop:]  # the common case: room behind what we have
        # Make room: grow (bulk fills the buffer; a message larger than it), else move
        # the unparsed bytes (part of one message, unless a reader is full) to the front.
        start = self._start
        kept = stop - start
        new = min(_READ_MAX, 2 * size) if self._filled else size
        new = max(new, kept + max(self._need, size >> 2))
        if new > size:
            buf = bytearray(new)
            buf[:kept] = self._view[start:stop]
            self._buf, self._view = buf, memoryview(buf)
        elif start:
            self._view[:kept] = self._view[start:stop]
        self._start, self._stop = 0, kept
        self._filled = False
        return self._view[kept:]

    def buffer_updated(self, nbytes: int) -> None:
        self._stop += nbytes
        self._filled = self._stop == len(self._buf)
        self._parse()

    def eof_received(self) -> bool:
        self._eof = True
        self._parse()
        return True  # as StreamReaderProtocol: the writing side stays open

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)
        if exc is None:
            self._eof = True
            self._parse()
        elif not self._done:
            self._done = True
            self._end._channel_error(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- delivery --------------------------------------------------------------------------
    def finished(self) -> bool:
        """Whether the end of the channel (or its failure) was reported."""
        return self._done

    def unblocked(self) -> None:
        """A full reader of the end was read: deliver on (soon, outside its read())."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        self._scheduled = False
        self._parse()

    def _parse(self) -> None:
        end = self._end
        if self._done:
            return
        if end.dead():
            self._start = self._stop = 0  # the end is closed: drop what arrives
            return
        view, i, stop = self._view, self._start, self._stop
        unpack = HEADER.unpack_from
        try:
            while stop - i >= HEADER_SIZE:  # dense loop, kept for speed
                if end.blocked():
                    if not self._paused:
                        self._paused = True
                        self._transport.pause_reading()
                    return
                msg_type, length = unpack(view, i)
                check_header(msg_type, length, self._limit, end.what)
                if stop - i - HEADER_SIZE < length:
                    self._need = HEADER_SIZE + length
                    break
                i += HEADER_SIZE + length
                self._start = i
                end._deliver(msg_type, view[i - length : i])
                if self._done or end.dead():
                    return
            else:
                self._need = HEADER_SIZE
            if i == stop:
                self._start = self._stop = i = stop = 0
            if self._eof:
                self._done = True
                if i == stop:
                    end._channel_ended()
                else:
                    end._channel_reset(self._truncated(view, i, stop))
                return
            if self._paused and not end.blocked():
                self._paused = False
                self._transport.resume_reading()
        except QrexecProtocolError as exc:
            self._done = True
            end._fail(exc)
        except Exception as exc:  # a bug: the streams get it rather than wait forever
            self._done = True
            end._fail(exc)
            raise

    def _truncated(self, view: memoryview, i: int, stop: int) -> TruncatedMessage:
        what = self._end.what
        if stop - i < HEADER_SIZE:
            return TruncatedMessage(
                f"{what}: stream ended inside a message header ({stop - i} of 8 bytes)"
            )
        msg_type, length = HEADER.unpack_from(view, i)
        return TruncatedMessage(
            f"{what}: stream ended inside {message_name(msg_type)} "
            f"({stop - i - HEADER_SIZE} of {length} bytes)"
        )


class _FrameTransport(asyncio.WriteTransport):
    """Cuts writes into data messages of one type on the shared channel writer."""

    def __init__(self, end: _End, msg_type: int) -> None:
        super().__init__()
        self._end = end
        self._type = msg_type
        self._eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError(f"{message_name(self._type)}: write() after write_eof()")
        end = self._end
        if end.sink(self._type) or end.dead():
            return  # like a transport after connection_lost: drain() reports the error
        view = memoryview(data).cast("B")
        n = view.nbytes
        chunk = end.chunk
        out = end.writer
        for off in range(0, n, chunk):
            part = view[off : off + chunk]
            size = part.nbytes
            if size <= _JOIN_BELOW:
                out.write(HEADER.pack(self._type, size) + bytes(part))
            else:
                out.write(HEADER.pack(self._type, size))
                out.write(part)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        message = self.eof_message()
        if message:
            self._end.writer.write(message)

    def eof_message(self) -> bytes:
        """Mark the stream ended and return its EOF message for the caller to write
        (``b""`` if it was sent already or is not wanted): several messages of an end
        then go out in one channel write, for speed."""
        if self._eof:
            return b""
        self._eof = True
        if self._end.sink(self._type) or self._end.dead():
            return b""
        return HEADER.pack(self._type, 0)

    def write_last(self, data: bytes) -> None:
        """``write(data)``, then ``write_eof()``: small data in one channel write."""
        if len(data) > _JOIN_BELOW or self._eof or self._end.sink(self._type):
            self.write(data)
            self.write_eof()
        elif not self._end.dead():
            head = HEADER.pack(self._type, len(data)) + data if data else b""
            self._end.writer.write(head + self.eof_message())
        else:
            self._eof = True

    def is_closing(self) -> bool:
        return self._eof

    def close(self) -> None:
        self.write_eof()

    def abort(self) -> None:
        self._eof = True
        self._end.abort()

    def get_write_buffer_size(self) -> int:
        return self._end.writer.transport.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._end.writer.get_extra_info(name, default)


def _plain_stream(reader: Any, transport: Any, inner: Any) -> bool:
    """Whether ``reader`` is a stdlib ``StreamReader`` fed by ``inner``, the plain
    ``StreamReaderProtocol`` of a live ``transport`` (whose buffer we may take over)."""
    # the stdlib stream's private fields, read once at the start: checked, else the task path
    return (
        transport is not None
        and not transport.is_closing()
        and type(inner) is asyncio.StreamReaderProtocol
        and getattr(inner, "_stream_reader", None) is reader
        and getattr(reader, "_transport", None) is transport
        and type(getattr(reader, "_buffer", None)) is bytearray
        and getattr(reader, "_exception", None) is None
    )


def _frames(writer: asyncio.StreamWriter) -> _FrameTransport:
    transport = writer.transport
    assert isinstance(transport, _FrameTransport)
    return transport


class DataWriter(asyncio.StreamWriter):
    """A stdlib `asyncio.StreamWriter` for one sent stream of a call (stdout/stderr on
    the service end, stdin on the caller end).

    ``write()`` frames chunks, ``write_eof()``/``close()`` send the stream's EOF,
    ``drain()`` waits on the data channel's flow control and raises the end's error (a
    peer gone, a protocol error)."""

    def __init__(self, end: _End, msg_type: int) -> None:
        loop = asyncio.get_running_loop()
        transport = _FrameTransport(end, msg_type)
        super().__init__(transport, asyncio.BaseProtocol(), None, loop)
        self._end = end
        self._type = msg_type

    async def drain(self) -> None:
        end = self._end
        end.raise_error()
        if end.sink(self._type):
            return
        try:
            await end.writer.drain()
        except (ConnectionError, OSError):
            if end.sink(self._type):
                return
            end.raise_error()
            raise

    async def wait_closed(self) -> None:
        await self.drain()


# -- the two ends -------------------------------------------------------------------------


class _End:
    """What both ends share: the channel, the version, the pump task and the error."""

    what = "qrexec data channel"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        version: int,
        what: str | None = None,
    ) -> None:
        if what is not None:
            self.what = what  # e.g. "qrexec service in domain 3 (port 513)", for errors
        self.reader = reader
        self.writer = writer
        self.version = version
        self.chunk = max_chunk_size(version)
        self._error: Exception | None = None
        self._lost: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._pump: asyncio.Task[None] | None = None
        self._channel_reader: _ChannelReader | None = None
        self._unblocked: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def payload_limit(self, msg_type: int) -> int:
        """The largest payload of ``msg_type`` here (``QrexecProtocolError`` if it is
        not a data message)."""
        return data_payload_limit(self.version, msg_type)

    def _valve(self) -> _Valve:
        return _Valve(self._valve_opened)

    def blocked(self) -> bool:
        """Whether an unfinished reader of this end is full (delivery waits until it is
        read)."""
        raise NotImplementedError

    def _valve_opened(self) -> None:
        if self._channel_reader is not None:
            self._channel_reader.unblocked()
        elif self._unblocked is not None and not self._unblocked.done():
            self._unblocked.set_result(None)

    def _start(self) -> None:
        """Start receiving: take the channel's transport over (the fast path,
        ``_ChannelReader``) where it is a plain stream transport, else a pump task
        that reads messages from the ``StreamReader``."""
        reader: Any = self.reader
        transport: Any = self.writer.transport
        inner: Any = transport.get_protocol() if transport is not None else None
        if _plain_stream(reader, transport, inner):
            pending: bytearray = reader._buffer
            buffered = bytes(pending)
            pending.clear()
            eof = reader.at_eof()
            self._channel_reader = _ChannelReader(self, inner, buffered, eof)
            transport.set_protocol(self._channel_reader)
            transport.resume_reading()  # the StreamReader may have paused it
            self._channel_reader._parse()
            return
        self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    # the pump task (the fallback path) -----------------------------------------------------
    async def _run_pump(self) -> None:
        try:
            while True:
                msg = await read_message(self.reader, limit=self.payload_limit, what=self.what)
                if msg is None:
                    self._channel_ended()
                    return
                self._deliver(msg.type, msg.payload)
                while self.blocked() and not self.dead():
                    self._unblocked = asyncio.get_running_loop().create_future()
                    await self._unblocked
        except asyncio.CancelledError:
            raise
        except QrexecProtocolError as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._channel_error(exc)
        except Exception as exc:  # a bug: the streams get it rather than wait forever
            self._fail(exc)
            raise

    def _channel_error(self, exc: BaseException) -> None:
        """The channel failed under us (a transport error)."""
        if isinstance(exc, ConnectionResetError):
            self._channel_reset(exc)
        elif isinstance(exc, (ConnectionError, OSError)):
            self._channel_reset(ConnectionResetError(f"{self.what}: {exc}"))
        elif isinstance(exc, Exception):
            self._fail(exc)

    def _deliver(self, msg_type: int, payload: bytes | memoryview) -> None:
        """Hand one received message to its stream (``QrexecProtocolError`` if it does
        not belong)."""
        raise NotImplementedError

    def _channel_ended(self) -> None:
        raise NotImplementedError

    def _channel_reset(self, exc: ConnectionResetError) -> None:
        self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        """Record the end's error, hand it to unfinished readers, drop the channel."""
        if self._error is None:
            self._error = exc
        if not self._lost.done():
            self._lost.set_result(exc)
        self._fail_readers(exc)
        self.writer.transport.abort()

    def _fail_readers(self, exc: Exception) -> None:
        raise NotImplementedError

    def sink(self, msg_type: int) -> bool:
        """Whether writes of ``msg_type`` are dropped (the peer no longer wants them)."""
        return False

    def dead(self) -> bool:
        """Whether the channel is failed or closed (writes are dropped)."""
        return self._error is not None or self._closed

    def raise_error(self) -> None:
        """Raise the end's error, if it has one (the peer gone, a protocol error)."""
        if self._error is not None:
            raise self._error

    async def wait_lost(self) -> Exception:
        """Wait until the end fails (the peer gone or misbehaving); returns the error
        (``ConnectionResetError`` or ``QrexecProtocolError``).  Never returns after a
        normal end of the call."""
        return await asyncio.shield(self._lost)

    def _stop(self) -> None:
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
        if self._timer is not None:
            self._timer.cancel()

    # closing -----------------------------------------------------------------------------
    def abort(self) -> None:
        """Drop the channel at once (the peer sees a reset)."""
        self._stop()
        self.writer.transport.abort()

    async def aclose(self) -> None:
        """Close the channel and stop the pump."""
        self._stop()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        elif self._channel_reader is not None and not self._channel_reader.finished():
            # one loop iteration before the close, as awaiting the pump task took: a
            # peer in this loop still writing to us reads our last messages first
            await asyncio.sleep(0)
        transport = self.writer.transport
        if transport.get_write_buffer_size() and not transport.is_closing():
            # flush before close() (wait_closed() waits for it anyway): asyncio's socket
            # transport closed with bytes queued ends without counting itself lost, and
            # a later abort() of it fails
            with contextlib.suppress(ConnectionError, OSError, NotImplementedError):
                transport.set_write_buffer_limits(high=0)
                await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ServiceEnd(_End):
    """The end of a data channel that runs the service.

    ``stdin`` (a `asyncio.StreamReader`) receives the caller's input and its EOF;
    ``stdout``/``stderr`` ([`DataWriter`][aioxen.qrexec.data.DataWriter]) send output;
    [`exit`][aioxen.qrexec.data.ServiceEnd.exit] ends the call.  Construct it after the
    handshake (inside a running loop), or use [`open`][aioxen.qrexec.data.ServiceEnd.open].
    """

    what = "qrexec caller"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        version: int,
        *,
        stdin_limit: int = 2**16,
        what: str | None = None,
    ) -> None:
        super().__init__(reader, writer, version, what)
        self._stdin_valve = self._valve()
        self.stdin = asyncio.StreamReader(limit=stdin_limit)
        self.stdin.set_transport(self._stdin_valve)
        self.stdout: asyncio.StreamWriter = DataWriter(self, MSG_DATA_STDOUT)
        self.stderr: asyncio.StreamWriter = DataWriter(self, MSG_DATA_STDERR)
        self._stdin_eof = False
        self._exited = False
        self._start()

    @classmethod
    async def open(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_version: int = PROTOCOL_VERSION,
        stdin_limit: int = 2**16,
        what: str | None = None,
    ) -> ServiceEnd:
        """Handshake on a fresh data channel, then the service end over it.  ``what``
        names the peer in errors (default ``"qrexec caller"``)."""
        name = what or cls.what
        version = await data_handshake(reader, writer, max_version=max_version, what=name)
        return cls(reader, writer, version, stdin_limit=stdin_limit, what=name)

    def blocked(self) -> bool:
        return not (self._stdin_valve.open or self._stdin_eof)

    def _deliver(self, msg_type: int, payload: bytes | memoryview) -> None:
        if msg_type not in (MSG_DATA_STDIN, MSG_DATA_STDOUT):
            raise QrexecProtocolError(
                f"{self.what} sent {message_name(msg_type)} (only stdin flows to a service)",
                field="type",
            )
        if self._stdin_eof:
            raise QrexecProtocolError(f"{self.what} sent stdin after its EOF", field="type")
        if not payload:
            self._stdin_eof = True
            self.stdin.feed_eof()
            return
        self.stdin.feed_data(payload)

    def _channel_ended(self) -> None:
        if not self._exited:
            self._fail(ConnectionResetError(f"{self.what} closed the data channel during the call"))

    def _fail_readers(self, exc: Exception) -> None:
        if not self._stdin_eof:
            self._stdin_eof = True
            self.stdin.set_exception(exc)

    async def exit(self, code: int) -> None:
        """End the call: EOF on stdout and stderr (if not sent yet), the exit ``code``,
        then close the channel.  ``ConnectionResetError`` (or the protocol error) if the
        caller is gone; the channel is closed either way."""
        if self._exited:
            raise RuntimeError("exit() called twice")
        payload = encode_exit_code(code)
        self._exited = True
        try:
            self.raise_error()
            # both EOFs (if not sent yet) and the code in one channel write, for speed
            last = [_frames(w).eof_message() for w in (self.stdout, self.stderr)]
            last.append(HEADER.pack(MSG_DATA_EXIT_CODE, len(payload)) + payload)
            self.writer.write(b"".join(last))
            await self.stdout.drain()
        finally:
            await self.aclose()


class CallerEnd(_End):
    """The calling end of a data channel.

    ``stdin`` ([`DataWriter`][aioxen.qrexec.data.DataWriter]) sends input (``write_eof()``
    ends it); ``stdout``/``stderr`` (`asyncio.StreamReader`) receive the service's
    output; [`exit_code`][aioxen.qrexec.data.CallerEnd.exit_code] returns its status.
    Both readers must be read: a full one pauses the channel.  With
    ``discard_stderr=True`` stderr's bytes are dropped as they arrive (its reader only
    sees the EOF), for users that read stdout alone."""

    what = "qrexec service"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        version: int,
        *,
        limit: int = 2**16,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        what: str | None = None,
        discard_stderr: bool = False,
    ) -> None:
        super().__init__(reader, writer, version, what)
        self._discard_stderr = discard_stderr  # stderr's bytes dropped, its EOF kept
        self._out_valve = self._valve()
        self._err_valve = self._valve()
        self.stdout = asyncio.StreamReader(limit=limit)
        self.stderr = asyncio.StreamReader(limit=limit)
        self.stdout.set_transport(self._out_valve)
        self.stderr.set_transport(self._err_valve)
        self.stdin: asyncio.StreamWriter = DataWriter(self, MSG_DATA_STDIN)
        self._out_eof = False
        self._err_eof = False
        self._code: int | None = None
        self._done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._exit_grace = exit_grace
        self._start()

    @classmethod
    async def open(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_version: int = PROTOCOL_VERSION,
        limit: int = 2**16,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        what: str | None = None,
        discard_stderr: bool = False,
    ) -> CallerEnd:
        """Handshake on a fresh data channel, then the caller end over it.  ``what``
        names the peer in errors (default ``"qrexec service"``)."""
        name = what or cls.what
        version = await data_handshake(reader, writer, max_version=max_version, what=name)
        return cls(
            reader,
            writer,
            version,
            limit=limit,
            exit_grace=exit_grace,
            what=name,
            discard_stderr=discard_stderr,
        )

    def blocked(self) -> bool:
        return not (self._out_valve.open or self._out_eof) or not (
            self._err_valve.open or self._err_eof
        )

    def _deliver(self, msg_type: int, payload: bytes | memoryview) -> None:
        if self._code is not None:
            raise QrexecProtocolError(
                f"{self.what} sent {message_name(msg_type)} after its exit code", field="type"
            )
        if msg_type in (MSG_DATA_STDOUT, MSG_DATA_STDIN):
            if self._out_eof:
                raise QrexecProtocolError(f"{self.what} sent stdout after its EOF", field="type")
            if not payload:
                self._out_eof = True
                self.stdout.feed_eof()
                return
            self.stdout.feed_data(payload)
        elif msg_type == MSG_DATA_STDERR:
            if self._err_eof:
                raise QrexecProtocolError(f"{self.what} sent stderr after its EOF", field="type")
            if not payload:
                self._err_eof = True
                self.stderr.feed_eof()
                return
            if self._discard_stderr:
                return
            self.stderr.feed_data(payload)
        else:  # MSG_DATA_EXIT_CODE (read_message refused every other type)
            self._code = parse_exit_code(payload)
            self._finish_streams()
            self._timer = asyncio.get_running_loop().call_later(self._exit_grace, self._grace_over)

    def _finish_streams(self) -> None:
        if not self._out_eof:
            self._out_eof = True
            self.stdout.feed_eof()
        if not self._err_eof:
            self._err_eof = True
            self.stderr.feed_eof()

    def _grace_over(self) -> None:
        if not self._done.done() and self._code is not None:
            self._done.set_result(self._code)
            self.abort()

    def _channel_ended(self) -> None:
        if self._code is None:
            self._fail(
                ConnectionResetError(
                    f"{self.what} closed the data channel before sending its exit code"
                )
            )
        elif not self._done.done():
            self._done.set_result(self._code)

    def _channel_reset(self, exc: ConnectionResetError) -> None:
        if self._code is not None and isinstance(exc, TruncatedMessage):
            self._fail(
                QrexecProtocolError(f"{self.what} sent bytes after its exit code", field="type")
            )
        elif self._code is not None:
            # the service sent its code and closed with our input unread (a Unix socket
            # then reports a reset): the call is complete
            self._channel_ended()
        else:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        super()._fail(exc)
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # retrieved here: exit_code() re-raises it

    def _fail_readers(self, exc: Exception) -> None:
        for eof, reader in ((self._out_eof, self.stdout), (self._err_eof, self.stderr)):
            if not eof:
                reader.set_exception(exc)
        self._out_eof = self._err_eof = True

    def sink(self, msg_type: int) -> bool:
        return self._code is not None

    async def exit_code(self) -> int:
        """The service's exit status, once it has sent it and closed the channel (or
        ``exit_grace`` seconds after the code, if it does not close).
        ``ConnectionResetError`` if the channel ends first, ``QrexecProtocolError`` if
        the service misbehaves (even after its code)."""
        return await asyncio.shield(self._done)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes, int]:
        """Send ``input`` (then EOF), read stdout and stderr to their ends, and return
        ``(stdout, stderr, exit_code)``.

        Both are collected in memory anyway, so stderr never pauses the channel (it is
        read after stdout: no task per stream); input up to 64 KiB is written at once
        (no feeding task; the channel's buffer holds it), larger input is fed by a task
        under flow control."""

        async def feed() -> None:
            if input:
                self.stdin.write(input)
                await self.stdin.drain()
            self.stdin.write_eof()
            await self.stdin.drain()

        self._err_valve.unbounded = True
        self._err_valve.resume_reading()
        feeder: asyncio.Future[None] | None = None
        if input is None or len(input) <= _INLINE_INPUT:  # fewer tasks per call: for speed
            _frames(self.stdin).write_last(input or b"")
        else:
            feeder = asyncio.ensure_future(feed())
        try:
            out = await self.stdout.read()
            err = await self.stderr.read()
            code = await self.exit_code()
        finally:
            if feeder is not None:
                if not feeder.done():
                    feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await feeder
        return out, err, code


# -- subprocesses ---------------------------------------------------------------------------


async def relay_process(
    end: ServiceEnd,
    process: asyncio.subprocess.Process | Sequence[str],
    *,
    kill_grace: float = 10.0,
    **popen_kwargs: Any,
) -> int:
    """Run a service as a subprocess over ``end``: stdin/stdout/stderr piped through the
    data channel, then its status sent as the exit code (128+N if killed by signal N) and
    returned.

    ``process`` is a started `asyncio.subprocess.Process` with all three pipes, or an
    argv to start (``popen_kwargs`` go to `asyncio.create_subprocess_exec`).  When the
    process exits, input still arriving is discarded (as Qubes does).  If the caller goes
    away (or breaks the protocol), the pipes are closed, the process gets ``kill_grace``
    seconds to exit before ``SIGKILL``, and the error is raised."""
    if not isinstance(process, asyncio.subprocess.Process):
        PIPE = asyncio.subprocess.PIPE
        process = await asyncio.create_subprocess_exec(
            *process, stdin=PIPE, stdout=PIPE, stderr=PIPE, **popen_kwargs
        )
    proc = process
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def feed_stdin() -> None:
        pipe = proc.stdin
        assert pipe is not None
        broken = False
        while data := await end.stdin.read(1 << 16):
            if broken:
                continue  # discard: the process no longer reads
            try:
                pipe.write(data)
                await pipe.drain()
            except (BrokenPipeError, ConnectionResetError):
                broken = True
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            pipe.close()
            await pipe.wait_closed()

    async def copy_out(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        dst.write_eof()
        await dst.drain()

    stdin_task = asyncio.ensure_future(feed_stdin())
    outputs = asyncio.gather(copy_out(proc.stdout, end.stdout), copy_out(proc.stderr, end.stderr))
    lost = asyncio.ensure_future(end.wait_lost())
    try:
        waiting: set[asyncio.Future[Any]] = {outputs, lost}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            raise lost.result()
        outputs.result()
        returncode = await proc.wait()
    except BaseException:
        outputs.cancel()
        stdin_task.cancel()
        with contextlib.suppress(BaseException):
            await outputs
        await _reap(proc, kill_grace)
        with contextlib.suppress(BaseException):
            await stdin_task
        end.abort()
        raise
    finally:
        lost.cancel()
    stdin_task.cancel()
    with contextlib.suppress(BaseException):
        await stdin_task
    code = exit_code_from_returncode(returncode)
    await end.exit(code)
    return code


async def _reap(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Close our pipe ends, give ``proc`` ``grace`` seconds, then SIGKILL it; wait."""
    if proc.stdin is not None:
        proc.stdin.close()
    # asyncio has no public way to close a child's output pipes early (Qubes closes them
    # so a writer gets SIGPIPE): the subprocess transport's own pipe transports do it.
    transport = getattr(proc, "_transport", None)
    for fd in (1, 2):
        pipe = transport.get_pipe_transport(fd) if transport is not None else None
        if pipe is not None:
            pipe.close()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()


__all__ = [
    "DEFAULT_EXIT_GRACE",
    "CallerEnd",
    "DataWriter",
    "ServiceEnd",
    "data_handshake",
    "relay_process",
]
