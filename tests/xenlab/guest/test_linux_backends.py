"""aioxen's blkfront and netfront against Linux's own ``xen-blkback`` and ``xen-netback``.

The reverse of ``test_domu.py``: here the *backends* are Linux's (kernel modules loaded
into dom0 for this module) and the *frontends* are aioxen's, running in dom0 itself
(front end domain 0, back end domain 0; :mod:`linuxback` explains the set-up).

* Block: a 64 MiB file in dom0's tmpfs behind a loop device is a ``phy`` vbd.  aioxen's
  blkfront connects, reads what dom0 wrote into the file (single sectors, unaligned
  sector runs, multi-segment and indirect requests, many requests in flight), writes
  that dom0 then finds in the file, flushes, discards, and disconnects cleanly.
* Network: Linux netback's ``vif0.N`` is dom0's end of a vif whose front end is aioxen's
  netfront transport.  An ``AF_PACKET`` socket on ``vif0.N`` exchanges frames with the
  transport in both directions (sizes from 60 bytes to the 1514-byte frame of a 1500 MTU,
  and multi-slot 9014-byte frames), every one checked, none lost.  Both senders keep a
  bounded window of frames in flight, so nothing depends on timing.

Each device is created and removed by its test; every test runs on both event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from linuxback import (
    MIB,
    RESULTS,
    SYSFS_BACKEND,
    Counters,
    HangReporter,
    LabError,
    LinuxBackends,
    LoopDisk,
    add_vbd,
    add_vif,
    diagnosis,
    dmesg,
    loaded_modules,
    log,
    remove,
    sh,
    vbd_dirs,
    vif_dirs,
    vif_name,
    wait_for,
    xenstore_ls,
)

from aioxen.blk.front import BlkFront, FrontendConfig
from aioxen.blk.vbd import open_blkfront
from aioxen.net.front import NetfrontTransport, create_frontend
from aioxen.platforms.xen import XenPlatform
from aioxen.xenbus.driver import read_opt
from aioxen.xenbus.state import XenbusState, parse_state

DISK_BYTES = 64 * MIB
SECTOR = 512
PATTERN_AT = 4 * MIB  # dom0 writes a pattern here, blkfront reads it
PATTERN = random.Random(0x1B).randbytes(8 * MIB)
WRITES_AT = 16 * MIB  # blkfront writes here, dom0 reads the file
GUARD = 120.0  # seconds: a hang guard per test (TCG is slow), never a pace
VBD_IDS = itertools.count(51728, 16)  # xvdb, xvdc, ...
VIF_IDS = itertools.count(1)
ETHERTYPE = 0x88B5  # IEEE "local experimental"
PROBE = b"aioxen-probe"
PACKET_OUTGOING = 4
WINDOW = 32  # frames in flight per direction (netback's queue is 32 frames deep)


@pytest.fixture(scope="module")
def linux_backends() -> Iterator[LinuxBackends]:
    # aioxen's INFO log (connects, failed connects) for diagnosis; not DEBUG, whose many
    # records written to the 9p results share slow every test down about tenfold
    logger = logging.getLogger("aioxen")
    handler = logging.FileHandler(RESULTS / "linux-backends-aioxen.log")
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f %(name)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lb = LinuxBackends()
    try:
        lb.load()  # refuses (and touches nothing) while other vbd/vif devices exist
        try:
            yield lb
        finally:
            reporter = HangReporter("unloading Linux's backends", after=60)
            try:
                problems = lb.unload()
            finally:
                reporter.close()
        assert not problems, "; ".join(problems)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


@pytest.fixture
async def plat() -> AsyncIterator[XenPlatform]:
    """dom0's ``xen`` platform, closed within a bounded time (a hang fails the test)."""
    p = XenPlatform()
    await p.open()
    try:
        yield p
    finally:
        async with asyncio.timeout(30):
            await p.close()


