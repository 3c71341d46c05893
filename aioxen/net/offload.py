"""Checksum and segmentation offload in software (pure, no I/O).

Theory of operation
-------------------
netif carries two kinds of offload with a frame ([`FrameInfo`][aioxen.net.netif.FrameInfo]):

* **partial checksum** (``csum_blank``): the TCP/UDP checksum field holds only the
  pseudo-header sum, as Linux leaves it for ``CHECKSUM_PARTIAL`` skbs; whoever puts the
  frame on a wire sums the bytes from the L4 header to the end (field included) and stores
  the complement.  netif does not say where the L4 header starts (virtio's ``csum_start``
  / ``csum_offset`` do), so the receiver finds it by parsing Ethernet/IP headers:
  [`csum_location`][].
* **GSO** (``gso_type``/``gso_size``): one TCP super-frame of up to 64 KiB to be cut into
  segments of ``gso_size`` payload bytes, each a valid frame: [`segment_tcp`][].

When a frame's destination accepts the offload (a TAP with ``IFF_VNET_HDR``, a frontend
that negotiated it), the frame passes unchanged; otherwise [`resolve_offloads`][] does
the work here.  The Internet checksum is computed with one big-integer remainder: since
``2**16 ≡ 1 (mod 0xFFFF)``, the ones'-complement sum of 16-bit big-endian words equals the
bytes read as one big-endian integer modulo ``0xFFFF``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from aioxen.net.netif import (
    PLAIN,
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    FrameInfo,
)

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_UDP = 17
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def inet_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Ones'-complement sum (not complemented) of ``data`` as 16-bit big-endian words,
    plus ``start``; an odd trailing byte is padded with zero."""
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    value = int.from_bytes(raw, "big")
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF  # a non-zero sum is never ones'-complement "+0"
    total += start
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the complement of [`inet_sum`][]."""
    return ~inet_sum(data, start) & 0xFFFF


class L4Location(NamedTuple):
    """Where a frame's transport header is: ``l3`` offset, IP version, ``l4`` offset and
    protocol, and the checksum field's offset within the L4 header."""

    l3: int
    version: int
    l4: int
    proto: int
    csum_offset: int


def locate_l4(frame: bytes | bytearray | memoryview) -> L4Location | None:
    """Parse Ethernet (+ one VLAN tag) and IPv4/IPv6 headers of ``frame``; ``None`` if it
    is not an unfragmented TCP or UDP packet whose headers fit in the frame."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    (ethertype,) = _U16.unpack_from(frame, 12)
    l3 = ETH_HLEN
    if ethertype == ETH_P_8021Q:
        if n < ETH_HLEN + 4:
            return None
        (ethertype,) = _U16.unpack_from(frame, 16)
        l3 += 4
    if ethertype == ETH_P_IP:
        if n < l3 + 20:
            return None
        ihl = (frame[l3] & 0x0F) * 4
        if frame[l3] >> 4 != 4 or ihl < 20 or n < l3 + ihl:
            return None
        (frag,) = _U16.unpack_from(frame, l3 + 6)
        if frag & 0x3FFF:  # MF or a fragment offset: not a whole L4 packet
            return None
        proto, l4, version = frame[l3 + 9], l3 + ihl, 4
    elif ethertype == ETH_P_IPV6:
        if n < l3 + 40 or frame[l3] >> 4 != 6:
            return None
        proto, l4, version = frame[l3 + 6], l3 + 40, 6
        while proto in _IPV6_EXT:
            if n < l4 + 8:
                return None
            proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
    else:
        return None
    if proto == IPPROTO_TCP:
        if n < l4 + 20:
            return None
        return L4Location(l3, version, l4, proto, 16)
    if proto == IPPROTO_UDP:
        if n < l4 + 8:
            return None
        return L4Location(l3, version, l4, proto, 6)
    return None


def csum_location(frame: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """virtio's ``(csum_start, csum_offset)`` for a partial-checksum frame, or ``None``."""
    loc = locate_l4(frame)
    return None if loc is None else (loc.l4, loc.csum_offset)


