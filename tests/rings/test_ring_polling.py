"""Busy polling of the async ring adapters: while a poll window is open an end leaves its
event index unarmed (so the peer's pushes need no notification) and watches the peer's
producer index instead; when the window ends it arms and re-checks as without polling.
The poll policy's clock is replaced by a fake one, so nothing here depends on timing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ring_helpers import BE, FE, counted_pair, echo, treq, until

import aioxen
from aioxen import ProtocolError
from aioxen.net import netif as N
from aioxen.pollpolicy import CONTENDED_GAP, DEFAULT_BUSY_POLL, MAX_BUSY_POLL
from aioxen.rings import aio
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing, check_busy_poll
from aioxen.rings.sring import REQ_PROD, RSP_PROD, BackRing, FrontRing


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(aio, "perf_counter", c)
    return c


def test_busy_poll_argument() -> None:
    assert check_busy_poll(None) == DEFAULT_BUSY_POLL
    assert check_busy_poll(None, peer_runs_concurrently=False) == 0.0
    assert check_busy_poll(0) == 0.0 and check_busy_poll(MAX_BUSY_POLL) == MAX_BUSY_POLL
    with pytest.raises(ValueError, match="busy_poll"):
        check_busy_poll(MAX_BUSY_POLL * 2)
    with pytest.raises(ValueError, match="busy_poll"):
        check_busy_poll(-1e-6)
    with pytest.raises(TypeError, match="busy_poll"):
        check_busy_poll(True)


async def test_create_and_attach_poll_where_the_peer_runs_concurrently(harness: Any) -> None:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    want = DEFAULT_BUSY_POLL if fp.peer_runs_concurrently else 0.0
    fmt = (N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    front = await AsyncFrontRing.create(fp, BE, *fmt)
    back = await AsyncBackRing.attach(bp, FE, front.refs, front.port, *fmt)
    assert front.busy_poll == want and back.busy_poll == want
    back.close()
    front.close()
    front = await AsyncFrontRing.create(fp, BE, *fmt, busy_poll=0)
    back = await AsyncBackRing.attach(bp, FE, front.refs, front.port, *fmt, busy_poll=1e-4)
    assert front.busy_poll == 0.0 and back.busy_poll == 1e-4
    back.close()
    front.close()


async def _polling_pair(harness: Any, front_poll: float, back_poll: float) -> Any:
    """counted_pair's pair, rebuilt with the given busy-poll windows."""
    pair = await counted_pair(harness)
    f, b = pair.front, pair.back
    f.close()
    b.close()
    mapping, share = pair.resources[0], pair.resources[1]
    req, rsp = N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE
    pair.front = AsyncFrontRing(
        FrontRing(share.buf, req, rsp, start=2**32 - 5), pair.fcount, busy_poll=front_poll
    )
    pair.back = AsyncBackRing(BackRing(mapping.buf, req, rsp), pair.bcount, busy_poll=back_poll)
    return pair


async def test_a_polling_back_end_needs_no_notification(harness: Any, clock: FakeClock) -> None:
    pair = await _polling_pair(harness, 0.0, MAX_BUSY_POLL)
    front, back = pair.front, pair.back
    server = asyncio.create_task(back.serve(echo))
    for k in range(5):  # the first batch wakes the sleeping back end; the rest are polled
        rsps = await asyncio.wait_for(front.request_many([treq(i) for i in range(8)]), 10)
        assert [r.status for r in rsps] == list(range(8))
        assert pair.fcount.notifies == 1, k
    # The window runs out: the back end arms req_event again and the next batch notifies.
    clock.now += 1.0
    await until(lambda: not back._policy.polling, "the poll window ended")
    rsps = await asyncio.wait_for(front.request_many([treq(i) for i in range(3)]), 10)
    assert [r.status for r in rsps] == [0, 1, 2]
    assert pair.fcount.notifies == 2
    back.close()
    await asyncio.wait_for(server, 10)
    front.close()
    pair.close_resources()


