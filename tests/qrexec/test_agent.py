"""The agent on the wire, against a hand-written daemon (raw messages): HELLO and the
trigger message of each version, EXEC_CMDLINE served over a data channel and reported
with CONNECTION_TERMINATED, refusal, the qrexec-client-vm trigger socket byte for byte,
and a hostile daemon dropped (the agent offers port 512 again)."""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from collections.abc import AsyncIterator

import pytest
from platform_harness import leak_checked
from vchan_harness import InHeapWorld, World

from aioxen.qrexec import Agent, VchanChannels
from aioxen.qrexec import wire as w
from aioxen.qrexec.channels import CONTROL_PORT
from aioxen.qrexec.data import CallerEnd
from aioxen.qrexec.framing import exchange_hello, read_message, write_message


@pytest.fixture
async def world() -> AsyncIterator[World]:
    wd = InHeapWorld()
    async with leak_checked(wd):
        yield wd


class RawDaemon:
    def __init__(self, chans: VchanChannels, domid: int, version: int = 4) -> None:
        self.chans, self.domid, self.version = chans, domid, version

    async def connect(self) -> None:
        self.r, self.w = await self.chans.connect(self.domid, CONTROL_PORT)
        self.negotiated = await exchange_hello(self.r, self.w, version=self.version, min_version=2)

    async def recv(self) -> tuple[int, bytes]:
        async with asyncio.timeout(30):
            msg = await read_message(self.r, limit=1 << 17)
        assert msg is not None
        return msg.type, msg.payload

    def send(self, t: int, p: bytes) -> None:
        write_message(self.w, t, p)


@pytest.mark.parametrize(
    ("version", "msg_type", "payload"),
    [
        (2, w.MSG_TRIGGER_SERVICE, struct.pack("<64s32s32s", b"my.Svc+a", b"vault", b"SOCKET1")),
        (3, w.MSG_TRIGGER_SERVICE3, struct.pack("<64s32s", b"vault", b"SOCKET1") + b"my.Svc+a\0"),
        (4, w.MSG_TRIGGER_SERVICE4,
         struct.pack("<64s64s32s", b"", b"vault", b"SOCKET1") + b"my.Svc+a\0"),
    ],
)  # fmt: skip
async def test_trigger_per_version_and_refusal(
    world: World, version: int, msg_type: int, payload: bytes
) -> None:
    agent = Agent(VchanChannels(await world.platform(2)))
    daemon = RawDaemon(VchanChannels(await world.platform(0)), 2, version)
    async with agent:
        await agent.wait_listening(timeout=30)
        await daemon.connect()
        assert daemon.negotiated == version
        await agent.wait_connected(timeout=30)
        call = asyncio.ensure_future(agent.call("vault", "my.Svc+a", timeout=30))
        assert await daemon.recv() == (msg_type, payload)
        daemon.send(w.MSG_SERVICE_REFUSED, b"SOCKET1".ljust(32, b"\0"))
        assert (await call).exit_code == 126


async def test_exec_cmdline_then_connection_terminated(world: World) -> None:
    agent = Agent(VchanChannels(await world.platform(2)))
    dom0 = VchanChannels(await world.platform(0))
    daemon = RawDaemon(dom0, 2)
    async with agent:
        await agent.wait_listening(timeout=30)
        await daemon.connect()
        pending = await dom0.listen(2, 513, buffer_size=65536)
        daemon.send(w.MSG_EXEC_CMDLINE, w.encode_exec_params(0, 513, "user:cat; exit 9"))
        r, wr = await pending.accept(timeout=30)
        end = await CallerEnd.open(r, wr)
        out, err, code = await end.communicate(b"x" * 70000)
        assert (len(out), err, code) == (70000, b"", 9)
        await end.aclose()
        assert await daemon.recv() == (
            w.MSG_CONNECTION_TERMINATED,
            w.encode_exec_params(0, 513),
        )
        # a service that does not exist: 127 over the data channel
        pending = await dom0.listen(2, 514, buffer_size=65536)
        daemon.send(w.MSG_EXEC_CMDLINE, w.encode_exec_params(0, 514, "user:QUBESRPC no.Such+ dom0"))
        r, wr = await pending.accept(timeout=30)
        end = await CallerEnd.open(r, wr)
        assert (await end.communicate())[2] == 127
        await end.aclose()
        assert (await daemon.recv())[0] == w.MSG_CONNECTION_TERMINATED


