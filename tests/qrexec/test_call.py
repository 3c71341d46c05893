"""qrexec calls end to end in one process (inheap and unix vchan worlds): dom0 -> VM and
VM -> VM through the policy, Python and executable services, command lines, refusal,
125/126/127, multi-chunk data both ways at versions 2/3/4, stdin EOF before/after
output."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from platform_harness import leak_checked
from qrexec_world import qrexec_world
from vchan_harness import InHeapWorld, UnixWorld, World, Xenstored

from aioxen import qrexec
from aioxen.qrexec import Agent, PolicyRequest, ServiceRequest

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = Xenstored(tmp_path_factory.mktemp("qcall") / "root")
    yield server
    assert server.stop() == 0


@pytest.fixture(params=["inheap", "unix"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    w: World = (
        InHeapWorld()
        if request.param == "inheap"
        else UnixWorld(request.getfixturevalue("xenstored"))
    )
    async with leak_checked(w):
        yield w


def allow_work_to_vault(r: PolicyRequest) -> bool:
    targets = ("vault", "dom0", "@adminvm")
    return r.source == "work" and r.target in targets and not r.service.startswith("no.")


def add_echo(agent: Agent) -> None:
    @agent.service("test.Echo")
    async def echo(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
        data = await stdin.read()
        stdout.write(f"{req.source} {req.argument!r} ".encode() + data)
        req.stderr.write(b"to stderr")
        return 7


async def test_dom0_calls_a_python_service(world: World) -> None:
    async with qrexec_world(world) as (daemon, agents):
        add_echo(agents["vault"])
        r = await daemon.call("vault", "test.Echo+arg", input=b"hello", timeout=30)
        assert (r.stdout, r.stderr, r.exit_code) == (b"dom0 'arg' hello", b"to stderr", 7)


async def test_vm_to_vm_through_the_policy(world: World) -> None:
    async with qrexec_world(world, policy=allow_work_to_vault) as (_daemon, agents):
        add_echo(agents["vault"])
        r = await agents["work"].call("vault", "test.Echo", input=b"x" * 5, timeout=30)
        assert (r.stdout, r.exit_code) == (b"work '' xxxxx", 7)
        # the same through the public API
        r = await qrexec.call("vault", "test.Echo+a", input=b"!", via=agents["work"], timeout=30)
        assert (r.stdout, r.exit_code) == (b"work 'a' !", 7)
        # refused by the policy: 126, nothing ran
        r = await agents["vault"].call("work", "test.Echo", timeout=30)
        assert r.exit_code == 126
        r = await agents["work"].call("vault", "no.Such", timeout=30)
        assert r.exit_code == 126


async def test_exit_codes_125_126_127(world: World, tmp_path: Path) -> None:
    svc = tmp_path / "rpc"
    svc.mkdir()
    (svc / "test.NotExec").write_text("#!/bin/sh\necho no\n")  # not executable
    async with qrexec_world(world, policy=allow_work_to_vault, services_dir=svc) as (_daemon, a):
        assert (await a["work"].call("vault", "test.Missing", timeout=30)).exit_code == 127
        assert (await a["work"].call("vault", "test.NotExec", timeout=30)).exit_code == 125
        assert (await a["vault"].call("work", "test.Any", timeout=30)).exit_code == 126


async def test_executable_service_argv_and_env(world: World, tmp_path: Path) -> None:
    svc = tmp_path / "rpc"
    svc.mkdir()
    script = svc / "test.Env"
    script.write_text(
        "#!/bin/sh\n"
        "read line\n"
        'echo "argv=$# [$1] in=$line"\n'
        'echo "remote=$QREXEC_REMOTE_DOMAIN full=$QREXEC_SERVICE_FULL_NAME '
        'arg=${QREXEC_SERVICE_ARGUMENT-unset}"\n'
        "echo err >&2\n"
        "exit 3\n"
    )
    script.chmod(0o755)
    specific = svc / "test.Env+special"
    specific.write_text("#!/bin/sh\necho specific $1\n")
    specific.chmod(0o755)
    async with qrexec_world(world, policy=allow_work_to_vault, services_dir=svc) as (_daemon, a):
        r = await a["work"].call("vault", "test.Env+abc", input=b"in\n", timeout=30)
        assert r.stdout == b"argv=1 [abc] in=in\nremote=work full=test.Env+abc arg=abc\n"
        assert (r.stderr, r.exit_code) == (b"err\n", 3)
        r = await a["work"].call("vault", "test.Env", input=b"x\n", timeout=30)
        assert r.stdout == b"argv=0 [] in=x\nremote=work full=test.Env+ arg=\n"
        r = await a["work"].call("vault", "test.Env+special", timeout=30)
        assert (r.stdout, r.exit_code) == (b"specific special\n", 0)


async def test_dom0_runs_a_command_line(world: World) -> None:
    async with qrexec_world(world) as (daemon, _agents):
        domid, port = await daemon.exec("work", "user:echo hi; cat; echo err >&2; exit 5")
        r = await qrexec.client.run_call(daemon.channels, domid, port, b"stdin!")
        assert (r.stdout, r.stderr, r.exit_code) == (b"hi\nstdin!", b"err\n", 5)


async def test_vm_calls_a_dom0_service(world: World) -> None:
    async with qrexec_world(world, policy=allow_work_to_vault) as (daemon, agents):

        @daemon.service("test.Admin")
        async def admin(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(f"{req.source}:{req.requested_target}:".encode() + await stdin.read())
            return 0

        r = await agents["work"].call("dom0", "test.Admin", input=b"q", timeout=30)
        assert (r.stdout, r.exit_code) == (b"work:dom0:q", 0)
        r = await agents["work"].call("@adminvm", "test.Admin", timeout=30)
        assert (r.stdout, r.exit_code) == (b"work:adminvm:", 0)


@pytest.mark.parametrize("versions", [(2, 4), (4, 3), (4, 4)])
async def test_multichunk_both_ways(world: World, versions: tuple[int, int]) -> None:
    size = 300_000  # > 4 chunks at every version
    data = os.urandom(size)
    async with qrexec_world(
        world, policy=allow_work_to_vault, agent_version=versions[0], daemon_version=versions[1]
    ) as (_daemon, agents):
        assert agents["work"].version == min(versions)

        @agents["vault"].service("test.Cat")
        async def cat(stdin: Reader, stdout: Writer, req: ServiceRequest) -> None:
            while chunk := await stdin.read(10000):
                stdout.write(chunk)
                await stdout.drain()

        r = await agents["work"].call("vault", "test.Cat", input=data, timeout=60)
        assert (r.stdout == data, r.exit_code) == (True, 0)


async def test_stdin_eof_before_and_after_output(world: World) -> None:
    async with qrexec_world(world, policy=allow_work_to_vault) as (_daemon, agents):

        @agents["vault"].service("test.Early")
        async def early(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(b"first ")  # output before reading stdin
            await stdout.drain()
            rest = await stdin.read()
            stdout.write(rest)
            return 0

        @agents["vault"].service("test.Ignore")
        async def ignore(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(b"done")  # never reads stdin
            return 4

        async with qrexec.connect("vault", "test.Early", via=agents["work"]) as (reader, writer):
            assert await reader.readexactly(6) == b"first "
            writer.write(b"after")
            writer.write_eof()
            assert await reader.read() == b"after"
            assert await writer.exit_code() == 0  # type: ignore[attr-defined]
        r = await agents["work"].call("vault", "test.Early", input=b"", timeout=30)
        assert (r.stdout, r.exit_code) == (b"first ", 0)
        r = await agents["work"].call("vault", "test.Ignore", input=b"z" * 200_000, timeout=30)
        assert (r.stdout, r.exit_code) == (b"done", 4)


async def test_socket_service(world: World, tmp_path: Path) -> None:
    svc = tmp_path / "rpc"
    svc.mkdir()
    got: list[bytes] = []

    async def serve(reader: Reader, writer: Writer) -> None:
        got.append(await reader.readuntil(b"\0"))
        writer.write(b"socket says " + await reader.read())
        writer.close()

    server = await asyncio.start_unix_server(serve, str(svc / "test.Sock"))
    world_cm = qrexec_world(world, policy=allow_work_to_vault, services_dir=svc)
    async with server, world_cm as (_, a):
        r = await a["work"].call("vault", "test.Sock+arg", input=b"data", timeout=30)
        assert (r.stdout, r.exit_code) == (b"socket says data", 0)
        assert got == [b"test.Sock+arg work\0"]


async def test_odd_policy_answers_refuse_never_hang(world: World) -> None:
    from aioxen.qrexec import PolicyDecision

    def odd(r: PolicyRequest) -> PolicyDecision | bool:
        if r.service == "to.Nowhere":
            return PolicyDecision.allowed("nowhere")  # no such domain
        if r.service == "bad.Source":
            return PolicyDecision(True, target="vault", user="u", source="not a name")
        raise RuntimeError("policy bug")

    async with qrexec_world(world, policy=odd) as (_, a):
        add_echo(a["vault"])
        for svc in ("to.Nowhere", "explodes"):
            assert (await a["work"].call("vault", svc, timeout=30)).exit_code == 126
        r = await a["work"].call("vault", "bad.Source", timeout=30)
        assert r.exit_code in (125, 126)  # never a hang


async def test_dom0_calls_run_as_the_daemons_default_user(world: World) -> None:
    async with qrexec_world(world) as (daemon, agents):
        daemon.default_user = "alice"

        @agents["vault"].service("test.Who")
        async def who(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(req.user.encode())
            return 0

        assert (await daemon.call("vault", "test.Who", timeout=30)).stdout == b"alice"
        r = await qrexec.call("vault", "test.Who", via=daemon, user="bob", timeout=30)
        assert r.stdout == b"bob"


async def test_connect_never_stalls_on_unread_stderr(world: World) -> None:
    """A service writing far more stderr than a stream buffers (1 MiB here, > the 128 KiB
    a full reader holds before it pauses the channel) must not stall a connect() user who
    reads stdout only: connect() discards stderr unless keep_stderr=True (before, the
    unread stderr paused the channel and stdout never ended: the 60 s guard fired)."""
    async with qrexec_world(world, policy=allow_work_to_vault) as (daemon, agents):

        @agents["vault"].service("test.Noisy")
        async def noisy(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            for _ in range(16):
                req.stderr.write(b"e" * 65536)
                await req.stderr.drain()
            stdout.write(b"the answer")
            return 3

        async with asyncio.timeout(60):
            async with qrexec.connect("vault", "test.Noisy", via=agents["work"]) as (r, wr):
                wr.write_eof()
                assert await r.read() == b"the answer"
                assert await wr.exit_code() == 3  # type: ignore[attr-defined]
                assert await wr.stderr.read() == b""  # type: ignore[attr-defined]
            async with qrexec.connect("vault", "test.Noisy", via=daemon) as (r, wr):
                assert await r.read() == b"the answer"
            # kept: read concurrently, all of it arrives
            cm = qrexec.connect("vault", "test.Noisy", via=agents["work"], keep_stderr=True)
            async with cm as (r, wr):
                err = wr.stderr  # type: ignore[attr-defined]
                out, errs = await asyncio.gather(r.read(), err.read())
                assert (out, len(errs)) == (b"the answer", 16 * 65536)


async def test_data_channel_errors_name_the_peer(world: World) -> None:
    """A peer vanishing mid-call: the error on each side names the other's domain and
    the data channel's port (before: just "qrexec service" / "qrexec caller")."""
    async with qrexec_world(world, policy=allow_work_to_vault) as (_daemon, agents):
        seen: list[str] = []

        @agents["vault"].service("test.Vanish")
        async def vanish(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(b"x")
            await stdout.drain()
            stdout._end.writer.close()  # type: ignore[attr-defined]  # closed, no exit code
            return 0

        @agents["vault"].service("test.Wait")
        async def wait(stdin: Reader, stdout: Writer, req: ServiceRequest) -> int:
            stdout.write(b"ready")
            await stdout.drain()
            try:
                await stdin.read()
            except ConnectionResetError as e:
                seen.append(str(e))
            return 0

        named = r"qrexec service in domain \d+ \(port 5\d\d\) closed"
        with pytest.raises(ConnectionResetError, match=named):
            await agents["work"].call("vault", "test.Vanish", timeout=30)
        async with asyncio.timeout(30):
            async with qrexec.connect("vault", "test.Wait", via=agents["work"]) as (r, wr):
                assert await r.readexactly(5) == b"ready"
                wr._end.writer.close()  # type: ignore[attr-defined]  # gone mid-call
            while not seen:
                await asyncio.sleep(0.01)
        assert re.search(r"qrexec caller in domain \d+ \(port 5\d\d\)", seen[0]), seen
