"""The blkif wire codec: request validation, indirect segment pages, xenstore vocabulary.

Theory of operation
-------------------
A blkif ring slot holds one of three request layouts, chosen by ``operation``:

* ``struct blkif_request`` (READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE): up to 11
  *segments* inline.  A segment names one granted 4 KiB page and an inclusive range of
  512-byte sectors inside it (``first_sect..last_sect``, 0..7).
* ``struct blkif_request_discard`` (DISCARD): a sector range, plus a ``secure`` flag.
* ``struct blkif_request_indirect`` (INDIRECT): up to 8 grant refs of *indirect pages*,
  each holding up to 512 eight-byte segment descriptors, and the real operation
  (READ or WRITE) in ``indirect_op``.

Sector numbers on the wire are always 512-byte units, whatever the disk's ``sector-size``;
I/O must still be aligned to ``sector-size``.  Two ABIs exist: ``x86_64-abi`` (also the
layout of ``arm-abi``; ``u64`` aligned to 8) and ``x86_32-abi`` (``u64`` aligned to 4, so
``id`` sits at offset 4 and a request is 108 bytes).  The frontend names its ABI in its
``protocol`` key; [`abi_for_protocol`][] maps that to a slot layout.

The slot layouts ([`BLKIF_REQUEST`][], [`BLKIF_RESPONSE`][] and their ``x86_32``
twins, [`blkif_request_format`][]) are defined here over the ring layer's
[`aioxen.rings.formats`][] machinery; on top of them this module adds what a block
device needs:

* [`check_request`][] turns a decoded slot into a validated [`BlkIO`][] (what the
  backend executes) or raises [`BadRequest`][] carrying the response status and a
  human-readable reason.  Nothing from the slot is trusted: segment counts, sector ranges,
  sector alignment, indirect page counts and feature use are all checked against
  [`Limits`][].
* [`unpack_indirect_segments`][] / [`pack_indirect_segments`][] for indirect pages
  (decoded from a private copy, so the frontend cannot change them under us).
* [`segment_layout`][]: the (first_sect, last_sect) of each page of a contiguous
  transfer, used by the frontend to build requests.

Everything here is pure: no asyncio, no syscalls, no platform imports.
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aioxen.errors import ProtocolError
from aioxen.platforms.base import PAGE_SIZE
from aioxen.rings.formats import (
    FixedFormat,
    GenericCodec,
    RawFormat,
    ReadableBuffer,
    StructFormat,
    WritableBuffer,
)

# --------------------------------------------------------------------------- slot layouts
# io/blkif.h request/response layouts, both ABIs (x86_64 also covers arm).

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 0x1
BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

ABI_X86_64 = "x86_64-abi"
ABI_X86_32 = "x86_32-abi"
BLKIF_ABIS = (ABI_X86_64, ABI_X86_32)


class BlkifSegment(NamedTuple):
    gref: int
    first_sect: int
    last_sect: int


class BlkifRequest(NamedTuple):
    """Read, write, barrier and flush requests (``struct blkif_request``)."""

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    seg: tuple[BlkifSegment, ...] = ()


class BlkifRequestDiscard(NamedTuple):
    operation: int  # BLKIF_OP_DISCARD
    flag: int
    handle: int
    id: int
    sector_number: int
    nr_sectors: int


class BlkifRequestIndirect(NamedTuple):
    operation: int  # BLKIF_OP_INDIRECT
    indirect_op: int
    nr_segments: int
    id: int
    sector_number: int
    handle: int
    indirect_grefs: tuple[int, ...] = ()


BlkifAnyRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect


class BlkifResponse(NamedTuple):
    id: int
    operation: int
    status: int


_SEG = struct.Struct("<IBB2x")
BLKIF_SEGMENT = _SEG
"""``struct blkif_request_segment``: gref u32, first_sect u8, last_sect u8, 2 pad bytes."""


class BlkifRequestFormat(FixedFormat):
    """``struct blkif_request`` and its discard/indirect variants, chosen by ``operation``."""

    def __init__(self, abi: str = ABI_X86_64) -> None:
        if abi not in BLKIF_ABIS:
            raise ValueError(f"unknown blkif ABI {abi!r}; expected one of {BLKIF_ABIS}")
        self.abi = abi
        wide = abi == ABI_X86_64
        # header: operation u8, nr_segments/flag/indirect_op u8, handle/nr_segments u16, id
        self._head = struct.Struct("<BBH4xQQ" if wide else "<BBHQQ")
        self._seg_off = self._head.size  # 24 or 20
        size = self._seg_off + BLKIF_MAX_SEGMENTS_PER_REQUEST * _SEG.size  # 112 / 108
        super().__init__(f"blkif_request({abi})", size, 8 if wide else 4, 64)
        self._id_off = 8 if wide else 4
        self._discard_tail = struct.Struct("<Q")  # nr_sectors, right after the header
        # indirect: handle u16, pad u16, grefs[8] u32 right after sector_number
        self._ind_tail = struct.Struct("<H2x8I")

    @property
    def segments_offset(self) -> int:
        return self._seg_off

    @property
    def id_offset(self) -> int:
        """Byte offset of the 64-bit ``id`` (8 on x86_64, 4 on x86_32)."""
        return self._id_off

    @property
    def header(self) -> struct.Struct:
        """The common header: operation, u8 (nr_segments/flag/indirect_op), u16
        (handle/nr_segments), id, sector_number."""
        return self._head

    def pack_into(self, buf: WritableBuffer, offset: int, value: BlkifAnyRequest) -> None:
        buf[offset : offset + self._size] = bytes(self._size)
        if isinstance(value, BlkifRequestDiscard):
            self._head.pack_into(
                buf, offset, value.operation, value.flag, value.handle, value.id,
                value.sector_number,
            )  # fmt: skip
            self._discard_tail.pack_into(buf, offset + self._head.size, value.nr_sectors)
        elif isinstance(value, BlkifRequestIndirect):
            self._head.pack_into(
                buf, offset, value.operation, value.indirect_op, value.nr_segments, value.id,
                value.sector_number,
            )  # fmt: skip
            grefs = tuple(value.indirect_grefs)
            if len(grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
                raise ValueError(f"at most {BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST} indirect grefs")
            grefs += (0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
            self._ind_tail.pack_into(buf, offset + self._head.size, value.handle, *grefs)
        else:
            if len(value.seg) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                raise ValueError(f"at most {BLKIF_MAX_SEGMENTS_PER_REQUEST} segments")
            self._head.pack_into(
                buf, offset, value.operation, value.nr_segments, value.handle, value.id,
                value.sector_number,
            )  # fmt: skip
            at = offset + self._seg_off
            for s in value.seg:
                _SEG.pack_into(buf, at, s.gref, s.first_sect, s.last_sect)
                at += _SEG.size

    def unpack_from(self, buf: ReadableBuffer, offset: int = 0) -> BlkifAnyRequest:
        op, b1, h16, ident, sector = self._head.unpack_from(buf, offset)
        tail = offset + self._head.size
        if op == BLKIF_OP_DISCARD:
            (nr_sectors,) = self._discard_tail.unpack_from(buf, tail)
            return BlkifRequestDiscard(op, b1, h16, ident, sector, nr_sectors)
        if op == BLKIF_OP_INDIRECT:
            handle, *grefs = self._ind_tail.unpack_from(buf, tail)
            return BlkifRequestIndirect(op, b1, h16, ident, sector, handle, tuple(grefs))
        nseg = min(b1, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        segs = tuple(
            BlkifSegment(*_SEG.unpack_from(buf, offset + self._seg_off + i * _SEG.size))
            for i in range(nseg)
        )
        return BlkifRequest(op, b1, h16, ident, sector, segs)

    def get_id(self, value: BlkifAnyRequest) -> int:
        return value.id

    def with_id(self, value: BlkifAnyRequest, ident: int) -> BlkifAnyRequest:
        return value._replace(id=ident)

    def __repr__(self) -> str:
        return f"<BlkifRequestFormat {self.abi} size={self._size}>"


def blkif_request_format(abi: str = ABI_X86_64) -> BlkifRequestFormat:
    return BlkifRequestFormat(abi)


def blkif_response_format(abi: str = ABI_X86_64) -> StructFormat[BlkifResponse]:
    """``struct blkif_response``: 16 bytes on x86_64 (tail-padded), 12 on x86_32."""
    if abi == ABI_X86_64:
        return StructFormat("blkif_response(x86_64-abi)", "<QBxh", BlkifResponse, size=16, align=8)
    if abi == ABI_X86_32:
        return StructFormat("blkif_response(x86_32-abi)", "<QBxh", BlkifResponse, align=4)
    raise ValueError(f"unknown blkif ABI {abi!r}; expected one of {BLKIF_ABIS}")


BLKIF_REQUEST = BlkifRequestFormat(ABI_X86_64)
BLKIF_RESPONSE = blkif_response_format(ABI_X86_64)
BLKIF_REQUEST_X86_32 = BlkifRequestFormat(ABI_X86_32)
BLKIF_RESPONSE_X86_32 = blkif_response_format(ABI_X86_32)


SECTOR_SHIFT = 9
SECTOR_SIZE = 512
"""Wire sector unit: ``sector_number``, ``first_sect``/``last_sect`` and ``sectors``."""
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE
SEGMENT_SIZE = 8
SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // SEGMENT_SIZE  # 512
MAX_INDIRECT_SEGMENTS = SEGMENTS_PER_INDIRECT_PAGE * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
U64 = (1 << 64) - 1

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

ABI_ARM = "arm-abi"
ABI_NATIVE = "native"  # what some old frontends wrote; treated as this host's (64-bit) ABI

OP_NAMES = {
    BLKIF_OP_READ: "read",
    BLKIF_OP_WRITE: "write",
    BLKIF_OP_WRITE_BARRIER: "write-barrier",
    BLKIF_OP_FLUSH_DISKCACHE: "flush-diskcache",
    BLKIF_OP_RESERVED_1: "reserved-1",
    BLKIF_OP_DISCARD: "discard",
    BLKIF_OP_INDIRECT: "indirect",
}

# xenstore keys (io/blkif.h "XenBus node" documentation)
KEY_SECTORS = "sectors"
KEY_SECTOR_SIZE = "sector-size"
KEY_PHYSICAL_SECTOR_SIZE = "physical-sector-size"
KEY_INFO = "info"
KEY_MODE = "mode"
KEY_FEATURE_FLUSH = "feature-flush-cache"
KEY_FEATURE_BARRIER = "feature-barrier"
KEY_FEATURE_DISCARD = "feature-discard"
KEY_DISCARD_GRANULARITY = "discard-granularity"
KEY_DISCARD_ALIGNMENT = "discard-alignment"
KEY_DISCARD_SECURE = "discard-secure"
KEY_FEATURE_PERSISTENT = "feature-persistent"
KEY_MAX_INDIRECT = "feature-max-indirect-segments"
KEY_MAX_RING_PAGE_ORDER = "max-ring-page-order"
KEY_MAX_QUEUES = "multi-queue-max-queues"
KEY_NUM_QUEUES = "multi-queue-num-queues"
KEY_RING_REF = "ring-ref"
KEY_RING_PAGE_ORDER = "ring-page-order"
KEY_EVENT_CHANNEL = "event-channel"
KEY_PROTOCOL = "protocol"
KEY_VIRTUAL_DEVICE = "virtual-device"
KEY_DEVICE_TYPE = "device-type"


def abi_for_protocol(protocol: str | None) -> str:
    """Map a frontend's ``protocol`` key (absent: ``None``) to a slot layout name.

    ``x86_64-abi``, ``arm-abi``, ``native`` and an absent key use the 64-bit layout;
    ``x86_32-abi`` the 32-bit one.  Anything else is a [`ProtocolError`][].
    """
    if protocol is None or protocol in (ABI_X86_64, ABI_ARM, ABI_NATIVE, ""):
        return ABI_X86_64
    if protocol == ABI_X86_32:
        return ABI_X86_32
    raise ProtocolError(f"unknown blkif protocol {protocol!r}", field=KEY_PROTOCOL)


def request_format(abi: str) -> BlkifRequestFormat:
    """The decoding request format (backend side), with a batch codec that decodes a
    whole batch of slots with C-level ``struct`` calls."""
    return _FORMATS[abi]


def encoded_request_format(abi: str) -> EncodedRequestFormat:
    """The frontend's request format: values are pre-encoded slots (see
    [`RequestEncoder`][]), the ring only splices in the ids."""
    return _ENCODED[abi]


def response_format(abi: str) -> StructFormat[BlkifResponse]:
    return blkif_response_format(abi)


# --------------------------------------------------------------------------- segments

_SEG = BLKIF_SEGMENT


def unpack_indirect_segments(
    page_data: bytes | bytearray | memoryview, count: int
) -> list[BlkifSegment]:
    """Decode ``count`` segment descriptors from the (concatenated) indirect pages.

    The caller passes a private copy (``bytes``) of the indirect pages: a hostile frontend
    may rewrite shared pages at any time, so they are read exactly once.
    """
    if count < 0 or count * SEGMENT_SIZE > len(page_data):
        raise ValueError(f"{count} segments do not fit in {len(page_data)} bytes")
    return list(map(_mkseg, _SEG.iter_unpack(page_data[: count * SEGMENT_SIZE])))


def pack_indirect_segments(buf: memoryview | bytearray, segs: Sequence[BlkifSegment]) -> None:
    """Write segment descriptors at the start of ``buf`` (one or more indirect pages)."""
    if len(segs) * SEGMENT_SIZE > len(buf):
        raise ValueError(f"{len(segs)} segments do not fit in {len(buf)} bytes")
    at = 0
    for s in segs:
        _SEG.pack_into(buf, at, s.gref, s.first_sect, s.last_sect)
        at += SEGMENT_SIZE


def indirect_pages_for(nr_segments: int) -> int:
    """Number of indirect pages that hold ``nr_segments`` descriptors."""
    return (nr_segments + SEGMENTS_PER_INDIRECT_PAGE - 1) // SEGMENTS_PER_INDIRECT_PAGE


def segment_layout(nbytes: int) -> list[tuple[int, int]]:
    """``(first_sect, last_sect)`` for each page of an ``nbytes`` transfer that starts at
    offset 0 of its first page and fills pages in order (``nbytes`` a multiple of 512)."""
    if nbytes <= 0 or nbytes % SECTOR_SIZE:
        raise ValueError(f"transfer of {nbytes} bytes is not a positive multiple of 512")
    full, rest = divmod(nbytes, PAGE_SIZE)
    out = [(0, SECTORS_PER_PAGE - 1)] * full
    if rest:
        out.append((0, rest // SECTOR_SIZE - 1))
    return out


# --------------------------------------------------------------------------- fast codecs

_mkseg = functools.partial(tuple.__new__, BlkifSegment)


class FastRequestFormat(BlkifRequestFormat):
    """[`BlkifRequestFormat`][] plus a batch codec for the backend's hot path."""

    def batch_codec(self, slot: int) -> _DecodeCodec:
        return _DecodeCodec(self, slot)


