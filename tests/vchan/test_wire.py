"""The pure vchan core over plain buffers: layout, order selection, rings, notify bits."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen import ProtocolError
from aioxen.vchan import wire

PAGE = 4096


def make_pair(
    left_order: int, right_order: int, initial_index: int = 0
) -> tuple[wire.VchanCore, wire.VchanCore, mmap.mmap]:
    """A server and a client core over one anonymous mapping (control page + rings)."""
    lp, rp = wire.ring_pages(left_order), wire.ring_pages(right_order)
    mem = mmap.mmap(-1, PAGE * (1 + lp + rp))
    view = memoryview(mem)
    ctrl = view[:PAGE]
    rings = []
    refs: list[list[int]] = []
    next_page = 1
    for order, pages in ((left_order, lp), (right_order, rp)):
        off = wire.in_page_offset(order)
        if off is not None:
            rings.append(ctrl[off : off + (1 << order)])
            refs.append([])
        else:
            rings.append(view[next_page * PAGE : (next_page + pages) * PAGE])
            refs.append(list(range(100 + next_page, 100 + next_page + pages)))
            next_page += pages
    wire.init_server_page(
        ctrl, left_order, right_order, refs[0], refs[1], initial_index=initial_index
    )
    server = wire.VchanCore(ctrl, rings[0], rings[1], is_server=True)
    client = wire.VchanCore(ctrl, rings[1], rings[0], is_server=False)
    ctrl[wire.CLI_LIVE] = 1
    ctrl[wire.SRV_NOTIFY] = wire.NOTIFY_WRITE
    return server, client, mem


def drain(core: wire.VchanCore) -> bytes:
    out = bytearray()
    while True:
        off, n = core.read_span()
        if not n:
            return bytes(out)
        assert core.read_view is not None
        out += core.read_view[off : off + n]
        core.consume(n)


def test_header_offsets() -> None:
    assert (wire.LEFT_CONS, wire.LEFT_PROD, wire.RIGHT_CONS, wire.RIGHT_PROD) == (0, 4, 8, 12)
    assert (wire.LEFT_ORDER, wire.RIGHT_ORDER) == (16, 18)
    assert (wire.CLI_LIVE, wire.SRV_LIVE, wire.CLI_NOTIFY, wire.SRV_NOTIFY) == (20, 21, 22, 23)
    assert wire.GRANTS == 24


@pytest.mark.parametrize(
    ("left", "right", "orders"),
    [
        (0, 0, (10, 11)),  # vchan-socket-proxy's server_init(.., 0, 0)
        (1024, 2048, (10, 11)),
        (2048, 1024, (11, 10)),
        (2048, 2048, (11, 12)),
        (1025, 1, (11, 10)),
        (4096, 4096, (12, 12)),  # qrexec control channel
        (65536, 65536, (16, 16)),  # qrexec data channel
        (100, 65536, (11, 16)),
        (65536, 100, (16, 11)),
        (4097, 3000, (13, 12)),
        (4097, 2000, (13, 11)),
        (1 << 20, 1 << 20, (20, 20)),
        (1 << 20, 10, (20, 11)),
    ],
)
def test_select_orders_examples(left: int, right: int, orders: tuple[int, int]) -> None:
    assert wire.select_orders(left, right) == orders


@pytest.mark.parametrize("bad", [-1, (1 << 20) + 1])
def test_select_orders_rejects_sizes(bad: int) -> None:
    with pytest.raises(ValueError):
        wire.select_orders(bad, 10)
    with pytest.raises(ValueError):
        wire.select_orders(10, bad)


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20))
def test_select_orders_properties(left: int, right: int) -> None:
    lo, ro = wire.select_orders(left, right)
    wire.check_orders(lo, ro)  # always a layout a libxenvchan client accepts
    assert 1 << lo >= left and 1 << ro >= right
    # the grant list never runs into an in-page ring
    grants_end = wire.GRANTS + 4 * (wire.ring_pages(lo) + wire.ring_pages(ro))
    for order in (lo, ro):
        off = wire.in_page_offset(order)
        if off is not None:
            assert grants_end <= off


def test_init_server_page_and_client_layout() -> None:
    page = bytearray(PAGE)
    page[:] = b"\xff" * PAGE
    wire.init_server_page(page, 13, 11, [7, 8], [], initial_index=0xFFFFFFF0)
    assert struct.unpack_from("<IIIIHHBBBB", page) == (
        0xFFFFFFF0,
        0xFFFFFFF0,
        0xFFFFFFF0,
        0xFFFFFFF0,
        13,
        11,
        2,  # cli_live: not yet connected
        1,  # srv_live
        wire.NOTIFY_WRITE,  # cli_notify: server wants the first client write
        0,
    )
    assert struct.unpack_from("<II", page, 24) == (7, 8)
    assert page[32:] == bytes(PAGE - 32)
    layout = wire.read_client_layout(page)
    assert layout == wire.Layout(13, 11, (7, 8), ())
    assert (layout.left_size, layout.right_size) == (8192, 2048)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_client_validates_orders(left: int, right: int) -> None:
    page = bytearray(PAGE)
    struct.pack_into("<HH", page, 16, left, right)
    valid = 10 <= left <= 20 and 10 <= right <= 20 and not (left == right and left < 12)
    if valid:
        layout = wire.read_client_layout(page)
        assert len(layout.left_grants) == wire.ring_pages(left)
        assert len(layout.right_grants) == wire.ring_pages(right)
    else:
        with pytest.raises(ProtocolError) as exc:
            wire.read_client_layout(page)
        assert exc.value.field in ("left_order", "right_order")


@pytest.mark.parametrize(("lo", "ro"), [(10, 11), (11, 10), (12, 11), (16, 16), (11, 20)])
@pytest.mark.parametrize("start", [0, 2**32 - 1, 2**32 - 3000])
def test_byte_ring_roundtrip_both_directions(lo: int, ro: int, start: int) -> None:
    server, client, mem = make_pair(lo, ro, start)
    payload = bytes(range(256)) * 40
    for writer, reader in ((client, server), (server, client)):
        sent = 0
        got = bytearray()
        while len(got) < len(payload):
            sent += writer.send(payload[sent : sent + 777], min(777, len(payload) - sent))
            got += drain(reader)
        assert bytes(got) == payload
    for core in (server, client):
        core.release()
    mem.close()


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(10, 11), (11, 10), (12, 12), (13, 11)]),
    st.integers(2**32 - 70000, 2**32 - 1),
    st.lists(st.integers(1, 9000), min_size=1, max_size=40),
    st.lists(st.integers(1, 9000), min_size=1, max_size=40),
)
def test_random_chunks_wrap_indices(
    orders: tuple[int, int], start: int, writes: list[int], reads: list[int]
) -> None:
    server, client, mem = make_pair(*orders, start)
    data = bytes((i * 7 + 3) & 0xFF for i in range(sum(writes)))
    sent = 0
    out = bytearray()
    pending = list(writes)
    ri = 0
    while len(out) < len(data):
        if pending:
            n = min(pending[0], len(data) - sent)
            put = client.send(data[sent : sent + n], n)
            sent += put
            if put == n:
                pending.pop(0)
            else:
                pending[0] -= put
        want = reads[ri % len(reads)]
        ri += 1
        dst = bytearray(want)
        with wire.ffi.from_buffer(dst) as p:
            got = server.recv_into(p, want)
        out += dst[:got]
    assert bytes(out) == data
    assert server.readable() == 0 and client.writable() == client.write_size
    server.release()
    client.release()
    mem.close()


def test_notify_bits_request_and_test_and_clear() -> None:
    server, client, mem = make_pair(12, 12)
    ctrl = memoryview(mem)[:PAGE]
    # Initially the server wants to hear about the client's first write (cli_notify WRITE)
    assert client.send(b"x", 1) == 1
    assert client.notify_pending
    client.notify_pending = False
    assert ctrl[wire.CLI_NOTIFY] == 0  # cleared by the client when it acted
    assert client.send(b"y", 1) == 1
    assert not client.notify_pending  # nobody asked again: no event
    # the client asked for the server's writes at connect (srv_notify WRITE)
    assert server.send(b"z", 1) == 1 and server.notify_pending
    server.notify_pending = False
    # reading: the server consumes; the client did not ask for READ: no event
    assert drain(server) == b"xy" and not server.notify_pending
    # the client fills its ring, asks to be told when space appears
    big = bytes(4096)
    assert client.send(big, 4096) == 4096
    assert client.request_writable() == 0
    assert ctrl[wire.SRV_NOTIFY] & wire.NOTIFY_READ
    drain(server)
    assert server.notify_pending  # the server consumed and the client had asked
    assert not ctrl[wire.SRV_NOTIFY] & wire.NOTIFY_READ
    # request_readable ORs WRITE into the peer's byte and re-checks
    server.notify_pending = False
    assert server.request_readable() == 0
    assert ctrl[wire.CLI_NOTIFY] & wire.NOTIFY_WRITE
    ctrl.release()
    server.release()
    client.release()
    mem.close()


def test_eof_bit_is_set_in_the_readers_own_byte_and_survives_clears() -> None:
    server, client, mem = make_pair(10, 11)
    ctrl = memoryview(mem)[:PAGE]
    client.send(b"last words", 10)
    client.shutdown_write()
    assert client.notify_pending
    assert ctrl[wire.SRV_NOTIFY] & wire.NOTIFY_EOF  # the server (reader) owns srv_notify
    assert server.peer_eof() and not client.peer_eof()
    # libxenvchan-style clears of bits 0x1/0x2 leave it alone
    ctrl[wire.SRV_NOTIFY] |= wire.NOTIFY_READ | wire.NOTIFY_WRITE
    server.send(b"r", 1)
    drain(server)
    assert ctrl[wire.SRV_NOTIFY] & wire.NOTIFY_EOF
    assert server.peer_eof()
    ctrl.release()
    server.release()
    client.release()
    mem.close()


@pytest.mark.parametrize("start", [0, 2**32 - 5])
@pytest.mark.parametrize("excess", [1, 1000, 2**31, 2**32 - 4097])
def test_corrupt_indices_raise_protocol_error(start: int, excess: int) -> None:
    server, client, mem = make_pair(12, 12, start)
    ctrl = memoryview(mem)[:PAGE]
    # left.prod claims more than 4096 bytes in flight
    struct.pack_into("<I", ctrl, wire.LEFT_PROD, (start + 4096 + excess) % 2**32)
    for call in (server.readable, server.read_span, lambda: server.recv_into(b"", 0)):
        with pytest.raises(ProtocolError) as exc:
            call()
        assert exc.value.field == "left.prod"
        assert "left" in str(exc.value)
    with pytest.raises(ProtocolError):
        client.send(b"x", 1)
    with pytest.raises(ProtocolError):
        client.writable()
    ctrl.release()
    server.release()
    client.release()
    mem.close()


@given(st.integers(2, 255))
def test_unknown_live_values_raise(value: int) -> None:
    server, client, mem = make_pair(10, 11)
    ctrl = memoryview(mem)[:PAGE]
    ctrl[wire.CLI_LIVE] = value
    ctrl[wire.SRV_LIVE] = value
    for core, name in ((server, "cli_live"), (client, "srv_live")):
        with pytest.raises(ProtocolError) as exc:
            core.peer_live()
        assert exc.value.field == name
    ctrl.release()
    server.release()
    client.release()
    mem.close()


def test_peek_does_not_consume() -> None:
    server, client, mem = make_pair(10, 11, 2**32 - 2)
    client.send(b"abcdef", 6)
    assert server.peek(4) == b"abcd"
    assert server.peek(7) is None
    assert server.readable() == 6
    server.release()
    client.release()
    mem.close()


def test_release_unpins_memory() -> None:
    server, client, mem = make_pair(12, 12)
    with pytest.raises(BufferError):
        mem.close()
    server.release()
    client.release()
    server.release()  # idempotent
    mem.close()


def test_released_core_is_inert() -> None:
    server, client, mem = make_pair(12, 12)
    server.release()
    client.release()
    mem.close()  # the memory is gone; stray calls must not touch it
    assert server.readable() == 0
    assert server.step(-1, True) & wire.STEP_USED == 0
    assert server.read_span() == (0, 0)


@pytest.mark.parametrize("start", [0, 2**32 - 3])
def test_step_consumes_checks_both_rings_and_arms_only_when_empty(start: int) -> None:
    server, client, mem = make_pair(10, 11, start)
    ctrl = memoryview(mem)[:PAGE]
    ctrl[wire.CLI_NOTIFY] = 0
    # empty: arms (ORs WRITE into the peer's byte) and reports nothing
    r = server.step(-1, True)
    assert r & wire.STEP_USED == 0 and r & wire.STEP_LIVE and not r & wire.STEP_EOF
    assert (r >> wire.STEP_CONS_SHIFT) & 0xFFFFFFFF == start
    assert ctrl[wire.CLI_NOTIFY] & wire.NOTIFY_WRITE
    ctrl[wire.CLI_NOTIFY] = 0
    assert client.send(b"abcdef", 6) == 6
    r = server.step(-1, True)
    assert r & wire.STEP_USED == 6
    assert ctrl[wire.CLI_NOTIFY] == 0  # not empty: no arming
    # the client asks to hear about consumption; releasing 4 bytes reports it
    assert client.request_writable() == 1024 - 6
    cons = (r >> wire.STEP_CONS_SHIFT) & 0xFFFFFFFF
    r = server.step((cons + 4) & 0xFFFFFFFF, False)
    assert r & wire.STEP_NOTIFY and r & wire.STEP_USED == 2
    assert client.writable() == 1024 - 2
    r = server.step((cons + 6) & 0xFFFFFFFF, False)  # no second request: no notify
    assert not r & wire.STEP_NOTIFY and r & wire.STEP_USED == 0
    # EOF and the peer's close: reported, and no arming after EOF
    client.shutdown_write()
    ctrl[wire.CLI_LIVE] = 0
    r = server.step(-1, True)
    assert r & wire.STEP_EOF and not r & wire.STEP_LIVE
    assert not ctrl[wire.CLI_NOTIFY] & wire.NOTIFY_WRITE
    # the negative results are named
    ctrl[wire.CLI_LIVE] = 9
    assert server.step_raw(-1, 0) == wire.STEP_ERR_LIVE
    ctrl[wire.CLI_LIVE] = 1
    (prod,) = struct.unpack_from("<I", ctrl, wire.LEFT_PROD)
    struct.pack_into("<I", ctrl, wire.LEFT_PROD, (prod + 5000) % 2**32)
    assert server.step_raw(-1, 0) == wire.STEP_ERR_READ
    assert server.step_error(wire.STEP_ERR_READ).field == "left.prod"
    struct.pack_into("<I", ctrl, wire.LEFT_PROD, prod)
    (cons,) = struct.unpack_from("<I", ctrl, wire.RIGHT_CONS)
    struct.pack_into("<I", ctrl, wire.RIGHT_CONS, (cons + 1) % 2**32)
    assert server.step_raw(-1, 0) == wire.STEP_ERR_WRITE
    assert server.step_error(wire.STEP_ERR_WRITE).field == "right.prod"
    ctrl.release()
    server.release()
    client.release()
    mem.close()


@pytest.mark.parametrize("field", ["read", "write", "live"])
def test_step_rejects_a_hostile_control_page(field: str) -> None:
    server, client, mem = make_pair(12, 12, 2**32 - 9)
    ctrl = memoryview(mem)[:PAGE]
    if field == "read":  # LEFT is the server's read ring
        (prod,) = struct.unpack_from("<I", ctrl, wire.LEFT_PROD)
        struct.pack_into("<I", ctrl, wire.LEFT_PROD, (prod + 4097) % 2**32)
        name = "left.prod"
    elif field == "write":
        (cons,) = struct.unpack_from("<I", ctrl, wire.RIGHT_CONS)
        struct.pack_into("<I", ctrl, wire.RIGHT_CONS, (cons + 1) % 2**32)
        name = "right.prod"
    else:
        ctrl[wire.CLI_LIVE] = 7
        name = "cli_live"
    for arm in (False, True):
        with pytest.raises(ProtocolError) as exc:
            server.step(-1, arm)
        assert exc.value.field == name
        r = server.step_raw(-1, 0)
        assert r < 0
        assert server.step_error(r).field == name
    ctrl.release()
    server.release()
    client.release()
    mem.close()


def test_send_raw_reports_the_notify_request_and_corruption() -> None:
    server, client, mem = make_pair(12, 12)
    ctrl = memoryview(mem)[:PAGE]
    # init_server_page asked for the client's first write: the notify flag rides along
    r = client.send_raw(b"xyz", 3)
    assert r == 3 | 1 << 32
    assert client.send_raw(b"xyz", 3) == 3  # the bit was test-and-cleared
    struct.pack_into("<I", ctrl, wire.LEFT_CONS, 2**31)
    assert client.send_raw(b"xyz", 3) == -1
    assert client.write_error().field == "left.prod"
    ctrl.release()
    server.release()
    client.release()
    mem.close()
    # released: the raw calls point at the dead page, not at the unmapped memory
    assert client.step_raw(-1, 0) >= 0
