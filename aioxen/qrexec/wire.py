"""qrexec wire core: message types, structs, versions, limits and command lines (pure).

Theory of operation
-------------------
Every qrexec channel (the control vchan, each call's data vchan, the daemon's local
client socket and the agent's trigger socket) carries the same framing: an 8-byte header
``{u32 type; u32 len}`` (little-endian) followed by ``len`` payload bytes.  This module
knows the message types, the payload structs and their limits; it does no I/O, takes
``bytes``/``memoryview`` and returns plain values.  The asyncio side is in
[`aioxen.qrexec.framing`][] (messages over a stream pair) and [`aioxen.qrexec.data`][]
(the data phase).

Facts, as Qubes' qubes-core-qrexec implements them (checked against its source, not copied):

* **Versions.**  Both ends send ``MSG_HELLO`` with a ``u32 version``; each uses the lower
  of the two.  2 = separate control/data channels, 4 KiB data chunks,
  ``MSG_TRIGGER_SERVICE``; 3 = 64 KiB chunks, ``MSG_TRIGGER_SERVICE3``; 4 =
  ``MSG_TRIGGER_SERVICE4`` (with a source domain).  Data channels need at least 2; the
  local client protocol (qrexec-client <-> daemon) is version 3.  A HELLO payload is
  exactly 4 bytes.
* **Data phase.**  ``MSG_DATA_STDIN`` flows to the service, ``MSG_DATA_STDOUT`` and
  ``MSG_DATA_STDERR`` from it; a zero-length message of a stream is that stream's EOF;
  ``MSG_DATA_EXIT_CODE`` carries a 4-byte signed status and ends the call.  A payload is
  at most [`max_chunk_size`][aioxen.qrexec.wire.max_chunk_size] of the negotiated version.
  Qubes treats STDIN and STDOUT alike on receipt (Qubes Windows Tools mix them up), and so
  does [`aioxen.qrexec.data`][].
* **Structs.**  ``exec_params {u32 connect_domain; u32 connect_port; char cmdline[]}``
  (``cmdline`` NUL-terminated, the rest of the payload); ``service_params {char
  ident[32]}``; ``trigger_service_params {char service_name[64]; char target[32];
  service_params}`` (v2, exactly 128 bytes); ``..._params3 {char target[64];
  service_params; char service_name[]}``; ``..._params4 {char source[64]; char
  target[64]; service_params; char service_name[]}``.  Fixed fields are NUL-terminated
  and NUL-padded.  A trailing name is NUL-terminated, holds no other NUL and is at most
  ``MAX_SERVICE_NAME_LEN`` bytes beyond the fixed part.  A command line including its NUL
  is at most ``MAX_QREXEC_CMD_LEN`` bytes.  ``MSG_CONNECTION_TERMINATED`` is an
  ``exec_params`` with no command line (exactly 8 bytes); ``MSG_SERVICE_CONNECT``'s command
  line is the 32-byte request ident.
* **Command lines.**  ``user:command`` (the agent strips the user), optionally
  ``nogui:`` before the command, and a service call is ``QUBESRPC service+arg source``
  (a service without an argument is written with a trailing ``+``); calls to dom0 add
  ``keyword|name target``.
* **Exit codes.**  125 qrexec itself failed, 126 refused by policy, 127 service not found;
  a service killed by signal N reports 128+N.

Every decoder validates every length and field and raises
[`QrexecProtocolError`][aioxen.qrexec.wire.QrexecProtocolError] (an
[`aioxen.ProtocolError`][]) naming the field; nothing allocates more than the payload it
was given.  A trigger whose structure is sound but whose content is refused (a bad name)
raises the subclass [`InvalidRequest`][aioxen.qrexec.wire.InvalidRequest] carrying the
request ident, so a daemon can answer ``MSG_SERVICE_REFUSED`` instead of dropping the
connection (as Qubes' daemon does).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

from aioxen.errors import ProtocolError

# -- errors --------------------------------------------------------------------------------


class QrexecProtocolError(ProtocolError):
    """A qrexec peer broke the protocol; ``field`` names the offending field."""


class InvalidRequest(QrexecProtocolError):
    """A structurally valid trigger with refused content (e.g. a bad service name).

    ``request_id`` is the (valid) ident to answer with ``MSG_SERVICE_REFUSED``.
    """

    def __init__(self, message: str, *, request_id: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.request_id = request_id


# -- constants -----------------------------------------------------------------------------

PROTOCOL_V2 = 2
PROTOCOL_V3 = 3
PROTOCOL_V4 = 4
PROTOCOL_VERSION = PROTOCOL_V4
"""The newest version this implementation speaks."""
CLIENT_PROTOCOL_VERSION = 3
"""The version of the local qrexec-client <-> daemon socket protocol."""
DATA_MIN_VERSION = PROTOCOL_V2
"""Data channels need at least this version."""

MAX_DATA_CHUNK_V2 = 4096
MAX_DATA_CHUNK_V3 = 65536
MAX_SERVICE_NAME_LEN = 65000
"""Maximum bytes of the trailing service-name field of a trigger (with its NUL)."""
MAX_QREXEC_CMD_LEN = 65535
"""Maximum bytes of an ``exec_params`` command line, its NUL included."""
NAME_MAX = 255
"""Maximum length of a service name (without the argument): a file name."""

VCHAN_BASE_PORT = 512
RPC_REQUEST_COMMAND = "QUBESRPC"
NOGUI_PREFIX = "nogui:"

EXIT_PROBLEM = 125
"""Exit code: qrexec itself failed."""
EXIT_REFUSED = 126
"""Exit code: the call was refused (policy)."""
EXIT_NOT_FOUND = 127
"""Exit code: the service does not exist."""

# message types -- data channel
MSG_DATA_STDIN = 0x190
MSG_DATA_STDOUT = 0x191
MSG_DATA_STDERR = 0x192
MSG_DATA_EXIT_CODE = 0x193
# daemon -> agent
MSG_EXEC_CMDLINE = 0x200
MSG_JUST_EXEC = 0x201
MSG_SERVICE_CONNECT = 0x202
MSG_SERVICE_REFUSED = 0x203
# agent -> daemon
MSG_TRIGGER_SERVICE = 0x210
MSG_CONNECTION_TERMINATED = 0x211
MSG_TRIGGER_SERVICE3 = 0x212
MSG_TRIGGER_SERVICE4 = 0x213
# both
MSG_HELLO = 0x300

MESSAGE_NAMES: dict[int, str] = {
    MSG_DATA_STDIN: "MSG_DATA_STDIN",
    MSG_DATA_STDOUT: "MSG_DATA_STDOUT",
    MSG_DATA_STDERR: "MSG_DATA_STDERR",
    MSG_DATA_EXIT_CODE: "MSG_DATA_EXIT_CODE",
    MSG_EXEC_CMDLINE: "MSG_EXEC_CMDLINE",
    MSG_JUST_EXEC: "MSG_JUST_EXEC",
    MSG_SERVICE_CONNECT: "MSG_SERVICE_CONNECT",
    MSG_SERVICE_REFUSED: "MSG_SERVICE_REFUSED",
    MSG_TRIGGER_SERVICE: "MSG_TRIGGER_SERVICE",
    MSG_CONNECTION_TERMINATED: "MSG_CONNECTION_TERMINATED",
    MSG_TRIGGER_SERVICE3: "MSG_TRIGGER_SERVICE3",
    MSG_TRIGGER_SERVICE4: "MSG_TRIGGER_SERVICE4",
    MSG_HELLO: "MSG_HELLO",
}

DATA_MESSAGES = frozenset({MSG_DATA_STDIN, MSG_DATA_STDOUT, MSG_DATA_STDERR, MSG_DATA_EXIT_CODE})

HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size  # 8
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_EXEC = struct.Struct("<II")

IDENT_SIZE = 32
"""``service_params.ident``: NUL-terminated, NUL-padded."""
TRIGGER2_SIZE = 64 + 32 + IDENT_SIZE  # 128, fixed
TRIGGER3_FIXED = 64 + IDENT_SIZE  # 96, then the service name
TRIGGER4_FIXED = 64 + 64 + IDENT_SIZE  # 160, then the service name
EXEC_PARAMS_FIXED = _EXEC.size  # 8, then the command line


def message_name(msg_type: int) -> str:
    """``MSG_...`` for a known type, else its hex value."""
    return MESSAGE_NAMES.get(msg_type, f"message type {msg_type:#x}")


def max_chunk_size(version: int) -> int:
    """The largest data-message payload at protocol ``version`` (2: 4 KiB, 3+: 64 KiB)."""
    if version < PROTOCOL_V2:
        raise ValueError(f"qrexec data channels need version >= 2, not {version}")
    return MAX_DATA_CHUNK_V2 if version == PROTOCOL_V2 else MAX_DATA_CHUNK_V3


def payload_limits(allowed: Collection[int], refusal: str) -> Callable[[int], int]:
    """A ``read_message`` limit for one kind of peer: [`control_payload_limit`][] for the
    ``allowed`` message types, a ``QrexecProtocolError`` with ``refusal`` (``{name}``:
    the type's name) for any other."""
    kinds = frozenset(allowed)

    def limit(msg_type: int) -> int:
        if msg_type not in kinds:
            raise QrexecProtocolError(refusal.format(name=message_name(msg_type)), field="type")
        return control_payload_limit(msg_type)

    return limit


def control_payload_limit(msg_type: int) -> int:
    """The largest payload a control/trigger/client-socket message of ``msg_type`` may
    have; ``QrexecProtocolError`` for a type that never travels there."""
    if msg_type in (MSG_EXEC_CMDLINE, MSG_JUST_EXEC, MSG_SERVICE_CONNECT):
        return EXEC_PARAMS_FIXED + MAX_QREXEC_CMD_LEN
    if msg_type == MSG_SERVICE_REFUSED:
        return IDENT_SIZE
    if msg_type == MSG_TRIGGER_SERVICE:
        return TRIGGER2_SIZE
    if msg_type == MSG_TRIGGER_SERVICE3:
        return TRIGGER3_FIXED + MAX_SERVICE_NAME_LEN
    if msg_type == MSG_TRIGGER_SERVICE4:
        return TRIGGER4_FIXED + MAX_SERVICE_NAME_LEN
    if msg_type == MSG_CONNECTION_TERMINATED:
        return EXEC_PARAMS_FIXED
    if msg_type == MSG_HELLO:
        return _U32.size
    raise QrexecProtocolError(
        f"unexpected {message_name(msg_type)} on a control channel", field="type"
    )


def data_payload_limit(version: int, msg_type: int) -> int:
    """The largest payload of data-channel message ``msg_type`` at ``version``;
    ``QrexecProtocolError`` for a type that is not a data message."""
    if msg_type not in DATA_MESSAGES:
        raise QrexecProtocolError(
            f"unexpected {message_name(msg_type)} on a data channel", field="type"
        )
    return max_chunk_size(version)


# -- header ---------------------------------------------------------------------------------


def encode_header(msg_type: int, length: int) -> bytes:
    """The 8-byte ``msg_header``."""
    return HEADER.pack(msg_type, length)


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(type, len)`` from exactly 8 bytes."""
    if len(buf) != HEADER_SIZE:
        raise QrexecProtocolError(
            f"msg_header is {HEADER_SIZE} bytes, got {len(buf)}", field="header"
        )
    t, n = HEADER.unpack(buf)
    return int(t), int(n)


def frame(msg_type: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Header + payload as one ``bytes``."""
    return HEADER.pack(msg_type, len(payload)) + bytes(payload)


# -- HELLO ----------------------------------------------------------------------------------


def encode_hello(version: int) -> bytes:
    """``peer_info`` payload."""
    return _U32.pack(version)


def parse_hello(payload: bytes | bytearray | memoryview) -> int:
    """The peer's version from a ``MSG_HELLO`` payload (exactly 4 bytes)."""
    if len(payload) != _U32.size:
        raise QrexecProtocolError(
            f"MSG_HELLO payload must be 4 bytes, got {len(payload)}", field="peer_info"
        )
    return int(_U32.unpack(payload)[0])


def negotiate(local: int, remote: int, *, min_version: int, what: str = "peer") -> int:
    """``min(local, remote)``; ``QrexecProtocolError`` if below ``min_version``."""
    version = min(local, remote)
    if version < min_version:
        raise QrexecProtocolError(
            f"{what} speaks qrexec protocol version {remote}; at least {min_version} is needed",
            field="version",
        )
    return version


# -- exit code -------------------------------------------------------------------------------


def encode_exit_code(code: int) -> bytes:
    """``MSG_DATA_EXIT_CODE`` payload: a signed 32-bit status."""
    if not -(2**31) <= code < 2**31:
        raise ValueError(f"exit code {code} does not fit a signed 32-bit int")
    return _I32.pack(code)


def parse_exit_code(payload: bytes | bytearray | memoryview) -> int:
    """The status of a ``MSG_DATA_EXIT_CODE`` payload (exactly 4 bytes)."""
    if len(payload) != _I32.size:
        raise QrexecProtocolError(
            f"MSG_DATA_EXIT_CODE payload must be 4 bytes, got {len(payload)}", field="exit_code"
        )
    return int(_I32.unpack(payload)[0])


def exit_code_from_returncode(returncode: int) -> int:
    """Qubes' status for a finished process: its exit status, or 128+N when killed by
    signal N (``asyncio``/``subprocess`` report that as ``-N``)."""
    return 128 - returncode if returncode < 0 else returncode


# -- fixed string fields ----------------------------------------------------------------------

_IDENT_RE = re.compile(r"[0-9A-Za-z_.\- ]*")
_DOMAIN_RE = re.compile(r"[0-9A-Za-z_.\-@:]+")
_SERVICE_RE = re.compile(r"[0-9A-Za-z_.\-+]+")


def _fixed_field(raw: bytes | bytearray | memoryview, field: str) -> str:
    """A NUL-terminated, NUL-padded ASCII field."""
    data = bytes(raw)
    end = data.find(0)
    if end < 0:
        raise QrexecProtocolError(
            f"{field}: no NUL terminator in its {len(data)} bytes", field=field
        )
    if data[end:].count(0) != len(data) - end:
        raise QrexecProtocolError(f"{field}: non-NUL bytes after the terminator", field=field)
    try:
        return data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise QrexecProtocolError(f"{field}: not ASCII", field=field) from None


def _encode_fixed(value: str, size: int, field: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) >= size or b"\0" in raw:
        raise ValueError(f"{field} {value!r} does not fit {size - 1} bytes without NUL")
    return raw.ljust(size, b"\0")


def check_ident(ident: str) -> str:
    """A request ident (``[0-9A-Za-z_.- ]``, at most 31 characters)."""
    if len(ident) >= IDENT_SIZE or not _IDENT_RE.fullmatch(ident):
        raise QrexecProtocolError(f"request ident {ident[:40]!r} is invalid", field="request_id")
    return ident


def check_domain_name(name: str, field: str = "target_domain") -> str:
    """A domain name or keyword (``[0-9A-Za-z_.-@:]``, non-empty)."""
    if not _DOMAIN_RE.fullmatch(name):
        raise QrexecProtocolError(f"{field} {name[:80]!r} is invalid", field=field)
    return name


def check_service_name(name: str) -> str:
    """A service call ``name[+arg]`` as triggers carry it: non-empty, not starting with
    ``+``, ``[0-9A-Za-z_.-+]`` only, the name part at most ``NAME_MAX`` and not ``.``/``..``."""
    base = name.split("+", 1)[0]
    if not _SERVICE_RE.fullmatch(name) or not base or len(base) > NAME_MAX or base in (".", ".."):
        raise QrexecProtocolError(f"service name {name[:80]!r} is invalid", field="service_name")
    return name


def encode_service_params(ident: str) -> bytes:
    """``service_params``: the 32-byte ident."""
    return _encode_fixed(check_ident(ident), IDENT_SIZE, "request_id")


def parse_service_params(payload: bytes | bytearray | memoryview) -> str:
    """The ident of a ``service_params`` payload (``MSG_SERVICE_REFUSED``), exactly 32 bytes."""
    if len(payload) != IDENT_SIZE:
        raise QrexecProtocolError(
            f"service_params must be {IDENT_SIZE} bytes, got {len(payload)}", field="request_id"
        )
    return check_ident(_fixed_field(payload, "request_id"))


# -- exec_params ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecParams:
    """``exec_params``: where to connect the data channel and what to run.

    ``cmdline`` is ``None`` for the 8-byte form (``MSG_CONNECTION_TERMINATED``, the
    daemon's answer on its client socket).
    """

    connect_domain: int
    connect_port: int
    cmdline: str | None = None


def encode_exec_params(
    connect_domain: int, connect_port: int, cmdline: str | bytes | None = None
) -> bytes:
    """An ``exec_params`` payload; ``cmdline`` (``str`` is UTF-8) gets its NUL appended."""
    head = _EXEC.pack(connect_domain, connect_port)
    if cmdline is None:
        return head
    raw = cmdline.encode("utf-8", "surrogateescape") if isinstance(cmdline, str) else cmdline
    if b"\0" in raw or len(raw) + 1 > MAX_QREXEC_CMD_LEN:
        raise ValueError(f"command line must hold no NUL and be < {MAX_QREXEC_CMD_LEN} bytes")
    return head + raw + b"\0"


def parse_exec_params(
    payload: bytes | bytearray | memoryview, *, with_cmdline: bool = True
) -> ExecParams:
    """Decode ``exec_params``.

    With ``with_cmdline`` the command line must be present, NUL-terminated, at most
    ``MAX_QREXEC_CMD_LEN`` bytes with its NUL, non-empty and followed only by NUL padding
    (``MSG_SERVICE_CONNECT`` pads the ident to 32 bytes); it is decoded as UTF-8 with
    ``surrogateescape`` (any bytes round-trip).  Without it the payload is exactly 8 bytes.
    """
    n = len(payload)
    if not with_cmdline:
        if n != EXEC_PARAMS_FIXED:
            raise QrexecProtocolError(
                f"exec_params without command line must be 8 bytes, got {n}", field="len"
            )
        d, p = _EXEC.unpack(payload)
        return ExecParams(int(d), int(p))
    if n <= EXEC_PARAMS_FIXED:
        raise QrexecProtocolError(f"exec_params of {n} bytes has no command line", field="cmdline")
    if n - EXEC_PARAMS_FIXED > MAX_QREXEC_CMD_LEN:
        raise QrexecProtocolError(
            f"command line of {n - EXEC_PARAMS_FIXED} bytes exceeds {MAX_QREXEC_CMD_LEN}",
            field="cmdline",
        )
    d, p = _EXEC.unpack_from(payload)
    raw = bytes(payload[EXEC_PARAMS_FIXED:])
    end = raw.find(0)
    if end < 0:
        raise QrexecProtocolError("command line is not NUL-terminated", field="cmdline")
    if raw[end:].count(0) != len(raw) - end:
        raise QrexecProtocolError("command line holds a NUL before its end", field="cmdline")
    if end == 0:
        raise QrexecProtocolError("command line is empty", field="cmdline")
    return ExecParams(int(d), int(p), raw[:end].decode("utf-8", "surrogateescape"))


# -- triggers -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TriggerService:
    """A VM's request to call ``service`` (``name+arg``) in ``target``.

    ``source`` is the requested source domain (v4 only; ``None`` when not given);
    ``request_id`` is the ident the daemon echoes in ``MSG_SERVICE_CONNECT`` /
    ``MSG_SERVICE_REFUSED``.
    """

    service: str
    target: str
    request_id: str
    source: str | None = None


def trigger_type(version: int) -> int:
    """The trigger message a VM uses at ``version``."""
    if version >= PROTOCOL_V4:
        return MSG_TRIGGER_SERVICE4
    if version == PROTOCOL_V3:
        return MSG_TRIGGER_SERVICE3
    return MSG_TRIGGER_SERVICE


def check_trigger_version(msg_type: int, version: int) -> None:
    """Refuse a trigger type the negotiated ``version`` does not use, as Qubes' daemon
    does (``MSG_TRIGGER_SERVICE`` only below 3, ``3`` from 3, ``4`` from 4)."""
    ok = {
        MSG_TRIGGER_SERVICE: version < PROTOCOL_V3,
        MSG_TRIGGER_SERVICE3: version >= PROTOCOL_V3,
        MSG_TRIGGER_SERVICE4: version >= PROTOCOL_V4,
    }.get(msg_type)
    if ok is None:
        raise QrexecProtocolError(f"{message_name(msg_type)} is not a trigger", field="type")
    if not ok:
        raise QrexecProtocolError(
            f"{message_name(msg_type)} at negotiated protocol version {version}", field="type"
        )


def encode_trigger_service(version: int, trigger: TriggerService) -> tuple[int, bytes]:
    """``(msg_type, payload)`` of ``trigger`` for protocol ``version``.

    Below version 4 a ``source`` cannot be carried (``ValueError``)."""
    check_service_name(trigger.service)
    check_domain_name(trigger.target)
    ident = _encode_fixed(check_ident(trigger.request_id), IDENT_SIZE, "request_id")
    target64 = _encode_fixed(trigger.target, 64, "target_domain")
    msg_type = trigger_type(version)
    if trigger.source is not None and msg_type != MSG_TRIGGER_SERVICE4:
        raise ValueError(f"protocol version {version} cannot carry a source domain")
    if msg_type == MSG_TRIGGER_SERVICE:
        return msg_type, (
            _encode_fixed(trigger.service, 64, "service_name")
            + _encode_fixed(trigger.target, 32, "target_domain")
            + ident
        )
    name = trigger.service.encode("ascii") + b"\0"
    if len(name) > MAX_SERVICE_NAME_LEN:
        raise ValueError(f"service name longer than {MAX_SERVICE_NAME_LEN - 1} bytes")
    if msg_type == MSG_TRIGGER_SERVICE3:
        return msg_type, target64 + ident + name
    source = check_domain_name(trigger.source, "source_domain") if trigger.source else ""
    return msg_type, _encode_fixed(source, 64, "source_domain") + target64 + ident + name


def parse_trigger_service(msg_type: int, payload: bytes | bytearray | memoryview) -> TriggerService:
    """Decode a ``MSG_TRIGGER_SERVICE``/``3``/``4`` payload.

    A wrong length or a bad request ident raises ``QrexecProtocolError`` (drop the
    connection); once the ident is valid, any fault in a name field (terminator, NULs,
    characters) raises ``InvalidRequest`` carrying the ident (answer
    ``MSG_SERVICE_REFUSED``), as Qubes' daemon does.  Which
    type is allowed at which negotiated version is the caller's decision (Qubes' daemon
    accepts only the one of its version)."""
    n = len(payload)
    view = memoryview(payload)
    name = message_name(msg_type)
    if msg_type == MSG_TRIGGER_SERVICE:
        if n != TRIGGER2_SIZE:
            raise QrexecProtocolError(f"{name} must be {TRIGGER2_SIZE} bytes, got {n}", field="len")
        ident = check_ident(_fixed_field(view[96:128], "request_id"))
        service = _named(view[0:64], "service_name", ident)
        target = _named(view[64:96], "target_domain", ident)
        source = None
    elif msg_type in (MSG_TRIGGER_SERVICE3, MSG_TRIGGER_SERVICE4):
        fixed = TRIGGER3_FIXED if msg_type == MSG_TRIGGER_SERVICE3 else TRIGGER4_FIXED
        if n <= fixed:
            raise QrexecProtocolError(f"{name} of {n} bytes has no service name", field="len")
        if n - fixed > MAX_SERVICE_NAME_LEN:
            raise QrexecProtocolError(
                f"{name} service name of {n - fixed} bytes exceeds {MAX_SERVICE_NAME_LEN}",
                field="service_name",
            )
        ident = check_ident(_fixed_field(view[fixed - IDENT_SIZE : fixed], "request_id"))
        tail = view[fixed:]
        try:
            if tail[-1] != 0:
                raise QrexecProtocolError(
                    "service name is not NUL-terminated", field="service_name"
                )
            if bytes(tail[:-1]).find(0) >= 0:
                raise QrexecProtocolError("service name holds a NUL", field="service_name")
        except QrexecProtocolError as exc:
            raise InvalidRequest(str(exc), request_id=ident, field=exc.field) from None
        service = _named(tail, "service_name", ident)
        off = fixed - IDENT_SIZE - 64
        target = _named(view[off : off + 64], "target_domain", ident)
        source = None
        if msg_type == MSG_TRIGGER_SERVICE4 and view[0] != 0:
            source = _named(view[0:64], "source_domain", ident)
    else:
        raise QrexecProtocolError(f"{name} is not a trigger", field="type")
    return TriggerService(service=service, target=target, request_id=ident, source=source)


def _named(raw: memoryview, field: str, ident: str) -> str:
    """A name field of a trigger whose ident is valid: any fault is an ``InvalidRequest``
    (Qubes' daemon refuses such a call instead of dropping the agent)."""
    try:
        value = _fixed_field(raw, field)
        if field == "service_name":
            return check_service_name(value)
        return check_domain_name(value, field)
    except QrexecProtocolError as exc:
        raise InvalidRequest(str(exc), request_id=ident, field=field) from None


# -- command lines ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcRequest:
    """The ``QUBESRPC service+arg source [type target]`` part of a command line."""

    service_name: str
    arg: str | None
    source: str
    target_type: str | None = None
    """``"keyword"`` or ``"name"`` in calls to dom0, else ``None``."""
    target: str | None = None

    @property
    def descriptor(self) -> str:
        """``name+arg`` (``name+`` without an argument), as a socket service receives it."""
        return f"{self.service_name}+{self.arg or ''}"


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """A parsed command line: ``user`` (``None`` when not expected), the ``nogui:`` flag,
    ``command`` (after user and prefix) and, for service calls, ``rpc``."""

    user: str | None
    nogui: bool
    command: str
    rpc: RpcRequest | None = None


def parse_command_line(cmdline: str, *, with_user: bool = True) -> ParsedCommand:
    """Parse ``[user:][nogui:]command`` and ``QUBESRPC service+arg source [type target]``.

    ``with_user`` (what the agent receives) requires the ``user:`` part.  Service names
    are checked (non-empty, at most ``NAME_MAX``, no ``/``, not ``.``/``..``); every error is a
    ``QrexecProtocolError`` naming the field."""
    user: str | None = None
    command = cmdline
    if "\0" in cmdline:
        raise QrexecProtocolError("command line holds a NUL", field="cmdline")
    if with_user:
        user, sep, command = cmdline.partition(":")
        if not sep:
            raise QrexecProtocolError("command line has no 'user:' part", field="user")
        if not user:
            raise QrexecProtocolError("command line has an empty user", field="user")
    nogui = command.startswith(NOGUI_PREFIX)
    if nogui:
        command = command[len(NOGUI_PREFIX) :]
    if not command.startswith(RPC_REQUEST_COMMAND):
        return ParsedCommand(user, nogui, command)
    rest = command[len(RPC_REQUEST_COMMAND) :]
    if not rest.startswith(" "):
        raise QrexecProtocolError("QUBESRPC not followed by a space", field="cmdline")
    parts = rest[1:].split(" ")
    if len(parts) < 2:
        raise QrexecProtocolError("QUBESRPC without a source domain", field="source")
    descriptor, source, extra = parts[0], parts[1], parts[2:]
    if not descriptor:
        raise QrexecProtocolError("empty service descriptor after QUBESRPC", field="service_name")
    if len(descriptor.encode("utf-8", "surrogateescape")) > MAX_SERVICE_NAME_LEN:
        raise QrexecProtocolError("service descriptor too long", field="service_name")
    name, plus, arg = descriptor.partition("+")
    if not name or len(name) > NAME_MAX or "/" in name or name in (".", ".."):
        raise QrexecProtocolError(f"bad service name {name[:80]!r}", field="service_name")
    if not source:
        raise QrexecProtocolError("empty source domain", field="source")
    target_type = target = None
    if extra:
        if len(extra) != 2 or extra[0] not in ("keyword", "name") or not extra[1]:
            raise QrexecProtocolError(
                "QUBESRPC for dom0 must end with 'keyword|name TARGET'", field="target"
            )
        target_type, target = extra
    rpc = RpcRequest(name, arg if plus else None, source, target_type, target)
    return ParsedCommand(user, nogui, command, rpc)


def rpc_command_line(
    service: str,
    source: str,
    *,
    user: str | None = "DEFAULT",
    nogui: bool = False,
    target_type: str | None = None,
    target: str | None = None,
) -> str:
    """``user:[nogui:]QUBESRPC service+arg source[ type target]`` (``+`` appended to a
    service without an argument; ``user=None`` leaves out the ``user:`` part, as dom0's
    own services receive it)."""
    check_service_name(service)
    check_domain_name(source, "source")
    if "+" not in service:
        service += "+"
    line = f"{RPC_REQUEST_COMMAND} {service} {source}"
    if target_type is not None or target is not None:
        if target_type not in ("keyword", "name") or not target or " " in target:
            raise ValueError("target_type must be 'keyword' or 'name' with a target")
        line += f" {target_type} {target}"
    if nogui:
        line = NOGUI_PREFIX + line
    if user is not None:
        if not user or ":" in user:
            raise ValueError(f"bad user {user!r}")
        line = f"{user}:{line}"
    return line


__all__ = [
    "CLIENT_PROTOCOL_VERSION",
    "DATA_MESSAGES",
    "DATA_MIN_VERSION",
    "EXIT_NOT_FOUND",
    "EXIT_PROBLEM",
    "EXIT_REFUSED",
    "HEADER",
    "HEADER_SIZE",
    "IDENT_SIZE",
    "MAX_DATA_CHUNK_V2",
    "MAX_DATA_CHUNK_V3",
    "MAX_QREXEC_CMD_LEN",
    "MAX_SERVICE_NAME_LEN",
    "MESSAGE_NAMES",
    "MSG_CONNECTION_TERMINATED",
    "MSG_DATA_EXIT_CODE",
    "MSG_DATA_STDERR",
    "MSG_DATA_STDIN",
    "MSG_DATA_STDOUT",
    "MSG_EXEC_CMDLINE",
    "MSG_HELLO",
    "MSG_JUST_EXEC",
    "MSG_SERVICE_CONNECT",
    "MSG_SERVICE_REFUSED",
    "MSG_TRIGGER_SERVICE",
    "MSG_TRIGGER_SERVICE3",
    "MSG_TRIGGER_SERVICE4",
    "NAME_MAX",
    "NOGUI_PREFIX",
    "PROTOCOL_V2",
    "PROTOCOL_V3",
    "PROTOCOL_V4",
    "PROTOCOL_VERSION",
    "RPC_REQUEST_COMMAND",
    "VCHAN_BASE_PORT",
    "ExecParams",
    "InvalidRequest",
    "ParsedCommand",
    "QrexecProtocolError",
    "RpcRequest",
    "TriggerService",
    "check_domain_name",
    "check_ident",
    "check_service_name",
    "check_trigger_version",
    "control_payload_limit",
    "data_payload_limit",
    "encode_exec_params",
    "encode_exit_code",
    "encode_header",
    "encode_hello",
    "encode_service_params",
    "encode_trigger_service",
    "exit_code_from_returncode",
    "frame",
    "max_chunk_size",
    "message_name",
    "negotiate",
    "parse_command_line",
    "parse_exec_params",
    "parse_exit_code",
    "parse_header",
    "parse_hello",
    "parse_service_params",
    "parse_trigger_service",
    "rpc_command_line",
    "trigger_type",
]
