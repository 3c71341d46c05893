"""qrexec across real domains: aioxen's agent in the peer domU, aioxen's daemon in dom0.

The agent runs in the peer domU (:mod:`peer_qrexec`, ``qrexec-agent``: the vchan server of
control port 512 for dom0, on the domU's ``xen`` platform); the test's
:class:`~aioxen.qrexec.Daemon` in dom0 connects to it over a real cross-domain vchan, as
Qubes' ``qrexec-daemon`` does, no dom0 loopback.  Calls from dom0 offer their data
channel to the domU (dom0 grants, the domU maps); calls from the domU go up as
``TRIGGER_SERVICE*`` through the daemon's policy, and the domU offers the data channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest
from crossdomain import loop_name, sha
from peer import stream
from peer_qrexec import bulk_service, command, spawn
from peerdomu import Peer, Spawned

from aioxen import qrexec
from aioxen.errors import ProtocolError
from aioxen.platforms.xen import XenPlatform
from aioxen.qrexec import Daemon, PolicyRequest, ServiceRequest, VchanChannels

HANG = 180.0  # hang guard only: the domU's Python under TCG is slow
MIB = 1 << 20
Reader = asyncio.StreamReader


def policy(r: PolicyRequest) -> bool:
    return not r.service.startswith("no.")


class DomuAgent:
    """The agent process in the domU."""

    def __init__(self, proc: Spawned, ready: re.Match[str]) -> None:
        self.proc = proc
        self.pid = int(ready.group(1))
        self.trigger = ready.group(2)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        return await asyncio.to_thread(self.proc.wait_for, pattern, HANG)


@contextlib.asynccontextmanager
async def domu_agent(
    peer: Peer, max_version: int = 4, calls: str = "-"
) -> AsyncIterator[DomuAgent]:
    cmd = command(peer, loop_name(), "qrexec-agent", max_version, calls)
    proc = await asyncio.to_thread(spawn, peer, cmd)
    try:
        ready = await asyncio.to_thread(proc.wait_for, r"^READY pid=(\d+) trigger=(\S+)", HANG)
        yield DomuAgent(proc, ready)
    finally:
        await asyncio.to_thread(proc.kill9_if_alive)


@contextlib.asynccontextmanager
async def dom0_daemon(plat: XenPlatform, peer: Peer) -> AsyncIterator[Daemon]:
    daemon = Daemon(VchanChannels(plat), domains={"peer": peer.domid}, policy=policy)
    async with daemon:
        yield daemon


async def test_dom0_calls_services_in_domu(plat: XenPlatform, peer: Peer) -> None:
    """Python and executable services (argv and environment as Qubes passes them), a
    ``user:cmd`` exec, 127 and 125, and eight calls at once."""
    async with domu_agent(peer) as agent, dom0_daemon(plat, peer) as daemon:
        await daemon.wait_connected(timeout=HANG)
        await agent.wait_for(r"^CONNECTED version=4")
        r = await daemon.call("peer", "test.Echo+a1", input=b"hi", timeout=HANG)
        assert (r.stdout, r.exit_code) == (b"dom0:a1:user:hi", 7)
        r = await daemon.call("peer", "test.Env+xyz", input=b"in\n", timeout=HANG)
        assert r.stdout.decode().splitlines() == [
            "argv=1 [xyz] in=in",
            "remote=dom0 full=test.Env+xyz arg=xyz",
            f"agent={agent.pid} ppid={agent.pid}",  # run by the agent in the domU
        ]
        assert (r.stderr, r.exit_code) == (b"err\n", 3)
        domid, port = await daemon.exec("peer", "user:cat; echo ppid=$PPID >&2; exit 4")
        assert domid == peer.domid
        r = await qrexec.client.run_call(daemon.channels, domid, port, b"cmd")
        assert (r.stdout, r.stderr, r.exit_code) == (b"cmd", f"ppid={agent.pid}\n".encode(), 4)
        assert (await daemon.call("peer", "test.Missing", timeout=HANG)).exit_code == 127
        assert (await daemon.call("peer", "test.NotExec", timeout=HANG)).exit_code == 125
        many = await asyncio.gather(
            *(
                daemon.call("peer", f"test.Echo+n{i}", input=b"x" * i, timeout=HANG)
                for i in range(8)
            )
        )
        assert [(m.stdout, m.exit_code) for m in many] == [
            (f"dom0:n{i}:user:".encode() + b"x" * i, 7) for i in range(8)
        ]


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_bulk_both_ways_at_version(plat: XenPlatform, peer: Peer, version: int) -> None:
    """1 MiB each way in one call from dom0 to the domU and in one from the domU to dom0,
    at once, the agent capped at ``version`` (4 KiB chunks at 2, 64 KiB at 3 and 4)."""
    up = f"dom0/test.Bulk0+21-{MIB}/22/{MIB}"  # the domU's call to dom0
    async with domu_agent(peer, version, up) as agent, dom0_daemon(plat, peer) as daemon:
        daemon.local.add_service("test.Bulk0", bulk_service)
        await daemon.wait_connected(timeout=HANG)
        await agent.wait_for(rf"^CONNECTED version={version}$")
        r = await daemon.call("peer", f"test.Bulk+11-{MIB}", input=stream(12, MIB), timeout=HANG)
        assert r.exit_code == 0, r
        assert (len(r.stdout), sha(r.stdout)) == (MIB, sha(stream(11, MIB)))
        assert r.stderr == f"got={MIB} sha256={sha(stream(12, MIB))}".encode()
        m = await agent.wait_for(r"^CALL 0 exit=(\d+) out=(\d+):(\w+) err=(.*)$")
        assert m.groups() == (
            "0",
            str(MIB),
            sha(stream(21, MIB)),
            repr(f"got={MIB} sha256={sha(stream(22, MIB))}".encode()),
        )


async def test_domu_calls_dom0_through_policy(plat: XenPlatform, peer: Peer) -> None:
    """The domU's calls go through dom0's policy: to a dom0 service (allowed), refused
    (126), to a service of the domU itself (VM -> VM, here to itself), and through the
    agent's trigger socket with ``aioxen qrexec client-vm``, allowed and refused."""
    calls = "dom0/test.Dom0+up/31/100,dom0/no.Way//0,peer/test.Echo+self/32/10"
    seen: list[tuple[str, str, bytes]] = []
    async with domu_agent(peer, 4, calls) as agent, dom0_daemon(plat, peer) as daemon:

        @daemon.service("test.Dom0")
        async def dom0_service(stdin: Reader, stdout: object, req: ServiceRequest) -> int:
            data = await stdin.read()
            seen.append((req.source, req.argument, data))
            stdout.write(b"dom0 got %d" % len(data))  # type: ignore[attr-defined]
            return 5

        await daemon.wait_connected(timeout=HANG)
        await agent.wait_for("^CALLS done")
        out = agent.proc.output()
        assert f"CALL 0 exit=5 out=12:{sha(b'dom0 got 100')} err=b''" in out, out
        assert f"CALL 1 exit=126 out=0:{sha(b'')} err=b''" in out, out
        echoed = b"peer:self:user:" + stream(32, 10)
        assert f"CALL 2 exit=7 out={len(echoed)}:{sha(echoed)} err=b''" in out, out
        client_vm = (
            f"{peer.python_command()} -m aioxen qrexec client-vm --trigger-socket {agent.trigger}"
        )
        text = await asyncio.to_thread(
            peer.console.run,
            f"echo hello | {client_vm} dom0 test.Dom0+cli; echo rc=$?;"
            f" {client_vm} dom0 no.Way; echo rc=$?",
            HANG,
        )
        assert re.search(r"^dom0 got 6rc=5$", text, re.MULTILINE), text
        assert re.search(r"^rc=126$", text, re.MULTILINE), text
        assert seen == [("peer", "up", stream(31, 100)), ("peer", "cli", b"hello\n")]


