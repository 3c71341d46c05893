"""Device ownership (aioxen.xenbus.claim): liveness of owner records from real processes,
exclusive atomic claims through a real XenStore (inheap and unix), and what the runner and
the toolstack step do with them: a second claimant fails with EADDRINUSE naming the holder
and changes nothing; a process removes only what it owns; a dead holder is reclaimed."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import subprocess
import sys
from collections.abc import Mapping

import pytest
from xenbus_world import World

from aioxen.ownership import Owner
from aioxen.platforms.base import Platform
from aioxen.xenbus import BackendDriver, DeviceRunner, XenbusDevice, XenbusState, backend_device
from aioxen.xenbus.claim import OWNER_KEY, Claim, DeviceInUse, holder_alive
from aioxen.xenbus.toolstack import add_device, remove_device

S = XenbusState
TYPE = "claimtest"


def sleeper_record() -> tuple[subprocess.Popen[bytes], Owner]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(f"/proc/{proc.pid}/stat", "rb") as f:
        start = int(f.read().rpartition(b")")[2].split()[19])
    own = Owner.current()
    return proc, Owner(proc.pid, start, own.boot, own.pidns, "deadbeef", "sleeper")


def dead_record() -> Owner:
    """The record a process that has since been SIGKILLed would have left."""
    proc, rec = sleeper_record()
    try:
        assert holder_alive(rec)  # alive while it runs
    finally:
        proc.kill()
        proc.wait()
    return rec


def test_liveness_is_pid_plus_start_time() -> None:
    proc, live = sleeper_record()
    try:
        assert holder_alive(live)
        assert live.start is not None
        # same pid, another start time: a recycled pid, not the holder
        assert not holder_alive(dataclasses.replace(live, start=live.start + 1))
        # another boot: dead whatever the pid
        assert not holder_alive(dataclasses.replace(live, boot="another-boot"))
    finally:
        proc.kill()
        proc.wait()
    assert not holder_alive(live)  # killed: dead
    assert not holder_alive(dead_record())


async def _device(world: World) -> tuple[Platform, Platform, Platform, str]:
    tool = await world.platform(0)
    be = await world.platform(world.dom(1))
    fe = await world.platform(world.dom(2))
    await add_device(tool.store, TYPE, fe.domid, be.domid, 0)
    return tool, be, fe, f"/local/domain/{be.domid}/backend/{TYPE}/{fe.domid}/0"


async def _snapshot(store: object, directory: str) -> dict[str, bytes]:
    names = await store.directory(directory)  # type: ignore[attr-defined]
    return {n: await store.read(f"{directory}/{n}") for n in names}  # type: ignore[attr-defined]


async def test_own_records_live_while_held(world: World) -> None:
    _tool, be, _fe, bdir = await _device(world)
    claim = Claim(be.store, bdir, "the device")
    mine = claim.record
    assert not holder_alive(mine)  # not taken yet
    await claim.acquire()
    assert holder_alive(mine) and mine.pid == os.getpid()
    assert Owner.decode(await be.store.read(f"{bdir}/{OWNER_KEY}")) == mine
    # this process, but not a claim it holds: left by a claim that was dropped
    assert not holder_alive(dataclasses.replace(mine, claim="not-ours"))
    assert await claim.release() is True
    assert not holder_alive(mine)


async def test_racing_claims_one_wins(world: World) -> None:
    _tool, be, _fe, bdir = await _device(world)
    be2 = await world.platform(be.domid)  # a second connection of the same domain
    claims = [Claim(be.store, bdir, "the device"), Claim(be2.store, bdir, "the device")]
    results = await asyncio.gather(*(c.acquire() for c in claims), return_exceptions=True)
    won = [c for c, r in zip(claims, results, strict=True) if r is c]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 1, results
    exc = lost[0]
    assert isinstance(exc, DeviceInUse) and exc.errno == errno.EADDRINUSE
    assert f"pid {os.getpid()}" in str(exc) and bdir in str(exc)
    loser = claims[1] if won[0] is claims[0] else claims[0]
    assert await loser.release() is False  # not ours: nothing removed
    assert Owner.decode(await be.store.read(f"{bdir}/{OWNER_KEY}")) == won[0].record
    assert await won[0].release() is True
    with pytest.raises(FileNotFoundError):
        await be.store.read(f"{bdir}/{OWNER_KEY}")
    retry = await Claim(be2.store, bdir).acquire()  # free again
    await retry.release()


class Idle(BackendDriver):
    type = TYPE

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        return {"feature-idle": "1"}

    async def connect(self, dev: XenbusDevice) -> None:
        return None


async def test_second_runner_is_refused_and_touches_nothing(world: World) -> None:
    _tool, be, fe, bdir = await _device(world)
    first = DeviceRunner(await backend_device(be, TYPE, fe.domid, 0), Idle(), close_timeout=0.2)
    async with first:
        await first.wait_state(S.INIT_WAIT, timeout=10)
        before = await _snapshot(be.store, bdir)
        be2 = await world.platform(be.domid)
        second = DeviceRunner(
            await backend_device(be2, TYPE, fe.domid, 0), Idle(), close_timeout=0.2
        )
        with pytest.raises(DeviceInUse) as info:
            await second.run()
        assert bdir in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert second.error is info.value
        with pytest.raises(DeviceInUse):
            await second.wait_connected(timeout=10)
        assert await _snapshot(be.store, bdir) == before
        assert first.dev.state == S.INIT_WAIT and not first._stopped
    # the first released its claim when it stopped; a new runner may take the device
    third = DeviceRunner(await backend_device(be, TYPE, fe.domid, 0), Idle(), close_timeout=0.2)
    async with third:
        await third.wait_state(S.INIT_WAIT, timeout=10)


async def test_dead_holder_is_reclaimed(world: World) -> None:
    _tool, be, fe, bdir = await _device(world)
    stale = dead_record()
    await be.store.write(f"{bdir}/{OWNER_KEY}", stale.encode())
    await be.store.write(f"{bdir}/state", S.CONNECTED.wire)  # what the dead one left
    runner = DeviceRunner(await backend_device(be, TYPE, fe.domid, 0), Idle(), close_timeout=0.2)
    async with runner:
        await runner.wait_state(S.INIT_WAIT, timeout=10)
        rec = Owner.decode(await be.store.read(f"{bdir}/{OWNER_KEY}"))
        assert rec.pid == os.getpid() and holder_alive(rec)


async def test_toolstack_creates_claimed_and_removes_only_its_own(world: World) -> None:
    tool, be, fe, bdir = await _device(world)
    fdir = f"/local/domain/{fe.domid}/device/{TYPE}/0"
    mine = Claim(tool.store, bdir, "device")
    await add_device(tool.store, TYPE, fe.domid, be.domid, 0, replace=True, claim=mine)
    assert Owner.decode(await tool.store.read(f"{bdir}/{OWNER_KEY}")) == mine.record
    before = await _snapshot(tool.store, bdir), await _snapshot(tool.store, fdir)
    other = Claim(tool.store, bdir, "device")
    with pytest.raises(DeviceInUse):  # replace=True does not override a live owner
        await add_device(tool.store, TYPE, fe.domid, be.domid, 0, replace=True, claim=other)
    assert (await _snapshot(tool.store, bdir), await _snapshot(tool.store, fdir)) == before
    assert await remove_device(tool.store, TYPE, fe.domid, be.domid, 0, claim=other) is False
    assert (await _snapshot(tool.store, bdir), await _snapshot(tool.store, fdir)) == before
    other.abandon()
    assert await remove_device(tool.store, TYPE, fe.domid, be.domid, 0, claim=mine) is True
    for d in (bdir, fdir):
        with pytest.raises(FileNotFoundError):
            await tool.store.read(d)
    await mine.release()


async def test_toolstack_replace_respects_live_owners(world: World) -> None:
    tool, be, fe, bdir = await _device(world)
    fdir = f"/local/domain/{fe.domid}/device/{TYPE}/0"
    back = await Claim(be.store, bdir, "back end").acquire()
    front = await Claim(fe.store, fdir, "front end").acquire()
    before = await _snapshot(tool.store, bdir), await _snapshot(tool.store, fdir)
    with pytest.raises(DeviceInUse) as info:  # a live back end: refused, nothing changed
        await add_device(tool.store, TYPE, fe.domid, be.domid, 0, replace=True)
    assert f"pid {os.getpid()}" in str(info.value) and bdir in str(info.value)
    assert (await _snapshot(tool.store, bdir), await _snapshot(tool.store, fdir)) == before
    await back.release()
    await fe.store.write(f"{fdir}/state", S.CONNECTED.wire)
    await add_device(tool.store, TYPE, fe.domid, be.domid, 0, replace=True)
    assert await tool.store.read(f"{fdir}/state") == S.INITIALISING.wire.encode()  # reset
    assert Owner.decode(await tool.store.read(f"{fdir}/{OWNER_KEY}")) == front.record
    assert await front.release() is True  # still its own record
