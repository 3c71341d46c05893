"""Random I/O mixes through blkfront -> blkback checked against a reference model.

Hypothesis draws batches of reads, writes, discards and flushes; each batch runs
concurrently (so requests overlap in flight, queue up behind a full ring, get merged and
split), with writes in one batch never overlapping another op of the batch so that the
outcome is defined.  After every batch the reads must match the model and the whole disk
must equal it.  Configurations cover direct-only and indirect requests, persistent grants
on and off, 512- and 4096-byte sectors, one and two queues, a memory source and an image
file, on the inheap and unix platforms.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from blk_helpers import ring_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioxen.blk.back import BackendConfig
from aioxen.blk.front import BlkFront, FrontendConfig
from aioxen.blk.source import BlockSource, FileSource, MemorySource

DISK = 1 << 20


@dataclass
class Case:
    name: str
    sector_size: int
    bconfig: BackendConfig
    fconfig: FrontendConfig
    file: bool = False


CASES = [
    Case(
        "direct-mem",
        512,
        BackendConfig(max_indirect_segments=0, persistent=False, max_ring_page_order=0),
        FrontendConfig(ring_page_order=0, pool_pages=64),
    ),
    Case(
        "indirect-persistent-file",
        512,
        BackendConfig(max_indirect_segments=32, persistent=True, max_ring_page_order=0),
        FrontendConfig(ring_page_order=0, max_indirect_segments=32, pool_pages=128),
        file=True,
    ),
    Case(
        "4k-multiqueue-mem",
        4096,
        BackendConfig(max_indirect_segments=256, persistent=True, max_queues=2),
        FrontendConfig(ring_page_order=1, queues=2, pool_pages=512),
    ),
]


@dataclass
class World:
    dev: BlkFront
    model: bytearray
    source: BlockSource
    servers: list[Any]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
async def world(
    request: pytest.FixtureRequest, harness: Any, tmp_path: Path
) -> AsyncIterator[World]:
    case: Case = request.param
    back = await harness.platform(0)
    front = await harness.platform(3)
    source: BlockSource
    if case.file:
        path = tmp_path / "disk.img"
        path.write_bytes(bytes(DISK))
        source = FileSource(path, sector_size=case.sector_size)
    else:
        source = MemorySource(DISK, sector_size=case.sector_size)
    async with ring_pair(
        back, front, source, case.bconfig, case.fconfig, ring_start=2**32 - 7
    ) as p:
        yield World(p.dev, bytearray(DISK), source, p.servers)
    await source.close()


def _op() -> st.SearchStrategy[tuple[Any, ...]]:
    where = st.integers(0, DISK - 1)
    length = st.integers(1, 300 * 512)
    return st.one_of(
        st.tuples(st.just("write"), where, length, st.integers(0, 2**32)),
        st.tuples(st.just("read"), where, length),
        st.tuples(st.just("discard"), where, length),
        st.tuples(st.just("flush")),
    )


def _span(op: tuple[Any, ...], ss: int) -> tuple[int, int]:
    """(first sector, sector count) of an op, clipped to the disk."""
    first = op[1] // ss
    count = max(1, op[2] // ss)
    count = min(count, DISK // ss - first)
    return first, count


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(_op(), min_size=1, max_size=48))
async def test_random_io_matches_model(world: World, batch: list[tuple[Any, ...]]) -> None:
    dev, model = world.dev, world.model
    ss = dev.sector_size
    kept: list[tuple[tuple[Any, ...], int, int]] = []
    for op in batch:
        if op[0] == "flush":
            kept.append((op, 0, 0))
            continue
        first, count = _span(op, ss)
        lo, hi = first * ss, (first + count) * ss
        writes = op[0] != "read"
        clash = any(
            (writes or k[0] != "read") and k[0] != "flush" and lo < khi and klo < hi
            for k, klo, khi in kept
        )
        if not clash:
            kept.append((op, lo, hi))

    async def run(op: tuple[Any, ...], lo: int, hi: int) -> tuple[str, int, bytes | None]:
        kind = op[0]
        if kind == "flush":
            await dev.flush()
            return kind, 0, None
        if kind == "read":
            return kind, lo, await dev.read(lo // ss, (hi - lo) // ss)
        if kind == "write":
            data = random.Random(op[3]).randbytes(hi - lo)
            await dev.write(lo // ss, data)
            return kind, lo, data
        await dev.discard(lo // ss, (hi - lo) // ss)
        return kind, lo, bytes(hi - lo)

    results = await asyncio.gather(*(run(*k) for k in kept))
    for kind, lo, data in results:
        if kind == "read":
            assert data == bytes(model[lo : lo + len(data or b"")]), f"read at {lo} differs"
    for kind, lo, data in results:
        if kind in ("write", "discard") and data is not None:
            model[lo : lo + len(data)] = data
    assert await dev.read(0, DISK // ss) == bytes(model)


async def test_model_cases_exercise_the_engine(world: World) -> None:
    """The configurations really split, queue, merge and go indirect."""
    dev = world.dev
    ss = dev.sector_size
    data = random.Random(1).randbytes(DISK)
    await dev.write(0, data)  # larger than one request: split
    assert await dev.read(0, DISK // ss) == data
    n = DISK // 4096
    chunks = [dev.write(i * 4096 // ss, bytes([i % 251]) * 4096) for i in range(n)]
    await asyncio.gather(*chunks)  # sequential 4 KiB writes: more than the rings hold
    stats = dev.stats
    assert stats.requests > 1
    if dev.negotiated.indirect:
        assert stats.indirect > 0
    assert stats.merged > 0
    expect = b"".join(bytes([i % 251]) * 4096 for i in range(n))
    assert await dev.read(0, DISK // ss) == expect
    if dev.negotiated.persistent:
        # persistent grants: once every pool page was seen, I/O maps nothing new
        maps = [len(srv._maps) for srv in world.servers]
        assert any(srv.stats.mapped_persistent > 0 for srv in world.servers)
        await asyncio.gather(*(dev.write(i * 4096 // ss, bytes(4096)) for i in range(n)))
        assert await dev.read(0, DISK // ss) == bytes(DISK)
        assert [len(srv._maps) for srv in world.servers] == maps
