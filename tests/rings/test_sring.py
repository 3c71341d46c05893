"""The pure io/ring.h front/back rings: behaviour, wrap-around, hostile peers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aioxen import ProtocolError
from aioxen.blk import blkif as B
from aioxen.net import netif as N
from aioxen.rings import formats as F
from aioxen.rings.sring import (
    REQ_EVENT,
    REQ_PROD,
    RSP_EVENT,
    RSP_PROD,
    BackRing,
    FrontRing,
    RingFull,
    ring_entries,
    ring_pages,
)

U32 = 0xFFFFFFFF
NEAR_WRAP = 2**32 - 7


def u32(buf: bytearray, off: int) -> int:
    return int(struct.unpack_from("<I", buf, off)[0])


def set_u32(buf: bytearray, off: int, v: int) -> None:
    struct.pack_into("<I", buf, off, v & U32)


TxFront = FrontRing[N.NetifTxRequest, N.NetifTxResponse]
TxBack = BackRing[N.NetifTxRequest, N.NetifTxResponse]


def tx_pair(start: int = NEAR_WRAP, pages: int = 1) -> tuple[bytearray, TxFront, TxBack]:
    buf = bytearray(4096 * pages)
    front = FrontRing(buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, start=start)
    back = BackRing(buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    return buf, front, back


def treq(i: int) -> N.NetifTxRequest:
    return N.NetifTxRequest(gref=i, offset=0, flags=0, id=i & 0xFFFF, size=60)


def test_front_initialises_header_back_does_not() -> None:
    buf = bytearray(b"\xee" * 4096)
    FrontRing(buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, start=5)
    assert [u32(buf, o) for o in (REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT)] == [5, 6, 5, 6]
    assert buf[16:64] == bytes(48)
    before = bytes(buf)
    BackRing(buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)
    assert bytes(buf) == before


def test_round_trip_across_index_wrap() -> None:
    buf, front, back = tx_pair()
    for i in range(20):
        front.put_request(treq(i))
    assert front.push_requests()
    assert u32(buf, REQ_PROD) == (NEAR_WRAP + 20) & U32  # wrapped past 2**32
    reqs = back.take_requests()
    assert [r.id for r in reqs] == list(range(20))
    for r in reqs:
        back.put_response(N.NetifTxResponse(r.id, N.NETIF_RSP_OKAY))
    assert back.push_responses()
    assert [r.id for r in front.take_responses()] == list(range(20))
    assert front.free_requests == front.nr_ents
    assert not front.final_check_for_responses()
    assert not back.final_check_for_requests()


def test_ring_full_and_respond_without_request() -> None:
    _, front, back = tx_pair()
    for i in range(front.nr_ents):
        front.put_request(treq(i))
    with pytest.raises(RingFull):
        front.put_request(treq(0))
    assert front.put_requests([treq(1)]) == 0
    with pytest.raises(RingFull):
        back.put_response(N.NetifTxResponse(0, 0))


def test_multi_page_blkif_ring() -> None:
    for order in range(4):
        buf = bytearray(4096 * ring_pages(order))
        front = FrontRing(buf, B.BLKIF_REQUEST, B.BLKIF_RESPONSE, start=2**32 - 3)
        back = BackRing(buf, B.BLKIF_REQUEST, B.BLKIF_RESPONSE)
        assert front.nr_ents == back.nr_ents == 32 << order
        seg = (B.BlkifSegment(77, 0, 7),)
        n = front.nr_ents
        for i in range(n):
            front.put_request(B.BlkifRequest(B.BLKIF_OP_READ, 1, 0, 2**63 + i, i * 8, seg))
        front.push_requests()
        reqs = back.take_requests()
        assert [r.id for r in reqs] == [2**63 + i for i in range(n)]
        assert all(isinstance(r, B.BlkifRequest) and r.seg == seg for r in reqs)


def test_take_limit_and_batches() -> None:
    _, front, back = tx_pair()
    assert front.put_requests(treq(i) for i in range(10)) == 10
    front.push_requests()
    assert len(back.take_requests(limit=3)) == 3
    assert back.unconsumed_requests() == 7
    assert back.final_check_for_requests()
    assert len(back.take_requests()) == 7


def test_notify_decision_uses_event_window() -> None:
    buf, front, back = tx_pair(start=100)
    front.put_request(treq(0))
    assert front.push_requests()  # req_event 101 in (100, 101]
    front.put_request(treq(1))
    assert not front.push_requests()  # back has not re-armed
    back.take_requests()
    assert not back.final_check_for_requests()
    assert u32(buf, REQ_EVENT) == 103
    front.put_requests([treq(2), treq(3), treq(4)])
    assert front.push_requests()  # 103 in (102, 105]
    # batching: the back asks to be woken only after 4 more requests
    back.take_requests()
    assert not back.final_check_for_requests(ahead=4)
    front.put_requests([treq(5), treq(6), treq(7)])
    assert not front.push_requests()
    front.put_request(treq(8))
    assert front.push_requests()


def test_push_with_nothing_new_does_not_notify() -> None:
    _, front, back = tx_pair()
    assert not front.push_requests()
    assert not back.push_responses()


# ------------------------------------------------------------------ hostile peers


def test_back_rejects_req_prod_past_ring_size() -> None:
    buf, front, back = tx_pair()
    set_u32(buf, REQ_PROD, NEAR_WRAP + front.nr_ents + 1)
    with pytest.raises(ProtocolError) as e:
        back.take_requests()
    assert e.value.field == "req_prod"
    # the ring stays broken; every later call raises the same error
    with pytest.raises(ProtocolError) as again:
        back.put_response(N.NetifTxResponse(0, 0))
    assert again.value is e.value


def test_back_rejects_req_prod_moving_backwards() -> None:
    buf, front, back = tx_pair()
    front.put_requests(treq(i) for i in range(4))
    front.push_requests()
    back.take_requests()
    set_u32(buf, REQ_PROD, NEAR_WRAP + 2)
    with pytest.raises(ProtocolError) as e:
        back.final_check_for_requests()
    assert e.value.field == "req_prod"


def test_back_counts_unanswered_requests_against_the_ring() -> None:
    buf, front, back = tx_pair()
    n = front.nr_ents
    front.put_requests(treq(i) for i in range(n))
    front.push_requests()
    assert len(back.take_requests()) == n
    # A front that produces more before any response was sent is overflowing.
    set_u32(buf, REQ_PROD, NEAR_WRAP + n + 1)
    with pytest.raises(ProtocolError, match="req_prod"):
        back.take_requests()


def test_front_rejects_responses_it_never_asked_for() -> None:
    buf, front, _ = tx_pair()
    front.put_requests(treq(i) for i in range(3))
    front.push_requests()
    set_u32(buf, RSP_PROD, NEAR_WRAP + 4)
    with pytest.raises(ProtocolError) as e:
        front.take_responses()
    assert e.value.field == "rsp_prod"
    assert front.error is e.value


def test_front_counts_only_pushed_requests() -> None:
    buf, front, _ = tx_pair()
    front.put_requests(treq(i) for i in range(3))  # put but not pushed
    set_u32(buf, RSP_PROD, NEAR_WRAP + 1)
    with pytest.raises(ProtocolError, match="rsp_prod"):
        front.unconsumed_responses()


def test_scribbled_producer_index_is_detected_on_push() -> None:
    buf, front, back = tx_pair()
    front.put_request(treq(0))
    front.push_requests()
    set_u32(buf, REQ_PROD, 12345)  # the back end wrote to a field it does not own
    front.put_request(treq(1))
    with pytest.raises(ProtocolError) as e:
        front.push_requests()
    assert e.value.field == "req_prod"

    buf, front, back = tx_pair()
    front.put_request(treq(0))
    front.push_requests()
    back.take_requests()
    set_u32(buf, RSP_PROD, 999)
    back.put_response(N.NetifTxResponse(0, 0))
    with pytest.raises(ProtocolError) as e:
        back.push_responses()
    assert e.value.field == "rsp_prod"


def test_slots_are_decoded_from_a_private_copy() -> None:
    buf, front, back = tx_pair(start=0)
    front.put_request(treq(7))
    front.push_requests()
    (req,) = back.take_requests()
    buf[64:76] = b"\xff" * 12  # the front rewrites the slot after it was consumed
    assert req == treq(7)


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, U32),
    writes=st.lists(
        st.tuples(st.sampled_from([REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT]),
                  st.integers(0, U32)),
        max_size=6,
    ),
    rounds=st.integers(1, 4),
)  # fmt: skip
def test_hostile_header_never_breaks_anything_else(
    start: int, writes: list[tuple[int, int]], rounds: int
) -> None:
    """Arbitrary header scribbles: each call either works within bounds or raises a
    ProtocolError naming a shared field; nothing else escapes."""
    buf, front, back = tx_pair(start=start)
    fields = {"req_prod", "rsp_prod"}
    for _ in range(rounds):
        for off, value in writes:
            set_u32(buf, off, value)
        for step in (
            lambda: front.put_requests(treq(i) for i in range(5)),
            front.push_requests,
            back.take_requests,
            lambda: back.put_responses(
                N.NetifTxResponse(0, 0) for _ in range(back.pending_responses)
            ),
            back.push_responses,
            front.take_responses,
            front.final_check_for_responses,
            back.final_check_for_requests,
        ):
            try:
                step()
            except ProtocolError as e:
                assert e.field in fields
        assert 0 <= front.in_flight <= front.nr_ents
        assert 0 <= back.pending_responses <= back.nr_ents


# ------------------------------------------------------------------ state machine


class FrontBackMachine(RuleBasedStateMachine):
    """Front and back with random batches; the model checks ordering, content and that no
    wake-up is lost: a side that went to sleep after a negative final check is always
    notified by the peer's next non-empty push."""

    @initialize(start=st.integers(0, U32), pages=st.sampled_from([1, 2]))
    def setup(self, start: int, pages: int) -> None:
        self.buf = bytearray(4096 * pages)
        self.front = FrontRing(self.buf, B.BLKIF_REQUEST, B.BLKIF_RESPONSE, start=start)
        self.back = BackRing(self.buf, B.BLKIF_REQUEST, B.BLKIF_RESPONSE)
        self.next_id = 0
        self.sent: list[int] = []  # ids in the order produced
        self.answered = 0  # ids answered by the back, in order
        self.received = 0  # responses seen by the front
        self.back_queue: list[B.BlkifAnyRequest] = []
        self.front_asleep = False
        self.back_asleep = False
        self.unpushed_reqs = 0
        self.unpushed_rsps = 0

    @rule(n=st.integers(1, 40))
    def front_put(self, n: int) -> None:
        n = min(n, self.front.free_requests)
        for _ in range(n):
            self.front.put_request(
                B.BlkifRequest(B.BLKIF_OP_WRITE, 0, 3, self.next_id, self.next_id * 8)
            )
            self.sent.append(self.next_id)
            self.next_id += 1
        self.unpushed_reqs += n

    @rule()
    def front_push(self) -> None:
        notify = self.front.push_requests()
        if self.back_asleep and self.unpushed_reqs:
            assert notify, "lost wake-up: back end asleep but not notified"
        if notify:
            self.back_asleep = False
        self.unpushed_reqs = 0

    @rule(limit=st.one_of(st.none(), st.integers(1, 40)))
    def back_take(self, limit: int | None) -> None:
        got = self.back.take_requests(limit)
        start = self.answered + len(self.back_queue)
        assert [r.id for r in got] == self.sent[start : start + len(got)]
        self.back_queue.extend(got)

    @rule(n=st.integers(1, 40))
    def back_put(self, n: int) -> None:
        for r in self.back_queue[:n]:
            self.back.put_response(B.BlkifResponse(r.id, r.operation, B.BLKIF_RSP_OKAY))
            self.unpushed_rsps += 1
        self.answered += len(self.back_queue[:n])
        del self.back_queue[:n]

    @rule()
    def back_push(self) -> None:
        notify = self.back.push_responses()
        if self.front_asleep and self.unpushed_rsps:
            assert notify, "lost wake-up: front end asleep but not notified"
        if notify:
            self.front_asleep = False
        self.unpushed_rsps = 0

    @rule(limit=st.one_of(st.none(), st.integers(1, 40)))
    def front_take(self, limit: int | None) -> None:
        got = self.front.take_responses(limit)
        assert [r.id for r in got] == self.sent[self.received : self.received + len(got)]
        self.received += len(got)

    @precondition(lambda self: not self.front_asleep)
    @rule()
    def front_final(self) -> None:
        if not self.front.final_check_for_responses():
            self.front_asleep = True

    @precondition(lambda self: not self.back_asleep)
    @rule()
    def back_final(self) -> None:
        if not self.back.final_check_for_requests():
            self.back_asleep = True

    @invariant()
    def counters(self) -> None:
        if hasattr(self, "front"):
            assert self.front.in_flight == len(self.sent) - self.received
            assert self.back.pending_responses == len(self.back_queue)


FrontBackMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None
)
test_front_back_state_machine = FrontBackMachine.TestCase


def test_entries_formula() -> None:
    assert ring_entries(4096, 12) == 256
    assert ring_entries(4096, 4032) == 1
    with pytest.raises(ValueError):
        ring_entries(4096, 4033)


def test_front_attach_without_init_and_put_encoded() -> None:
    buf, front, back = tx_pair(start=2**32 - 2)
    front.put_requests(treq(i) for i in range(3))
    front.push_requests()
    before = bytes(buf[:64])
    # A second front object attaches to the live ring (FRONT_RING_ATTACH) at its index.
    again: TxFront = FrontRing(
        buf, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, init=False, start=front.req_prod_pvt
    )
    assert bytes(buf[:64]) == before  # nothing written
    codec = again.request_codec
    again.put_encoded(codec.pack_with_ids([treq(9)], [9]))
    again.push_requests()
    assert [r.id for r in back.take_requests()] == [0, 1, 2, 9]
    with pytest.raises(RingFull):
        again.put_encoded(codec.pack([treq(0)] * again.nr_ents))
    with pytest.raises(ValueError):
        again.put_encoded(b"\0" * 5)


# ------------------------------------------------------------------ encoded (bulk) slots

RX_REQ = struct.Struct("<HxxI")  # netif_rx_request: id, pad, gref
RX_RSP = struct.Struct("<HHHh")  # netif_rx_response: id, offset, flags, status
RxFront = FrontRing[bytes, bytes]
RxBack = BackRing[bytes, bytes]


