"""The vbd xenbus handshake: blkback and blkfront connect through XenStore, negotiate
features, do I/O, and close in order, on inheap and unix (real xenstored); the
``blkif.h`` key layout (multi-queue, multi-page rings) both ways, what a hostile
frontend's keys do, a dead backend, and keys a crashed frontend left behind."""

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
from aioxen.blk.vbd import AdvertisedQueue, Blkback, open_blkfront, parse_vdev, read_frontend_keys
from aioxen.errors import ProtocolError
from aioxen.platforms.base import Platform
from aioxen.xenbus import XenbusState, backend_device
from aioxen.xenbus.toolstack import add_device

S = XenbusState

FRONT = 5
DEVID = 51712
FDIR = f"/local/domain/{FRONT}/device/vbd/{DEVID}"


async def create(back: Platform, source: MemorySource, *, replace: bool = False) -> None:
    await add_device(
        back.store, "vbd", FRONT, back.domid, DEVID,
        backend_keys={"mode": "r" if source.readonly else "w", "type": "aioxen"},
        frontend_keys={"virtual-device": str(DEVID), "device-type": "disk"}, replace=replace,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def served(
    back: Platform,
    source: MemorySource,
    config: BackendConfig | None = None,
    *,
    create_device: bool = True,
) -> AsyncIterator[Blkback]:
    if create_device:
        await create(back, source)
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


async def test_multi_queue_multi_page_keys_follow_blkif_h(store_harness: Any) -> None:
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    source = MemorySource(8 << 20)
    bconf = BackendConfig(max_queues=2, max_ring_page_order=2)
    fconf = FrontendConfig(queues=2, ring_page_order=1)
    async with (
        served(back, source, bconf) as bk,
        open_blkfront(DEVID, platform=front, config=fconf, timeout=20) as dev,
    ):
        assert (dev.negotiated.queues, dev.negotiated.ring_page_order) == (2, 1)
        keys = set(await front.store.directory(FDIR))
        assert {"multi-queue-num-queues", "ring-page-order", "protocol", "queue-0",
                "queue-1"} <= keys  # fmt: skip
        assert not {"ring-ref", "ring-ref0", "event-channel"} & keys  # per queue only
        for q in range(2):
            qkeys = set(await front.store.directory(f"{FDIR}/queue-{q}"))
            assert qkeys == {"ring-ref0", "ring-ref1", "event-channel"}, qkeys
        assert await front.store.read(f"{FDIR}/ring-page-order") == b"1"
        assert await front.store.read(f"{FDIR}/multi-queue-num-queues") == b"2"
        data = os.urandom(4 << 20)  # four 1 MiB stripes: both queues
        await dev.write(0, data)
        assert await dev.read(0, len(data) // 512) == data
        assert [srv.stats.requests > 0 for srv in bk.driver.servers] == [True, True]


async def _write_front(front: Platform, keys: dict[str, str]) -> None:
    for k, v in keys.items():
        await front.store.write(f"{FDIR}/{k}", v)


async def test_backend_reads_and_checks_frontend_keys(store_harness: Any) -> None:
    """What Linux's blkfront writes (``blkif.h``), and hostile variants of it."""
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    await create(back, MemorySource(1 << 20))
    dev = await backend_device(back, "vbd", FRONT, DEVID)
    config = BackendConfig(max_queues=2, max_ring_page_order=2)
    two = {"protocol": "x86_32-abi", "feature-persistent": "1", "ring-page-order": "1",
           "multi-queue-num-queues": "2", "queue-0/ring-ref0": "8", "queue-0/ring-ref1": "9",
           "queue-0/event-channel": "5", "queue-1/ring-ref0": "10",
           "queue-1/ring-ref1": "11", "queue-1/event-channel": "6"}  # fmt: skip
    await _write_front(front, two)
    keys = await read_frontend_keys(dev, config)
    assert (keys.abi, keys.persistent) == ("x86_32-abi", True)
    assert keys.queues == [AdvertisedQueue([8, 9], 5), AdvertisedQueue([10, 11], 6)]
    bad = [
        ("queue-1/ring-ref1", None, "queue-1/ring-ref1"),
        ("queue-0/event-channel", None, "queue-0/event-channel"),
        ("queue-0/ring-ref0", "0", "queue-0/ring-ref0"),
        ("queue-0/ring-ref0", "eight", "queue-0/ring-ref0"),
        ("multi-queue-num-queues", "3", "multi-queue-num-queues"),
        ("ring-page-order", "3", "ring-page-order"),
        ("protocol", "pdp11-abi", "protocol"),
    ]
    for key, value, named in bad:
        if value is None:
            await front.store.rm(f"{FDIR}/{key}")
        else:
            await front.store.write(f"{FDIR}/{key}", value)
        with pytest.raises(ProtocolError, match=named.replace("/", ".")):
            await read_frontend_keys(dev, config)
        await _write_front(front, two)
    for key in two:
        with contextlib.suppress(FileNotFoundError):
            await front.store.rm(f"{FDIR}/{key.split('/')[0]}")
    await _write_front(front, {"ring-ref": "12", "event-channel": "7"})  # one page, one queue
    keys = await read_frontend_keys(dev, config)
    assert (keys.abi, keys.persistent) == ("x86_64-abi", False)
    assert keys.queues == [AdvertisedQueue([12], 7)]


async def test_dead_backend_closes_the_frontend(store_harness: Any) -> None:
    """The backend's process dies (its XenStore connection and rings go away, its state
    stays Connected): the frontend fails I/O and publishes Closed, so a restarted backend
    waits for a new frontend instead of mapping the dead session's rings."""
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    source = MemorySource(1 << 20)
    await create(back, source)
    bk = Blkback(source, FRONT, DEVID, platform=back)
    task = asyncio.ensure_future(bk.run())
    async with open_blkfront(DEVID, platform=front, timeout=20) as dev:
        await dev.write(0, b"\xab" * 4096)
        await back.store.close()  # the backend's runner fails and its rings close
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(task, 20)
        async with asyncio.timeout(20):
            while await front.store.read(f"{FDIR}/state") != S.CLOSED.wire.encode():
                await asyncio.sleep(0.01)
        with pytest.raises(ConnectionResetError):
            await dev.read(0, 8)
        back2 = await store_harness.platform(0)  # the backend restarts
        async with served(back2, source, create_device=False) as bk2:
            bdir = f"/local/domain/0/backend/vbd/{FRONT}/{DEVID}"
            async with asyncio.timeout(20):
                while await front.store.read(f"{bdir}/state") != S.INIT_WAIT.wire.encode():
                    await asyncio.sleep(0.01)
            # a new frontend connects; the dead session was never connected to
            async with open_blkfront(DEVID, platform=front, timeout=20) as dev2:
                assert await dev2.read(0, 8) == b"\xab" * 4096
            assert bk2.driver.connections == 1


async def test_keys_a_crashed_frontend_left_are_removed(store_harness: Any) -> None:
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    source = MemorySource(1 << 20)
    await create(back, source)
    await _write_front(front, {"multi-queue-num-queues": "4", "queue-3/ring-ref": "99",
                               "queue-11/event-channel": "5", "ring-ref7": "1",
                               "ring-page-order": "3", "event-channel": "4"})  # fmt: skip
    async with (
        served(back, source, create_device=False),
        open_blkfront(DEVID, platform=front, timeout=20) as dev,
    ):
        await dev.write(8, b"\x01" * 512)
        keys = set(await front.store.directory(FDIR))
        assert not {"multi-queue-num-queues", "queue-3", "queue-11", "ring-ref7"} & keys
        assert await front.store.read(f"{FDIR}/ring-page-order") == b"2"
    assert source.data[8 * 512 : 9 * 512] == b"\x01" * 512


async def test_unusable_backend_is_an_error_naming_the_key(store_harness: Any) -> None:
    """A backend that goes Connected without a disk size: open_blkfront raises the
    ProtocolError (the toolstack plays the backend here)."""
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    await create(back, MemorySource(1 << 20))
    bdir = f"/local/domain/0/backend/vbd/{FRONT}/{DEVID}"
    await back.store.write(f"{bdir}/state", S.CONNECTED.wire)
    with pytest.raises(ProtocolError, match="sectors"):
        async with open_blkfront(DEVID, platform=front, timeout=20):
            pass
    assert await front.store.read(f"{FDIR}/state") == S.CLOSED.wire.encode()


async def test_no_backend_is_a_timeout(store_harness: Any) -> None:
    back = await store_harness.platform(0)
    front = await store_harness.platform(FRONT)
    await create(back, MemorySource(1 << 20))  # the device exists; no blkback serves it
    async with asyncio.timeout(20):  # hang guard (the close needs no acknowledgement)
        with pytest.raises(TimeoutError):
            async with open_blkfront(DEVID, platform=front, timeout=0.2):
                pass
    assert await front.store.read(f"{FDIR}/state") == S.CLOSED.wire.encode()


def test_parse_vdev() -> None:
    assert parse_vdev("xvda") == 51712
    assert parse_vdev("/dev/xvdb") == 51728
    assert parse_vdev("xvda1") == 51713
    assert parse_vdev("xvdq") == (1 << 28) | (16 << 8)
    assert parse_vdev("768") == 768
    with pytest.raises(ValueError):
        parse_vdev("sda")
