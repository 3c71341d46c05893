"""The vbd xenbus handshake: blkback and blkfront connect through XenStore, negotiate
features, do I/O, and close in order, on inheap and unix (real xenstored)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aioxen.blk.back import BackendConfig
from aioxen.blk.front import FrontendConfig
from aioxen.blk.source import MemorySource
from aioxen.blk.vbd import Blkback, open_blkfront, parse_vdev
from aioxen.platform.base import Platform
from aioxen.xenbus.toolstack import add_device

FRONT = 5
DEVID = 51712


@contextlib.asynccontextmanager
async def served(
    back: Platform, source: MemorySource, config: BackendConfig | None = None
) -> AsyncIterator[Blkback]:
    await add_device(
        back.store, "vbd", FRONT, back.domid, DEVID,
        backend_keys={"mode": "r" if source.readonly else "w", "type": "aioxen"},
        frontend_keys={"virtual-device": str(DEVID), "device-type": "disk"},
    )  # fmt: skip
    bk = Blkback(source, FRONT, DEVID, platform=back, config=config)
    task = asyncio.ensure_future(bk.run())
    try:
        yield bk
    finally:
        await bk.close(timeout=5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_handshake_and_io(store_harness: Any) -> None:
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    source = MemorySource(4 << 20)
    async with served(back, source), open_blkfront(DEVID, platform=front, timeout=20) as dev:
        assert dev.size == 4 << 20 and dev.sector_size == 512 and not dev.readonly
        neg = dev.negotiated
        assert neg.indirect and neg.max_segments == 256 and neg.persistent
        assert neg.ring_page_order == 2
        data = os.urandom(1 << 20)
        await dev.write(100, data)
        assert await dev.read(100, 2048) == data
        await dev.flush()
        await dev.discard(100, 8)
        assert await dev.read(100, 8) == bytes(4096)
        assert source.data[100 * 512 + 4096 : 100 * 512 + (1 << 20)] == data[4096:]
        state = await front.store.read(f"/local/domain/{FRONT}/device/vbd/{DEVID}/state")
        assert state == b"4"


async def test_negotiation_limits(store_harness: Any) -> None:
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    source = MemorySource(1 << 20, sector_size=4096, readonly=True)
    bconf = BackendConfig(max_indirect_segments=0, persistent=False, max_ring_page_order=0,
                          max_queues=2, flush=False, barrier=False)  # fmt: skip
    fconf = FrontendConfig(queues=4)
    async with (
        served(back, source, bconf),
        open_blkfront(DEVID, platform=front, config=fconf, timeout=20) as dev,
    ):
        neg = dev.negotiated
        assert (neg.indirect, neg.max_segments, neg.persistent) == (False, 11, False)
        assert (neg.ring_page_order, neg.queues) == (0, 2)
        assert dev.readonly and dev.sector_size == 4096 and not dev.can_flush
        assert not dev.can_discard
        with pytest.raises(PermissionError):
            await dev.write(0, bytes(4096))
        assert await dev.read(0, 256) == bytes(1 << 20)


def test_parse_vdev() -> None:
    assert parse_vdev("xvda") == 51712
    assert parse_vdev("/dev/xvdb") == 51728
    assert parse_vdev("xvda1") == 51713
    assert parse_vdev("xvdq") == (1 << 28) | (16 << 8)
    assert parse_vdev("768") == 768
    with pytest.raises(ValueError):
        parse_vdev("sda")
