"""Pure parts of the block stack: request splitting/merging, the page allocator, request
validation, and the block sources (file: holes really punched, IOV_MAX, inline detection)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen.blk import blkif as B
from aioxen.blk.pool import PageAllocator, PagePool
from aioxen.blk.source import FileSource, MemorySource, filesystem_type, preadv_all
from aioxen.blk.split import merge_runs, split

# ---------------------------------------------------------------------------- split


@given(
    sector=st.integers(0, 2**40),
    nsect=st.integers(1, 5000),
    max_segments=st.integers(1, 300),
)
def test_split_covers_the_range_in_order(sector: int, nsect: int, max_segments: int) -> None:
    chunks = split(sector, nsect * 512, max_segments)
    assert chunks[0].sector == sector and chunks[0].offset == 0
    for a, b in itertools.pairwise(chunks):
        assert b.offset == a.offset + a.nbytes
        assert b.sector == a.sector + a.nbytes // 512
        assert a.nbytes == max_segments * 4096  # only the last chunk is short
    assert sum(c.nbytes for c in chunks) == nsect * 512
    assert all(c.npages <= max_segments for c in chunks)


@dataclass
class Item:
    kind: int
    sector: int
    nbytes: int

    @property
    def npages(self) -> int:
        return (self.nbytes + 4095) // 4096


@given(
    items=st.lists(
        st.tuples(st.sampled_from([0, 1, 3]), st.integers(0, 64), st.integers(1, 24)),
        max_size=40,
    ),
    max_segments=st.integers(1, 32),
)
def test_merge_runs_groups_only_contiguous_neighbours(
    items: list[tuple[int, int, int]], max_segments: int
) -> None:
    queue = [Item(k, s, n * 512) for k, s, n in items]
    queue = [q for q in queue if q.npages <= max_segments]
    sizes = merge_runs(queue, max_segments, frozenset({0, 1}))
    assert sum(sizes) == len(queue) and all(n >= 1 for n in sizes)
    at = 0
    for n in sizes:
        group = queue[at : at + n]
        at += n
        assert sum(g.npages for g in group) <= max_segments or n == 1
        for a, b in itertools.pairwise(group):
            assert a.kind == b.kind and a.kind in (0, 1)
            assert a.sector + a.nbytes // 512 == b.sector


def test_segment_layout() -> None:
    assert B.segment_layout(4096) == [(0, 7)]
    assert B.segment_layout(512) == [(0, 0)]
    assert B.segment_layout(4096 + 1024) == [(0, 7), (0, 1)]
    with pytest.raises(ValueError):
        B.segment_layout(100)


# ---------------------------------------------------------------------------- pool


@settings(max_examples=200)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=80))
def test_page_allocator_never_hands_out_a_page_twice(ops: list[tuple[bool, int]]) -> None:
    alloc = PageAllocator(64)
    held: list[list[int]] = []
    rng = random.Random(0)
    for do_alloc, n in ops:
        if do_alloc or not held:
            got = alloc.alloc(n)
            in_use = {p for h in held for p in h}
            if got is None:
                assert n > 64 - len(in_use)
                continue
            assert len(got) == n and not (set(got) & in_use)
            assert all(0 <= p < 64 for p in got)
            held.append(got)
        else:
            alloc.release(held.pop(rng.randrange(len(held))))
        assert alloc.free == 64 - sum(len(h) for h in held)
    for h in held:
        alloc.release(h)
    assert alloc.extents() == [(0, 64)]  # fully coalesced again
    with pytest.raises(ValueError):
        alloc.release([3])  # double free


async def test_page_pool_waits_fifo_and_cancels_cleanly() -> None:
    pool = PagePool(8)
    a = await pool.alloc(6)
    waiter = asyncio.ensure_future(pool.alloc(4))
    second = asyncio.ensure_future(pool.alloc(1))
    await asyncio.sleep(0)
    assert not waiter.done() and not second.done()  # FIFO: 1 page would fit, but waits
    pool.release(a[:3])
    got = await asyncio.wait_for(waiter, 5)
    assert len(got) == 4
    assert len(await asyncio.wait_for(second, 5)) == 1
    blocked = asyncio.ensure_future(pool.alloc(8))
    await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    pool.close(ConnectionResetError("closed"))
    with pytest.raises(ConnectionResetError):
        await pool.alloc(1)


# ---------------------------------------------------------------------------- validation

LIM = B.Limits(sectors=1 << 20, max_indirect_segments=64)


SEG = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255))


@given(
    op=st.integers(0, 255),
    nseg=st.integers(0, 255),
    sector=st.one_of(st.integers(0, 2**21), st.integers(0, 2**64 - 1)),
    data=st.data(),
    readonly=st.booleans(),
    ss=st.sampled_from([512, 4096]),
)
def test_check_request_accepts_only_valid_requests(
    op: int, nseg: int, sector: int, data: st.DataObject, readonly: bool, ss: int
) -> None:
    # as decoded from a slot: min(nr_segments, 11) segments
    n = min(nseg, 11)
    segs = data.draw(st.lists(st.one_of(SEG, st.just((1, 0, 7))), min_size=n, max_size=n))
    lim = B.Limits(sectors=1 << 20, sector_size=ss, readonly=readonly, max_indirect_segments=64)
    req = B.BlkifRequest(op, nseg, 0, 1, sector, tuple(B.BlkifSegment(*s) for s in segs))
    try:
        io = B.check_request(req, lim)
    except B.BadRequest as exc:
        assert exc.status in (B.BLKIF_RSP_ERROR, B.BLKIF_RSP_EOPNOTSUPP)
        return
    assert op in (0, 1, 2, 3) and nseg == len(segs) <= 11
    step = ss // 512
    if io.nr_sectors:  # a segment-less flush/barrier names no range (Linux: 2**64-1)
        assert io.sector + io.nr_sectors <= lim.sectors
        assert io.sector % step == 0
    for s in io.segments:
        assert s.first_sect <= s.last_sect <= 7
        assert s.first_sect % step == 0 and (s.last_sect + 1) % step == 0
    if readonly:
        assert op == 0 or nseg == 0


def test_indirect_segment_checks() -> None:
    io = B.check_request(B.BlkifRequestIndirect(6, 0, 3, 1, 0, 0, (9,)), LIM)
    page = bytearray(4096)
    B.pack_indirect_segments(page, [B.BlkifSegment(i, 0, 7) for i in range(3)])
    B.check_indirect_segments(io, bytes(page), LIM)
    assert io.full_grefs == [0, 1, 2] and io.nr_sectors == 24
    io = B.check_request(B.BlkifRequestIndirect(6, 1, 2, 1, 8, 0, (9,)), LIM)
    B.pack_indirect_segments(page, [B.BlkifSegment(5, 0, 7), B.BlkifSegment(6, 2, 3)])
    B.check_indirect_segments(io, bytes(page), LIM)
    assert io.full_grefs is None and io.nr_sectors == 10
    io = B.check_request(B.BlkifRequestIndirect(6, 1, 2, 1, (1 << 20) - 8, 0, (9,)), LIM)
    with pytest.raises(B.BadRequest, match="past the end"):
        B.check_indirect_segments(io, bytes(page), LIM)


def test_protocol_names() -> None:
    assert B.abi_for_protocol(None) == B.ABI_X86_64
    assert B.abi_for_protocol("arm-abi") == B.ABI_X86_64
    assert B.abi_for_protocol("x86_32-abi") == B.ABI_X86_32
    with pytest.raises(B.ProtocolError):
        B.abi_for_protocol("sparc-abi")


# ---------------------------------------------------------------------------- sources


async def test_file_source_io_flush_and_punched_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = random.Random(4).randbytes(4 << 20)
    path.write_bytes(data)
    src = FileSource(path, inline=False)
    try:
        assert src.size == 4 << 20 and not src.readonly and src.can_discard
        a, b = bytearray(1000 * 512 - 512), bytearray(512)
        await src.readv(512, [a, b])
        assert bytes(a) + bytes(b) == data[512 : 512 + 1000 * 512]
        await src.writev(4096, [b"x" * 4096, memoryview(b"y" * 512)])
        await src.flush()
        assert path.read_bytes()[4096 : 4096 + 4608] == b"x" * 4096 + b"y" * 512
        blocks = os.stat(path).st_blocks
        await src.discard(1 << 20, 2 << 20)
        assert os.stat(path).st_blocks < blocks  # the range was really deallocated
        assert path.read_bytes()[1 << 20 : 3 << 20] == bytes(2 << 20)
        await src.discard(0, 4096, secure=True)
        assert path.read_bytes()[:4096] == bytes(4096)
    finally:
        await src.close()
    ro = FileSource(path, readonly=True)
    try:
        with pytest.raises(PermissionError):
            await ro.writev(0, [b"z" * 512])
    finally:
        await ro.close()


def test_preadv_all_handles_more_than_iov_max(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = random.Random(5).randbytes(3000 * 512)
    path.write_bytes(data)
    bufs = [bytearray(512) for _ in range(3000)]
    fd = os.open(path, os.O_RDONLY)
    try:
        preadv_all(fd, bufs, 0)
        with pytest.raises(EOFError):
            preadv_all(fd, [bytearray(1024)], len(data) - 512)
    finally:
        os.close(fd)
    assert b"".join(bufs) == data


def test_memory_backed_files_are_served_inline(tmp_path: Path) -> None:
    if os.path.isdir("/dev/shm"):
        assert filesystem_type("/dev/shm") == "tmpfs"
    assert filesystem_type("/proc/self") == "proc"
    mem = MemorySource(8192, sector_size=4096)
    assert mem.readv_nowait(0, [bytearray(4096)])
    with pytest.raises(ValueError):
        MemorySource(1000)


def test_linux_empty_flush_is_accepted() -> None:
    """Linux's xen-blkfront sends an fsync as FLUSH_DISKCACHE with no segments and
    sector_number 2**64-1; refusing it makes Linux turn flushing off for good."""
    lim = B.Limits(sectors=1 << 20, max_indirect_segments=64)
    req = B.BlkifRequest(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 0, 7, 2**64 - 1, ())
    io = B.check_request(req, lim)
    assert io.nr_sectors == 0 and io.id == 7
