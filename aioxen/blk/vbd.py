"""The xenbus side of virtual block devices (``vbd``): blkback and blkfront drivers.

Theory of operation
-------------------
The generic xenbus machinery (:mod:`aioxen.xenbus.driver`) runs the state machine; this
module supplies the blkif-specific keys (``io/blkif.h``):

*Backend* (:class:`BlkbackDriver`).  With ``InitWait`` it advertises what it offers:
``feature-flush-cache``, ``feature-barrier``, ``feature-discard`` (+ ``discard-granularity``,
``discard-alignment``, ``discard-secure``), ``feature-persistent``,
``feature-max-indirect-segments``, ``max-ring-page-order``, ``multi-queue-max-queues`` and
the disk's ``sectors``/``info``/``sector-size``/``physical-sector-size``.  When the front
end is ``Initialised`` it reads ``protocol`` (the ABI), ``multi-queue-num-queues``,
``feature-persistent`` and per queue (top level, or ``queue-N/`` when there are several)
``ring-ref`` or ``ring-page-order`` + ``ring-refN``, and ``event-channel``; it maps each ring,
binds each channel, starts a :class:`~aioxen.blk.back.RingServer` per queue and rewrites
the disk properties before ``Connected``.  Every value is validated; a bad one fails the
connect with a log line naming the key, and the device stays unconnected.

*Frontend* (:class:`BlkfrontDriver`).  At the backend's ``InitWait`` it reads
``max-ring-page-order`` and ``multi-queue-max-queues``, creates the rings and the data
pool (:class:`~aioxen.blk.front.BlkFront`) and publishes the ring keys with
``protocol=x86_64-abi`` and ``feature-persistent=1``.  When the backend is ``Connected`` it
reads the disk properties and data-path features and configures the device.

:class:`Blkback` and :func:`open_blkfront` wrap the drivers in a
:class:`~aioxen.xenbus.driver.DeviceRunner` for applications and the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aioxen.blk import blkif as B
from aioxen.blk.back import BackendConfig, RingServer, limits_for
from aioxen.blk.front import BackendInfo, BlkFront, FrontendConfig
from aioxen.blk.source import BlockSource
from aioxen.errors import ProtocolError
from aioxen.platform.base import Platform
from aioxen.rings.aio import AsyncBackRing
from aioxen.xenbus.driver import (
    BackendDriver,
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    backend_device,
    feature,
    frontend_device,
)

log = logging.getLogger("aioxen.blk.vbd")

TYPE = "vbd"
DEFAULT_DEVID = 51712  # xvda
MAX_RING_REFS = 16


def parse_vdev(name: str | int) -> int:
    """A virtual device number from ``51712``, ``xvda``, ``/dev/xvdb3``, ``xvdaa``.

    Xen's numbering: ``xvd<disk><part>`` is ``202 << 8 | disk << 4 | part`` for disks
    below 16, else ``1 << 28 | disk << 8 | part``."""
    if isinstance(name, int):
        return name
    text = name.strip()
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"(?:/dev/)?xvd([a-z]+)(\d*)", text)
    if not m:
        raise ValueError(f"{name!r} is not a device number or an xvd name")
    disk = 0
    for ch in m.group(1):
        disk = disk * 26 + (ord(ch) - ord("a") + 1)
    disk -= 1
    part = int(m.group(2) or 0)
    if disk < 16 and part < 16:
        return (202 << 8) | (disk << 4) | part
    if part >= 256:
        raise ValueError(f"{name!r}: partition {part} too large")
    return (1 << 28) | (disk << 8) | part


# --------------------------------------------------------------------------- backend


def backend_keys(source: BlockSource, config: BackendConfig) -> dict[str, str]:
    """The keys a blkback publishes for ``source``."""
    lim = limits_for(source, config)
    keys = {
        B.KEY_SECTORS: str(lim.sectors),
        B.KEY_INFO: str(B.VDISK_READONLY if source.readonly else 0),
        B.KEY_SECTOR_SIZE: str(source.sector_size),
        B.KEY_PHYSICAL_SECTOR_SIZE: str(source.physical_sector_size),
        B.KEY_FEATURE_FLUSH: "1" if config.flush else "0",
        B.KEY_FEATURE_BARRIER: "1" if config.barrier else "0",
        B.KEY_FEATURE_DISCARD: "1" if lim.discard else "0",
        B.KEY_FEATURE_PERSISTENT: "1" if config.persistent else "0",
        B.KEY_MAX_RING_PAGE_ORDER: str(config.max_ring_page_order),
        B.KEY_MAX_QUEUES: str(config.max_queues),
    }
    if lim.discard:
        keys[B.KEY_DISCARD_GRANULARITY] = str(source.physical_sector_size)
        keys[B.KEY_DISCARD_ALIGNMENT] = "0"
        keys[B.KEY_DISCARD_SECURE] = "1" if lim.discard_secure else "0"
    if config.max_indirect_segments:
        keys[B.KEY_MAX_INDIRECT] = str(config.max_indirect_segments)
    return keys


@dataclass
class FrontQueue:
    """One queue as the frontend advertised it."""

    refs: list[int]
    port: int


@dataclass
class FrontendKeys:
    abi: str
    persistent: bool
    queues: list[FrontQueue]


async def read_frontend_keys(dev: XenbusDevice, config: BackendConfig) -> FrontendKeys:
    """Read and validate what the frontend published (``ProtocolError`` names the key)."""
    raw = await dev.read_peer(B.KEY_PROTOCOL)
    abi = B.abi_for_protocol(None if raw is None else raw.decode(errors="replace").strip("\0 "))
    persistent = config.persistent and feature(await dev.read_peer(B.KEY_FEATURE_PERSISTENT))
    nq = await dev.peer_int(B.KEY_NUM_QUEUES, 1, 1, config.max_queues)
    queues = []
    for q in range(nq):
        prefix = "" if nq == 1 else f"queue-{q}/"
        order = await dev.peer_int(prefix + B.KEY_RING_PAGE_ORDER, 0, 0, config.max_ring_page_order)
        if order == 0 and await dev.read_peer(prefix + B.KEY_RING_REF) is not None:
            refs = [await dev.peer_int(prefix + B.KEY_RING_REF, 0, 1, 2**32 - 1)]
        else:
            refs = []
            for i in range(1 << order):
                key = f"{prefix}{B.KEY_RING_REF}{i}"
                if await dev.read_peer(key) is None:
                    raise ProtocolError(f"{dev.peer_dir}/{key} is missing", field=key)
                refs.append(await dev.peer_int(key, 0, 1, 2**32 - 1))
        port = await dev.peer_int(prefix + B.KEY_EVENT_CHANNEL, 0, 1, 2**32 - 1)
        if port == 0:
            raise ProtocolError(
                f"{dev.peer_dir}/{prefix}{B.KEY_EVENT_CHANNEL} is missing",
                field=B.KEY_EVENT_CHANNEL,
            )
        queues.append(FrontQueue(refs, port))
    return FrontendKeys(abi, persistent, queues)


class BlkbackDriver(BackendDriver):
    """Serve a :class:`BlockSource` to one frontend."""

    type = TYPE

    def __init__(self, source: BlockSource, config: BackendConfig | None = None) -> None:
        self.source = source
        self.config = config or BackendConfig()
        self.servers: list[RingServer] = []
        self._rings: list[AsyncBackRing[Any, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.connections = 0

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        return backend_keys(self.source, self.config)

    async def connect(self, dev: XenbusDevice) -> None:
        await self.disconnect(dev)
        keys = await read_frontend_keys(dev, self.config)
        limits = limits_for(self.source, self.config)
        platform = dev.platform
        try:
            for i, q in enumerate(keys.queues):
                ring: AsyncBackRing[Any, Any] = await AsyncBackRing.attach(
                    platform, dev.peer_domid, q.refs, q.port,
                    B.request_format(keys.abi), B.response_format(keys.abi),
                    name=f"blkback dom{dev.peer_domid}/{dev.devid}/q{i}",
                )  # fmt: skip
                self._rings.append(ring)
                srv = RingServer(
                    platform, dev.peer_domid, ring, self.source, limits,
                    persistent=keys.persistent, queue_depth=self.config.queue_depth,
                    max_persistent_grants=self.config.max_persistent_grants,
                    name=f"blkback dom{dev.peer_domid}/{dev.devid}/q{i}",
                )  # fmt: skip
                self.servers.append(srv)
        except BaseException:
            await self.disconnect(dev)
            raise
        for srv in self.servers:
            task = asyncio.ensure_future(srv.run())
            task.add_done_callback(functools.partial(self._server_done, dev))
            self._tasks.append(task)
        await dev.write(backend_keys(self.source, self.config))
        self.connections += 1
        log.info(
            "blkback %s: connected to domain %d (%s, %d queue(s), persistent=%s)",
            dev.own_dir, dev.peer_domid, keys.abi, len(keys.queues), keys.persistent,
        )  # fmt: skip

    def _server_done(self, dev: XenbusDevice, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.info("blkback %s: ring stopped: %s", dev.own_dir, exc)
            dev.peer_lost(exc)

    async def disconnect(self, dev: XenbusDevice) -> None:
        rings, self._rings = self._rings, []
        tasks, self._tasks = self._tasks, []
        self.servers = []
        for ring in rings:
            ring.close()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


class Blkback:
    """One served virtual block device: ``await Blkback(...).run()`` until closed."""

    def __init__(
        self,
        source: BlockSource,
        frontend_domid: int,
        devid: int = DEFAULT_DEVID,
        *,
        platform: Platform | None = None,
        config: BackendConfig | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self.source = source
        self.close_timeout = close_timeout
        self.frontend_domid = frontend_domid
        self.devid = devid
        self.platform = platform
        self.driver = BlkbackDriver(source, config)
        self.runner: DeviceRunner | None = None

    async def run(self) -> None:
        import aioxen

        platform = self.platform or aioxen.platform()
        dev = await backend_device(platform, TYPE, self.frontend_domid, self.devid)
        self.runner = DeviceRunner(dev, self.driver, close_timeout=self.close_timeout)
        await self.runner.run()

    async def close(self, timeout: float | None = 10) -> None:
        """Orderly close (Closing, wait up to ``close_timeout`` for the frontend, Closed);
        returns after at most ``timeout`` seconds either way."""
        if self.runner is not None:
            with contextlib.suppress(TimeoutError):
                await self.runner.close(timeout=timeout)


# --------------------------------------------------------------------------- frontend


async def read_backend_info(dev: XenbusDevice) -> BackendInfo:
    """The backend's disk properties and features (``ProtocolError`` names bad keys)."""
    sectors = await dev.peer_int(B.KEY_SECTORS, 0, 0, 2**64 - 1)
    ss = await dev.peer_int(B.KEY_SECTOR_SIZE, 512, 512, 4096)
    if ss not in (512, 1024, 2048, 4096):
        raise ProtocolError(
            f"{dev.peer_dir}/sector-size {ss} is not supported", field="sector-size"
        )
    mode = await dev.read_peer(B.KEY_MODE)
    return BackendInfo(
        sectors=sectors,
        sector_size=ss,
        physical_sector_size=await dev.peer_int(B.KEY_PHYSICAL_SECTOR_SIZE, ss, 512, 1 << 20),
        info=await dev.peer_int(B.KEY_INFO, 0),
        mode=(mode or b"w").decode(errors="replace").strip("\0 "),
        flush=await dev.peer_feature(B.KEY_FEATURE_FLUSH),
        barrier=await dev.peer_feature(B.KEY_FEATURE_BARRIER),
        discard=await dev.peer_feature(B.KEY_FEATURE_DISCARD),
        discard_secure=await dev.peer_feature(B.KEY_DISCARD_SECURE),
        discard_granularity=await dev.peer_int(B.KEY_DISCARD_GRANULARITY, 0),
        discard_alignment=await dev.peer_int(B.KEY_DISCARD_ALIGNMENT, 0),
        persistent=await dev.peer_feature(B.KEY_FEATURE_PERSISTENT),
        max_indirect_segments=await dev.peer_int(B.KEY_MAX_INDIRECT, 0, 0, 2**31),
        max_ring_page_order=await dev.peer_int(B.KEY_MAX_RING_PAGE_ORDER, 0, 0, 16),
        max_queues=await dev.peer_int(B.KEY_MAX_QUEUES, 1, 1, 1024),
    )