def tcp_header_end(frame: bytes | bytearray | memoryview, loc: L4Location) -> int:
    """Offset of the first TCP payload byte (``hdr_len`` of a GSO frame)."""
    return loc.l4 + (frame[loc.l4 + 12] >> 4) * 4


def _pseudo_sum(frame: bytearray | bytes, loc: L4Location, l4_len: int) -> int:
    addrs = (
        frame[loc.l3 + 12 : loc.l3 + 20] if loc.version == 4 else frame[loc.l3 + 8 : loc.l3 + 40]
    )
    return inet_sum(addrs, loc.proto + l4_len)


def complete_checksum(frame: bytearray) -> bool:
    """Finish a partial checksum in place (virtio semantics: sum from the L4 header to the
    end, the field holding the pseudo-header sum).  ``False`` if the frame is not TCP/UDP."""
    loc = locate_l4(frame)
    if loc is None:
        return False
    at = loc.l4 + loc.csum_offset
    csum = inet_checksum(memoryview(frame)[loc.l4 :])
    if loc.proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF
    _U16.pack_into(frame, at, csum)
    return True


def fill_checksum(frame: bytearray) -> bool:
    """Compute a TCP/UDP checksum from scratch (pseudo-header included) in place."""
    loc = locate_l4(frame)
    if loc is None:
        return False
    at = loc.l4 + loc.csum_offset
    _U16.pack_into(frame, at, 0)
    l4_len = len(frame) - loc.l4
    csum = inet_checksum(memoryview(frame)[loc.l4 :], _pseudo_sum(frame, loc, l4_len))
    if loc.proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF
    _U16.pack_into(frame, at, csum)
    return True


