"""Hostile input to a real ``aioxen xenstored`` over raw sockets: truncated headers,
oversized lengths, missing NULs, unknown types, bad transaction ids, bad paths and denied
operations.  Each gets an error reply, or a closed connection for that client only; the
server keeps serving everyone else and loses nothing committed."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawsock import Raw, header
from support.xenstored import Xenstored, start_xenstored

from aioxen.xenstore.wire import XENSTORE_PAYLOAD_MAX, XsType, join

SENTINEL = "/sentinel/committed"
SENTINEL_VALUE = b"must survive"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    xs = start_xenstored(tmp_path_factory.mktemp("hostile") / "root")
    with Raw(xs.socket) as r:
        assert (
            r.call(XsType.WRITE, SENTINEL.encode() + b"\x00" + SENTINEL_VALUE).type == XsType.WRITE
        )
        r.call(XsType.SET_PERMS, join(SENTINEL, "n0", "r40", "r41", "r42"))
    yield xs
    assert xs.alive()
    assert xs.stop() == 0


def assert_healthy(xs: Xenstored) -> None:
    """The server is alive, serves a fresh client, and the committed sentinel is intact."""
    assert xs.alive()
    with Raw(xs.socket) as r:
        msg = r.call(XsType.READ, SENTINEL.encode() + b"\x00", req_id=99)
        assert (msg.type, msg.payload) == (XsType.READ, SENTINEL_VALUE)


def test_truncated_header_then_close(server: Xenstored) -> None:
    for n in range(1, 16):
        with Raw(server.socket) as r:
            r.send_bytes(header(XsType.READ, 3)[:n])
    assert_healthy(server)


def test_truncated_message_does_not_block_others(server: Xenstored) -> None:
    with Raw(server.socket) as stuck:
        stuck.send_bytes(header(XsType.READ, 100) + b"/partial")  # 92 bytes never come
        assert_healthy(server)
        stuck.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            stuck.recv()
    assert_healthy(server)


@pytest.mark.parametrize("length", [XENSTORE_PAYLOAD_MAX + 1, 65536, 0xFFFFFFFF])
def test_oversized_length_closes_only_that_connection(server: Xenstored, length: int) -> None:
    with Raw(server.socket) as bystander, Raw(server.socket) as r:
        bystander.identify(40)
        r.send_bytes(header(XsType.WRITE, length) + b"/x\x00" + b"a" * 100)
        assert r.recv() is None  # killed, as Xen's xenstored does
        msg = bystander.call(XsType.READ, SENTINEL.encode() + b"\x00")
        assert msg.payload == SENTINEL_VALUE
    assert_healthy(server)


def test_exact_payload_limit_is_accepted(server: Xenstored) -> None:
    with Raw(server.socket) as r:
        path = b"/limit/v"
        value = b"v" * (XENSTORE_PAYLOAD_MAX - len(path) - 1)
        assert r.call(XsType.WRITE, path + b"\x00" + value).type == XsType.WRITE
        assert r.call(XsType.READ, path + b"\x00").payload == value


@pytest.mark.parametrize(
    ("typ", "payload"),
    [
        (XsType.READ, b"/no/nul"),
        (XsType.READ, b""),
        (XsType.READ, b"/a\x00/b\x00"),
        (XsType.WRITE, b"/no-nul-at-all"),
        (XsType.DIRECTORY, b"/x"),
        (XsType.WATCH, b"/only-path\x00"),
        (XsType.WATCH, b"/p\x00tok"),
        (XsType.UNWATCH, b"/p"),
        (XsType.SET_PERMS, b"/p\x00"),
        (XsType.SET_PERMS, b"/p\x00n0"),
        (XsType.SET_PERMS, b"/p\x00x0\x00"),
        (XsType.GET_DOMAIN_PATH, b"abc\x00"),
        (XsType.GET_DOMAIN_PATH, b"99999999\x00"),
        (XsType.INTRODUCE, b"5\x00"),
        (XsType.DIRECTORY_PART, b"/\x00"),
        (XsType.DIRECTORY_PART, b"/\x00notanumber\x00"),
        (XsType.DIRECTORY_PART, b"/\x003\x00"),
        (XsType.SET_TARGET, b"1\x00"),
        (XsType.CONTROL, b""),
        (XsType.CONTROL, b"no-such-command\x00"),
        (XsType.CONTROL, b"aioxen-identify\x00"),
        (XsType.CONTROL, b"aioxen-identify\x00x\x00"),
    ],
)
def test_malformed_payloads_get_einval(server: Xenstored, typ: int, payload: bytes) -> None:
    with Raw(server.socket) as r:
        assert r.error(typ, payload) == "EINVAL"
    assert_healthy(server)


@pytest.mark.parametrize("typ", [20, 27, 100, 0xFFFF, 0xFFFFFFFF, XsType.ERROR, XsType.WATCH_EVENT])
def test_unknown_types_get_enosys(server: Xenstored, typ: int) -> None:
    """Xen's C xenstored answers a type it has no handler for with ENOSYS."""
    with Raw(server.socket) as r:
        assert r.error(typ, b"/x\x00", req_id=7) == "ENOSYS"
        # the connection still works afterwards
        assert r.call(XsType.READ, SENTINEL.encode() + b"\x00", req_id=8).payload == SENTINEL_VALUE


