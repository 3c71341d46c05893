"""netback against a hostile frontend, checked against a reference model.

A hand-driven frontend writes arbitrary TX chains — valid packets mixed with every kind
of malformed one (size 0, fragments overrunning the total, offset + size past the page,
unknown or foreign grant refs, ``more_data`` chains that never end, unknown, duplicate or
unnegotiated extra-info) and random garbage — into a real vif's ring.  The model (written
independently of :func:`aioxen.net.netif.parse_tx`) says which slots form which packet,
what each slot must be answered and which frames must come out.  The same vif serves every
hypothesis example, so "the vif keeps working" is checked across all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vif_rig import UNKNOWN_REF, RawBack, RawFront, page_pattern

from aioxen.errors import ProtocolError
from aioxen.net import netif
from aioxen.net.keys import BackendFeatures, FrontendFeatures
from aioxen.net.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    FrameInfo,
)

TX = struct.Struct("<IHHHH")

# --------------------------------------------------------------------------- the model


def model(
    slots: list[bytes], pages: dict[int, bytes], gso_types: set[int], extras_ok: bool
) -> tuple[list[tuple[int | None, int]], list[tuple[bytes, FrameInfo]], int]:
    """Expected ``(responses, frames, bad_packets)`` for a complete run of TX slots.

    Responses are ``(id, status)``; ``id`` is ``None`` for extra-info slots (answered
    ``NULL``, id unspecified).
    """
    responses: list[tuple[int | None, int]] = []
    frames: list[tuple[bytes, FrameInfo]] = []
    bad_packets = 0
    pos = 0
    while pos < len(slots):
        head = TX.unpack(slots[pos])
        pos += 1
        members: list[tuple[int | None, Any]] = [(head[3], head)]
        reason = None
        cut = False
        gso: tuple[int, int] | None = None
        mcast = False
        kinds: list[int] = []
        if head[2] & NETTXF_EXTRA_INFO:
            more = True
            while more:
                if len(members) - 1 == 4:  # a fifth extra slot: the chain is cut here
                    reason, cut = "too many extras", True
                    break
                raw = slots[pos]
                pos += 1
                members.append((None, raw))
                kind, more = raw[0], bool(raw[1] & 1)
                if reason:
                    continue
                if not extras_ok:
                    reason = "extras not negotiated"
                elif kind not in (1, 2, 3, 4):
                    reason = "unknown extra"
                kinds.append(kind)
                if kind == 1:  # the last GSO extra of a packet counts
                    size, gtype = struct.unpack_from("<HB", raw, 2)
                    gso = (gtype, size)
                if kind in (2, 3):
                    mcast = True
        datas = [head]
        if not cut:
            flags = head[2]
            while flags & NETTXF_MORE_DATA:
                if len(datas) == 18:
                    reason = reason or "chain too long"
                    break
                nxt = TX.unpack(slots[pos])
                pos += 1
                members.append((nxt[3], nxt))
                datas.append(nxt)
                flags = nxt[2]
        if reason is None:
            total = head[4]
            rest = sum(d[4] for d in datas[1:])
            sizes = [total - rest] + [d[4] for d in datas[1:]]
            if total == 0 or sizes[0] <= 0 or 0 in sizes:
                reason = "sizes"
            elif any(d[1] + s > 4096 for d, s in zip(datas, sizes, strict=True)):
                reason = "crosses page"
            elif gso is not None and (gso[0] not in gso_types or gso[1] == 0):
                reason = "gso"
            elif not mcast and any(d[0] not in pages for d in datas):
                reason = "grant"
        status = NETIF_RSP_ERROR if reason else NETIF_RSP_OKAY
        for ident, _ in members:
            responses.append((None, NETIF_RSP_NULL) if ident is None else (ident, status))
        if reason:
            bad_packets += 1
            continue
        if mcast:  # multicast control: answered, not delivered
            continue
        data = b"".join(pages[d[0]][d[1] : d[1] + s] for d, s in zip(datas, sizes, strict=True))
        info = FrameInfo(
            bool(head[2] & 1), bool(head[2] & 2), gso[0] if gso else 0, gso[1] if gso else 0
        )
        frames.append((data, info))
    return responses, frames, bad_packets


# --------------------------------------------------------------------------- strategies

ident = st.integers(0, 0xFFFF)


@st.composite
def valid_packet(draw: st.DrawFn, refs: list[int]) -> list[bytes]:
    nfrag = draw(st.integers(1, 18))
    frags = []
    for _ in range(nfrag):
        off = draw(st.integers(0, 4095))
        size = draw(st.integers(1, 4096 - off))
        frags.append((draw(st.sampled_from(refs)), off, size, draw(ident)))
    total = sum(f[2] for f in frags)
    if total > 0xFFFF:
        frags = frags[:1]
    gso = draw(st.sampled_from([0, 0, 1]))
    info = FrameInfo(draw(st.booleans()), draw(st.booleans()), gso, 1448 if gso else 0)
    extras: list[netif.Extra] = []
    if draw(st.booleans()):
        extras.append(netif.McastExtra(True, b"\x01\x00\x5e\x00\x00\x01"))
    return netif.build_tx(frags, info, extras)


@st.composite
def bad_packet(draw: st.DrawFn, refs: list[int], foreign: int) -> list[bytes]:
    kind = draw(
        st.sampled_from(
            ["size0", "overrun", "crosses", "badref", "foreign", "endless", "extra", "dupextra",
             "gso6", "gso0", "frag0", "garbage"]
        )
    )  # fmt: skip
    ref = draw(st.sampled_from(refs))
    i = draw(ident)
    if kind == "size0":
        return [TX.pack(ref, 0, 0, i, 0)]
    if kind == "overrun":
        return [TX.pack(ref, 0, NETTXF_MORE_DATA, i, 100), TX.pack(ref, 0, 0, i + 1 & 0xFFFF, 100)]
    if kind == "crosses":
        off = draw(st.integers(1, 4095))
        return [TX.pack(ref, off, 0, i, draw(st.integers(4097 - off, 0xFFFF)))]
    if kind in ("badref", "foreign"):
        bad = UNKNOWN_REF if kind == "badref" else foreign
        return netif.build_tx([(ref, 0, 100, i), (bad, 0, 100, i ^ 1)])
    if kind == "endless":
        n = draw(st.integers(19, 40))
        out = [TX.pack(ref, 0, NETTXF_MORE_DATA, (i + k) & 0xFFFF, 64) for k in range(n)]
        out[-1] = TX.pack(ref, 0, 0, i, 64)
        return out
    if kind in ("extra", "dupextra"):
        if kind == "extra":
            extra = bytes([draw(st.sampled_from([0, 5, 6, 200])), 0]) + bytes(10)
        else:
            extra = netif.encode_extra(netif.GsoExtra(1448, 1), more=True, slot_size=12)
        gso = netif.encode_extra(netif.GsoExtra(1448, 1), slot_size=12)
        head = TX.pack(ref, 0, NETTXF_EXTRA_INFO, i, 100)
        return [head, extra[:1] + bytes([1]) + extra[2:], gso]
    if kind in ("gso6", "gso0"):
        info = FrameInfo(True, False, 2 if kind == "gso6" else 1, 1448 if kind == "gso6" else 0)
        return netif.build_tx([(ref, 0, 1000, i)], info)
    if kind == "frag0":
        return [TX.pack(ref, 0, NETTXF_MORE_DATA, i, 100), TX.pack(ref, 0, 0, i ^ 1, 0)]
    garbage = draw(st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=30))
    # terminators: plain one-slot packets end whatever chain the garbage left open
    return garbage + [TX.pack(ref, 0, 0, i, 60)] * 24


def packets(refs: list[int], foreign: int) -> st.SearchStrategy[list[list[bytes]]]:
    return st.lists(st.one_of(valid_packet(refs), bad_packet(refs, foreign)), max_size=12)


# --------------------------------------------------------------------------- tests


_End = TypeVar("_End", RawFront, RawBack)


@contextlib.asynccontextmanager
async def raw_end(harness: Any, kind: type[_End]) -> AsyncIterator[_End]:
    """A raw ring end of ``kind`` (frontend domain 1, backend domain 0), closed after."""
    be = await harness.platform(0)
    fe = await harness.platform(1)
    end = await kind.create(fe, be)
    try:
        yield end
    finally:
        end.close()


def hostile_settings(max_examples: int) -> Any:
    """Hypothesis settings of the hostile-peer tests (a fixture per test, no deadline)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture
async def hostile_front(harness: Any) -> AsyncIterator[RawFront]:
    async with raw_end(harness, RawFront) as front:
        yield front


@hostile_settings(max_examples=100)
@given(data=st.data())
async def test_tx_matches_model(hostile_front: RawFront, data: st.DataObject) -> None:
    front = hostile_front
    pkts = data.draw(packets(front.pool_refs, front.foreign_ref))
    stats_before = front.vif.stats.tx_errors
    front.delivered.clear()
    # send in ring-sized rounds of whole packets
    rounds: list[list[bytes]] = [[]]
    for p in pkts:
        if len(rounds[-1]) + len(p) > 256:
            rounds.append([])
        rounds[-1].extend(p)
    all_slots = [s for r in rounds for s in r]
    want_rsps, want_frames, want_bad = model(all_slots, front.pages, {1}, True)
    got: list[tuple[int, int]] = []
    for r in rounds:
        rsps, _, _ = model(r, front.pages, {1}, True)
        got += await front.send_slots(r, len(rsps))
    assert len(got) == len(want_rsps)
    for (gi, gs), (wi, ws) in zip(got, want_rsps, strict=True):
        assert gs == ws
        if wi is not None:
            assert gi == wi
    assert front.delivered == want_frames
    assert front.vif.stats.tx_errors - stats_before == want_bad
    assert not front.vif.dead
    # and the vif still works: one plain frame goes through
    front.delivered.clear()
    ok = await front.send_slots(netif.build_tx([(front.pool_refs[0], 0, 60, 7)]), 1)
    assert ok == [(7, NETIF_RSP_OKAY)]
    assert front.delivered == [(page_pattern(0)[:60], netif.PLAIN)]