class BlkfrontDriver(FrontendDriver):
    type = TYPE

    def __init__(self, config: FrontendConfig | None = None) -> None:
        self.config = config or FrontendConfig()
        self.device: BlkFront | None = None
        self.ready: asyncio.Future[BlkFront] = asyncio.get_running_loop().create_future()
        self._published: tuple[str, ...] = ()

    def published_keys(self) -> tuple[str, ...]:
        keys = [B.KEY_RING_REF, B.KEY_RING_PAGE_ORDER, B.KEY_EVENT_CHANNEL, B.KEY_PROTOCOL,
                B.KEY_FEATURE_PERSISTENT, B.KEY_NUM_QUEUES]  # fmt: skip
        keys += [f"{B.KEY_RING_REF}{i}" for i in range(MAX_RING_REFS)]
        keys += [f"queue-{q}" for q in range(8)]
        return (*keys, *self._published)

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        await self.disconnect(dev)
        # ring geometry is all a frontend needs before the backend connects
        info = BackendInfo(
            sectors=0,
            max_ring_page_order=await dev.peer_int(B.KEY_MAX_RING_PAGE_ORDER, 0, 0, 16),
            max_queues=await dev.peer_int(B.KEY_MAX_QUEUES, 1, 1, 1024),
            persistent=await dev.peer_feature(B.KEY_FEATURE_PERSISTENT),
        )
        front = await BlkFront.create(
            dev.platform, dev.peer_domid, info, self.config, handle=dev.devid & 0xFFFF,
            name=f"blkfront {dev.own_dir}",
        )  # fmt: skip
        self.device = front
        keys: dict[str, str] = {
            B.KEY_PROTOCOL: front.negotiated.abi,
            B.KEY_FEATURE_PERSISTENT: "1" if self.config.persistent else "0",
        }
        qkeys = front.queue_keys()
        order = front.negotiated.ring_page_order
        if len(qkeys) > 1:
            keys[B.KEY_NUM_QUEUES] = str(len(qkeys))
        for q, k in enumerate(qkeys):
            prefix = "" if len(qkeys) == 1 else f"queue-{q}/"
            if order:
                keys[prefix + B.KEY_RING_PAGE_ORDER] = str(order)
            for name, value in k.items():
                keys[prefix + name] = value
        self._published = tuple(keys)
        return keys

    async def connected(self, dev: XenbusDevice) -> None:
        assert self.device is not None
        info = await read_backend_info(dev)
        if info.sectors == 0:
            raise ProtocolError(f"{dev.peer_dir}/sectors is missing or 0", field="sectors")
        info.max_ring_page_order = self.device.backend.max_ring_page_order
        info.max_queues = self.device.backend.max_queues
        self.device.configure(info)
        log.info("blkfront %s: connected: %r", dev.own_dir, self.device)
        if not self.ready.done():
            self.ready.set_result(self.device)

    async def disconnect(self, dev: XenbusDevice) -> None:
        device, self.device = self.device, None
        if device is not None:
            await device.close()
        if self.ready.done():
            self.ready = asyncio.get_running_loop().create_future()


