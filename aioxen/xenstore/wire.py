"""The XenStore wire codec (``xen/include/public/io/xs_wire.h``), pure and sans-I/O.

Theory of operation
-------------------
Every XenStore message, in either direction and on every transport (the xenstored Unix
socket, ``/dev/xen/xenbus``, the shared ring page), is a 16-byte header followed by
``len`` payload bytes::

    offset 0  type    u32   an XS_* message type ([`XsType`][])
    offset 4  req_id  u32   chosen by the client, echoed in the reply
    offset 8  tx_id   u32   0, or a transaction id from TRANSACTION_START
    offset 12 len     u32   payload length, at most XENSTORE_PAYLOAD_MAX (4096)

The header is in the host's native byte order (Xen guests and dom0 share it).

Payloads are mostly NUL-terminated strings (``path\\0``, ``path\\0token\\0``).  The two
exceptions are ``WRITE`` (``path\\0value``: the value is raw bytes with *no* trailing NUL)
and the ``READ`` reply (the raw value).  An ``ERROR`` reply carries the *name* of an errno
(``"ENOENT\\0"``), not a number.  Permissions travel as strings ``<letter><domid>`` where
the letter is ``n`` (none), ``r`` (read), ``w`` (write) or ``b`` (both); the first entry
names the owner and gives the default access of every domain not listed after it.

This module turns bytes into [`Message`][] objects and back, splits and validates
payloads, and parses permission strings.  Anything malformed raises
[`aioxen.ProtocolError`][] with ``field`` naming what is wrong.  [`Decoder`][] is an
incremental framer for stream transports: feed it whatever arrived, take whole messages
out; an oversized ``len`` is reported as soon as the header is complete, before any
payload is buffered.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aioxen.errors import ProtocolError

HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size  # 16
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
U32_MAX = 0xFFFFFFFF
NUL = b"\x00"


class XsType(enum.IntEnum):
    """Message types.  0..22 are those of the Xen 4.17 headers; 23..26 appeared later."""

    CONTROL = 0  # also known as DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed in Xen 4.9.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


XS_DEBUG = XsType.CONTROL
XS_RESTRICT_REMOVED = 20
XS_TYPE_COUNT_4_17 = 23
"""``XS_TYPE_COUNT`` in the Xen 4.17 headers: types 0..22 (20 unused)."""


def msg_type(value: int) -> XsType:
    """The [`XsType`][] for a header's ``type`` field, or ``ProtocolError``."""
    if value == XS_RESTRICT_REMOVED:
        raise ProtocolError("XenStore message type 20 (XS_RESTRICT) was removed", field="type")
    try:
        return XsType(value)
    except ValueError:
        raise ProtocolError(f"unknown XenStore message type {value}", field="type") from None


# The error table of xs_wire.h, in its order.  Only these names go on the wire.
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)
ERRNO_BY_NAME: dict[str, int] = {name: getattr(_errno, name) for name in ERROR_NAMES}
NAME_BY_ERRNO: dict[int, str] = {num: name for name, num in ERRNO_BY_NAME.items()}


def error_payload(errno_value: int) -> bytes:
    """The ERROR payload for an errno (unknown errnos are sent as ``EINVAL``, as Xen does)."""
    return NAME_BY_ERRNO.get(errno_value, "EINVAL").encode() + NUL


def parse_error(payload: bytes) -> tuple[str, int]:
    """Decode an ERROR payload into ``(name, errno)``.

    A name outside the xs_wire.h table is kept (``errno`` ``EINVAL``), like libxenstore.
    """
    if not payload.endswith(NUL) or NUL in payload[:-1]:
        raise ProtocolError("ERROR payload is not one NUL-terminated string", field="payload")
    name = payload[:-1].decode("ascii", "replace")
    return name, ERRNO_BY_NAME.get(name, _errno.EINVAL)


@dataclass(frozen=True, slots=True)
class Header:
    type: int
    req_id: int
    tx_id: int
    length: int


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode exactly 16 header bytes; ``ProtocolError`` if short or ``len`` is too big."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(
            f"XenStore header is {len(data)} bytes, expected {HEADER_SIZE}", field="header"
        )
    typ, req_id, tx_id, length = HEADER.unpack(data)
    if length > XENSTORE_PAYLOAD_MAX:
        raise ProtocolError(
            f"XenStore payload length {length} exceeds XENSTORE_PAYLOAD_MAX "
            f"({XENSTORE_PAYLOAD_MAX})",
            field="len",
        )
    return Header(typ, req_id, tx_id, length)


