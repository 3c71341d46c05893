"""aioxen.qrexec.wire: the pure codec.  Round trips, Qubes' struct sizes and limits, and
hostile bytes (hypothesis): a decoder raises nothing but QrexecProtocolError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen import ProtocolError
from aioxen.qrexec import wire as w
from aioxen.qrexec.wire import InvalidRequest, QrexecProtocolError

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
names = st.text(NAME_CHARS, min_size=1, max_size=31).filter(lambda s: s not in (".", ".."))
domains = st.text(NAME_CHARS + "@:", min_size=1, max_size=31)
idents = st.text(NAME_CHARS + " ", max_size=31)
services = st.builds(
    lambda n, a: n + ("+" + a if a is not None else ""),
    names,
    st.none() | st.text(NAME_CHARS + "+", max_size=20),
)
u32 = st.integers(0, 2**32 - 1)
blobs = st.binary(max_size=300)


def test_constants_match_qubes_qrexec_h() -> None:
    assert (w.MSG_DATA_STDIN, w.MSG_DATA_STDOUT, w.MSG_DATA_STDERR, w.MSG_DATA_EXIT_CODE) == (
        0x190,
        0x191,
        0x192,
        0x193,
    )
    assert (w.MSG_EXEC_CMDLINE, w.MSG_JUST_EXEC, w.MSG_SERVICE_CONNECT) == (0x200, 0x201, 0x202)
    assert w.MSG_SERVICE_REFUSED == 0x203
    assert (w.MSG_TRIGGER_SERVICE, w.MSG_CONNECTION_TERMINATED) == (0x210, 0x211)
    assert (w.MSG_TRIGGER_SERVICE3, w.MSG_TRIGGER_SERVICE4, w.MSG_HELLO) == (0x212, 0x213, 0x300)
    assert (w.EXIT_PROBLEM, w.EXIT_REFUSED, w.EXIT_NOT_FOUND) == (125, 126, 127)
    assert (w.MAX_DATA_CHUNK_V2, w.MAX_DATA_CHUNK_V3) == (4096, 65536)
    assert (w.MAX_SERVICE_NAME_LEN, w.MAX_QREXEC_CMD_LEN) == (65000, 65535)
    # sizeof() of the C structs
    assert (w.HEADER_SIZE, w.EXEC_PARAMS_FIXED, w.IDENT_SIZE) == (8, 8, 32)
    assert (w.TRIGGER2_SIZE, w.TRIGGER3_FIXED, w.TRIGGER4_FIXED) == (128, 96, 160)
    assert issubclass(QrexecProtocolError, ProtocolError)
    assert issubclass(InvalidRequest, QrexecProtocolError)


def test_chunk_size_per_version() -> None:
    assert w.max_chunk_size(2) == 4096
    assert w.max_chunk_size(3) == w.max_chunk_size(4) == 65536
    with pytest.raises(ValueError):
        w.max_chunk_size(1)


@given(u32, u32)
def test_header_round_trip(t: int, n: int) -> None:
    raw = w.encode_header(t, n)
    assert raw == struct.pack("<II", t, n)
    assert w.parse_header(raw) == (t, n)


@given(blobs.filter(lambda b: len(b) != 8))
def test_header_wrong_size(raw: bytes) -> None:
    with pytest.raises(QrexecProtocolError, match="8 bytes"):
        w.parse_header(raw)


def test_frame() -> None:
    assert w.frame(w.MSG_DATA_STDOUT, b"hi") == b"\x91\x01\0\0\x02\0\0\0hi"
    assert w.frame(w.MSG_DATA_STDIN) == b"\x90\x01\0\0\0\0\0\0"


@given(u32)
def test_hello_round_trip(v: int) -> None:
    assert w.parse_hello(w.encode_hello(v)) == v


@given(blobs.filter(lambda b: len(b) != 4))
def test_hello_wrong_length(raw: bytes) -> None:
    with pytest.raises(QrexecProtocolError, match="4 bytes") as e:
        w.parse_hello(raw)
    assert e.value.field == "peer_info"


def test_negotiate() -> None:
    assert w.negotiate(4, 3, min_version=2) == 3
    assert w.negotiate(3, 4, min_version=2) == 3
    assert w.negotiate(4, 2**32 - 1, min_version=2) == 4
    with pytest.raises(QrexecProtocolError, match="version 1; at least 2") as e:
        w.negotiate(4, 1, min_version=2, what="agent")
    assert "agent" in str(e.value) and e.value.field == "version"


@given(st.integers(-(2**31), 2**31 - 1))
def test_exit_code_round_trip(code: int) -> None:
    assert w.parse_exit_code(w.encode_exit_code(code)) == code


@given(blobs.filter(lambda b: len(b) != 4))
def test_exit_code_wrong_length(raw: bytes) -> None:
    with pytest.raises(QrexecProtocolError, match="MSG_DATA_EXIT_CODE"):
        w.parse_exit_code(raw)


def test_exit_code_out_of_range() -> None:
    with pytest.raises(ValueError):
        w.encode_exit_code(2**31)


def test_exit_code_from_returncode() -> None:
    assert w.exit_code_from_returncode(0) == 0
    assert w.exit_code_from_returncode(3) == 3
    assert w.exit_code_from_returncode(-9) == 137  # SIGKILL: 128 + 9, as Qubes reports it
    assert w.exit_code_from_returncode(-15) == 143


# -- exec_params ------------------------------------------------------------------------------


@given(u32, u32, st.text(st.characters(blacklist_characters="\0"), min_size=1, max_size=200))
def test_exec_params_round_trip(d: int, p: int, cmd: str) -> None:
    raw = w.encode_exec_params(d, p, cmd)
    assert raw[:8] == struct.pack("<II", d, p) and raw.endswith(b"\0")
    assert w.parse_exec_params(raw) == w.ExecParams(d, p, cmd)


@given(st.binary(min_size=1, max_size=100).filter(lambda b: b"\0" not in b))
def test_exec_params_any_bytes_round_trip(cmd: bytes) -> None:
    parsed = w.parse_exec_params(w.encode_exec_params(1, 513, cmd))
    assert parsed.cmdline is not None
    assert parsed.cmdline.encode("utf-8", "surrogateescape") == cmd


def test_exec_params_without_cmdline() -> None:
    raw = w.encode_exec_params(5, 514)
    assert raw == struct.pack("<II", 5, 514)
    assert w.parse_exec_params(raw, with_cmdline=False) == w.ExecParams(5, 514)
    with pytest.raises(QrexecProtocolError, match="8 bytes"):
        w.parse_exec_params(raw + b"x\0", with_cmdline=False)
    with pytest.raises(QrexecProtocolError, match="no command line"):
        w.parse_exec_params(raw)


def test_exec_params_service_connect_ident_padding() -> None:
    # MSG_SERVICE_CONNECT carries the whole 32-byte ident, NUL padded
    raw = struct.pack("<II", 0, 513) + w.encode_service_params("SOCKET7")
    assert w.parse_exec_params(raw).cmdline == "SOCKET7"


@pytest.mark.parametrize(
    "tail, match",
    [
        (b"abc", "not NUL-terminated"),
        (b"a\0b\0", "NUL before its end"),
        (b"\0", "empty"),
        (b"\0\0\0", "empty"),
        (b"x" * 65535 + b"\0", "exceeds 65535"),
    ],
)
def test_exec_params_refused(tail: bytes, match: str) -> None:
    with pytest.raises(QrexecProtocolError, match=match) as e:
        w.parse_exec_params(struct.pack("<II", 0, 513) + tail)
    assert e.value.field == "cmdline"


def test_exec_params_longest() -> None:
    raw = w.encode_exec_params(0, 513, "x" * 65534)
    assert w.parse_exec_params(raw).cmdline == "x" * 65534
    with pytest.raises(ValueError):
        w.encode_exec_params(0, 513, "x" * 65535)
    with pytest.raises(ValueError):
        w.encode_exec_params(0, 513, "a\0b")


@given(blobs, st.booleans())
def test_exec_params_hostile(raw: bytes, with_cmdline: bool) -> None:
    try:
        p = w.parse_exec_params(raw, with_cmdline=with_cmdline)
    except QrexecProtocolError:
        return
    assert (p.cmdline is None) == (not with_cmdline)


# -- service_params -------------------------------------------------------------------------------


@given(idents)
def test_service_params_round_trip(ident: str) -> None:
    raw = w.encode_service_params(ident)
    assert len(raw) == 32
    assert w.parse_service_params(raw) == ident


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"SOCKET1".ljust(31, b"\0"), "32 bytes"),
        (b"S" * 32, "no NUL"),
        (b"SOCK\0ET".ljust(32, b"\0"), "after the terminator"),
        (b"SOCK/ET".ljust(32, b"\0"), "invalid"),
        (b"SOCK\xffET".ljust(32, b"\0"), "not ASCII"),
    ],
)
def test_service_params_refused(raw: bytes, match: str) -> None:
    with pytest.raises(QrexecProtocolError, match=match) as e:
        w.parse_service_params(raw)
    assert e.value.field == "request_id"


@given(st.binary(min_size=28, max_size=36))
def test_service_params_hostile(raw: bytes) -> None:
    try:
        ident = w.parse_service_params(raw)
    except QrexecProtocolError:
        return
    assert len(raw) == 32 and w.encode_service_params(ident) == raw


# -- triggers ---------------------------------------------------------------------------------


@given(services.filter(lambda s: len(s) < 64), domains, idents)
def test_trigger_v2_round_trip(service: str, target: str, ident: str) -> None:
    t = w.TriggerService(service, target, ident)
    msg_type, raw = w.encode_trigger_service(2, t)
    assert msg_type == w.MSG_TRIGGER_SERVICE and len(raw) == 128
    assert w.parse_trigger_service(msg_type, raw) == t


@given(services, domains, idents)
def test_trigger_v3_round_trip(service: str, target: str, ident: str) -> None:
    t = w.TriggerService(service, target, ident)
    msg_type, raw = w.encode_trigger_service(3, t)
    assert msg_type == w.MSG_TRIGGER_SERVICE3 and len(raw) == 96 + len(service) + 1
    assert w.parse_trigger_service(msg_type, raw) == t


@given(services, domains, idents, st.none() | domains)
def test_trigger_v4_round_trip(service: str, target: str, ident: str, source: str | None) -> None:
    t = w.TriggerService(service, target, ident, source)
    msg_type, raw = w.encode_trigger_service(4, t)
    assert msg_type == w.MSG_TRIGGER_SERVICE4 and len(raw) == 160 + len(service) + 1
    assert w.parse_trigger_service(msg_type, raw) == t


def test_trigger_layout_v4() -> None:
    _, raw = w.encode_trigger_service(
        4, w.TriggerService("qubes.Echo+x", "@default", "SOCKET3", "work")
    )
    assert raw[:64] == b"work".ljust(64, b"\0")
    assert raw[64:128] == b"@default".ljust(64, b"\0")
    assert raw[128:160] == b"SOCKET3".ljust(32, b"\0")
    assert raw[160:] == b"qubes.Echo+x\0"


def test_trigger_type_per_version() -> None:
    for version in (2, 3, 4):
        w.check_trigger_version(w.trigger_type(version), version)
    w.check_trigger_version(w.MSG_TRIGGER_SERVICE3, 4)  # Qubes' daemon takes 3 at v4 too
    for t, v in [
        (w.MSG_TRIGGER_SERVICE, 3),
        (w.MSG_TRIGGER_SERVICE3, 2),
        (w.MSG_TRIGGER_SERVICE4, 3),
    ]:
        with pytest.raises(QrexecProtocolError, match=f"at negotiated protocol version {v}"):
            w.check_trigger_version(t, v)
    with pytest.raises(QrexecProtocolError, match="not a trigger"):
        w.check_trigger_version(w.MSG_HELLO, 4)


def test_trigger_source_needs_v4() -> None:
    with pytest.raises(ValueError, match="source"):
        w.encode_trigger_service(3, w.TriggerService("a", "b", "c", "d"))


def test_trigger_longest_name() -> None:
    name = "a+" + "b" * (65000 - 3)
    msg_type, raw = w.encode_trigger_service(3, w.TriggerService(name, "t", "i"))
    assert len(raw) == 96 + 65000
    assert w.parse_trigger_service(msg_type, raw).service == name
    with pytest.raises(QrexecProtocolError, match="exceeds 65000"):
        w.parse_trigger_service(msg_type, raw[:-1] + b"b\0")


def _t3(target: bytes, ident: bytes, name: bytes) -> bytes:
    return target.ljust(64, b"\0") + ident.ljust(32, b"\0") + name


@pytest.mark.parametrize(
    "raw, match, refusable",
    [
        (_t3(b"vm", b"S1", b""), "no service name", False),
        (_t3(b"vm", b"S1", b"svc"), "not NUL-terminated", True),
        (_t3(b"vm", b"S1", b"s\0vc\0"), "holds a NUL", True),
        (_t3(b"vm", b"S/1", b"svc\0"), "request ident", False),
        (_t3(b"v" * 64, b"S1", b"svc\0"), "target_domain: no NUL", True),
        (_t3(b"vm", b"S1", b"\0"), "service name ''", True),
        (_t3(b"vm", b"S1", b"+arg\0"), "service name '\\+arg'", True),
        (_t3(b"vm", b"S1", b"../x\0"), "invalid", True),
        (_t3(b"vm", b"S1", b"..\0"), "invalid", True),
        (_t3(b"v m", b"S1", b"svc\0"), "target_domain 'v m' is invalid", True),
        (_t3(b"", b"S1", b"svc\0"), "target_domain '' is invalid", True),
    ],
)
def test_trigger3_refused(raw: bytes, match: str, refusable: bool) -> None:
    with pytest.raises(QrexecProtocolError, match=match) as e:
        w.parse_trigger_service(w.MSG_TRIGGER_SERVICE3, raw)
    assert isinstance(e.value, InvalidRequest) == refusable
    if isinstance(e.value, InvalidRequest):
        assert e.value.request_id == "S1"  # the daemon answers MSG_SERVICE_REFUSED with it


def test_trigger_wrong_sizes() -> None:
    with pytest.raises(QrexecProtocolError, match="128 bytes"):
        w.parse_trigger_service(w.MSG_TRIGGER_SERVICE, bytes(127))
    with pytest.raises(QrexecProtocolError, match="no service name"):
        w.parse_trigger_service(w.MSG_TRIGGER_SERVICE4, bytes(160))
    with pytest.raises(QrexecProtocolError, match="not a trigger"):
        w.parse_trigger_service(w.MSG_HELLO, bytes(200))


def test_trigger_v4_empty_source_is_none() -> None:
    raw = bytes(64) + _t3(b"vm", b"S", b"svc\0")
    assert w.parse_trigger_service(w.MSG_TRIGGER_SERVICE4, raw).source is None


@settings(max_examples=300)
@given(
    st.sampled_from([w.MSG_TRIGGER_SERVICE, w.MSG_TRIGGER_SERVICE3, w.MSG_TRIGGER_SERVICE4]),
    st.binary(max_size=400),
)
def test_trigger_hostile(msg_type: int, raw: bytes) -> None:
    try:
        t = w.parse_trigger_service(msg_type, raw)
    except QrexecProtocolError:
        return
    w.check_service_name(t.service)
    w.check_domain_name(t.target)
    w.check_ident(t.request_id)


@settings(max_examples=300)
@given(
    st.sampled_from([w.MSG_TRIGGER_SERVICE, w.MSG_TRIGGER_SERVICE3, w.MSG_TRIGGER_SERVICE4]),
    services,
    domains,
    idents,
    st.integers(0, 200),
    st.integers(0, 255),
)
def test_trigger_mutated(
    msg_type: int, service: str, target: str, ident: str, pos: int, byte: int
) -> None:
    """One byte of a valid trigger changed: still only QrexecProtocolError (or a valid one)."""
    version = {w.MSG_TRIGGER_SERVICE: 2, w.MSG_TRIGGER_SERVICE3: 3, w.MSG_TRIGGER_SERVICE4: 4}[
        msg_type
    ]
    if version == 2 and len(service) >= 64:
        return
    _, raw = w.encode_trigger_service(version, w.TriggerService(service, target, ident))
    raw = bytearray(raw)
    raw[pos % len(raw)] = byte
    with contextlib.suppress(QrexecProtocolError):
        w.parse_trigger_service(msg_type, bytes(raw))


# -- limits ------------------------------------------------------------------------------------


def test_control_limits() -> None:
    assert w.control_payload_limit(w.MSG_HELLO) == 4
    assert w.control_payload_limit(w.MSG_EXEC_CMDLINE) == 8 + 65535
    assert w.control_payload_limit(w.MSG_TRIGGER_SERVICE) == 128
    assert w.control_payload_limit(w.MSG_TRIGGER_SERVICE4) == 160 + 65000
    assert w.control_payload_limit(w.MSG_CONNECTION_TERMINATED) == 8
    assert w.control_payload_limit(w.MSG_SERVICE_REFUSED) == 32
    for t in (w.MSG_DATA_STDIN, 0, 0x999, 2**32 - 1):
        with pytest.raises(QrexecProtocolError, match="control channel") as e:
            w.control_payload_limit(t)
        assert e.value.field == "type"


def test_data_limits() -> None:
    assert w.data_payload_limit(2, w.MSG_DATA_STDOUT) == 4096
    assert w.data_payload_limit(4, w.MSG_DATA_EXIT_CODE) == 65536
    with pytest.raises(QrexecProtocolError, match="MSG_HELLO on a data channel"):
        w.data_payload_limit(3, w.MSG_HELLO)
    with pytest.raises(QrexecProtocolError, match="0x999"):
        w.data_payload_limit(3, 0x999)


# -- command lines -------------------------------------------------------------------------------


def test_parse_agent_service_command() -> None:
    p = w.parse_command_line("user:QUBESRPC qubes.Filecopy+arg work")
    assert (p.user, p.nogui) == ("user", False)
    assert p.rpc == w.RpcRequest("qubes.Filecopy", "arg", "work")
    assert p.rpc.descriptor == "qubes.Filecopy+arg"


def test_parse_no_argument_and_nogui() -> None:
    p = w.parse_command_line("root:nogui:QUBESRPC qubes.Echo+ dom0")
    assert p.nogui and p.user == "root"
    assert p.rpc == w.RpcRequest("qubes.Echo", "", "dom0")
    p = w.parse_command_line("root:QUBESRPC qubes.Echo dom0")
    assert p.rpc is not None and p.rpc.arg is None and p.rpc.descriptor == "qubes.Echo+"


def test_parse_dom0_form() -> None:
    p = w.parse_command_line("QUBESRPC qubes.Svc+ work keyword adminvm", with_user=False)
    assert p.user is None
    assert p.rpc == w.RpcRequest("qubes.Svc", "", "work", "keyword", "adminvm")


def test_parse_plain_command() -> None:
    p = w.parse_command_line("user:echo hello: world")
    assert (p.user, p.command, p.rpc) == ("user", "echo hello: world", None)
    assert w.parse_command_line("u:nogui:ls").command == "ls"


@pytest.mark.parametrize(
    "line, field",
    [
        ("no colon here", "user"),
        (":QUBESRPC a b", "user"),
        ("u:QUBESRPCx a b", "cmdline"),
        ("u:QUBESRPC a", "source"),
        ("u:QUBESRPC  a b", "service_name"),
        ("u:QUBESRPC +x b", "service_name"),
        ("u:QUBESRPC ../../bin/sh+ b", "service_name"),
        ("u:QUBESRPC ..+ b", "service_name"),
        ("u:QUBESRPC a+ ", "source"),
        ("u:QUBESRPC a+ src x", "target"),
        ("u:QUBESRPC a+ src other tgt", "target"),
        ("u:QUBESRPC " + "a" * 256 + " src", "service_name"),
        ("u:QUBESRPC a+" + "b" * 65000 + " src", "service_name"),
        ("u:echo \0", "cmdline"),
    ],
)
def test_parse_refused(line: str, field: str) -> None:
    with pytest.raises(QrexecProtocolError) as e:
        w.parse_command_line(line)
    assert e.value.field == field


@given(services, domains, st.none() | names, st.booleans())
def test_rpc_command_line_round_trip(
    service: str, source: str, user: str | None, nogui: bool
) -> None:
    line = w.rpc_command_line(service, source, user=user, nogui=nogui)
    p = w.parse_command_line(line, with_user=user is not None)
    assert p.user == user and p.nogui == nogui and p.rpc is not None
    name, _, arg = service.partition("+")
    assert (p.rpc.service_name, p.rpc.arg or "", p.rpc.source) == (name, arg, source)


def test_rpc_command_line_forms() -> None:
    assert w.rpc_command_line("qubes.Echo", "work") == "DEFAULT:QUBESRPC qubes.Echo+ work"
    assert (
        w.rpc_command_line("a+b", "work", user=None, target_type="name", target="dom0")
        == "QUBESRPC a+b work name dom0"
    )


@given(st.text(max_size=120), st.booleans())
def test_parse_hostile(line: str, with_user: bool) -> None:
    try:
        p = w.parse_command_line(line, with_user=with_user)
    except QrexecProtocolError:
        return
    if p.rpc is not None:
        assert p.rpc.service_name and "/" not in p.rpc.service_name and p.rpc.source
