"""Software checksum/segmentation offload, checked against a slow reference checksum."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen.net.netif import PLAIN, FrameInfo
from aioxen.net.offload import (
    complete_checksum,
    csum_location,
    fill_checksum,
    inet_checksum,
    locate_l4,
    resolve_offloads,
    segment_tcp,
    split_gso,
)


def ref_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (w,) in struct.iter_unpack("!H", data):
        total += w
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ip4_ok(frame: bytes, l3: int = 14) -> bool:
    ihl = (frame[l3] & 15) * 4
    return ref_sum(frame[l3 : l3 + ihl]) == 0xFFFF


def l4_ok(frame: bytes) -> bool:
    loc = locate_l4(frame)
    assert loc is not None
    span = (12, 20) if loc.version == 4 else (8, 40)
    pseudo = frame[loc.l3 + span[0] : loc.l3 + span[1]]
    length = len(frame) - loc.l4
    pseudo += struct.pack("!HH", loc.proto, length)
    return ref_sum(pseudo + frame[loc.l4 :]) == 0xFFFF


def eth(ethertype: int, vlan: bool = False) -> bytes:
    head = bytes.fromhex("00163e000102") + bytes.fromhex("00163e000203")
    if vlan:
        head += b"\x81\x00\x00\x05"
    return head + struct.pack("!H", ethertype)


def tcp4(payload: bytes, *, vlan: bool = False, flags: int = 0x19, seq: int = 1000) -> bytearray:
    ip = bytearray(20)
    ip[0] = 0x45
    struct.pack_into("!HH", ip, 2, 40 + len(payload), 0x1234)
    ip[8], ip[9] = 64, 6
    ip[12:20] = bytes([10, 231, 0, 1, 10, 231, 0, 2])
    struct.pack_into("!H", ip, 10, inet_checksum(ip))
    tcp = bytearray(20)
    struct.pack_into("!HHI", tcp, 0, 40000, 8080, seq)
    tcp[12], tcp[13] = 0x50, flags
    return bytearray(eth(0x0800, vlan)) + ip + tcp + payload


def tcp6(payload: bytes, *, ext: bool = False) -> bytearray:
    ip = bytearray(40)
    ip[0] = 0x60
    nh = 0 if ext else 6
    extra = bytes([6, 0]) + bytes(6) if ext else b""
    struct.pack_into("!H", ip, 4, len(extra) + 20 + len(payload))
    ip[6], ip[7] = nh, 64
    ip[8:24] = bytes.fromhex("fd000000000000000000000000000001")
    ip[24:40] = bytes.fromhex("fd000000000000000000000000000002")
    tcp = bytearray(20)
    struct.pack_into("!HHI", tcp, 0, 40000, 8080, 7)
    tcp[12], tcp[13] = 0x50, 0x18
    return bytearray(eth(0x86DD)) + ip + extra + tcp + payload


def udp4(payload: bytes) -> bytearray:
    ip = bytearray(20)
    ip[0] = 0x45
    struct.pack_into("!H", ip, 2, 28 + len(payload))
    ip[8], ip[9] = 64, 17
    ip[12:20] = bytes([10, 231, 0, 1, 10, 231, 0, 2])
    struct.pack_into("!H", ip, 10, inet_checksum(ip))
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0)
    return bytearray(eth(0x0800)) + ip + udp + payload


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_inet_checksum_matches_reference(data: bytes, start: int) -> None:
    want = ~ref_sum(data + (b"\0" if len(data) % 2 else b"") + struct.pack("!H", start)) & 0xFFFF
    assert inet_checksum(data, start) == want or {inet_checksum(data, start), want} == {0, 0xFFFF}


@pytest.mark.parametrize(
    "frame",
    [tcp4(b"hello" * 300), tcp4(b"x" * 7, vlan=True), tcp6(b"y" * 999), tcp6(b"z" * 10, ext=True),
     udp4(b"u" * 501)],
    ids=["tcp4", "tcp4-vlan", "tcp6", "tcp6-ext", "udp4"],
)  # fmt: skip
def test_fill_and_complete_checksum(frame: bytearray) -> None:
    assert fill_checksum(frame)
    assert l4_ok(bytes(frame))
    loc = locate_l4(frame)
    assert loc is not None and csum_location(frame) == (loc.l4, loc.csum_offset)
    # a partial checksum (pseudo-header sum in the field) completes to the same value
    full = bytes(frame)
    at = loc.l4 + loc.csum_offset
    length = len(frame) - loc.l4
    addrs = (
        frame[loc.l3 + 12 : loc.l3 + 20] if loc.version == 4 else frame[loc.l3 + 8 : loc.l3 + 40]
    )
    partial = ref_sum(bytes(addrs) + struct.pack("!HH", loc.proto, length))
    struct.pack_into("!H", frame, at, partial)
    assert complete_checksum(frame)
    assert l4_ok(bytes(frame)) and (
        bytes(frame) == full or bytes(frame[at : at + 2]) in (b"\0\0", b"\xff\xff")
    )


def test_locate_rejects_fragments_and_other_protocols() -> None:
    frag = tcp4(b"a" * 10)
    struct.pack_into("!H", frag, 14 + 6, 0x2000)  # MF
    assert locate_l4(frag) is None
    arp = bytearray(eth(0x0806)) + bytes(28)
    assert locate_l4(arp) is None
    icmp = tcp4(b"")
    icmp[14 + 9] = 1
    assert locate_l4(icmp) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_locate_never_raises(data: bytes) -> None:
    for prefix in (b"", eth(0x0800), eth(0x86DD), eth(0x0800, vlan=True)):
        loc = locate_l4(prefix + data)
        if loc is not None:
            assert loc.l4 + 8 <= len(prefix + data)


@pytest.mark.parametrize("make", [tcp4, tcp6], ids=["v4", "v6"])
@pytest.mark.parametrize(("size", "mss"), [(60000, 1448), (3000, 1000), (500, 1448), (2896, 1448)])
def test_segment_tcp(make: object, size: int, mss: int) -> None:
    payload = bytes(k * 7 & 0xFF for k in range(size))
    frame = make(payload)  # type: ignore[operator]
    segs = segment_tcp(frame, mss)
    assert len(segs) == max(1, -(-size // mss))
    loc = locate_l4(frame)
    assert loc is not None
    hdr = loc.l4 + 20
    assert b"".join(bytes(s[hdr:]) for s in segs) == payload
    (seq0,) = struct.unpack_from("!I", frame, loc.l4 + 4)
    for k, s in enumerate(segs):
        assert len(s) - hdr <= mss
        assert l4_ok(bytes(s))
        if loc.version == 4:
            assert ip4_ok(bytes(s))
            assert struct.unpack_from("!H", s, 16)[0] == len(s) - 14
        else:
            assert struct.unpack_from("!H", s, 18)[0] == len(s) - 54
        assert struct.unpack_from("!I", s, loc.l4 + 4)[0] == seq0 + k * mss
        last = k + 1 == len(segs)
        assert bool(s[loc.l4 + 13] & 0x01) == (last and bool(frame[loc.l4 + 13] & 0x01))


def test_split_gso_keeps_partial_checksums() -> None:
    payload = bytes(k & 0xFF for k in range(65495))  # the largest IPv4 packet: a 65549-byte frame
    frame = tcp4(payload)
    info = FrameInfo(csum_blank=True, gso_type=1, gso_size=1448)
    parts = split_gso(frame, info, 65535)
    assert len(parts) == 2 and all(len(p) <= 65535 for p, _ in parts)
    assert all(i.gso_type == 1 and i.csum_blank for _, i in parts)
    assert b"".join(bytes(p[54:]) for p, _ in parts) == payload
    # finishing each part's partial checksum yields a valid TCP checksum
    for p, _ in parts:
        q = bytearray(p)
        assert complete_checksum(q) and l4_ok(bytes(q)) and ip4_ok(bytes(q))
        assert (len(p) - 54) % 1448 == 0 or p is parts[-1][0]


def test_resolve_offloads() -> None:
    frame = tcp4(b"p" * 5000)
    fill_checksum(frame)
    gso = FrameInfo(csum_blank=True, gso_type=1, gso_size=1448)
    assert resolve_offloads(frame, gso, accept_csum=True, accept_gso=True) == [(frame, gso)]
    segs = resolve_offloads(frame, gso, accept_csum=True, accept_gso=False)
    assert len(segs) == 4 and all(l4_ok(bytes(s)) for s, _ in segs)
    blank = FrameInfo(csum_blank=True)
    done = resolve_offloads(tcp4(b"q" * 10), blank, accept_csum=False, accept_gso=False)
    assert len(done) == 1 and done[0][1] == FrameInfo(data_validated=True)
    assert resolve_offloads(b"\x00" * 60, blank, accept_csum=False, accept_gso=False) == []
    assert resolve_offloads(b"\x00" * 60, PLAIN, accept_csum=False, accept_gso=False) == [
        (b"\x00" * 60, PLAIN)
    ]


def partial(frame: bytearray) -> bytearray:
    """``frame`` as Linux leaves a CHECKSUM_PARTIAL packet: the L4 checksum field holds
    the (uncomplemented) pseudo-header sum."""
    loc = locate_l4(frame)
    assert loc is not None
    span = (12, 20) if loc.version == 4 else (8, 40)
    addrs = bytes(frame[loc.l3 + span[0] : loc.l3 + span[1]])
    pseudo = ref_sum(addrs + struct.pack("!HH", loc.proto, len(frame) - loc.l4))
    struct.pack_into("!H", frame, loc.l4 + loc.csum_offset, pseudo)
    return frame