def rx_pair(start: int = NEAR_WRAP) -> tuple[bytearray, RxFront, RxBack]:
    """A netif RX ring (8-byte slots) moving raw slots, as netfront/netback use it."""
    buf = bytearray(4096)
    req, rsp = F.RawFormat(8, name="rx_req"), F.RawFormat(8, name="rx_rsp", align=2)
    return buf, FrontRing(buf, req, rsp, start=start), BackRing(buf, req, rsp)


def test_encoded_slots_round_trip_across_the_wrap() -> None:
    buf, front, back = rx_pair(start=2**32 - 3)  # slot 253 of 256: both wrap 3 slots in
    n = front.nr_ents
    reqs = b"".join(RX_REQ.pack(i, 1000 + i) for i in range(10))
    first = front.put_encoded(reqs)
    front.push_requests()
    assert first == 2**32 - 3 and u32(buf, REQ_PROD) == 7
    assert bytes(buf[64 + (n - 3) * 8 : 64 + n * 8]) == reqs[:24]  # 3 at the end...
    assert bytes(buf[64 : 64 + 7 * 8]) == reqs[24:]  # ...7 wrapped to the start
    data, count, at = back.take_encoded(limit=4)
    assert (data, count, at) == (reqs[:32], 4, first)
    data, count, at = back.take_encoded()
    assert (data, count, at) == (reqs[32:], 6, (first + 4) & U32)
    assert back.take_encoded() == (b"", 0, (first + 10) & U32)
    assert back.pending_responses == 10
    rsps = b"".join(RX_RSP.pack(i, 0, 0, i) for i in range(10))
    assert back.put_encoded(memoryview(rsps)) == first
    back.push_responses()
    assert front.take_encoded() == (rsps, 10, first)
    assert front.free_requests == n and not front.final_check_for_responses()


