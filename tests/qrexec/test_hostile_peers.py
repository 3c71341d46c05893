"""Hostile peers against the Agent and the Daemon: a hostile daemon on the agent's control
channel, a hostile agent on the daemon's, and hostile local clients on the daemon's
client socket and the agent's trigger socket.  Scripted messages check that the bad
connection is dropped with a clear error (logged, naming what was wrong); hypothesis-made
message sequences check that, whatever arrives, the agent/daemon never fails for real
(no ERROR log: no unexpected exception) and keeps serving a well-behaved peer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from platform_harness import leak_checked
from vchan_harness import InHeapWorld, UnixWorld, World, Xenstored

from aioxen import qrexec
from aioxen.qrexec import Agent, Daemon, PolicyRequest, VchanChannels
from aioxen.qrexec import wire as w
from aioxen.qrexec.channels import CONTROL_PORT
from aioxen.qrexec.data import CallerEnd
from aioxen.qrexec.framing import exchange_hello

pytestmark = pytest.mark.timeout(600)
GUARD = 30  # seconds; only reached if something hangs
AGENT, EVIL, GOOD = 2, 42, 43
_ports = itertools.count(600)

HYPO = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def qrexec_xenstored_h(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = Xenstored(tmp_path_factory.mktemp("qhostile") / "root")
    yield server
    assert server.stop() == 0


@pytest.fixture(params=["inheap", "unix"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    wd: World = (
        InHeapWorld()
        if request.param == "inheap"
        else UnixWorld(request.getfixturevalue("qrexec_xenstored_h"))
    )
    async with leak_checked(wd):
        yield wd


@pytest.fixture
async def heap() -> AsyncIterator[World]:
    wd = InHeapWorld()
    async with leak_checked(wd):
        yield wd


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    import aioxen.qrexec.daemon as daemon_mod

    monkeypatch.setattr(daemon_mod, "RECONNECT_DELAY", 0.01)


def echo_service(agent: Agent) -> None:
    @agent.service("my.Echo")
    async def echo(stdin: asyncio.StreamReader, stdout: asyncio.StreamWriter, req: Any) -> int:
        stdout.write(await stdin.read())
        return 0


def no_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged at ERROR: every bad input was handled as a protocol error (an
    unexpected exception is logged with ``log.exception``)."""
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() + str(r.exc_info) for r in bad]


def hdr(t: int, n: int) -> bytes:
    return struct.pack("<II", t, n)


def msg(t: int, payload: bytes) -> bytes:
    return hdr(t, len(payload)) + payload


async def read_to_end(reader: asyncio.StreamReader) -> None:
    """Read until the peer drops us (EOF or reset)."""
    async with asyncio.timeout(GUARD):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass


# -- hostile message material ----------------------------------------------------------------

_TYPES = [
    w.MSG_EXEC_CMDLINE,
    w.MSG_JUST_EXEC,
    w.MSG_SERVICE_CONNECT,
    w.MSG_SERVICE_REFUSED,
    w.MSG_TRIGGER_SERVICE,
    w.MSG_TRIGGER_SERVICE3,
    w.MSG_TRIGGER_SERVICE4,
    w.MSG_CONNECTION_TERMINATED,
    w.MSG_HELLO,
    w.MSG_DATA_STDOUT,
    0,
    0xFFFFFFFF,
]


