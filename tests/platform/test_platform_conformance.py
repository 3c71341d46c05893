"""The platform conformance suite: the same behaviour on every platform.

Parametrised over the registered harnesses (``inheap``, ``unix``) by the ``harness``
fixture, and over asyncio/uvloop by the root conftest.  Every test also gets leak checking
from the fixture: whatever a test opens it must close.

The Xen lab runs this same module inside dom0 on the ``xen`` platform
(``tests/xenlab/guest/test_conformance.py``).  There every "domain" of a test is dom0 itself
(``harness.domids`` is ``(0, 0, 0)``), so the tests marked :data:`needs_distinct_domains`
cannot apply; nor can those marked :data:`needs_peer_loss_reports`, because Xen tells
nobody that the other end of a channel went away (protocols learn it from the unmap
notify, which the ``*unmap_notify*`` tests check on every platform).
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from platform_harness import Harness, needs_distinct_domains, needs_peer_loss_reports

from aioxen import PAGE_SIZE, native
from aioxen.platforms.base import (
    EventChannel,
    EventChannels,
    GrantTable,
    Mapping,
    Platform,
    Share,
)


async def bind(a: Platform, b: Platform) -> tuple[EventChannel, EventChannel]:
    """A channel from ``a`` (listener) to ``b`` (connector), the connector's bind event
    (see :func:`test_connector_starts_with_one_event`) already consumed."""
    la = await a.events.listen(b.domid)
    cb = await b.events.connect(a.domid, la.port)
    await cb.wait(timeout=5)
    return la, cb


async def pair(harness: Harness) -> tuple[EventChannel, EventChannel]:
    """A channel between domain A (listener) and domain B (connector), as :func:`bind`."""
    A, B = harness.domids[:2]
    return await bind(await harness.platform(A), await harness.platform(B))


# --------------------------------------------------------------------------- events ---


async def test_platform_objects_satisfy_protocols(harness: Harness) -> None:
    A, B = harness.domids[:2]
    p = await harness.platform(A)
    assert p.domid == A
    assert isinstance(p.events, EventChannels)
    assert isinstance(p.grants, GrantTable)
    ch = await p.events.listen(B)
    assert isinstance(ch, EventChannel)
    assert isinstance(ch.port, int) and ch.port > 0
    assert ch.remote_domid == B
    ch.close()
    s = p.grants.share(B, 1)
    assert isinstance(s, Share)
    s.close()


async def test_connector_starts_with_one_event(harness: Harness) -> None:
    """Xen sets a port pending as BIND_INTERDOMAIN binds it (notifications sent to the
    still-unbound peer port may have been lost); every platform does the same, so the
    connector's first wait returns without a notify.  The listener gets nothing."""
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    la = await a.events.listen(B)
    cb = await b.events.connect(A, la.port)
    await cb.wait(timeout=5)
    with pytest.raises(TimeoutError):
        await cb.wait(timeout=0.05)  # exactly one
    with pytest.raises(TimeoutError):
        await la.wait(timeout=0.05)
    la.close()
    cb.close()


