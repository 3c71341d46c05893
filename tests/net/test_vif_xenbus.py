"""The vif on the xenbus framework, on inheap and on unix with a real ``aioxen xenstored``:
the toolstack step with the link keys, the netfront order (keys with ``Connected``, only
from ``InitWait``), backends left behind by earlier frontends, refused and hostile
handshakes, toolstack removal and ``online=0``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_front_api import Proto, until
from xenbus_world import World, eventually, world, xenstored_proc

from aioxen.net.back import Netback, Vif, create_vif_device, destroy_vif_device, serve_vif
from aioxen.net.front import create_frontend
from aioxen.net.keys import BackendFeatures, FrontendFeatures, default_mac, mac_text
from aioxen.net.netif import PLAIN, FrameInfo
from aioxen.platforms.base import Platform
from aioxen.xenbus import XenbusState, list_devices, remove_device
from aioxen.xenbus.driver import backend_dir, frontend_dir

__all__ = ["world", "xenstored_proc"]  # fixtures used by the tests below

S = XenbusState
T = 20  # hang guard (seconds)


@dataclass
class Vifs:
    """A backend (domain 0, also the toolstack) and a frontend domain of one world."""

    world: World
    be: Platform
    fe: Platform
    got: list[tuple[bytes, FrameInfo]] = field(default_factory=list)
    vifs: list[Vif] = field(default_factory=list)

    @property
    def fdir(self) -> str:
        return frontend_dir(self.fe.domid, "vif", 0)

    @property
    def bdir(self) -> str:
        return backend_dir(0, "vif", self.fe.domid, 0)

    def connect(self, vif: Vif) -> Any:
        self.vifs.append(vif)
        return lambda f, i: self.got.append((f, i))

    async def state(self, path: str) -> bytes | None:
        try:
            value: bytes = await self.be.store.read(f"{path}/state")
            return value
        except FileNotFoundError:
            return None

    async def front(self, **kw: Any) -> tuple[Any, Proto]:
        t, p = await create_frontend(Proto, 0, 0, platform=self.fe, timeout=T, **kw)
        assert isinstance(p, Proto)
        return t, p


@pytest.fixture
async def vifs(world: World) -> AsyncIterator[Vifs]:
    yield Vifs(world, await world.platform(0), await world.platform(world.dom(1)))


@contextlib.asynccontextmanager
async def netback(v: Vifs, **kw: Any) -> AsyncIterator[Netback]:
    nb = Netback(v.be, connect=v.connect, **kw)
    try:
        yield nb
    finally:
        await nb.close(remove=True)


async def ping(v: Vifs, t: Any, p: Proto, n: int) -> None:
    """A frame each way through the connected vif (the last one ``v.vifs`` got)."""
    frame = bytes([n]) * 60
    before = len(v.got)
    t.sendto(frame)
    await until(lambda: len(v.got) > before, T)
    assert v.got[-1] == (frame, PLAIN)
    assert v.vifs[-1].send(frame[::-1])
    await until(lambda: any(f == frame[::-1] for f, _ in p.frames), T)


async def test_toolstack_step_writes_the_link_keys(vifs: Vifs) -> None:
    v = vifs
    await create_vif_device(v.be, v.fe.domid, 0, mtu=9000)
    xs = v.be.store
    for d, owner, peer in ((v.fdir, v.fe.domid, 0), (v.bdir, 0, v.fe.domid)):
        assert await xs.read(f"{d}/mac") == mac_text(default_mac(v.fe.domid, 0)).encode()
        assert await xs.read(f"{d}/mtu") == b"9000"
        assert await xs.read(f"{d}/handle") == b"0"
        assert await xs.read(f"{d}/state") == b"1"
        assert [str(p) for p in await xs.get_perms(f"{d}/mac")] == [f"n{owner}", f"r{peer}"]
    assert await xs.read(f"{v.fdir}/backend") == v.bdir.encode()
    assert await xs.read(f"{v.bdir}/online") == b"1"
    (info,) = await list_devices(xs, v.fe.domid)
    assert (info.type, info.devid, info.backend_domid) == ("vif", 0, 0)
    # created again (a restarted netback): reset to Initialising, the MAC is kept...
    await xs.write(f"{v.fdir}/state", "4")
    await xs.write(f"{v.fdir}/mac", "02:00:00:00:00:01")
    await create_vif_device(v.be, v.fe.domid, 0)
    assert await xs.read(f"{v.bdir}/mac") == b"02:00:00:00:00:01"
    assert await xs.read(f"{v.fdir}/state") == b"1"
    # ...unless a new one is given
    await create_vif_device(v.be, v.fe.domid, 0, mac=bytes.fromhex("020000000002"))
    assert await xs.read(f"{v.fdir}/mac") == b"02:00:00:00:00:02"
    await destroy_vif_device(v.be, v.fe.domid, 0)
    await destroy_vif_device(v.be, v.fe.domid, 0)  # idempotent
    assert await list_devices(xs, v.fe.domid) == []


async def test_netfront_publishes_its_keys_with_connected_from_init_wait(vifs: Vifs) -> None:
    """Linux netback connects only when its frontend says Connected, so netfront never
    says Initialised; and it waits for InitWait whatever an earlier session left."""
    v = vifs
    xs = v.be.store
    await create_vif_device(v.be, v.fe.domid, 0)
    await xs.write(f"{v.bdir}/state", S.CONNECTED.wire)  # left over: not for this frontend
    await xs.write(f"{v.bdir}/feature-rx-copy", "1")
    task = asyncio.ensure_future(v.front())
    await asyncio.sleep(0.1)
    assert await xs.read(f"{v.fdir}/state") == b"1" and not task.done()
    with pytest.raises(FileNotFoundError):
        await xs.read(f"{v.fdir}/tx-ring-ref")  # nothing published to a stale backend
    # the "backend" (played by the toolstack here) resets: netfront publishes, Connected
    await xs.write(f"{v.bdir}/feature-sg", "1")
    await xs.write(f"{v.bdir}/state", S.INIT_WAIT.wire)
    await eventually(lambda: _is(v.state(v.fdir), b"4"), "netfront published")
    for key in ("tx-ring-ref", "rx-ring-ref", "event-channel", *FrontendFeatures.KEYS):
        assert await xs.read(f"{v.fdir}/{key}")
    assert await xs.read(f"{v.fdir}/feature-persistent") == b"1"
    assert await xs.read(f"{v.fdir}/feature-sg") == b"1"
    # published, but not connected until the backend says so
    await asyncio.sleep(0.1)
    assert not task.done()
    await xs.write(f"{v.bdir}/state", S.CONNECTED.wire)
    t, p = await asyncio.wait_for(task, T)
    assert t.get_extra_info("backend_features").sg and not t.is_closing()
    t.close()
    await t.wait_closed()
    assert await p.lost is None and await v.state(v.fdir) == b"6"


async def test_frontend_may_start_before_the_backend(vifs: Vifs) -> None:
    v = vifs
    task = asyncio.ensure_future(v.front())  # no device yet: waits for the toolstack
    await asyncio.sleep(0.05)
    await create_vif_device(v.be, v.fe.domid, 0)
    await asyncio.sleep(0.05)
    assert not task.done()
    async with netback(v) as nb:
        await nb.add(v.fe.domid, 0, create=False)
        t, p = await asyncio.wait_for(task, T)
        await ping(v, t, p, 1)
        t.close()
        assert await p.lost is None


async def test_new_frontend_while_the_backend_still_serves_a_dead_one(vifs: Vifs) -> None:
    """The first frontend dies without a word (XenStore connection gone, the backend's
    vif never hears of it); a new instance of the domain's netfront still connects: its
    Initialising makes the backend let go of the old session."""
    v = vifs
    async with netback(v) as nb:
        await nb.add(v.fe.domid, 0)
        t1, p1 = await v.front()
        await ping(v, t1, p1, 1)
        v.vifs[0]._channel.set_handler(None)  # the backend's vif stops looking
        await v.fe.store.close()  # the frontend's process "dies"
        assert isinstance(await asyncio.wait_for(p1.lost, T), ConnectionResetError)
        assert await v.state(v.bdir) == b"4" and await v.state(v.fdir) == b"4"  # stale
        v.fe = await v.world.platform(v.fe.domid)
        t2, p2 = await v.front()
        await ping(v, t2, p2, 2)
        assert len(v.vifs) == 2 and v.vifs[0].dead
        t2.close()
        assert await p2.lost is None


async def test_backend_without_rx_copy_is_refused(vifs: Vifs) -> None:
    v = vifs
    async with netback(v, features=BackendFeatures(rx_copy=False)) as nb:
        await nb.add(v.fe.domid, 0)
        with pytest.raises(ConnectionRefusedError, match="feature-rx-copy"):
            await v.front()
        assert await v.state(v.fdir) == b"6"
        with pytest.raises(ValueError, match="served by domain 0, not 7"):
            await create_frontend(Proto, 7, 0, platform=v.fe, timeout=T)


async def test_hostile_frontend_keys_leave_the_backend_waiting(vifs: Vifs) -> None:
    v = vifs
    async with netback(v) as nb:
        await nb.add(v.fe.domid, 0)
        await eventually(lambda: _is(v.state(v.bdir), b"2"), "InitWait")
        xs = v.fe.store
        for keys in (
            {"request-rx-copy": "0", "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"},
            {"request-rx-copy": "1", "tx-ring-ref": "8", "event-channel": "3"},
            {"request-rx-copy": "1", "tx-ring-ref": "x", "rx-ring-ref": "9", "event-channel": "3"},
            {"request-rx-copy": "1", "tx-ring-ref": "77777", "rx-ring-ref": "9",
             "event-channel": "3"},
        ):  # fmt: skip
            for k, val in keys.items():
                await xs.write(f"{v.fdir}/{k}", val)
            await xs.write(f"{v.fdir}/state", S.CONNECTED.wire)
            await asyncio.sleep(0.05)
            assert await v.state(v.bdir) == b"2" and not v.vifs, keys
            await xs.write(f"{v.fdir}/state", S.INITIALISING.wire)
            for k in keys:
                await xs.rm(f"{v.fdir}/{k}")
        t, p = await v.front()  # a well-behaved frontend still gets through
        await ping(v, t, p, 3)
        t.close()
        assert await p.lost is None


@pytest.mark.parametrize("how", ["remove", "offline"])
async def test_toolstack_ends_the_vif(vifs: Vifs, how: str) -> None:
    v = vifs
    await create_vif_device(v.be, v.fe.domid, 0)
    ended: list[Vif] = []
    serving = asyncio.ensure_future(
        serve_vif(v.be, v.fe.domid, 0, on_connect=v.connect, on_disconnect=ended.append)
    )
    try:
        t, p = await v.front()
        await ping(v, t, p, 4)
        if how == "remove":
            assert await remove_device(v.be.store, "vif", v.fe.domid, 0, 0, timeout=T)
        else:
            await v.be.store.write(f"{v.bdir}/online", "0")
        await asyncio.wait_for(serving, T)  # the backend stopped serving...
        exc = await asyncio.wait_for(p.lost, T)  # ...and the frontend was told
        assert isinstance(exc, ConnectionResetError) and t.is_closing()
        assert ended == v.vifs and v.vifs[0].dead
        if how == "offline":
            assert await v.state(v.bdir) == b"6"
    finally:
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving
        with contextlib.suppress(FileNotFoundError):
            await destroy_vif_device(v.be, v.fe.domid, 0)


async def test_serve_vif_once(vifs: Vifs) -> None:
    v = vifs
    await create_vif_device(v.be, v.fe.domid, 0)
    serving = asyncio.ensure_future(serve_vif(v.be, v.fe.domid, 0, on_connect=v.connect, once=True))
    try:
        t, p = await v.front()
        await ping(v, t, p, 5)
        t.close()
        assert await p.lost is None
        await asyncio.wait_for(serving, T)
        assert await v.state(v.bdir) == b"6"
    finally:
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving
        await destroy_vif_device(v.be, v.fe.domid, 0)


async def _is(value: Any, want: bytes) -> bool:
    return bool(await value == want)
