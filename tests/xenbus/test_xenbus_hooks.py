"""The runner's application hooks on inheap and unix: ``async with DeviceRunner``,
``wait_connected``, back end keys written with ``Connected``, ``disconnect`` after a
cancelled ``connect``, stale and published front end keys removed on start and reset,
``on_shutdown``/``supervise``, and the multi-queue key layout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import pytest
from xenbus_world import World, eventually

from aioxen.errors import ProtocolError
from aioxen.platforms.base import Platform, Share
from aioxen.xenbus import (
    BackendDriver,
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    XenbusState,
    add_device,
    backend_device,
    frontend_device,
    peer_queue_dirs,
    queue_keys,
)
from aioxen.xenbus.claim import OWNER_KEY
from aioxen.xenbus.multiqueue import KEY_MAX_QUEUES, KEY_NUM_QUEUES, STALE_KEYS, queue_dir

S = XenbusState
TYPE = "hook"


class Back(BackendDriver):
    type = TYPE

    def __init__(self) -> None:
        self.attached = False
        self.connects = 0
        self.disconnects = 0
        self.dirs: list[str] = []
        self.fail_serving = asyncio.Event()

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        return {KEY_MAX_QUEUES: "4"}

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        assert not self.attached, "connect twice without a disconnect"
        self.dirs = await peer_queue_dirs(dev, 4)
        self.attached = True
        self.connects += 1
        fail = self.fail_serving

        async def serve() -> None:
            await fail.wait()
            raise ConnectionResetError("the front end's ring went away")

        dev.supervise(asyncio.ensure_future(serve()))
        return {"sectors": str(1000 + self.connects)}

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.attached = False
        self.disconnects += 1


class Front(FrontendDriver):
    type = TYPE

    def __init__(self, queues: int = 1, stale: tuple[str, ...] = ()) -> None:
        self.queues = queues
        self.stale = stale
        self.share: Share | None = None
        self.attached = False
        self.connects = 0
        self.disconnects = 0
        self.sectors: bytes | None = None
        self.block = False
        self.entered = asyncio.Event()
        self.fail_connect = False
        self.fail_connected = False
        self.on_disconnect: Callable[[], Awaitable[None]] | None = None

    def published_keys(self) -> tuple[str, ...]:
        return self.stale

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        assert not self.attached, "connect twice without a disconnect"
        self.attached = True
        self.connects += 1
        self.share = dev.platform.grants.share(dev.peer_domid, 1)
        self.entered.set()
        if self.fail_connect:
            raise ProtocolError("refusing to connect", field="test")
        if self.block:
            await asyncio.Event().wait()
        ref = str(self.share.refs[0])
        per_queue = [{"ring-ref": ref, "event-channel": str(q + 1)} for q in range(self.queues)]
        return queue_keys(per_queue, {"protocol": "x86_64-abi"})

    async def connected(self, dev: XenbusDevice) -> None:
        self.sectors = await dev.read_peer("sectors")
        if self.fail_connected:
            raise ProtocolError(f"{dev.peer_dir}/sectors: not today", field="sectors")

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.attached = False
        self.disconnects += 1
        if self.on_disconnect is not None:
            await self.on_disconnect()
        if self.share is not None:
            self.share.close()
            self.share = None


async def setup(world: World) -> tuple[Platform, Platform, Platform]:
    tool = await world.platform(0)
    be = await world.platform(world.dom(1))
    fe = await world.platform(world.dom(2))
    await add_device(tool.store, TYPE, fe.domid, be.domid, 0,
                     frontend_keys={"virtual-device": "0"})  # fmt: skip
    return tool, be, fe


async def back_runner(be: Platform, fe_domid: int) -> tuple[DeviceRunner, Back]:
    driver = Back()
    return DeviceRunner(await backend_device(be, TYPE, fe_domid, 0), driver), driver


async def front_runner(
    fe: Platform, be_domid: int, driver: Front, *, reconnect: bool = True, close_timeout: float = 1
) -> DeviceRunner:
    dev = await frontend_device(fe, TYPE, 0, backend_domid=be_domid, timeout=10)
    return DeviceRunner(dev, driver, reconnect=reconnect, close_timeout=close_timeout)


async def _keys(plat: Platform, d: str) -> set[str]:
    return set(await plat.store.directory(d))


# ------------------------------------------------------------------ context manager


async def test_async_with_and_wait_connected(world: World) -> None:
    _tool, be, fe = await setup(world)
    brun, back = await back_runner(be, fe.domid)
    front = Front()
    async with brun:
        async with await front_runner(fe, be.domid, front) as frun:
            await frun.wait_connected(timeout=10)
            await brun.wait_connected(timeout=10)
            # the back end's connect keys were written in one transaction with Connected
            assert front.sectors == b"1001"
            assert back.dirs == [""] and front.share is not None
        assert frun.dev.state == S.CLOSED and frun.start().done()
        assert await fe.store.read(f"{frun.dev.own_dir}/state") == b"6"
        assert front.share is None and front.disconnects == 1
        await brun.wait_state(S.CLOSED, timeout=10)
        assert back.disconnects == 1
    assert brun.start().done() and brun.error is None


async def test_wait_connected_raises_what_stopped_the_runner(world: World) -> None:
    _tool, be, fe = await setup(world)
    brun, _back = await back_runner(be, fe.domid)
    front = Front()
    front.fail_connected = True
    async with brun, await front_runner(fe, be.domid, front) as frun:
        with pytest.raises(ProtocolError, match="not today"):
            await frun.wait_connected(timeout=10)
        assert isinstance(frun.error, ProtocolError)
        assert front.share is None and front.disconnects == 1  # the runner cleaned up
        with pytest.raises(ConnectionResetError):
            await frun.wait_state(S.CONNECTED, timeout=10)


async def test_wait_connected_times_out_without_a_back_end(world: World) -> None:
    _tool, be, fe = await setup(world)
    front = Front()
    frun = await front_runner(fe, be.domid, front, close_timeout=300)
    async with asyncio.timeout(20):  # hang guard: waiting for an acknowledgement takes 300 s
        async with frun:
            with pytest.raises(TimeoutError):
                await frun.wait_connected(timeout=0.2)
            assert frun.dev.state == S.INITIALISING and front.connects == 0
    # a front end that advertised nothing closes without waiting for the back end: the
    # runner finished by itself (stop() cancels it only if the close did not complete)
    assert (frun.dev.state, frun.start().cancelled()) == (S.CLOSED, False)
    assert await fe.store.read(f"{frun.dev.own_dir}/state") == S.CLOSED.wire.encode()


async def test_cancelled_during_connect_still_disconnects(world: World) -> None:
    _tool, be, fe = await setup(world)
    brun, _back = await back_runner(be, fe.domid)
    front = Front()
    front.block = True
    async with brun:
        frun = await front_runner(fe, be.domid, front)
        task = frun.start()
        await asyncio.wait_for(front.entered.wait(), 10)
        assert front.share is not None and frun.dev.state == S.INITIALISING
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert front.share is None and front.disconnects == 1  # nothing leaked
        await frun.stop()  # idempotent on a finished runner


# ------------------------------------------------------------------ front end keys


async def test_stale_keys_are_removed_by_pattern_on_start(world: World) -> None:
    tool, be, fe = await setup(world)
    fdir = f"/local/domain/{fe.domid}/device/{TYPE}/0"
    stale = {"ring-ref": "7", "ring-ref3": "8", KEY_NUM_QUEUES: "5", "queue-4/ring-ref": "9",
             "queue-12/event-channel": "3", "protocol": "x86_32-abi"}  # fmt: skip
    for k, v in stale.items():
        await fe.store.write(f"{fdir}/{k}", v)
    front = Front(stale=(*STALE_KEYS, "ring-ref*", "protocol"))
    async with await front_runner(fe, be.domid, front) as frun:
        await frun.wait_state(S.INITIALISING, timeout=10)
        left = await _keys(tool, fdir)
        # (the runner's owner record stays while it runs)
        assert left == {"backend", "backend-id", "state", "virtual-device", OWNER_KEY}, left


async def test_published_keys_are_removed_on_reset(world: World) -> None:
    _tool, be, fe = await setup(world)
    front = Front(queues=3)
    async with await front_runner(fe, be.domid, front) as frun:
        brun, back = await back_runner(be, fe.domid)
        async with brun:
            await frun.wait_connected(timeout=10)
            assert back.dirs == ["queue-0/", "queue-1/", "queue-2/"]
            fdir = frun.dev.own_dir
            assert await fe.store.read(f"{fdir}/{KEY_NUM_QUEUES}") == b"3"
            assert await fe.store.read(f"{fdir}/queue-2/event-channel") == b"3"
            assert {"protocol", KEY_NUM_QUEUES, "queue-0"} <= await _keys(fe, fdir)
        await frun.wait_state(S.CLOSED, timeout=10)  # the back end closed in order
        front.fail_connect = True
        front.entered.clear()
        brun2, _back2 = await back_runner(be, fe.domid)
        async with brun2:  # back again: the front end resets (and fails to connect)
            await asyncio.wait_for(front.entered.wait(), 10)
            await eventually(lambda: _no_share(front), "failed connect cleaned up")
            left = await _keys(fe, fdir)
            assert not {"protocol", KEY_NUM_QUEUES, "queue-0", "queue-1"} & left, left
            assert frun.dev.state == S.INITIALISING and front.connects >= 2


async def _no_share(front: Front) -> bool:
    return front.share is None


# ------------------------------------------------------------------ lost peers


async def test_supervise_and_on_shutdown_report_a_lost_peer(world: World) -> None:
    _tool, be, fe = await setup(world)
    brun, back = await back_runner(be, fe.domid)
    front = Front()
    async with brun, await front_runner(fe, be.domid, front) as frun:
        await frun.wait_connected(timeout=10)
        await brun.wait_connected(timeout=10)
        frun.dev.on_shutdown(None)  # our own close: not a lost peer
        assert frun.dev._lost is None
        back.fail_serving.set()  # the supervised serving task fails: the back end resets,
        back.fail_serving = asyncio.Event()  # and the front end follows it
        await eventually(lambda: _connects(front, back, 2), "reconnected after supervise")
        assert back.disconnects == 1 and front.disconnects == 1
        frun.dev.on_shutdown(ConnectionResetError("ring gone"))  # the front end's data path
        await eventually(lambda: _connects(front, back, 3), "reconnected after on_shutdown")
        await frun.wait_connected(timeout=10)
        assert front.sectors == b"1003" and back.disconnects == 2


async def _connects(front: Front, back: Back, n: int) -> bool:
    return front.connects == n and back.connects == n and front.attached and back.attached


async def test_peer_back_at_init_wait_is_not_stale(world: World) -> None:
    """The front end loses its back end after the back end already reset to InitWait:
    that InitWait is the start of a new session, not the dead one's state, so the front
    end connects again (it used to wait for a change that never came)."""
    tool, be, fe = await setup(world)
    front = Front()
    async with await front_runner(fe, be.domid, front) as frun:
        bdir = frun.dev.peer_dir
        await tool.store.write(f"{bdir}/sectors", "7")  # the toolstack plays the back end
        await tool.store.write(f"{bdir}/state", S.CONNECTED.wire)
        await frun.wait_connected(timeout=10)

        async def back_end_resets() -> None:  # while the front end tears down
            front.on_disconnect = None
            await tool.store.write(f"{bdir}/state", S.INIT_WAIT.wire)

        front.on_disconnect = back_end_resets
        frun.dev.on_shutdown(ConnectionResetError("back end's channel closed"))
        await frun.wait_state(S.INITIALISED, timeout=10)
        assert front.connects == 2 and front.attached


async def test_peer_queue_dirs_validates_the_count(world: World) -> None:
    _tool, be, fe = await setup(world)
    dev = await backend_device(be, TYPE, fe.domid, 0)
    assert await peer_queue_dirs(dev, 4) == [""]
    for bad in ("0", "5", "two", "-1"):
        await fe.store.write(f"{dev.peer_dir}/{KEY_NUM_QUEUES}", bad)
        with pytest.raises(ProtocolError) as info:
            await peer_queue_dirs(dev, 4)
        assert KEY_NUM_QUEUES in str(info.value)
    await fe.store.write(f"{dev.peer_dir}/{KEY_NUM_QUEUES}", "2")
    assert await peer_queue_dirs(dev, 4) == ["queue-0/", "queue-1/"]


def test_queue_key_layout() -> None:
    one = queue_keys([{"ring-ref": "8", "event-channel": "3"}], {"protocol": "p"})
    assert one == {"protocol": "p", "ring-ref": "8", "event-channel": "3"}
    two = queue_keys([{"ring-ref0": "8"}, {"ring-ref0": "9"}], {"ring-page-order": "1"})
    assert two == {"ring-page-order": "1", KEY_NUM_QUEUES: "2",
                   "queue-0/ring-ref0": "8", "queue-1/ring-ref0": "9"}  # fmt: skip
    assert queue_dir(0, 1) == "" and queue_dir(3, 4) == "queue-3/"
    with pytest.raises(ValueError):
        queue_keys([])
    with pytest.raises(ValueError):
        queue_dir(4, 4)
