"""One owner per vchan port, and bounded handshakes (issue 13, findings 2 and 3).

* A second server on the same (server domid, client domid, port) fails at once with
  ``EADDRINUSE`` naming the holder; the first keeps serving and its advertisement
  survives the second's exit; a SIGKILLed server's advertisement is taken over.
* A half-open client -- one that binds the advertised event channel (and maybe maps the
  page and claims it) and then stalls -- does not stop other clients, and is dropped
  after ``handshake_timeout``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from vchan_harness import StoreWired, World, Xenstored, echo

from aioxen import vchan
from aioxen.native import SharedBuffer
from aioxen.ownership import ResourceBusy
from aioxen.platforms.base import EventChannel, Mapping, Platform
from aioxen.platforms.unix import UnixPlatform
from aioxen.vchan import advertise, wire
from aioxen.vchan.endpoint import RETIRED, PendingServer, vchan_path
from aioxen.xenstore import XenStoreClient

SERVER, CLIENT = 1, 2
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(120)


async def talk(client: Platform, port: str, message: bytes) -> bytes:
    async with vchan.connect(SERVER, port, platform=client, timeout=30) as (reader, writer):
        writer.write(message)
        writer.write_eof()
        return await reader.read()


async def read_key(world: World, path: str) -> bytes | None:
    try:
        return await world.read_store(path)  # type: ignore[attr-defined,no-any-return]
    except FileNotFoundError:
        return None


# -- one owner per port ------------------------------------------------------------------


async def test_second_server_on_the_same_port_is_refused(world: World) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "owned")
    first = await vchan.start_server(echo, CLIENT, "owned", platform=srv)
    ring_ref = await read_key(world, f"{path}/ring-ref")
    assert ring_ref is not None
    for start in (vchan.start_server, vchan.create_server):
        with pytest.raises(ResourceBusy) as info:
            await start(echo, CLIENT, "owned", platform=srv)  # type: ignore[operator]
        assert info.value.errno == errno.EADDRINUSE
        assert isinstance(info.value, OSError)
        assert path in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    # the single-connection server claims the same way
    with pytest.raises(ResourceBusy):
        await vchan.accept(CLIENT, "owned", platform=srv, timeout=30)
    # the refused servers touched nothing: same advertisement, still served
    assert await read_key(world, f"{path}/ring-ref") == ring_ref
    assert await talk(cli, "owned", b"still mine") == b"still mine"
    assert first.is_serving()
    first.close()
    await first.wait_closed()
    assert await read_key(world, f"{path}/ring-ref") is None
    # once released the port can be served again
    again = await vchan.start_server(echo, CLIENT, "owned", platform=srv)
    assert await talk(cli, "owned", b"again") == b"again"
    again.close()
    await again.wait_closed()


async def test_racing_servers_exactly_one_wins(world: World) -> None:
    """Claims race through XenStore transactions (one store connection each)."""
    platforms = [await world.platform(SERVER) for _ in range(6)]
    results = await asyncio.gather(
        *(vchan.start_server(echo, CLIENT, "race", platform=p) for p in platforms),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, vchan.VchanServer)]
    losers = [r for r in results if not isinstance(r, vchan.VchanServer)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ResourceBusy) for r in losers), losers
    cli = await world.platform(CLIENT)
    assert await talk(cli, "race", b"one") == b"one"
    winners[0].close()
    await winners[0].wait_closed()


async def test_close_right_after_start_releases_the_claim(world: World) -> None:
    """close() before the accept task ever ran still withdraws the advertisement."""
    srv = await world.platform(SERVER)
    path = vchan_path(SERVER, CLIENT, "quick")
    for _ in range(5):
        server = await vchan.start_server(echo, CLIENT, "quick", platform=srv)
        server.close()
        await server.wait_closed()
        assert await read_key(world, path) is None


async def test_record_left_by_a_lost_store_connection_does_not_block_us(world: World) -> None:
    """The server could not remove its record (its XenStore connection died): this
    process knows it no longer holds that claim, so its next server takes over."""
    first_plat = await world.platform(SERVER)
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "lost")
    first = await vchan.start_server(echo, CLIENT, "lost", platform=first_plat)
    await first_plat.store.close()
    first.close()
    await first.wait_closed()
    assert await read_key(world, f"{path}/{advertise.OWNER}") is not None  # left behind
    second = await vchan.start_server(echo, CLIENT, "lost", platform=srv)
    assert await talk(cli, "lost", b"taken over") == b"taken over"
    second.close()
    await second.wait_closed()
    assert await read_key(world, path) is None


async def test_publish_retries_conflicts_in_one_layer_only(world: World) -> None:
    """``store.transact`` retries a conflicting advertisement transaction itself;
    ``publish`` adds no second retry layer around it: every commit here conflicts (a
    write outside the transaction lands just before it), and the conflict surfaces after
    transact's own attempts (1 + ADVERTISE_RETRIES), not 50 times as many."""
    from aioxen.xenstore import TransactionConflict

    srv = await world.platform(SERVER)
    store: Any = srv.store
    path = vchan_path(SERVER, CLIENT, "conflict")
    real_transaction = store.transaction
    starts = 0

    class Interfered:  # a spy around the real transaction
        def __init__(self, tx: Any) -> None:
            self.tx = tx

        async def __aenter__(self) -> Any:
            nonlocal starts
            starts += 1
            return await self.tx.__aenter__()

        async def __aexit__(self, *exc: Any) -> Any:
            if exc[0] is None:  # outside the transaction: the commit must conflict
                await store.write(f"{path}/{advertise.RING_REF}", b"1")
            return await self.tx.__aexit__(*exc)

    store.transaction = lambda **kw: Interfered(real_transaction(**kw))
    owner = advertise.server_owner(srv, path)
    try:
        with pytest.raises(TransactionConflict):
            await advertise.publish(srv, path, CLIENT, 8, 9, owner)
    finally:
        del store.transaction
    assert starts == 1 + advertise.ADVERTISE_RETRIES


