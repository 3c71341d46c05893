"""AsyncFrontRing.submit_many / submit_many_nowait on every platform (inheap, unix): one
future per request in order, one write and one notify per batch, back-pressure,
cancellation, shutdown, and a property test mixing them with submit and request_many."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ring_helpers import (
    BE,
    FE,
    NEAR_WRAP,
    TxBack,
    TxFront,
    counted_pair,
    echo,
    ring_pair,
    treq,
    until,
)

from aioxen.net import netif as N
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing, RingShutdown


async def test_futures_in_order_with_back_pressure_and_index_wrap(harness: Any) -> None:
    front, back = await ring_pair(harness)
    server = asyncio.create_task(back.serve(echo))
    n = 3 * front.ring.nr_ents + 5  # more than fit: the rest wait for free slots
    futures = await asyncio.wait_for(front.submit_many(treq(i) for i in range(n)), 30)
    assert len(futures) == n
    rsps = await asyncio.wait_for(asyncio.gather(*futures), 30)
    assert [r.status for r in rsps] == list(range(n))
    assert front.ring.rsp_cons == (NEAR_WRAP + n) & 0xFFFFFFFF  # indices wrapped
    assert front.free_slots == front.ring.nr_ents and front.in_flight == 0
    assert await front.submit_many([]) == [] and front.submit_many_nowait([]) == []
    front.close()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(server, 30)
    back.close()


async def test_nowait_takes_what_fits_in_one_write_and_one_notify(harness: Any) -> None:
    pair = await counted_pair(harness)
    front, back, fcount = pair.front, pair.back, pair.fcount
    n = front.ring.nr_ents
    first = front.submit_many_nowait([treq(i) for i in range(n - 3)])
    assert len(first) == n - 3 and front.free_slots == 3
    assert back.ring.unconsumed_requests() == 0  # written, published at the iteration's end
    rest = front.submit_many_nowait([treq(1000 + i) for i in range(10)])
    assert len(rest) == 3 and front.free_slots == 0  # only what fits
    assert front.submit_many_nowait([treq(0)]) == []
    batch = await asyncio.wait_for(back.next_batch(), 10)
    assert [r.size for r in batch] == [*range(n - 3), 1000, 1001, 1002]
    assert fcount.notifies == 1  # one push, one notify for both calls
    assert len({r.id for r in batch}) == n
    back.respond_many(echo(r) for r in reversed(batch))  # answered out of order
    rsps = await asyncio.wait_for(asyncio.gather(*first, *rest), 10)
    assert [r.status for r in rsps] == [r.size for r in batch]
    front.close()
    with pytest.raises(RingShutdown):
        front.submit_many_nowait([treq(0)])
    back.close()
    pair.close_resources()


async def test_nowait_does_not_overtake_callers_waiting_for_a_slot(harness: Any) -> None:
    front, back = await ring_pair(harness)
    n = front.ring.nr_ents
    futures = front.submit_many_nowait([treq(i) for i in range(n)])
    waiter = asyncio.create_task(front.request(treq(999)))
    await until(lambda: bool(front._slot_waiters), "the request waits for a slot")
    batch = await asyncio.wait_for(back.next_batch(), 10)
    back.respond(echo(batch[0]))
    await asyncio.wait_for(futures[0], 10)
    assert front.submit_many_nowait([treq(5)]) == []  # the freed slot is the waiter's
    (req,) = await asyncio.wait_for(back.next_batch(), 10)
    assert req.size == 999
    back.respond_many(echo(r) for r in [*batch[1:], req])
    assert (await asyncio.wait_for(waiter, 10)).status == 999
    front.close()
    back.close()


async def test_cancelled_while_waiting_keeps_what_was_queued(harness: Any) -> None:
    front, back = await ring_pair(harness)
    n = front.ring.nr_ents
    task = asyncio.create_task(front.submit_many([treq(i) for i in range(n + 4)]))
    batch = await asyncio.wait_for(back.next_batch(), 10)
    assert len(batch) == n and not task.done()  # the last four wait for slots
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert front.in_flight == n  # the queued ones keep their ids until answered
    back.respond_many(echo(r) for r in batch)  # answers nobody waits for: dropped
    await until(lambda: front.in_flight == 0, "answers consumed")
    assert front.free_slots == n and back.ring.unconsumed_requests() == 0
    front.close()
    back.close()


async def test_shutdown_while_waiting_fails_everything(harness: Any) -> None:
    front, back = await ring_pair(harness)
    n = front.ring.nr_ents
    task = asyncio.create_task(front.submit_many([treq(i) for i in range(n + 1)]))
    await asyncio.wait_for(back.next_batch(), 10)
    back.close()  # the back end goes away
    with pytest.raises(ConnectionResetError, match=f"domain {BE}"):
        await asyncio.wait_for(task, 10)
    front.close()


KINDS = ["submit", "many", "nowait", "request_many"]


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    calls=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 40)),
        min_size=1,
        max_size=12,
    ),
    start=st.sampled_from([0, NEAR_WRAP, 2**32 - 1]),
)
def test_mixed_submitters_get_their_own_answers(
    loop_name: str, calls: list[tuple[str, int]], start: int
) -> None:
    """Concurrent submit / submit_many / submit_many_nowait / request_many callers on a
    small ring, against a back end that checks ids are never reused while in flight."""

    async def scenario() -> None:
        world = InHeapWorld()
        fp, bp = InHeapPlatform(domid=FE, world=world), InHeapPlatform(domid=BE, world=world)
        await fp.open()
        await bp.open()
        front: TxFront = await AsyncFrontRing.create(
            fp, BE, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, start=start
        )
        back: TxBack = await AsyncBackRing.attach(
            bp, FE, front.refs, front.port, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE,
            check_ids=True,
        )  # fmt: skip
        server = asyncio.create_task(back.serve(echo))

        async def caller(k: int, kind: str, n: int) -> list[int]:
            sizes = [k * 100 + i for i in range(n)]
            if kind == "submit":
                futs = [await front.submit(treq(s)) for s in sizes]
            elif kind == "many":
                futs = await front.submit_many(treq(s) for s in sizes)
            elif kind == "nowait":
                futs = []
                while len(futs) < n:
                    futs += front.submit_many_nowait([treq(s) for s in sizes[len(futs) :]])
                    await asyncio.sleep(0)
            else:
                return [r.status for r in await front.request_many(treq(s) for s in sizes)]
            return [r.status for r in await asyncio.gather(*futs)]

        results = await asyncio.wait_for(
            asyncio.gather(*(caller(k, kind, n) for k, (kind, n) in enumerate(calls))), 30
        )
        for k, ((_, n), got) in enumerate(zip(calls, results, strict=True)):
            assert got == [k * 100 + i for i in range(n)]
        assert front.free_slots == front.ring.nr_ents and front.in_flight == 0
        front.close()
        with pytest.raises(ConnectionResetError):
            await server
        back.close()
        await fp.close()
        await bp.close()

    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())
