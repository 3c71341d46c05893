"""netback's data path: one vif's rings, event channel and the frontend's granted pages.

Theory of operation
-------------------
**One vif** ([`Vif`][]) is a frontend's TX ring, RX ring, event channel and the
frontend's buffer pages, reached through a [`GrantCache`][]:

* *TX (frontend → backend).*  On an event, every published TX slot is copied out of the
  ring in one run and framed into packets ([`aioxen.net.netif.parse_tx`][]; single-slot
  packets take an inline fast path).  The payload of a valid packet is copied out of the
  frontend's (read-only mapped) pages into ``bytes`` and given to ``deliver(frame, info)``;
  only then is the packet answered.  Every malformed packet — size 0 or above 64 KiB,
  offset + size past its page, a bad grant ref, a ``more_data`` chain longer than
  ``XEN_NETIF_NR_SLOTS_MIN``, an unknown or unnegotiated extra-info — is answered
  ``NETIF_RSP_ERROR`` slot by slot (``NULL`` for extra slots), counted in
  ``stats.tx_errors`` and dropped; the vif keeps going.  A ring whose indices are corrupt
  (``req_prod`` claiming more than fits) cannot be answered at all: that is a
  ``ProtocolError`` and the vif disconnects.
* *RX (backend → frontend), rx-copy mode.*  [`Vif.send`][] takes posted RX requests in
  ring order, copies the frame into the frontend's pages (a ``memcpy`` into the writable
  mapping; grant copy on Xen would do the same job) and writes the responses in the
  **same slots** as the requests they answer — guaranteed because requests are consumed
  and answered strictly in order, one response per request, the GSO extra-info record
  included.  Offloads the frontend did not negotiate are resolved in software first.
  Without posted buffers, frames wait in a bounded queue (``rx_pause``/``rx_resume``
  callbacks let a TAP stop reading); beyond it they are dropped and counted.
* *Notify batching.*  Responses produced during one loop iteration are published with one
  push and at most one event (the ring's ``rsp_event`` rule); the backend asks for TX
  events only when it has drained the ring (final check), and for RX events only when it
  ran out of buffers.

**Grants.**  A frontend that advertises ``feature-persistent`` (aioxen's netfront does)
keeps its buffers granted for the whole connection, so each page is mapped once and kept
(bounded LRU).  Other frontends (Linux) get their pages mapped for one batch and unmapped
after it, so no grant stays in use once its request is answered.

This module is the data path only; the xenbus driver and [`Netback`][aioxen.net.back.Netback] are in
[`aioxen.net.back`][].
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import repeat
from operator import add, getitem, setitem
from typing import Any, cast

from aioxen.errors import ProtocolError
from aioxen.net.keys import BackendFeatures, FrontendFeatures
from aioxen.net.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
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
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    FrameInfo,
    GsoExtra,
    NetStats,
    encode_extra,
    info_from_tx_flags,
    parse_tx,
)
from aioxen.net.offload import locate_l4, resolve_offloads
from aioxen.net.ringend import RingEnd
from aioxen.platforms.base import EventChannel, GrantTable, Platform
from aioxen.platforms.base import Mapping as GrantMapping
from aioxen.rings.sring import BackRing, byte_source

log = logging.getLogger(__name__)

_TX_RSP_SLOT = struct.Struct("<Hh8x")
_SLOW_TX = NETTXF_MORE_DATA | NETTXF_EXTRA_INFO
_TX_INFO = [info_from_tx_flags(f) for f in range(4)]
_ST_ERROR = struct.pack("<h", NETIF_RSP_ERROR)
_GSO_FIELDS = struct.Struct("<HB")
_MORE_BIT = bytes(1 if b & NETTXF_MORE_DATA else 0 for b in range(256))
"""``bytes.translate`` table: 1 where a flags byte has more_data (same bit on TX and RX)."""


_view_slice = cast(Callable[[memoryview, slice], memoryview], getitem)
_view_store = cast(Callable[[memoryview | None, slice, memoryview], None], setitem)


@functools.cache
def _tx_run(k: int) -> struct.Struct:
    """``k`` consecutive ``netif_tx_request`` slots in one unpack."""
    return struct.Struct("<" + "IHHHH" * k)


_ST_NULL = struct.pack("<h", NETIF_RSP_NULL)
_GRANT_ERRORS = (FileNotFoundError, PermissionError, ValueError, OSError)

Deliver = Callable[[bytes, FrameInfo], object]


class GrantCache:
    """The frontend's buffer pages, by grant ref, as 4096-byte memoryviews.

    ``persistent``: keep each mapping (at most ``limit``, oldest evicted); otherwise mappings made
    during a batch are unmapped by [`end_batch`][].  Mapping errors propagate
    (``FileNotFoundError``/``PermissionError`` naming the ref).
    """

    def __init__(
        self,
        grants: GrantTable,
        domid: int,
        *,
        writable: bool,
        persistent: bool,
        limit: int = 1024,
    ) -> None:
        self._grants = grants
        self._domid = domid
        self._writable = writable
        self._persistent = persistent
        self._limit = limit
        self.views: OrderedDict[int, memoryview] = OrderedDict()
        """``gref -> view`` of what is mapped now (hot paths look here first)."""
        self._maps: dict[int, GrantMapping] = {}
        self.sources: dict[int, Any] = {}
        """``gref -> object whose slices are bytes`` (see [`aioxen.net.front.byte_source`][])."""
        self.maps_made = 0

    def view(self, gref: int) -> memoryview:
        v = self.views.get(gref)
        if v is not None:
            return v
        m = self._grants.map(self._domid, [gref], writable=self._writable)
        self.maps_made += 1
        if self._persistent and len(self.views) >= self._limit:
            old, oldv = self.views.popitem(last=False)
            del self.sources[old]
            oldv.release()
            self._maps.pop(old).close()
        v = m.buf
        self.views[gref] = v
        self.sources[gref] = byte_source(v)
        self._maps[gref] = m
        return v

    def end_batch(self) -> None:
        if not self._persistent and self.views:
            self.clear()

    def clear(self) -> None:
        views, maps = self.views, self._maps
        self.views, self._maps = OrderedDict(), {}
        self.sources = {}
        for v in views.values():
            v.release()
        for m in maps.values():
            with contextlib.suppress(Exception):
                m.close()

    def close(self) -> None:
        self.clear()


class Vif(RingEnd):
    """One connected vif (data path only; see [`serve_vif`][] for the handshake).

    ``deliver(frame, info)`` receives frames the frontend sent.  [`send`][] gives the
    frontend a frame.  A Vif is also a switch port (``name``, ``accept_csum``,
    ``accept_gso``, ``send``).
    """

    def __init__(
        self,
        platform: Platform,
        frontend_domid: int,
        devid: int,
        *,
        tx_ring: BackRing[bytes, bytes],
        rx_ring: BackRing[bytes, bytes],
        channel: EventChannel,
        features: FrontendFeatures,
        backend_features: BackendFeatures,
        deliver: Deliver,
        on_lost: Callable[[BaseException], None] | None = None,
        rx_queue_frames: int = 1024,
        owned: list[Any] | None = None,
        name: str | None = None,
    ) -> None:
        self._plat = platform
        self.frontend_domid = frontend_domid
        self.devid = devid
        self._name = name or f"vif{frontend_domid}.{devid}"
        self._peer_role = "frontend"
        self._peer_domid = frontend_domid
        self._tx = tx_ring
        self._rx = rx_ring
        self._channel = channel
        self.features = features
        self.backend_features = backend_features
        self._deliver = deliver
        self._on_lost = on_lost
        self._owned = owned or []
        self._loop = asyncio.get_running_loop()
        self.stats = NetStats()
        self._closed = False
        self.error: BaseException | None = None
        persistent = features.persistent
        self._tx_pages = GrantCache(
            platform.grants, frontend_domid, writable=False, persistent=persistent
        )
        self._rx_pages = GrantCache(
            platform.grants, frontend_domid, writable=True, persistent=persistent
        )
        self.multicast: set[bytes] = set()
        """Multicast addresses the frontend subscribed to (MCAST_ADD/DEL extra-info)."""
        # TX
        self._tx_carry: tuple[bytes, int] | None = None
        self._tx_rsps: list[bytes | bytearray] = []
        self._allow_extra = backend_features.gso_tcpv4 or backend_features.gso_tcpv6
        self._tx_gso = {
            t
            for t, on in (
                (XEN_NETIF_GSO_TYPE_TCPV4, backend_features.gso_tcpv4),
                (XEN_NETIF_GSO_TYPE_TCPV6, backend_features.gso_tcpv6),
            )
            if on
        }
        # RX
        self._rx_reqs: deque[tuple[int, int]] = deque()  # (id, gref) taken, unanswered
        self._rx_rsps: list[bytes] = []
        self._rx_queue: deque[tuple[bytes | bytearray | memoryview, FrameInfo]] = deque()
        self._rx_queue_max = rx_queue_frames
        self._rx_paused = False
        self.rx_pause: Callable[[], None] | None = None
        self.rx_resume: Callable[[], None] | None = None
        self._flush_scheduled = False
        self._rx_frames = 0  # folded into stats by _flush
        self._rx_bytes = 0
        self._max_rx = XEN_NETIF_MAX_TX_SIZE if features.sg else PAGE_SIZE

    # -- port protocol -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def accept_csum(self) -> bool:
        return True  # send() resolves what the frontend did not negotiate

    @property
    def accept_gso(self) -> bool:
        return True

    @property
    def dead(self) -> bool:
        return self._closed

    def set_deliver(self, deliver: Deliver) -> None:
        """Where frames from the frontend go from now on."""
        self._deliver = deliver

    def start(self) -> None:
        self._channel.set_handler(self._on_event)
        self._loop.call_soon(self._on_event)

    # -- events ------------------------------------------------------------------------------
    def _service(self) -> None:
        self.stats.events += 1
        self._poll_tx()
        if self._rx_queue:
            self._drain_rx_queue()

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        self.error = exc
        self._channel.set_handler(None)
        if self._on_lost is not None:
            self._on_lost(exc)

    # -- TX: frontend -> backend ------------------------------------------------------------
    def _poll_tx(self) -> None:
        tx = self._tx
        while True:
            data, n, _ = tx.take_encoded(PUSH_EVERY)
            if n or self._tx_carry is not None:
                self._handle_tx(data, n)
                if n == PUSH_EVERY:
                    self._flush()  # answer as we go: the frontend can refill meanwhile
                    continue
            if not tx.final_check_for_requests():
                break
        self._tx_pages.end_batch()

    def _handle_tx(self, data: bytes, n: int) -> None:
        carry = self._tx_carry
        if carry is not None:
            self._tx_carry = None
            data, n = carry[0] + data, carry[1] + n
        # TX responses go out in request order, one per slot, so the batch's responses are
        # built from the request bytes: ids copied with two strided slices (request id at
        # +8, response id at +0), status 0 (OKAY) from the zero fill; only failed packets
        # and extra-info slots get their status patched.
        out = bytearray(n * TX_SLOT_SIZE)
        out[0::TX_SLOT_SIZE] = data[8::TX_SLOT_SIZE]
        out[1::TX_SLOT_SIZE] = data[9::TX_SLOT_SIZE]
        pages = self._tx_pages
        get_src = pages.sources.get
        deliver = self._deliver
        frames = nbytes = errors = 0
        i = 0
        it = TX_REQ.iter_unpack(data)
        for gref, off, flags, _, size in it:
            if not flags & _SLOW_TX:
                if size == 0 or off + size > PAGE_SIZE:
                    errors += 1
                    out[i * TX_SLOT_SIZE + 2 : i * TX_SLOT_SIZE + 4] = _ST_ERROR
                    i += 1
                    continue
                page = get_src(gref)
                if page is None:
                    try:
                        pages.view(gref)
                        page = pages.sources[gref]
                    except _GRANT_ERRORS as exc:
                        errors += 1
                        log.debug("%s: TX gref %d: %s", self._name, gref, exc)
                        out[i * TX_SLOT_SIZE + 2 : i * TX_SLOT_SIZE + 4] = _ST_ERROR
                        i += 1
                        continue
                i += 1
                frames += 1
                nbytes += size
                try:
                    deliver(bytes(page[off : off + size]), _TX_INFO[flags & 3])
                except Exception as exc:
                    self._callback_error(exc)
                continue
            used, frame_out, info = self._chain_tx(data, i, n, out)
            if used < 0:
                used, frame_out, info = self._slow_tx(data, i, n, out)
            if used == 0:
                self._tx_carry = (data[i * TX_SLOT_SIZE :], n - i)
                break
            for _ in range(used - 1):
                next(it)
            i += used
            if frame_out is None or info is None:
                errors += int(info is None)
                continue
            frames += 1
            nbytes += len(frame_out)
            try:
                deliver(frame_out, info)
            except Exception as exc:
                self._callback_error(exc)
        if i:
            self._tx_rsps.append(out if i == n else out[: i * TX_SLOT_SIZE])
        stats = self.stats
        stats.tx_frames += frames
        stats.tx_bytes += nbytes
        stats.tx_errors += errors

    def _chain_tx(
        self, data: bytes, i: int, n: int, out: bytearray
    ) -> tuple[int, bytes | None, FrameInfo | None]:
        """Fast path for the usual multi-slot shapes: a ``more_data`` chain, optionally
        with one GSO extra after its head.  Returns ``used`` -1 for anything else (then
        [`_slow_tx`][] decides), 0 if incomplete, as [`_slow_tx`][] otherwise.

        The chain is handled with a constant number of C-level operations: its end is
        found in the strided flag bytes, its slots are unpacked by one ``Struct`` and its
        fragments are sliced and joined by ``map``."""
        gref, off, flags, _, total = TX_REQ.unpack_from(data, i * TX_SLOT_SIZE)
        j = i + 1
        gso: tuple[int, int] | None = None
        if flags & NETTXF_EXTRA_INFO:
            if j >= n:
                return 0, None, None
            at = j * TX_SLOT_SIZE
            if data[at] != XEN_NETIF_EXTRA_TYPE_GSO or data[at + 1] != 0:
                return -1, None, None
            size, gtype = _GSO_FIELDS.unpack_from(data, at + 2)
            if gtype not in self._tx_gso or size == 0:
                return -1, None, None
            gso = (gtype, size)
            j += 1
        if flags & NETTXF_MORE_DATA:
            ends = data[6 + j * TX_SLOT_SIZE :: TX_SLOT_SIZE].translate(_MORE_BIT)
            last = ends.find(0)
            if last < 0:
                return (0 if n - j < XEN_NETIF_NR_SLOTS_MIN - 1 else -1), None, None
            m = last + 1  # data slots after the head
            if m >= XEN_NETIF_NR_SLOTS_MIN:
                return -1, None, None
            t = _tx_run(m).unpack_from(data, j * TX_SLOT_SIZE)
            grefs = (gref, *t[0::5])
            offs = (off, *t[1::5])
            rest = t[4::5]
            first = total - sum(rest)
            sizes = (first, *rest)
            if first <= 0 or min(rest) <= 0:
                return -1, None, None
            j += m
        else:
            grefs, offs, sizes = (gref,), (off,), (total,)
            if total == 0:
                return -1, None, None
        stops = tuple(map(add, offs, sizes))
        if max(stops) > PAGE_SIZE:
            return -1, None, None
        found = list(map(self._tx_pages.views.get, grefs))
        if None in found:
            try:
                found = [self._tx_pages.view(g) for g in grefs]
            except _GRANT_ERRORS:
                return -1, None, None
        pages = cast(list[memoryview], found)
        frame = b"".join(map(_view_slice, pages, map(slice, offs, stops)))
        if gso is not None:
            out[(i + 1) * TX_SLOT_SIZE + 2 : (i + 1) * TX_SLOT_SIZE + 4] = _ST_NULL
            info = FrameInfo(bool(flags & 1), bool(flags & 2), gso[0], gso[1])
        else:
            info = _TX_INFO[flags & 3]
        return j - i, frame, info

    def _slow_tx(
        self, data: bytes, i: int, n: int, out: bytearray
    ) -> tuple[int, bytes | None, FrameInfo | None]:
        """A multi-slot packet at slot ``i``: ``(slots_used, frame, info)``; ``used`` 0 if
        incomplete; ``frame`` None and ``info`` None for an error, ``info`` set and no
        frame for a multicast-control packet.  Patches statuses in ``out``."""
        pkt, used = parse_tx(data[i * TX_SLOT_SIZE :], n - i, allow_extra=self._allow_extra)
        if pkt is None:
            return 0, None, None
        if pkt.error is None:
            gso = pkt.gso
            if gso is not None and gso.gso_type not in self._tx_gso:
                pkt = pkt._replace(error=f"GSO type {gso.gso_type} not offered")
        frame_out: bytes | None = None
        mcast = pkt.multicast if pkt.error is None else None
        if pkt.error is None and mcast is None:
            pages = self._tx_pages
            try:
                frame_out = b"".join(
                    pages.view(f.gref)[f.offset : f.offset + f.size] for f in pkt.frags
                )
            except _GRANT_ERRORS as exc:
                pkt = pkt._replace(error=f"grant: {exc}")
        failed = pkt.error is not None
        if failed:
            log.debug("%s: dropping TX packet: %s", self._name, pkt.error)
        for k, (_, st) in enumerate(pkt.responses):
            at = (i + k) * TX_SLOT_SIZE + 2
            if st == NETIF_RSP_NULL:
                out[at : at + 2] = _ST_NULL
            elif failed:
                out[at : at + 2] = _ST_ERROR
        if failed:
            return used, None, None
        if mcast is not None:
            # multicast control (XEN_NETIF_EXTRA_TYPE_MCAST_ADD/DEL): answered, no frame
            (self.multicast.add if mcast.add else self.multicast.discard)(mcast.addr)
            return used, None, PLAIN
        return used, frame_out, pkt.info

    def _callback_error(self, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": f"{self._name}: exception delivering a frame", "exception": exc}
        )

    # -- RX: backend -> frontend ------------------------------------------------------------
    @property
    def rx_queued(self) -> int:
        return len(self._rx_queue)

    def send(self, frame: bytes | bytearray | memoryview, info: FrameInfo = PLAIN) -> bool:
        """Give the frontend one frame.  ``False`` if it was dropped (no room, too big,
        or offloads that cannot be resolved); queued frames count as sent."""
        if self._closed:
            self.stats.rx_dropped += 1
            return False
        if info is not PLAIN and not self._acceptable(info, frame):
            ok = True
            for part, pinfo in resolve_offloads(frame, info, accept_csum=False, accept_gso=False):
                ok = self.send(part, pinfo) and ok
            return ok
        n = len(frame)
        if n == 0 or n > self._max_rx:
            self.stats.rx_dropped += 1
            return False
        queue = self._rx_queue
        if not queue:
            reqs = self._rx_reqs
            if n <= PAGE_SIZE and (info is PLAIN or not info.gso_type):
                # the common case inline: one posted buffer, one response
                if reqs or self._take_rx_requests(1):
                    ident, gref = reqs.popleft()
                    page = self._rx_get(gref)
                    if page is None:
                        self._rx_put_failed(ident, gref, info)
                    else:
                        page[0:n] = frame
                        self._rx_rsps.append(
                            RX_RSP.pack(ident, 0, 0 if info is PLAIN else info.rx_flags(), n)
                        )
                        self._rx_frames += 1
                        self._rx_bytes += n
                    if len(self._rx_rsps) >= PUSH_EVERY:
                        self._flush()
                    elif not self._flush_scheduled:
                        self._schedule_flush()
                    return True
            elif self._rx_put(frame, info):
                if len(self._rx_rsps) >= PUSH_EVERY:
                    self._flush()
                else:
                    self._schedule_flush()
                return True
        if len(queue) >= self._rx_queue_max:
            self.stats.rx_dropped += 1
            return False
        queue.append((bytes(frame), info))
        if len(queue) == 1:
            self._schedule_flush()  # publish what was answered before waiting
            self._want_rx_requests()
        if not self._rx_paused and len(queue) >= self._rx_queue_max // 2:
            self._rx_paused = True
            if self.rx_pause is not None:
                self.rx_pause()
        return True

    def _rx_get(self, gref: int) -> memoryview | None:
        """The frontend's RX page ``gref`` mapped writable, or ``None`` if it cannot be."""
        page = self._rx_pages.views.get(gref)
        if page is not None:
            return page
        try:
            return self._rx_pages.view(gref)
        except _GRANT_ERRORS as exc:
            log.debug("%s: RX gref %d: %s", self._name, gref, exc)
            return None

    def _rx_put_failed(self, ident: int, gref: int, info: FrameInfo) -> None:
        self.stats.rx_errors += 1
        flags = 0 if info is PLAIN else info.rx_flags()
        self._rx_rsps.append(RX_RSP.pack(ident, 0, flags, NETIF_RSP_ERROR))

    def _acceptable(self, info: FrameInfo, frame: bytes | bytearray | memoryview) -> bool:
        f = self.features
        if info.gso_type == XEN_NETIF_GSO_TYPE_TCPV4:
            return f.sg and f.gso_tcpv4 and f.csum_offload
        if info.gso_type == XEN_NETIF_GSO_TYPE_TCPV6:
            return f.sg and f.gso_tcpv6 and f.ipv6_csum_offload
        if info.csum_blank:
            loc = locate_l4(frame)
            if loc is None:
                return False
            return f.csum_offload if loc.version == 4 else f.ipv6_csum_offload
        return True

    def _take_rx_requests(self, need: int) -> bool:
        reqs = self._rx_reqs
        if len(reqs) >= need:
            return True
        data, n, _ = self._rx.take_encoded()
        if n:
            reqs.extend(RX_REQ.iter_unpack(data))
        return len(reqs) >= need

    def _rx_put(self, frame: bytes | bytearray | memoryview, info: FrameInfo) -> bool:
        n = len(frame)
        gso = info.gso_type != XEN_NETIF_GSO_TYPE_NONE
        if n <= PAGE_SIZE and not gso:
            if not self._rx_reqs and not self._take_rx_requests(1):
                return False
            ident, gref = self._rx_reqs.popleft()
            page = self._rx_get(gref)
            if page is None:
                self._rx_put_failed(ident, gref, info)
                return True
            page[0:n] = frame
            flags = 0 if info is PLAIN else info.rx_flags()
            self._rx_rsps.append(RX_RSP.pack(ident, 0, flags, n))
            self._rx_frames += 1
            self._rx_bytes += n
            return True
        pages = -(-n // PAGE_SIZE)
        need = pages + (1 if gso else 0)
        if not self._take_rx_requests(need):
            return False
        reqs = self._rx_reqs
        taken = [reqs.popleft() for _ in range(need)]
        data_reqs = [taken[0], *taken[2:]] if gso else taken
        ids = [t[0] for t in data_reqs]
        grefs = [t[1] for t in data_reqs]
        found = list(map(self._rx_pages.views.get, grefs))
        status_error = False
        if None in found:
            try:
                found = [self._rx_pages.view(g) for g in grefs]
            except _GRANT_ERRORS as exc:
                log.debug("%s: RX grant: %s", self._name, exc)
                status_error = True
        last = n - (pages - 1) * PAGE_SIZE
        if not status_error:
            view = memoryview(frame)
            starts = range(0, n, PAGE_SIZE)
            lengths = [PAGE_SIZE] * (pages - 1) + [last]
            chunks = map(view.__getitem__, map(slice, starts, map(add, starts, lengths)))
            for _ in map(_view_store, found, map(slice, repeat(0), lengths), chunks):
                pass
        out = [
            RX_RSP.pack(
                ids[0],
                0,
                info.rx_flags()
                | (NETRXF_MORE_DATA if pages > 1 else 0)
                | (NETRXF_EXTRA_INFO if gso else 0),
                NETIF_RSP_ERROR if status_error else (PAGE_SIZE if pages > 1 else last),
            )
        ]
        if gso:
            out.append(encode_extra(GsoExtra(info.gso_size, info.gso_type), slot_size=RX_SLOT_SIZE))
        if pages > 2:
            mid = NETIF_RSP_ERROR if status_error else PAGE_SIZE
            out += [RX_RSP.pack(i, 0, NETRXF_MORE_DATA, mid) for i in ids[1:-1]]
        if pages > 1:
            out.append(RX_RSP.pack(ids[-1], 0, 0, NETIF_RSP_ERROR if status_error else last))
        self._rx_rsps.extend(out)
        if status_error:
            self.stats.rx_errors += 1
        else:
            self._rx_frames += 1
            self._rx_bytes += n
        return True

    def _want_rx_requests(self) -> None:
        """Out of RX buffers: ask the frontend to notify when it has posted a useful
        batch (a quarter ring; the frontend re-posts everything it consumed, so this
        always comes), not at its first buffer."""
        try:
            ahead = max(1, min(self._rx.nr_ents // 4, self._rx.nr_ents - len(self._rx_reqs)))
            if self._rx.final_check_for_requests(ahead):
                self._loop.call_soon(self._on_event)
        except ProtocolError as exc:
            self._fail(exc)

    def _drain_rx_queue(self) -> None:
        queue = self._rx_queue
        while queue:
            frame, info = queue[0]
            if not self._rx_put(frame, info):
                self._want_rx_requests()
                break
            queue.popleft()
        if self._rx_paused and len(queue) <= self._rx_queue_max // 4:
            self._rx_paused = False
            if self.rx_resume is not None:
                self.rx_resume()

    # -- publishing (scheduling and guarded flushes: aioxen.rings.service) ---------------
    def _flush(self) -> None:
        notify = False
        if self._tx_rsps:
            blob = b"".join(self._tx_rsps)
            self._tx_rsps = []
            self._tx.put_encoded(blob)
            # Unmap before publishing: Linux netfront ends foreign access as soon as it
            # consumes a response, and a grant still mapped then kills the vif.
            self._tx_pages.end_batch()
            notify = self._tx.push_responses()
        if self._rx_rsps:
            rsps = self._rx_rsps
            self._rx_rsps = []
            self._rx.put_encoded(b"".join(rsps))
            self._rx_pages.end_batch()
            if self._rx.push_responses():
                notify = True
            stats = self.stats
            stats.rx_frames += self._rx_frames
            stats.rx_bytes += self._rx_bytes
            self._rx_frames = self._rx_bytes = 0
        if notify:
            self.stats.notifies += 1
            self._channel.notify()

    def close(self) -> None:
        """Publish what was answered, then release mappings, rings and channel."""
        if not self._closed:
            with contextlib.suppress(Exception):
                self._flush()
        self._closed = True
        self._channel.set_handler(None)
        self._tx_pages.close()
        self._rx_pages.close()
        self._rx_queue.clear()
        for obj in (self._tx, self._rx, *self._owned):
            with contextlib.suppress(Exception):
                obj.close()
        self._owned = []

    def __repr__(self) -> str:
        return f"<Vif {self._name} {'dead' if self._closed else 'connected'}>"


async def attach_vif(
    platform: Platform,
    frontend_domid: int,
    devid: int,
    *,
    tx_ring_ref: int,
    rx_ring_ref: int,
    event_channel: int,
    features: FrontendFeatures,
    backend_features: BackendFeatures,
    deliver: Deliver,
    on_lost: Callable[[BaseException], None] | None = None,
    start_index: int | None = None,
) -> Vif:
    """Map a frontend's rings, bind its event channel and return the (not yet started)
    [`Vif`][].  Errors name the domain and the ref or port."""
    grants = platform.grants
    owned: list[Any] = []
    try:
        tx_map = grants.map(frontend_domid, [tx_ring_ref])
        owned.append(tx_map)
        rx_map = grants.map(frontend_domid, [rx_ring_ref])
        owned.append(rx_map)
        name = f"vif{frontend_domid}.{devid}"
        tx = BackRing(tx_map.buf, TX_REQ_FMT, TX_RSP_FMT, start=start_index, name=f"{name}/tx")
        owned.insert(0, tx)
        rx = BackRing(rx_map.buf, RX_REQ_FMT, RX_RSP_FMT, start=start_index, name=f"{name}/rx")
        owned.insert(0, rx)
        channel = await platform.events.connect(frontend_domid, event_channel)
        owned.append(channel)
    except BaseException:
        for obj in owned:
            with contextlib.suppress(Exception):
                obj.close()
        raise
    owned = owned[2:]  # the rings are closed by the Vif itself
    return Vif(
        platform,
        frontend_domid,
        devid,
        tx_ring=tx,
        rx_ring=rx,
        channel=channel,
        features=features,
        backend_features=backend_features,
        deliver=deliver,
        on_lost=on_lost,
        owned=owned,
    )


__all__ = ["Deliver", "GrantCache", "Vif", "attach_vif"]
