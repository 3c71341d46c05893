"""The daemon on the wire, against a hand-written agent (raw messages, as Qubes' own socket
tests drive qrexec-daemon): HELLO, port allocation (513+, odd/even towards other VMs),
CONNECTION_TERMINATED bookkeeping, the qrexec-client socket, refusal of malformed
requests, and a hostile agent dropped while the other domains keep being served."""

from __future__ import annotations

import asyncio
import struct
import tempfile
from collections.abc import AsyncIterator

import pytest
from platform_harness import leak_checked
from vchan_harness import InHeapWorld, World

from aioxen.qrexec import Agent, Daemon, VchanChannels
from aioxen.qrexec import wire as w
from aioxen.qrexec.channels import CONTROL_PORT
from aioxen.qrexec.framing import exchange_hello, read_message, write_message

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    wd = InHeapWorld()
    async with leak_checked(wd):
        yield wd


class RawAgent:
    """An agent written by hand: offers port 512 and speaks raw messages."""

    def __init__(self, chans: VchanChannels, version: int = 4) -> None:
        self.chans, self.version = chans, version

    async def accept(self) -> Streams:
        pending = await self.chans.listen(0, CONTROL_PORT, buffer_size=4096)
        r, wr = await pending.accept(timeout=30)
        self.negotiated = await exchange_hello(r, wr, version=self.version, min_version=2)
        self.r, self.w = r, wr
        return r, wr

    async def recv(self) -> tuple[int, bytes]:
        async with asyncio.timeout(30):
            msg = await read_message(self.r, limit=1 << 17)
        assert msg is not None
        return msg.type, msg.payload

    def send(self, t: int, p: bytes) -> None:
        write_message(self.w, t, p)


def trigger4(target: str, ident: str, service: str, source: str = "") -> tuple[int, bytes]:
    return w.MSG_TRIGGER_SERVICE4, struct.pack(
        "<64s64s32s", source.encode(), target.encode(), ident.encode()
    ) + service.encode() + b"\0"


async def test_ports_handshake_and_termination(world: World) -> None:
    raw = RawAgent(VchanChannels(await world.platform(42)), version=3)
    daemon = Daemon(VchanChannels(await world.platform(0)), domains={"vm42": 42})
    async with daemon:
        await raw.accept()
        assert raw.negotiated == 3
        await daemon.wait_connected(timeout=30)
        # dom0 -> VM: ports 513, 514, ... (every port usable towards dom0)
        assert await daemon.exec("vm42", "user:true") == (42, 513)
        assert await raw.recv() == (w.MSG_EXEC_CMDLINE, w.encode_exec_params(0, 513, "user:true"))
        assert await daemon.exec("vm42", "user:x", just_exec=True) == (42, 514)
        t, _ = await raw.recv()
        assert t == w.MSG_JUST_EXEC
        # a termination naming the wrong domain frees nothing; the right one frees the port
        raw.send(w.MSG_CONNECTION_TERMINATED, w.encode_exec_params(7, 513))
        raw.send(w.MSG_CONNECTION_TERMINATED, w.encode_exec_params(0, 514))
        await asyncio.sleep(0.05)
        assert await daemon.exec("vm42", "user:y") == (42, 514)
        await raw.recv()


async def test_odd_even_ports_towards_other_vms(world: World) -> None:
    daemon = Daemon(VchanChannels(await world.platform(0)), domains={"a": 5})
    link = daemon._links["a"]
    assert [link.allocate(9) for _ in range(3)] == [514, 516, 518]  # peer above: odd i
    assert [link.allocate(2) for _ in range(2)] == [513, 515]  # peer below: even i
    assert link.allocate(0) == 517  # dom0: the first free
    link.release(516, 9)
    assert link.allocate(9) == 516