async def test_other_ports_and_clients_are_independent(world: World) -> None:
    srv = await world.platform(SERVER)
    servers = [
        await vchan.start_server(echo, CLIENT, "indep", platform=srv),
        await vchan.start_server(echo, CLIENT, "indep2", platform=srv),
        await vchan.start_server(echo, 3, "indep", platform=srv),
    ]
    for s in servers:
        s.close()
        await s.wait_closed()


async def test_owner_record_is_hidden_from_the_client(world: World) -> None:
    """The extra key is readable by the server domain only; clients read the two
    libxenvchan keys as before."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "hidden")
    server = await vchan.start_server(echo, CLIENT, "hidden", platform=srv)
    record = json.loads(await srv.store.read(f"{path}/{advertise.OWNER}"))
    assert record["pid"] == os.getpid() and record["domid"] == SERVER
    with pytest.raises(PermissionError):
        await cli.store.read(f"{path}/{advertise.OWNER}")
    assert await advertise.read(cli, path) is not None
    server.close()
    await server.wait_closed()


async def test_publish_is_four_round_trips(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """The claiming advertisement transaction is pipelined (and withdrawing it three
    round trips instead of four): start; the owner key and
    ``event-channel`` read together; the owner record, both keys and their permissions
    written together; commit -- four socket writes to xenstored (seven before: the
    owner read, its write, its permissions and the leftover check each waited for their
    reply).  Same result: keys, permissions, owner record; a libxenvchan leftover
    (keys without an owner) is still reported and replaced."""
    from aioxen.xenstore import Perm

    srv = await world.platform(SERVER)
    store: Any = srv.store
    path = vchan_path(SERVER, CLIENT, "fourtrips")
    await store.write(f"{path}/{advertise.EVENT_CHANNEL}", b"77")  # a libxenvchan leftover
    transport = store._transport
    writes = getattr(transport, "writes", None)  # socket transports count their writes
    owner = advertise.server_owner(srv, path)
    with caplog.at_level("WARNING", logger="aioxen.vchan"):
        await advertise.publish(srv, path, CLIENT, 8, 9, owner)
    if writes is not None:
        assert transport.writes - writes == 4
    assert "without an owner record" in caplog.text
    assert await store.read(f"{path}/{advertise.RING_REF}") == b"8"
    assert await store.read(f"{path}/{advertise.EVENT_CHANNEL}") == b"9"
    for key in (advertise.RING_REF, advertise.EVENT_CHANNEL):
        assert await store.get_perms(f"{path}/{key}") == [Perm(SERVER, "n"), Perm(CLIENT, "r")]
    assert await store.get_perms(f"{path}/{advertise.OWNER}") == [Perm(SERVER, "n")]
    assert json.loads(await store.read(f"{path}/{advertise.OWNER}"))["claim"] == owner.claim
    other = advertise.server_owner(srv, path)
    with pytest.raises(ResourceBusy):
        await advertise.publish(srv, path, CLIENT, 10, 11, other)
    assert await store.read(f"{path}/{advertise.RING_REF}") == b"8"  # untouched
    await advertise.withdraw(srv, path, other)  # not ours: nothing removed
    assert await store.read(f"{path}/{advertise.RING_REF}") == b"8"
    writes = getattr(transport, "writes", None)
    await advertise.withdraw(srv, path, owner)
    if writes is not None:  # start; owner check; removal + commit (4 before)
        assert transport.writes - writes == 3
    with pytest.raises(FileNotFoundError):
        await store.read(path)


async def test_dead_owner_is_taken_over_and_live_foreign_one_is_not(world: World) -> None:
    """Owner records of a dead process (pid gone / pid reused) are reclaimed."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "stale")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    gone = advertise.server_owner(srv, path)
    boot = gone.boot
    dead_records = [
        {"pid": proc.pid, "start": gone.start, "boot": boot, "claim": "x1"},  # pid gone
        {"pid": 1, "start": 10**12, "boot": boot, "claim": "x2"},  # pid 1, other start time
    ]
    for record in dead_records:
        await srv.store.write(f"{path}/ring-ref", b"77")
        await srv.store.write(f"{path}/event-channel", b"77")
        await srv.store.write(f"{path}/{advertise.OWNER}", json.dumps(record).encode())
        server = await vchan.start_server(echo, CLIENT, "stale", platform=srv)
        assert await talk(cli, "stale", b"reclaimed") == b"reclaimed"
        server.close()
        await server.wait_closed()
        assert await read_key(world, path) is None
    # a live foreign owner (pid 1, its real start time) is not
    live = json.dumps({"pid": 1, "start": None, "boot": boot, "claim": "x3"}).encode()
    await srv.store.write(f"{path}/{advertise.OWNER}", live)
    with pytest.raises(ResourceBusy, match="pid 1"):
        await vchan.start_server(echo, CLIENT, "stale", platform=srv)
    assert await srv.store.read(f"{path}/{advertise.OWNER}") == live
    await srv.store.rm(path)


