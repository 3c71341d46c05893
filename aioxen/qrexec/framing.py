"""qrexec messages over an asyncio stream pair.

Theory of operation
-------------------
A qrexec channel is a stdlib `asyncio.StreamReader`/`asyncio.StreamWriter` pair (vchan,
vchan-socket or a Unix socket).  [`read_message`][aioxen.qrexec.framing.read_message]
reads one 8-byte header, checks the declared length against a limit *before* reading the
body (so a hostile length never allocates or waits for more than the limit), then reads
exactly that many bytes.  The limit may depend on the message type (a callable that also
refuses types that do not belong on the channel, e.g.
[`control_payload_limit`][aioxen.qrexec.wire.control_payload_limit]).

End of stream: a clean EOF exactly between messages returns ``None``; an EOF inside a
header or body is a cut stream and raises ``ConnectionResetError`` (never a short
message); a reset from the transport propagates as is.

[`write_message`][aioxen.qrexec.framing.write_message] frames and writes without
waiting (the caller drains); a large body is written as a separate buffer so it is not
copied to be joined with its header.  [`exchange_hello`][aioxen.qrexec.framing.exchange_hello]
is the HELLO handshake: it sends its own HELLO *first*, then reads the peer's -- safe
against every Qubes peer (the agent sends first on both channels; the dom0 side that
reads first does so only against a peer that sends first) and never a deadlock, because
each HELLO fits any channel buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aioxen.qrexec.wire import (
    HEADER,
    HEADER_SIZE,
    MSG_HELLO,
    QrexecProtocolError,
    encode_hello,
    message_name,
    negotiate,
    parse_hello,
)

_JOIN_BELOW = 4096  # a body up to this size is joined with its header into one write


class TruncatedMessage(ConnectionResetError):
    """The stream ended inside a message (a cut stream, never a short message)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One qrexec message: its type and payload."""

    type: int
    payload: bytes

    def __repr__(self) -> str:
        return f"Message({message_name(self.type)}, {len(self.payload)} bytes)"


Limit = int | Callable[[int], int]
"""A payload limit: a number, or a function of the message type that may raise
``QrexecProtocolError`` for a type that does not belong on the channel."""


def check_header(msg_type: int, length: int, limit: Limit, what: str) -> None:
    """``QrexecProtocolError`` if ``limit`` refuses ``msg_type`` or ``length`` exceeds
    it (what [`read_message`][aioxen.qrexec.framing.read_message] checks before a body)."""
    try:
        cap = limit(msg_type) if callable(limit) else limit
    except QrexecProtocolError as exc:
        raise QrexecProtocolError(f"{what}: {exc}", field=exc.field) from None
    if length > cap:
        raise QrexecProtocolError(
            f"{what}: {message_name(msg_type)} declares {length} bytes, more than its limit "
            f"of {cap}",
            field="len",
        )


async def read_message(
    reader: asyncio.StreamReader, *, limit: Limit, what: str = "qrexec peer"
) -> Message | None:
    """Read one message; ``None`` at a clean EOF between messages.

    ``QrexecProtocolError`` if the type is refused by ``limit`` or the length exceeds it
    (checked before the body is read);
    [`TruncatedMessage`][aioxen.qrexec.framing.TruncatedMessage] (a
    ``ConnectionResetError``) if the stream ends inside the message.  ``what`` names the
    peer in errors."""
    try:
        head = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise TruncatedMessage(
            f"{what}: stream ended inside a message header ({len(exc.partial)} of 8 bytes)"
        ) from None
    msg_type, length = HEADER.unpack(head)
    check_header(msg_type, length, limit, what)
    if not length:
        return Message(msg_type, b"")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise TruncatedMessage(
            f"{what}: stream ended inside {message_name(msg_type)} "
            f"({len(exc.partial)} of {length} bytes)"
        ) from None
    return Message(msg_type, body)


def write_message(
    writer: asyncio.StreamWriter,
    msg_type: int,
    payload: bytes | bytearray | memoryview = b"",
) -> None:
    """Frame and write one message (no drain)."""
    n = len(payload)
    if n <= _JOIN_BELOW:
        writer.write(HEADER.pack(msg_type, n) + bytes(payload))
    else:
        writer.write(HEADER.pack(msg_type, n))
        writer.write(payload)


async def send_message(
    writer: asyncio.StreamWriter,
    msg_type: int,
    payload: bytes | bytearray | memoryview = b"",
) -> None:
    """[`write_message`][aioxen.qrexec.framing.write_message], then drain."""
    write_message(writer, msg_type, payload)
    await writer.drain()


async def exchange_hello(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    version: int,
    min_version: int,
    what: str = "qrexec peer",
) -> int:
    """Send ``MSG_HELLO{version}``, read the peer's, return ``min(version, theirs)``.

    ``QrexecProtocolError`` if the peer's first message is not a 4-byte HELLO or its
    version is below ``min_version``; ``ConnectionResetError`` if the peer goes away first.
    Cancellable."""
    write_message(writer, MSG_HELLO, encode_hello(version))
    await writer.drain()

    def hello_only(msg_type: int) -> int:
        if msg_type != MSG_HELLO:
            raise QrexecProtocolError(
                f"expected MSG_HELLO first, got {message_name(msg_type)}", field="type"
            )
        return 4

    msg = await read_message(reader, limit=hello_only, what=what)
    if msg is None:
        raise ConnectionResetError(f"{what}: channel closed before its MSG_HELLO")
    try:
        theirs = parse_hello(msg.payload)
    except QrexecProtocolError as exc:
        raise QrexecProtocolError(f"{what}: {exc}", field=exc.field) from None
    return negotiate(version, theirs, min_version=min_version, what=what)


__all__ = [
    "Limit",
    "Message",
    "TruncatedMessage",
    "check_header",
    "exchange_hello",
    "read_message",
    "send_message",
    "write_message",
]
