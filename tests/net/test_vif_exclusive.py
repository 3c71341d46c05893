"""One owner per vif, with real processes on the unix platform (issue 13, finding 2):
a second netfront (library or ``aioxen netfront``) or a second ``aioxen netback`` for a
vif that a live process serves fails with ``EADDRINUSE`` naming the holder and touches
nothing -- the first keeps passing frames; a SIGKILLed holder's claim is recognised as
stale and the next instance takes over."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop
from netns_harness import RUN_CLI, Xenstored
from test_front_api import Proto, until

import aioxen
from aioxen.bench.harness import end_process
from aioxen.net.front import create_frontend
from aioxen.ownership import Owner
from aioxen.platforms.base import Platform
from aioxen.xenbus.claim import OWNER_KEY, DeviceInUse

pytestmark = [pytest.mark.crossprocess, pytest.mark.timeout(120)]
PEER = str(Path(__file__).with_name("net_peer.py"))
FDIR1 = "/local/domain/1/device/vif/0"
BDIR1 = "/local/domain/0/backend/vif/1/0"


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), f"{args}: {line!r} (exit {proc.poll()})"
    return proc


@pytest.fixture
def xs() -> Iterator[Xenstored]:
    server = Xenstored()
    try:
        yield server
    finally:
        server.stop()


def start_netback(xs: Xenstored) -> subprocess.Popen[str]:
    return start(
        [sys.executable, "-m", "aioxen", "netback", "--switch", "--frontend", "1",
         "--frontend", "2"],
        xs.client_env(0),
    )  # fmt: skip


@pytest.fixture
def back(xs: Xenstored) -> Iterator[subprocess.Popen[str]]:
    proc = start_netback(xs)
    try:
        yield proc
    finally:
        end_process(proc, 15)


@pytest.fixture
def peer(xs: Xenstored, back: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    proc = start([sys.executable, PEER, "1"], xs.client_env(1))
    try:
        yield proc
    finally:
        end_process(proc, 15)


@contextlib.asynccontextmanager
async def platform(xs: Xenstored, domid: int) -> AsyncIterator[Platform]:
    async with aioxen.platform(
        "unix", domid=domid, root=xs.env["XEN_ROOT"], xenstored_path=xs.env["XENSTORED_PATH"]
    ) as plat:
        yield plat


def loop_name() -> str:
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


async def cli(xs: Xenstored, domid: int, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, RUN_CLI, loop_name(), *args, env=xs.client_env(domid),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def holder(plat: Platform, directory: str) -> Owner | None:
    try:
        return Owner.decode(await plat.store.read(f"{directory}/{OWNER_KEY}"))
    except FileNotFoundError:
        return None


async def frames_from_1(p: Proto, n: int) -> None:
    await until(lambda: sum(f[0][14:] == bytes([1]) * 46 for f in p.frames) >= n, timeout=20)


async def test_second_netfront_is_refused(
    xs: Xenstored, back: subprocess.Popen[str], peer: subprocess.Popen[str]
) -> None:
    async with platform(xs, 2) as dom2, platform(xs, 1) as dom1:
        t2, p2 = await create_frontend(Proto, 0, 0, platform=dom2, timeout=20)
        assert isinstance(p2, Proto)
        peer.send_signal(signal.SIGUSR1)  # peer 1 -> switch -> frontend 2
        await frames_from_1(p2, 1)
        before = {
            k: await dom1.store.read(f"{FDIR1}/{k}") for k in await dom1.store.directory(FDIR1)
        }
        with pytest.raises(DeviceInUse) as info:  # the library
            await create_frontend(Proto, 0, 0, platform=dom1, timeout=20)
        assert info.value.errno == errno.EADDRINUSE
        assert f"pid {peer.pid}" in str(info.value) and FDIR1 in str(info.value)
        tap = f"axe{os.getpid() % 100000}"
        rc, out, err = await cli(xs, 1, "netfront", "--backend", "0", "--tap", tap)  # the CLI
        assert rc == 1 and "READY" not in out and "Traceback" not in err, err
        assert err.startswith("aioxen netfront: ") and f"pid {peer.pid}" in err, err
        assert not Path(f"/sys/class/net/{tap}").exists()  # refused before the TAP
        after = {
            k: await dom1.store.read(f"{FDIR1}/{k}") for k in await dom1.store.directory(FDIR1)
        }
        assert after == before  # nothing touched
        peer.send_signal(signal.SIGUSR1)  # the first still passes frames
        await frames_from_1(p2, 2)
        assert peer.poll() is None and not p2.lost.done()
        t2.close()
        assert await p2.lost is None


async def test_second_netback_is_refused(
    xs: Xenstored, back: subprocess.Popen[str], peer: subprocess.Popen[str]
) -> None:
    async with platform(xs, 2) as dom2:
        t2, p2 = await create_frontend(Proto, 0, 0, platform=dom2, timeout=20)
        assert isinstance(p2, Proto)
        peer.send_signal(signal.SIGUSR1)  # peer 1 -> switch -> frontend 2
        await frames_from_1(p2, 1)
        rc, out, err = await cli(xs, 0, "netback", "--switch", "--frontend", "1")
        assert rc == 1 and "READY" not in out and "Traceback" not in err, err
        assert err.startswith("aioxen netback: ") and f"pid {back.pid}" in err, err
        assert BDIR1 in err
        rc, _, err = await cli(xs, 0, "netback", "--switch", "--frontend", "2", "--no-create")
        assert rc == 1 and f"pid {back.pid}" in err, err
        async with platform(xs, 0) as dom0:
            rec = await holder(dom0, BDIR1)
        assert rec is not None and rec.pid == back.pid
        peer.send_signal(signal.SIGUSR1)  # the first backend still switches frames
        await frames_from_1(p2, 2)
        assert back.poll() is None and not p2.lost.done()
        t2.close()
        assert await p2.lost is None


async def test_killed_netfront_is_reclaimed(
    xs: Xenstored, back: subprocess.Popen[str], peer: subprocess.Popen[str]
) -> None:
    async with platform(xs, 1) as dom1:
        peer.kill()
        peer.wait()
        stale = await holder(dom1, FDIR1)
        assert stale is not None and stale.pid == peer.pid and not stale.alive()
        t1, p1 = await create_frontend(Proto, 0, 0, platform=dom1, timeout=20)
        rec = await holder(dom1, FDIR1)
        assert rec is not None and rec.pid == os.getpid() and rec.alive()
        t1.close()
        assert await p1.lost is None  # type: ignore[attr-defined]
        assert await holder(dom1, FDIR1) is None  # released on close


async def test_killed_netback_is_reclaimed(xs: Xenstored) -> None:
    first = start_netback(xs)
    try:
        first.kill()
        first.wait()
        second = start_netback(xs)  # takes the dead one's vifs over
        try:
            async with platform(xs, 2) as dom2, platform(xs, 0) as dom0:
                rec = await holder(dom0, BDIR1)
                assert rec is not None and rec.pid == second.pid
                t2, p2 = await create_frontend(Proto, 0, 0, platform=dom2, timeout=20)
                t2.close()
                assert await p2.lost is None  # type: ignore[attr-defined]
        finally:
            assert end_process(second, 15) == 143  # SIGTERM: 128 + 15 after a clean stop
    finally:
        end_process(first, 15)


async def test_backend_stopped_is_connection_reset(
    xs: Xenstored, back: subprocess.Popen[str]
) -> None:
    """netback stopped in order (SIGTERM) under a live netfront: the frontend's transport
    ends with ConnectionResetError -- the connection was cut, not closed by its user."""
    async with platform(xs, 2) as dom2:
        _t2, p2 = await create_frontend(Proto, 0, 0, platform=dom2, timeout=20)
        assert isinstance(p2, Proto)
        back.send_signal(signal.SIGTERM)
        exc = await asyncio.wait_for(p2.lost, 30)
        assert isinstance(exc, ConnectionResetError), exc
        assert await asyncio.to_thread(back.wait, 30) in (0, 143)