@dataclass(slots=True)
class Message:
    """One XenStore message.  ``type`` stays an int so unknown types survive decoding."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > XENSTORE_PAYLOAD_MAX:
            raise ProtocolError(
                f"XenStore payload of {len(self.payload)} bytes exceeds "
                f"XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX})",
                field="len",
            )
        try:
            return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload
        except struct.error:
            for name in ("type", "req_id", "tx_id"):
                value = getattr(self, name)
                if not 0 <= value <= U32_MAX:
                    raise ProtocolError(
                        f"XenStore {name} {value} is not a u32", field=name
                    ) from None
            raise

    @property
    def type_name(self) -> str:
        try:
            return XsType(self.type).name
        except ValueError:
            return f"type {self.type}"

    def reply(self, typ: int, payload: bytes) -> Message:
        """A reply to this request: same ``req_id`` and ``tx_id``."""
        return Message(typ, self.req_id, self.tx_id, payload)

    def error_reply(self, errno_value: int) -> Message:
        return Message(XsType.ERROR, self.req_id, self.tx_id, error_payload(errno_value))

    def ok_reply(self) -> Message:
        return Message(self.type, self.req_id, self.tx_id, b"OK\x00")


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one whole message (header plus exactly ``len`` payload bytes)."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(
            f"truncated XenStore header: {len(data)} of {HEADER_SIZE} bytes", field="header"
        )
    header = decode_header(bytes(data[:HEADER_SIZE]))
    payload = bytes(data[HEADER_SIZE:])
    if len(payload) != header.length:
        raise ProtocolError(
            f"XenStore payload is {len(payload)} bytes but header len says {header.length}",
            field="len",
        )
    return Message(header.type, header.req_id, header.tx_id, payload)


class Decoder:
    """Incremental framer: ``feed(bytes)`` then iterate [`messages`][].

    ``ProtocolError`` is raised by [`messages`][] as soon as a header with an oversized
    ``len`` is complete; the decoder is then unusable (the stream is out of sync).
    [`pending`][] tells how many bytes of an incomplete message are buffered, which lets
    a caller detect a truncated message at EOF.
    """

    __slots__ = ("_broken", "_buf", "_max_payload")

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._broken = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def messages(self) -> list[Message]:
        if self._broken:
            raise ProtocolError("XenStore stream is out of sync after an earlier error")
        out: list[Message] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                typ, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
                if length > self._max_payload:
                    self._broken = True
                    raise ProtocolError(
                        f"XenStore payload length {length} exceeds XENSTORE_PAYLOAD_MAX "
                        f"({self._max_payload})",
                        field="len",
                    )
                end = pos + HEADER_SIZE + length
                if end > len(buf):
                    break
                out.append(Message(typ, req_id, tx_id, bytes(buf[pos + HEADER_SIZE : end])))
                pos = end
        finally:
            if pos:
                del buf[:pos]
        return out


# -- payload strings ------------------------------------------------------------------


def join(*parts: bytes | str) -> bytes:
    """Each part NUL-terminated, concatenated (``join("a", "b") == b"a\\0b\\0"``)."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        if NUL in raw:
            raise ValueError(f"XenStore string {raw!r} contains a NUL byte")
        out += raw
        out += NUL
    return bytes(out)


def split(payload: bytes, count: int | None = None, *, what: str = "payload") -> list[bytes]:
    """Split a payload of NUL-terminated strings.

    Every string must be NUL-terminated.  With ``count``, exactly that many are required.
    """
    if not payload:
        parts: list[bytes] = []
    elif not payload.endswith(NUL):
        raise ProtocolError(f"{what}: last string is not NUL-terminated", field=what)
    else:
        parts = payload[:-1].split(NUL)
    if count is not None and len(parts) != count:
        raise ProtocolError(
            f"{what}: expected {count} NUL-terminated string(s), got {len(parts)}", field=what
        )
    return parts


def split_reply_strings(payload: bytes) -> list[bytes]:
    """Strings of a DIRECTORY / GET_PERMS style reply (lenient about a missing final NUL)."""
    if not payload:
        return []
    if payload.endswith(NUL):
        payload = payload[:-1]
    return payload.split(NUL)


def encode_write(path: bytes, value: bytes) -> bytes:
    """The WRITE payload: ``path\\0value`` (no trailing NUL after the value)."""
    if NUL in path:
        raise ValueError(f"XenStore path {path!r} contains a NUL byte")
    return path + NUL + value


