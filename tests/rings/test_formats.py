"""Entry formats and their batch codecs: the fast paths agree with the per-entry ones."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen.blk import blkif as B
from aioxen.net import netif as N
from aioxen.rings import formats as F


class Mid(NamedTuple):
    flags: int
    id: int
    tail: int


class Wide(NamedTuple):
    tag: bytes
    id: int


CUSTOM = [
    F.StructFormat("mid", "<B3xIH", Mid, size=12),
    F.StructFormat("big-endian", ">HIQ", Mid, align=8, size=16),
    F.StructFormat("wide", "<4sQ", Wide, align=8),
]


def sample(fmt: Any, i: int) -> Any:
    rec = getattr(fmt, "record", None)
    if fmt is N.NETIF_TX_REQUEST:
        return N.NetifTxRequest(i * 3, i & 0xFFF, 1, 0, i & 0xFFFF)
    if fmt is N.NETIF_RX_REQUEST:
        return N.NetifRxRequest(0, i * 5)
    if fmt is N.NETIF_TX_RESPONSE:
        return N.NetifTxResponse(0, -1)
    if fmt is N.NETIF_RX_RESPONSE:
        return N.NetifRxResponse(0, i & 0xFFF, 4, 1500)
    if rec is B.BlkifResponse:
        return B.BlkifResponse(0, 1, -2)
    if rec is Mid:
        return Mid(i & 0xFF, 0, i & 0xFFFF)
    if rec is Wide:
        return Wide(b"abcd", 0)
    if isinstance(fmt, B.BlkifRequestFormat):
        segs = tuple(B.BlkifSegment(i + k, 0, 7) for k in range(i % 12))
        return B.BlkifRequest(i % 2, len(segs), 7, 0, i * 8, segs)
    raise AssertionError(fmt)


FORMATS = [
    N.NETIF_TX_REQUEST, N.NETIF_RX_REQUEST, N.NETIF_TX_RESPONSE, N.NETIF_RX_RESPONSE,
    B.BLKIF_RESPONSE, B.BLKIF_RESPONSE_X86_32, B.BLKIF_REQUEST, B.BLKIF_REQUEST_X86_32, *CUSTOM,
]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), data=st.data(), pad=st.integers(0, 24))
def test_batch_codec_matches_per_entry_codec(
    fmt: Any, n: int, data: st.DataObject, pad: int
) -> None:
    slot = (fmt.size + pad + fmt.align - 1) // fmt.align * fmt.align
    codec = F.batch_codec(fmt, slot)
    limit = 2**fmt.id_bits - 1
    ids = data.draw(st.lists(st.integers(0, limit), min_size=n, max_size=n))
    values = [sample(fmt, i) for i in range(n)]
    expected = [fmt.with_id(v, i) for v, i in zip(values, ids, strict=True)]
    packed = codec.pack_with_ids(values, ids)
    assert len(packed) == n * slot
    assert codec.unpack(packed) == expected
    assert codec.ids(expected) == ids
    assert codec.pack(expected) == packed
    # slot by slot, the per-entry codec reads the same values
    assert [fmt.unpack_from(packed, k * slot) for k in range(n)] == expected


def test_generic_codec_for_raw_format() -> None:
    raw = F.RawFormat(8, id_offset=2, id_bits=16)
    codec = F.batch_codec(raw, 8)
    values = [bytes([k]) * 8 for k in range(3)]
    packed = codec.pack_with_ids(values, [0x0102, 0x0304, 0xFFFF])
    assert codec.ids(codec.unpack(packed)) == [0x0102, 0x0304, 0xFFFF]
    assert packed[:8] == b"\x00\x00\x02\x01\x00\x00\x00\x00"


def test_slot_too_small_and_bad_id_counts() -> None:
    with pytest.raises(ValueError):
        F.batch_codec(N.NETIF_TX_REQUEST, 8)
    codec = F.batch_codec(N.NETIF_TX_REQUEST, 12)
    with pytest.raises(ValueError):
        codec.pack_with_ids([sample(N.NETIF_TX_REQUEST, 0)], [1, 2])
    with pytest.raises(TypeError):
        F.batch_codec(N.NETIF_EXTRA_INFO, 8).ids([N.NetifExtraInfo(1, 0, bytes(6))])


def test_blkif_variants_round_trip() -> None:
    for abi in B.BLKIF_ABIS:
        fmt = B.blkif_request_format(abi)
        reqs: list[B.BlkifAnyRequest] = [
            B.BlkifRequestDiscard(B.BLKIF_OP_DISCARD, B.BLKIF_DISCARD_SECURE, 3, 2**64 - 1, 8, 64),
            B.BlkifRequestIndirect(B.BLKIF_OP_INDIRECT, B.BLKIF_OP_WRITE, 300, 5, 16, 3,
                                   (11, 12, 13, 0, 0, 0, 0, 0)),
            B.BlkifRequest(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 3, 9, 0, ()),
        ]  # fmt: skip
        buf = bytearray(fmt.size)
        for r in reqs:
            fmt.pack_into(buf, 0, r)
            assert fmt.unpack_from(buf) == r
        # a hostile nr_segments decodes (clamped to 11 segments) instead of raising
        fmt.pack_into(buf, 0, B.BlkifRequest(B.BLKIF_OP_READ, 0, 0, 1, 0, ()))
        buf[1] = 200
        got = fmt.unpack_from(buf)
        assert isinstance(got, B.BlkifRequest) and got.nr_segments == 200 and len(got.seg) == 11


def test_ring_layer_owns_no_device_layouts() -> None:
    """Like io/ring.h vs netif.h/blkif.h: the ring layer is machinery only; the netif and
    blkif slot layouts live in their device packages, which the ring layer never imports."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import aioxen.rings, aioxen.rings.aio, aioxen.rings.byte, aioxen.rings.formats\n"
        "import aioxen.rings.sring, aioxen.rings.stream\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('aioxen.net', 'aioxen.blk')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    device_names = [n for n in vars(F) if n.lower().startswith(("netif", "blkif", "abi_"))]
    assert device_names == []
    assert N.NETIF_TX_REQUEST.size == 12 and B.BLKIF_REQUEST.size == 112