async def test_connector_handler_is_called_for_the_bind_event(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    la = await a.events.listen(B)
    cb = await b.events.connect(A, la.port)
    got = asyncio.Event()
    cb.set_handler(got.set)
    await asyncio.wait_for(got.wait(), 5)
    la.close()
    cb.close()


async def test_notify_both_directions(harness: Harness) -> None:
    A = harness.domids[0]
    la, cb = await pair(harness)
    assert cb.remote_domid == A
    cb.notify()
    await la.wait(timeout=5)
    la.notify()
    await cb.wait(timeout=5)
    la.close()
    cb.close()


async def test_event_sent_before_wait_is_remembered(harness: Harness) -> None:
    la, cb = await pair(harness)
    cb.notify()
    await asyncio.sleep(0.01)  # let it be delivered while nobody waits
    await la.wait(timeout=5)
    la.close()
    cb.close()


async def test_notifications_coalesce(harness: Harness) -> None:
    la, cb = await pair(harness)
    for _ in range(5):
        cb.notify()
    await la.wait(timeout=5)
    # Five notifies sent before anyone waited coalesce: on unix/inheap into that one event;
    # Xen may fire a port again if it was notified while still masked, but never invents
    # more events than were sent.
    extra = 0
    with pytest.raises(TimeoutError):
        while True:
            await la.wait(timeout=0.1)
            extra += 1
    assert extra <= 4
    # and the channel still works after the timeout
    cb.notify()
    await la.wait(timeout=5)
    la.close()
    cb.close()


async def test_wait_is_cancellable_and_channel_stays_usable(harness: Harness) -> None:
    la, cb = await pair(harness)
    task = asyncio.create_task(la.wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cb.notify()
    await la.wait(timeout=5)
    la.close()
    cb.close()


async def test_ping_pong_loses_nothing(harness: Harness) -> None:
    la, cb = await pair(harness)

    async def responder(rounds: int) -> int:
        for _ in range(rounds):
            await cb.wait(timeout=5)  # a lost event would time out here ...
            cb.notify()
        return rounds

    task = asyncio.create_task(responder(500))
    for _ in range(500):
        la.notify()
        await la.wait(timeout=5)  # ... or here
    assert await asyncio.wait_for(task, 5) == 500
    la.close()
    cb.close()


async def test_many_waiters_all_wake(harness: Harness) -> None:
    la, cb = await pair(harness)
    tasks = [asyncio.create_task(la.wait(timeout=5)) for _ in range(3)]
    await asyncio.sleep(0.01)
    cb.notify()
    await asyncio.gather(*tasks)
    la.close()
    cb.close()


@needs_peer_loss_reports
async def test_peer_close_wakes_waiter_with_connection_reset(harness: Harness) -> None:
    la, cb = await pair(harness)
    waiter = asyncio.create_task(la.wait(timeout=5))
    await asyncio.sleep(0.01)
    cb.close()
    with pytest.raises(ConnectionResetError):
        await waiter
    assert la.peer_lost
    la.notify()  # a no-op once the peer is gone
    with pytest.raises(ConnectionResetError):
        await la.wait(timeout=5)
    la.close()


@needs_peer_loss_reports
async def test_last_notify_before_close_is_not_lost(harness: Harness) -> None:
    la, cb = await pair(harness)
    await asyncio.sleep(0.01)
    cb.notify()
    cb.close()
    await la.wait(timeout=5)  # the event first ...
    with pytest.raises(ConnectionResetError):  # ... then the loss
        await la.wait(timeout=5)
    la.close()


async def test_own_close_fails_pending_wait_and_is_idempotent(harness: Harness) -> None:
    la, cb = await pair(harness)
    waiter = asyncio.create_task(la.wait())
    await asyncio.sleep(0.01)
    la.close()
    la.close()
    assert la.closed
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiter, 5)
    with pytest.raises(ConnectionResetError):
        await la.wait()
    la.notify()  # harmless
    cb.close()
    cb.close()


async def test_connect_to_unknown_port_is_refused(harness: Harness) -> None:
    A, B = harness.domids[:2]
    b = await harness.platform(B)
    await harness.platform(A)
    with pytest.raises(ConnectionRefusedError) as ei:
        await b.events.connect(A, 4000)
    assert "4000" in str(ei.value)


@needs_distinct_domains
async def test_connect_to_port_offered_to_another_domain(harness: Harness) -> None:
    A, B, C = harness.domids
    a = await harness.platform(A)
    b = await harness.platform(B)
    la = await a.events.listen(C)
    with pytest.raises(ConnectionRefusedError) as ei:  # what real Xen says too
        await b.events.connect(A, la.port)
    assert isinstance(ei.value, PermissionError)  # where the platform can tell
    assert str(la.port) in str(ei.value) and str(C) in str(ei.value)
    la.close()


async def test_port_accepts_exactly_one_peer(harness: Harness) -> None:
    A, B = harness.domids[:2]
    la, cb = await pair(harness)
    b2 = await harness.platform(B)
    cb.notify()
    await la.wait(timeout=5)  # the first peer is established
    with pytest.raises(ConnectionRefusedError):
        await b2.events.connect(A, la.port)
    la.close()
    cb.close()


async def test_closed_listener_refuses(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    la = await a.events.listen(B)
    la.close()
    with pytest.raises(ConnectionRefusedError):
        await b.events.connect(A, la.port)


async def test_ports_unique_within_domain_across_platform_objects(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a1 = await harness.platform(A)
    a2 = await harness.platform(A)
    chans = [await p.events.listen(B) for p in (a1, a2, a1, a2, a1)]
    assert len({c.port for c in chans}) == len(chans)
    for c in chans:
        c.close()


async def test_loopback_within_one_domain(harness: Harness) -> None:
    A = harness.domids[0]
    a = await harness.platform(A)
    la = await a.events.listen(A)
    ca = await a.events.connect(A, la.port)
    assert ca.port != la.port
    ca.notify()
    await la.wait(timeout=5)
    la.close()
    ca.close()


async def test_notify_on_unbound_port_is_harmless(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    la = await a.events.listen(B)
    la.notify()
    la.close()


@needs_peer_loss_reports
async def test_handler_gets_batches_and_peer_loss(harness: Harness) -> None:
    la, cb = await pair(harness)
    calls: list[bool] = []
    got = asyncio.Event()

    def handler() -> None:
        calls.append(la.peer_lost)
        got.set()

    la.set_handler(handler)
    cb.notify()
    await asyncio.wait_for(got.wait(), 5)
    assert calls == [False]
    got.clear()
    cb.close()
    await asyncio.wait_for(got.wait(), 5)
    assert calls[-1] is True
    assert calls.count(True) == 1
    la.close()


async def test_handler_set_late_sees_pending_event(harness: Harness) -> None:
    la, cb = await pair(harness)
    cb.notify()
    await asyncio.sleep(0.02)  # delivered while nobody listens
    got = asyncio.Event()
    la.set_handler(got.set)
    await asyncio.wait_for(got.wait(), 5)
    la.close()
    cb.close()


async def test_handler_removed_restores_wait(harness: Harness) -> None:
    la, cb = await pair(harness)
    got = asyncio.Event()
    la.set_handler(got.set)
    with pytest.raises(RuntimeError):
        await la.wait(timeout=1)
    cb.notify()
    await asyncio.wait_for(got.wait(), 5)
    la.set_handler(None)
    cb.notify()
    await la.wait(timeout=5)
    la.close()
    cb.close()


async def test_handler_not_called_after_close(harness: Harness) -> None:
    la, cb = await pair(harness)
    calls: list[int] = []
    la.set_handler(lambda: calls.append(1))
    cb.notify()
    la.close()
    await asyncio.sleep(0.05)
    assert calls == []
    cb.close()


# --------------------------------------------------------------------------- grants ---


async def test_share_refs_and_zeroed_pages(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    s = a.grants.share(B, 3)
    assert len(s.refs) == 3 and len(set(s.refs)) == 3
    assert all(r >= 8 for r in s.refs)
    assert s.remote_domid == B
    assert len(s.buf) == 3 * PAGE_SIZE and not s.buf.readonly
    assert bytes(s.buf) == bytes(3 * PAGE_SIZE)
    s.close()


async def test_mapping_is_shared_memory_both_ways(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 2)
    m = b.grants.map(A, s.refs)
    assert isinstance(m, Mapping) and m.writable and not m.buf.readonly
    s.buf[100:105] = b"hello"
    assert bytes(m.buf[100:105]) == b"hello"
    m.buf[PAGE_SIZE + 7 : PAGE_SIZE + 12] = b"world"
    assert bytes(s.buf[PAGE_SIZE + 7 : PAGE_SIZE + 12]) == b"world"
    m.close()
    s.close()


async def test_map_non_contiguous_subset_in_reverse_order(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 6)
    for i in range(6):
        s.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes([i + 1]) * PAGE_SIZE
    wanted = [s.refs[5], s.refs[3], s.refs[0]]
    m = b.grants.map(A, wanted)
    assert len(m.buf) == 3 * PAGE_SIZE
    assert [m.buf[i * PAGE_SIZE] for i in range(3)] == [6, 4, 1]
    assert bytes(m.buf[PAGE_SIZE : 2 * PAGE_SIZE]) == bytes([4]) * PAGE_SIZE
    m.buf[2 * PAGE_SIZE] = 0xEE  # page 0 of the share
    assert s.buf[0] == 0xEE
    m.close()
    s.close()


async def test_map_refs_from_several_shares_and_repeats(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s1, s2 = a.grants.share(B, 2), a.grants.share(B, 1)
    s1.buf[0] = 1
    s1.buf[PAGE_SIZE] = 2
    s2.buf[0] = 3
    m = b.grants.map(A, [s2.refs[0], s1.refs[1], s2.refs[0], s1.refs[0]])
    assert [m.buf[i * PAGE_SIZE] for i in range(4)] == [3, 2, 3, 1]
    m.buf[0] = 9
    assert m.buf[2 * PAGE_SIZE] == 9 and s2.buf[0] == 9
    m.close()
    s1.close()
    s2.close()


async def test_map_async_maps_like_map_and_reports_the_same_errors(harness: Harness) -> None:
    """``map_async`` (coroutines: never blocks the loop) = ``map``: same memory, same
    errors, tracked and closed the same way."""
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 3)
    s.buf[2 * PAGE_SIZE] = 7
    m = await b.grants.map_async(A, [s.refs[2], s.refs[0]])
    assert isinstance(m, Mapping) and len(m.buf) == 2 * PAGE_SIZE and m.buf[0] == 7
    m.buf[PAGE_SIZE] = 8
    assert s.buf[0] == 8
    r = await b.grants.map_async(A, s.refs[:1], writable=False)
    assert r.buf.readonly and r.buf[0] == 8
    with pytest.raises(FileNotFoundError) as ei:
        await b.grants.map_async(A, [s.refs[0], 999_999])
    assert "999999" in str(ei.value) and str(A) in str(ei.value)
    with pytest.raises(ValueError):
        await b.grants.map_async(A, [])
    r.close()
    m.close()
    s.close()


async def test_readonly_mapping_gives_readonly_view(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 1)
    m = b.grants.map(A, s.refs, writable=False)
    assert not m.writable and m.buf.readonly
    with pytest.raises(TypeError):
        m.buf[0] = 1
    s.buf[0] = 42
    assert m.buf[0] == 42
    m.close()
    s.close()


async def test_readonly_share_refuses_writable_map(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 2, writable=False)
    assert not s.buf.readonly  # the owner always writes
    with pytest.raises(PermissionError) as ei:
        b.grants.map(A, s.refs)
    assert str(s.refs[0]) in str(ei.value) and str(A) in str(ei.value)
    m = b.grants.map(A, s.refs, writable=False)
    assert m.buf.readonly
    m.close()
    s.close()


@needs_distinct_domains
async def test_map_by_wrong_grantee_is_denied(harness: Harness) -> None:
    A, B, C = harness.domids
    a = await harness.platform(A)
    c = await harness.platform(C)
    s = a.grants.share(B, 1)
    with pytest.raises(PermissionError) as ei:
        c.grants.map(A, s.refs)
    msg = str(ei.value)
    assert str(s.refs[0]) in msg and str(A) in msg
    s.close()


async def test_map_unknown_and_revoked_refs(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 1)
    with pytest.raises(FileNotFoundError) as ei:
        b.grants.map(A, [s.refs[0], 999_999])
    assert "999999" in str(ei.value) and str(A) in str(ei.value)
    ref = s.refs[0]
    s.close()
    with pytest.raises(FileNotFoundError) as ei:
        b.grants.map(A, [ref])
    assert str(ref) in str(ei.value)


@needs_distinct_domains
async def test_map_from_domain_that_never_shared(harness: Harness) -> None:
    _, B, C = harness.domids
    b = await harness.platform(B)
    with pytest.raises(FileNotFoundError) as ei:
        b.grants.map(C, [8])
    assert "8" in str(ei.value) and str(C) in str(ei.value)


async def test_bad_arguments(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    with pytest.raises(ValueError):
        a.grants.share(B, 0)
    with pytest.raises(ValueError):
        a.grants.map(B, [])
    with pytest.raises(ValueError):
        a.grants.map(B, [-1])
    with pytest.raises(ValueError):
        await a.events.listen(-5)


async def test_mapping_outlives_share_close(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 2)
    s.buf[10] = 77
    m = b.grants.map(A, s.refs)
    s.close()
    s.close()  # idempotent
    assert m.buf[10] == 77
    m.buf[11] = 78  # still valid memory
    assert m.buf[11] == 78
    m.close()
    m.close()


async def test_close_with_live_views_raises_buffer_error(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 1)
    m = b.grants.map(A, s.refs)
    view = m.buf[0:16]
    with pytest.raises(BufferError):
        m.close()
    m.buf[0] = 5  # still usable
    view.release()
    m.close()
    sview = s.buf[0:4]
    with pytest.raises(BufferError):
        s.close()
    del sview
    gc.collect()
    s.close()


async def test_pinned_shared_buffer_blocks_close(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    s = a.grants.share(B, 1)
    sb = native.SharedBuffer(s.buf)
    with pytest.raises(BufferError):
        s.close()
    sb.store_u32(0, 0xDEADBEEF)
    sb.release()
    assert s.buf[0] == 0xEF
    s.close()


async def test_share_unmap_notify_clears_byte_and_notifies(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    la, cb = await bind(a, b)
    s = a.grants.share(B, 2)
    m = b.grants.map(A, s.refs)
    s.buf[PAGE_SIZE + 3] = 1
    s.set_unmap_notify(PAGE_SIZE + 3, la)
    s.close()
    await cb.wait(timeout=5)
    assert m.buf[PAGE_SIZE + 3] == 0
    m.close()
    la.close()
    cb.close()


async def test_mapping_unmap_notify_clears_byte_and_notifies(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    la, cb = await bind(a, b)
    s = a.grants.share(B, 1)
    m = b.grants.map(A, s.refs)
    m.buf[5] = 1
    m.set_unmap_notify(5, cb)
    m.close()
    await la.wait(timeout=5)
    assert s.buf[5] == 0
    s.close()
    la.close()
    cb.close()


async def test_unmap_notify_event_only_and_argument_checks(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    b = await harness.platform(B)
    la, cb = await bind(a, b)
    s = a.grants.share(B, 1)
    m = b.grants.map(A, s.refs, writable=False)
    with pytest.raises(ValueError):
        m.set_unmap_notify(0, cb)  # clearing a byte needs a writable mapping
    with pytest.raises(ValueError):
        s.set_unmap_notify(PAGE_SIZE, la)  # outside the share
    m.set_unmap_notify(None, cb)
    m.close()
    await la.wait(timeout=5)
    s.close()
    la.close()
    cb.close()


@needs_peer_loss_reports
async def test_platform_close_releases_everything(harness: Harness) -> None:
    A, B, C = harness.domids
    a = await harness.platform(A)
    b = await harness.platform(B)
    la = await a.events.listen(B)
    await a.events.listen(C)
    cb = await b.events.connect(A, la.port)
    await cb.wait(timeout=5)  # the bind event
    s = a.grants.share(B, 2)
    b.grants.map(A, s.refs)
    waiter = asyncio.create_task(cb.wait())
    await asyncio.sleep(0.01)
    await a.close()
    await a.close()  # idempotent
    assert a.leaks() == []  # type: ignore[attr-defined]
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiter, 5)
    await b.close()
    assert b.leaks() == []  # type: ignore[attr-defined]


async def test_async_context_manager(harness: Harness) -> None:
    A, B = harness.domids[:2]
    a = await harness.platform(A)
    async with a as plat:
        s = plat.grants.share(B, 1)
        ch = await plat.events.listen(B)
    assert ch.closed
    with pytest.raises(ValueError):
        s.buf  # noqa: B018 - closed share has no buffer
    assert a.leaks() == []  # type: ignore[attr-defined]