def _payloads() -> st.SearchStrategy[bytes]:
    exec_params = st.builds(
        lambda d, p, c: struct.pack("<II", d, p) + c,
        st.sampled_from([0, 1, 2, 42, 0xFFFFFFFF]),
        st.sampled_from([0, 513, 1, 0xFFFFFFFF]),
        st.sampled_from([b"", b"\0", b"u:true\0", b"x", b"u:QUBESRPC my.Echo+ dom0\0", b"a\0b\0"]),
    )
    trigger = st.builds(
        lambda src, tgt, ident, name: (
            src.ljust(64, b"\0")[:64]
            + tgt.ljust(64, b"\0")[:64]
            + ident.ljust(32, b"\0")[:32]
            + name
        ),
        st.sampled_from([b"", b"work", b"x" * 64]),
        st.sampled_from([b"good", b"evil", b"@default", b"dom0", b"v m", b""]),
        st.sampled_from([b"SOCKET1", b"S/1", b"", b"x" * 32]),
        st.sampled_from([b"my.Echo\0", b"\0", b"+x\0", b"../x\0", b"my.Echo", b"a\0b\0"]),
    )
    return st.one_of(st.binary(max_size=200), exec_params, trigger)


# a message: (type, payload, how its length is told: "true", "short", "long", "huge")
_messages = st.tuples(
    st.sampled_from(_TYPES), _payloads(), st.sampled_from(["true", "true", "long", "huge"])
)


def encode(messages: list[tuple[int, bytes, str]]) -> bytes:
    out = b""
    for t, p, how in messages:
        n = {"true": len(p), "long": len(p) + 5, "huge": 0x7FFFFFFF}[how]
        out += hdr(t, n) + p
        if how != "true":
            break  # the rest would be read as this message's body
    return out


# -- a hostile daemon against the Agent ------------------------------------------------------


async def good_daemon_call(dom0: VchanChannels) -> None:
    """A well-behaved daemon runs one call on the agent (then goes away)."""
    r, wr = await dom0.connect(AGENT, CONTROL_PORT)
    try:
        async with asyncio.timeout(GUARD):
            await exchange_hello(r, wr, version=4, min_version=2)
            port = next(_ports)
            pending = await dom0.listen(AGENT, port, buffer_size=65536)
            wr.write(
                msg(w.MSG_EXEC_CMDLINE, w.encode_exec_params(0, port, "u:QUBESRPC my.Echo dom0"))
            )
            dr, dw = await pending.accept(timeout=GUARD)
            end = await CallerEnd.open(dr, dw)
            assert await end.communicate(b"fine") == (b"fine", b"", 0)
            await end.aclose()
    finally:
        wr.close()
        with contextlib.suppress(ConnectionError):
            await wr.wait_closed()


@pytest.fixture
async def agent_rig(world: World) -> AsyncIterator[tuple[Agent, VchanChannels]]:
    agent = Agent(VchanChannels(await world.platform(AGENT)))
    echo_service(agent)
    dom0 = VchanChannels(await world.platform(0))
    async with agent:
        await agent.wait_listening(timeout=GUARD)
        yield agent, dom0


@pytest.mark.parametrize(
    "sent, logged",
    [
        (hdr(w.MSG_EXEC_CMDLINE, 0x7FFFFFFF), "declares 2147483647 bytes, more than its limit"),
        (msg(w.MSG_TRIGGER_SERVICE4, b"x" * 200), "a daemon does not send MSG_TRIGGER_SERVICE4"),
        (msg(w.MSG_HELLO, b"\4\0\0\0"), "a daemon does not send MSG_HELLO"),
        (msg(0xDEAD, b""), "a daemon does not send message type 0xdead"),
        (msg(w.MSG_EXEC_CMDLINE, struct.pack("<II", 0, 513) + b"u:ls"), "not NUL-terminated"),
        (msg(w.MSG_EXEC_CMDLINE, struct.pack("<II", 0, 513)), "has no command line"),
        (msg(w.MSG_EXEC_CMDLINE, b"\0\0"), "has no command line"),
        (msg(w.MSG_SERVICE_REFUSED, b"SOCKET1"), "service_params must be 32 bytes, got 7"),
        (msg(w.MSG_SERVICE_REFUSED, b"S" * 32), "request_id: no NUL terminator"),
        (hdr(w.MSG_JUST_EXEC, 20) + b"cut", "stream ended inside MSG_JUST_EXEC"),
    ],
)
async def test_agent_drops_a_hostile_daemon(
    agent_rig: tuple[Agent, VchanChannels],
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    logged: str,
) -> None:
    _agent, dom0 = agent_rig
    r, wr = await dom0.connect(AGENT, CONTROL_PORT)
    await exchange_hello(r, wr, version=4, min_version=2)
    with caplog.at_level(logging.WARNING, logger="aioxen.qrexec"):
        wr.write(sent)
        if sent.endswith(b"cut"):
            wr.close()  # the stream ends inside the message
        await read_to_end(r)  # dropped
        wr.close()
        await good_daemon_call(dom0)  # the agent offers port 512 again and serves
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops and logged in drops[0], drops
    no_errors(caplog)


