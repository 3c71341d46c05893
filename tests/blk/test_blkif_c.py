"""Byte-for-byte agreement of the blkif codec with C structs from libxen-dev's blkif.h.

Each request/response variant is written as an initialised C object (distinct values in
every field), compiled with gcc for x86_64 and for i386 (``-m32 -ffreestanding``: compile
only, no 32-bit libc needed), and its bytes are pulled out of the object file with
``objcopy``.  The Python codec must produce the same bytes and decode them back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aioxen.blk import blkif as B

C_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/blkif.h>
#define OBJ(name) __attribute__((section(".ax." #name), used))

OBJ(rw) const struct blkif_request rw = {
    .operation = BLKIF_OP_WRITE, .nr_segments = 3, .handle = 0x1234,
    .id = 0x1122334455667788ULL, .sector_number = 0x0102030405060708ULL,
    .seg = {{0xaabbccdd, 1, 6}, {0x01020304, 0, 7}, {0x7fffffff, 2, 2}},
};
OBJ(full) const struct blkif_request full = {
    .operation = BLKIF_OP_READ, .nr_segments = 11, .handle = 0xffff,
    .id = 0xfedcba9876543210ULL, .sector_number = 0xffffffffffffff00ULL,
    .seg = {{1,0,7},{2,0,7},{3,0,7},{4,0,7},{5,0,7},{6,0,7},{7,0,7},{8,0,7},{9,0,7},
            {10,0,7},{11,3,5}},
};
OBJ(flush) const struct blkif_request flush = {
    .operation = BLKIF_OP_FLUSH_DISKCACHE, .nr_segments = 0, .handle = 7,
    .id = 42, .sector_number = 0,
};
OBJ(disc) const struct blkif_request_discard disc = {
    .operation = BLKIF_OP_DISCARD, .flag = BLKIF_DISCARD_SECURE, .handle = 0x0203,
    .id = 0x8877665544332211ULL, .sector_number = 0x1000, .nr_sectors = 0x123456789aULL,
};
OBJ(ind) const struct blkif_request_indirect ind = {
    .operation = BLKIF_OP_INDIRECT, .indirect_op = BLKIF_OP_READ, .nr_segments = 0x0201,
    .id = 0x0a0b0c0d0e0f1011ULL, .sector_number = 0x2000, .handle = 0xbeef,
    .indirect_grefs = {11, 22, 33, 44, 55, 66, 77, 0x7ffffff0},
};
OBJ(rsp) const struct blkif_response rsp = {
    .id = 0x1020304050607080ULL, .operation = BLKIF_OP_INDIRECT, .status = BLKIF_RSP_EOPNOTSUPP,
};
OBJ(segs) const struct blkif_request_segment segs[3] = {
    {0x11223344, 0, 7}, {0x55667788, 1, 1}, {0x99aabbcc, 4, 7},
};
"""

NAMES = ["rw", "full", "flush", "disc", "ind", "rsp", "segs"]


@pytest.fixture(scope="module", params=[B.ABI_X86_64, B.ABI_X86_32])
def c_objects(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, bytes]]:
    abi = request.param
    tmp = tmp_path_factory.mktemp("blkif")
    src = tmp / "blkif_objs.c"
    src.write_text(C_SOURCE)
    obj = tmp / "blkif_objs.o"
    flags = ["-m32", "-ffreestanding"] if abi == B.ABI_X86_32 else []
    subprocess.run(["gcc", *flags, "-c", "-o", str(obj), str(src)], check=True)
    images: dict[str, bytes] = {}
    for name in NAMES:
        out = tmp / f"{name}.bin"
        subprocess.run(
            ["objcopy", "-O", "binary", f"--only-section=.ax.{name}", str(obj), str(out)],
            check=True,
        )
        images[name] = Path(out).read_bytes()
    return abi, images


def _pack(fmt: B.BlkifRequestFormat, value: B.BlkifAnyRequest) -> bytes:
    buf = bytearray(fmt.size)
    fmt.pack_into(buf, 0, value)
    return bytes(buf)