def test_newer_xen_types_are_enosys(server: Xenstored) -> None:
    with Raw(server.socket) as r:
        for typ in (XsType.GET_FEATURE, XsType.SET_FEATURE, XsType.GET_QUOTA, XsType.SET_QUOTA):
            assert r.error(typ, b"\x00") == "ENOSYS"


def test_bad_transaction_ids(server: Xenstored) -> None:
    with Raw(server.socket) as r, Raw(server.socket) as other:
        assert r.error(XsType.READ, SENTINEL.encode() + b"\x00", tx_id=12345) == "ENOENT"
        assert r.error(XsType.WRITE, b"/t/x\x00v", tx_id=0xFFFFFFFF) == "ENOENT"
        assert r.error(XsType.TRANSACTION_END, b"T\x00", tx_id=0) == "ENOENT"
        start = r.call(XsType.TRANSACTION_START, b"\x00")
        tx = int(start.payload.rstrip(b"\x00"))
        assert tx != 0
        assert r.error(XsType.TRANSACTION_START, b"\x00", tx_id=tx) == "EBUSY"
        assert r.error(XsType.TRANSACTION_END, b"X\x00", tx_id=tx) == "EINVAL"
        assert r.error(XsType.TRANSACTION_END, b"T", tx_id=tx) == "EINVAL"
        # Another connection cannot use or end our transaction.
        assert other.error(XsType.READ, SENTINEL.encode() + b"\x00", tx_id=tx) == "ENOENT"
        assert other.error(XsType.TRANSACTION_END, b"T\x00", tx_id=tx) == "ENOENT"
        assert r.call(XsType.WRITE, b"/t/in-tx\x00v", tx_id=tx).type == XsType.WRITE
        assert r.call(XsType.TRANSACTION_END, b"F\x00", tx_id=tx).payload == b"OK\x00"
        assert r.error(XsType.TRANSACTION_END, b"T\x00", tx_id=tx) == "ENOENT"  # gone
        assert r.error(XsType.READ, b"/t/in-tx\x00") == "ENOENT"  # aborted
    assert_healthy(server)


@pytest.mark.parametrize(
    "path",
    [
        b"/a/../b",
        b"..",
        b"/a/./b",
        b"/a//b",
        b"/a/",
        b"/\xff",
        b"/with space",
        b"/" + b"x" * 3072,
        b"y" * 2049,
        b"@releaseDomain",
    ],
)
def test_bad_paths_get_einval(server: Xenstored, path: bytes) -> None:
    with Raw(server.socket) as r:
        if len(path) + 1 > XENSTORE_PAYLOAD_MAX:
            pytest.fail("test path too long for one message")
        assert r.error(XsType.READ, path + b"\x00") == "EINVAL"
        assert r.error(XsType.WRITE, path + b"\x00v") == "EINVAL"
        assert r.error(XsType.RM, path + b"\x00") == "EINVAL"
    assert_healthy(server)


def test_permission_denied_operations(server: Xenstored) -> None:
    with Raw(server.socket) as r:
        r.identify(50)
        assert r.error(XsType.READ, SENTINEL.encode() + b"\x00") == "EACCES"
        assert r.error(XsType.WRITE, SENTINEL.encode() + b"\x00overwrite") == "EACCES"
        assert r.error(XsType.RM, SENTINEL.encode() + b"\x00") == "EACCES"
        assert r.error(XsType.RM, b"/sentinel\x00") == "EACCES"
        assert r.error(XsType.SET_PERMS, SENTINEL.encode() + b"\x00b50\x00") == "EACCES"
        assert r.error(XsType.WRITE, b"/new-top-level\x00v") == "EACCES"
        assert r.error(XsType.DIRECTORY, b"/\x00") == "EACCES"
        assert r.error(XsType.CONTROL, join("aioxen-identify", "0")) == "EACCES"
        assert r.error(XsType.INTRODUCE, join("9", "0", "0")) == "EACCES"
        assert r.error(XsType.RELEASE, join("40")) == "EACCES"
        assert r.error(XsType.SET_TARGET, join("50", "0")) == "EACCES"
        assert r.error(XsType.SET_PERMS, join("@releaseDomain", "r50")) == "EACCES"
        # Its own home is fine.
        assert r.call(XsType.WRITE, b"mine\x00ok").type == XsType.WRITE
    assert_healthy(server)