@HYPO
@given(st.lists(_messages, min_size=1, max_size=4))
async def test_agent_survives_random_daemons(
    agent_rig: tuple[Agent, VchanChannels],
    caplog: pytest.LogCaptureFixture,
    messages: list[tuple[int, bytes, str]],
) -> None:
    _agent, dom0 = agent_rig
    r, wr = await dom0.connect(AGENT, CONTROL_PORT)
    await exchange_hello(r, wr, version=4, min_version=2)
    wr.write(encode(messages))
    wr.close()  # whatever it was, this daemon is gone now
    await read_to_end(r)
    await good_daemon_call(dom0)
    no_errors(caplog)


# -- a hostile agent against the Daemon -----------------------------------------------------


@pytest.fixture
async def daemon_rig(world: World) -> AsyncIterator[tuple[Daemon, VchanChannels]]:
    good = Agent(VchanChannels(await world.platform(GOOD)))
    echo_service(good)
    evil = VchanChannels(await world.platform(EVIL))
    daemon = Daemon(VchanChannels(await world.platform(0)), domains={"evil": EVIL, "good": GOOD})
    async with good, daemon:
        await daemon.wait_connected("good", timeout=GUARD)
        yield daemon, evil


async def evil_session(evil: VchanChannels) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    pending = await evil.listen(0, CONTROL_PORT, buffer_size=4096)
    try:
        r, wr = await pending.accept(timeout=GUARD)  # the daemon (re)connects
    finally:
        pending.close()
    await exchange_hello(r, wr, version=4, min_version=2)
    return r, wr


async def still_serving(daemon: Daemon) -> None:
    res = await daemon.call("good", "my.Echo", input=b"still here", timeout=GUARD)
    assert (res.stdout, res.exit_code) == (b"still here", 0)


def trig4(target: bytes, ident: bytes, name: bytes) -> bytes:
    return bytes(64) + target.ljust(64, b"\0") + ident.ljust(32, b"\0") + name


@pytest.mark.parametrize(
    "sent, logged",
    [
        (hdr(w.MSG_TRIGGER_SERVICE4, 1 << 30), "declares 1073741824 bytes"),
        (msg(w.MSG_EXEC_CMDLINE, b"\0" * 9), "an agent does not send MSG_EXEC_CMDLINE"),
        (msg(w.MSG_DATA_STDOUT, b"x"), "an agent does not send MSG_DATA_STDOUT"),
        (msg(w.MSG_CONNECTION_TERMINATED, b"\0" * 9), "more than its limit of 8"),
        (msg(w.MSG_CONNECTION_TERMINATED, b"\0" * 7), "must be 8 bytes, got 7"),
        (msg(w.MSG_TRIGGER_SERVICE, b"\0" * 128), "MSG_TRIGGER_SERVICE at negotiated protocol"),
        (msg(w.MSG_TRIGGER_SERVICE3, b"\0" * 95), "of 95 bytes has no service name"),
        (msg(w.MSG_TRIGGER_SERVICE4, trig4(b"good", b"S/1", b"my.Echo\0")), "request ident"),
        (msg(w.MSG_TRIGGER_SERVICE4, b"\0" * 160), "has no service name"),
        (hdr(w.MSG_TRIGGER_SERVICE3, 120) + b"cut", "stream ended inside MSG_TRIGGER_SERVICE3"),
    ],
)
async def test_daemon_drops_a_hostile_agent(
    daemon_rig: tuple[Daemon, VchanChannels],
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    logged: str,
) -> None:
    daemon, evil = daemon_rig
    with caplog.at_level(logging.WARNING, logger="aioxen.qrexec"):
        r, wr = await evil_session(evil)
        wr.write(sent)
        if sent.endswith(b"cut"):
            wr.close()
        await read_to_end(r)
        wr.close()
        await still_serving(daemon)
        # the daemon reconnects to the hostile domain's next agent
        r, wr = await evil_session(evil)
        wr.close()
    drops = [r.getMessage() for r in caplog.records if "dropped domain evil" in r.getMessage()]
    assert drops and logged in drops[0], drops
    no_errors(caplog)