async def test_extras_refused_without_gso(harness: Any) -> None:
    be = await harness.platform(0)
    fe = await harness.platform(1)
    front = await RawFront.create(fe, be, backend_features=BackendFeatures(sg=True))
    try:
        slots = netif.build_tx([(front.pool_refs[1], 0, 200, 3)], FrameInfo(True, False, 1, 1400))
        want, frames, bad = model(slots, front.pages, set(), False)
        got = await front.send_slots(slots, len(want))
        assert [s for _, s in got] == [s for _, s in want] == [NETIF_RSP_ERROR, NETIF_RSP_NULL]
        assert frames == [] and bad == 1 and front.delivered == []
    finally:
        front.close()


async def test_req_prod_past_the_ring_disconnects(harness: Any) -> None:
    """Indices that claim more requests than the ring holds cannot be answered: the vif
    reports a ProtocolError naming req_prod and stops (the handshake then closes it)."""
    be = await harness.platform(0)
    fe = await harness.platform(1)
    front = await RawFront.create(fe, be)
    lost: list[BaseException] = []
    front.vif._on_lost = lost.append
    try:
        sb = front.tx._sb
        sb.store_u32(0, (front.tx.req_prod_pvt + 300) & 0xFFFFFFFF)
        front.channel.notify()
        for _ in range(200):
            if lost:
                break
            await asyncio.sleep(0.01)
        assert lost and isinstance(lost[0], ProtocolError) and lost[0].field == "req_prod"
        assert front.vif.dead
    finally:
        front.close()


# --------------------------------------------------------------------------- RX direction


async def test_rx_bad_buffers_are_answered_with_errors(harness: Any) -> None:
    be = await harness.platform(0)
    fe = await harness.platform(1)
    front = await RawFront.create(fe, be, features=FrontendFeatures(sg=True, persistent=False))
    try:
        refs = [front.rx_refs[0], UNKNOWN_REF, front.readonly_ref, front.foreign_ref]
        refs[2] = front.pool_refs[0]  # granted read-only: the backend cannot write it
        front.post_rx([*refs, front.rx_refs[1]])
        frames = [bytes([k]) * (100 + k) for k in range(5)]
        for f in frames:
            assert front.vif.send(f)
        raw = await front.rx_responses(5)
        rsps = list(struct.iter_unpack("<HHHh", raw))
        assert [r[0] for r in rsps] == [0, 1, 2, 3, 4]  # each in its request's slot
        assert [r[3] for r in rsps] == [100, NETIF_RSP_ERROR, NETIF_RSP_ERROR, NETIF_RSP_ERROR, 104]
        assert front.rx_page(0)[:100] == frames[0]
        assert front.rx_page(1)[:104] == frames[4]
        assert front.vif.stats.rx_errors == 3 and front.vif.stats.rx_frames == 2
    finally:
        front.close()