def test_responses_go_in_the_slots_of_the_requests_they_answer() -> None:
    """netif RX: the backend answers each posted buffer in the request's own slot, so the
    frontend finds the buffer from the slot index and never trusts the response id."""
    buf, front, back = rx_pair(start=2**32 - 2)
    posted = {}
    for k in range(3):
        reqs = b"".join(RX_REQ.pack(100 * k + i, 7) for i in range(5))
        first = front.put_encoded(reqs)
        posted.update({(first + i) & U32: 100 * k + i for i in range(5)})
    front.push_requests()
    data, count, first = back.take_encoded(limit=8)
    assert count == 8 and [RX_REQ.unpack_from(data, 8 * i)[0] for i in range(8)] == [
        posted[(first + i) & U32] for i in range(8)
    ]
    # answer 6 of the 8 (a frame spanning two buffers, then four single frames); the
    # response ids are garbage on purpose: placement is by slot, not by id
    rsps = b"".join(RX_RSP.pack(0xBEEF, 0, 0, 60 + i) for i in range(6))
    at = back.put_encoded(rsps)
    assert at == first
    for i in range(6):  # each response overwrote its request's slot
        slot = 64 + ((first + i) & (back.nr_ents - 1)) * 8
        assert bytes(buf[slot : slot + 8]) == rsps[8 * i : 8 * i + 8]
    back.push_responses()
    got, count, rfirst = front.take_encoded()
    assert (got, count, rfirst) == (rsps, 6, first)
    assert [posted[(rfirst + i) & U32] for i in range(count)] == [0, 1, 2, 3, 4, 100]
    # the other two and the rest
    back.take_encoded()
    assert back.put_encoded(RX_RSP.pack(0, 0, 0, 1) * 9) == (first + 6) & U32
    with pytest.raises(RingFull):
        back.put_encoded(RX_RSP.pack(0, 0, 0, 1))  # nothing left to answer
    with pytest.raises(ValueError, match="whole slots"):
        back.put_encoded(b"\0" * 12)
    back.push_responses()
    assert front.take_encoded()[1:] == (9, (first + 6) & U32)
    assert front.free_requests == front.nr_ents