@pytest.mark.parametrize(
    "name, target",
    [(b"\0", b"good"), (b"+x\0", b"good"), (b"../x\0", b"good"), (b"a\0b\0", b"good"),
     (b"my.Echo\0", b"v m"), (b"my.Echo", b"good")],
)  # fmt: skip
async def test_daemon_refuses_bad_names_and_keeps_the_link(
    daemon_rig: tuple[Daemon, VchanChannels], name: bytes, target: bytes
) -> None:
    """A valid ident with a bad name: SERVICE_REFUSED for that ident, the link stays."""
    daemon, evil = daemon_rig
    r, wr = await evil_session(evil)
    wr.write(msg(w.MSG_TRIGGER_SERVICE4, trig4(target, b"SOCKET9", name)))
    async with asyncio.timeout(GUARD):
        head = await r.readexactly(8)
        body = await r.readexactly(struct.unpack("<II", head)[1])
    assert struct.unpack("<I", head[:4])[0] == w.MSG_SERVICE_REFUSED
    assert w.parse_service_params(body) == "SOCKET9"
    assert daemon.link_up("evil")
    wr.close()
    await still_serving(daemon)


@HYPO
@given(st.lists(_messages, min_size=1, max_size=4))
async def test_daemon_survives_random_agents(
    daemon_rig: tuple[Daemon, VchanChannels],
    caplog: pytest.LogCaptureFixture,
    messages: list[tuple[int, bytes, str]],
) -> None:
    daemon, evil = daemon_rig
    r, wr = await evil_session(evil)
    wr.write(encode(messages))
    wr.close()
    await read_to_end(r)
    await still_serving(daemon)
    no_errors(caplog)


# -- hostile local clients: the daemon's client socket and the agent's trigger socket ------------


def allow_work(r: PolicyRequest) -> bool:
    return r.source == "work" and r.target == "vault"


@pytest.fixture
async def sockets_rig(heap: World) -> AsyncIterator[dict[str, Any]]:
    work = Agent(VchanChannels(await heap.platform(2)))
    vault = Agent(VchanChannels(await heap.platform(3)))
    echo_service(vault)
    with tempfile.TemporaryDirectory() as d:
        daemon = Daemon(
            VchanChannels(await heap.platform(0)),
            domains={"work": 2, "vault": 3},
            policy=allow_work,
            socket_dir=d,
        )
        async with work, vault, daemon:
            trigger = os.path.join(d, "trigger")
            await work.start_trigger_socket(trigger)
            await daemon.wait_connected(timeout=GUARD)
            await work.wait_connected(timeout=GUARD)
            yield {"daemon": daemon, "work": work, "dir": d, "trigger": trigger}


