"""Shared-memory rings: ``io/ring.h`` request/response rings, byte rings, async adapters.

* [`aioxen.rings.formats`][] — entry formats (netif, blkif, caller-defined).
* [`aioxen.rings.sring`][] — ``io/ring.h`` shared rings: pure front/back ends.
* [`aioxen.rings.byte`][] — console and XenStore byte-ring pages.
* [`aioxen.rings.aio`][] — [`AsyncFrontRing`][aioxen.rings.aio.AsyncFrontRing] /
  [`AsyncBackRing`][aioxen.rings.aio.AsyncBackRing] on a platform.
"""

from __future__ import annotations

from aioxen.rings.byte import CONSOLE, XENSTORE, ByteRing, ByteRingLayout
from aioxen.rings.formats import EntryFormat, RawFormat, StructFormat, slot_size
from aioxen.rings.sring import BackRing, FrontRing, RingFull, ring_entries, ring_pages

__all__ = [
    "CONSOLE",
    "XENSTORE",
    "BackRing",
    "ByteRing",
    "ByteRingLayout",
    "EntryFormat",
    "FrontRing",
    "RawFormat",
    "RingFull",
    "StructFormat",
    "ring_entries",
    "ring_pages",
    "slot_size",
]