# -- half-open clients -------------------------------------------------------------------


class HalfOpen:
    """A raw client that binds the advertised port (and with ``claim``, maps the control
    page and claims it, 2 -> 3) and then does nothing more."""

    def __init__(self, channel: EventChannel, mapping: Mapping | None) -> None:
        self.channel = channel
        self.mapping = mapping

    @classmethod
    async def attach(cls, plat: Platform, port: str, *, claim: bool) -> HalfOpen:
        path = vchan_path(SERVER, plat.domid, port)
        async with asyncio.timeout(30):
            while True:  # the server may re-advertise between our read and our bind
                ad = await advertise.read(plat, path)
                if ad is None:
                    await asyncio.sleep(0.01)
                    continue
                ring_ref, port_no = ad
                try:
                    channel = await plat.events.connect(SERVER, port_no)
                except ConnectionError:
                    continue
                if not claim:
                    return cls(channel, None)
                try:
                    mapping = plat.grants.map(SERVER, [ring_ref], writable=True)
                except (FileNotFoundError, PermissionError):
                    channel.close()
                    continue
                sb = SharedBuffer(mapping.buf)
                try:
                    old = sb.fetch_or_u8(wire.CLI_LIVE, 1)
                finally:
                    sb.release()
                if old == wire.LIVE_WAITING:
                    return cls(channel, mapping)
                mapping.close()
                channel.close()

    async def wait_dropped(self) -> None:
        """Until the server released the endpoint: the channel's peer is gone."""
        async with asyncio.timeout(60):
            while True:
                try:
                    await self.channel.wait()
                except ConnectionResetError:
                    return

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
        self.channel.close()