def test_sizes(c_objects: tuple[str, dict[str, bytes]]) -> None:
    abi, images = c_objects
    fmt = B.request_format(abi)
    assert fmt.size == len(images["rw"]) == (112 if abi == B.ABI_X86_64 else 108)
    assert B.response_format(abi).size == len(images["rsp"]) == (16 if abi == B.ABI_X86_64 else 12)
    assert len(images["ind"]) == 64
    assert len(images["disc"]) == (32 if abi == B.ABI_X86_64 else 28)


def test_direct_requests(c_objects: tuple[str, dict[str, bytes]]) -> None:
    abi, images = c_objects
    fmt = B.request_format(abi)
    rw = B.BlkifRequest(
        B.BLKIF_OP_WRITE, 3, 0x1234, 0x1122334455667788, 0x0102030405060708,
        (B.BlkifSegment(0xAABBCCDD, 1, 6), B.BlkifSegment(0x01020304, 0, 7),
         B.BlkifSegment(0x7FFFFFFF, 2, 2)),
    )  # fmt: skip
    assert _pack(fmt, rw) == images["rw"]
    assert fmt.unpack_from(images["rw"]) == rw
    full = B.BlkifRequest(
        B.BLKIF_OP_READ, 11, 0xFFFF, 0xFEDCBA9876543210, 0xFFFFFFFFFFFFFF00,
        (*(B.BlkifSegment(i, 0, 7) for i in range(1, 11)), B.BlkifSegment(11, 3, 5)),
    )  # fmt: skip
    assert _pack(fmt, full) == images["full"]
    assert fmt.unpack_from(images["full"]) == full
    flush = B.BlkifRequest(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 7, 42, 0, ())
    assert _pack(fmt, flush) == images["flush"]
    assert fmt.unpack_from(images["flush"]) == flush


def test_discard_and_indirect(c_objects: tuple[str, dict[str, bytes]]) -> None:
    abi, images = c_objects
    fmt = B.request_format(abi)
    disc = B.BlkifRequestDiscard(
        B.BLKIF_OP_DISCARD, B.BLKIF_DISCARD_SECURE, 0x0203, 0x8877665544332211, 0x1000,
        0x123456789A,
    )  # fmt: skip
    n = len(images["disc"])
    assert _pack(fmt, disc)[:n] == images["disc"]
    assert fmt.unpack_from(images["disc"] + bytes(fmt.size - n)) == disc
    ind = B.BlkifRequestIndirect(
        B.BLKIF_OP_INDIRECT, B.BLKIF_OP_READ, 0x0201, 0x0A0B0C0D0E0F1011, 0x2000, 0xBEEF,
        (11, 22, 33, 44, 55, 66, 77, 0x7FFFFFF0),
    )  # fmt: skip
    packed = _pack(fmt, ind)
    assert packed[:64] == images["ind"]
    assert not any(packed[64:])
    assert fmt.unpack_from(images["ind"] + bytes(fmt.size - 64)) == ind


def test_response(c_objects: tuple[str, dict[str, bytes]]) -> None:
    abi, images = c_objects
    fmt = B.response_format(abi)
    rsp = B.BlkifResponse(0x1020304050607080, B.BLKIF_OP_INDIRECT, B.BLKIF_RSP_EOPNOTSUPP)
    assert fmt.pack(rsp) == images["rsp"]
    assert fmt.unpack_from(images["rsp"]) == rsp


def test_indirect_segment_page(c_objects: tuple[str, dict[str, bytes]]) -> None:
    _abi, images = c_objects
    segs = [
        B.BlkifSegment(0x11223344, 0, 7),
        B.BlkifSegment(0x55667788, 1, 1),
        B.BlkifSegment(0x99AABBCC, 4, 7),
    ]
    page = bytearray(B.PAGE_SIZE)
    B.pack_indirect_segments(page, segs)
    assert bytes(page[:24]) == images["segs"]
    assert B.unpack_indirect_segments(bytes(page), 3) == segs