class _DecodeCodec(GenericCodec[BlkifAnyRequest]):
    """Decode a batch of request slots (a private copy) in few Python steps; encoding is
    the generic per-entry one."""

    def __init__(self, fmt: FastRequestFormat, slot: int) -> None:
        super().__init__(fmt, slot)
        self._fmt = fmt
        self._head = fmt.header
        self._seg_off = fmt.segments_offset

    def unpack(self, data: bytes) -> list[BlkifAnyRequest]:
        out: list[BlkifAnyRequest] = []
        head, slot, so, fmt = self._head, self._slot, self._seg_off, self._fmt
        mk, it = _mkseg, _SEG.iter_unpack
        for off in range(0, len(data), slot):
            op, b1, h16, ident, sector = head.unpack_from(data, off)
            if op <= BLKIF_OP_FLUSH_DISKCACHE:
                n = b1 if b1 <= BLKIF_MAX_SEGMENTS_PER_REQUEST else BLKIF_MAX_SEGMENTS_PER_REQUEST
                segs = tuple(map(mk, it(data[off + so : off + so + 8 * n])))
                out.append(tuple.__new__(BlkifRequest, (op, b1, h16, ident, sector, segs)))
            else:
                out.append(fmt.unpack_from(data, off))
        return out

    def ids(self, values: Sequence[BlkifAnyRequest]) -> list[int]:
        return [v.id for v in values]  # attribute reads, no call per request