def parse_write(payload: bytes) -> tuple[bytes, bytes]:
    """Split a WRITE payload into ``(path, value)``."""
    cut = payload.find(NUL)
    if cut < 0:
        raise ProtocolError("WRITE payload has no NUL after the path", field="payload")
    return payload[:cut], payload[cut + 1 :]


def parse_u32(raw: bytes, what: str) -> int:
    """A decimal unsigned 32-bit number (transaction ids, offsets)."""
    if not raw or not raw.isdigit() or len(raw) > 10:
        raise ProtocolError(f"{what} {raw!r} is not a decimal number", field=what)
    value = int(raw)
    if value > U32_MAX:
        raise ProtocolError(f"{what} {value} is out of u32 range", field=what)
    return value


def parse_domid(raw: bytes, what: str = "domid") -> int:
    """A decimal domain id 0..65535."""
    if not raw or not raw.isdigit() or len(raw) > 5:
        raise ProtocolError(f"{what} {raw!r} is not a decimal domain id", field=what)
    value = int(raw)
    if value > 0xFFFF:
        raise ProtocolError(f"{what} {value} is out of range 0..65535", field=what)
    return value


# -- permissions ----------------------------------------------------------------------

PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_BOTH = PERM_READ | PERM_WRITE
PERM_OWNER = 8  # xenstore_lib.h XS_PERM_OWNER: never on the wire, only in access checks

_LETTER_TO_MASK = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_BOTH}
_MASK_TO_LETTER = {mask: letter for letter, mask in _LETTER_TO_MASK.items()}


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: ``domid`` and ``access`` (``"n"``, ``"r"``, ``"w"`` or ``"b"``).

    In a permission list the first entry names the node's owner and its letter is the
    access of every domain not listed after it.
    """

    domid: int
    access: str = "n"

    def __post_init__(self) -> None:
        if self.access not in _LETTER_TO_MASK:
            raise ValueError(f"permission letter {self.access!r} is not one of n, r, w, b")
        if not isinstance(self.domid, int) or not 0 <= self.domid <= 0xFFFF:
            raise ValueError(f"permission domid {self.domid!r} out of range 0..65535")

    @property
    def mask(self) -> int:
        return _LETTER_TO_MASK[self.access]

    @classmethod
    def from_mask(cls, domid: int, mask: int) -> Perm:
        return cls(domid, _MASK_TO_LETTER[mask & PERM_BOTH])

    @classmethod
    def parse(cls, text: str | bytes) -> Perm:
        """Parse ``"r2"``, ``b"n0"``, ...; ``ProtocolError`` naming the bad string."""
        raw = text.encode() if isinstance(text, str) else bytes(text)
        if len(raw) < 2 or chr(raw[0]) not in _LETTER_TO_MASK:
            raise ProtocolError(
                f"permission {raw!r} does not start with one of n, r, w, b", field="perms"
            )
        return cls(parse_domid(raw[1:], "permission domid"), chr(raw[0]))

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"


PermLike = Perm | str | bytes


def to_perm(value: PermLike) -> Perm:
    return value if isinstance(value, Perm) else Perm.parse(value)


def encode_perms(perms: Iterable[PermLike]) -> bytes:
    """Permission entries as NUL-terminated strings, as in SET_PERMS / GET_PERMS."""
    return b"".join(str(to_perm(p)).encode() + NUL for p in perms)


def parse_perms(parts: Sequence[bytes]) -> tuple[Perm, ...]:
    """Parse a non-empty list of permission strings."""
    if not parts:
        raise ProtocolError("permission list is empty", field="perms")
    return tuple(Perm.parse(p) for p in parts)


__all__ = [
    "ERRNO_BY_NAME",
    "ERROR_NAMES",
    "HEADER_SIZE",
    "NAME_BY_ERRNO",
    "PERM_BOTH",
    "PERM_NONE",
    "PERM_OWNER",
    "PERM_READ",
    "PERM_WRITE",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XS_DEBUG",
    "Decoder",
    "Header",
    "Message",
    "Perm",
    "PermLike",
    "XsType",
    "decode",
    "decode_header",
    "encode_perms",
    "encode_write",
    "error_payload",
    "join",
    "msg_type",
    "parse_domid",
    "parse_error",
    "parse_perms",
    "parse_u32",
    "parse_write",
    "split",
    "split_reply_strings",
    "to_perm",
]
