"""The ``io/netif.h`` wire format: ring entries, flags, extra-info and packet framing (pure).

Theory of operation
-------------------
A vif has two ``io/ring.h`` rings, both set up by the frontend:

* **TX** (frontend → backend): 12-byte slots.  A packet is a *chain* of slots: the first
  `TX_REQUEST` carries the packet's ``NETTXF_*`` flags and its **total** size; if it
  has ``NETTXF_extra_info`` it is followed by one or more 8-byte `Extra` records
  (chained by ``XEN_NETIF_EXTRA_FLAG_MORE``), then by further fragments while the previous
  fragment has ``NETTXF_more_data``.  Later fragments carry their own size, so the first
  fragment's size is the total minus the rest.  Every slot is answered by one TX response:
  request slots with ``(id, status)``, extra slots with ``NETIF_RSP_NULL``.
* **RX** (backend → frontend): 8-byte slots.  The frontend posts empty pages
  (`RX_REQUEST`: ``id``, ``gref``); the backend copies a packet into one or more of
  them and answers with `RX_RESPONSE` (``offset``, ``flags``, ``status`` = bytes in
  this fragment).  The RX response for a request goes **in the ring slot of that request**
  (Linux netfront ignores the id); an extra-info record (e.g. GSO) also occupies a response
  slot, which consumes one posted request.

This module knows nothing about rings or memory: it encodes and decodes entries, turns a
run of TX slots into `TxPacket` values (validating everything a hostile frontend
controls: sizes, offsets, chain length, extra types), plans how a frame is laid out over
posted RX buffers ([`plan_rx`][]), and reassembles RX responses into frames
(`RxAssembler`).  Invalid input never raises out of the TX parser: the packet comes
back with ``error`` set and the ids to answer with ``NETIF_RSP_ERROR``.

Offload metadata travels with each frame as a [`FrameInfo`][] (checksum state and GSO
type/size); it is what netfront/netback hand to protocols as the datagram "address".
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aioxen.errors import ProtocolError
from aioxen.platforms.base import PAGE_SIZE
from aioxen.rings.formats import RawFormat, StructFormat

# The ring slot layouts (io/netif.h).  TX flags go frontend → backend, RX flags backend →
# frontend (bits 0 and 1 swap meaning with TX).


class NetifTxRequest(NamedTuple):
    gref: int
    offset: int
    flags: int
    id: int
    size: int


class NetifTxResponse(NamedTuple):
    id: int
    status: int


class NetifRxRequest(NamedTuple):
    id: int
    gref: int


class NetifRxResponse(NamedTuple):
    id: int
    offset: int
    flags: int
    status: int


class NetifExtraInfo(NamedTuple):
    type: int
    flags: int
    data: bytes  # the 6-byte union, interpreted by ``type``


NETTXF_CSUM_BLANK = 0x1
NETTXF_DATA_VALIDATED = 0x2
NETTXF_MORE_DATA = 0x4
NETTXF_EXTRA_INFO = 0x8
NETRXF_DATA_VALIDATED = 0x1
NETRXF_CSUM_BLANK = 0x2
NETRXF_MORE_DATA = 0x4
NETRXF_EXTRA_INFO = 0x8
NETRXF_GSO_PREFIX = 0x10
NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1

NETIF_TX_REQUEST: StructFormat[NetifTxRequest] = StructFormat(
    "netif_tx_request", "<IHHHH", NetifTxRequest
)
NETIF_TX_RESPONSE: StructFormat[NetifTxResponse] = StructFormat(
    "netif_tx_response", "<Hh", NetifTxResponse, align=2
)
# ``pad`` is not part of the record: it is written as zero and ignored on decode.
NETIF_RX_REQUEST: StructFormat[NetifRxRequest] = StructFormat(
    "netif_rx_request", "<H2xI", NetifRxRequest
)
NETIF_RX_RESPONSE: StructFormat[NetifRxResponse] = StructFormat(
    "netif_rx_response", "<HHHh", NetifRxResponse, align=2
)
NETIF_EXTRA_INFO: StructFormat[NetifExtraInfo] = StructFormat(
    "netif_extra_info", "<BB6s", NetifExtraInfo, id_field=None, align=2
)

XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5
XEN_NETIF_EXTRA_FLAG_MORE = 0x1

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

_GSO_TYPES = (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6)

XEN_NETIF_MAX_TX_SIZE = 0xFFFF
XEN_NETIF_NR_SLOTS_MIN = 18
"""Data slots per packet every backend must accept (and the most we accept)."""
MAX_EXTRA_SLOTS = XEN_NETIF_EXTRA_TYPE_MAX - 1
"""Extra-info slots per packet we accept: at most one of each defined type."""

TX_SLOT_SIZE = 12
RX_SLOT_SIZE = 8
TX_RING_SIZE = 256  # entries in a one-page ring: (4096 - 64) // 12 rounded down to 2**k
RX_RING_SIZE = 256

# Flat struct codecs for hot paths, built from the ring formats' layouts (records and
# layouts above).
TX_REQ = struct.Struct(NETIF_TX_REQUEST.layout)
TX_RSP = struct.Struct(NETIF_TX_RESPONSE.layout)
TX_RSP_SLOT = struct.Struct(NETIF_TX_RESPONSE.layout + f"{TX_SLOT_SIZE - TX_RSP.size}x")
RX_REQ = struct.Struct(NETIF_RX_REQUEST.layout)
RX_RSP = struct.Struct(NETIF_RX_RESPONSE.layout)
EXTRA_HEAD = struct.Struct("<BB")
_GSO = struct.Struct("<BBHBxH")
_GSO_TX = struct.Struct("<BBHBxH4x")
_MCAST = struct.Struct("<BB6s")
_HASH = struct.Struct("<BBBB4s")

TX_REQUEST = NETIF_TX_REQUEST
TX_RESPONSE = NETIF_TX_RESPONSE
RX_REQUEST = NETIF_RX_REQUEST
RX_RESPONSE = NETIF_RX_RESPONSE
EXTRA_INFO = NETIF_EXTRA_INFO


# --------------------------------------------------------------------------- extra info


class GsoExtra(NamedTuple):
    """``XEN_NETIF_EXTRA_TYPE_GSO``: segment size (MSS), GSO type, features."""

    size: int
    gso_type: int
    features: int = 0


class McastExtra(NamedTuple):
    """``XEN_NETIF_EXTRA_TYPE_MCAST_ADD`` / ``_DEL``: a multicast MAC address."""

    add: bool
    addr: bytes


class HashExtra(NamedTuple):
    """``XEN_NETIF_EXTRA_TYPE_HASH``: hash type, algorithm and the 32-bit value."""

    hash_type: int
    algorithm: int
    value: int


Extra = GsoExtra | McastExtra | HashExtra


def encode_extra(extra: Extra, more: bool = False, slot_size: int = 8) -> bytes:
    """The ``netif_extra_info`` bytes for ``extra``, padded to ``slot_size`` (12 in TX)."""
    flags = XEN_NETIF_EXTRA_FLAG_MORE if more else 0
    if isinstance(extra, GsoExtra):
        raw = _GSO.pack(XEN_NETIF_EXTRA_TYPE_GSO, flags, extra.size, extra.gso_type, extra.features)
    elif isinstance(extra, McastExtra):
        if len(extra.addr) != 6:
            raise ValueError(f"multicast address must be 6 bytes, got {len(extra.addr)}")
        kind = XEN_NETIF_EXTRA_TYPE_MCAST_ADD if extra.add else XEN_NETIF_EXTRA_TYPE_MCAST_DEL
        raw = _MCAST.pack(kind, flags, extra.addr)
    else:
        raw = _HASH.pack(
            XEN_NETIF_EXTRA_TYPE_HASH,
            flags,
            extra.hash_type,
            extra.algorithm,
            extra.value.to_bytes(4, "little"),
        )
    return raw + bytes(slot_size - len(raw))


def decode_extra(raw: bytes | memoryview, offset: int = 0) -> tuple[Extra, bool]:
    """Decode the 8 bytes at ``offset``: ``(extra, more)``.

    ``ProtocolError`` (field ``extra.type``) for ``NONE`` and unknown types.
    """
    kind, flags = EXTRA_HEAD.unpack_from(raw, offset)
    more = bool(flags & XEN_NETIF_EXTRA_FLAG_MORE)
    if kind == XEN_NETIF_EXTRA_TYPE_GSO:
        _, _, size, gso_type, features = _GSO.unpack_from(raw, offset)
        return GsoExtra(size, gso_type, features), more
    if kind in (XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
        _, _, addr = _MCAST.unpack_from(raw, offset)
        return McastExtra(kind == XEN_NETIF_EXTRA_TYPE_MCAST_ADD, addr), more
    if kind == XEN_NETIF_EXTRA_TYPE_HASH:
        _, _, htype, alg, value = _HASH.unpack_from(raw, offset)
        return HashExtra(htype, alg, int.from_bytes(value, "little")), more
    raise ProtocolError(f"netif extra-info type {kind} is not defined", field="extra.type")


# --------------------------------------------------------------------------- frame metadata


class FrameInfo(NamedTuple):
    """Offload metadata of one Ethernet frame (the datagram "address" in netfront/netback).

    * ``csum_blank``: the L4 checksum is not filled in (partial checksum, to be completed
      by whoever finally puts the frame on a wire); ``NETTXF_csum_blank`` /
      ``NETRXF_csum_blank``.
    * ``data_validated``: the checksum was already verified (or need not be);
      ``NETTXF_data_validated`` / ``NETRXF_data_validated``.
    * ``gso_type``/``gso_size``: a TCP super-frame (``XEN_NETIF_GSO_TYPE_TCPV4``/``V6``)
      to be cut into segments of ``gso_size`` payload bytes; 0 for an ordinary frame.
    """

    csum_blank: bool = False
    data_validated: bool = False
    gso_type: int = XEN_NETIF_GSO_TYPE_NONE
    gso_size: int = 0

    @property
    def is_gso(self) -> bool:
        return self.gso_type != XEN_NETIF_GSO_TYPE_NONE

    def tx_flags(self) -> int:
        return (NETTXF_CSUM_BLANK if self.csum_blank else 0) | (
            NETTXF_DATA_VALIDATED if self.data_validated else 0
        )

    def rx_flags(self) -> int:
        return (NETRXF_CSUM_BLANK if self.csum_blank else 0) | (
            NETRXF_DATA_VALIDATED if self.data_validated else 0
        )


PLAIN = FrameInfo()
"""Metadata of a frame with complete checksums and no GSO."""

_TX_INFO = {
    f: FrameInfo(bool(f & NETTXF_CSUM_BLANK), bool(f & NETTXF_DATA_VALIDATED)) for f in range(4)
}
_RX_INFO = {
    f: FrameInfo(bool(f & NETRXF_CSUM_BLANK), bool(f & NETRXF_DATA_VALIDATED)) for f in range(4)
}


def info_from_tx_flags(flags: int, gso: GsoExtra | None = None) -> FrameInfo:
    base = _TX_INFO[flags & 3]
    if gso is None or gso.gso_type == XEN_NETIF_GSO_TYPE_NONE:
        return base
    return base._replace(gso_type=gso.gso_type, gso_size=gso.size)


def info_from_rx_flags(flags: int, gso: GsoExtra | None = None) -> FrameInfo:
    base = _RX_INFO[flags & 3]
    if gso is None or gso.gso_type == XEN_NETIF_GSO_TYPE_NONE:
        return base
    return base._replace(gso_type=gso.gso_type, gso_size=gso.size)


# --------------------------------------------------------------------------- TX parsing


class TxFrag(NamedTuple):
    """One data slot of a TX packet: ``size`` bytes at ``offset`` of page ``gref``."""

    gref: int
    offset: int
    size: int


class TxPacket(NamedTuple):
    """A TX chain as the backend consumed it.

    ``responses`` lists, in slot order, the ``(id, status)`` of every slot the chain used
    (``(0, NETIF_RSP_NULL)`` for extra slots): the backend writes exactly these, with
    ``NETIF_RSP_OKAY`` replaced by an error status if it later fails to copy the data.
    ``error`` is ``None`` for a valid packet, else why it is dropped (all request slots
    are then answered ``NETIF_RSP_ERROR``).
    """

    frags: tuple[TxFrag, ...]
    size: int
    flags: int
    extras: tuple[Extra, ...]
    responses: tuple[tuple[int, int], ...]
    error: str | None = None

    @property
    def nslots(self) -> int:
        return len(self.responses)

    @property
    def gso(self) -> GsoExtra | None:
        for e in self.extras:
            if isinstance(e, GsoExtra):
                return e
        return None

    @property
    def info(self) -> FrameInfo:
        return info_from_tx_flags(self.flags, self.gso)

    @property
    def multicast(self) -> McastExtra | None:
        """A multicast-control request: such a packet is answered, never delivered."""
        for e in self.extras:
            if isinstance(e, McastExtra):
                return e
        return None

    def with_status(self, status: int) -> tuple[tuple[int, int], ...]:
        """The responses with every request slot's status set to ``status``."""
        return tuple((i, s if s == NETIF_RSP_NULL else status) for i, s in self.responses)


