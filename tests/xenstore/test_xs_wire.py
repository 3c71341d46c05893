"""The pure xs_wire codec: layout and constants against Xen's headers, payload rules,
permission strings, path rules, and hostile bytes (hypothesis)."""

from __future__ import annotations

import contextlib
import errno
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioxen import ProtocolError
from aioxen.xenstore import paths
from aioxen.xenstore.errors import (
    TransactionConflict,
    XenStoreError,
    XenStoreExists,
    XenStoreNotFound,
    XenStorePermissionError,
    error_for,
)
from aioxen.xenstore.wire import (
    ERROR_NAMES,
    HEADER_SIZE,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    Decoder,
    Message,
    Perm,
    XsType,
    decode,
    decode_header,
    encode_perms,
    encode_write,
    error_payload,
    join,
    msg_type,
    parse_domid,
    parse_error,
    parse_perms,
    parse_u32,
    parse_write,
    split,
)

C_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/io/xs_wire.h>
int main(void) {
    printf("size %zu\n", sizeof(struct xsd_sockmsg));
    printf("off %zu %zu %zu %zu\n", offsetof(struct xsd_sockmsg, type),
           offsetof(struct xsd_sockmsg, req_id), offsetof(struct xsd_sockmsg, tx_id),
           offsetof(struct xsd_sockmsg, len));
#define T(x) printf("type %s %d\n", #x, (int)XS_##x);
    T(CONTROL) T(DIRECTORY) T(READ) T(GET_PERMS) T(WATCH) T(UNWATCH)
    T(TRANSACTION_START) T(TRANSACTION_END) T(INTRODUCE) T(RELEASE) T(GET_DOMAIN_PATH)
    T(WRITE) T(MKDIR) T(RM) T(SET_PERMS) T(WATCH_EVENT) T(ERROR) T(IS_DOMAIN_INTRODUCED)
    T(RESUME) T(SET_TARGET) T(RESET_WATCHES) T(DIRECTORY_PART) T(INVALID)
    printf("count %d\n", (int)XS_TYPE_COUNT);
    for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("error %s %d\n", xsd_errors[i].errstring, xsd_errors[i].errnum);
    printf("payload %d abs %d rel %d\n", XENSTORE_PAYLOAD_MAX, XENSTORE_ABS_PATH_MAX,
           XENSTORE_REL_PATH_MAX);
    return 0;
}
"""


@pytest.fixture(scope="module")
def xs_wire_h(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed (Makefile TEST_DEBS)"
    d: Path = tmp_path_factory.mktemp("xswire")
    (d / "probe.c").write_text(C_PROBE)
    subprocess.run([gcc, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    return subprocess.run(
        [str(d / "probe")], check=True, capture_output=True, text=True
    ).stdout.split("\n")


def test_header_layout_matches_xs_wire_h(xs_wire_h: list[str]) -> None:
    assert f"size {HEADER_SIZE}" in xs_wire_h
    assert "off 0 4 8 12" in xs_wire_h
    assert (
        f"payload {XENSTORE_PAYLOAD_MAX} abs {XENSTORE_ABS_PATH_MAX} rel {XENSTORE_REL_PATH_MAX}"
        in xs_wire_h
    )


def test_every_xen_4_17_type_is_known(xs_wire_h: list[str]) -> None:
    types = [line.split() for line in xs_wire_h if line.startswith("type ")]
    assert len(types) == 23
    for _, name, value in types:
        assert XsType[name] == int(value)
        assert msg_type(int(value)) is XsType[name]
    count = next(int(line.split()[1]) for line in xs_wire_h if line.startswith("count "))
    assert count == 23  # 0..22, 20 unused


def test_error_table_matches_xs_wire_h(xs_wire_h: list[str]) -> None:
    errors = [line.split() for line in xs_wire_h if line.startswith("error ")]
    assert [name for _, name, _ in errors] == list(ERROR_NAMES)
    for _, name, num in errors:
        assert parse_error(error_payload(int(num))) == (name, int(num))


def test_message_roundtrip_and_native_header() -> None:
    msg = Message(XsType.WRITE, 7, 3, encode_write(b"/a/b", b"value\x00with nul"))
    raw = msg.encode()
    assert raw[:16] == struct.pack("=IIII", 11, 7, 3, len(msg.payload))
    assert decode(raw) == msg
    assert parse_write(decode(raw).payload) == (b"/a/b", b"value\x00with nul")


def test_write_payload_has_no_trailing_nul() -> None:
    assert encode_write(b"/k", b"v") == b"/k\x00v"
    assert parse_write(b"/k\x00") == (b"/k", b"")
    with pytest.raises(ProtocolError, match="no NUL"):
        parse_write(b"/k")


def test_payload_limit() -> None:
    Message(XsType.READ, 1, 0, b"x" * XENSTORE_PAYLOAD_MAX).encode()
    with pytest.raises(ProtocolError, match="XENSTORE_PAYLOAD_MAX") as info:
        Message(XsType.READ, 1, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1)).encode()
    assert info.value.field == "len"
    with pytest.raises(ProtocolError, match="4097"):
        decode_header(struct.pack("=IIII", 2, 0, 0, 4097))


def test_truncated_and_inconsistent_messages() -> None:
    with pytest.raises(ProtocolError, match="truncated XenStore header"):
        decode(b"\x02\x00\x00")
    with pytest.raises(ProtocolError, match="header len says 5"):
        decode(struct.pack("=IIII", 2, 0, 0, 5) + b"abc")
    with pytest.raises(ProtocolError, match="16"):
        decode_header(b"\x00" * 15)


def test_unknown_and_removed_types() -> None:
    with pytest.raises(ProtocolError, match="unknown XenStore message type 99") as info:
        msg_type(99)
    assert info.value.field == "type"
    with pytest.raises(ProtocolError, match="XS_RESTRICT"):
        msg_type(20)
    assert msg_type(0xFFFF) is XsType.INVALID


def test_split_and_join() -> None:
    assert join("a", b"b", "") == b"a\x00b\x00\x00"
    assert split(b"a\x00b\x00", 2) == [b"a", b"b"]
    assert split(b"") == []
    with pytest.raises(ProtocolError, match="not NUL-terminated"):
        split(b"a\x00b", what="WATCH payload")
    with pytest.raises(ProtocolError, match="expected 2"):
        split(b"a\x00", 2)
    with pytest.raises(ValueError, match="NUL"):
        join(b"a\x00b")


def test_numbers() -> None:
    assert parse_u32(b"4294967295", "tx") == 2**32 - 1
    for bad in (b"", b"-1", b"4294967296", b"1x", b" 1"):
        with pytest.raises(ProtocolError):
            parse_u32(bad, "tx")
    assert parse_domid(b"65535") == 65535
    with pytest.raises(ProtocolError, match="out of range"):
        parse_domid(b"65536")


def test_permission_strings() -> None:
    perms = parse_perms([b"n0", b"r2", b"b3", b"w4"])
    assert perms == (Perm(0, "n"), Perm(2, "r"), Perm(3, "b"), Perm(4, "w"))
    assert [p.mask for p in perms] == [0, 1, 3, 2]
    assert encode_perms(["n0", Perm(2, "r"), b"b3"]) == b"n0\x00r2\x00b3\x00"
    assert str(Perm.parse("r12")) == "r12"
    for bad in ("x1", "r", "rr", "r-1", "r70000", ""):
        with pytest.raises(ProtocolError, match="permission"):
            Perm.parse(bad)
    with pytest.raises(ProtocolError, match="empty"):
        parse_perms([])
    with pytest.raises(ValueError):
        Perm(1, "q")


def test_error_names_on_the_wire() -> None:
    assert error_payload(errno.ENOENT) == b"ENOENT\x00"
    assert error_payload(errno.ENOTTY) == b"EINVAL\x00"  # not in the table
    assert parse_error(b"EQUOTA\x00") == ("EQUOTA", errno.EINVAL)
    with pytest.raises(ProtocolError):
        parse_error(b"ENOENT")


def test_exceptions_map_errnos_and_name_the_path() -> None:
    cases = {
        errno.ENOENT: (XenStoreNotFound, FileNotFoundError),
        errno.EACCES: (XenStorePermissionError, PermissionError),
        errno.EEXIST: (XenStoreExists, FileExistsError),
        errno.EAGAIN: (TransactionConflict, XenStoreError),
        errno.ENOSPC: (XenStoreError, OSError),
    }
    for num, classes in cases.items():
        exc = error_for(num, op="read", path="/a/b")
        assert isinstance(exc, classes)
        assert isinstance(exc, XenStoreError)
        assert exc.errno == num
        assert "/a/b" in str(exc) and "read" in str(exc)


def test_paths() -> None:
    assert paths.canonicalize("data/x", 3) == ("/local/domain/3/data/x", True)
    assert paths.canonicalize(b"/a-b/c_d@e", 0) == ("/a-b/c_d@e", False)
    assert paths.canonicalize("/", 0) == ("/", False)
    bad = ["", "/a/", "/a//b", "/a/../b", "../x", "/a b", "/a\x80", "/a.b"]
    for p in bad:
        with pytest.raises(ProtocolError) as info:
            paths.canonicalize(p, 0)
        assert info.value.field == "path"
    paths.canonicalize("/" + "a" * (XENSTORE_ABS_PATH_MAX - 1), 0)
    with pytest.raises(ProtocolError, match="ABS_PATH_MAX"):
        paths.canonicalize("/" + "a" * XENSTORE_ABS_PATH_MAX, 0)
    with pytest.raises(ProtocolError, match="REL_PATH_MAX"):
        paths.canonicalize("a" * (XENSTORE_REL_PATH_MAX + 1), 0)
    assert paths.canonicalize_watch("@releaseDomain", 5) == ("@releaseDomain", False)
    # xenstore.txt: "<wspecial> may have any syntax"
    assert paths.canonicalize_watch(b"@", 5) == ("@", False)
    assert paths.canonicalize_watch(b"@releaseDomain/10", 5) == ("@releaseDomain/10", False)
    with pytest.raises(ProtocolError):
        paths.canonicalize_watch("@" + "x" * XENSTORE_ABS_PATH_MAX, 5)
    assert paths.is_child("/a/b", "/a") and paths.is_child("/a", "/a")
    assert paths.is_child("/a", "/") and not paths.is_child("/ab", "/a")
    assert paths.ancestors("/a/b") == ["/a", "/"]
    assert paths.relativize("/local/domain/3/x", 3) == "x"


@given(
    st.lists(
        st.tuples(
            st.integers(0, 30),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=300),
        ),
        max_size=8,
    ),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
)
def test_decoder_reassembles_any_chunking(
    msgs: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(Message(*m).encode() for m in msgs)
    dec = Decoder()
    out: list[Message] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        dec.feed(stream[pos : pos + step])
        out += dec.messages()
        pos += step
        i += 1
    out += dec.messages()
    assert out == [Message(*m) for m in msgs]
    assert dec.pending == 0


@given(st.binary(max_size=200))
def test_decoder_on_garbage_only_raises_protocol_error(data: bytes) -> None:
    dec = Decoder()
    dec.feed(data)
    try:
        for msg in dec.messages():
            assert len(msg.payload) <= XENSTORE_PAYLOAD_MAX
    except ProtocolError as exc:
        assert exc.field == "len"
        with pytest.raises(ProtocolError, match="out of sync"):
            dec.messages()


@given(st.binary(max_size=64))
def test_payload_parsers_only_raise_protocol_error(data: bytes) -> None:
    for fn in (
        lambda: split(data, 2),
        lambda: parse_write(data),
        lambda: parse_perms(split(data)),
        lambda: paths.canonicalize(data, 1),
        lambda: paths.canonicalize_watch(data, 1),
        lambda: parse_error(data),
    ):
        with contextlib.suppress(ProtocolError):
            fn()
