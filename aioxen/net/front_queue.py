"""netfront's data path: one queue's rings, buffer pools and event channel (no XenStore).

Theory of operation
-------------------
**Memory.**  A queue shares four things with the backend: the TX ring page, the RX ring
page, a TX pool of 256 pages granted *read-only* and an RX pool of 256 pages granted
writable.  Buffer ``i`` of a pool is page ``i``: a TX request with ``id = i`` points at
page ``i`` of the TX pool, an RX request with ``id = i`` posts page ``i`` of the RX pool.
The pools are granted once for the life of the connection (advertised as
``feature-persistent``), so a backend may keep them mapped.

**Sending** ([`NetfrontQueue.try_send`][], behind ``transport.sendto(frame, info)``). A
frame is copied into as many free TX pages as it needs (one for anything up to 4096 bytes;
up to 17 for a 64 KiB frame with ``feature-sg``), described by a chain of TX requests
(plus a GSO extra slot for a TCP super-frame), and put in the ring. Requests put during
one loop iteration are published with one push and at most one notification (the ring's
``req_event`` rule). TX responses are reaped lazily: when pages run out, and on events.
When the ring is full, frames wait in a FIFO queue whose size drives
``pause_writing``/``resume_writing`` (asyncio's high/low water marks); they enter the ring
in order as responses free pages.

**Receiving.**  All free RX pages are posted.  The backend copies a frame into posted
pages and answers in the *same ring slots* (netif's rule), so the frontend finds the page
of a response from the slot's ring index, never trusting the response ``id``.  Each frame
is copied out of the pages into ``bytes``, handed to ``protocol.datagram_received(frame,
info)`` with its [`FrameInfo`][aioxen.net.netif.FrameInfo] as the "address", and the pages are
re-posted in one batch.  ``pause_reading`` stops consuming responses, so the backend runs
out of buffers and holds or drops frames, as a NIC would.

**Hostile backend.**  Ring indices are validated by the ring core; a TX response for an id
that is not in flight, or an event channel that loses its peer, ends the transport
(``connection_lost`` with ``ProtocolError`` / ``ConnectionResetError``).  Bad RX responses
(negative status, a fragment crossing its page, an unknown extra) drop that frame and are
counted; the transport keeps going.

This module is the data path only (no asyncio transport, no XenStore): the
transport is [`aioxen.net.transport`][], the xenbus driver [`aioxen.net.front`][].
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Callable
from itertools import compress, repeat
from operator import add, and_, lshift, ne
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.net.netif import (
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    PAGE_SIZE,
    PLAIN,
    PUSH_EVERY,
    RX_REQ,
    RX_REQ_FMT,
    RX_RSP,
    RX_RSP_FMT,
    RX_SLOT_SIZE,
    TX_REQ,
    TX_REQ_FMT,
    TX_RSP_FMT,
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_NR_SLOTS_MIN,
    FrameInfo,
    GsoExtra,
    NetStats,
    encode_extra,
    info_from_rx_flags,
    parse_rx,
)
from aioxen.net.ringend import RingEnd
from aioxen.platforms.base import EventChannel, Platform, Share
from aioxen.rings.sring import FrontRing, byte_source

log = logging.getLogger(__name__)

POOL_PAGES = 256
_TX_RSP_SLOT = struct.Struct("<Hh8x")
_SLOW_TX = NETTXF_MORE_DATA | NETTXF_EXTRA_INFO
_SLOW_RX = NETRXF_MORE_DATA | NETRXF_EXTRA_INFO
_RX_INFO = [info_from_rx_flags(f) for f in range(4)]
_GSO_FIELDS = struct.Struct("<HB")
_RX_MAX_SLOTS = XEN_NETIF_NR_SLOTS_MIN + 4
_MORE_BIT = bytes(1 if b & NETRXF_MORE_DATA else 0 for b in range(256))


@functools.cache
def _tx_rsp_run(k: int) -> struct.Struct:
    """``k`` consecutive TX response slots (``netif_tx_response`` in a 12-byte slot)."""
    return struct.Struct("<" + "Hh8x" * k)


@functools.cache
def _rx_run(k: int) -> struct.Struct:
    """``k`` consecutive ``netif_rx_response`` slots in one unpack."""
    return struct.Struct("<" + "HHHh" * k)


class NetfrontQueue(RingEnd):
    """One netfront queue: rings, pools, event channel and the data path (no XenStore).

    ``deliver(frame, info)`` receives frames; ``tx_space()`` is called when TX pages were
    freed; ``fail(exc)`` when the queue died (protocol violation, backend gone).
    """

    def __init__(
        self,
        platform: Platform,
        backend_domid: int,
        *,
        deliver: Callable[[bytes, Any], object],
        tx_space: Callable[[], None],
        fail: Callable[[BaseException], None],
        name: str = "netfront",
        start_index: int = 0,
    ) -> None:
        self._plat = platform
        self._be = backend_domid
        self._peer_role = "backend"
        self._peer_domid = backend_domid
        self._deliver = deliver
        self._tx_space = tx_space
        self._fail_cb = fail
        self.name = name
        self._start = start_index
        self._loop = asyncio.get_running_loop()
        self._owned: list[Any] = []
        self._tx: FrontRing[bytes, bytes] | None = None
        self._rx: FrontRing[bytes, bytes] | None = None
        self._channel: EventChannel | None = None
        self.stats = NetStats()
        self._reading = True
        self._closed = False
        self._active = True  # reading and not dead: checked once per received frame
        self._flush_scheduled = False
        # TX state
        self._tx_free: list[int] = list(range(POOL_PAGES - 1, -1, -1))
        self._tx_busy = bytearray(POOL_PAGES)
        self._tx_pending: list[bytes] = []
        self._slots_free = 0  # ring slots neither in flight nor pending (set by setup)
        self._tx_frames = 0  # folded into stats by _flush
        self._tx_bytes = 0
        self._want_tx_space = False
        # RX state
        self._rx_free: list[int] = list(range(POOL_PAGES - 1, -1, -1))
        self._rx_slot_id: list[int] = []
        self._rx_carry: tuple[bytes, int, int] | None = None

    # -- setup ---------------------------------------------------------------------------
    async def setup(self) -> None:
        """Share the ring pages and pools and allocate the event channel."""
        grants = self._plat.grants
        try:
            tx_ring = self._own(grants.share(self._be, 1))
            rx_ring = self._own(grants.share(self._be, 1))
            self._tx_pool = self._own(grants.share(self._be, POOL_PAGES, writable=False))
            self._rx_pool = self._own(grants.share(self._be, POOL_PAGES, writable=True))
            self._tx = FrontRing(
                tx_ring.buf, TX_REQ_FMT, TX_RSP_FMT, start=self._start, name=f"{self.name}/tx"
            )
            self._rx = FrontRing(
                rx_ring.buf, RX_REQ_FMT, RX_RSP_FMT, start=self._start, name=f"{self.name}/rx"
            )
            self._owned.insert(0, self._tx)
            self._owned.insert(0, self._rx)
            self._channel = self._own(await self._plat.events.listen(self._be))
        except BaseException:
            self.close()
            raise
        self._tx_ring_share: Share = tx_ring
        self._rx_ring_share: Share = rx_ring
        self._txbuf = self._tx_pool.buf
        self._rxbuf = self._rx_pool.buf
        self._rx_src = byte_source(self._rxbuf)
        self._tx_refs = list(self._tx_pool.refs)
        self._rx_refs = list(self._rx_pool.refs)
        self._rx_slot_id = [0] * self._rx.nr_ents
        self._rx_mask = self._rx.nr_ents - 1
        self._rx_req_bytes = [RX_REQ.pack(i, ref) for i, ref in enumerate(self._rx_refs)]
        # the request for a full middle page of a multi-page frame, by page id
        self._tx_mid = [
            TX_REQ.pack(ref, 0, NETTXF_MORE_DATA, i, PAGE_SIZE)
            for i, ref in enumerate(self._tx_refs)
        ]
        self._slots_free = self._tx.nr_ents

    def _own(self, obj: Any) -> Any:
        self._owned.append(obj)
        return obj

    @property
    def tx_ring_ref(self) -> int:
        return self._tx_ring_share.refs[0]

    @property
    def rx_ring_ref(self) -> int:
        return self._rx_ring_share.refs[0]

    @property
    def event_channel(self) -> int:
        assert self._channel is not None
        return self._channel.port

    def set_deliver(self, deliver: Callable[[bytes, Any], object]) -> None:
        """Where received frames go (``deliver(frame, info)``)."""
        self._deliver = deliver

    def start(self) -> None:
        """Post every RX buffer and start taking events."""
        assert self._channel is not None
        self._post_rx()
        self._flush()
        self._channel.set_handler(self._on_event)

    # -- TX --------------------------------------------------------------------------------
    @property
    def tx_free_pages(self) -> int:
        return len(self._tx_free)

    def try_send(self, frame: bytes | bytearray | memoryview, info: FrameInfo) -> bool:
        """Put ``frame`` in the TX ring if pages and slots are free; ``False`` otherwise
        (the caller queues it).  Sizes were validated by the caller."""
        n = len(frame)
        if n <= PAGE_SIZE and (info is PLAIN or not info.gso_type):
            free = self._tx_free
            if not free or self._slots_free <= 0:
                self._reap_tx()
                if not free or self._slots_free <= 0:
                    return False
            ident = free.pop()
            self._slots_free -= 1
            self._tx_busy[ident] = 1
            off = ident << 12
            self._txbuf[off : off + n] = frame
            flags = 0 if info is PLAIN else info.tx_flags()
            self._tx_pending.append(TX_REQ.pack(self._tx_refs[ident], 0, flags, ident, n))
        elif not self._send_multi(frame, info):
            return False
        self._tx_frames += 1
        self._tx_bytes += n
        if len(self._tx_pending) >= PUSH_EVERY:
            self.flush()  # let the backend start on these while we fill the rest
        elif not self._flush_scheduled:
            self._schedule_flush()
        return True

    def _send_multi(self, frame: bytes | bytearray | memoryview, info: FrameInfo) -> bool:
        n = len(frame)
        pages = -(-n // PAGE_SIZE)
        gso = info.gso_type != XEN_NETIF_GSO_TYPE_NONE
        slots = pages + (1 if gso else 0)
        free = self._tx_free
        if len(free) < pages or self._slots_free < slots:
            self._reap_tx()
            if len(free) < pages or self._slots_free < slots:
                return False
        ids = free[-pages:]
        del free[-pages:]
        ids.reverse()  # pages come back in order, so this is usually an ascending run
        lo = ids[0]
        busy, txbuf = self._tx_busy, self._txbuf
        if ids[-1] - lo == pages - 1 and ids == list(range(lo, lo + pages)):
            busy[lo : lo + pages] = b"\x01" * pages
            txbuf[lo << 12 : (lo << 12) + n] = frame
        else:
            view = memoryview(frame)
            for k, ident in enumerate(ids):
                busy[ident] = 1
                chunk = view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
                txbuf[ident << 12 : (ident << 12) + len(chunk)] = chunk
        refs = self._tx_refs
        head_flags = info.tx_flags() | (NETTXF_MORE_DATA if pages > 1 else 0)
        if gso:
            head_flags |= NETTXF_EXTRA_INFO
        parts = [TX_REQ.pack(refs[lo], 0, head_flags, lo, n)]
        if gso:
            parts.append(encode_extra(GsoExtra(info.gso_size, info.gso_type), slot_size=12))
        if pages > 2:
            parts += map(self._tx_mid.__getitem__, ids[1:-1])
        if pages > 1:
            last = ids[-1]
            parts.append(TX_REQ.pack(refs[last], 0, 0, last, n - (pages - 1) * PAGE_SIZE))
        self._tx_pending += parts
        self._slots_free -= slots
        return True

    def _reap_tx(self) -> int:
        """Consume TX responses, freeing their pages; returns how many were consumed.

        One unpack for the whole run; ids are checked and freed with C-level ``map``
        (responses for extra-info slots, status ``NULL``, carry no id)."""
        tx = self._tx
        if tx is None or self._closed:
            return 0
        data, n, _ = tx.take_encoded()
        if not n:
            return 0
        self._slots_free += n
        t = _tx_rsp_run(n).unpack(data)
        ids, statuses = t[0::2], t[1::2]
        nulls = statuses.count(NETIF_RSP_NULL)
        if nulls:
            ids = tuple(compress(ids, map(ne, statuses, repeat(NETIF_RSP_NULL))))
        busy = self._tx_busy
        if max(ids, default=0) >= POOL_PAGES or 0 in bytes(map(busy.__getitem__, ids)):
            bad = next(i for i in ids if i >= POOL_PAGES or not busy[i])
            raise ProtocolError(
                f"{self.name}: TX response for id {bad}, which is not in flight "
                f"(backend domain {self._be})",
                field="tx_response.id",
            )
        if len(set(ids)) != len(ids):
            raise ProtocolError(
                f"{self.name}: TX responses repeat an id (backend domain {self._be})",
                field="tx_response.id",
            )
        for _ in map(busy.__setitem__, ids, repeat(0)):
            pass
        self._tx_free += ids
        errors = len(statuses) - nulls - statuses.count(NETIF_RSP_OKAY)
        if errors:
            self.stats.tx_errors += errors
        return n

    def want_tx_space(self) -> None:
        """Ask for one ``tx_space()`` call once TX responses have freed pages."""
        tx = self._tx
        if self._want_tx_space or tx is None or self._closed:
            return
        self._want_tx_space = True
        try:
            # wake up when half of what is in flight has been answered, not at the first
            # response: fewer, fuller wakeups (ring.h's "set the event further ahead")
            in_flight = tx.nr_ents - self._slots_free
            if tx.final_check_for_responses(max(1, in_flight // 2)):
                self._loop.call_soon(self._on_event)
        except ProtocolError as exc:
            self._fail(exc)

    def _check_tx_space(self) -> None:
        tx = self._tx
        assert tx is not None
        while True:
            if self._reap_tx():
                self._want_tx_space = False
                self._tx_space()  # may call want_tx_space() again: it only re-arms
                return
            in_flight = tx.nr_ents - self._slots_free
            if not tx.final_check_for_responses(max(1, in_flight // 2)):
                return

    # -- RX --------------------------------------------------------------------------------
    def _post_rx(self) -> None:
        rx = self._rx
        assert rx is not None
        free = self._rx_free
        k = min(len(free), rx.free_requests)
        if k <= 0:
            return
        ids = free[-k:]
        del free[-k:]
        start = rx.req_prod_pvt & self._rx_mask
        first = min(k, len(self._rx_slot_id) - start)
        self._rx_slot_id[start : start + first] = ids[:first]
        if first < k:
            self._rx_slot_id[: k - first] = ids[first:]
        rx.put_encoded(b"".join(map(self._rx_req_bytes.__getitem__, ids)))

    def pause_reading(self) -> None:
        self._reading = False
        self._active = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._active = not self._closed
            if not self._closed:
                self._loop.call_soon(self._on_event)

    def _poll_rx(self) -> None:
        rx = self._rx
        assert rx is not None
        while self._active:
            self._poll_rx_once()
            self._post_rx()
            if rx.unpushed >= PUSH_EVERY:
                self._flush()  # hand buffers back early: the backend may be waiting
            if self._rx_carry is not None and not self._active:
                break
            if not rx.final_check_for_responses():
                break

    def _poll_rx_once(self) -> None:
        rx = self._rx
        assert rx is not None
        data, n, first = rx.take_encoded(PUSH_EVERY)
        carry = self._rx_carry
        if carry is not None:
            self._rx_carry = None
            cdata, cn, cfirst = carry
            data, n, first = cdata + data, cn + n, cfirst
        if not n:
            return
        rxbuf, slot_id, mask, free = self._rxbuf, self._rx_slot_id, self._rx_mask, self._rx_free
        src = self._rx_src
        deliver = self._deliver
        frames = nbytes = errors = 0
        i = 0
        it = RX_RSP.iter_unpack(data)
        for _, off, flags, status in it:
            if not self._active:
                self._rx_carry = (data[i * RX_SLOT_SIZE :], n - i, first + i)
                break
            if not flags & _SLOW_RX:
                ident = slot_id[(first + i) & mask]
                i += 1
                free.append(ident)
                if status > 0 and off + status <= PAGE_SIZE:
                    o = (ident << 12) + off
                    frames += 1
                    nbytes += status
                    try:
                        deliver(bytes(src[o : o + status]), _RX_INFO[flags & 3])
                    except Exception as exc:
                        self._callback_error(exc)
                else:
                    errors += 1
                continue
            chain = self._rx_chain(data, i, n, first)
            if chain is not None:
                used, frame_or_none, info = chain
                if used == 0:
                    self._rx_carry = (data[i * RX_SLOT_SIZE :], n - i, first + i)
                    break
                for _ in range(used - 1):
                    next(it)
                free += self._slot_ids(first + i, used)
                i += used
                if frame_or_none is None:
                    errors += 1
                    continue
                frames += 1
                nbytes += len(frame_or_none)
                try:
                    deliver(frame_or_none, info)
                except Exception as exc:
                    self._callback_error(exc)
                continue
            desc, used = parse_rx(data[i * RX_SLOT_SIZE :], n - i)
            if desc is None:
                self._rx_carry = (data[i * RX_SLOT_SIZE :], n - i, first + i)
                break
            for _ in range(used - 1):
                next(it)
            ids = [slot_id[(first + i + j) & mask] for j in range(used)]
            i += used
            free.extend(ids)
            if desc.error is not None:
                errors += 1
                log.debug("%s: dropping RX frame: %s", self.name, desc.error)
                continue
            frame = b"".join(
                rxbuf[(ids[k] << 12) + o : (ids[k] << 12) + o + ln] for k, o, ln in desc.frags
            )
            frames += 1
            nbytes += len(frame)
            try:
                deliver(frame, desc.info)
            except Exception as exc:
                self._callback_error(exc)
        stats = self.stats
        stats.rx_frames += frames
        stats.rx_bytes += nbytes
        stats.rx_errors += errors

    def _slot_ids(self, start: int, count: int) -> list[int]:
        """The page ids posted at ring indices ``start .. start + count - 1``."""
        slot_id, mask = self._rx_slot_id, self._rx_mask
        a = start & mask
        if a + count <= len(slot_id):
            return slot_id[a : a + count]
        return slot_id[a:] + slot_id[: a + count - len(slot_id)]

    def _rx_chain(
        self, data: bytes, i: int, n: int, first: int
    ) -> tuple[int, bytes | None, FrameInfo] | None:
        """Fast path for a ``more_data`` chain with at most one GSO extra after its head:
        ``(used, frame, info)`` (``used`` 0: incomplete; ``frame`` None: bad response),
        or ``None`` for other shapes (then [`parse_rx`][] decides).  A constant number
        of C-level operations per chain, as in netback's TX path."""
        _, off, flags, status = RX_RSP.unpack_from(data, i * RX_SLOT_SIZE)
        j = i + 1
        gso: GsoExtra | None = None
        if flags & NETRXF_EXTRA_INFO:
            if j >= n:
                return 0, None, PLAIN
            at = j * RX_SLOT_SIZE
            if data[at] != 1 or data[at + 1] != 0:
                return None
            size, gtype = _GSO_FIELDS.unpack_from(data, at + 2)
            if gtype not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
                return None
            gso = GsoExtra(size, gtype)
            j += 1
        ids = self._slot_ids(first + i, 1)
        if flags & NETRXF_MORE_DATA:
            ends = data[4 + j * RX_SLOT_SIZE :: RX_SLOT_SIZE].translate(_MORE_BIT)
            last = ends.find(0)
            if last < 0:
                return (0, None, PLAIN) if n - i < _RX_MAX_SLOTS else None
            m = last + 1
            if j - i + m > _RX_MAX_SLOTS:
                return None
            t = _rx_run(m).unpack_from(data, j * RX_SLOT_SIZE)
            if any(map(and_, t[2::4], repeat(NETRXF_EXTRA_INFO))):
                return None
            offs = (off, *t[1::4])
            lens = (status, *t[3::4])
            ids += self._slot_ids(first + j, m)
            j += m
        else:
            offs, lens = (off,), (status,)
        info = info_from_rx_flags(flags, gso)
        if min(lens) <= 0 or max(map(add, offs, lens)) > PAGE_SIZE:
            return j - i, None, info
        starts = tuple(map(add, map(lshift, ids, repeat(12)), offs))
        rxbuf = self._rxbuf
        frame = b"".join(map(rxbuf.__getitem__, map(slice, starts, map(add, starts, lens))))
        return j - i, frame, info

    def _callback_error(self, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": f"{self.name}: exception in protocol callback", "exception": exc}
        )

    # -- events and flushing (the cycle itself: aioxen.rings.service.RingService) ------------
    def _service(self) -> None:
        self.stats.events += 1
        if self._want_tx_space:
            self._check_tx_space()
        self._poll_rx()

    def _flush(self) -> None:
        """Publish queued TX requests and re-posted RX buffers; notify if asked to."""
        tx, rx, channel = self._tx, self._rx, self._channel
        assert tx is not None and rx is not None and channel is not None
        if self._tx_pending:
            blob = b"".join(self._tx_pending)
            self._tx_pending.clear()
            tx.put_encoded(blob)
            stats = self.stats
            stats.tx_frames += self._tx_frames
            stats.tx_bytes += self._tx_bytes
            self._tx_frames = self._tx_bytes = 0
        notify = tx.push_requests() if tx.unpushed else False
        if rx.unpushed and rx.push_requests():
            notify = True
        if notify:
            self.stats.notifies += 1
            channel.notify()

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        self._active = False
        if self._channel is not None:
            self._channel.set_handler(None)
        self._fail_cb(exc)

    @property
    def dead(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop and release rings, pools and the channel (idempotent)."""
        self._closed = True
        self._active = False
        if self._channel is not None and not self._channel.closed:
            self._channel.set_handler(None)
        for attr in ("_txbuf", "_rxbuf"):
            view = getattr(self, attr, None)
            if view is not None:
                setattr(self, attr, None)
        owned, self._owned = self._owned, []
        for obj in owned:
            with contextlib.suppress(Exception):
                obj.close()


__all__ = ["POOL_PAGES", "NetfrontQueue"]
