"""Bulk raw access to ``io/ring.h`` rings for the netif data path.

The pure rings (:mod:`aioxen.rings.rpc`) decode one value per slot.  netif slots are not
self-describing (an extra-info record overlays a request or response, recognised only by
the flags of its predecessor), and the data path handles hundreds of thousands of slots
per second, so netfront/netback move *runs* of slots: one ``bytes`` copy of ``n``
consecutive slots out of shared memory (validated exactly like ``take_requests``: the
producer index is read once with an acquire load and checked), decoded with
``struct.iter_unpack``; and one write of ``n`` packed slots into the ring before the usual
push.  All index bookkeeping, validation, pushing and final checks are the pure rings'
own; these subclasses only add the bulk copy.
"""

from __future__ import annotations

from typing import Any

from aioxen.rings.rpc import HEADER_SIZE, U32, BackRing, FrontRing, RingFull


def _copy_out(ring: Any, start: int, n: int) -> bytes:
    view, slot, nr = ring._view, ring._slot, ring.nr_ents
    s = start & ring._mask
    first = min(n, nr - s)
    lo = HEADER_SIZE + s * slot
    data = bytes(view[lo : lo + first * slot])
    if first < n:
        data += bytes(view[HEADER_SIZE : HEADER_SIZE + (n - first) * slot])
    return data


def _copy_in(ring: Any, start: int, data: bytes | bytearray | memoryview, n: int) -> None:
    view, slot, nr = ring._view, ring._slot, ring.nr_ents
    if len(data) != n * slot:
        raise ValueError(f"ring {ring.name}: {n} slots need {n * slot} bytes, got {len(data)}")
    s = start & ring._mask
    first = min(n, nr - s)
    lo = HEADER_SIZE + s * slot
    view[lo : lo + first * slot] = data[: first * slot]
    if first < n:
        view[HEADER_SIZE : HEADER_SIZE + (n - first) * slot] = data[first * slot :]


class RawFrontRing(FrontRing[bytes, bytes]):
    """A front ring moving packed slots: :meth:`put_raw`, :meth:`take_raw`."""

    def put_raw(self, data: bytes | bytearray | memoryview, n: int) -> int:
        """Write ``n`` packed request slots (``n * slot_size`` bytes); return the ring
        index of the first.  :class:`RingFull` if fewer than ``n`` slots are free."""
        self._check()
        if n > self.free_requests:
            raise RingFull(f"ring {self._name}: {n} slots wanted, {self.free_requests} free")
        start = self._req_prod_pvt
        _copy_in(self, start, data, n)
        self._req_prod_pvt = (start + n) & U32
        return start

    def take_raw(self, limit: int | None = None) -> tuple[bytes, int, int]:
        """Consume published responses: ``(packed_slots, count, first_index)``."""
        self._check()
        n = self._rsp_available()
        if limit is not None:
            n = min(n, limit)
        start = self._rsp_cons
        if n == 0:
            return b"", 0, start
        data = _copy_out(self, start, n)
        self._rsp_cons = (start + n) & U32
        return data, n, start


class RawBackRing(BackRing[bytes, bytes]):
    """A back ring moving packed slots: :meth:`take_raw`, :meth:`put_raw`."""

    def take_raw(self, limit: int | None = None) -> tuple[bytes, int, int]:
        """Consume published requests: ``(packed_slots, count, first_index)``."""
        self._check()
        n = self._req_available()
        if limit is not None:
            n = min(n, limit)
        start = self._req_cons
        if n == 0:
            return b"", 0, start
        data = _copy_out(self, start, n)
        self._req_cons = (start + n) & U32
        return data, n, start

    def put_raw(self, data: bytes | bytearray | memoryview, n: int) -> int:
        """Write ``n`` packed response slots in the slots of the oldest unanswered
        requests; return the ring index of the first."""
        self._check()
        if n > self.pending_responses:
            raise RingFull(
                f"ring {self._name}: {n} responses for {self.pending_responses} open requests"
            )
        start = self._rsp_prod_pvt
        _copy_in(self, start, data, n)
        self._rsp_prod_pvt = (start + n) & U32
        return start


__all__ = ["RawBackRing", "RawFrontRing"]
