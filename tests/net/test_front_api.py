"""netfront as a DatagramTransport against a real netback, with the real XenStore handshake
(in-process xenstored engine of the ``inheap`` platform)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_offload import l4_ok, partial, tcp4, tcp6

from aioxen.net.back import Netback, Vif
from aioxen.net.front import NetfrontTransport, create_frontend
from aioxen.net.netif import PLAIN, FrameInfo
from aioxen.net.offload import fill_checksum
from aioxen.net.switch import LearningSwitch
from aioxen.platforms.base import Platform
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld


class Proto(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, Any]] = []
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.frames.append((data, addr))
        self.arrived.set()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@dataclass
class Rig:
    world: InHeapWorld
    be: Platform
    fes: dict[int, Platform]
    netback: Netback
    received: dict[int, list[tuple[bytes, FrameInfo]]] = field(default_factory=dict)
    vifs: dict[int, Vif] = field(default_factory=dict)

    async def frontend(self, domid: int = 1, **kw: Any) -> tuple[NetfrontTransport, Proto]:
        t, p = await create_frontend(Proto, 0, 0, platform=self.fes[domid], timeout=10, **kw)
        assert isinstance(p, Proto)
        return t, p


async def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def make_rig(
    n_frontends: int = 1, connect: Callable[[Rig, Vif], Any] | None = None
) -> AsyncIterator[Rig]:
    world = InHeapWorld()
    be = InHeapPlatform(0, world)
    await be.open()
    fes: dict[int, Platform] = {}
    for d in range(1, n_frontends + 1):
        fes[d] = InHeapPlatform(d, world)
        await fes[d].open()
    rig: Rig

    def on_connect(vif: Vif) -> Any:
        rig.vifs[vif.frontend_domid] = vif
        if connect is not None:
            return connect(rig, vif)
        got = rig.received.setdefault(vif.frontend_domid, [])
        return lambda f, i: got.append((f, i))

    netback = Netback(be, connect=on_connect)
    rig = Rig(world, be, fes, netback)
    for d in fes:
        await netback.add(d, 0)
    try:
        yield rig
    finally:
        await netback.close(remove=True)
        for p in fes.values():
            await p.close()
        await be.close()
        world.assert_cleaned_up()


async def test_frames_both_ways_with_metadata() -> None:
    async with make_rig() as rig:
        t, p = await rig.frontend()
        assert t.get_extra_info("mac") == bytes.fromhex("00163e000100")
        assert t.get_extra_info("mtu") == 1500
        assert t.get_extra_info("backend_domid") == 0
        assert t.get_extra_info("backend_features").sg
        sizes = [14, 60, 1514, 4096, 4097, 9000, 65535]
        infos = [PLAIN, FrameInfo(csum_blank=True), FrameInfo(data_validated=True)]
        sent = [(bytes([k]) * n, infos[k % 3]) for k, n in enumerate(sizes * 3)]
        for f, i in sent:
            t.sendto(f, i)
        await until(lambda: len(rig.received.get(1, [])) == len(sent))
        assert rig.received[1] == sent
        vif = rig.vifs[1]
        back = [(bytes([k + 1]) * n, PLAIN) for k, n in enumerate(sizes)]
        for f, _ in back:
            assert vif.send(f)
        await until(lambda: len(p.frames) == len(back))
        assert p.frames == back
        t.close()
        assert await p.lost is None


async def test_offloads_resolved_for_a_plain_frontend() -> None:
    """A frontend created with offload=False gets complete checksums and MTU-sized
    segments; with offload=True it gets the super-frame and partial checksum as is."""
    async with make_rig() as rig:
        t, p = await rig.frontend(offload=False)
        vif = rig.vifs[1]
        assert not vif.features.gso_tcpv4 and not vif.features.csum_offload
        big = tcp4(bytes(range(256)) * 30)
        info = FrameInfo(csum_blank=True, gso_type=1, gso_size=1448)
        assert vif.send(bytes(big), info)
        partial6 = partial(tcp6(b"v6" * 100))
        assert vif.send(bytes(partial6), FrameInfo(csum_blank=True))
        await until(lambda: len(p.frames) >= 7)
        assert len(p.frames) == 7
        for f, i in p.frames:
            assert l4_ok(f) and len(f) <= 1514 and not i.csum_blank and not i.gso_type
        t.close()
        await p.lost
        t2, p2 = await rig.frontend(offload=True)
        vif = rig.vifs[1]
        assert vif.send(bytes(big), info)
        await until(lambda: len(p2.frames) == 1)
        assert p2.frames == [(bytes(big), info)]
        t2.close()
        await p2.lost


async def test_gso_front_to_back() -> None:
    async with make_rig() as rig:
        t, _ = await rig.frontend(offload=True)
        frame = tcp4(b"g" * 20000)
        fill_checksum(frame)
        info = FrameInfo(csum_blank=True, gso_type=1, gso_size=1448)
        t.sendto(bytes(frame), info)
        await until(lambda: len(rig.received.get(1, [])) == 1)
        assert rig.received[1] == [(bytes(frame), info)]
        t.close()


async def test_write_flow_control_and_order() -> None:
    async with make_rig() as rig:
        t, p = await rig.frontend()
        vif = rig.vifs[1]
        vif._channel.set_handler(None)  # the backend stops serving its TX ring
        sent = []
        k = 0
        while "pause" not in p.events:
            f = k.to_bytes(4, "big") * 375
            t.sendto(f)
            sent.append((f, PLAIN))
            k += 1
        assert t.get_write_buffer_size() > 64 * 1024
        assert len(sent) > 256  # the ring took 256 frames before anything was queued
        vif.start()  # serving again: the queue drains, writing resumes
        await until(lambda: len(rig.received.get(1, [])) == len(sent))
        assert rig.received[1] == sent
        await until(lambda: "resume" in p.events)
        assert p.events == ["pause", "resume"] and t.get_write_buffer_size() == 0
        t.close()


async def test_pause_reading_holds_frames() -> None:
    async with make_rig() as rig:
        t, p = await rig.frontend()
        vif = rig.vifs[1]
        t.pause_reading()
        assert not t.is_reading()
        frames = [bytes([k % 251]) * 100 for k in range(400)]
        for f in frames:
            assert vif.send(f)
        await asyncio.sleep(0.05)
        assert p.frames == []
        assert vif.rx_queued == 400 - 256  # 256 posted buffers filled, the rest queued
        t.resume_reading()
        await until(lambda: len(p.frames) == 400)
        assert [f for f, _ in p.frames] == frames
        t.close()


async def test_validation_and_send_after_close() -> None:
    async with make_rig() as rig:
        t, p = await rig.frontend()
        with pytest.raises(ValueError):
            t.sendto(b"")
        with pytest.raises(ValueError):
            t.sendto(b"x" * 65536)
        with pytest.raises(TypeError):
            t.sendto(b"x" * 60, ("10.0.0.1", 5))
        t.close()
        assert t.is_closing()
        t.sendto(b"x" * 60)
        assert t.dropped_after_close == 1
        assert await p.lost is None
        await t.wait_closed()
        store = rig.be.store
        fstate = await store.read(t.get_extra_info("frontend_path") + "/state")
        assert fstate == b"6"


async def test_close_then_reconnect() -> None:
    async with make_rig() as rig:
        for round_ in range(3):
            t, p = await rig.frontend()
            t.sendto(bytes([round_]) * 64)
            await until(lambda r=round_: len(rig.received.get(1, [])) == r + 1)  # type: ignore[misc]
            t.close()
            assert await p.lost is None
        assert [f[0][0] for f in rig.received[1]] == [0, 1, 2]


async def test_backend_going_away_is_connection_reset() -> None:
    async with make_rig() as rig:
        t, p = await rig.frontend()
        await rig.netback.close()
        exc = await asyncio.wait_for(p.lost, 10)
        assert isinstance(exc, ConnectionResetError)
        assert t.is_closing()


async def test_switch_between_three_frontends() -> None:
    sw = LearningSwitch()

    def connect(rig: Rig, vif: Vif) -> Any:
        sw.add_port(vif)
        return lambda f, i: sw.input(vif, f, i)

    async with make_rig(3, connect) as rig:
        ends = {d: await rig.frontend(d) for d in (1, 2, 3)}
        macs = {d: ends[d][0].get_extra_info("mac") for d in ends}
        bcast = b"\xff" * 6 + macs[1] + b"\x08\x06" + bytes(46)
        ends[1][0].sendto(bcast)
        await until(lambda: len(ends[2][1].frames) == 1 and len(ends[3][1].frames) == 1)
        uni = macs[1] + macs[2] + b"\x08\x00" + b"reply" * 10
        ends[2][0].sendto(uni)  # 1 is learned: only 1 gets it
        await until(lambda: len(ends[1][1].frames) == 1)
        assert ends[1][1].frames[0][0] == uni
        assert len(ends[3][1].frames) == 1 and sw.stats.forwarded == 1
        for t, p in ends.values():
            t.close()
            await p.lost
