"""The xenbus framework end to end on inheap and unix: the toolstack step, a toy "ping"
device (a multi-page async ring) through the handshake, feature negotiation, orderly
teardown from either end and from the toolstack, restarts and lost peers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple

import pytest
from xenbus_world import World, eventually

from aioxen.platforms.base import Platform
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing
from aioxen.rings.formats import StructFormat
from aioxen.xenbus import (
    BackendDriver,
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    XenbusState,
    add_device,
    backend_device,
    frontend_device,
    list_devices,
    remove_device,
)
from aioxen.xenbus.driver import read_int

S = XenbusState
TYPE = "ping"


class Ping(NamedTuple):
    id: int
    value: int


FMT: StructFormat[Ping] = StructFormat("ping", "<IQ", Ping, align=8, size=16)


class PingBack(BackendDriver):
    type = TYPE

    def __init__(self) -> None:
        self.ring: AsyncBackRing[Ping, Ping] | None = None
        self.server: asyncio.Task[None] | None = None
        self.connects = 0
        self.frontend_order = -1

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        return {"feature-double": "1", "max-ring-page-order": "2"}

    async def connect(self, dev: XenbusDevice) -> None:
        order = await dev.peer_int("ring-page-order", 0, 0, 2)
        refs = [
            read_int(await dev.read_peer(f"ring-ref{i}"), f"ring-ref{i}", -1)
            for i in range(1 << order)
        ]
        port = await dev.peer_int("event-channel", 0, 1)
        self.ring = await AsyncBackRing.attach(dev.platform, dev.peer_domid, refs, port, FMT, FMT)
        double = await dev.peer_feature("feature-double")
        self.frontend_order = order
        self.connects += 1
        ring = self.ring

        async def serve() -> None:
            try:
                await ring.serve(lambda r: Ping(r.id, r.value * (2 if double else 1)))
            except ConnectionResetError as exc:
                dev.peer_lost(exc)

        self.server = asyncio.ensure_future(serve())

    async def disconnect(self, dev: XenbusDevice) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.server is not None:
            with contextlib.suppress(BaseException):
                await self.server
            self.server = None


class PingFront(FrontendDriver):
    type = TYPE

    def __init__(self) -> None:
        self.ring: AsyncFrontRing[Ping, Ping] | None = None
        self.up = asyncio.Event()
        self.connections = 0

    def published_keys(self) -> tuple[str, ...]:
        return ("event-channel", "ring-page-order", *(f"ring-ref{i}" for i in range(4)))

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        order = min(2, await dev.peer_int("max-ring-page-order", 0, 0, 16))
        ring = self.ring = await AsyncFrontRing.create(
            dev.platform, dev.peer_domid, FMT, FMT, order=order
        )

        def on_shutdown(exc: BaseException | None) -> None:
            if exc is not None:  # not our own close: the back end went away
                dev.peer_lost(exc)

        ring.add_shutdown_callback(on_shutdown)
        keys = {"event-channel": str(ring.port), "ring-page-order": str(order)}
        keys.update({f"ring-ref{i}": str(r) for i, r in enumerate(ring.refs)})
        if await dev.peer_feature("feature-double"):
            keys["feature-double"] = "1"
        return keys

    async def connected(self, dev: XenbusDevice) -> None:
        self.connections += 1
        self.up.set()

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.up.clear()
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    async def ping(self, value: int) -> int:
        await asyncio.wait_for(self.up.wait(), 20)
        assert self.ring is not None
        return (await self.ring.request(Ping(0, value), timeout=20)).value


class Ends:
    """Runner tasks for one device, stopped at the end of a test."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, runner: DeviceRunner) -> DeviceRunner:
        self.tasks.append(asyncio.ensure_future(runner.run()))
        return runner

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    e = Ends()
    yield e
    await e.stop()


async def setup_device(world: World, devid: int = 0) -> tuple[Platform, Platform, Platform]:
    """dom0 (toolstack), a back end domain and a front end domain with one ping device."""
    tool = await world.platform(0)
    be = await world.platform(world.dom(1))
    fe = await world.platform(world.dom(2))
    await add_device(tool.store, TYPE, fe.domid, be.domid, devid)
    return tool, be, fe


async def start_back(
    ends: Ends, be: Platform, fe_domid: int, devid: int = 0
) -> tuple[DeviceRunner, PingBack]:
    driver = PingBack()
    dev = await backend_device(be, TYPE, fe_domid, devid)
    return ends.start(DeviceRunner(dev, driver)), driver