def parse_tx(
    raw: bytes | memoryview,
    count: int,
    *,
    max_data_slots: int = XEN_NETIF_NR_SLOTS_MIN,
    max_extra_slots: int = MAX_EXTRA_SLOTS,
    allow_extra: bool = True,
) -> tuple[TxPacket | None, int]:
    """Parse the TX packet starting at the first of ``count`` 12-byte slots in ``raw``.

    Returns ``(packet, slots_used)``, or ``(None, 0)`` when the chain is not complete yet
    (more slots must arrive) and still within the limits.  The chain is framed
    structurally first (extras by ``XEN_NETIF_EXTRA_FLAG_MORE``, data by
    ``NETTXF_more_data``) so that a bad packet consumes exactly its own slots; a chain
    longer than ``max_data_slots`` data slots or ``max_extra_slots`` extras is cut at the
    limit and fails at once, so a chain that never ends cannot stall the ring.
    """
    if count <= 0:
        return None, 0
    first = TX_REQ.unpack_from(raw, 0)
    flags, total = first[2], first[4]
    datas: list[tuple[int, int, int, int, int]] = [first]
    layout: list[int] = [0]  # per slot: index into datas, or -1 for an extra slot
    extras: list[Extra] = []
    why: str | None = None
    framed = True  # False once a limit cut the chain: its end is unknown, stop there
    i = 1
    if flags & NETTXF_EXTRA_INFO:
        more = True
        while more:
            if i - 1 >= max_extra_slots:
                why = f"more than {max_extra_slots} extra-info slots"
                framed = False
                break
            if i >= count:
                return None, 0
            off = i * TX_SLOT_SIZE
            more = bool(raw[off + 1] & XEN_NETIF_EXTRA_FLAG_MORE)
            layout.append(-1)
            i += 1
            if why is not None:
                continue
            if not allow_extra:
                why = "extra-info slots not negotiated"
                continue
            try:
                extra, _ = decode_extra(raw, off)
            except ProtocolError as exc:
                why = str(exc)
                continue
            # as in Linux netback, a later extra of the same type replaces an earlier one
            extras = [e for e in extras if not _same_kind(e, extra)]
            extras.append(extra)
    prev = flags
    while framed and prev & NETTXF_MORE_DATA:
        if len(datas) >= max_data_slots:
            why = f"more_data chain longer than {max_data_slots} slots"
            break
        if i >= count:
            return None, 0
        slot = TX_REQ.unpack_from(raw, i * TX_SLOT_SIZE)
        layout.append(len(datas))
        datas.append(slot)
        i += 1
        prev = slot[2]
    if why is None:
        why = _check_tx(datas, total, extras)
    status = NETIF_RSP_OKAY if why is None else NETIF_RSP_ERROR
    responses = tuple((0, NETIF_RSP_NULL) if k < 0 else (datas[k][3], status) for k in layout)
    if why is not None:
        return TxPacket((), total, flags & 3, tuple(extras), responses, why), i
    sizes = [total - sum(s[4] for s in datas[1:])] + [s[4] for s in datas[1:]]
    frags = tuple(TxFrag(s[0], s[1], n) for s, n in zip(datas, sizes, strict=True))
    return TxPacket(frags, total, flags & 3, tuple(extras), responses), i