class EncodedRequestFormat(RawFormat):
    """Frontend requests as pre-encoded slot bytes (``size`` bytes, id field zero): a
    [`RawFormat`][] with the blkif slot's size, alignment and 64-bit ``id``.

    [`RequestEncoder`][] builds them; the ring only splices in the request id."""

    def __init__(self, abi: str) -> None:
        self.abi = abi
        base = blkif_request_format(abi)
        super().__init__(
            base.size, name=f"blkif_request({abi}, encoded)", align=base.align,
            id_offset=base.id_offset, id_bits=64,
        )  # fmt: skip

    def batch_codec(self, slot: int) -> _EncodedCodec:
        return _EncodedCodec(self, slot)


class _EncodedCodec(GenericCodec[bytes]):
    def __init__(self, fmt: EncodedRequestFormat, slot: int) -> None:
        super().__init__(fmt, slot)
        self._fmt = fmt
        self._pad = bytes(slot - fmt.size)
        self._o = fmt.id_offset

    def pack(self, values: Sequence[bytes]) -> bytes:
        pad = self._pad
        return b"".join([v + pad for v in values]) if pad else b"".join(values)

    def unpack(self, data: bytes) -> list[bytes]:
        n = self._fmt.size
        return [data[off : off + n] for off in range(0, len(data), self._slot)]

    def pack_with_ids(self, values: Sequence[bytes], ids: Sequence[int]) -> bytes:
        o, pad = self._o, self._pad
        if len(values) == 1:
            v = values[0]
            return v[:o] + ids[0].to_bytes(8, "little") + v[o + 8 :] + pad
        return b"".join(
            [v[:o] + i.to_bytes(8, "little") + v[o + 8 :] + pad
             for v, i in zip(values, ids, strict=True)]
        )  # fmt: skip


