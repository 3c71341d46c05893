"""Event channels on real Xen: dom0 binding interdomain channels to itself."""

from __future__ import annotations

import asyncio

import pytest

import aioxen
from aioxen.platforms.xen import XenEventChannel, XenPlatform

HANG = 20.0  # hang guard only


async def pair(a_plat: XenPlatform, b_plat: XenPlatform) -> tuple[XenEventChannel, XenEventChannel]:
    """A bound pair; the connecting side's bind event already consumed (every platform
    starts a connector with one event: test_connector_starts_with_one_event)."""
    a = await a_plat.events.listen(0)
    b = await b_plat.events.connect(0, a.port)
    assert a.port != b.port and a.port > 0 and b.port > 0
    await b.wait(timeout=HANG)
    return a, b


async def test_platform_learns_dom0() -> None:
    plat = aioxen.platform("xen")
    assert isinstance(plat, XenPlatform)
    async with plat:
        assert plat.domid == 0
        assert "domid=0" in repr(plat)


async def test_notify_both_ways(plat: XenPlatform) -> None:
    a, b = await pair(plat, plat)
    assert a.remote_domid == 0 == b.remote_domid
    a.notify()
    await b.wait(timeout=HANG)
    b.notify()
    await a.wait(timeout=HANG)


async def test_two_platform_objects(plat: XenPlatform, plat2: XenPlatform) -> None:
    a, b = await pair(plat, plat2)
    for _ in range(20):
        a.notify()
        await b.wait(timeout=HANG)
        b.notify()
        await a.wait(timeout=HANG)


async def test_notifies_coalesce_and_none_is_lost(plat: XenPlatform) -> None:
    a, b = await pair(plat, plat)
    for _ in range(50):
        a.notify()
    await b.wait(timeout=HANG)
    # However many of the 50 were merged, each later notify is seen: the port was unmasked.
    for _ in range(30):
        await asyncio.sleep(0)
        a.notify()
        await b.wait(timeout=HANG)


async def test_many_ports_route_to_their_own_channel(plat: XenPlatform, plat2: XenPlatform) -> None:
    pairs = [await pair(plat, plat2) for _ in range(64)]
    for i, (a, _b) in enumerate(pairs):
        if i % 2 == 0:
            a.notify()
    await asyncio.gather(*(b.wait(timeout=HANG) for i, (_a, b) in enumerate(pairs) if i % 2 == 0))
    # An event routed to the wrong port would show up here.
    for i, (_a, b) in enumerate(pairs):
        if i % 2:
            with pytest.raises(TimeoutError):
                await b.wait(timeout=0.05)
    assert len(plat2.events.bound_ports) == 64
    for a, b in pairs:
        a.close()
        b.close()
    assert plat2.events.bound_ports == []


async def test_handler_delivery(plat: XenPlatform) -> None:
    a, b = await pair(plat, plat)
    got = asyncio.Event()
    calls: list[bool] = []

    def handler() -> None:
        calls.append(b.peer_lost)
        got.set()

    b.set_handler(handler)
    with pytest.raises(RuntimeError):
        await b.wait(timeout=HANG)
    for _ in range(5):
        got.clear()
        a.notify()
        await asyncio.wait_for(got.wait(), HANG)
    assert calls and not any(calls)
    b.set_handler(None)
    a.notify()
    await b.wait(timeout=HANG)


async def test_event_before_handler_is_not_dropped(plat: XenPlatform) -> None:
    a, b = await pair(plat, plat)
    a.notify()
    await asyncio.sleep(0.2)  # let it arrive while nobody listens
    got = asyncio.Event()
    b.set_handler(got.set)
    await asyncio.wait_for(got.wait(), HANG)


async def test_wait_timeout_and_cancel_leave_channel_usable(plat: XenPlatform) -> None:
    a, b = await pair(plat, plat)
    with pytest.raises(TimeoutError, match=f"port {b.port}"):
        await b.wait(timeout=0.05)
    task = asyncio.ensure_future(b.wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    a.notify()
    await b.wait(timeout=HANG)


async def test_close_unbinds_and_port_can_be_rebound(plat: XenPlatform) -> None:
    a, b = await pair(plat, plat)
    waiter = asyncio.ensure_future(b.wait())
    await asyncio.sleep(0.01)
    b.close()
    b.close()  # idempotent
    with pytest.raises(ConnectionResetError):
        await waiter
    with pytest.raises(ConnectionResetError):
        await b.wait(timeout=HANG)
    b.notify()  # a no-op once closed
    a.notify()  # the peer port reverted to unbound: Xen drops it silently
    assert not a.peer_lost  # Xen reports nothing: vchan learns this from the live byte
    c = await plat.events.connect(0, a.port)
    c.notify()
    await a.wait(timeout=HANG)


async def test_connect_refused(plat: XenPlatform) -> None:
    a = await plat.events.listen(0)
    b = await plat.events.connect(0, a.port)
    with pytest.raises(ConnectionRefusedError, match=f"port {a.port} of domain 0"):
        await plat.events.connect(0, a.port)  # already bound by b
    offered_elsewhere = await plat.events.listen(7)
    with pytest.raises(ConnectionRefusedError):
        await plat.events.connect(0, offered_elsewhere.port)
    with pytest.raises(ConnectionRefusedError):
        await plat.events.connect(0, 4000)  # no such port
    with pytest.raises(ConnectionRefusedError):
        await plat.events.connect(42, 1)  # no such domain
    b.close()


async def test_platform_close_closes_channels(plat: XenPlatform) -> None:
    other = XenPlatform()
    async with other:
        a, b = await pair(plat, other)
    assert b.closed
    with pytest.raises(ConnectionResetError):
        await b.wait(timeout=HANG)
    a.notify()
    c = await plat.events.connect(0, a.port)  # a's peer port is unbound again
    c.notify()
    await a.wait(timeout=HANG)
