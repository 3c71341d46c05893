"""``io/ring.h`` request/response rings over shared memory (pure, sans-I/O).

The module is named after ring.h's ``struct *_sring``, the shared page these rings live in.

Theory of operation
-------------------
A shared ring is one or more pages: a 64-byte header and ``nr_ents`` slots, where
``nr_ents`` is the largest power of two such that ``64 + nr_ents * slot`` fits, and
``slot`` is ``sizeof(union { request; response; })``::

    0  req_prod   written by the front: requests produced
    4  req_event  written by the back: "notify me when req_prod passes this"
    8  rsp_prod   written by the back: responses produced
    12 rsp_event  written by the front: "notify me when rsp_prod passes this"
    16 pvt[4], __pad[44]
    64 slots; index i lives in slot i & (nr_ents - 1)

All indices are free-running u32 counters compared with modular arithmetic.  Each side
keeps private counters (front: ``req_prod_pvt``, ``rsp_cons``; back: ``rsp_prod_pvt``,
``req_cons``) and publishes its producer index with a release store after writing the
slots (``push``).  Pushing reports whether the peer asked to be notified: the peer's event
index lies in ``(old, new]``, computed as ``(new - event) < (new - old)`` in u32.  A side
about to sleep runs the *final check*: set its event index to ``cons + 1``, fence, and look
again, so that no entry published in between goes unnoticed.

Only the front end initialises the header (``SHARED_RING_INIT``); the back end attaches
to whatever the front set up and never writes ``req_prod``/``rsp_event``/padding.

The peer is hostile.  Every shared index is read once with an acquire load and validated
before it is used: the back end rejects a ``req_prod`` that claims more requests than fit
(``RING_REQUEST_PROD_OVERFLOW``, including an index that moved backwards); the front end
rejects a ``rsp_prod`` that claims more responses than it has requests outstanding; both
sides notice when the peer overwrote the producer index they own.  Slots are copied out of
shared memory once and decoded from the private copy.  A violation raises
[`ProtocolError`][aioxen.errors.ProtocolError] with ``field`` set, and the ring object stays broken
(every later call raises the same error) so no caller can continue on corrupt state.

Besides the decoded ``put_*``/``take_*`` calls, each side can move *encoded* slots in
bulk (``put_encoded``/``take_encoded``): protocols whose slot type depends on its
neighbours (netif's extra-info records) or that decode a whole run with one
``struct.iter_unpack`` copy ``n`` consecutive slots in or out in one step, with the same
index validation.  Responses are always written in ring order starting at
``rsp_prod_pvt``, which is the slot of the oldest request consumed and not yet answered:
the ``k``-th response answers, and overwrites, the ``k``-th such request.  netif's RX
ring depends on this (a response goes in the slot of the request whose buffer it filled),
and the ring index [`FrontRing.take_encoded`][] reports for a response is the index
[`FrontRing.put_encoded`][] returned for that request.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from aioxen import native
from aioxen.errors import ProtocolError
from aioxen.native import Buffer, SharedBuffer, lib
from aioxen.rings.formats import BatchCodec, EntryFormat, batch_codec, slot_size

Req = TypeVar("Req")
Rsp = TypeVar("Rsp")

HEADER_SIZE = 64
REQ_PROD = 0
REQ_EVENT = 4
RSP_PROD = 8
RSP_EVENT = 12
PVT = 16
MAX_RING_PAGE_ORDER = 9
"""Largest order accepted (512 pages); Linux backends allow at most 4 (16 pages)."""
U32 = 0xFFFFFFFF
Encoded = bytes | bytearray | memoryview
"""Whole encoded slots, back to back (a byte-format buffer of ``n * slot_size`` bytes)."""
# Header offsets are constants inside the (>= 64 byte) buffer: no bounds checks needed.
_load_u32 = lib.ax_load_u32
_push_checked = lib.ax_ring_push_checked
_final_check = lib.ax_ring_final_check


class RingFull(Exception):
    """The front end has no free slot (``RING_FULL``), or the back end tried to respond
    without a consumed request to answer.  A local usage error, not a peer error."""


def ring_entries(nbytes: int, slot: int) -> int:
    """``__RING_SIZE``: the largest power of two ``n`` with ``64 + n * slot <= nbytes``."""
    if slot <= 0:
        raise ValueError("slot size must be positive")
    fit = (nbytes - HEADER_SIZE) // slot
    if fit < 1:
        raise ValueError(f"a {nbytes}-byte ring cannot hold one {slot}-byte slot")
    return 1 << (fit.bit_length() - 1)


def ring_pages(order: int) -> int:
    """Number of pages of a ring with ``ring-page-order`` ``order``."""
    if not 0 <= order <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"ring-page-order {order} out of range 0..{MAX_RING_PAGE_ORDER}")
    return 1 << order


def init_shared_ring(buf: Buffer, start: int = 0) -> None:
    """``SHARED_RING_INIT`` (front end only): producers at ``start``, events at
    ``start + 1``, ``pvt`` and padding zeroed.  ``start`` other than 0 exists for tests
    that exercise index wrap-around."""
    view = memoryview(buf).cast("B")
    try:
        view[PVT:HEADER_SIZE] = bytes(HEADER_SIZE - PVT)
        sb = SharedBuffer(view)
        try:
            sb.store_u32(REQ_EVENT, start + 1)
            sb.store_u32(RSP_EVENT, start + 1)
            sb.store_u32(RSP_PROD, start)
            sb.store_u32(REQ_PROD, start)
        finally:
            sb.release()
    finally:
        view.release()


class _Ring(Generic[Req, Rsp]):
    __slots__ = (
        "_error",
        "_mask",
        "_name",
        "_ok",
        "_ptr",
        "_req_codec",
        "_req_fmt",
        "_rsp_codec",
        "_rsp_fmt",
        "_sb",
        "_slot",
        "_view",
        "nr_ents",
    )

    def __init__(
        self,
        buf: Buffer,
        req_fmt: EntryFormat[Req],
        rsp_fmt: EntryFormat[Rsp],
        name: str,
    ) -> None:
        self._slot = slot_size(req_fmt, rsp_fmt)
        self.nr_ents = ring_entries(memoryview(buf).nbytes, self._slot)
        view = memoryview(buf).cast("B")
        if view.readonly:
            view.release()
            raise ValueError(f"ring {name}: shared memory must be writable")
        self._view = view
        self._req_fmt = req_fmt
        self._rsp_fmt = rsp_fmt
        self._req_codec = batch_codec(req_fmt, self._slot)
        self._rsp_codec = batch_codec(rsp_fmt, self._slot)
        self._name = name
        self._mask = self.nr_ents - 1
        self._sb = SharedBuffer(view)
        self._ptr: Any = self._sb.pointer
        self._error: ProtocolError | None = None
        self._ok = True  # neither broken nor closed: the hot paths test only this

    @property
    def name(self) -> str:
        return self._name

    @property
    def slot_size(self) -> int:
        return self._slot

    @property
    def request_format(self) -> EntryFormat[Req]:
        return self._req_fmt

    @property
    def response_format(self) -> EntryFormat[Rsp]:
        return self._rsp_fmt

    @property
    def error(self) -> ProtocolError | None:
        """The protocol violation that broke this ring, if any."""
        return self._error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._view is None:
            raise ValueError(f"ring {self._name} is closed")

    def _fail(self, message: str, field: str) -> ProtocolError:
        self._error = ProtocolError(f"ring {self._name}: {message}", field=field)
        self._ok = False
        return self._error

    def _read_slots(self, codec: BatchCodec[Any], start: int, n: int) -> list[Any]:
        """Copy ``n`` slots from ring index ``start`` out of shared memory (once), decode."""
        return codec.unpack(self._copy_slots(start, n))

    def _copy_slots(self, start: int, n: int) -> bytes:
        """``n`` whole slots from ring index ``start`` (wrapping), copied out once."""
        slot, view = self._slot, self._view
        first = start & self._mask
        a = HEADER_SIZE + first * slot
        if first + n <= self.nr_ents:
            data = bytes(view[a : a + n * slot])
        else:
            wrapped = first + n - self.nr_ents
            data = bytes(view[a : HEADER_SIZE + self.nr_ents * slot]) + bytes(
                view[HEADER_SIZE : HEADER_SIZE + wrapped * slot]
            )
        return data

    def _whole_slots(self, data: Encoded) -> int:
        n, rest = divmod(len(data), self._slot)
        if rest:
            raise ValueError(f"ring {self._name}: {len(data)} bytes is not whole slots")
        return n

    def _write_slots(self, codec: BatchCodec[Any], start: int, values: Sequence[Any]) -> None:
        """Encode ``values`` into consecutive slots from ring index ``start``."""
        self._write_encoded(start, codec.pack(values))

    def _write_encoded(self, start: int, data: Encoded) -> None:
        """Copy whole encoded slots into the ring from index ``start`` (wrapping)."""
        slot, view = self._slot, self._view
        first = start & self._mask
        a = HEADER_SIZE + first * slot
        room = (self.nr_ents - first) * slot
        if len(data) <= room:
            view[a : a + len(data)] = data
        else:
            view[a : a + room] = data[:room]
            view[HEADER_SIZE : HEADER_SIZE + len(data) - room] = data[room:]

    def _push(self, prod_off: int, event_off: int, old: int, new: int, field: str) -> bool:
        notify = _push_checked(self._ptr, prod_off, event_off, old, new)
        if notify < 0:
            raise self._overwritten(prod_off, old, field)
        return bool(notify > 0)

    def _overwritten(self, prod_off: int, old: int, field: str) -> ProtocolError:
        seen = _load_u32(self._ptr, prod_off)  # for the message only
        return self._fail(
            f"{field} was overwritten by the peer (found {seen}, we published {old})", field
        )

    def close(self) -> None:
        """Drop the pin on the shared memory (idempotent)."""
        if self._view is not None:
            self._ok = False
            self._sb.release()
            self._view.release()
            self._view = None  # type: ignore[assignment]


class FrontRing(_Ring[Req, Rsp]):
    """The front end: produces requests, consumes responses.

    ``init=True`` (the default) initialises the shared header (``XEN_FRONT_RING_INIT``);
    ``init=False`` attaches to an already initialised ring at index ``start``
    (``FRONT_RING_ATTACH``).
    """

    __slots__ = ("_req_prod_pvt", "_req_pushed", "_rsp_cons")

    def __init__(
        self,
        buf: Buffer,
        req_fmt: EntryFormat[Req],
        rsp_fmt: EntryFormat[Rsp],
        *,
        init: bool = True,
        start: int = 0,
        name: str = "front",
    ) -> None:
        super().__init__(buf, req_fmt, rsp_fmt, name)
        start &= U32
        if init:
            init_shared_ring(self._view, start)
        self._req_prod_pvt = start
        self._req_pushed = start
        self._rsp_cons = start

    @property
    def req_prod_pvt(self) -> int:
        return self._req_prod_pvt

    @property
    def rsp_cons(self) -> int:
        return self._rsp_cons

    @property
    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``: slots the front may still fill."""
        return self.nr_ents - ((self._req_prod_pvt - self._rsp_cons) & U32)

    @property
    def full(self) -> bool:
        return self.free_requests == 0

    @property
    def in_flight(self) -> int:
        """Requests produced (pushed or not) whose responses were not yet consumed."""
        return (self._req_prod_pvt - self._rsp_cons) & U32

    @property
    def unpushed(self) -> int:
        return (self._req_prod_pvt - self._req_pushed) & U32

    def put_request(self, value: Req) -> int:
        """Write ``value`` into the next free slot (not yet visible to the back end) and
        return its ring index.  [`RingFull`][] if no slot is free."""
        self._check()
        if self.free_requests == 0:
            raise RingFull(f"ring {self._name}: all {self.nr_ents} slots in use")
        idx = self._req_prod_pvt
        self._write_slots(self._req_codec, idx, (value,))
        self._req_prod_pvt = (idx + 1) & U32
        return idx

    def put_requests(self, values: Iterable[Req]) -> int:
        """Put as many of ``values`` as fit (one encode and copy for the batch); return
        how many were put."""
        if not self._ok:
            self._check()
        free = self.nr_ents - ((self._req_prod_pvt - self._rsp_cons) & U32)
        batch = values if type(values) is list or isinstance(values, Sequence) else list(values)
        if len(batch) > free:
            batch = batch[:free]
        if batch:
            self._write_slots(self._req_codec, self._req_prod_pvt, batch)
            self._req_prod_pvt = (self._req_prod_pvt + len(batch)) & U32
        return len(batch)

    def put_encoded(self, data: Encoded) -> int:
        """Put requests already encoded into whole slots (e.g. by
        `BatchCodec.pack_with_ids`, or packed by hand), copied into the ring in one
        step; [`RingFull`][] (nothing written) if they do not all fit, ``ValueError``
        unless ``data`` is whole slots.  Returns the ring index of the first (the ``k``-th
        is at ``(first + k) & 0xFFFFFFFF``)."""
        if not self._ok:
            self._check()
        n = self._whole_slots(data)
        if n > self.nr_ents - ((self._req_prod_pvt - self._rsp_cons) & U32):
            raise RingFull(f"ring {self._name}: {n} requests, {self.free_requests} free slots")
        start = self._req_prod_pvt
        self._write_encoded(start, data)
        self._req_prod_pvt = (start + n) & U32
        return start

    @property
    def request_codec(self) -> BatchCodec[Req]:
        return self._req_codec

    def push_requests(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish the put requests; return
        whether the back end must be notified."""
        if not self._ok:
            self._check()
        old, new = self._req_pushed, self._req_prod_pvt
        notify = _push_checked(self._ptr, REQ_PROD, REQ_EVENT, old, new)  # _push written out
        if notify < 0:
            raise self._overwritten(REQ_PROD, old, "req_prod")
        self._req_pushed = new
        return notify > 0

    def _rsp_available(self, prod: int | None = None) -> int:
        """Validated number of unconsumed responses (``prod``: an already loaded
        ``rsp_prod``; by default it is loaded now)."""
        if prod is None:
            prod = int(_load_u32(self._ptr, RSP_PROD))
        avail = (prod - self._rsp_cons) & U32
        if avail > (self._req_pushed - self._rsp_cons) & U32:
            raise self._fail(
                f"rsp_prod {prod} claims {avail} responses but only "
                f"{(self._req_pushed - self._rsp_cons) & U32} requests are outstanding "
                f"(rsp_cons {self._rsp_cons})",
                "rsp_prod",
            )
        return avail

    def unconsumed_responses(self) -> int:
        """``RING_HAS_UNCONSUMED_RESPONSES`` (validated)."""
        self._check()
        return self._rsp_available()

    def take_responses(self, limit: int | None = None) -> list[Rsp]:
        """Consume up to ``limit`` (default: all) published responses, in order."""
        if not self._ok:
            self._check()
        # _rsp_available and _read_slots written out: this runs once per event.
        cons = self._rsp_cons
        prod = _load_u32(self._ptr, RSP_PROD)  # read once, validated before any use
        n = (prod - cons) & U32
        if n > (self._req_pushed - cons) & U32:
            self._rsp_available(prod)  # raises the ProtocolError for this value
        if limit is not None and limit < n:
            n = limit
        if n == 0:
            return []
        out = self._rsp_codec.unpack(self._copy_slots(cons, n))
        self._rsp_cons = (cons + n) & U32
        return out

    def take_encoded(self, limit: int | None = None) -> tuple[bytes, int, int]:
        """Consume up to ``limit`` (default: all) published responses without decoding
        them: ``(slots, count, first)``, where ``slots`` is ``count`` whole slots copied
        out of shared memory in one step (validated as [`take_responses`][] does) and
        ``first`` the ring index of the first.  A response sits in the slot of the request
        it answers, so ``first`` is also that request's index."""
        if not self._ok:
            self._check()
        n = self._rsp_available()
        if limit is not None and limit < n:
            n = limit
        start = self._rsp_cons
        if n <= 0:
            return b"", 0, start
        data = self._copy_slots(start, n)
        self._rsp_cons = (start + n) & U32
        return data, n, start

    def final_check_for_responses(self, ahead: int = 1) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: true if responses are waiting; otherwise ask
        to be notified when the ``ahead``-th next response is published, and look again."""
        if not self._ok:
            self._check()
        cons = self._rsp_cons
        prod = _final_check(self._ptr, RSP_PROD, RSP_EVENT, cons, ahead)
        n = (prod - cons) & U32
        if n > (self._req_pushed - cons) & U32:
            self._rsp_available(prod)  # raises the ProtocolError for this value
        return n > 0


class BackRing(_Ring[Req, Rsp]):
    """The back end: consumes requests, produces responses.  Never initialises the header.

    ``start=None`` attaches at the shared ``rsp_prod`` (read once); pass ``start`` to
    attach at a known index (``BACK_RING_ATTACH``).
    """

    __slots__ = ("_req_cons", "_rsp_prod_pvt", "_rsp_pushed")

    def __init__(
        self,
        buf: Buffer,
        req_fmt: EntryFormat[Req],
        rsp_fmt: EntryFormat[Rsp],
        *,
        start: int | None = None,
        name: str = "back",
    ) -> None:
        super().__init__(buf, req_fmt, rsp_fmt, name)
        if start is None:
            start = _load_u32(self._ptr, RSP_PROD)
        start &= U32
        self._req_cons = start
        self._rsp_prod_pvt = start
        self._rsp_pushed = start

    @property
    def req_cons(self) -> int:
        return self._req_cons

    @property
    def rsp_prod_pvt(self) -> int:
        return self._rsp_prod_pvt

    @property
    def pending_responses(self) -> int:
        """Requests consumed but not yet answered."""
        return (self._req_cons - self._rsp_prod_pvt) & U32

    @property
    def unpushed(self) -> int:
        return (self._rsp_prod_pvt - self._rsp_pushed) & U32

    def _req_available(self, prod: int | None = None) -> int:
        """Validated number of unconsumed requests (``prod``: an already loaded
        ``req_prod``; by default it is loaded now)."""
        if prod is None:
            prod = int(_load_u32(self._ptr, REQ_PROD))
        avail = (prod - self._req_cons) & U32
        room = self.nr_ents - ((self._req_cons - self._rsp_prod_pvt) & U32)
        if avail > room:
            raise self._fail(
                f"req_prod {prod} claims {avail} new requests but only {room} slots can hold "
                f"them (req_cons {self._req_cons}, rsp_prod {self._rsp_prod_pvt}, "
                f"{self.nr_ents} slots)",
                "req_prod",
            )
        return avail

    def unconsumed_requests(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS`` (validated)."""
        self._check()
        return self._req_available()

    def take_requests(self, limit: int | None = None) -> list[Req]:
        """Consume up to ``limit`` (default: all) published requests, in order."""
        if not self._ok:
            self._check()
        # _req_available and _read_slots written out: this runs once per event.
        cons = self._req_cons
        prod = _load_u32(self._ptr, REQ_PROD)  # read once, validated before any use
        n = (prod - cons) & U32
        if n > self.nr_ents - ((cons - self._rsp_prod_pvt) & U32):
            self._req_available(prod)  # raises the ProtocolError for this value
        if limit is not None and limit < n:
            n = limit
        if n == 0:
            return []
        out = self._req_codec.unpack(self._copy_slots(cons, n))
        self._req_cons = (cons + n) & U32
        return out

    def take_encoded(self, limit: int | None = None) -> tuple[bytes, int, int]:
        """Consume up to ``limit`` (default: all) published requests without decoding
        them: ``(slots, count, first)``, where ``slots`` is ``count`` whole slots copied
        out of shared memory in one step (``req_prod`` validated as in
        [`take_requests`][]) and ``first`` the ring index of the first."""
        if not self._ok:
            self._check()
        n = self._req_available()
        if limit is not None and limit < n:
            n = limit
        start = self._req_cons
        if n <= 0:
            return b"", 0, start
        data = self._copy_slots(start, n)
        self._req_cons = (start + n) & U32
        return data, n, start

    def put_response(self, value: Rsp) -> int:
        """Write a response into the next response slot; return its ring index."""
        self._check()
        if self.pending_responses == 0:
            raise RingFull(f"ring {self._name}: no consumed request left to respond to")
        idx = self._rsp_prod_pvt
        self._write_slots(self._rsp_codec, idx, (value,))
        self._rsp_prod_pvt = (idx + 1) & U32
        return idx

    def put_responses(self, values: Iterable[Rsp]) -> int:
        """Write a batch of responses (one encode and copy); [`RingFull`][] (and
        nothing written) if there are fewer consumed requests than responses."""
        if not self._ok:
            self._check()
        batch = values if type(values) is list or isinstance(values, Sequence) else list(values)
        if len(batch) > (self._req_cons - self._rsp_prod_pvt) & U32:
            raise RingFull(
                f"ring {self._name}: {len(batch)} responses for "
                f"{self.pending_responses} consumed requests"
            )
        if batch:
            start = self._rsp_prod_pvt
            self._write_encoded(start, self._rsp_codec.pack(batch))
            self._rsp_prod_pvt = (start + len(batch)) & U32
        return len(batch)

    def put_encoded(self, data: Encoded) -> int:
        """Write responses already encoded into whole slots, copied into the ring in one
        step; [`RingFull`][] (nothing written) if there are fewer consumed requests than
        responses, ``ValueError`` unless ``data`` is whole slots.  Returns the ring index
        of the first: the ``k``-th response goes in the slot of the ``k``-th oldest
        unanswered request (see the module docstring)."""
        if not self._ok:
            self._check()
        n = self._whole_slots(data)
        pending = (self._req_cons - self._rsp_prod_pvt) & U32
        if n > pending:
            raise RingFull(f"ring {self._name}: {n} responses for {pending} consumed requests")
        start = self._rsp_prod_pvt
        if n:
            self._write_encoded(start, data)
            self._rsp_prod_pvt = (start + n) & U32
        return start

    def push_responses(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``."""
        if not self._ok:
            self._check()
        old, new = self._rsp_pushed, self._rsp_prod_pvt
        notify = _push_checked(self._ptr, RSP_PROD, RSP_EVENT, old, new)  # _push written out
        if notify < 0:
            raise self._overwritten(RSP_PROD, old, "rsp_prod")
        self._rsp_pushed = new
        return notify > 0

    def final_check_for_requests(self, ahead: int = 1) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``."""
        if not self._ok:
            self._check()
        cons = self._req_cons
        prod = _final_check(self._ptr, REQ_PROD, REQ_EVENT, cons, ahead)
        n = (prod - cons) & U32
        if n > self.nr_ents - ((cons - self._rsp_prod_pvt) & U32):
            self._req_available(prod)  # raises the ProtocolError for this value
        return n > 0


def byte_source(view: memoryview) -> Any:
    """Something whose slices are ``bytes`` of ``view``'s memory in one step: the
    underlying ``mmap`` when ``view`` is exactly all of it (slicing an mmap copies once,
    where ``bytes(view[a:b])`` also builds a memoryview), else ``view`` itself (then
    ``bytes()`` of a slice is the copy)."""
    base = view.obj
    if (
        isinstance(base, mmap.mmap)
        and len(base) == len(view)
        and native.address_of(base) == native.address_of(view)
    ):
        return base
    return view


__all__ = [
    "HEADER_SIZE",
    "MAX_RING_PAGE_ORDER",
    "BackRing",
    "Encoded",
    "FrontRing",
    "RingFull",
    "byte_source",
    "init_shared_ring",
    "ring_entries",
    "ring_pages",
]
