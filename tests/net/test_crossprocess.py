"""netfront/netback in separate processes on the ``unix`` platform: a switch serving two
frontends, and each side dying under the other."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from netns_harness import Xenstored
from test_front_api import Proto, until

import aioxen
from aioxen.bench.harness import end_process
from aioxen.net.front import create_frontend
from aioxen.platforms.base import Platform

pytestmark = [pytest.mark.crossprocess, pytest.mark.timeout(120)]
PEER = str(Path(__file__).with_name("net_peer.py"))


@pytest.fixture
def xenstored() -> Iterator[Xenstored]:
    xs = Xenstored()
    try:
        yield xs
    finally:
        xs.stop()


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), f"{args}: {line!r} (exit {proc.poll()})"
    return proc


@pytest.fixture
def netback(xenstored: Xenstored) -> Iterator[subprocess.Popen[str]]:
    proc = start(
        [sys.executable, "-m", "aioxen", "netback", "--switch", "--frontend", "1",
         "--frontend", "2"],
        xenstored.client_env(0),
    )  # fmt: skip
    try:
        yield proc
    finally:
        end_process(proc, 15)


@pytest.fixture
async def frontend_platform(xenstored: Xenstored) -> AsyncIterator[Platform]:
    async with aioxen.platform(
        "unix", domid=2, root=xenstored.env["XEN_ROOT"],
        xenstored_path=xenstored.env["XENSTORED_PATH"],
    ) as plat:  # fmt: skip
        yield plat


async def test_backend_killed_is_connection_reset(
    xenstored: Xenstored, netback: subprocess.Popen[str], frontend_platform: Platform
) -> None:
    _t, p = await create_frontend(Proto, 0, 0, platform=frontend_platform, timeout=20)
    assert isinstance(p, Proto)
    peer = start([sys.executable, PEER, "1"], xenstored.client_env(1))
    try:
        # frontend 1's broadcast crosses the switch in the netback process
        await until(lambda: len(p.frames) >= 1, timeout=20)
        assert p.frames[0][0][14:] == bytes([1]) * 46
        os.kill(netback.pid, signal.SIGKILL)
        exc = await asyncio.wait_for(p.lost, 15)
        assert isinstance(exc, ConnectionResetError)
    finally:
        end_process(peer, 15)


async def test_frontend_killed_then_replaced(
    xenstored: Xenstored, netback: subprocess.Popen[str], frontend_platform: Platform
) -> None:
    t, p = await create_frontend(Proto, 0, 0, platform=frontend_platform, timeout=20)
    assert isinstance(p, Proto)
    for generation in range(2):
        peer = start([sys.executable, PEER, "1"], xenstored.client_env(1))
        await until(lambda g=generation: len(p.frames) >= g + 1, timeout=20)  # type: ignore[misc]
        peer.kill()
        peer.wait()
    assert len(p.frames) == 2
    assert not p.lost.done() and netback.poll() is None
    t.close()
    assert await p.lost is None
