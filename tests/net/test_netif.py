"""The netif codec: layouts checked against the real ``io/netif.h``, framing, hostile input."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen.errors import ProtocolError
from aioxen.net import netif
from aioxen.net.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    PLAIN,
    FrameInfo,
    GsoExtra,
    HashExtra,
    McastExtra,
    build_rx_responses,
    build_tx,
    decode_extra,
    encode_extra,
    parse_rx,
    parse_tx,
)

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/netif.h>
#define S(t) printf("sizeof %s %zu\n", #t, sizeof(t))
#define O(t, f) printf("offsetof %s.%s %zu\n", #t, #f, offsetof(t, f))
#define V(c) printf("value %s %lld\n", #c, (long long)(c))
int main(void) {
    S(struct netif_tx_request); O(struct netif_tx_request, gref);
    O(struct netif_tx_request, offset); O(struct netif_tx_request, flags);
    O(struct netif_tx_request, id); O(struct netif_tx_request, size);
    S(struct netif_tx_response); O(struct netif_tx_response, id);
    O(struct netif_tx_response, status);
    S(struct netif_rx_request); O(struct netif_rx_request, id);
    O(struct netif_rx_request, gref);
    S(struct netif_rx_response); O(struct netif_rx_response, id);
    O(struct netif_rx_response, offset); O(struct netif_rx_response, flags);
    O(struct netif_rx_response, status);
    S(struct netif_extra_info); O(struct netif_extra_info, type);
    O(struct netif_extra_info, flags); O(struct netif_extra_info, u.gso.size);
    O(struct netif_extra_info, u.gso.type); O(struct netif_extra_info, u.gso.features);
    O(struct netif_extra_info, u.mcast.addr); O(struct netif_extra_info, u.hash.type);
    O(struct netif_extra_info, u.hash.algorithm); O(struct netif_extra_info, u.hash.value);
    S(union netif_tx_sring_entry); S(union netif_rx_sring_entry);
    V(__CONST_RING_SIZE(netif_tx, 4096)); V(__CONST_RING_SIZE(netif_rx, 4096));
    V(NETTXF_csum_blank); V(NETTXF_data_validated); V(NETTXF_more_data);
    V(NETTXF_extra_info); V(NETRXF_data_validated); V(NETRXF_csum_blank);
    V(NETRXF_more_data); V(NETRXF_extra_info); V(NETRXF_gso_prefix);
    V(NETIF_RSP_DROPPED); V(NETIF_RSP_ERROR); V(NETIF_RSP_OKAY); V(NETIF_RSP_NULL);
    V(XEN_NETIF_EXTRA_TYPE_NONE); V(XEN_NETIF_EXTRA_TYPE_GSO);
    V(XEN_NETIF_EXTRA_TYPE_MCAST_ADD); V(XEN_NETIF_EXTRA_TYPE_MCAST_DEL);
    V(XEN_NETIF_EXTRA_TYPE_HASH); V(XEN_NETIF_EXTRA_TYPE_MAX); V(XEN_NETIF_EXTRA_FLAG_MORE);
    V(XEN_NETIF_GSO_TYPE_NONE); V(XEN_NETIF_GSO_TYPE_TCPV4); V(XEN_NETIF_GSO_TYPE_TCPV6);
    V(XEN_NETIF_MAX_TX_SIZE); V(XEN_NETIF_NR_SLOTS_MIN);
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required (Makefile TEST_DEBS)"
    assert Path("/usr/include/xen/io/netif.h").exists(), "libxen-dev is required"
    d = tmp_path_factory.mktemp("netif_h")
    src = d / "facts.c"
    src.write_text(C_PROGRAM)
    exe = d / "facts"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts: dict[str, int] = {}
    for line in out.splitlines():
        key, value = line.rsplit(" ", 1)
        facts[key] = int(value)
    return facts


def test_struct_layouts_match_netif_h(header_facts: dict[str, int]) -> None:
    f = header_facts
    assert f["sizeof struct netif_tx_request"] == netif.TX_REQ.size == 12
    assert [f[f"offsetof struct netif_tx_request.{n}"] for n in netif.TX_REQUEST.fields] == [
        0, 4, 6, 8, 10,
    ]  # fmt: skip
    assert f["sizeof struct netif_tx_response"] == netif.TX_RSP.size == 4
    assert f["offsetof struct netif_tx_response.status"] == 2
    assert f["sizeof struct netif_rx_request"] == netif.RX_REQ.size == 8
    assert f["offsetof struct netif_rx_request.gref"] == 4
    assert f["sizeof struct netif_rx_response"] == netif.RX_RSP.size == 8
    assert [f[f"offsetof struct netif_rx_response.{n}"] for n in ("id", "offset", "flags")] == [
        0, 2, 4,
    ]  # fmt: skip
    assert f["offsetof struct netif_rx_response.status"] == 6
    assert f["sizeof union netif_tx_sring_entry"] == netif.TX_SLOT_SIZE
    assert f["sizeof union netif_rx_sring_entry"] == netif.RX_SLOT_SIZE


def test_extra_info_layout_matches_netif_h(header_facts: dict[str, int]) -> None:
    f = header_facts
    assert f["sizeof struct netif_extra_info"] == 8
    gso = encode_extra(GsoExtra(size=0x1234, gso_type=2, features=0xABCD))
    assert gso[f["offsetof struct netif_extra_info.type"]] == 1
    off = f["offsetof struct netif_extra_info.u.gso.size"]
    assert struct.unpack_from("<H", gso, off)[0] == 0x1234
    assert gso[f["offsetof struct netif_extra_info.u.gso.type"]] == 2
    off = f["offsetof struct netif_extra_info.u.gso.features"]
    assert struct.unpack_from("<H", gso, off)[0] == 0xABCD
    mc = encode_extra(McastExtra(True, b"\x01\x00\x5e\x00\x00\x01"), more=True)
    off = f["offsetof struct netif_extra_info.u.mcast.addr"]
    assert mc[off : off + 6] == b"\x01\x00\x5e\x00\x00\x01"
    assert mc[f["offsetof struct netif_extra_info.flags"]] == 1
    h = encode_extra(HashExtra(3, 1, 0xDEADBEEF))
    assert h[f["offsetof struct netif_extra_info.u.hash.type"]] == 3
    assert h[f["offsetof struct netif_extra_info.u.hash.algorithm"]] == 1
    off = f["offsetof struct netif_extra_info.u.hash.value"]
    assert h[off : off + 4] == (0xDEADBEEF).to_bytes(4, "little")


def test_constants_match_netif_h(header_facts: dict[str, int]) -> None:
    values = {k.split(" ", 1)[1]: v for k, v in header_facts.items() if k.startswith("value ")}
    names = {
        "NETTXF_csum_blank": netif.NETTXF_CSUM_BLANK,
        "NETTXF_data_validated": netif.NETTXF_DATA_VALIDATED,
        "NETTXF_more_data": netif.NETTXF_MORE_DATA,
        "NETTXF_extra_info": netif.NETTXF_EXTRA_INFO,
        "NETRXF_data_validated": netif.NETRXF_DATA_VALIDATED,
        "NETRXF_csum_blank": netif.NETRXF_CSUM_BLANK,
        "NETRXF_more_data": netif.NETRXF_MORE_DATA,
        "NETRXF_extra_info": netif.NETRXF_EXTRA_INFO,
        "NETRXF_gso_prefix": netif.NETRXF_GSO_PREFIX,
        "NETIF_RSP_DROPPED": netif.NETIF_RSP_DROPPED,
        "NETIF_RSP_ERROR": netif.NETIF_RSP_ERROR,
        "NETIF_RSP_OKAY": netif.NETIF_RSP_OKAY,
        "NETIF_RSP_NULL": netif.NETIF_RSP_NULL,
        "XEN_NETIF_EXTRA_TYPE_NONE": netif.XEN_NETIF_EXTRA_TYPE_NONE,
        "XEN_NETIF_EXTRA_TYPE_GSO": netif.XEN_NETIF_EXTRA_TYPE_GSO,
        "XEN_NETIF_EXTRA_TYPE_MCAST_ADD": netif.XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
        "XEN_NETIF_EXTRA_TYPE_MCAST_DEL": netif.XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
        "XEN_NETIF_EXTRA_TYPE_HASH": netif.XEN_NETIF_EXTRA_TYPE_HASH,
        "XEN_NETIF_EXTRA_TYPE_MAX": netif.XEN_NETIF_EXTRA_TYPE_MAX,
        "XEN_NETIF_EXTRA_FLAG_MORE": netif.XEN_NETIF_EXTRA_FLAG_MORE,
        "XEN_NETIF_GSO_TYPE_NONE": netif.XEN_NETIF_GSO_TYPE_NONE,
        "XEN_NETIF_GSO_TYPE_TCPV4": netif.XEN_NETIF_GSO_TYPE_TCPV4,
        "XEN_NETIF_GSO_TYPE_TCPV6": netif.XEN_NETIF_GSO_TYPE_TCPV6,
        "XEN_NETIF_MAX_TX_SIZE": netif.XEN_NETIF_MAX_TX_SIZE,
        "XEN_NETIF_NR_SLOTS_MIN": netif.XEN_NETIF_NR_SLOTS_MIN,
    }
    for name, ours in names.items():
        assert values[name] == ours, name


def test_ring_sizes_match_netif_h(header_facts: dict[str, int]) -> None:
    assert header_facts["value __CONST_RING_SIZE(netif_tx, 4096)"] == netif.TX_RING_SIZE
    assert header_facts["value __CONST_RING_SIZE(netif_rx, 4096)"] == netif.RX_RING_SIZE


# --------------------------------------------------------------------------- extras


@pytest.mark.parametrize(
    "extra",
    [
        GsoExtra(1448, netif.XEN_NETIF_GSO_TYPE_TCPV4),
        GsoExtra(1428, netif.XEN_NETIF_GSO_TYPE_TCPV6, 1),
        McastExtra(True, bytes.fromhex("01005e000001")),
        McastExtra(False, bytes.fromhex("333300000001")),
        HashExtra(1, 1, 0x01020304),
    ],
)
@pytest.mark.parametrize("more", [False, True])
def test_extra_round_trip(extra: netif.Extra, more: bool) -> None:
    for size in (8, 12):
        raw = encode_extra(extra, more, slot_size=size)
        assert len(raw) == size
        assert decode_extra(raw) == (extra, more)


@pytest.mark.parametrize("kind", [0, 5, 6, 255])
def test_undefined_extra_types_raise(kind: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_extra(bytes([kind, 0, 1, 2, 3, 4, 5, 6]))
    assert info.value.field == "extra.type"


# --------------------------------------------------------------------------- TX


def slots(*parts: bytes) -> bytes:
    return b"".join(parts)


def test_single_slot_packet() -> None:
    raw = slots(*build_tx([(100, 64, 1500, 7)], FrameInfo(csum_blank=True)))
    pkt, used = parse_tx(raw, 1)
    assert used == 1 and pkt is not None and pkt.error is None
    assert pkt.frags == (netif.TxFrag(100, 64, 1500),)
    assert pkt.responses == ((7, NETIF_RSP_OKAY),)
    assert pkt.info == FrameInfo(csum_blank=True)


def test_multi_slot_packet_first_size_by_subtraction() -> None:
    frags = [(10, 0, 4096, 1), (11, 0, 4096, 2), (12, 100, 808, 3)]
    raw = slots(*build_tx(frags))
    first = netif.TX_REQ.unpack_from(raw, 0)
    assert first[4] == 4096 * 2 + 808  # the first slot carries the total
    assert first[2] & NETTXF_MORE_DATA
    pkt, used = parse_tx(raw, 3)
    assert used == 3 and pkt is not None and pkt.error is None
    assert [f.size for f in pkt.frags] == [4096, 4096, 808]
    assert pkt.size == 4096 * 2 + 808


def test_gso_packet_has_null_response_for_extra_slot() -> None:
    info = FrameInfo(csum_blank=True, gso_type=netif.XEN_NETIF_GSO_TYPE_TCPV4, gso_size=1448)
    raw = slots(*build_tx([(10, 0, 4000, 1), (11, 0, 3000, 2)], info))
    head = netif.TX_REQ.unpack_from(raw, 0)
    assert head[2] & NETTXF_EXTRA_INFO and head[2] & NETTXF_CSUM_BLANK
    pkt, used = parse_tx(raw, 3)
    assert used == 3 and pkt is not None and pkt.error is None
    assert pkt.responses == ((1, NETIF_RSP_OKAY), (0, NETIF_RSP_NULL), (2, NETIF_RSP_OKAY))
    assert pkt.info == info


def test_incomplete_chain_waits() -> None:
    raw = slots(*build_tx([(10, 0, 100, 1), (11, 0, 100, 2)]))
    assert parse_tx(raw, 1) == (None, 0)
    assert parse_tx(raw, 0) == (None, 0)


@pytest.mark.parametrize(
    ("frags", "why"),
    [
        ([(5, 0, 0, 1)], "size 0"),
        ([(5, 4000, 200, 1)], "crosses"),
        ([(5, 0, 100, 1), (6, 0, 0, 2)], "size 0"),
    ],
)
def test_bad_packets_are_errors(frags: list[tuple[int, int, int, int]], why: str) -> None:
    raw = slots(*[netif.TX_REQ.pack(g, o, NETTXF_MORE_DATA if n + 1 < len(frags) else 0, i,
                                    s if n else sum(f[2] for f in frags))
                  for n, (g, o, s, i) in enumerate(frags)])  # fmt: skip
    pkt, used = parse_tx(raw, len(frags))
    assert pkt is not None and pkt.error is not None and why in pkt.error
    assert used == len(frags)
    assert all(s == NETIF_RSP_ERROR for _, s in pkt.responses)


def test_fragments_larger_than_total_are_errors() -> None:
    raw = netif.TX_REQ.pack(1, 0, NETTXF_MORE_DATA, 1, 100) + netif.TX_REQ.pack(2, 0, 0, 2, 100)
    pkt, used = parse_tx(raw, 2)
    assert used == 2 and pkt is not None and pkt.error
    assert pkt.responses == ((1, NETIF_RSP_ERROR), (2, NETIF_RSP_ERROR))


def test_endless_more_data_chain_fails_at_the_limit() -> None:
    raw = b"".join(netif.TX_REQ.pack(9, 0, NETTXF_MORE_DATA, i, 64) for i in range(256))
    pkt, used = parse_tx(raw, 256)
    assert pkt is not None and pkt.error and "longer than" in pkt.error
    assert used == netif.XEN_NETIF_NR_SLOTS_MIN
    # the rest of the ring is framed as further (equally bad) chains, never waited for
    total = used
    while total + netif.XEN_NETIF_NR_SLOTS_MIN <= 256:
        pkt, used = parse_tx(raw[total * 12 :], 256 - total)
        assert pkt is not None and pkt.error
        total += used


def test_unknown_extra_type_consumes_its_chain() -> None:
    bad = bytes([7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # unknown type with MORE
    gso = encode_extra(GsoExtra(1448, 1), slot_size=12)
    raw = (
        netif.TX_REQ.pack(1, 0, NETTXF_EXTRA_INFO | NETTXF_MORE_DATA, 5, 200)
        + bad
        + gso
        + netif.TX_REQ.pack(2, 0, 0, 6, 100)
        + netif.TX_REQ.pack(3, 0, 0, 7, 60)
    )
    pkt, used = parse_tx(raw, 5)
    assert pkt is not None and pkt.error and "type 7" in pkt.error
    assert used == 4
    assert pkt.responses == (
        (5, NETIF_RSP_ERROR),
        (0, NETIF_RSP_NULL),
        (0, NETIF_RSP_NULL),
        (6, NETIF_RSP_ERROR),
    )
    nxt, _used2 = parse_tx(raw[used * 12 :], 1)
    assert nxt is not None and nxt.error is None and nxt.responses == ((7, NETIF_RSP_OKAY),)


def test_extras_refused_when_not_negotiated() -> None:
    raw = slots(*build_tx([(1, 0, 100, 1)], FrameInfo(gso_type=1, gso_size=1000)))
    pkt, used = parse_tx(raw, 2, allow_extra=False)
    assert used == 2 and pkt is not None and pkt.error


# hypothesis: any bytes, any count -> never raises, accounting is exact
@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=12 * 24, max_size=12 * 24), st.integers(0, 24))
def test_parse_tx_total_on_garbage(raw: bytes, count: int) -> None:
    pkt, used = parse_tx(raw, count)
    if pkt is None:
        assert used == 0
        return
    assert 1 <= used <= count
    assert pkt.nslots == used
    if pkt.error is None:
        assert sum(f.size for f in pkt.frags) == pkt.size
        assert all(f.offset + f.size <= 4096 and f.size > 0 for f in pkt.frags)
        assert all(s in (NETIF_RSP_OKAY, NETIF_RSP_NULL) for _, s in pkt.responses)
    else:
        assert all(s in (NETIF_RSP_ERROR, NETIF_RSP_NULL) for _, s in pkt.responses)


frag_st = st.tuples(
    st.integers(8, 2**32 - 1), st.integers(0, 4095), st.integers(1, 4096), st.integers(0, 65535)
).filter(lambda f: f[1] + f[2] <= 4096)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(frag_st, min_size=1, max_size=18).filter(lambda fs: sum(f[2] for f in fs) <= 0xFFFF),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 1, 2]),
)
def test_build_parse_round_trip(
    frags: list[tuple[int, int, int, int]], csum: bool, valid: bool, gso: int
) -> None:
    info = FrameInfo(csum, valid, gso, 1448 if gso else 0)
    raw = slots(*build_tx(frags, info))
    n = len(raw) // 12
    for short in range(n):  # every prefix is "incomplete", never an error
        assert parse_tx(raw, short) == (None, 0)
    pkt, used = parse_tx(raw, n)
    assert used == n and pkt is not None and pkt.error is None
    assert pkt.frags == tuple(netif.TxFrag(g, o, s) for g, o, s, _ in frags)
    assert pkt.info == info
    assert [i for i, s in pkt.responses if s != NETIF_RSP_NULL] == [f[3] for f in frags]


# --------------------------------------------------------------------------- RX


@pytest.mark.parametrize("length", [1, 60, 1514, 4096, 4097, 9000, 65535])
@pytest.mark.parametrize("gso", [False, True])
def test_rx_build_parse_round_trip(length: int, gso: bool) -> None:
    info = FrameInfo(True, True, 2, 1428) if gso else PLAIN
    need = netif.rx_slots_needed(length, gso)
    raw = b"".join(build_rx_responses(list(range(100, 100 + need)), length, info))
    assert len(raw) == need * 8
    for short in range(need):
        assert parse_rx(raw, short) == (None, 0)
    frame, used = parse_rx(raw, need)
    assert used == need and frame is not None and frame.error is None
    assert frame.size == length and frame.info == info
    if gso:
        first = netif.RX_RSP.unpack_from(raw, 0)
        assert first[2] & NETRXF_EXTRA_INFO
        assert [f[0] for f in frame.frags][:2] == [0, 2][: len(frame.frags)]
    if length > 4096:
        assert netif.RX_RSP.unpack_from(raw, 0)[2] & NETRXF_MORE_DATA


def test_rx_error_status_drops_frame_and_consumes_chain() -> None:
    raw = netif.RX_RSP.pack(1, 0, NETRXF_MORE_DATA, -1) + netif.RX_RSP.pack(2, 0, 0, 100)
    frame, used = parse_rx(raw, 2)
    assert used == 2 and frame is not None and frame.error


def test_rx_fragment_crossing_page_is_error() -> None:
    frame, used = parse_rx(netif.RX_RSP.pack(1, 4000, 0, 200), 1)
    assert used == 1 and frame is not None and frame.error


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=8 * 30, max_size=8 * 30), st.integers(0, 30))
def test_parse_rx_total_on_garbage(raw: bytes, count: int) -> None:
    frame, used = parse_rx(raw, count)
    if frame is None:
        assert used == 0
        return
    assert 1 <= used <= count and frame.nslots == used
    if frame.error is None:
        assert all(ln > 0 and o + ln <= 4096 for _, o, ln in frame.frags)