def _same_kind(a: Extra, b: Extra) -> bool:
    if isinstance(a, McastExtra) and isinstance(b, McastExtra):
        return a.add == b.add
    return type(a) is type(b)


def _check_tx(
    datas: list[tuple[int, int, int, int, int]], total: int, extras: list[Extra]
) -> str | None:
    """Why a fully framed TX packet is invalid, or ``None``."""
    if total == 0:
        return "packet size 0"
    rest = sum(s[4] for s in datas[1:])
    if rest >= total:
        return f"fragments after the first carry {rest} bytes, packet size is {total}"
    sizes = [total - rest] + [s[4] for s in datas[1:]]
    for (gref, off, _, ident, _), size in zip(datas, sizes, strict=True):
        if size == 0:
            return f"fragment id {ident} has size 0"
        if off + size > PAGE_SIZE:
            return (
                f"fragment id {ident}: offset {off} + size {size} crosses the "
                f"{PAGE_SIZE}-byte page of gref {gref}"
            )
    for e in extras:
        if isinstance(e, GsoExtra):
            if e.gso_type not in _GSO_TYPES:
                return f"unknown GSO type {e.gso_type}"
            if e.size == 0:
                return "GSO segment size 0"
    return None


def build_tx(
    frags: Sequence[tuple[int, int, int, int]],
    info: FrameInfo = PLAIN,
    extras: Sequence[Extra] = (),
) -> list[bytes]:
    """The 12-byte TX slots for a packet: ``frags`` are ``(gref, offset, size, id)``.

    Used by netfront and by tests; the first slot carries the total size.
    """
    if not frags:
        raise ValueError("a packet needs at least one fragment")
    total = sum(f[2] for f in frags)
    if total > XEN_NETIF_MAX_TX_SIZE:
        raise ValueError(f"packet of {total} bytes exceeds {XEN_NETIF_MAX_TX_SIZE}")
    all_extras = list(extras)
    if info.is_gso:
        all_extras.insert(0, GsoExtra(info.gso_size, info.gso_type))
    out: list[bytes] = []
    base = info.tx_flags()
    for n, (gref, off, size, ident) in enumerate(frags):
        flags = base if n == 0 else 0
        if n + 1 < len(frags):
            flags |= NETTXF_MORE_DATA
        if n == 0 and all_extras:
            flags |= NETTXF_EXTRA_INFO
        out.append(TX_REQ.pack(gref, off, flags, ident, total if n == 0 else size))
        if n == 0:
            for k, e in enumerate(all_extras):
                out.append(encode_extra(e, more=k + 1 < len(all_extras), slot_size=TX_SLOT_SIZE))
    return out