async def start_front(
    ends: Ends, fe: Platform, be_domid: int, devid: int = 0
) -> tuple[DeviceRunner, PingFront]:
    driver = PingFront()
    dev = await frontend_device(fe, TYPE, devid, backend_domid=be_domid, timeout=10)
    return ends.start(DeviceRunner(dev, driver)), driver


# ------------------------------------------------------------------ toolstack


async def test_toolstack_writes_xl_keys_and_permissions(world: World) -> None:
    tool, be, fe = await setup_device(world, devid=3)
    xs = tool.store
    fdir = f"/local/domain/{fe.domid}/device/{TYPE}/3"
    bdir = f"/local/domain/{be.domid}/backend/{TYPE}/{fe.domid}/3"
    assert await xs.read(f"{fdir}/backend") == bdir.encode()
    assert await xs.read(f"{fdir}/backend-id") == str(be.domid).encode()
    assert await xs.read(f"{fdir}/state") == b"1"
    assert await xs.read(f"{bdir}/frontend") == fdir.encode()
    assert await xs.read(f"{bdir}/frontend-id") == str(fe.domid).encode()
    assert await xs.read(f"{bdir}/online") == b"1"
    assert await xs.read(f"{bdir}/state") == b"1"
    for d, owner, peer in ((fdir, fe.domid, be.domid), (bdir, be.domid, fe.domid)):
        for path in (d, f"{d}/state"):
            perms = [str(p) for p in await xs.get_perms(path)]
            assert perms == [f"n{owner}", f"r{peer}"], (path, perms)
    # each end may read the other's directory but not write it
    assert await fe.store.read(f"{bdir}/online") == b"1"
    with pytest.raises(PermissionError):
        await fe.store.write(f"{bdir}/state", "4")
    with pytest.raises(PermissionError):
        await be.store.write(f"{fdir}/backend-id", "0")
    with pytest.raises(FileExistsError):
        await add_device(xs, TYPE, fe.domid, be.domid, 3)
    (info,) = [d for d in await list_devices(xs, fe.domid) if d.type == TYPE]
    assert (info.devid, info.frontend_domid, info.backend_domid) == (3, fe.domid, be.domid)
    assert info.frontend_state == S.INITIALISING and info.online is True
    assert await list_devices(xs, be.domid) == [info]
    assert not await remove_device(xs, TYPE, fe.domid, be.domid, 3, force=True)
    assert not await xs.exists(fdir) and not await xs.exists(bdir)
    with pytest.raises(FileNotFoundError):
        await remove_device(xs, TYPE, fe.domid, be.domid, 3)


# ------------------------------------------------------------------ handshake