async def test_trigger_socket_speaks_qrexec_client_vm(world: World) -> None:
    agent = Agent(VchanChannels(await world.platform(2)))
    daemon = RawDaemon(VchanChannels(await world.platform(0)), 2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "qrexec-agent")
        async with agent:
            await agent.start_trigger_socket(path)
            await agent.wait_listening(timeout=30)
            await daemon.connect()
            await agent.wait_connected(timeout=30)
            # what qrexec-client-vm writes: TRIGGER_SERVICE4, ident "SOCKET", empty source
            req = struct.pack("<64s64s32s", b"", b"vault", b"SOCKET") + b"my.Svc\0"
            cr, cw = await asyncio.open_unix_connection(path)
            cw.write(struct.pack("<II", w.MSG_TRIGGER_SERVICE4, len(req)) + req)
            t, p = await daemon.recv()
            assert t == w.MSG_TRIGGER_SERVICE4
            ident = w.parse_trigger_service(t, p).request_id
            assert ident.startswith("SOCKET") and ident != "SOCKET"
            daemon.send(w.MSG_SERVICE_CONNECT, w.encode_exec_params(5, 600, ident))
            async with asyncio.timeout(30):
                assert await cr.readexactly(8) == struct.pack("<II", 5, 600)
            cw.close()  # the client finished its call
            assert await daemon.recv() == (
                w.MSG_CONNECTION_TERMINATED,
                w.encode_exec_params(5, 600),
            )
            # refused: the client sees its socket closed (qrexec-client-vm: exit 126)
            cr, cw = await asyncio.open_unix_connection(path)
            cw.write(struct.pack("<II", w.MSG_TRIGGER_SERVICE4, len(req)) + req)
            t, p = await daemon.recv()
            ident = w.parse_trigger_service(t, p).request_id
            daemon.send(w.MSG_SERVICE_REFUSED, w.encode_service_params(ident))
            async with asyncio.timeout(30):
                assert await cr.read() == b""
            cw.close()
            # garbage on the trigger socket: that client is closed, nothing reaches dom0
            cr, cw = await asyncio.open_unix_connection(path)
            cw.write(struct.pack("<II", w.MSG_EXEC_CMDLINE, 4) + b"abcd")
            async with asyncio.timeout(30):
                assert await cr.read() == b""
            cw.close()


async def test_hostile_daemon_is_dropped_and_port_512_offered_again(world: World) -> None:
    agent = Agent(VchanChannels(await world.platform(2)))

    @agent.service("my.Echo")
    async def echo(stdin: asyncio.StreamReader, stdout: asyncio.StreamWriter, req: object) -> int:
        stdout.write(await stdin.read())
        return 0

    dom0 = VchanChannels(await world.platform(0))
    async with agent:
        await agent.wait_listening(timeout=30)
        bad = RawDaemon(dom0, 2)
        await bad.connect()
        bad.send(w.MSG_TRIGGER_SERVICE4, b"x" * 200)  # daemons never send triggers
        async with asyncio.timeout(30):
            assert await bad.r.read() == b""
        bad.w.close()
        good = RawDaemon(dom0, 2)
        await good.connect()  # the agent serves the next daemon
        pending = await dom0.listen(2, 513, buffer_size=65536)
        good.send(w.MSG_EXEC_CMDLINE, w.encode_exec_params(0, 513, "u:QUBESRPC my.Echo+ dom0"))
        r, wr = await pending.accept(timeout=30)
        end = await CallerEnd.open(r, wr)
        assert await end.communicate(b"ok") == (b"ok", b"", 0)
        await end.aclose()
        good.w.close()
