"""The data phase between real processes on the ``unix`` platform, and a peer process
killed with SIGKILL mid-call: the surviving end fails with ConnectionResetError, it never
hangs (the peer process is ``data_peer.py``)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from vchan_harness import UnixWorld, Xenstored

from aioxen.qrexec.channels import VchanChannels
from aioxen.qrexec.data import CallerEnd, ServiceEnd, relay_process

HERE = Path(__file__).resolve().parent
PARENT, CHILD = 10, 11
HANG_GUARD = 60
pytestmark = [pytest.mark.timeout(180), pytest.mark.crossprocess]
_ports = itertools.count(900)


@pytest.fixture
async def chans(qrexec_xenstored: Xenstored) -> AsyncIterator[VchanChannels]:
    """The test process as domain PARENT; what it opened must all be closed again (a
    killed child's leftovers in the shared root are its own, reclaimed by liveness)."""
    world = UnixWorld(qrexec_xenstored)
    yield VchanChannels(await world.platform(PARENT))
    leaks = world.leaks()
    await world.close()
    assert leaks == [], leaks


async def spawn(xenstored: Xenstored, role: str, port: int) -> asyncio.subprocess.Process:
    loop_name = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "data_peer.py"),
        loop_name,
        role,
        str(PARENT),
        str(port),
        env=xenstored.env(CHILD),
        stdout=asyncio.subprocess.PIPE,
    )


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(HANG_GUARD):
        return (await proc.stdout.readline()).decode().strip()


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL


async def test_service_process_killed(qrexec_xenstored: Xenstored, chans: VchanChannels) -> None:
    port = next(_ports)
    pending = await chans.listen(CHILD, port, buffer_size=65536)
    child = await spawn(qrexec_xenstored, "service", port)
    try:
        r, w = await pending.accept(timeout=HANG_GUARD)
        caller = await CallerEnd.open(r, w)
        assert await line(child) == "READY"
        caller.stdin.write(b"x" * 100_000)
        await caller.stdin.drain()
        assert await caller.stdout.readexactly(100_000) == b"x" * 100_000  # it is working
        await kill(child)
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(ConnectionResetError):
                await caller.stdout.read()
            with pytest.raises(ConnectionResetError):
                await caller.exit_code()
        await caller.aclose()
    finally:
        if child.returncode is None:
            await kill(child)


@pytest.mark.parametrize("relay", [False, True])
async def test_caller_process_killed(
    qrexec_xenstored: Xenstored, chans: VchanChannels, relay: bool
) -> None:
    port = next(_ports)
    child = await spawn(qrexec_xenstored, "caller", port)
    try:
        assert await line(child) == "LISTENING"
        r, w = await chans.connect(CHILD, port)
        service = await ServiceEnd.open(r, w)
        assert await line(child) == "READY"
        if relay:
            pipe = asyncio.subprocess.PIPE
            proc = await asyncio.create_subprocess_exec(
                "sh", "-c", "cat >/dev/null", stdin=pipe, stdout=pipe, stderr=pipe
            )
            task = asyncio.ensure_future(relay_process(service, proc, kill_grace=5))
            await asyncio.sleep(0.2)  # let some input flow through cat
            await kill(child)
            async with asyncio.timeout(HANG_GUARD):
                with pytest.raises(ConnectionResetError):
                    await task
            assert proc.returncode is not None
        else:
            assert len(await service.stdin.readexactly(1_000_000)) == 1_000_000
            await kill(child)
            async with asyncio.timeout(HANG_GUARD):
                with pytest.raises(ConnectionResetError):
                    while await service.stdin.read(1 << 20):
                        pass
                with pytest.raises(ConnectionResetError):
                    await service.exit(0)
    finally:
        if child.returncode is None:
            await kill(child)