async def test_handshake_features_and_multi_page_ring(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(21) == 42  # feature-double negotiated by both ends
    await frun.wait_state(S.CONNECTED, timeout=10)
    await brun.wait_state(S.CONNECTED, timeout=10)
    assert back.frontend_order == 2 and front.ring is not None and len(front.ring.refs) == 4
    assert await fe.store.read(f"{frun.dev.own_dir}/state") == b"4"


async def test_front_end_may_start_first(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    frun, front = await start_front(ends, fe, be.domid)
    await frun.wait_state(S.INITIALISING, timeout=10)
    await asyncio.sleep(0.05)
    assert frun.dev.state == S.INITIALISING  # waits for the back end's InitWait
    await start_back(ends, be, fe.domid)
    assert await front.ping(5) == 10


# ------------------------------------------------------------------ teardown & reconnect


async def test_orderly_close_from_the_front_and_reconnect(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(1) == 2
    await frun.close(timeout=10)
    assert frun.dev.state == S.CLOSED and front.ring is None
    await brun.wait_state(S.CLOSED, timeout=10)
    assert back.ring is None  # the back end unmapped
    # a new front end (a restarted guest) connects to the same back end
    _frun2, front2 = await start_front(ends, fe, be.domid)
    assert await front2.ping(3) == 6
    assert back.connects == 2


async def test_orderly_close_from_the_back_end(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(1) == 2
    await brun.close(timeout=10)
    assert brun.dev.state == S.CLOSED and back.ring is None
    await frun.wait_state(S.CLOSED, timeout=10)
    assert front.ring is None
    # the back end comes back: the front end (reconnect=True) connects again
    _brun2, _back2 = await start_back(ends, be, fe.domid)
    assert await front.ping(4) == 8
    assert front.connections == 2


async def test_toolstack_removal_closes_both_ends(world: World, ends: Ends) -> None:
    tool, be, fe = await setup_device(world)
    _brun, back = await start_back(ends, be, fe.domid)
    _frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(7) == 14
    assert await remove_device(tool.store, TYPE, fe.domid, be.domid, 0, timeout=10)
    await asyncio.wait_for(asyncio.gather(*ends.tasks, return_exceptions=True), 10)
    assert back.ring is None and front.ring is None
    assert await list_devices(tool.store, fe.domid) == []


async def test_back_end_dies_and_restarts(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(1) == 2
    # The back end's process dies: its ring, channel and mapping vanish, its XenStore
    # connection drops, and nobody updates its state (XenStore still says Connected).
    assert back.ring is not None
    back.ring.close()
    await be.store.close()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(ends.tasks[0], 10)
    assert await _state(fe, brun.dev.own_dir, S.CONNECTED)
    # The front end noticed, reset, and ignores the dead back end's stale "Connected".
    await eventually(lambda: _state(fe, frun.dev.own_dir, S.INITIALISING), "front end reset")
    await asyncio.sleep(0.05)
    assert frun.dev.state == S.INITIALISING and front.ring is None
    be2 = await world.platform(be.domid)
    _brun2, back2 = await start_back(ends, be2, fe.domid)
    assert await front.ping(9) == 18
    assert back2.connects == 1 and front.connections == 2


async def test_front_end_dies_and_a_new_one_connects(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    _frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(1) == 2
    assert front.ring is not None
    front.ring.close()  # the front end's process dies: ring and channel gone...
    await fe.store.close()  # ...and its XenStore connection, without a state update
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(ends.tasks[1], 10)
    await eventually(lambda: _async_true(brun.dev.state == S.INIT_WAIT), "back end reset")
    assert back.ring is None
    fe2 = await world.platform(fe.domid)
    _frun2, front2 = await start_front(ends, fe2, be.domid)
    assert await front2.ping(11) == 22
    assert back.connects == 2


class UnnoticedDeathFront(PingFront):
    """A front end whose process dies as on real Xen: nothing reaches the back end (no
    event, no unmap) -- its ring stays as it was."""

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.up.clear()


async def test_front_end_dies_unnoticed_and_a_new_one_takes_over(world: World, ends: Ends) -> None:
    """The dead front end left its state Connected and the back end, told nothing, is
    still Connected to the dead one's ring.  The new front end must not take that
    Connected for its own session: it waits until the back end, seeing Initialising,
    resets -- then its very first requests are answered (connecting at once, it lost them
    when the back end's reset shut its ring down)."""
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    dead = UnnoticedDeathFront()
    fdev = await frontend_device(fe, TYPE, 0, backend_domid=be.domid, timeout=10)
    ends.start(DeviceRunner(fdev, dead))
    assert await dead.ping(1) == 2
    await fe.store.close()  # the process dies: XenStore connection gone, no state update
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(ends.tasks[1], 10)
    assert brun.dev.state == S.CONNECTED and back.connects == 1  # nobody told it
    # The back end is slow to look (as dom0's is, next to a fast domU): it reacts only
    # once the gate opens, so a front end that trusted the stale Connected would be
    # "connected" by then.
    gate = asyncio.Event()
    real_step = brun._step

    async def slow_step() -> bool:
        await gate.wait()
        return await real_step()

    brun._step = slow_step  # type: ignore[method-assign]
    fe2 = await world.platform(fe.domid)
    frun2, front2 = await start_front(ends, fe2, be.domid)
    await frun2.wait_state(S.INITIALISING, timeout=10)
    await asyncio.sleep(0.2)  # room for a wrong step (the assertions never need it)
    assert frun2.dev.state == S.INITIALISING and front2.connections == 0
    gate.set()
    brun._wakeup.set()
    for i in range(20):  # the very first requests are answered
        assert await front2.ping(i) == 2 * i
    assert back.connects == 2 and front2.connections == 1
    assert dead.ring is not None
    dead.ring.close()


async def test_garbage_from_the_front_end_does_not_break_the_back_end(
    world: World, ends: Ends
) -> None:
    _tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    await brun.wait_state(S.INIT_WAIT, timeout=10)
    fdir = brun.dev.peer_dir
    await fe.store.write(f"{fdir}/state", "banana")
    await fe.store.write(f"{fdir}/ring-ref0", "not-a-number")
    await fe.store.write(f"{fdir}/state", "3")  # Initialised, with a bad ring-ref
    await asyncio.sleep(0.1)
    assert brun.dev.state == S.INIT_WAIT and back.connects == 0
    assert not ends.tasks[0].done()
    # a well-behaved front end still gets through
    _frun, front = await start_front(ends, fe, be.domid)
    assert await front.ping(2) == 4


async def _state(plat: Platform, d: str, *states: XenbusState) -> bool:
    try:
        raw = await plat.store.read(f"{d}/state")
    except FileNotFoundError:
        return False
    return int(raw) in states


async def _async_true(v: bool) -> bool:
    return v