@pytest.mark.parametrize("claim", [False, True], ids=["bound", "claimed"])
async def test_half_open_client_does_not_block_others(world: World, claim: bool) -> None:
    srv = await world.platform(SERVER)
    evil = await world.platform(CLIENT)
    good = await world.platform(CLIENT)
    server = await vchan.start_server(echo, CLIENT, "halfopen", platform=srv, handshake_timeout=0.3)
    attacker = await HalfOpen.attach(evil, "halfopen", claim=claim)
    try:
        # a well-behaved client connects and exchanges data while the attacker stalls
        for i in range(3):
            msg = f"hello {i}".encode() * 1000
            assert await talk(good, "halfopen", msg) == msg
        await attacker.wait_dropped()
        assert server.dropped >= 1
        assert server.accepted == 3
    finally:
        attacker.close()
        server.close()
        await server.wait_closed()


async def test_libxenvchan_style_client_may_finish_on_a_retired_endpoint(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a bind is invisible (Xen), an idle endpoint is retired and re-advertised every
    bound; a libxenvchan client (no claim) half-way through its handshake on it still goes
    live by storing ``cli_live = 1``, and is served."""
    monkeypatch.setattr(PendingServer, "maybe_bound", lambda self: None)
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "cstyle")
    connected = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()
        writer.close()

    server = await vchan.start_server(
        on_client, CLIENT, "cstyle", platform=srv, handshake_timeout=0.2
    )
    ad = await advertise.read(cli, path)
    assert ad is not None
    channel = await cli.events.connect(SERVER, ad[1])
    mapping = cli.grants.map(SERVER, [ad[0]], writable=True)
    try:
        async with asyncio.timeout(30):  # until the server retired it
            while wire.live_byte(mapping.buf, wire.CLI_LIVE) != wire.LIVE_WAITING | RETIRED:
                await asyncio.sleep(0.02)
        assert await advertise.read(cli, path) != ad  # a fresh endpoint is advertised
        sb = SharedBuffer(mapping.buf)
        sb.store_u8(wire.SRV_NOTIFY, wire.NOTIFY_WRITE)
        sb.store_u8(wire.CLI_LIVE, wire.LIVE_CONNECTED)
        sb.release()
        channel.notify()
        async with asyncio.timeout(30):
            await connected.wait()
        assert server.accepted == 1 and server.dropped == 0
    finally:
        mapping.close()
        channel.close()
        server.close()
        await server.wait_closed()
        server.abort_clients()


async def test_half_open_client_does_not_block_accept(world: World) -> None:
    """The single-connection server (``vchan.accept``) is bounded the same way."""
    srv = await world.platform(SERVER)
    evil = await world.platform(CLIENT)
    good = await world.platform(CLIENT)
    accepting = asyncio.ensure_future(
        vchan.accept(CLIENT, "halfone", platform=srv, timeout=60, handshake_timeout=0.3)
    )
    attacker = await HalfOpen.attach(evil, "halfone", claim=False)
    try:
        async with vchan.connect(SERVER, "halfone", platform=good, timeout=30) as (r, _w):
            _reader, writer = await accepting
            writer.write(b"served")
            writer.write_eof()
            assert await r.read() == b"served"
            writer.close()
            await writer.wait_closed()
        await attacker.wait_dropped()
    finally:
        attacker.close()
        if not accepting.done():
            accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)


async def test_idle_server_keeps_its_endpoint_until_bound(world: World) -> None:
    """Nobody bound the port: the bound does not churn the advertisement on unix (the
    platform shows the port unbound); clients connect normally after several bounds."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    path = vchan_path(SERVER, CLIENT, "idle")
    server = await vchan.start_server(echo, CLIENT, "idle", platform=srv, handshake_timeout=0.1)
    first = await advertise.read(srv, path)
    await asyncio.sleep(0.5)
    assert await advertise.read(srv, path) == first
    assert server.dropped == 0
    assert await talk(cli, "idle", b"x") == b"x"
    server.close()
    await server.wait_closed()


async def test_handshake_timeout_is_validated(world: World) -> None:
    srv = await world.platform(SERVER)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="handshake_timeout"):
            await vchan.start_server(echo, CLIENT, "p", platform=srv, handshake_timeout=bad)
        with pytest.raises(ValueError, match="handshake_timeout"):
            await vchan.accept(CLIENT, "p", platform=srv, handshake_timeout=bad)