def segment_tcp(frame: bytes | bytearray | memoryview, gso_size: int) -> list[bytearray]:
    """Cut a TCP super-frame into frames of at most ``gso_size`` payload bytes, each with
    correct IP lengths, IPv4 id and header checksum, TCP sequence numbers, flags and
    checksum.  ``ValueError`` if the frame is not TCP over IPv4/IPv6."""
    loc = locate_l4(frame)
    if loc is None or loc.proto != IPPROTO_TCP:
        raise ValueError("GSO frame is not TCP over IPv4/IPv6")
    if gso_size <= 0:
        raise ValueError("GSO segment size must be positive")
    hdr_end = tcp_header_end(frame, loc)
    header = bytes(frame[:hdr_end])
    payload = memoryview(bytes(frame[hdr_end:]))
    (seq,) = _U32.unpack_from(header, loc.l4 + 4)
    tcp_flags = header[loc.l4 + 13]
    (ip_id,) = _U16.unpack_from(header, loc.l3 + 4) if loc.version == 4 else (0,)
    out: list[bytearray] = []
    nseg = max(1, -(-len(payload) // gso_size))
    for k in range(nseg):
        chunk = payload[k * gso_size : (k + 1) * gso_size]
        seg = bytearray(header)
        seg += chunk
        flags = tcp_flags
        if k + 1 < nseg:
            flags &= ~0x09  # FIN, PSH only on the last segment
        if k > 0:
            flags &= ~0x80  # CWR only on the first
        seg[loc.l4 + 13] = flags
        _U32.pack_into(seg, loc.l4 + 4, (seq + k * gso_size) & 0xFFFFFFFF)
        if loc.version == 4:
            _U16.pack_into(seg, loc.l3 + 2, len(seg) - loc.l3)
            _U16.pack_into(seg, loc.l3 + 4, (ip_id + k) & 0xFFFF)
            _U16.pack_into(seg, loc.l3 + 10, 0)
            ihl = (seg[loc.l3] & 0x0F) * 4
            _U16.pack_into(seg, loc.l3 + 10, inet_checksum(seg[loc.l3 : loc.l3 + ihl]))
        else:
            _U16.pack_into(seg, loc.l3 + 4, len(seg) - loc.l3 - 40)
        fill_checksum(seg)
        out.append(seg)
    return out


def split_gso(
    frame: bytes | bytearray | memoryview, info: FrameInfo, limit: int
) -> list[tuple[bytearray, FrameInfo]]:
    """Cut a TCP super-frame longer than ``limit`` bytes into super-frames of at most
    ``limit`` bytes (whole segments each), still GSO with partial checksums: each gets
    its own IP length/id and TCP sequence number, and the checksum field holds the
    pseudo-header sum for its length.  ``ValueError`` if it is not TCP or cannot fit."""
    loc = locate_l4(frame)
    if loc is None or loc.proto != IPPROTO_TCP or info.gso_size <= 0:
        raise ValueError("not a TCP GSO frame")
    hdr_end = tcp_header_end(frame, loc)
    per = (limit - hdr_end) // info.gso_size * info.gso_size
    if per <= 0:
        raise ValueError(f"headers of {hdr_end} bytes leave no room in {limit} bytes")
    header = bytes(frame[:hdr_end])
    payload = memoryview(bytes(frame[hdr_end:]))
    (seq,) = _U32.unpack_from(header, loc.l4 + 4)
    tcp_flags = header[loc.l4 + 13]
    (ip_id,) = _U16.unpack_from(header, loc.l3 + 4) if loc.version == 4 else (0,)
    nchunks = max(1, -(-len(payload) // per))
    out: list[tuple[bytearray, FrameInfo]] = []
    for k in range(nchunks):
        chunk = payload[k * per : (k + 1) * per]
        seg = bytearray(header)
        seg += chunk
        flags = tcp_flags
        if k + 1 < nchunks:
            flags &= ~0x09
        if k > 0:
            flags &= ~0x80
        seg[loc.l4 + 13] = flags
        _U32.pack_into(seg, loc.l4 + 4, (seq + k * per) & 0xFFFFFFFF)
        if loc.version == 4:
            _U16.pack_into(seg, loc.l3 + 2, len(seg) - loc.l3)
            _U16.pack_into(seg, loc.l3 + 4, (ip_id + k * (per // info.gso_size)) & 0xFFFF)
            _U16.pack_into(seg, loc.l3 + 10, 0)
            ihl = (seg[loc.l3] & 0x0F) * 4
            _U16.pack_into(seg, loc.l3 + 10, inet_checksum(seg[loc.l3 : loc.l3 + ihl]))
        else:
            _U16.pack_into(seg, loc.l3 + 4, len(seg) - loc.l3 - 40)
        l4_len = len(seg) - loc.l4
        _U16.pack_into(seg, loc.l4 + loc.csum_offset, _pseudo_sum(seg, loc, l4_len))
        out.append((seg, info._replace(csum_blank=True)))
    return out


def resolve_offloads(
    frame: bytes | bytearray | memoryview,
    info: FrameInfo,
    *,
    accept_csum: bool,
    accept_gso: bool,
) -> list[tuple[bytes | bytearray | memoryview, FrameInfo]]:
    """Make ``(frame, info)`` acceptable to a destination that accepts partial checksums
    (``accept_csum``) and/or GSO super-frames (``accept_gso``): segment, complete the
    checksum, or pass through.  Unparseable offloaded frames are returned as ``[]``
    (dropped), never forwarded with a wrong checksum."""
    if info.gso_type != XEN_NETIF_GSO_TYPE_NONE and not accept_gso:
        if info.gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
            return []
        try:
            segs = segment_tcp(frame, info.gso_size)
        except ValueError:
            return []
        done = FrameInfo(data_validated=True)
        return [(s, done) for s in segs]
    if info.csum_blank and not accept_csum:
        buf = bytearray(frame)
        if not complete_checksum(buf):
            return []
        return [(buf, FrameInfo(data_validated=True))]
    return [(frame, info)]


__all__ = [
    "PLAIN",
    "L4Location",
    "complete_checksum",
    "csum_location",
    "fill_checksum",
    "inet_checksum",
    "inet_sum",
    "locate_l4",
    "resolve_offloads",
    "segment_tcp",
    "split_gso",
    "tcp_header_end",
]