async def test_rx_gso_extra_occupies_a_request_slot(harness: Any) -> None:
    be = await harness.platform(0)
    fe = await harness.platform(1)
    feats = FrontendFeatures(sg=True, gso_tcpv4=True, csum_offload=True, persistent=True)
    front = await RawFront.create(fe, be, features=feats)
    try:
        front.post_rx(front.rx_refs[:4])
        frame = _tcp4_frame(6000)
        info = FrameInfo(csum_blank=True, gso_type=1, gso_size=1448)
        assert front.vif.send(frame, info)
        raw = await front.rx_responses(3)
        desc, used = netif.parse_rx(raw, 3)
        assert desc is not None and used == 3 and desc.error is None
        assert desc.info == info
        # slot 0: first 4096 bytes, slot 1: GSO extra, slot 2: the rest
        assert [f[0] for f in desc.frags] == [0, 2]
        assert front.rx_page(0) == frame[:4096]
        assert front.rx_page(2)[: len(frame) - 4096] == frame[4096:]
    finally:
        front.close()


def _tcp4_frame(payload: int) -> bytes:
    eth = bytes(6) + bytes(6) + b"\x08\x00"
    ip = bytearray(20)
    ip[0] = 0x45
    struct.pack_into("!H", ip, 2, 20 + 20 + payload)
    ip[8], ip[9] = 64, 6
    ip[12:16] = bytes([10, 0, 0, 1])
    ip[16:20] = bytes([10, 0, 0, 2])
    tcp = bytearray(20)
    tcp[12] = 0x50
    tcp[13] = 0x18
    return eth + bytes(ip) + bytes(tcp) + bytes(k & 0xFF for k in range(payload))


# --------------------------------------------------------------------------- frontend side


async def test_front_drops_bad_rx_responses_and_keeps_going(harness: Any) -> None:
    be = await harness.platform(0)
    fe = await harness.platform(1)
    back = await RawBack.create(fe, be)
    try:
        await _until(lambda: back.rx.unconsumed_requests() >= 4)
        reqs = list(struct.iter_unpack("<H2xI", back.rx.take_encoded(6)[0]))
        rsps = [
            netif.RX_RSP.pack(reqs[0][0], 0, 0, -1),  # error status
            netif.RX_RSP.pack(reqs[1][0], 4000, 0, 200),  # crosses the page
            netif.RX_RSP.pack(reqs[2][0], 0, netif.NETRXF_EXTRA_INFO, 60),
            bytes([9, 0]) + bytes(6),  # unknown extra type
            netif.RX_RSP.pack(reqs[4][0], 0, 0, 0),  # empty fragment
            netif.RX_RSP.pack(reqs[5][0], 0, 0, 60),  # a good one
        ]
        m = be.grants.map(fe.domid, [reqs[5][1]])
        m.buf[:60] = b"G" * 60
        m.close()
        back.rx.put_encoded(b"".join(rsps))
        back.rx.push_responses()
        back.channel.notify()
        await _until(lambda: len(back.received) >= 1)
        assert back.received == [(b"G" * 60, netif.PLAIN)]
        assert back.queue.stats.rx_errors == 4
        assert not back.failures
    finally:
        back.close()


async def test_front_fails_on_tx_response_for_unknown_id(harness: Any) -> None:
    be = await harness.platform(0)
    fe = await harness.platform(1)
    back = await RawBack.create(fe, be)
    try:
        assert back.queue.try_send(b"x" * 60, netif.PLAIN)
        back.queue.flush()
        await _until(lambda: back.tx.unconsumed_requests() == 1)
        (req,) = struct.iter_unpack("<IHHHH", back.tx.take_encoded()[0])
        bogus = (req[3] + 1) % 256
        back.tx.put_encoded(struct.pack("<Hh8x", bogus, 0))
        back.tx.push_responses()
        back.channel.notify()
        back.queue.want_tx_space()
        await _until(lambda: bool(back.failures))
        assert isinstance(back.failures[0], ProtocolError)
        assert back.failures[0].field == "tx_response.id"
    finally:
        back.close()


