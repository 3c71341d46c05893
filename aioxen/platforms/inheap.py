"""The ``inheap`` platform: several domains inside one process.

Theory of operation
-------------------
An [`InHeapWorld`][] is the "hypervisor" shared by every [`InHeapPlatform`][] created
with it: the table of bound event-channel ports, the grant table and ``xenstore_engine``,
the in-process xenstored engine ([`InHeapWorld.store_engine`][] creates it on first
use).  Each platform object is one domain (``domid``); several
objects may play the same domid.  By default all platforms of a process share one world
([`default_world`][]); tests pass a fresh ``InHeapWorld()`` for isolation and call
[`InHeapWorld.assert_cleaned_up`][] to prove nothing leaked.

* Event channels ([`aioxen.platforms._inheap_events`][]): int ports per domain, linked Python
  objects, notifications scheduled on the receiving channel's event loop.
* Grants ([`aioxen.platforms._inheap_grants`][]): every share is a memfd, mappings compose
  pages with ``MAP_FIXED`` so memory is truly shared, with grantee and read-only checks.

Nothing here needs a file system or another process; it is the fastest platform and the one
protocol tests run on first.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from aioxen.platforms._inheap_events import InHeapEventChannel, InHeapEventChannels
from aioxen.platforms._inheap_grants import (
    InHeapGrantTable,
    InHeapMapping,
    InHeapShare,
    _Grant,
    _RefAllocator,
)
from aioxen.platforms._leaks import ClosesAllOpened, assert_no_leaks
from aioxen.platforms.base import Platform

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient
    from aioxen.xenstore.engine import Engine


class InHeapWorld:
    """The shared "hypervisor" state of in-heap domains (ports, grants, xenstore engine)."""

    xenstore_engine: Engine | None = None
    """The in-process XenStore engine, once [`store_engine`][] created it."""

    def __init__(self) -> None:
        self.xenstore_engine = None
        self._ports: dict[tuple[int, int], InHeapEventChannel] = {}
        self._next_port: dict[int, int] = {}
        self._grants: dict[tuple[int, int], _Grant] = {}
        self._ref_allocators: dict[int, _RefAllocator] = {}
        self._shares: set[InHeapShare] = set()
        self._mappings: set[InHeapMapping] = set()

    def store_engine(self) -> Engine:
        """The world's in-process xenstored engine (every domain's XenStore), created on
        first use."""
        engine = self.xenstore_engine
        if engine is None:
            from aioxen.xenstore.engine import Engine

            engine = self.xenstore_engine = Engine()
        return engine

    def _allocate_port(self, domid: int) -> int:
        port = self._next_port.get(domid, 1)
        self._next_port[domid] = port + 1
        return port

    def _refs_for(self, domid: int) -> _RefAllocator:
        alloc = self._ref_allocators.get(domid)
        if alloc is None:
            alloc = self._ref_allocators[domid] = _RefAllocator()
        return alloc

    def leaks(self) -> list[str]:
        """Human-readable descriptions of every bound port, share and mapping still alive."""
        out = [repr(ch) for _, ch in sorted(self._ports.items())]
        out += sorted(repr(s) for s in self._shares)
        out += sorted(repr(m) for m in self._mappings)
        return out

    def assert_cleaned_up(self) -> None:
        """Raise ``AssertionError`` listing leaked ports, shares and mappings."""
        assert_no_leaks("in-heap world", self.leaks())

    def __repr__(self) -> str:
        return (
            f"<InHeapWorld ports={len(self._ports)} shares={len(self._shares)} "
            f"mappings={len(self._mappings)}>"
        )


_default_world: InHeapWorld | None = None
_default_lock = threading.Lock()


def default_world() -> InHeapWorld:
    """The process-wide world used when ``aioxen.platform("inheap")`` gets no ``world``."""
    global _default_world
    with _default_lock:
        if _default_world is None:
            _default_world = InHeapWorld()
        return _default_world


class InHeapPlatform(ClosesAllOpened, Platform):
    """One in-heap domain.  ``world`` defaults to [`default_world`][]."""

    name = "inheap"
    peer_runs_concurrently = False  # every domain of a world runs on one thread
    single_process = True

    def __init__(self, domid: int, world: InHeapWorld | None = None) -> None:
        super().__init__(domid)
        self.world = world if world is not None else default_world()
        self._events = InHeapEventChannels(self)
        self._grants = InHeapGrantTable(self)

    @property
    def events(self) -> InHeapEventChannels:
        return self._events

    @property
    def grants(self) -> InHeapGrantTable:
        return self._grants

    def _create_store(self) -> XenStoreClient:
        from aioxen.xenstore.client import XenStoreClient

        return XenStoreClient.in_process(self.world.store_engine(), self.domid)


__all__ = [
    "InHeapEventChannel",
    "InHeapEventChannels",
    "InHeapGrantTable",
    "InHeapMapping",
    "InHeapPlatform",
    "InHeapShare",
    "InHeapWorld",
    "default_world",
]
