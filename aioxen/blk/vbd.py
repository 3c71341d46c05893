"""The xenbus side of virtual block devices (``vbd``): blkback and blkfront drivers.

Theory of operation
-------------------
The xenbus framework (`aioxen.xenbus.driver`) runs the handshake — states,
watches, teardown, lost peers, restarts; this module only says what a ``vbd`` publishes
and reads (``io/blkif.h``) and builds the data path:

*Backend* (`BlkbackDriver`).  With ``InitWait`` it advertises what it offers:
``feature-flush-cache``, ``feature-barrier``, ``feature-discard`` (+ ``discard-granularity``,
``discard-alignment``, ``discard-secure``), ``feature-persistent``,
``feature-max-indirect-segments``, ``max-ring-page-order``, ``multi-queue-max-queues`` and
the disk's ``sectors``/``info``/``sector-size``/``physical-sector-size``.  When the front
end is ``Initialised`` it reads ``protocol`` (the ABI), ``feature-persistent``,
``ring-page-order`` and the queues (`peer_queue_dirs`: the
top level, or ``queue-N/`` when there are several), each with ``ring-ref`` or
``ring-refN`` and ``event-channel``; it maps each ring, binds each channel and starts a
`RingServer` per queue (supervised: a ring that fails is a lost
front end), and publishes the disk properties again together with ``Connected``.  Every
value is validated; a bad one fails the connect with a log line naming the key, and the
device stays unconnected.

*Frontend* (`BlkfrontDriver`).  At the backend's ``InitWait`` it reads
``max-ring-page-order``, ``multi-queue-max-queues`` and ``feature-persistent``, creates the
rings and the data pool ([`BlkFront`][aioxen.blk.front.BlkFront]) and publishes the ring keys
(`queue_keys`) with ``protocol=x86_64-abi`` and
``feature-persistent``.  When the backend is ``Connected`` it reads the disk properties
and data-path features and configures the device.  A ring that shuts down under it (the
backend died or broke the protocol) is a lost backend.

[`Blkback`][] and [`open_blkfront`][] run the drivers in a
`DeviceRunner` for applications and the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from aioxen.platforms.base import Platform
from aioxen.rings.aio import AsyncBackRing
from aioxen.xenbus.claim import Claim, holder_alive, read_holder
from aioxen.xenbus.driver import (
    BackendDriver,
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    backend_device,
    feature,
    frontend_device,
    frontend_dir,
    read_int,
    read_opt,
)
from aioxen.xenbus.multiqueue import STALE_KEYS, peer_queue_dirs, queue_keys
from aioxen.xenbus.state import parse_state

log = logging.getLogger("aioxen.blk.vbd")

TYPE = "vbd"
DEFAULT_DEVID = 51712  # xvda


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
class AdvertisedQueue:
    """One blkfront queue as the frontend advertised it in XenStore: its ring refs and
    event channel port (a record, not a data path)."""

    refs: list[int]
    port: int


@dataclass
class FrontendKeys:
    abi: str
    persistent: bool
    queues: list[AdvertisedQueue]


async def _required_int(dev: XenbusDevice, key: str) -> int:
    """A frontend key that must be present, in ``1 .. 2**32 - 1``."""
    value = await dev.peer_int(key, 0, 1, 2**32 - 1)
    if value == 0:
        raise ProtocolError(f"{dev.peer_dir}/{key} is missing", field=key)
    return value


async def read_frontend_keys(dev: XenbusDevice, config: BackendConfig) -> FrontendKeys:
    """Read and validate what the frontend published (``ProtocolError`` names the key).

    ``ring-page-order`` is one value for every queue, at the top level (``blkif.h``)."""
    raw = await dev.read_peer(B.KEY_PROTOCOL)
    abi = B.abi_for_protocol(None if raw is None else raw.decode(errors="replace").strip("\0 "))
    persistent = config.persistent and feature(await dev.read_peer(B.KEY_FEATURE_PERSISTENT))
    order = await dev.peer_int(B.KEY_RING_PAGE_ORDER, 0, 0, config.max_ring_page_order)
    queues = []
    for prefix in await peer_queue_dirs(dev, config.max_queues):
        if order == 0 and await dev.read_peer(prefix + B.KEY_RING_REF) is not None:
            names = [prefix + B.KEY_RING_REF]
        else:
            names = [f"{prefix}{B.KEY_RING_REF}{i}" for i in range(1 << order)]
        refs = [await _required_int(dev, name) for name in names]
        port = await _required_int(dev, prefix + B.KEY_EVENT_CHANNEL)
        queues.append(AdvertisedQueue(refs, port))
    return FrontendKeys(abi, persistent, queues)


class BlkbackDriver(BackendDriver):
    """Serve a [`BlockSource`][] to one frontend."""

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

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        keys = await read_frontend_keys(dev, self.config)
        limits = limits_for(self.source, self.config)
        platform = dev.platform
        for i, q in enumerate(keys.queues):  # on failure the runner calls disconnect()
            name = f"blkback dom{dev.peer_domid}/{dev.devid}/q{i}"
            ring: AsyncBackRing[Any, Any] = await AsyncBackRing.attach(
                platform, dev.peer_domid, q.refs, q.port,
                B.request_format(keys.abi), B.response_format(keys.abi), name=name,
                busy_poll=0,  # its answers wait for I/O threads: polling would race them
            )  # fmt: skip
            self._rings.append(ring)
            self.servers.append(RingServer(
                platform, dev.peer_domid, ring, self.source, limits,
                persistent=keys.persistent, queue_depth=self.config.queue_depth,
                max_persistent_grants=self.config.max_persistent_grants, name=name,
            ))  # fmt: skip
        for srv in self.servers:
            task = asyncio.ensure_future(srv.run())
            dev.supervise(task)  # a ring that fails means the frontend is lost
            self._tasks.append(task)
        self.connections += 1
        log.info(
            "blkback %s: connected to domain %d (%s, %d queue(s), persistent=%s)",
            dev.own_dir, dev.peer_domid, keys.abi, len(keys.queues), keys.persistent,
        )  # fmt: skip
        return backend_keys(self.source, self.config)  # published with Connected

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
    """One served virtual block device: ``await Blkback(...).run()`` until closed.

    The device's back end is claimed (`aioxen.xenbus.claim`) before anything is
    written: if another live process serves it, `run` raises
    [`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] (``EADDRINUSE``) and changes nothing.
    Pass ``claim`` when the caller claimed it already (it then also releases it)."""

    def __init__(
        self,
        source: BlockSource,
        frontend_domid: int,
        devid: int = DEFAULT_DEVID,
        *,
        platform: Platform | None = None,
        config: BackendConfig | None = None,
        close_timeout: float = 5.0,
        claim: Claim | None = None,
    ) -> None:
        self.source = source
        self.close_timeout = close_timeout
        self.claim = claim  # the caller's claim on the device (else run() takes one)
        self.frontend_domid = frontend_domid
        self.devid = devid
        self.platform = platform
        self.driver = BlkbackDriver(source, config)
        self.runner: DeviceRunner | None = None

    async def run(self) -> None:
        import aioxen

        platform = self.platform or aioxen.platform()
        dev = await backend_device(platform, TYPE, self.frontend_domid, self.devid)
        self.runner = DeviceRunner(
            dev, self.driver, close_timeout=self.close_timeout, claim=self.claim
        )
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

    def published_keys(self) -> tuple[str, ...]:
        """What any blkfront may have published (a crashed one left them behind)."""
        return (B.KEY_PROTOCOL, B.KEY_FEATURE_PERSISTENT, B.KEY_RING_PAGE_ORDER,
                f"{B.KEY_RING_REF}*", B.KEY_EVENT_CHANNEL, *STALE_KEYS)  # fmt: skip

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
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
        front.add_shutdown_callback(dev.on_shutdown)  # a ring failing: the backend is lost
        shared = {
            B.KEY_PROTOCOL: front.negotiated.abi,
            B.KEY_FEATURE_PERSISTENT: "1" if self.config.persistent else "0",
        }
        if front.negotiated.ring_page_order:
            shared[B.KEY_RING_PAGE_ORDER] = str(front.negotiated.ring_page_order)
        return queue_keys(front.queue_keys(), shared)

    async def connected(self, dev: XenbusDevice) -> None:
        assert self.device is not None
        info = await read_backend_info(dev)
        if info.sectors == 0:
            raise ProtocolError(f"{dev.peer_dir}/sectors is missing or 0", field="sectors")
        info.max_ring_page_order = self.device.backend.max_ring_page_order
        info.max_queues = self.device.backend.max_queues
        self.device.configure(info)
        log.info("blkfront %s: connected: %r", dev.own_dir, self.device)

    async def disconnect(self, dev: XenbusDevice) -> None:
        device, self.device = self.device, None
        if device is not None:
            await device.close()


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
    [`BlkFront`][aioxen.blk.front.BlkFront]; on exit close the device in order (Closing,
    Closed).  ``TimeoutError`` if the backend does not connect within ``timeout``;
    [`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] (``EADDRINUSE``), with nothing changed, if
    another live process uses the device."""
    import aioxen

    platform = platform or aioxen.platform()
    number = parse_vdev(devid)
    what = f"vbd {devid}" if str(devid) == str(number) else f"vbd {devid} ({number})"
    fdir = frontend_dir(platform.domid, TYPE, number)
    try:
        dev = await frontend_device(
            platform, TYPE, number, backend_domid=backend_domid, timeout=timeout
        )
    except TimeoutError:
        raise TimeoutError(
            f"{what} of domain {platform.domid}: no such device after {timeout:g} s "
            f"(waited for {fdir}/backend and backend-id, which the toolstack or "
            "aioxen blkback writes)"
        ) from None
    driver = BlkfrontDriver(config)
    async with DeviceRunner(dev, driver, reconnect=False) as runner:
        try:
            await runner.wait_connected(timeout)
        except TimeoutError:
            states = await _states(dev)
            raise TimeoutError(
                f"{what} of domain {platform.domid}: backend {dev.peer_dir} (domain "
                f"{dev.peer_domid}) did not connect within {timeout:g} s ({states})"
            ) from None
        if driver.device is None:
            raise ConnectionResetError(f"blkfront {dev.own_dir}: backend lost while connecting")
        yield driver.device


async def _states(dev: XenbusDevice) -> str:
    """``frontend state X, backend state Y`` as XenStore has them now (for messages)."""
    out = []
    for side, d in (("frontend", dev.own_dir), ("backend", dev.peer_dir)):
        try:
            st = parse_state(await read_opt(dev.store, f"{d}/state"), f"{d}/state")
        except (ProtocolError, OSError):
            st = None
        out.append(f"{side} state {'missing' if st is None else st}")
    return ", ".join(out)


async def vbd_info(platform: Platform, devid: int | str = DEFAULT_DEVID) -> dict[str, Any]:
    """What XenStore says about virtual block device ``devid`` of this domain, read
    without changing anything (``aioxen blkfront info``): both ends' states and owners,
    the disk the backend offers and what the frontend negotiated (if it is connected).
    ``FileNotFoundError`` if there is no such device."""
    number = parse_vdev(devid)
    store = platform.store
    fdir = frontend_dir(platform.domid, TYPE, number)
    raw_be = await read_opt(store, f"{fdir}/backend")
    if raw_be is None:
        raise FileNotFoundError(
            f"no vbd {devid} ({number}) in domain {platform.domid}: {fdir}/backend is missing"
        )
    bdir = raw_be.decode(errors="replace").rstrip("\0")
    be = read_int(await read_opt(store, f"{fdir}/backend-id"), f"{fdir}/backend-id", -1,
                  -1, 0x7FEF)  # fmt: skip
    dev = XenbusDevice(platform, "frontend", TYPE, number, fdir, bdir, be)

    async def state(d: str) -> str | None:
        try:
            st = parse_state(await read_opt(store, f"{d}/state"), f"{d}/state")
        except (ProtocolError, PermissionError):
            return "?"
        return None if st is None else str(st)

    async def holder(d: str) -> dict[str, Any] | None:
        rec = await read_holder(store, d)
        if rec is None:
            return None
        return {"pid": rec.pid, "cmd": rec.cmd, "alive": holder_alive(rec)}

    async def own_int(key: str, default: int) -> int:
        return read_int(await dev.read(key), f"{fdir}/{key}", default)

    out: dict[str, Any] = {
        "device": number,
        "frontend_path": fdir,
        "backend_path": bdir,
        "backend_domid": be,
        "frontend_state": await state(fdir),
        "backend_state": await state(bdir),
        "frontend_owner": await holder(fdir),
        "backend_owner": await holder(bdir),
    }
    try:
        info = await read_backend_info(dev)
    except (ProtocolError, PermissionError) as exc:
        out["backend_error"] = str(exc)
        return out
    out.update(
        size=info.sectors * 512,
        sector_size=info.sector_size,
        readonly=info.readonly,
        flush=info.flush,
        discard=info.discard,
        backend_persistent=info.persistent,
        backend_max_indirect_segments=info.max_indirect_segments,
        backend_max_ring_page_order=info.max_ring_page_order,
        backend_max_queues=info.max_queues,
    )
    if out["frontend_state"] in ("Initialised", "Connected"):
        out.update(
            queues=await own_int("multi-queue-num-queues", 1),
            ring_page_order=await own_int(B.KEY_RING_PAGE_ORDER, 0),
            persistent=info.persistent and feature(await dev.read(B.KEY_FEATURE_PERSISTENT)),
            protocol=((await dev.read(B.KEY_PROTOCOL)) or b"").decode(errors="replace"),
        )
    return out


__all__ = [
    "DEFAULT_DEVID",
    "TYPE",
    "AdvertisedQueue",
    "Blkback",
    "BlkbackDriver",
    "BlkfrontDriver",
    "FrontendKeys",
    "backend_keys",
    "open_blkfront",
    "parse_vdev",
    "read_backend_info",
    "read_frontend_keys",
    "vbd_info",
]