class RequestEncoder:
    """Encode frontend requests straight to slot bytes (id zero; the ring fills it in)."""

    def __init__(self, abi: str, handle: int) -> None:
        self._fmt = blkif_request_format(abi)
        self._head = self._fmt.header
        self._size = self._fmt.size
        self._handle = handle
        self._pads = [bytes(self._size - self._head.size - 8 * n) for n in range(12)]

    @staticmethod
    def segment(gref: int, first: int, last: int) -> bytes:
        return _SEG.pack(gref, first, last)

    def direct(self, op: int, sector: int, segments: Sequence[bytes]) -> bytes:
        """READ/WRITE/FLUSH/BARRIER with up to 11 pre-encoded 8-byte segments."""
        n = len(segments)
        return self._head.pack(op, n, self._handle, 0, sector) + b"".join(segments) + self._pads[n]

    def encode(self, value: BlkifAnyRequest) -> bytes:
        """Any request record (discard, indirect, ...) as slot bytes."""
        buf = bytearray(self._size)
        self._fmt.pack_into(buf, 0, value)
        return bytes(buf)


_FORMATS = {abi: FastRequestFormat(abi) for abi in (ABI_X86_64, ABI_X86_32)}
_ENCODED = {abi: EncodedRequestFormat(abi) for abi in (ABI_X86_64, ABI_X86_32)}


