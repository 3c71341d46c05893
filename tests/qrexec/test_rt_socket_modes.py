"""Who may connect to the qrexec sockets, whatever the umask the service started with.

The agent's trigger socket is how local users of a VM ask for calls (``qrexec-client-vm``):
Qubes' agent makes it world-connectable on purpose -- asking is open, dom0's policy
decides -- and so does aioxen's by default (``0o666``), narrower on request.  The daemon's
client sockets in dom0 are owner-only by default, wider on request.  A real second user
(created here) tries to connect.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import AsyncIterator

import pytest
from platform_harness import leak_checked
from support.unix_user import OtherUser
from vchan_harness import InHeapWorld, World

from aioxen.qrexec import Agent, Daemon, VchanChannels

pytestmark = pytest.mark.crossprocess


@pytest.fixture
async def world() -> AsyncIterator[World]:
    wd = InHeapWorld()
    async with leak_checked(wd):
        yield wd


def shared_dir() -> tempfile.TemporaryDirectory[str]:
    d = tempfile.TemporaryDirectory(prefix="aioxen-qrexec-modes-")
    os.chmod(d.name, 0o755)  # others may reach the sockets; their modes decide
    return d


@pytest.mark.parametrize("umask", [0o000, 0o077])
@pytest.mark.parametrize("mode", [None, 0o600])
async def test_trigger_socket_mode_whatever_the_umask(
    world: World, mallory: OtherUser, umask: int, mode: int | None
) -> None:
    agent = Agent(VchanChannels(await world.platform(2)))
    with shared_dir() as d:
        path = os.path.join(d, "qrexec-agent")
        async with agent:
            old = os.umask(umask)
            try:
                if mode is None:
                    await agent.start_trigger_socket(path)
                else:
                    await agent.start_trigger_socket(path, mode=mode)
            finally:
                os.umask(old)
            got = stat.S_IMODE(os.lstat(path).st_mode)
            if mode is None:  # as Qubes: every local user may ask
                assert got == 0o666
                assert mallory.connects(path) == "connected"
            else:
                assert got == 0o600
                assert mallory.connects(path) == "refused 13"  # EACCES


@pytest.mark.parametrize("mode", [None, 0o666])
async def test_daemon_client_socket_mode_whatever_the_umask(
    world: World, mallory: OtherUser, mode: int | None
) -> None:
    with shared_dir() as d:
        extra = {} if mode is None else {"socket_mode": mode}
        daemon = Daemon(
            VchanChannels(await world.platform(0)), domains={"vm": 43}, socket_dir=d, **extra
        )
        old = os.umask(0)
        try:
            await daemon.__aenter__()
        finally:
            os.umask(old)
        try:
            for name in ("qrexec.vm", "qrexec.43"):
                path = os.path.join(d, name)
                got = stat.S_IMODE(os.lstat(path).st_mode)
                if mode is None:  # owner-only by default, even under umask 0
                    assert got == 0o600
                    assert mallory.connects(path) == "refused 13"
                else:
                    assert got == 0o666
                    assert mallory.connects(path) == "connected"
        finally:
            await daemon.__aexit__(None, None, None)