def test_back_put_encoded_is_all_or_nothing() -> None:
    buf, front, back = rx_pair()
    front.put_encoded(RX_REQ.pack(1, 1) * 2)
    front.push_requests()
    back.take_encoded()
    before = bytes(buf)
    with pytest.raises(RingFull):
        back.put_encoded(RX_RSP.pack(1, 0, 0, 1) * 3)
    assert bytes(buf) == before and back.rsp_prod_pvt == back.req_cons - 2 & U32
    assert back.put_encoded(b"") == back.rsp_prod_pvt  # nothing to write is fine


def test_take_encoded_validates_like_take() -> None:
    buf, front, back = rx_pair()
    set_u32(buf, REQ_PROD, NEAR_WRAP + back.nr_ents + 1)
    with pytest.raises(ProtocolError) as e:
        back.take_encoded()
    assert e.value.field == "req_prod" and back.error is e.value
    with pytest.raises(ProtocolError):
        back.put_encoded(b"")  # broken for good
    buf, front, back = rx_pair()
    front.put_encoded(RX_REQ.pack(1, 1) * 3)
    front.push_requests()
    set_u32(buf, RSP_PROD, NEAR_WRAP + 4)  # one response more than requests out
    with pytest.raises(ProtocolError) as e:
        front.take_encoded()
    assert e.value.field == "rsp_prod"
    front.close()
    with pytest.raises(ProtocolError):
        front.take_encoded()


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 80), st.integers(0, 80), st.integers(0, 80)),
        min_size=1,
        max_size=25,
    ),
    start=st.sampled_from([0, 2**31, 2**32 - 1, NEAR_WRAP]),
)
def test_encoded_batches_match_the_decoding_api(
    ops: list[tuple[int, int, int]], start: int
) -> None:
    """Random batch sizes: every request arrives once, in order, at the index it was put
    at; every response lands in its request's slot and comes back at that index."""
    _, front, back = rx_pair(start)
    put_at: dict[int, int] = {}
    taken: list[tuple[int, int]] = []  # (index, id) consumed by the back, unanswered
    seq = 0
    for n_put, n_take, n_answer in ops:
        k = min(n_put, front.free_requests)
        if k:
            first = front.put_encoded(b"".join(RX_REQ.pack(seq + i, 0) for i in range(k)))
            put_at.update({(first + i) & U32: seq + i for i in range(k)})
            seq += k
            front.push_requests()
        data, n, first = back.take_encoded(n_take)
        ids = [RX_REQ.unpack_from(data, 8 * i)[0] for i in range(n)]
        assert ids == [put_at[(first + i) & U32] for i in range(n)]
        taken += [((first + i) & U32, ident) for i, ident in enumerate(ids)]
        j = min(n_answer, len(taken))
        if j:
            at = back.put_encoded(b"".join(RX_RSP.pack(ident, 0, 0, 1) for _, ident in taken[:j]))
            assert at == taken[0][0]
            back.push_responses()
            del taken[:j]
        data, n, first = front.take_encoded()
        for i in range(n):
            ident = RX_RSP.unpack_from(data, 8 * i)[0]
            assert ident == put_at.pop((first + i) & U32)
    assert len(put_at) == front.in_flight