async def test_domu_agent_killed_mid_call(plat: XenPlatform, peer: Peer) -> None:
    """kill -9 of the domU's agent while dom0 is in a call: the call ends with an error
    (the domU's kernel unmaps the data channel's pages and fires its notify), nothing
    hangs; the daemon drops the link and connects to the next agent by itself."""
    async with dom0_daemon(plat, peer) as daemon:
        async with domu_agent(peer) as agent:
            await daemon.wait_connected(timeout=HANG)
            async with qrexec.connect("peer", "test.Slow", via=daemon) as (reader, writer):
                assert await asyncio.wait_for(reader.readline(), HANG) == b"started\n"
                await asyncio.to_thread(agent.proc.kill9)
                with pytest.raises((ConnectionResetError, ProtocolError)):
                    async with asyncio.timeout(HANG):
                        await reader.read()
                        await writer.exit_code()  # type: ignore[attr-defined]
        async with asyncio.timeout(HANG):
            while daemon.link_up("peer"):
                await asyncio.sleep(0.2)
        async with domu_agent(peer):
            await daemon.wait_connected(timeout=HANG)
            r = await daemon.call("peer", "test.Echo", input=b"again", timeout=HANG)
            assert (r.stdout, r.exit_code) == (b"dom0::user:again", 7)