# -- real processes ----------------------------------------------------------------------

PARENT = 10


@pytest.fixture
async def parent(xenstored: Xenstored) -> AsyncIterator[StoreWired]:
    inner = UnixPlatform(domid=PARENT, root=str(xenstored.root))
    p = StoreWired(inner, XenStoreClient.for_unix_socket(xenstored.socket, PARENT, timeout=10))
    await p.open()
    yield p
    leaks = p.leaks()
    await p.close()
    assert leaks == [], leaks


async def spawn_server(xenstored: Xenstored, port: str) -> asyncio.subprocess.Process:
    loop_name = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "vchan_peer.py"),
        loop_name,
        "serve-echo",
        str(PARENT),
        port,
        "4096",
        "4096",
        "0",
        env=xenstored.env(SERVER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def first_line(proc: asyncio.subprocess.Process) -> bytes:
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        return await proc.stdout.readline()


@pytest.mark.crossprocess
async def test_second_server_process_refused_and_killed_server_reclaimed(
    xenstored: Xenstored, parent: StoreWired
) -> None:
    port = f"proc{os.getpid()}{id(parent) % 1000}"
    path = vchan_path(SERVER, PARENT, port)
    procs: list[asyncio.subprocess.Process] = []
    try:
        first = await spawn_server(xenstored, port)
        procs.append(first)
        assert await first_line(first) == b"READY\n"
        second = await spawn_server(xenstored, port)
        procs.append(second)
        async with asyncio.timeout(60):
            out, err = await second.communicate()
        assert second.returncode != 0 and out == b""
        text = err.decode()
        assert "ResourceBusy" in text and f"is in use by pid {first.pid}" in text, text
        assert path in text
        # the second's exit removed nothing: the first still serves at its advertisement
        assert await advertise.read(parent, path) is not None
        async with vchan.connect(SERVER, port, platform=parent, timeout=30) as (r, w):
            w.write(b"first")
            w.write_eof()
            assert await r.read() == b"first"
        # killed: its advertisement stays behind, and a new server takes it over
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert await xenstored_has(xenstored, f"{path}/{advertise.OWNER}")
        third = await spawn_server(xenstored, port)
        procs.append(third)
        assert await first_line(third) == b"READY\n"
        async with vchan.connect(SERVER, port, platform=parent, timeout=30) as (r, w):
            w.write(b"third")
            w.write_eof()
            assert await r.read() == b"third"
        assert third.stdin is not None
        third.stdin.close()
        async with asyncio.timeout(60):
            out, _ = await third.communicate()
        assert third.returncode == 0 and out == b"ACCEPTED 1\n"
        assert not await xenstored_has(xenstored, path)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


async def xenstored_has(xenstored: Xenstored, path: str) -> bool:
    c = XenStoreClient.for_unix_socket(xenstored.socket, 0, timeout=10)
    try:
        return bool(await c.exists(path))
    finally:
        await c.close()
