"""Runner hooks for front ends built like Linux netfront (``connect_state = CONNECTED``,
``needs_init_wait``), a lost peer's state written again by a new peer, and a failing
connect retried only when the peer changes; on inheap and unix."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from test_xenbus_driver import (
    FMT,
    TYPE,
    Ends,
    Ping,
    PingBack,
    PingFront,
    setup_device,
    start_back,
)
from xenbus_world import World, eventually

from aioxen.platforms.base import Platform
from aioxen.rings.aio import AsyncFrontRing
from aioxen.xenbus import DeviceRunner, XenbusDevice, XenbusState, backend_device, frontend_device

S = XenbusState
T = 20


class NetStyleFront(PingFront):
    """The ping front end publishing its keys with Connected, only from InitWait."""

    connect_state = XenbusState.CONNECTED
    needs_init_wait = True


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    e = Ends()
    yield e
    await e.stop()


async def _read(plat: Platform, path: str) -> bytes | None:
    try:
        value: bytes = await plat.store.read(path)
        return value
    except FileNotFoundError:
        return None


async def _is(plat: Platform, path: str, want: bytes) -> bool:
    return await _read(plat, path) == want


@contextlib.asynccontextmanager
async def states_seen(plat: Platform, path: str) -> AsyncIterator[list[bytes | None]]:
    """Every value of ``path`` read after each watch event, while the block runs."""
    seen: list[bytes | None] = []

    async def collect() -> None:
        async with plat.store.watch(path) as w:
            async for _ in w:
                seen.append(await _read(plat, path))

    task = asyncio.ensure_future(collect())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_keys_go_out_with_connected_only_from_init_wait(world: World, ends: Ends) -> None:
    tool, be, fe = await setup_device(world)
    front = NetStyleFront()
    dev = await frontend_device(fe, TYPE, 0, backend_domid=be.domid, timeout=T)
    frun = ends.start(DeviceRunner(dev, front))
    fstate = f"{dev.own_dir}/state"
    bstate = f"{dev.peer_dir}/state"
    async with states_seen(tool, fstate) as seen:
        # a back end left Connected by an earlier session: no keys for it
        await tool.store.write(bstate, S.CONNECTED.wire)
        await frun.wait_state(S.INITIALISING, timeout=T)
        await asyncio.sleep(0.05)
        assert await _read(tool, f"{dev.own_dir}/event-channel") is None
        assert frun.dev.state == S.INITIALISING and front.ring is None
        # InitWait: the keys go out with Connected...
        await tool.store.write(f"{dev.peer_dir}/max-ring-page-order", "1")
        await tool.store.write(bstate, S.INIT_WAIT.wire)
        await eventually(lambda: _is(tool, fstate, b"4"), "keys published")
        assert await _read(tool, f"{dev.own_dir}/ring-page-order") == b"1"
        # ...but the front end is not connected before the back end says so
        with pytest.raises(TimeoutError):
            await frun.wait_connected(timeout=0.05)
        assert front.connections == 0 and not frun.dev.connected
        # a real back end picks the keys up (its own start says InitWait again first)
        _brun, back = await start_back(ends, be, fe.domid)
        await frun.wait_connected(timeout=T)
        assert front.connections == 1 and back.connects == 1
        assert await front.ping(4) == 4  # feature-double not offered by the toolstack
    assert b"3" not in seen  # never Initialised


async def test_back_end_restart_reconnects_a_net_style_front_end(world: World, ends: Ends) -> None:
    _tool, be, fe = await setup_device(world)
    brun, _back = await start_back(ends, be, fe.domid)
    front = NetStyleFront()
    dev = await frontend_device(fe, TYPE, 0, backend_domid=be.domid, timeout=T)
    frun = ends.start(DeviceRunner(dev, front))
    assert await front.ping(2) == 4
    await brun.close(timeout=T)  # the back end goes away in order...
    await frun.wait_state(S.CLOSED, timeout=T)
    _brun2, back2 = await start_back(ends, be, fe.domid)  # ...and comes back
    await eventually(lambda: _connected(frun, 2, front), "reconnected")
    assert await front.ping(5) == 10 and back2.connects == 1


async def _connected(run: DeviceRunner, n: int, front: PingFront) -> bool:
    return run.dev.connected and front.connections == n


async def test_lost_peer_state_written_again_is_a_new_session(world: World, ends: Ends) -> None:
    """The front end dies while Connected; a new one goes straight to Connected again (one
    transaction, no Initialising in between).  Same value, new session: the back end
    must not take it for the dead one's left-over state."""
    tool, be, fe = await setup_device(world)
    brun, back = await start_back(ends, be, fe.domid)
    front = NetStyleFront()
    dev = await frontend_device(fe, TYPE, 0, backend_domid=be.domid, timeout=T)
    ends.start(DeviceRunner(dev, front))
    assert await front.ping(1) == 2
    assert front.ring is not None
    front.ring.close()  # the front end's process dies: ring and channel gone...
    await fe.store.close()  # ...and its XenStore connection, without a state update
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(ends.tasks[1], T)
    await eventually(lambda: _true(brun.dev.state == S.INIT_WAIT), "back end reset")
    assert await _read(tool, f"{dev.own_dir}/state") == b"4"  # the dead one's state
    await asyncio.sleep(0.05)
    assert back.connects == 1  # ignored as stale
    fe2 = await world.platform(fe.domid)
    ring = await AsyncFrontRing.create(fe2, be.domid, FMT, FMT, order=0)
    try:
        keys = {"event-channel": str(ring.port), "ring-page-order": "0",
                "ring-ref0": str(ring.refs[0]), "feature-double": "1"}  # fmt: skip

        async def body(tx: object) -> None:
            for k, v in keys.items():
                await tx.write(f"{dev.own_dir}/{k}", v)  # type: ignore[attr-defined]
            await tx.write(f"{dev.own_dir}/state", S.CONNECTED.wire)  # type: ignore[attr-defined]

        await fe2.store.transact(body)
        await brun.wait_connected(timeout=T)
        assert back.connects == 2
        assert (await ring.request(Ping(0, 21), timeout=T)).value == 42
    finally:
        ring.close()


async def _true(v: bool) -> bool:
    return v


class CountingBack(PingBack):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def connect(self, dev: XenbusDevice) -> None:
        self.attempts += 1
        await super().connect(dev)


async def test_failed_connect_waits_for_the_peer_to_change(world: World, ends: Ends) -> None:
    """A front end with unusable keys: the back end tries once and stays in InitWait
    (no busy retry loop); a changed front end state is tried again."""
    _tool, be, fe = await setup_device(world)
    back = CountingBack()
    brun = ends.start(DeviceRunner(await backend_device(be, TYPE, fe.domid, 0), back))
    await brun.wait_state(S.INIT_WAIT, timeout=T)
    fdir = brun.dev.peer_dir
    await fe.store.write(f"{fdir}/ring-ref0", "77777")  # no such grant
    await fe.store.write(f"{fdir}/event-channel", "5")
    await fe.store.write(f"{fdir}/state", S.INITIALISED.wire)
    await eventually(lambda: _true(back.attempts >= 1), "a connect attempt")
    await asyncio.sleep(0.2)
    assert back.attempts == 1 and brun.dev.state == S.INIT_WAIT and back.connects == 0
    await fe.store.write(f"{fdir}/state", S.CONNECTED.wire)  # the peer changed: try again
    await eventually(lambda: _true(back.attempts == 2), "a second attempt")
    await asyncio.sleep(0.1)
    assert back.attempts == 2 and brun.dev.state == S.INIT_WAIT