@contextlib.asynccontextmanager
async def open_blkfront(
    devid: int | str = DEFAULT_DEVID,
    *,
    platform: Platform | None = None,
    config: FrontendConfig | None = None,
    backend_domid: int | None = None,
    timeout: float | None = 30.0,
) -> AsyncIterator[BlkFront]:
    """Connect to virtual block device ``devid`` of this domain and yield it as a
    :class:`~aioxen.blk.front.BlkFront`; on exit close the device in order (Closing,
    Closed).  ``TimeoutError`` if the backend does not connect within ``timeout``."""
    import aioxen

    platform = platform or aioxen.platform()
    number = parse_vdev(devid)
    dev = await frontend_device(
        platform, TYPE, number, backend_domid=backend_domid, timeout=timeout
    )
    driver = BlkfrontDriver(config)
    runner = DeviceRunner(dev, driver, reconnect=False)
    task = asyncio.ensure_future(runner.run())
    try:
        ready = driver.ready
        async with asyncio.timeout(timeout):
            done, _ = await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if ready in done:
            device = ready.result()
        else:
            task.result()
            raise ConnectionResetError(f"blkfront {dev.own_dir}: stopped before connecting")
        yield device
    finally:
        with contextlib.suppress(Exception):
            await runner.close(timeout=10)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await driver.disconnect(dev)


__all__ = [
    "DEFAULT_DEVID",
    "TYPE",
    "Blkback",
    "BlkbackDriver",
    "BlkfrontDriver",
    "backend_keys",
    "open_blkfront",
    "parse_vdev",
    "read_backend_info",
    "read_frontend_keys",
]
