"""qrexec on real Xen, dom0 loopback: an aioxen agent in dom0 serving an aioxen daemon in
dom0 (the daemon's domain ``self`` is domid 0) over real grants and event channels --
exec, Python and executable services, the VM-side trigger path through the policy,
refusal, 125/126/127, multi-chunk data both ways at versions 2/3/4, stdin EOF
before/after output, and the agent killed mid-call (the caller ends with an error)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioxen import qrexec
from aioxen.platforms.xen import XenPlatform
from aioxen.qrexec import Agent, Daemon, PolicyRequest, ServiceRequest, VchanChannels

HANG = 60.0  # hang guard only
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


def policy(r: PolicyRequest) -> bool:
    return not r.service.startswith("no.")


@contextlib.asynccontextmanager
async def loopback(
    plat: XenPlatform,
    plat2: XenPlatform,
    *,
    agent_version: int = 4,
    services_dir: Path | None = None,
) -> AsyncIterator[tuple[Daemon, Agent]]:
    agent = Agent(VchanChannels(plat), max_version=agent_version, services_dir=services_dir)
    daemon = Daemon(VchanChannels(plat2), domains={"self": 0}, policy=policy)
    async with agent, daemon:
        await daemon.wait_connected(timeout=HANG)
        await agent.wait_connected(timeout=HANG)
        yield daemon, agent


def service_dir(tmp: Path) -> Path:
    d = tmp / "rpc"
    d.mkdir()
    env = d / "test.Env"
    env.write_text(
        '#!/bin/sh\nread x\necho "argv=$# [$1] in=$x remote=$QREXEC_REMOTE_DOMAIN"\n'
        "echo err >&2\nexit 3\n"
    )
    env.chmod(0o755)
    (d / "test.NotExec").write_text("#!/bin/sh\n")
    return d


async def test_services_exec_and_exit_codes(plat: XenPlatform, plat2: XenPlatform) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with loopback(plat, plat2, services_dir=service_dir(Path(tmp))) as (daemon, agent):

            @agent.service("test.Echo")
            async def echo(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
                stdout.write(f"{req.source}:{req.argument}:".encode() + await stdin.read())
                return 7

            r = await daemon.call("self", "test.Echo+a", input=b"hi", timeout=HANG)
            assert (r.stdout, r.exit_code) == (b"dom0:a:hi", 7)
            r = await daemon.call("self", "test.Env+xyz", input=b"in\n", timeout=HANG)
            assert (r.stdout, r.stderr, r.exit_code) == (
                b"argv=1 [xyz] in=in remote=dom0\n",
                b"err\n",
                3,
            )
            assert (await daemon.call("self", "test.Missing", timeout=HANG)).exit_code == 127
            assert (await daemon.call("self", "test.NotExec", timeout=HANG)).exit_code == 125
            domid, port = await daemon.exec("self", "user:cat; echo done >&2; exit 4")
            r = await qrexec.client.run_call(daemon.channels, domid, port, b"cmd")
            assert (r.stdout, r.stderr, r.exit_code) == (b"cmd", b"done\n", 4)


async def test_trigger_path_policy_and_refusal(plat: XenPlatform, plat2: XenPlatform) -> None:
    async with loopback(plat, plat2) as (daemon, agent):

        @agent.service("test.Echo")
        async def echo(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(req.source.encode() + await stdin.read())
            return 0

        @daemon.service("test.Dom0")
        async def dom0(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(b"dom0 got " + await stdin.read())
            return 5

        # the VM side asks dom0 (TRIGGER_SERVICE4, policy, SERVICE_CONNECT + EXEC_CMDLINE)
        r = await agent.call("self", "test.Echo", input=b"!", timeout=HANG)
        assert (r.stdout, r.exit_code) == (b"self!", 0)
        r = await agent.call("dom0", "test.Dom0", input=b"x", timeout=HANG)
        assert (r.stdout, r.exit_code) == (b"dom0 got x", 5)
        assert (await agent.call("self", "no.Way", timeout=HANG)).exit_code == 126


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_multichunk_both_ways(plat: XenPlatform, plat2: XenPlatform, version: int) -> None:
    data = os.urandom(300_000)
    async with loopback(plat, plat2, agent_version=version) as (daemon, agent):
        assert agent.version == version

        @agent.service("test.Cat")
        async def cat(stdin: Reader, stdout: Writer, req: ServiceRequest) -> None:
            while chunk := await stdin.read(10000):
                stdout.write(chunk)
                await stdout.drain()

        r = await daemon.call("self", "test.Cat", input=data, timeout=HANG)
        assert (r.stdout == data, r.exit_code) == (True, 0)
        r = await agent.call("self", "test.Cat", input=data, timeout=HANG)
        assert (r.stdout == data, r.exit_code) == (True, 0)


async def test_stdin_eof_before_and_after_output(plat: XenPlatform, plat2: XenPlatform) -> None:
    async with loopback(plat, plat2) as (daemon, agent):

        @agent.service("test.Early")
        async def early(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(b"first ")
            await stdout.drain()
            stdout.write(await stdin.read())
            return 0

        async with qrexec.connect("self", "test.Early", via=daemon) as (reader, writer):
            assert await asyncio.wait_for(reader.readexactly(6), HANG) == b"first "
            writer.write(b"after")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), HANG) == b"after"
            assert await writer.exit_code() == 0  # type: ignore[attr-defined]
        r = await daemon.call("self", "test.Early", timeout=HANG)
        assert (r.stdout, r.exit_code) == (b"first ", 0)


async def test_agent_killed_mid_call(plat: XenPlatform) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rpc = Path(tmp)
        slow = rpc / "test.Slow"
        slow.write_text("#!/bin/sh\necho started\nexec sleep 600\n")
        slow.chmod(0o755)
        env = {**os.environ, "AIOXEN_PLATFORM": "xen"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aioxen", "qrexec", "agent", "--services-dir", str(rpc),
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            daemon = Daemon(VchanChannels(plat), domains={"self": 0})
            async with daemon:
                await daemon.wait_connected(timeout=HANG)
                async with qrexec.connect("self", "test.Slow", via=daemon) as (reader, writer):
                    assert await asyncio.wait_for(reader.readline(), HANG) == b"started\n"
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    with pytest.raises(ConnectionResetError):
                        async with asyncio.timeout(HANG):
                            await reader.read()
                            await writer.exit_code()  # type: ignore[attr-defined]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