@pytest.fixture(autouse=True)
async def hang_report(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    reporter = HangReporter(request.node.nodeid)
    log(f"start {request.node.nodeid}")
    try:
        yield
    finally:
        reporter.close()
        log(f"end {request.node.nodeid}; dmesg:\n{dmesg(8)}")


# --------------------------------------------------------------------------- helpers


async def state_of(plat: XenPlatform, path: str) -> XenbusState | None:
    return parse_state(await read_opt(plat.store, f"{path}/state"), f"{path}/state")


async def wait_state(plat: XenPlatform, path: str, *states: XenbusState) -> None:
    """Wait (a hang guard of 30 s) until ``path/state`` is one of ``states``."""
    try:
        async with asyncio.timeout(30), plat.store.watch(f"{path}/state") as w:
            while await state_of(plat, path) not in states:
                await w.next()
    except TimeoutError:
        raise LabError(
            f"{path}/state is {await state_of(plat, path)}, not {states}\n{diagnosis(path)}"
        ) from None


@dataclass
class Vbd:
    devid: int
    disk: LoopDisk
    front: BlkFront
    frontend_dir: str
    backend_dir: str


@contextlib.asynccontextmanager
async def served_vbd(
    plat: XenPlatform, *, mode: str = "w", config: FrontendConfig | None = None
) -> AsyncIterator[Vbd]:
    """A loop-backed vbd served by Linux blkback, with aioxen's blkfront connected."""
    devid = next(VBD_IDS)
    fdir, bdir = vbd_dirs(devid)
    disk = LoopDisk(Path(f"/tmp/aioxen-linuxback-{devid}.img"), DISK_BYTES)
    disk.attach()
    disk.pwrite(PATTERN_AT, PATTERN)
    log(f"vbd {devid}: {disk.device} ({disk.major}:{disk.minor})")
    try:
        await add_vbd(plat.store, devid, disk, mode=mode)
        connected = False
        try:
            async with open_blkfront(
                devid, platform=plat, backend_domid=0, config=config, timeout=60
            ) as front:
                connected = True
                log(f"vbd {devid}: connected {front!r}\n{xenstore_ls(bdir)}")
                yield Vbd(devid, disk, front, fdir, bdir)
        except BaseException as exc:
            if connected or not isinstance(exc, Exception):
                log(f"vbd {devid}: {'connected' if connected else 'connecting'}: {exc!r}"
                    f"\n{diagnosis(fdir, bdir)}")  # fmt: skip
                raise
            msg = f"blkfront did not connect: {exc!r}\n{diagnosis(fdir, bdir)}"
            log(msg)
            raise LabError(msg) from exc
    finally:
        await remove(plat.store, "vbd", devid)
        with contextlib.suppress(LabError):
            await wait_for(lambda: not (SYSFS_BACKEND / f"vbd-0-{devid}").exists(), "vbd gone")
        disk.detach()


def chunks(rng: random.Random, start: int, end: int, n: int, most: int) -> list[tuple[int, int]]:
    """``n`` non-overlapping ``(sector, count)`` runs inside ``[start, end)`` sectors."""
    out: list[tuple[int, int]] = []
    sector = start
    for _ in range(n):
        count = rng.randint(1, most)
        gap = rng.randint(0, 3)
        if sector + gap + count > end:
            break
        out.append((sector + gap, count))
        sector += gap + count
    return out


# --------------------------------------------------------------------------- block


def test_linux_frontends_not_loaded(linux_backends: LinuxBackends) -> None:
    """dom0 runs Linux's backends and none of Linux's frontends: every device here can
    only have been connected by aioxen's blkfront/netfront."""
    mods = loaded_modules()
    assert {"xen_blkback", "xen_netback"} <= mods
    assert not {"xen_blkfront", "xen_netfront"} & mods


async def test_blk_connects_with_linux_geometry(
    plat: XenPlatform, linux_backends: LinuxBackends
) -> None:
    async with asyncio.timeout(GUARD), served_vbd(plat) as v:
        front = v.front
        assert front.size == DISK_BYTES
        assert front.sector_size == SECTOR
        assert not front.readonly
        assert front.can_flush, "Linux blkback over a loop device offers feature-flush-cache"
        # what Linux advertised, and what we made of it
        keys = {
            k: (await read_opt(plat.store, f"{v.backend_dir}/{k}") or b"").decode()
            for k in ("sectors", "sector-size", "feature-persistent",
                      "feature-max-indirect-segments", "max-ring-page-order",
                      "multi-queue-max-queues", "feature-discard")
        }  # fmt: skip
        log(f"blkback keys: {keys}; negotiated {front.negotiated}")
        assert int(keys["sectors"]) == DISK_BYTES // SECTOR
        neg = front.negotiated
        assert neg.indirect and neg.max_segments == min(
            256, int(keys["feature-max-indirect-segments"])
        )
        assert neg.persistent == (keys["feature-persistent"] == "1")
        assert neg.ring_page_order == 2
        assert await state_of(plat, v.backend_dir) == XenbusState.CONNECTED
        assert await state_of(plat, v.frontend_dir) == XenbusState.CONNECTED
        driver = (SYSFS_BACKEND / f"vbd-0-{v.devid}" / "driver").resolve().name
        assert driver == "vbd", f"bound to {driver!r}"


async def test_blk_reads_what_dom0_wrote(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    async with asyncio.timeout(GUARD), served_vbd(plat) as v:
        front = v.front
        base = PATTERN_AT // SECTOR

        def want(sector: int, count: int) -> bytes:
            at = (sector - base) * SECTOR
            return PATTERN[at : at + count * SECTOR]

        # single sectors, sector runs not aligned to pages, up to one direct request
        # (11 segments), indirect requests, and more than one request's worth (split)
        cases = [(base, 1), (base + 1, 1), (base + 3, 7), (base + 7, 9), (base + 5, 88),
                 (base + 8, 88), (base + 1, 96), (base + 16, 2048), (base + 3, 2049),
                 (base + 9, 6144), (base, 16384)]  # fmt: skip
        for sector, count in cases:
            got = await front.read(sector, count)
            assert got == want(sector, count), f"read of {count} sectors at {sector} differs"
        # many reads in flight at once (more than the ring has slots and the pool pages)
        rng = random.Random(7)
        runs = [(rng.randrange(base, base + 16384 - 64), rng.randint(1, 64)) for _ in range(300)]
        results = await asyncio.gather(*(front.read(s, c) for s, c in runs))
        bad = [(s, c) for (s, c), got in zip(runs, results, strict=True) if got != want(s, c)]
        assert not bad, f"{len(bad)} of {len(runs)} concurrent reads differ: {bad[:5]}"
        # dom0 changes the file under a connected disk: blkfront sees the new bytes
        fresh = os.urandom(3 * SECTOR)
        v.disk.pwrite(PATTERN_AT + 11 * SECTOR, fresh)
        assert await front.read(base + 11, 3) == fresh
        assert front.stats.errors == 0


async def test_blk_writes_reach_the_file(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    async with asyncio.timeout(GUARD), served_vbd(plat) as v:
        front = v.front
        rng = random.Random(11)
        start = WRITES_AT // SECTOR
        runs = chunks(rng, start, start + 12 * MIB // SECTOR, 200, 80)
        runs += [(start + 24 * 2048 + 1, 2049)]  # an odd, indirect request at the end
        datas = [rng.randbytes(c * SECTOR) for _, c in runs]
        # all of them in flight together, then a flush
        await asyncio.gather(*(front.write(s, d) for (s, _), d in zip(runs, datas, strict=True)))
        await front.flush()
        for (s, c), d in zip(runs, datas, strict=True):
            assert v.disk.pread(s * SECTOR, c * SECTOR) == d, f"file differs at sector {s}"
        # and they read back through blkfront
        for (s, c), d in list(zip(runs, datas, strict=True))[::17]:
            assert await front.read(s, c) == d
        # a big write (several requests) followed by a flush, then a single sector
        big = rng.randbytes(5 * MIB + SECTOR)
        await front.write(start + 40 * 2048 + 5, big)
        one = rng.randbytes(SECTOR)
        await front.write(DISK_BYTES // SECTOR - 1, one)  # the last sector
        await front.flush()
        assert v.disk.pread((start + 40 * 2048 + 5) * SECTOR, len(big)) == big
        assert v.disk.pread(DISK_BYTES - SECTOR, SECTOR) == one
        assert v.disk.pread(PATTERN_AT, len(PATTERN)) == PATTERN  # untouched
        assert front.stats.errors == 0
        # out of range: refused by blkfront itself, before Linux sees it
        with pytest.raises(ValueError):
            await front.write(DISK_BYTES // SECTOR, one)


async def test_blk_discard(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    async with asyncio.timeout(GUARD), served_vbd(plat) as v:
        front = v.front
        info = front.backend
        log(f"discard: {info.discard} granularity {info.discard_granularity} "
            f"alignment {info.discard_alignment} secure {info.discard_secure}")  # fmt: skip
        assert front.can_discard, "Linux blkback over a loop device on tmpfs offers discard"
        gran = max(info.discard_granularity, SECTOR) // SECTOR
        base = PATTERN_AT // SECTOR
        first = base + 8 * gran
        count = 64 * gran
        await front.discard(first, count)
        await front.flush()
        zeros = bytes(count * SECTOR)
        assert v.disk.pread(first * SECTOR, count * SECTOR) == zeros
        assert await front.read(first, count) == zeros
        # the neighbours are untouched
        at = (first - base) * SECTOR
        assert v.disk.pread(PATTERN_AT, at) == PATTERN[:at]
        end = at + count * SECTOR
        assert v.disk.pread(PATTERN_AT + end, 4 * MIB) == PATTERN[end : end + 4 * MIB]


async def test_blk_readonly(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    async with asyncio.timeout(GUARD), served_vbd(plat, mode="r") as v:
        front = v.front
        assert front.readonly
        assert await front.read(PATTERN_AT // SECTOR, 8) == PATTERN[: 8 * SECTOR]
        with pytest.raises(PermissionError):
            await front.write(0, bytes(SECTOR))


async def test_blk_two_queues(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    """Linux blkback offers one queue per dom0 vCPU; with two, 1 MiB stripes of the disk
    alternate between the rings (``queue-0``/``queue-1`` in XenStore)."""
    async with asyncio.timeout(GUARD), served_vbd(plat, config=FrontendConfig(queues=2)) as v:
        front = v.front
        offered = front.backend.max_queues
        assert front.negotiated.queues == min(2, offered)
        start = WRITES_AT // SECTOR
        data = random.Random(5).randbytes(6 * MIB)
        await front.write(start + 3, data)  # crosses six stripes
        await front.flush()
        assert v.disk.pread((start + 3) * SECTOR, len(data)) == data
        assert await front.read(start + 3, len(data) // SECTOR) == data
        if offered >= 2:
            assert "queue-1" in xenstore_ls(v.frontend_dir)


async def test_blk_clean_disconnect(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    """Closing blkfront takes both ends to Closed; removing the device lets Linux release
    the loop device; nothing of ours stays granted or bound."""
    async with asyncio.timeout(GUARD):
        devid = next(VBD_IDS)
        fdir, bdir = vbd_dirs(devid)
        disk = LoopDisk(Path(f"/tmp/aioxen-linuxback-{devid}.img"), DISK_BYTES)
        disk.attach()
        try:
            await add_vbd(plat.store, devid, disk)
            async with open_blkfront(devid, platform=plat, backend_domid=0, timeout=60) as front:
                await front.write(0, b"\x5a" * SECTOR)
                await front.flush()
                assert plat.leaks(), "a connected blkfront holds grants and a port"
            assert await state_of(plat, fdir) == XenbusState.CLOSED
            await wait_state(plat, bdir, XenbusState.CLOSED)
            assert plat.leaks() == []
            # online=1: Linux keeps the closed device until the toolstack removes it
            assert (SYSFS_BACKEND / f"vbd-0-{devid}").exists()
            assert await remove(plat.store, "vbd", devid), "the backend did not close in order"
            for d in (fdir, bdir):
                assert await read_opt(plat.store, d) is None, f"{d} is still there"
            await wait_for(
                lambda: not (SYSFS_BACKEND / f"vbd-0-{devid}").exists(), "Linux removes vbd"
            )
            sh("losetup", "-d", disk.device)
            await wait_for(lambda: disk.backing_file() is None, "the loop device is free")
            assert disk.pread(0, SECTOR) == b"\x5a" * SECTOR
        finally:
            await remove(plat.store, "vbd", devid)
            disk.detach()


# --------------------------------------------------------------------------- network


class FrontProtocol(asyncio.DatagramProtocol):
    """Collects the test's frames that netfront receives; honours pause_writing."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.probes = 0
        self.arrived = asyncio.Event()
        self.may_write = asyncio.Event()
        self.may_write.set()
        self.lost: BaseException | None = None
        self.closed = False

    def datagram_received(self, data: bytes, addr: object) -> None:
        if data[12:14] != struct.pack(">H", ETHERTYPE):
            return
        if data[14:].startswith(PROBE):
            self.probes += 1
        else:
            self.frames.append(data)
        self.arrived.set()

    def pause_writing(self) -> None:
        self.may_write.clear()

    def resume_writing(self) -> None:
        self.may_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.closed = exc, True
        self.arrived.set()


class PacketSocket:
    """An ``AF_PACKET`` socket on ``ifname`` for the test's EtherType."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 * MIB)  # SO_RCVBUFFORCE
        self.sock.bind((ifname, ETHERTYPE))
        self.sock.setblocking(False)
        self.frames: list[bytes] = []
        self.arrived = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(70000)
            except BlockingIOError:
                break
            if addr[2] != PACKET_OUTGOING and not data[14:].startswith(PROBE):
                self.frames.append(data)
        self.arrived.set()

    async def send(self, frame: bytes) -> None:
        """Send one frame; a full socket or queue (``ENOBUFS``) is waited out."""
        while True:
            try:
                self.sock.send(frame)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


@dataclass
class Vif:
    devid: int
    ifname: str
    transport: NetfrontTransport
    proto: FrontProtocol
    pkt: PacketSocket
    mac: bytes  # netfront's
    vif_mac: bytes  # Linux's vif0.N
    frontend_dir: str
    backend_dir: str


def frame(dst: bytes, src: bytes, seq: int, length: int, rng: random.Random) -> bytes:
    head = dst + src + struct.pack(">HI", ETHERTYPE, seq)
    return head + rng.randbytes(length - len(head))


@contextlib.asynccontextmanager
async def served_vif(plat: XenPlatform) -> AsyncIterator[Vif]:
    """A vif served by Linux netback (``vif0.N`` up, IPv6 off) with aioxen's netfront
    connected and a probe frame seen end to end."""
    devid = next(VIF_IDS)
    fdir, bdir = vif_dirs(devid)
    ifname = vif_name(devid)
    mac = bytes([0x00, 0x16, 0x3E, 0x5A, 0x00, devid])
    pkt: PacketSocket | None = None
    transport: NetfrontTransport | None = None
    try:
        await add_vif(plat.store, devid, ":".join(f"{b:02x}" for b in mac))
        try:
            transport, proto = await create_frontend(
                FrontProtocol, 0, devid, platform=plat, timeout=60
            )
        except Exception as exc:
            raise LabError(f"netfront did not connect: {exc!r}\n{diagnosis(fdir, bdir)}") from exc
        assert isinstance(proto, FrontProtocol)
        await wait_for(lambda: Path(f"/sys/class/net/{ifname}").exists(), f"{ifname}")
        v6 = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
        if v6.exists():
            v6.write_text("1")
        sh("ip", "link", "set", "dev", ifname, "up")
        await wait_state(plat, bdir, XenbusState.CONNECTED)
        vif_mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text()
                                .strip().replace(":", ""))  # fmt: skip
        pkt = PacketSocket(ifname)
        # The qdisc of a freshly up interface drops frames until the kernel's link
        # watch activates it: probe until one frame got through, then start counting.
        probe = frame(mac, vif_mac, 0, 60, random.Random(0))
        probe = probe[:14] + PROBE + probe[14 + len(PROBE) :]
        for _ in range(300):
            await pkt.send(probe)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    while not proto.probes:
                        proto.arrived.clear()
                        await proto.arrived.wait()
            if proto.probes:
                break
        assert proto.probes, f"no probe reached netfront\n{diagnosis(bdir)}"
        log(f"vif {devid}: up after {proto.probes} probes; {transport!r}\n{xenstore_ls(bdir)}")
        yield Vif(devid, ifname, transport, proto, pkt, mac, vif_mac, fdir, bdir)
    finally:
        if pkt is not None:
            pkt.close()
        if transport is not None:
            transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await transport.wait_closed()
        await remove(plat.store, "vif", devid)
        with contextlib.suppress(LabError):
            await wait_for(lambda: not Path(f"/sys/class/net/{ifname}").exists(), "vif gone")


def sizes(rng: random.Random, n: int, biggest: int = 1514) -> list[int]:
    fixed = [60, 61, 64, 100, 576, 1000, 1513, biggest]
    return fixed + [rng.choice((rng.randint(60, 200), rng.randint(60, biggest), biggest))
                    for _ in range(n - len(fixed))]  # fmt: skip


async def front_to_linux(v: Vif, frames: list[bytes]) -> None:
    """Send ``frames`` through netfront with at most ``WINDOW`` not yet seen by the
    packet socket, and with the transport's flow control; wait for all of them."""
    got = v.pkt
    start = len(got.frames)
    for i, f in enumerate(frames):
        while i - (len(got.frames) - start) >= WINDOW:
            got.arrived.clear()
            await got.arrived.wait()
        await v.proto.may_write.wait()
        v.transport.sendto(f)
    while len(got.frames) - start < len(frames):
        got.arrived.clear()
        await got.arrived.wait()


async def linux_to_front(v: Vif, frames: list[bytes]) -> None:
    got = v.proto
    start = len(got.frames)
    for i, f in enumerate(frames):
        while i - (len(got.frames) - start) >= WINDOW:
            got.arrived.clear()
            await got.arrived.wait()
            assert not got.closed, f"netfront closed: {got.lost!r}"
        await v.pkt.send(f)
    while len(got.frames) - start < len(frames):
        got.arrived.clear()
        await got.arrived.wait()
        assert not got.closed, f"netfront closed: {got.lost!r}"


async def exchange(v: Vif, count: int, biggest: int, seed: int) -> None:
    rng = random.Random(seed)
    out = [frame(v.vif_mac, v.mac, i, n, rng) for i, n in enumerate(sizes(rng, count, biggest))]
    back = [frame(v.mac, v.vif_mac, i, n, rng) for i, n in enumerate(sizes(rng, count, biggest))]
    before = Counters.of(v.ifname)
    stats = v.transport.get_extra_info("stats")
    try:
        async with asyncio.timeout(GUARD / 2):
            await front_to_linux(v, out)
    except TimeoutError:
        raise LabError(
            f"netfront -> {v.ifname}: {len(v.pkt.frames)} of {len(out)} frames arrived; "
            f"{stats}; counters {before.delta(Counters.of(v.ifname))}\n{diagnosis(v.backend_dir)}"
        ) from None
    assert v.pkt.frames == out, "frames from netfront arrived changed or out of order"
    try:
        async with asyncio.timeout(GUARD / 2):
            await linux_to_front(v, back)
    except TimeoutError:
        raise LabError(
            f"{v.ifname} -> netfront: {len(v.proto.frames)} of {len(back)} frames arrived; "
            f"{stats}; counters {before.delta(Counters.of(v.ifname))}\n{diagnosis(v.backend_dir)}"
        ) from None
    assert v.proto.frames == back, "frames to netfront arrived changed or out of order"
    delta = before.delta(Counters.of(v.ifname))
    log(f"{v.ifname}: counters {delta}; netfront {stats}")
    # vif0.N's rx is what netfront sent, its tx what netfront received
    assert delta["rx_packets"] == len(out) and delta["tx_packets"] >= len(back), delta
    assert not any(delta[k] for k in ("rx_dropped", "tx_dropped", "rx_errors", "tx_errors"))
    assert stats.rx_errors == stats.rx_dropped == stats.tx_errors == 0, stats


async def test_net_connects_to_linux_netback(
    plat: XenPlatform, linux_backends: LinuxBackends
) -> None:
    async with asyncio.timeout(GUARD), served_vif(plat) as v:
        feats = v.transport.get_extra_info("backend_features")
        ffeats = v.transport.get_extra_info("frontend_features")
        log(f"netback features {feats}; ours {ffeats}")
        assert feats.rx_copy and feats.sg, feats
        assert ffeats.sg and ffeats.rx_notify
        assert v.transport.get_extra_info("mac") == v.mac
        assert await state_of(plat, v.backend_dir) == XenbusState.CONNECTED
        driver = (SYSFS_BACKEND / f"vif-0-{v.devid}" / "driver").resolve().name
        assert driver == "vif", f"bound to {driver!r}"
        # Linux's link watch marks the carrier "up" asynchronously (a workqueue, up to ~1 s
        # after netback connects): wait for it, the timeout only a hang guard.
        operstate = Path(f"/sys/class/net/{v.ifname}/operstate")
        await wait_for(lambda: operstate.read_text().strip() == "up", f"{v.ifname} up")


async def test_net_frames_both_ways(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    async with asyncio.timeout(GUARD), served_vif(plat) as v:
        await exchange(v, 300, 1514, seed=v.devid)


async def test_net_multislot_frames(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    """With ``feature-sg`` on both ends, vif0.N takes a 9000-byte MTU and frames span
    three slots in both rings."""
    async with asyncio.timeout(GUARD), served_vif(plat) as v:
        sh("ip", "link", "set", "dev", v.ifname, "mtu", "9000")
        await exchange(v, 40, 9014, seed=100 + v.devid)
        assert max(map(len, v.proto.frames)) == 9014


async def test_net_clean_disconnect(plat: XenPlatform, linux_backends: LinuxBackends) -> None:
    """Closing the transport takes both ends to Closed; removing the device makes Linux
    delete vif0.N; nothing of ours stays granted or bound."""
    async with asyncio.timeout(GUARD):
        devid = next(VIF_IDS)
        fdir, bdir = vif_dirs(devid)
        ifname = vif_name(devid)
        try:
            await add_vif(plat.store, devid, f"00:16:3e:5a:01:{devid:02x}")
            transport, proto = await create_frontend(
                FrontProtocol, 0, devid, platform=plat, timeout=60
            )
            assert isinstance(proto, FrontProtocol)
            await wait_state(plat, bdir, XenbusState.CONNECTED)
            assert Path(f"/sys/class/net/{ifname}").exists()
            assert plat.leaks()
            transport.close()
            await transport.wait_closed()
            assert proto.closed and proto.lost is None
            assert await state_of(plat, fdir) == XenbusState.CLOSED
            await wait_state(plat, bdir, XenbusState.CLOSED)
            assert plat.leaks() == []
            # online=1: Linux keeps the closed device and vif0.N until they are removed
            assert (SYSFS_BACKEND / f"vif-0-{devid}").exists()
            assert Path(f"/sys/class/net/{ifname}").exists()
            assert await remove(plat.store, "vif", devid), "the backend did not close in order"
            for d in (fdir, bdir):
                assert await read_opt(plat.store, d) is None, f"{d} is still there"
            await wait_for(lambda: not Path(f"/sys/class/net/{ifname}").exists(), "vif0.N gone")
            await wait_for(lambda: not (SYSFS_BACKEND / f"vif-0-{devid}").exists(), "vif dev gone")
        finally:
            await remove(plat.store, "vif", devid)
