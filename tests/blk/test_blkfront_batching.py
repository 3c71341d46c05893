"""blkfront's batched submission (inheap and unix): the direct requests of one loop
iteration go to the ring in one ``submit_many_nowait``; a flush or barrier goes after the
requests issued before it; a close or a ring shutdown before the batch is sent fails its
requests cleanly and returns their pages."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from blk_helpers import ring_pair

from aioxen.blk.back import BackendConfig
from aioxen.blk.front import BlkFront
from aioxen.blk.source import MemorySource
from aioxen.rings.aio import RingShutdown


class SubmitLog:
    """Records how a queue's ring is called (and passes every call through)."""

    def __init__(self, dev: BlkFront) -> None:
        self.calls: list[tuple[str, int]] = []
        ring = dev._queues[0].ring
        many, one = ring.submit_many_nowait, ring.submit

        def submit_many_nowait(reqs: Any) -> Any:
            self.calls.append(("many", len(reqs)))
            return many(reqs)

        async def submit(req: Any) -> Any:
            self.calls.append(("one", 1))
            return await one(req)

        ring.submit_many_nowait = submit_many_nowait  # type: ignore[method-assign]
        ring.submit = submit  # type: ignore[method-assign]


async def test_one_iteration_is_one_batch(harness: Any) -> None:
    back = await harness.platform(0)
    front = await harness.platform(1)
    source = MemorySource(4 << 20)
    async with ring_pair(back, front, source) as pair:
        dev = pair.dev
        log = SubmitLog(dev)
        data = [os.urandom(4096) for _ in range(32)]
        await asyncio.gather(*(dev.write(i * 8, d) for i, d in enumerate(data)))
        assert log.calls == [("many", 32)]
        log.calls.clear()
        got = await asyncio.gather(*(dev.read(i * 8, 8) for i in range(32)))
        assert got == data and log.calls == [("many", 32)]
        assert dev.pool.free == dev.pool.npages and dev.in_flight == 0


async def test_a_barrier_goes_after_the_writes_before_it(harness: Any) -> None:
    back = await harness.platform(0)
    front = await harness.platform(1)
    source = MemorySource(1 << 20)
    config = BackendConfig(flush=False, barrier=True)
    async with ring_pair(back, front, source, config) as pair:
        dev = pair.dev
        log = SubmitLog(dev)
        writes = [asyncio.ensure_future(dev.write(i * 8, b"\x07" * 4096)) for i in range(3)]
        flush = asyncio.ensure_future(dev.flush())
        await asyncio.gather(*writes, flush)
        assert log.calls == [("many", 3), ("one", 1)]
        assert pair.servers[0].stats.ops.get("write-barrier") == 1
        assert source.data[: 3 * 4096] == b"\x07" * (3 * 4096)


@pytest.mark.parametrize("how", ["close", "ring shutdown"])
async def test_requests_not_yet_sent_fail_cleanly(harness: Any, how: str) -> None:
    back = await harness.platform(0)
    front = await harness.platform(1)
    source = MemorySource(1 << 20)
    async with ring_pair(back, front, source) as pair:
        dev = pair.dev
        reads = [asyncio.ensure_future(dev.read(i * 8, 8)) for i in range(5)]
        await asyncio.sleep(0)  # the reads are staged; their batch is not sent yet
        q = dev._queues[0]
        assert len(q.outops) == 5 and q.inflight == 5 and q.ring.in_flight == 0
        if how == "close":
            await dev.close()
        else:
            q.ring.close()
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert all(isinstance(r, ConnectionResetError) for r in results), results
        if how == "ring shutdown":
            assert all(isinstance(r, RingShutdown) for r in results)
        assert q.inflight == 0 and dev.pool.free == dev.pool.npages