async def test_refusals_and_client_socket(world: World) -> None:
    raw = RawAgent(VchanChannels(await world.platform(42)))
    with tempfile.TemporaryDirectory() as sdir:
        daemon = Daemon(
            VchanChannels(await world.platform(0)),
            domains={"vm42": 42},
            policy=lambda r: r.service == "my.Ok+",
            socket_dir=sdir,
        )
        async with daemon:
            await raw.accept()
            await daemon.wait_connected(timeout=30)
            # denied by policy: SERVICE_REFUSED carrying the ident
            raw.send(*trigger4("dom0", "SOCKET7", "my.No"))
            assert await raw.recv() == (w.MSG_SERVICE_REFUSED, b"SOCKET7".ljust(32, b"\0"))
            # malformed names: refused, not dropped (as Qubes' daemon)
            for bad in ("", "+a", "a\0b"):
                raw.send(*trigger4("dom0", "ab", bad))
                assert await raw.recv() == (w.MSG_SERVICE_REFUSED, b"ab".ljust(32, b"\0"))
            # allowed, target dom0: SERVICE_CONNECT {0, port, ident}
            raw.send(*trigger4("dom0", "SOCKET8", "my.Ok+"))
            t, p = await raw.recv()
            assert t == w.MSG_SERVICE_CONNECT
            assert p == w.encode_exec_params(0, 513, "SOCKET8")
            # the qrexec-client socket: HELLO 3, EXEC_CMDLINE {0,0,DEFAULT:cmd}, answer {42, port}
            cr, cw = await asyncio.open_unix_connection(f"{sdir}/qrexec.vm42")
            assert await exchange_hello(cr, cw, version=3, min_version=2) == 3
            write_message(cw, w.MSG_EXEC_CMDLINE, w.encode_exec_params(0, 0, "DEFAULT:ls"))
            msg = await read_message(cr, limit=8)
            assert msg is not None and msg.type == w.MSG_EXEC_CMDLINE
            assert msg.payload == struct.pack("<II", 42, 514)
            assert await raw.recv() == (
                w.MSG_EXEC_CMDLINE,
                w.encode_exec_params(0, 514, "user:ls"),
            )
            # the client's socket closes when the agent reports the port finished
            raw.send(w.MSG_CONNECTION_TERMINATED, w.encode_exec_params(0, 514))
            async with asyncio.timeout(30):
                assert await cr.read() == b""
            cw.close()
            # SERVICE_CONNECT from a client is not taken: closed at once
            cr, cw = await asyncio.open_unix_connection(f"{sdir}/qrexec.42")
            await exchange_hello(cr, cw, version=3, min_version=2)
            write_message(cw, w.MSG_SERVICE_CONNECT, w.encode_exec_params(43, 513, "SOCKET1"))
            async with asyncio.timeout(30):
                assert await cr.read() == b""
            cw.close()


async def test_hostile_agent_is_dropped_others_keep_working(world: World) -> None:
    raw = RawAgent(VchanChannels(await world.platform(42)))
    good = Agent(VchanChannels(await world.platform(43)))

    @good.service("my.Echo")
    async def echo(stdin: asyncio.StreamReader, stdout: asyncio.StreamWriter, req: object) -> int:
        stdout.write(await stdin.read())
        return 0

    daemon = Daemon(VchanChannels(await world.platform(0)), domains={"bad": 42, "good": 43})
    async with good, daemon:
        await raw.accept()
        await daemon.wait_connected(timeout=30)
        raw.w.write(struct.pack("<II", w.MSG_TRIGGER_SERVICE4, 1 << 30))  # a lie about a length
        async with asyncio.timeout(30):
            assert await raw.r.read() == b""  # dropped
        r = await daemon.call("good", "my.Echo", input=b"still here", timeout=30)
        assert (r.stdout, r.exit_code) == (b"still here", 0)
        # the bad domain's agent may come back: the daemon reconnects
        await raw.accept()
        await daemon.wait_connected("bad", timeout=30)
        raw.send(w.MSG_HELLO, w.encode_hello(4))  # HELLO again mid-session: dropped
        async with asyncio.timeout(30):
            assert await raw.r.read() == b""
        raw.w.close()
        r = await daemon.call("good", "my.Echo", input=b"and here", timeout=30)
        assert r.stdout == b"and here"