def test_pipelined_garbage_in_one_write(server: Xenstored) -> None:
    with Raw(server.socket) as r:
        batch = b""
        kinds = [
            (XsType.READ, b"/x"),
            (999, b""),
            (XsType.WRITE, b"/pipe/a\x001"),
            (XsType.READ, b"/pipe/a\x00"),
            (XsType.TRANSACTION_END, b"T\x00"),
        ]
        for i, (typ, payload) in enumerate(kinds * 40):
            batch += header(typ, len(payload), req_id=i) + payload
        r.send_bytes(batch)
        for i in range(len(kinds) * 40):
            msg = r.reply()
            assert msg is not None and msg.req_id == i
            expect = [XsType.ERROR, XsType.ERROR, XsType.WRITE, XsType.READ, XsType.ERROR]
            assert msg.type == expect[i % len(kinds)]
    assert_healthy(server)


_types = st.sampled_from([int(t) for t in XsType] + [20, 27, 1000])
_pieces = st.sampled_from(
    [b"/", b"/fuzz", b"/fuzz/a", b"a", b"..", b"\x00", b"T", b"F", b"n0", b"r1", b"b7",
     b"@introduceDomain", b"12", b"4294967295", b"tok", b"\xff", b"/" * 3, b"x" * 2100]
)  # fmt: skip
_payloads = st.one_of(st.binary(max_size=64), st.lists(_pieces, max_size=6).map(b"".join))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(_types, st.sampled_from([0, 1, 2, 0xFFFFFFFF]), _payloads), min_size=1, max_size=6
    ),
    st.sampled_from([None, 41, 0]),
)
def test_fuzz_random_messages(
    server: Xenstored, msgs: list[tuple[int, int, bytes]], domid: int | None
) -> None:
    """Every request gets a reply with its req_id (its own type or ERROR), in order, or
    -- only for an oversized payload -- the connection is closed."""
    with Raw(server.socket) as r:
        if domid is not None:
            r.identify(domid)
        for i, (typ, tx_id, payload) in enumerate(msgs):
            if (typ == XsType.RM and domid == 0) or (domid is None and typ == XsType.RM):
                continue  # a privileged rm of a real subtree is legitimate, not hostile
            r.send(typ, payload, req_id=1000 + i, tx_id=tx_id)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                assert r.reply() is None  # killed, and only this connection
                break
            msg = r.reply()
            assert msg is not None, f"connection closed after {typ} {payload!r}"
            assert msg.req_id == 1000 + i
            assert msg.type in (typ, XsType.ERROR)
            if msg.type == XsType.ERROR:
                assert msg.payload.endswith(b"\x00") and msg.payload.startswith(b"E")
    assert_healthy(server)


def test_many_concurrent_clients_survive_a_killer(server: Xenstored) -> None:
    clients = [Raw(server.socket) for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            c.send(XsType.WRITE, f"/many/{i}".encode() + b"\x00v", req_id=i)
        with Raw(server.socket) as killer:
            killer.send_bytes(header(XsType.READ, 0xFFFFFFFF))
            assert killer.recv() is None
        for i, c in enumerate(clients):
            msg = c.reply()
            assert msg is not None and msg.req_id == i and msg.type == XsType.WRITE
    finally:
        for c in clients:
            c.close()
    assert_healthy(server)


def test_server_restart_after_abuse_keeps_nothing_half_done(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("abuse") / "root"
    xs = start_xenstored(root, "--persist")
    try:
        with Raw(xs.socket) as r:
            r.call(XsType.WRITE, b"/kept\x00yes")
            tx = int(r.call(XsType.TRANSACTION_START, b"\x00").payload.rstrip(b"\x00"))
            r.call(XsType.WRITE, b"/not-kept\x00no", tx_id=tx)
            r.send_bytes(header(XsType.WRITE, 0xFFFF))  # killed mid-transaction
            assert r.recv() is None
    finally:
        assert xs.stop() == 0
    xs = start_xenstored(root, "--persist")
    try:
        with Raw(xs.socket) as r:
            assert r.call(XsType.READ, b"/kept\x00").payload == b"yes"
            assert r.error(XsType.READ, b"/not-kept\x00") == "ENOENT"
    finally:
        assert xs.stop() == 0
