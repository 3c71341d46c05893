"""AsyncFrontRing / AsyncBackRing on every platform (inheap, unix): round trips, batching,
back-pressure, cancellation, shutdown and hostile peers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
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

from aioxen import ProtocolError
from aioxen.net import netif as N
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing, RingShutdown
from aioxen.rings.sring import REQ_PROD, RSP_PROD, BackRing, FrontRing


async def test_round_trip_with_back_pressure_and_index_wrap(harness: Any) -> None:
    front, back = await ring_pair(harness)
    server = asyncio.create_task(back.serve(echo))
    n = 3 * front.ring.nr_ents + 17  # more than fit: submitters wait for free slots
    rsps = await front.request_many((treq(i) for i in range(n)), timeout=30)
    assert [r.status for r in rsps] == list(range(n))
    assert front.ring.rsp_cons == (NEAR_WRAP + n) & 0xFFFFFFFF  # indices wrapped
    one = await front.request(treq(4242), timeout=30)
    assert one.status == 4242
    back.close()
    await asyncio.wait_for(server, 30)  # a local close ends serve() normally
    front.close()


async def test_concurrent_requests_and_async_handler(harness: Any) -> None:
    front, back = await ring_pair(harness, order=1)

    async def slow_echo(req: N.NetifTxRequest) -> N.NetifTxResponse:
        await asyncio.sleep(0.001 * (req.size % 3))  # answers come back out of order
        return echo(req)

    server = asyncio.create_task(back.serve(slow_echo))
    results = await asyncio.wait_for(
        asyncio.gather(*(front.request(treq(i)) for i in range(300))), 30
    )
    assert [r.status for r in results] == list(range(300))
    front.close()
    with pytest.raises(ConnectionResetError, match=f"domain {FE}"):
        await asyncio.wait_for(server, 30)
    back.close()


async def test_one_push_and_one_notify_per_batch(harness: Any) -> None:
    pair = await counted_pair(harness)
    front, back, fcount, bcount = pair.front, pair.back, pair.fcount, pair.bcount
    pending = asyncio.ensure_future(front.request_many(treq(i) for i in range(32)))
    batch = await asyncio.wait_for(back.next_batch(), 10)
    assert len(batch) == 32 and fcount.notifies == 1
    back.respond_many(echo(r) for r in batch)
    assert bcount.notifies == 0  # published at the end of the iteration, together
    assert [r.status for r in await asyncio.wait_for(pending, 10)] == list(range(32))
    assert bcount.notifies == 1
    # The back end has not re-armed its event since: the next push needs no notify.
    pending = asyncio.ensure_future(front.request_many(treq(i) for i in range(8)))
    await until(lambda: back.ring.unconsumed_requests() == 8, "second batch published")
    assert fcount.notifies == 1
    back.respond_many(echo(r) for r in await asyncio.wait_for(back.next_batch(), 10))
    await asyncio.wait_for(pending, 10)
    # Re-armed by a final check (what next_batch does before sleeping): one notify.
    assert not back.ring.final_check_for_requests()
    pending = asyncio.ensure_future(front.request_many(treq(i) for i in range(8)))
    batch = await asyncio.wait_for(back.next_batch(), 10)
    assert len(batch) == 8 and fcount.notifies == 2
    back.respond_many(echo(r) for r in batch)
    await asyncio.wait_for(pending, 10)
    front.close()
    back.close()
    pair.close_resources()


async def test_cancel_after_submit_keeps_the_id_until_answered(harness: Any) -> None:
    front, back = await ring_pair(harness)
    task = asyncio.create_task(front.request(treq(1)))
    (req,) = await asyncio.wait_for(back.next_batch(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert front.in_flight == 1 and front.free_slots == front.ring.nr_ents - 1
    # New requests never get the cancelled request's id while it is outstanding.
    t2 = asyncio.create_task(front.request(treq(2)))
    (req2,) = await asyncio.wait_for(back.next_batch(), 10)
    assert req2.id != req.id
    back.respond(echo(req))  # the late answer is dropped, the id freed
    back.respond(echo(req2))
    assert (await asyncio.wait_for(t2, 10)).status == 2
    await until(lambda: front.in_flight == 0, "late answer consumed")
    assert front.free_slots == front.ring.nr_ents
    front.close()
    back.close()


async def test_cancel_while_waiting_for_a_slot_submits_nothing(harness: Any) -> None:
    front, back = await ring_pair(harness)
    n = front.ring.nr_ents
    futs = [await front.submit(treq(i)) for i in range(n)]
    waiter = asyncio.create_task(front.request(treq(999)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    batch = await asyncio.wait_for(back.next_batch(), 10)
    assert len(batch) == n and back.ring.unconsumed_requests() == 0
    back.respond(echo(batch[0]))
    assert (await asyncio.wait_for(futs[0], 10)).status == 0
    assert front.free_slots == 1  # the cancelled waiter did not take it
    front.close()
    for f in futs[1:]:
        with pytest.raises(RingShutdown):
            await f
    back.close()


async def test_request_timeout_while_waiting_for_a_slot(harness: Any) -> None:
    front, back = await ring_pair(harness)
    for i in range(front.ring.nr_ents):
        await front.submit(treq(i))
    with pytest.raises(TimeoutError):
        await front.request(treq(0), timeout=0.01)
    front.close()
    back.close()


async def test_local_close_fails_pending_requests_clearly(harness: Any) -> None:
    front, back = await ring_pair(harness)
    tasks = [asyncio.create_task(front.request(treq(i))) for i in range(5)]
    await asyncio.wait_for(back.next_batch(), 10)
    front.close()
    for t in tasks:
        with pytest.raises(RingShutdown, match="shut down"):
            await t
    with pytest.raises(RingShutdown):
        await front.request(treq(0))
    front.close()  # idempotent
    back.close()


async def test_back_going_away_fails_front_requests(harness: Any) -> None:
    front, back = await ring_pair(harness)
    tasks = [asyncio.create_task(front.request(treq(i))) for i in range(3)]
    await asyncio.wait_for(back.next_batch(), 10)
    back.close()
    for t in tasks:
        with pytest.raises(ConnectionResetError, match=f"peer domain {BE} went away"):
            await asyncio.wait_for(t, 10)
    assert isinstance(front.error, ConnectionResetError)
    front.close()


async def test_back_drains_requests_published_before_the_front_left(harness: Any) -> None:
    front, back = await ring_pair(harness)
    for i in range(3):
        await front.submit(treq(i))
    front.flush()
    front.close()
    got = []
    with pytest.raises(ConnectionResetError):
        async for req in back:
            got.append(req.size)
    assert got == [0, 1, 2]
    back.close()


async def test_local_close_ends_iteration(harness: Any) -> None:
    front, back = await ring_pair(harness)

    async def consume() -> list[int]:
        return [r.size async for r in back]

    task = asyncio.create_task(consume())
    await front.submit(treq(7))
    await until(lambda: back.serving == 1, "request taken")
    back.close()
    assert await asyncio.wait_for(task, 10) == [7]
    front.close()


# ------------------------------------------------------------------ hostile peers


async def test_invented_and_duplicate_response_ids(harness: Any) -> None:
    for bad in ("invented", "duplicate"):
        front, back = await ring_pair(harness, check_ids=False)
        tasks = [asyncio.create_task(front.request(treq(i))) for i in range(3)]
        batch = await asyncio.wait_for(back.next_batch(), 10)
        back.respond(echo(batch[0]))
        back.respond(N.NetifTxResponse(batch[0].id if bad == "duplicate" else 999, 0))
        assert (await asyncio.wait_for(tasks[0], 10)).status == 0
        for t in tasks[1:]:
            with pytest.raises(ProtocolError) as e:
                await asyncio.wait_for(t, 10)
            assert e.value.field == "id"
        assert isinstance(front.error, ProtocolError) and front.error.field == "id"
        with pytest.raises(ProtocolError):
            await front.request(treq(0))
        front.close()
        back.close()


async def test_rsp_prod_overflow_shuts_the_front_down(harness: Any) -> None:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    front = await AsyncFrontRing.create(fp, BE, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    mapping = bp.grants.map(FE, front.refs)
    ch = await bp.events.connect(FE, front.port)
    task = asyncio.create_task(front.request(treq(1)))
    await until(lambda: mapping.buf[REQ_PROD] == 1, "request published")
    mapping.buf[RSP_PROD : RSP_PROD + 4] = (5000).to_bytes(4, "little")
    ch.notify()
    with pytest.raises(ProtocolError) as e:
        await asyncio.wait_for(task, 10)
    assert e.value.field == "rsp_prod"
    front.close()
    mapping.close()
    ch.close()


async def _hostile_front(harness: Any) -> tuple[Any, Any, FrontRing[Any, Any], TxBack]:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    share = fp.grants.share(BE, 1)
    ch = await fp.events.listen(BE)
    raw: FrontRing[Any, Any] = FrontRing(share.buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    back: TxBack = await AsyncBackRing.attach(
        bp, FE, share.refs, ch.port, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE
    )
    return share, ch, raw, back


async def test_front_reusing_an_id_in_flight(harness: Any) -> None:
    share, ch, raw, back = await _hostile_front(harness)
    raw.put_request(N.NetifTxRequest(1, 0, 0, 7, 60))
    raw.put_request(N.NetifTxRequest(2, 0, 0, 7, 60))
    raw.push_requests()
    ch.notify()
    with pytest.raises(ProtocolError) as e:
        await asyncio.wait_for(back.next_batch(), 10)
    assert e.value.field == "id" and back.closed
    with pytest.raises(ProtocolError):
        back.respond(N.NetifTxResponse(7, 0))
    back.close()
    raw.close()
    share.close()
    ch.close()


async def test_front_overflowing_req_prod(harness: Any) -> None:
    share, ch, raw, back = await _hostile_front(harness)
    share.buf[REQ_PROD : REQ_PROD + 4] = (raw.nr_ents + 1).to_bytes(4, "little")
    ch.notify()
    with pytest.raises(ProtocolError) as e:
        async for _ in back:
            pass
    assert e.value.field == "req_prod"
    assert isinstance(back.error, ProtocolError)
    back.close()
    raw.close()
    share.close()
    ch.close()


# ------------------------------------------------------------------ adversarial (hypothesis)

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 40)),
        st.tuples(st.just("answer"), st.integers(1, 40), st.randoms(use_true_random=False)),
        st.tuples(st.just("invent"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("duplicate")),
        st.tuples(st.just("overflow"), st.integers(1, 2**32 - 1)),
    ),
    max_size=25,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(actions=ACTIONS, start=st.integers(0, 2**32 - 1))
def test_async_front_against_adversarial_back(actions: list[tuple[Any, ...]], start: int) -> None:
    asyncio.run(_adversarial(actions, start))


async def _adversarial(actions: list[tuple[Any, ...]], start: int) -> None:
    world = InHeapWorld()
    async with InHeapPlatform(FE, world) as fp, InHeapPlatform(BE, world) as bp:
        front: TxFront = await AsyncFrontRing.create(
            fp, BE, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, start=start
        )
        mapping = bp.grants.map(FE, front.refs)
        ch = await bp.events.connect(FE, front.port)
        back = BackRing(mapping.buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
        futs: dict[int, asyncio.Future[N.NetifTxResponse]] = {}  # size -> future
        queue: list[N.NetifTxRequest] = []
        answered: list[int] = []
        violated: str | None = None
        counter = 0
        for action in actions:
            if front.closed:
                break
            kind = action[0]
            if kind == "submit":
                for _ in range(min(action[1], front.free_slots)):
                    futs[counter] = await front.submit(treq(counter))
                    counter += 1
                front.flush()
                queue += back.take_requests()
                continue
            if back.pending_responses == 0 and kind != "overflow":
                continue
            if kind == "answer":
                rnd = action[2]
                chosen = rnd.sample(queue, min(action[1], len(queue)))
                for r in chosen:
                    queue.remove(r)
                    back.put_response(echo(r))
                    answered.append(r.size)
            elif kind == "invent":
                if any(r.id == action[1] for r in queue):
                    continue  # that would be a legitimate answer
                back.put_response(N.NetifTxResponse(action[1], 0))
                violated = "id"
            elif kind == "duplicate":
                if not answered:
                    continue
                back.put_response(N.NetifTxResponse(front_id_of(answered[-1], futs), 0))
                violated = "id"
            else:
                mapping.buf[RSP_PROD : RSP_PROD + 4] = (
                    (back.rsp_prod_pvt + back.pending_responses + action[1]) & 0xFFFFFFFF
                ).to_bytes(4, "little")
                violated = "rsp_prod"
            if kind != "overflow":
                back.push_responses()
            ch.notify()
            await until(lambda: front.closed or all(futs[s].done() for s in answered), "delivery")
            if violated:
                await until(lambda: front.closed, "shutdown on violation")
        event(f"violation: {violated}")
        if violated:
            assert isinstance(front.error, ProtocolError)
            assert front.error.field in ("id", "rsp_prod")
        else:
            assert front.error is None
            for s in answered:
                assert futs[s].result() == N.NetifTxResponse(futs[s].result().id, s)
        front.close()
        for s, f in futs.items():
            if s not in answered or violated:
                assert f.done()
                if not f.cancelled() and f.exception() is not None:
                    assert isinstance(f.exception(), (ProtocolError, RingShutdown))
        back.close()
        mapping.close()
        ch.close()
    world.assert_cleaned_up()


def front_id_of(size: int, futs: dict[int, asyncio.Future[N.NetifTxResponse]]) -> int:
    return futs[size].result().id


BACK_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 40)),
        st.tuples(st.just("reuse")),
        st.tuples(st.just("overflow"), st.integers(1, 1000)),
        st.tuples(st.just("backwards"), st.integers(1, 50)),
    ),
    max_size=20,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(actions=BACK_ACTIONS, start=st.integers(0, 2**32 - 1))
def test_async_back_against_adversarial_front(actions: list[tuple[Any, ...]], start: int) -> None:
    asyncio.run(_adversarial_front(actions, start))


async def _adversarial_front(actions: list[tuple[Any, ...]], start: int) -> None:
    world = InHeapWorld()
    async with InHeapPlatform(FE, world) as fp, InHeapPlatform(BE, world) as bp:
        share = fp.grants.share(BE, 1)
        ch = await fp.events.listen(BE)
        raw: FrontRing[Any, Any] = FrontRing(
            share.buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, start=start
        )
        back: TxBack = await AsyncBackRing.attach(
            bp, FE, share.refs, ch.port, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE
        )
        answered: list[int] = []

        def handler(r: N.NetifTxRequest) -> N.NetifTxResponse:
            answered.append(r.size)
            return echo(r)

        server = asyncio.ensure_future(back.serve(handler))
        next_id, sent, violated = 0, 0, None
        for action in actions:
            if back.closed:
                break
            kind = action[0]
            if kind == "send":
                n = min(action[1], raw.free_requests)
                raw.put_requests(N.NetifTxRequest(0, 0, 0, (next_id + k) & 0xFFFF, sent + k)
                                 for k in range(n))  # fmt: skip
                next_id, sent = next_id + n, sent + n
                raw.push_requests()
            elif kind == "reuse":
                if raw.in_flight == 0 or raw.free_requests < 2:
                    continue
                raw.put_requests([N.NetifTxRequest(0, 0, 0, 7777, 0)] * 2)
                raw.push_requests()
                violated = "id"
            else:
                delta = action[1] if kind == "overflow" else -action[1]
                bogus = (raw.req_prod_pvt + raw.nr_ents + delta) & 0xFFFFFFFF
                if kind == "backwards":
                    bogus = (back.ring.req_cons - action[1]) & 0xFFFFFFFF
                share.buf[REQ_PROD : REQ_PROD + 4] = bogus.to_bytes(4, "little")
                violated = "req_prod"
            ch.notify()
            if violated:
                await until(lambda: back.closed, "shutdown")
                break
            await until(lambda: back.ring.req_cons == raw.req_prod_pvt, "served")
            await until(lambda: raw.unconsumed_responses() == raw.in_flight, "answered")
            raw.take_responses()
        if violated:
            with pytest.raises(ProtocolError) as e:
                await asyncio.wait_for(server, 10)
            assert e.value.field == violated
        else:
            await until(lambda: len(answered) == sent, "all answered")
            assert answered == list(range(sent))
            back.close()
            await asyncio.wait_for(server, 10)
        back.close()
        raw.close()
        share.close()
        ch.close()
    world.assert_cleaned_up()