async def test_silent_clients_are_dropped(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import aioxen.qrexec.agent as agent_mod
    import aioxen.qrexec.daemon as daemon_mod

    monkeypatch.setattr(daemon_mod, "REQUEST_TIMEOUT", 0.2)
    monkeypatch.setattr(agent_mod, "TRIGGER_TIMEOUT", 0.2)
    agent = Agent(VchanChannels(await world.platform(43)))
    with tempfile.TemporaryDirectory() as sdir:
        daemon = Daemon(VchanChannels(await world.platform(0)), domains={"vm": 43}, socket_dir=sdir)
        async with agent, daemon:
            await agent.start_trigger_socket(f"{sdir}/trigger")
            for path in (f"{sdir}/qrexec.vm", f"{sdir}/trigger"):
                cr, cw = await asyncio.open_unix_connection(path)
                async with asyncio.timeout(30):
                    while await cr.read(100):  # (the daemon's HELLO), then EOF
                        pass
                cw.close()
            await daemon.wait_connected(timeout=30)
            assert daemon.link_up("vm")


async def test_vm_to_vm_across_two_daemons(world: World) -> None:
    """One daemon per VM, as on Qubes: work's daemon asks vault's daemon for the port
    through its qrexec-client socket, then tells work to connect."""
    work = Agent(VchanChannels(await world.platform(2)))
    vault = Agent(VchanChannels(await world.platform(3)))

    @vault.service("my.Echo")
    async def echo(stdin: asyncio.StreamReader, stdout: asyncio.StreamWriter, req: object) -> int:
        stdout.write(b"vault: " + await stdin.read())
        return 0

    with tempfile.TemporaryDirectory() as sdir:
        d_work = Daemon(VchanChannels(await world.platform(0)), domains={"work": 2},
                        policy=lambda r: r.target == "vault", socket_dir=sdir)  # fmt: skip
        d_vault = Daemon(VchanChannels(await world.platform(0)), domains={"vault": 3},
                         socket_dir=sdir)  # fmt: skip
        async with work, vault, d_work, d_vault:
            await d_work.wait_connected(timeout=30)
            await d_vault.wait_connected(timeout=30)
            for _ in range(3):  # ports are released and reused
                r = await work.call("vault", "my.Echo", input=b"hi", timeout=30)
                assert (r.stdout, r.exit_code) == (b"vault: hi", 0)
            assert (await work.call("nowhere", "my.Echo", timeout=30)).exit_code == 126


async def test_trigger_types_follow_the_negotiated_version(world: World) -> None:
    """As Qubes' daemon: TRIGGER_SERVICE only below version 3, TRIGGER_SERVICE3 from 3,
    TRIGGER_SERVICE4 from 4; any other combination drops the agent's link (it may come
    back).  Before, every trigger type was taken at every version."""
    daemon = Daemon(VchanChannels(await world.platform(0)), domains={"vm42": 42})
    async with daemon:
        for version, sent_at in ((2, 3), (2, 4), (3, 2), (3, 4)):
            raw = RawAgent(VchanChannels(await world.platform(42)), version=version)
            await raw.accept()
            await daemon.wait_connected("vm42", timeout=30)
            trig = w.TriggerService("my.Svc+", "dom0", f"ID{version}{sent_at}")
            raw.send(*w.encode_trigger_service(sent_at, trig))
            async with asyncio.timeout(30):
                assert await raw.r.read() == b"", (version, sent_at)  # dropped
            raw.w.close()
        for version in (2, 3, 4):  # the matching type: decided (refused: no policy)
            raw = RawAgent(VchanChannels(await world.platform(42)), version=version)
            await raw.accept()
            await daemon.wait_connected("vm42", timeout=30)
            trig = w.TriggerService("my.Svc+", "dom0", f"OK{version}")
            raw.send(*w.encode_trigger_service(version, trig))
            refused = (w.MSG_SERVICE_REFUSED, f"OK{version}".encode().ljust(32, b"\0"))
            assert await raw.recv() == refused
            raw.w.close()