# --------------------------------------------------------------------------- RX side


def rx_slots_needed(frame_len: int, gso: bool, page: int = PAGE_SIZE) -> int:
    """Posted RX requests a frame of ``frame_len`` bytes consumes (data pages + GSO slot)."""
    return max(1, -(-frame_len // page)) + (1 if gso else 0)


def plan_rx(frame_len: int, page: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """``(frame_offset, length)`` of each data fragment when copying into whole pages."""
    if frame_len <= 0:
        raise ValueError("frame length must be positive")
    return [(o, min(page, frame_len - o)) for o in range(0, frame_len, page)]


def build_rx_responses(
    ids: Sequence[int],
    frame_len: int,
    info: FrameInfo = PLAIN,
    page: int = PAGE_SIZE,
) -> list[bytes]:
    """The 8-byte RX response slots for a frame copied to offset 0 of pages from the
    posted requests ``ids`` (in ring order).  A GSO frame's extra slot follows the first
    response.  ``len(ids)`` must be [`rx_slots_needed`][]."""
    frags = plan_rx(frame_len, page)
    need = len(frags) + (1 if info.is_gso else 0)
    if len(ids) != need:
        raise ValueError(f"frame of {frame_len} bytes needs {need} RX slots, got {len(ids)}")
    out: list[bytes] = []
    it = iter(ids)
    for n, (_, length) in enumerate(frags):
        ident = next(it)
        flags = info.rx_flags() if n == 0 else 0
        if n + 1 < len(frags):
            flags |= NETRXF_MORE_DATA
        if n == 0 and info.is_gso:
            flags |= NETRXF_EXTRA_INFO
        out.append(RX_RSP.pack(ident, 0, flags, length))
        if n == 0 and info.is_gso:
            next(it)
            out.append(encode_extra(GsoExtra(info.gso_size, info.gso_type), slot_size=8))
    return out


class RxFrame(NamedTuple):
    """A frame reassembled from RX responses: ``frags`` are ``(slot_index, offset, len)``
    (``slot_index`` counts from the first response of the frame); ``error`` as in
    [`TxPacket`][]."""

    frags: tuple[tuple[int, int, int], ...]
    info: FrameInfo
    nslots: int
    error: str | None = None

    @property
    def size(self) -> int:
        return sum(f[2] for f in self.frags)


def parse_rx(
    raw: bytes | memoryview,
    count: int,
    *,
    max_slots: int = XEN_NETIF_NR_SLOTS_MIN + MAX_EXTRA_SLOTS,
) -> tuple[RxFrame | None, int]:
    """Parse the frame whose first response is the first of ``count`` 8-byte slots.

    ``(None, 0)`` if the frame continues past the available responses (and is within
    ``max_slots``); otherwise ``(frame, slots_used)``.  A bad response (negative status,
    fragment crossing the page, unknown extra) yields a frame with ``error`` set; the
    caller drops it and recycles every slot it used.
    """
    if count <= 0:
        return None, 0
    frags: list[tuple[int, int, int]] = []
    gso: GsoExtra | None = None
    first_flags = -1
    i = 0
    why: str | None = None
    while True:
        if i >= max_slots:
            why = f"RX frame longer than {max_slots} slots"
            break
        if i >= count:
            return None, 0
        _, off, flags, status = RX_RSP.unpack_from(raw, i * RX_SLOT_SIZE)
        idx = i
        i += 1
        if first_flags < 0:
            first_flags = flags
        if status < 0:
            why = f"RX response status {status}"
        elif status == 0 or off + status > PAGE_SIZE:
            why = f"RX fragment offset {off} size {status} outside the page"
        else:
            frags.append((idx, off, status))
        if flags & NETRXF_EXTRA_INFO:
            more = True
            while more:
                if i >= max_slots:
                    why = why or f"RX frame longer than {max_slots} slots"
                    break
                if i >= count:
                    return None, 0
                off = i * RX_SLOT_SIZE
                more = bool(raw[off + 1] & XEN_NETIF_EXTRA_FLAG_MORE)
                i += 1
                try:
                    extra, _ = decode_extra(raw, off)
                except ProtocolError as exc:
                    why = why or str(exc)
                    continue
                if isinstance(extra, GsoExtra):
                    gso = extra
        if not flags & NETRXF_MORE_DATA:
            break
    if why is None and gso is not None and gso.gso_type not in _GSO_TYPES:
        why = f"unknown GSO type {gso.gso_type}"
    info = info_from_rx_flags(first_flags, gso)
    if why is not None:
        return RxFrame((), info, i, why), i
    return RxFrame(tuple(frags), info, i), i


# What both ends of a vif share (neither end imports the other).

PUSH_EVERY = 64
"""Slots after which a side publishes (push) without waiting for the end of its batch, so
the peer can work in parallel; notifications still follow the peer's event index."""
# Encoded-slot formats of the two rings (netif decides a slot's type from its neighbours).
TX_REQ_FMT = RawFormat(TX_SLOT_SIZE, name="netif_tx_request")
TX_RSP_FMT = RawFormat(4, name="netif_tx_response", align=2)
RX_REQ_FMT = RawFormat(RX_SLOT_SIZE, name="netif_rx_request")
RX_RSP_FMT = RawFormat(RX_SLOT_SIZE, name="netif_rx_response", align=2)


@dataclass
class NetStats:
    """Counters of one vif end (both netfront and netback keep them)."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    notifies: int = 0
    events: int = 0


__all__ = [
    "EXTRA_INFO",
    "MAX_EXTRA_SLOTS",
    "NETIF_EXTRA_INFO",
    "NETIF_RSP_DROPPED",
    "NETIF_RSP_ERROR",
    "NETIF_RSP_NULL",
    "NETIF_RSP_OKAY",
    "NETIF_RX_REQUEST",
    "NETIF_RX_RESPONSE",
    "NETIF_TX_REQUEST",
    "NETIF_TX_RESPONSE",
    "NETRXF_CSUM_BLANK",
    "NETRXF_DATA_VALIDATED",
    "NETRXF_EXTRA_INFO",
    "NETRXF_GSO_PREFIX",
    "NETRXF_MORE_DATA",
    "NETTXF_CSUM_BLANK",
    "NETTXF_DATA_VALIDATED",
    "NETTXF_EXTRA_INFO",
    "NETTXF_MORE_DATA",
    "PAGE_SIZE",
    "PLAIN",
    "PUSH_EVERY",
    "RX_REQ",
    "RX_REQUEST",
    "RX_REQ_FMT",
    "RX_RESPONSE",
    "RX_RSP",
    "RX_RSP_FMT",
    "TX_REQ",
    "TX_REQUEST",
    "TX_REQ_FMT",
    "TX_RESPONSE",
    "TX_RSP",
    "TX_RSP_FMT",
    "XEN_NETIF_EXTRA_FLAG_MORE",
    "XEN_NETIF_EXTRA_TYPE_GSO",
    "XEN_NETIF_EXTRA_TYPE_HASH",
    "XEN_NETIF_EXTRA_TYPE_MAX",
    "XEN_NETIF_EXTRA_TYPE_MCAST_ADD",
    "XEN_NETIF_EXTRA_TYPE_MCAST_DEL",
    "XEN_NETIF_EXTRA_TYPE_NONE",
    "XEN_NETIF_GSO_TYPE_NONE",
    "XEN_NETIF_GSO_TYPE_TCPV4",
    "XEN_NETIF_GSO_TYPE_TCPV6",
    "XEN_NETIF_MAX_TX_SIZE",
    "XEN_NETIF_NR_SLOTS_MIN",
    "Extra",
    "FrameInfo",
    "GsoExtra",
    "HashExtra",
    "McastExtra",
    "NetStats",
    "NetifExtraInfo",
    "NetifRxRequest",
    "NetifRxResponse",
    "NetifTxRequest",
    "NetifTxResponse",
    "RxFrame",
    "TxFrag",
    "TxPacket",
    "build_rx_responses",
    "build_tx",
    "decode_extra",
    "encode_extra",
    "info_from_rx_flags",
    "info_from_tx_flags",
    "parse_rx",
    "parse_tx",
    "plan_rx",
    "rx_slots_needed",
]
