"""inheap-specific behaviour: the world, leak reports, dispatch, threads, hostile refs."""

from __future__ import annotations

import asyncio
import threading

import pytest

import aioxen
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld, default_world


def test_dispatch_and_default_world() -> None:
    p = aioxen.platform("inheap", domid=4)
    assert isinstance(p, InHeapPlatform)
    assert p.domid == 4 and p.name == "inheap"
    assert p.world is default_world()
    w = InHeapWorld()
    assert aioxen.platform("inheap", domid=0, world=w).world is w  # type: ignore[attr-defined]


def test_world_has_xenstore_engine_slot() -> None:
    w = InHeapWorld()
    assert w.xenstore_engine is None
    w.xenstore_engine = object()
    assert InHeapWorld().xenstore_engine is None


def test_bad_domid() -> None:
    with pytest.raises(ValueError):
        InHeapPlatform(domid=0x7FF0)


async def test_assert_cleaned_up_lists_leaks() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)
    w.assert_cleaned_up()
    la = await a.events.listen(2)
    s = a.grants.share(2, 1)
    m = b.grants.map(1, s.refs)
    with pytest.raises(AssertionError) as ei:
        w.assert_cleaned_up()
    msg = str(ei.value)
    assert f"port={la.port}" in msg and "InHeapShare" in msg and "InHeapMapping" in msg
    with pytest.raises(AssertionError):
        a.assert_cleaned_up()
    m.close()
    b.assert_cleaned_up()
    await a.close()
    a.assert_cleaned_up()
    w.assert_cleaned_up()


async def test_revoked_refs_are_reused_lowest_first() -> None:
    w = InHeapWorld()
    a = InHeapPlatform(1, w)
    s1 = a.grants.share(2, 3)
    assert s1.refs == [8, 9, 10]
    s1.close()
    s2 = a.grants.share(2, 2)
    assert s2.refs == [8, 9]
    await a.close()


async def test_notify_from_another_thread() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)
    la = await a.events.listen(2)
    cb = await b.events.connect(1, la.port)
    t = threading.Thread(target=cb.notify)
    t.start()
    await la.wait(timeout=5)
    t.join()
    await a.close()
    await b.close()
    w.assert_cleaned_up()


async def test_default_world_platform_closes_cleanly() -> None:
    p = aioxen.platform("inheap", domid=7)
    async with p:
        ch = await p.events.listen(7)
        peer = await p.events.connect(7, ch.port)
        peer.notify()
        await ch.wait(timeout=5)
    assert p.leaks() == []  # type: ignore[attr-defined]


def test_leaked_channel_of_closed_loop_does_not_break_notify() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)

    async def setup() -> tuple[object, object]:
        la = await a.events.listen(2)
        cb = await b.events.connect(1, la.port)
        return la, cb

    la, cb = asyncio.run(setup())
    cb.notify()  # type: ignore[attr-defined]  # la's loop is closed: silently dropped
    la.close()  # type: ignore[attr-defined]
    cb.close()  # type: ignore[attr-defined]
    w.assert_cleaned_up()


async def test_event_handed_to_a_cancelled_waiter_is_kept() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)
    la = await a.events.listen(2)
    cb = await b.events.connect(1, la.port)
    waiter = asyncio.create_task(la.wait())
    await asyncio.sleep(0)  # the waiter is parked on its future
    cb.notify()  # schedules the delivery ...
    await asyncio.sleep(0)  # ... which runs now and hands the event to the waiter
    waiter.cancel()  # ... but the waiter is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await la.wait(timeout=0)  # the event was put back, not lost
    await a.close()
    await b.close()
    w.assert_cleaned_up()