async def sockets_still_serve(rig: dict[str, Any]) -> None:
    """A good qrexec-client and a good qrexec-client-vm are served."""
    res = await qrexec.call(
        "vault", "my.Echo", input=b"c", via=rig["dir"], channels=rig["daemon"].channels,
        timeout=GUARD,
    )  # fmt: skip
    assert (res.stdout, res.exit_code) == (b"c", 0)
    res = await qrexec.call(
        "vault", "my.Echo", input=b"t", via=rig["trigger"], channels=rig["work"].channels,
        timeout=GUARD,
    )  # fmt: skip
    assert (res.stdout, res.exit_code) == (b"t", 0)


@pytest.mark.parametrize(
    "sent, logged",
    [
        (b"", "channel closed before its MSG_HELLO"),
        (msg(w.MSG_EXEC_CMDLINE, b"x"), "expected MSG_HELLO first"),
        (msg(w.MSG_HELLO, b"\1\0\0\0"), "version 1; at least 2"),
        (msg(w.MSG_HELLO, b"\3\0\0\0") + hdr(w.MSG_EXEC_CMDLINE, 1 << 20), "declares 1048576"),
        (msg(w.MSG_HELLO, b"\3\0\0\0") + msg(w.MSG_SERVICE_CONNECT, b"x"), "does not take"),
        (msg(w.MSG_HELLO, b"\3\0\0\0") + msg(w.MSG_EXEC_CMDLINE, b"\0" * 8), "no command line"),
    ],
)
async def test_client_socket_drops_hostile_clients(
    sockets_rig: dict[str, Any], caplog: pytest.LogCaptureFixture, sent: bytes, logged: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="aioxen.qrexec"):
        r, wr = await asyncio.open_unix_connection(os.path.join(sockets_rig["dir"], "qrexec.vault"))
        wr.write(sent)
        if not sent:
            wr.write_eof()
        await read_to_end(r)
        wr.close()
        await sockets_still_serve(sockets_rig)
    warned = [r.getMessage() for r in caplog.records if "client of vault" in r.getMessage()]
    assert warned and logged in warned[0], warned
    no_errors(caplog)


@pytest.mark.parametrize(
    "sent, logged",
    [
        (msg(w.MSG_TRIGGER_SERVICE3, b"\0" * 100), "wants MSG_TRIGGER_SERVICE4"),
        (hdr(w.MSG_TRIGGER_SERVICE4, 1 << 20), "declares 1048576"),
        (msg(w.MSG_TRIGGER_SERVICE4, b"\0" * 160), "no service name"),
        (msg(w.MSG_TRIGGER_SERVICE4, trig4(b"vault", b"S/1", b"my.Echo\0")), "request ident"),
        (msg(w.MSG_TRIGGER_SERVICE4, trig4(b"vault", b"SOCKET", b"../x\0")), "invalid"),
    ],
)
async def test_trigger_socket_drops_hostile_clients(
    sockets_rig: dict[str, Any], caplog: pytest.LogCaptureFixture, sent: bytes, logged: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="aioxen.qrexec"):
        r, wr = await asyncio.open_unix_connection(sockets_rig["trigger"])
        wr.write(sent)
        await read_to_end(r)
        wr.close()
        await sockets_still_serve(sockets_rig)
    warned = [r.getMessage() for r in caplog.records if "trigger-socket" in r.getMessage()]
    assert warned and logged in warned[0], warned
    no_errors(caplog)


@HYPO
@given(st.binary(max_size=16), st.lists(_messages, max_size=3), st.booleans())
async def test_sockets_survive_random_clients(
    sockets_rig: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    prefix: bytes,
    messages: list[tuple[int, bytes, str]],
    trigger_socket: bool,
) -> None:
    path = (
        sockets_rig["trigger"]
        if trigger_socket
        else os.path.join(sockets_rig["dir"], "qrexec.vault")
    )
    _, wr = await asyncio.open_unix_connection(path)
    wr.write(prefix + encode(messages))
    await wr.drain()
    # not waiting to be dropped: a sequence may happen to be a valid request, which the
    # daemon rightly keeps open until its call ends
    wr.close()
    await sockets_still_serve(sockets_rig)
    no_errors(caplog)