# --------------------------------------------------------------------------- validation


class BadRequest(Exception):
    """A request the backend must refuse: answer ``status`` and keep serving."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """What the backend advertised; requests are checked against it."""

    sectors: int
    """Capacity in 512-byte units (the ``sectors`` key)."""
    sector_size: int = SECTOR_SIZE
    readonly: bool = False
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    discard_secure: bool = True
    max_indirect_segments: int = 0
    """0: indirect requests not offered (``feature-max-indirect-segments`` absent)."""


@dataclass(slots=True)
class BlkIO:
    """A validated request, ready to run.

    ``kind`` is the effective operation (the ``indirect_op`` of an indirect request);
    ``rsp_operation`` is what the response echoes.  For an indirect request ``segments``
    is empty until [`check_indirect_segments`][] has decoded the indirect pages named by
    ``indirect_grefs``.
    """

    id: int
    kind: int
    rsp_operation: int
    sector: int
    nr_sectors: int = 0
    segments: Sequence[BlkifSegment] = ()
    indirect_grefs: tuple[int, ...] = ()
    nr_indirect_segments: int = 0
    secure: bool = False
    full_grefs: list[int] | None = None
    """Indirect requests of whole-page segments only: their grant refs (else ``None``)."""

    @property
    def writes(self) -> bool:
        """True if running this request changes the disk."""
        return self.kind in (BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_DISCARD) or (
            self.kind == BLKIF_OP_FLUSH_DISKCACHE and bool(self.segments)
        )


def response_operation(req: BlkifAnyRequest) -> int:
    """The ``operation`` a response to ``req`` echoes (Linux echoes ``indirect_op``)."""
    if isinstance(req, BlkifRequestIndirect) and req.indirect_op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        return req.indirect_op
    return req.operation


def _check_segments(segs: Sequence[BlkifSegment], limits: Limits) -> int:
    """Validate segments; return the total number of 512-byte sectors they carry."""
    step = limits.sector_size // SECTOR_SIZE
    total = 0
    for i, s in enumerate(segs):
        first, last = s.first_sect, s.last_sect
        if last >= SECTORS_PER_PAGE or first > last:
            raise BadRequest(
                BLKIF_RSP_ERROR,
                f"segment {i} (gref {s.gref}) covers sectors {first}..{last}, "
                f"outside 0..{SECTORS_PER_PAGE - 1} of its page or reversed",
            )
        if first % step or (last + 1) % step:
            raise BadRequest(
                BLKIF_RSP_ERROR,
                f"segment {i} (gref {s.gref}) sectors {first}..{last} are not aligned to "
                f"the {limits.sector_size}-byte sector size",
            )
        total += last - first + 1
    return total


def _check_range(sector: int, nr_sectors: int, limits: Limits, what: str) -> None:
    step = limits.sector_size // SECTOR_SIZE
    if sector % step:
        raise BadRequest(
            BLKIF_RSP_ERROR,
            f"{what} at sector {sector} is not aligned to the {limits.sector_size}-byte "
            f"sector size",
        )
    if sector > limits.sectors or nr_sectors > limits.sectors - sector:
        raise BadRequest(
            BLKIF_RSP_ERROR,
            f"{what} of {nr_sectors} sectors at sector {sector} runs past the end of the "
            f"disk ({limits.sectors} sectors)",
        )


def check_request(req: BlkifAnyRequest, limits: Limits) -> BlkIO:
    """Validate a decoded request slot against ``limits``.

    Returns a [`BlkIO`][]; raises [`BadRequest`][] (``BLKIF_RSP_ERROR`` for malformed
    or forbidden requests, ``BLKIF_RSP_EOPNOTSUPP`` for operations not offered).  For an
    indirect request, the segment list is checked later by [`check_indirect_segments`][].
    """
    op = req.operation
    rsp_op = response_operation(req)
    name = OP_NAMES.get(op, f"operation {op}")
    if isinstance(req, BlkifRequestDiscard):
        if not limits.discard:
            raise BadRequest(BLKIF_RSP_EOPNOTSUPP, "discard not offered (feature-discard=0)")
        if limits.readonly:
            raise BadRequest(BLKIF_RSP_ERROR, "discard on a read-only disk")
        secure = bool(req.flag & BLKIF_DISCARD_SECURE)
        _check_range(req.sector_number, req.nr_sectors, limits, name)
        step = limits.sector_size // SECTOR_SIZE
        if req.nr_sectors % step:
            raise BadRequest(
                BLKIF_RSP_ERROR,
                f"discard of {req.nr_sectors} sectors is not a multiple of the "
                f"{limits.sector_size}-byte sector size",
            )
        return BlkIO(
            req.id, op, rsp_op, req.sector_number, req.nr_sectors,
            secure=secure and limits.discard_secure,
        )  # fmt: skip
    if isinstance(req, BlkifRequestIndirect):
        if limits.max_indirect_segments <= 0:
            raise BadRequest(
                BLKIF_RSP_EOPNOTSUPP, "indirect request, but indirect segments not offered"
            )
        iop = req.indirect_op
        if iop not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise BadRequest(
                BLKIF_RSP_ERROR,
                f"indirect request carries {OP_NAMES.get(iop, f'operation {iop}')}; "
                f"only read and write may be indirect",
            )
        n = req.nr_segments
        if n == 0 or n > limits.max_indirect_segments:
            raise BadRequest(
                BLKIF_RSP_ERROR,
                f"indirect request with {n} segments (allowed 1..{limits.max_indirect_segments})",
            )
        if iop == BLKIF_OP_WRITE and limits.readonly:
            raise BadRequest(BLKIF_RSP_ERROR, "write to a read-only disk")
        pages = indirect_pages_for(n)
        _check_range(req.sector_number, 0, limits, "indirect " + OP_NAMES[iop])
        return BlkIO(
            req.id, iop, rsp_op, req.sector_number,
            indirect_grefs=tuple(req.indirect_grefs[:pages]), nr_indirect_segments=n,
        )  # fmt: skip
    assert isinstance(req, BlkifRequest)
    if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
        raise BadRequest(BLKIF_RSP_EOPNOTSUPP, f"unknown or unsupported {name}")
    if op == BLKIF_OP_FLUSH_DISKCACHE and not limits.flush:
        raise BadRequest(BLKIF_RSP_EOPNOTSUPP, "flush not offered (feature-flush-cache=0)")
    if op == BLKIF_OP_WRITE_BARRIER and not limits.barrier:
        raise BadRequest(BLKIF_RSP_EOPNOTSUPP, "barrier not offered (feature-barrier=0)")
    if req.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BadRequest(
            BLKIF_RSP_ERROR,
            f"{name} with {req.nr_segments} segments (at most "
            f"{BLKIF_MAX_SEGMENTS_PER_REQUEST} in a direct request)",
        )
    if req.nr_segments == 0 and op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        raise BadRequest(BLKIF_RSP_ERROR, f"{name} with no segments")
    segs = req.seg[: req.nr_segments]
    if segs and op != BLKIF_OP_READ and limits.readonly:
        raise BadRequest(BLKIF_RSP_ERROR, f"{name} to a read-only disk")
    total = _check_segments(segs, limits)
    if total:  # Linux sends an fsync as a segment-less flush with sector_number 2**64-1
        _check_range(req.sector_number, total, limits, name)
    return BlkIO(req.id, op, rsp_op, req.sector_number, total, segs)


_ZEROS = bytes(MAX_INDIRECT_SEGMENTS)
_SEVENS = bytes([SECTORS_PER_PAGE - 1]) * MAX_INDIRECT_SEGMENTS


def check_indirect_segments(io: BlkIO, data: bytes, limits: Limits) -> None:
    """Decode and validate the segments of ``io`` from a private copy of its indirect
    pages and attach them.  Whole-page segments (the usual case) are recognised from the
    raw bytes and kept as a list of grant refs in [`BlkIO.full_grefs`][]."""
    n = io.nr_indirect_segments
    raw = data[: n * SEGMENT_SIZE]
    if len(raw) != n * SEGMENT_SIZE:
        raise BadRequest(BLKIF_RSP_ERROR, f"indirect pages hold fewer than {n} segments")
    if raw[4::8] == _ZEROS[:n] and raw[5::8] == _SEVENS[:n]:
        total = n * SECTORS_PER_PAGE
        if sys.byteorder == "little":
            io.full_grefs = memoryview(raw).cast("I")[::2].tolist()
        else:
            io.full_grefs = list(struct.unpack(f"<{2 * n}I", raw)[::2])
    else:
        segs = list(map(_mkseg, _SEG.iter_unpack(raw)))
        total = _check_segments(segs, limits)
        io.segments = segs
    _check_range(io.sector, total, limits, "indirect " + OP_NAMES.get(io.kind, "request"))
    io.nr_sectors = total


__all__ = [
    "ABI_ARM",
    "ABI_X86_32",
    "ABI_X86_64",
    "BLKIF_ABIS",
    "BLKIF_DISCARD_SECURE",
    "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
    "BLKIF_MAX_SEGMENTS_PER_REQUEST",
    "BLKIF_OP_DISCARD",
    "BLKIF_OP_FLUSH_DISKCACHE",
    "BLKIF_OP_INDIRECT",
    "BLKIF_OP_READ",
    "BLKIF_OP_RESERVED_1",
    "BLKIF_OP_WRITE",
    "BLKIF_OP_WRITE_BARRIER",
    "BLKIF_REQUEST",
    "BLKIF_REQUEST_X86_32",
    "BLKIF_RESPONSE",
    "BLKIF_RESPONSE_X86_32",
    "BLKIF_RSP_EOPNOTSUPP",
    "BLKIF_RSP_ERROR",
    "BLKIF_RSP_OKAY",
    "BLKIF_SEGMENT",
    "MAX_INDIRECT_SEGMENTS",
    "PAGE_SIZE",
    "SECTORS_PER_PAGE",
    "SECTOR_SIZE",
    "SEGMENTS_PER_INDIRECT_PAGE",
    "VDISK_CDROM",
    "VDISK_READONLY",
    "VDISK_REMOVABLE",
    "BadRequest",
    "BlkIO",
    "BlkifAnyRequest",
    "BlkifRequest",
    "BlkifRequestDiscard",
    "BlkifRequestFormat",
    "BlkifRequestIndirect",
    "BlkifResponse",
    "BlkifSegment",
    "EncodedRequestFormat",
    "FastRequestFormat",
    "Limits",
    "RequestEncoder",
    "abi_for_protocol",
    "blkif_request_format",
    "blkif_response_format",
    "check_indirect_segments",
    "check_request",
    "encoded_request_format",
    "indirect_pages_for",
    "pack_indirect_segments",
    "request_format",
    "response_format",
    "response_operation",
    "segment_layout",
    "unpack_indirect_segments",
]