async def test_a_polling_front_end_needs_no_notification(harness: Any, clock: FakeClock) -> None:
    pair = await _polling_pair(harness, MAX_BUSY_POLL, 0.0)
    front, back = pair.front, pair.back
    server = asyncio.create_task(back.serve(echo))
    for k in range(5):  # answers to the first batch wake the front; then it polls
        rsps = await asyncio.wait_for(front.request_many([treq(i) for i in range(8)]), 10)
        assert [r.status for r in rsps] == list(range(8))
        assert pair.bcount.notifies == 1, k
    clock.now += 1.0
    await until(lambda: not front._policy.polling, "the poll window ended")
    # Armed again (a final check), so the next answers notify.  The request itself opens
    # a new window, which is why the clock stops again only after the push.
    rsps = await asyncio.wait_for(front.request_many([treq(9)]), 10)
    assert [r.status for r in rsps] == [9] and pair.bcount.notifies == 2
    back.close()
    await asyncio.wait_for(server, 10)
    front.close()
    pair.close_resources()


async def test_own_work_between_polls_is_not_time_off_the_cpu(
    harness: Any, clock: FakeClock
) -> None:
    # Between two polls the front decodes a batch and publishes the next one; however
    # long that takes, it is not a sign of contended CPUs (which ends a window).
    pair = await _polling_pair(harness, MAX_BUSY_POLL, 0.0)
    front, back = pair.front, pair.back
    server = asyncio.create_task(back.serve(echo))
    for k in range(5):
        async with asyncio.timeout(10):  # (wait_for would publish from another task, later)
            clock.now += 2 * CONTENDED_GAP  # the caller's own work, as the clock sees it
            rsps = await front.request_many([treq(i) for i in range(8)])
        assert [r.status for r in rsps] == list(range(8))
        assert pair.bcount.notifies == 1, k
    back.close()
    await asyncio.wait_for(server, 10)
    front.close()
    pair.close_resources()


async def test_a_scribbled_rsp_prod_seen_by_a_poll(harness: Any, clock: FakeClock) -> None:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    fmt = (N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    front = await AsyncFrontRing.create(fp, BE, *fmt, busy_poll=MAX_BUSY_POLL)
    mapping = bp.grants.map(FE, front.refs)
    ch = await bp.events.connect(FE, front.port)
    task = asyncio.create_task(front.request(treq(1)))
    await until(lambda: mapping.buf[REQ_PROD] == 1, "request published")
    assert front._policy.polling  # watching rsp_prod, no notification will come
    mapping.buf[RSP_PROD : RSP_PROD + 4] = (5000).to_bytes(4, "little")
    with pytest.raises(ProtocolError) as e:
        await asyncio.wait_for(task, 10)
    assert e.value.field == "rsp_prod" and front.closed
    front.close()
    mapping.close()
    ch.close()


async def test_a_scribbled_req_prod_seen_by_a_poll(harness: Any, clock: FakeClock) -> None:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    fmt = (N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    share = fp.grants.share(BE, 1)
    ch = await fp.events.listen(BE)
    raw: FrontRing[Any, Any] = FrontRing(share.buf, *fmt)
    back = await AsyncBackRing.attach(bp, FE, share.refs, ch.port, *fmt, busy_poll=MAX_BUSY_POLL)
    server = asyncio.create_task(back.serve(echo))
    raw.put_request(N.NetifTxRequest(1, 0, 0, 7, 60))
    if raw.push_requests():
        ch.notify()
    await until(lambda: raw.unconsumed_responses() == 1, "answered")
    assert back._policy.polling  # answered: now watching req_prod
    share.buf[REQ_PROD : REQ_PROD + 4] = (raw.req_prod_pvt + 5000).to_bytes(4, "little")
    with pytest.raises(ProtocolError) as e:
        await asyncio.wait_for(server, 10)
    assert e.value.field == "req_prod" and back.closed
    back.close()
    raw.close()
    share.close()
    ch.close()


def test_the_platform_capability_is_what_decides() -> None:
    # inheap runs every domain on one thread: polling there would only spin.
    assert aioxen.platform("inheap").peer_runs_concurrently is False
