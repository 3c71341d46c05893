"""Device ownership (aioxen.xenbus.claim): liveness of owner records from real processes,
exclusive atomic claims through a real XenStore (inheap and unix), and what the runner and
the toolstack step do with them: a second claimant fails with EADDRINUSE naming the holder
and changes nothing; a process removes only what it owns; a dead holder is reclaimed."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Mapping

import pytest
from xenbus_world import World

from aioxen.platform.base import Platform
from aioxen.xenbus import BackendDriver, DeviceRunner, XenbusDevice, XenbusState, backend_device
from aioxen.xenbus.claim import (
    OWNER_KEY,
    Claim,
    DeviceInUse,
    OwnerRecord,
    boot_id,
    process_start_time,
)
from aioxen.xenbus.toolstack import add_device, remove_device

S = XenbusState
TYPE = "claimtest"


def dead_record() -> OwnerRecord:
    """The record a process that has since been SIGKILLed would have left."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        rec = OwnerRecord(proc.pid, start, boot_id(), "deadbeef", "python sleeper")
        assert rec.alive()  # alive while it runs
    finally:
        proc.kill()
        proc.wait()
    return rec


def test_liveness_is_pid_plus_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        live = OwnerRecord(proc.pid, start, boot_id(), "t1")
        assert live.alive()
        # same pid, another start time: a recycled pid, not the holder
        assert not OwnerRecord(proc.pid, str(int(start) + 1), boot_id(), "t1").alive()
        # another boot: dead whatever the pid
        assert not OwnerRecord(proc.pid, start, "another-boot", "t1").alive()
    finally:
        proc.kill()
        proc.wait()
    assert not live.alive()  # killed: dead
    assert not dead_record().alive()


def test_own_records_live_while_held() -> None:
    mine = OwnerRecord.mine()
    assert mine.alive() and mine.pid == os.getpid()
    assert OwnerRecord.parse(mine.encode().encode()) == mine
    stranger = OwnerRecord(os.getpid(), mine.start, mine.boot, "not-a-token-of-ours")
    assert not stranger.alive()  # this process, but no claim of ours: left by an old one
    assert OwnerRecord.parse(b"garbage") is None
    assert OwnerRecord.parse(b"pid=x\ntoken=1\n") is None


async def _device(world: World) -> tuple[Platform, Platform, Platform, str]:
    tool = await world.platform(0)
    be = await world.platform(world.dom(1))
    fe = await world.platform(world.dom(2))
    await add_device(tool.store, TYPE, fe.domid, be.domid, 0)
    return tool, be, fe, f"/local/domain/{be.domid}/backend/{TYPE}/{fe.domid}/0"


async def _snapshot(store: object, directory: str) -> dict[str, bytes]:
    names = await store.directory(directory)  # type: ignore[attr-defined]
    return {n: await store.read(f"{directory}/{n}") for n in names}  # type: ignore[attr-defined]


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
    assert OwnerRecord.parse(await be.store.read(f"{bdir}/{OWNER_KEY}")) == won[0].record
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
        rec = OwnerRecord.parse(await be.store.read(f"{bdir}/{OWNER_KEY}"))
        assert rec is not None and rec.pid == os.getpid() and rec.alive()


async def test_toolstack_creates_claimed_and_removes_only_its_own(world: World) -> None:
    tool, be, fe, bdir = await _device(world)
    fdir = f"/local/domain/{fe.domid}/device/{TYPE}/0"
    mine = Claim(tool.store, bdir, "device")
    await add_device(tool.store, TYPE, fe.domid, be.domid, 0, replace=True, claim=mine)
    assert OwnerRecord.parse(await tool.store.read(f"{bdir}/{OWNER_KEY}")) == mine.record
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