async def _until(cond: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- frontend RX model


@st.composite
def rx_frame(draw: st.DrawFn) -> list[bytes]:
    """One RX response chain; fragments and extras may be invalid on purpose."""
    nfrag = draw(st.integers(1, 20))
    out = []
    for k in range(nfrag):
        off = draw(st.sampled_from([0, 0, 0, 100, 4000]))
        status = draw(st.sampled_from([1, 60, 1500, 4096 - off, 4096, -1, 0]))
        flags = netif.NETRXF_MORE_DATA if k + 1 < nfrag else 0
        if k == 0:
            flags |= draw(st.sampled_from([0, 1, 2, 3]))
        out.append(netif.RX_RSP.pack(0, off, flags, status))
        if k == 0 and draw(st.booleans()):
            out[0] = netif.RX_RSP.pack(0, off, flags | netif.NETRXF_EXTRA_INFO, status)
            kind = draw(st.sampled_from(["gso4", "gso6", "gso9", "hash", "bad"]))
            if kind.startswith("gso"):
                extra = netif.encode_extra(netif.GsoExtra(1448, int(kind[3])), slot_size=8)
            elif kind == "hash":
                extra = netif.encode_extra(netif.HashExtra(1, 1, 5), slot_size=8)
            else:
                extra = bytes([7, 0]) + bytes(6)
            out.append(extra)
    return out


@st.composite
def rx_garbage(draw: st.DrawFn) -> list[bytes]:
    junk = draw(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=20))
    return junk + [netif.RX_RSP.pack(0, 0, 0, 60)] * 24


@pytest.fixture
async def hostile_back(harness: Any) -> AsyncIterator[RawBack]:
    async with raw_end(harness, RawBack) as back:
        yield back


@hostile_settings(max_examples=40)
@given(data=st.data())
async def test_front_rx_matches_model(hostile_back: RawBack, data: st.DataObject) -> None:
    back = hostile_back
    chains = data.draw(st.lists(st.one_of(rx_frame(), rx_garbage()), min_size=1, max_size=8))
    slots = [s for c in chains for s in c][:200]
    while True:  # cut at a frame boundary the model agrees is complete
        desc_all = []
        pos = 0
        while pos < len(slots):
            d, used = netif.parse_rx(b"".join(slots[pos:]), len(slots) - pos)
            if d is None:
                break
            desc_all.append((pos, d))
            pos += used
        if pos == len(slots):
            break
        slots = slots[:pos]
    if not slots:
        return
    n = len(slots)
    await _until(lambda: back.rx.unconsumed_requests() >= n)
    reqs = list(struct.iter_unpack("<H2xI", back.rx.take_encoded(n)[0]))
    pages = [bytes(((k * 13 + b) * 7) & 0xFF for b in range(4096)) for k in range(n)]
    mapping = back.be.grants.map(back.fe.domid, [g for _, g in reqs])
    for k in range(n):
        mapping.buf[k * 4096 : (k + 1) * 4096] = pages[k]
    mapping.close()
    want_frames = []
    want_errors = 0
    for start, d in desc_all:
        if d.error is not None:
            want_errors += 1
        else:
            want_frames.append(
                (b"".join(pages[start + k][o : o + ln] for k, o, ln in d.frags), d.info)
            )
    back.received.clear()
    errors_before = back.queue.stats.rx_errors
    back.rx.put_encoded(b"".join(slots))
    if back.rx.push_responses():
        back.channel.notify()
    with contextlib.suppress(TimeoutError):
        await _until(
            lambda: (
                len(back.received) >= len(want_frames)
                and back.queue.stats.rx_errors - errors_before >= want_errors
            ),
            timeout=5,
        )
    assert back.received == want_frames
    assert back.queue.stats.rx_errors - errors_before == want_errors
    assert not back.failures
