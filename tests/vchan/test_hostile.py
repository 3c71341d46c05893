"""A peer that writes garbage into the shared control page.

The victim must fail with :class:`aioxen.ProtocolError` naming the field, at the next
event, release everything, and never hang or touch memory out of bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vchan_harness import InHeapWorld, World, raw_streams

from aioxen import ProtocolError
from aioxen.vchan import wire
from aioxen.vchan.endpoint import Connection, PendingServer, StaleAdvertisement, attach_client

SERVER, CLIENT = 1, 2
pytestmark = pytest.mark.timeout(120)


async def raw_pair(
    world: World, read_size: int = 4096, write_size: int = 4096
) -> tuple[Connection, Connection]:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(
        srv, CLIENT, "evil", read_size=read_size, write_size=write_size, initial_index=2**32 - 9
    )
    client = await attach_client(cli, SERVER, "evil", pending.ring_ref, pending.event_channel)
    server = await pending.wait_connected(timeout=5)
    return server, client


streams = raw_streams


def ctrl_of(conn: Connection) -> memoryview:
    return conn._views[0]


def attacker_done(conn: Connection) -> None:
    conn.release()


@pytest.mark.parametrize("victim", ["server", "client"])
async def test_corrupt_prod_fails_the_reader_at_the_next_event(world: World, victim: str) -> None:
    server, client = await raw_pair(world)
    good, evil = (server, client) if victim == "server" else (client, server)
    reader, writer = streams(good)
    # a little honest traffic first
    evil.core.send(b"hello", 5)
    evil.channel.notify()
    assert await reader.readexactly(5) == b"hello"
    ring = "left" if victim == "server" else "right"
    prod_off = wire.LEFT_PROD if victim == "server" else wire.RIGHT_PROD
    ctrl = ctrl_of(evil)
    (prod,) = struct.unpack_from("<I", ctrl, prod_off)
    struct.pack_into("<I", ctrl, prod_off, (prod + 4096 + 1) & 0xFFFFFFFF)
    evil.channel.notify()  # one event
    async with asyncio.timeout(5):
        with pytest.raises(ProtocolError) as exc:
            await reader.read()
    assert exc.value.field == f"{ring}.prod"
    assert f"{ring} ring corrupt" in str(exc.value)
    with pytest.raises(ProtocolError):
        await writer.drain()
    await asyncio.sleep(0)
    assert good.released
    attacker_done(evil)


@pytest.mark.parametrize("victim", ["server", "client"])
async def test_corrupt_cons_fails_the_writer(world: World, victim: str) -> None:
    server, client = await raw_pair(world)
    good, evil = (server, client) if victim == "server" else (client, server)
    reader, writer = streams(good)
    await asyncio.sleep(0)
    cons_off = wire.RIGHT_CONS if victim == "server" else wire.LEFT_CONS
    ctrl = ctrl_of(evil)
    (cons,) = struct.unpack_from("<I", ctrl, cons_off)
    struct.pack_into("<I", ctrl, cons_off, (cons - 70000) & 0xFFFFFFFF)
    writer.write(b"data")
    async with asyncio.timeout(5):
        # drain() right after the failing write: asyncio's own rule gives
        # ConnectionResetError (connection_lost had not run yet); the reader has the cause.
        with pytest.raises((ProtocolError, ConnectionResetError)):
            await writer.drain()
        with pytest.raises(ProtocolError) as exc:
            await reader.read()
    assert exc.value.field == ("right.prod" if victim == "server" else "left.prod")
    attacker_done(evil)


@pytest.mark.parametrize("victim", ["server", "client"])
@pytest.mark.parametrize("value", [2, 3, 0x80, 0xFF])
async def test_unknown_live_value(world: World, victim: str, value: int) -> None:
    server, client = await raw_pair(world)
    good, evil = (server, client) if victim == "server" else (client, server)
    reader, _ = streams(good)
    await asyncio.sleep(0)
    live_off = wire.CLI_LIVE if victim == "server" else wire.SRV_LIVE
    ctrl_of(evil)[live_off] = value
    evil.channel.notify()
    async with asyncio.timeout(5):
        with pytest.raises(ProtocolError) as exc:
            await reader.read()
    assert exc.value.field == ("cli_live" if victim == "server" else "srv_live")
    assert str(value) in str(exc.value)
    attacker_done(evil)


@pytest.mark.parametrize(("field", "offset"), [("left_order", 16), ("right_order", 18)])
@pytest.mark.parametrize("order", [0, 9, 21, 0xFFFF])
async def test_orders_out_of_range_at_connect(
    world: World, field: str, offset: int, order: int
) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(srv, CLIENT, "evil")
    struct.pack_into("<H", pending._ctrl, offset, order)
    with pytest.raises(ProtocolError) as exc:
        await attach_client(cli, SERVER, "evil", pending.ring_ref, pending.event_channel)
    assert exc.value.field == field
    assert f"{field} {order} out of range" in str(exc.value)
    assert "ring-ref" in str(exc.value)  # names the endpoint
    pending.close()


async def test_equal_in_page_orders_at_connect(world: World) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(srv, CLIENT, "evil", read_size=1024, write_size=2048)
    struct.pack_into("<HH", pending._ctrl, 16, 11, 11)
    with pytest.raises(ProtocolError, match="in-page slot"):
        await attach_client(cli, SERVER, "evil", pending.ring_ref, pending.event_channel)
    pending.close()


@pytest.mark.parametrize("which", [0, 5, 16])
async def test_grant_refs_that_do_not_map(world: World, which: int) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(srv, CLIENT, "evil", read_size=65536, write_size=65536)
    struct.pack_into("<I", pending._ctrl, wire.GRANTS + 4 * which, 0xFFFFFF00 + which)
    with pytest.raises(ProtocolError, match="do not map") as exc:
        await attach_client(cli, SERVER, "evil", pending.ring_ref, pending.event_channel)
    assert exc.value.field == "grants"
    pending.close()


async def test_wrong_advertised_values_are_stale_not_crashes(world: World) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(srv, CLIENT, "evil")
    with pytest.raises(StaleAdvertisement):
        await attach_client(cli, SERVER, "evil", pending.ring_ref, 4242)
    with pytest.raises(StaleAdvertisement):
        await attach_client(cli, SERVER, "evil", 999_999, pending.event_channel)
    pending.close()


# -- property tests (inheap, both loops inside each example) -----------------------------


def run_both_loops(coro_fn: Callable[[], Any]) -> None:
    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coro_fn())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=8, max_size=8 + 4 * 40), st.sampled_from([1024, 4096, 65536]))
def test_random_page_header_at_connect(header: bytes, size: int) -> None:
    """Random orders, live/notify bytes and grant refs: a Connection or a clear error."""

    async def body() -> None:
        world = InHeapWorld()
        srv = await world.platform(SERVER)
        cli = await world.platform(CLIENT)
        pending = await PendingServer.create(srv, CLIENT, "evil", read_size=size, write_size=size)
        pending._ctrl[16 : 16 + len(header)] = header
        try:
            async with asyncio.timeout(5):
                conn = await attach_client(
                    cli, SERVER, "evil", pending.ring_ref, pending.event_channel
                )
        except (ProtocolError, StaleAdvertisement):
            pass
        else:
            conn.release()
        pending.close()
        assert world.leaks() == []
        await world.close()
        assert world.world_leaks() == []

    run_both_loops(body)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 23), st.integers(0, 255)), min_size=1, max_size=6),
    st.booleans(),
)
def test_random_corruption_while_streaming(
    pokes: list[tuple[int, int]], victim_server: bool
) -> None:
    """Any scribbling on the header while data flows ends in data, EOF, ProtocolError or
    ConnectionResetError -- within a bounded time, with everything released."""

    async def body() -> None:
        world = InHeapWorld()
        server, client = await raw_pair(world, 2048, 2048)
        good, evil = (server, client) if victim_server else (client, server)
        reader, writer = streams(good)
        writer.write(bytes(5000))
        evil.core.send(bytes(300), 300)
        evil.channel.notify()
        ctrl = ctrl_of(evil)
        for off, value in pokes:
            ctrl[off] = value
        evil.channel.notify()
        await asyncio.sleep(0)
        evil.release()  # the hostile peer goes away: the victim must finish promptly
        async with asyncio.timeout(5):  # hang guard
            with contextlib.suppress(ProtocolError, ConnectionResetError):
                await reader.read()  # data then EOF, or an error
            writer.close()
            with contextlib.suppress(ProtocolError, ConnectionError):
                await writer.wait_closed()
        assert good.released
        await world.close()
        assert world.world_leaks() == []

    run_both_loops(body)


async def test_claimed_endpoint_is_not_attachable_and_server_waits(world: World) -> None:
    """cli_live 3 (a client is attaching) keeps the server waiting and other clients out."""
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(srv, CLIENT, "claim")
    waiter = asyncio.ensure_future(pending.wait_connected(timeout=5))
    pending._ctrl[wire.CLI_LIVE] = wire.LIVE_CLAIMING
    ch = await cli.events.connect(SERVER, pending.event_channel)
    ch.notify()
    await asyncio.sleep(0.05)
    assert not waiter.done()  # still connecting
    pending._ctrl[wire.SRV_NOTIFY] = wire.NOTIFY_WRITE
    pending._ctrl[wire.CLI_LIVE] = wire.LIVE_CONNECTED
    ch.notify()
    conn = await waiter
    assert conn.is_server
    conn.core.set_live(0)
    conn.release()
    ch.close()


async def test_corruption_detected_while_paused_and_idle(world: World) -> None:
    server, client = await raw_pair(world)
    reader, writer = streams(client)
    await asyncio.sleep(0)
    writer.transport.pause_reading()
    ctrl = ctrl_of(server)
    (prod,) = struct.unpack_from("<I", ctrl, wire.RIGHT_PROD)
    struct.pack_into("<I", ctrl, wire.RIGHT_PROD, (prod + 9999) & 0xFFFFFFFF)
    server.channel.notify()
    async with asyncio.timeout(5):
        with pytest.raises(ProtocolError):
            await reader.read()
    attacker_done(server)
