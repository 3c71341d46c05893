"""NBD protocol wire format (pure): constants, message layouts, option parsers.

Theory of operation
-------------------
NBD (the Network Block Device protocol, fixed-newstyle negotiation) has two phases.

*Handshake.*  The server greets with ``NBDMAGIC``, ``IHAVEOPT`` and 16 bits of handshake
flags; the client answers with 32 bits of client flags.  Then the client sends options
(``IHAVEOPT``, option u32, length u32, data); the server answers each with one or more
option replies (reply magic u64, option u32, reply type u32, length u32, data), the last one
``NBD_REP_ACK`` or an error (bit 31 set).  ``NBD_OPT_GO`` (or the legacy
``NBD_OPT_EXPORT_NAME``, which cannot fail gracefully) ends the handshake.  ``NBD_OPT_GO``
and ``NBD_OPT_INFO`` carry an export name and a list of information requests; the server
sends ``NBD_REP_INFO`` items (export size and transmission flags always, block sizes,
name, description) before its ``NBD_REP_ACK``.

*Transmission.*  Requests are 28 bytes (magic, command flags u16, type u16, cookie u64,
offset u64, length u32), followed by the payload for ``NBD_CMD_WRITE``.  The server
answers each with a *simple reply* (magic, error u32, cookie u64, then the data of a
successful read) or, if negotiated with ``NBD_OPT_STRUCTURED_REPLY``, with *structured
reply chunks* (magic, flags u16, type u16, cookie u64, length u32, payload).  Replies may
come in any order; the cookie matches them to requests.

All integers are big-endian.  This module only encodes and decodes; the server logic is
in [`aioxen.blk.nbd`][].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

# NBD_REP_INFO item types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}

# structured reply
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# errors (values fixed by the protocol, not the host's errno)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

MAX_STRING = 4096

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
INFO_EXPORT_ITEM = struct.Struct(">HQH")
INFO_BLOCK_SIZE_ITEM = struct.Struct(">HIII")


class NBDError(Exception):
    """A malformed message from the peer; the session cannot continue."""


def greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT_ITEM.pack(INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_ITEM.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_string(kind: int, text: str) -> bytes:
    return struct.pack(">H", kind) + text.encode()


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_header(cookie: int, kind: int, length: int, *, done: bool = True) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return structured_header(cookie, REPLY_TYPE_ERROR, len(payload)) + payload


def structured_data_header(cookie: int, offset: int, length: int) -> bytes:
    """Header of a final ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk; ``length`` data bytes follow."""
    return structured_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + length) + struct.pack(">Q", offset)


def structured_none(cookie: int) -> bytes:
    return structured_header(cookie, REPLY_TYPE_NONE, 0)


def block_status(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents
    )
    return structured_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload)) + payload


@dataclass(frozen=True)
class InfoRequest:
    """Parsed data of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``."""

    name: str
    items: tuple[int, ...]


def _string(data: bytes, at: int, length: int, what: str) -> tuple[str, int]:
    if length > MAX_STRING or at + length > len(data):
        raise NBDError(f"{what} of {length} bytes does not fit the option")
    try:
        return data[at : at + length].decode(), at + length
    except UnicodeDecodeError as exc:
        raise NBDError(f"{what} is not UTF-8") from exc


def parse_info_request(data: bytes) -> InfoRequest:
    """``u32 name length, name, u16 count, count x u16`` (``NBDError`` if malformed)."""
    if len(data) < 6:
        raise NBDError(f"NBD_OPT_GO/INFO data of {len(data)} bytes is too short")
    (nlen,) = struct.unpack_from(">I", data, 0)
    name, at = _string(data, 4, nlen, "export name")
    if at + 2 > len(data):
        raise NBDError("NBD_OPT_GO/INFO lacks the information request count")
    (count,) = struct.unpack_from(">H", data, at)
    at += 2
    if at + 2 * count != len(data):
        raise NBDError(
            f"NBD_OPT_GO/INFO announces {count} information requests in {len(data) - at} bytes"
        )
    items = struct.unpack_from(f">{count}H", data, at)
    return InfoRequest(name, tuple(items))


@dataclass(frozen=True)
class MetaContextRequest:
    """Parsed data of ``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT``."""

    name: str
    queries: tuple[str, ...]


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    """``u32 name length, name, u32 count, count x (u32 length, query)``."""
    if len(data) < 8:
        raise NBDError(f"meta context option of {len(data)} bytes is too short")
    (nlen,) = struct.unpack_from(">I", data, 0)
    name, at = _string(data, 4, nlen, "export name")
    if at + 4 > len(data):
        raise NBDError("meta context option lacks the query count")
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    queries = []
    for _ in range(count):
        if at + 4 > len(data):
            raise NBDError("meta context option truncated")
        (qlen,) = struct.unpack_from(">I", data, at)
        q, at = _string(data, at + 4, qlen, "meta context query")
        queries.append(q)
    if at != len(data):
        raise NBDError("meta context option has trailing bytes")
    return MetaContextRequest(name, tuple(queries))


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(header: bytes) -> Request:
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise NBDError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def request(kind: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """Encode a request header (used by tests acting as a raw client)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)
