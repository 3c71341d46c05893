"""In-heap grant tables: real shared pages in memfds, the table in Python dicts.

Theory of operation
-------------------
Shared memory must really be shared: a write through a mapping is visible through the share
and vice versa, and a mapping may compose any refs, in any order, into one contiguous view.
``bytearray`` pages cannot do that without copying, so every share is backed by its own
anonymous memory file (``os.memfd_create``): the owner's ``buf`` is an ``mmap`` of the whole
memfd, and a mapping is a [`ComposedPages`][aioxen.platforms._pagemap.ComposedPages] — a reserved
region with each page ``MAP_FIXED`` from its share's memfd, exactly as the ``unix`` platform
does with files.  Read-only mappings map ``PROT_READ`` and hand out read-only memoryviews.

The grant table is ``world._grants[(granting domid, ref)] -> _Grant`` (share, page index,
grantee, writable).  Refs are allocated per granting domain, lowest free first, from 8 (Xen
reserves 0..7).  ``share.close()`` revokes the refs and closes the owner's view and memfd;
the kernel keeps the pages alive for mappings that still exist, so they stay valid memory.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aioxen.platforms._grants_common import ComposedMapping, FileShare, GrantTableBase
from aioxen.platforms._pagemap import MAX_REF, ComposedPages
from aioxen.platforms.base import PAGE_SIZE

if TYPE_CHECKING:
    from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld

FIRST_REF = 8
"""Xen reserves grant refs 0..7 (console, xenstore, ...)."""


@dataclass(frozen=True)
class _Grant:
    share: InHeapShare
    index: int
    grantee: int
    writable: bool


class _RefAllocator:
    """Lowest-free-first grant refs of one granting domain."""

    def __init__(self) -> None:
        self._next = FIRST_REF
        self._free: list[int] = []

    def take(self, n: int) -> list[int]:
        refs: list[int] = []
        while len(refs) < n and self._free:
            refs.append(heapq.heappop(self._free))
        while len(refs) < n:
            if self._next > MAX_REF:
                for r in refs:
                    heapq.heappush(self._free, r)
                raise OSError("grant table full")
            refs.append(self._next)
            self._next += 1
        return refs

    def give_back(self, refs: Sequence[int]) -> None:
        for r in refs:
            heapq.heappush(self._free, r)


class InHeapShare(FileShare["InHeapGrantTable"]):
    """Pages exported by an in-heap domain: one memfd."""

    def __init__(
        self,
        table: InHeapGrantTable,
        domid: int,
        remote_domid: int,
        refs: list[int],
        writable: bool,
        fd: int,
    ) -> None:
        super().__init__(table, remote_domid, refs, writable, fd)
        self._domid = domid

    def _fd_for_mapping(self) -> int:
        return os.dup(self._fd)

    def _describe(self) -> str:
        return f"share of refs {self._refs} (domain {self._domid})"

    def __repr__(self) -> str:
        return (
            f"<InHeapShare domid={self._domid} -> {self._remote_domid} refs={self._refs} "
            f"{self._mode_state()}>"
        )


class InHeapMapping(ComposedMapping["InHeapGrantTable"]):
    """Foreign in-heap pages mapped contiguously."""


class InHeapGrantTable(GrantTableBase[InHeapShare, InHeapMapping]):
    """The MEMORY implementation of one [`InHeapPlatform`][]."""

    def __init__(self, platform: InHeapPlatform) -> None:
        super().__init__(set())
        self._platform = platform

    @property
    def domid(self) -> int:
        return self._platform.domid

    @property
    def world(self) -> InHeapWorld:
        return self._platform.world

    def _share(self, remote_domid: int, npages: int, writable: bool) -> InHeapShare:
        domid, world = self.domid, self.world
        fd = os.memfd_create(f"aioxen-inheap-d{domid}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, npages * PAGE_SIZE)
            allocator = world._refs_for(domid)
            refs = allocator.take(npages)
            try:
                share = InHeapShare(self, domid, remote_domid, refs, writable, fd)
            except BaseException:
                allocator.give_back(refs)
                raise
        except BaseException:
            os.close(fd)
            raise
        for i, ref in enumerate(refs):
            world._grants[(domid, ref)] = _Grant(share, i, remote_domid, writable)
        return share

    def _map(self, remote_domid: int, refs: list[int], writable: bool) -> InHeapMapping:
        domid, grants = self.domid, self.world._grants
        sources: list[tuple[InHeapShare, int]] = []
        for ref in refs:
            g = grants.get((remote_domid, ref))
            if g is None:
                raise FileNotFoundError(
                    f"grant ref {ref} of domain {remote_domid} does not exist or was revoked"
                )
            if g.grantee != domid:
                raise PermissionError(
                    f"grant ref {ref} of domain {remote_domid} is granted to domain "
                    f"{g.grantee}, not to domain {domid}"
                )
            if writable and not g.writable:
                raise PermissionError(
                    f"grant ref {ref} of domain {remote_domid} is read-only; map it with "
                    "writable=False"
                )
            sources.append((g.share, g.index * PAGE_SIZE))
        fds: dict[InHeapShare, int] = {}
        try:
            for share, _ in sources:
                if share not in fds:
                    fds[share] = share._fd_for_mapping()
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        pages = ComposedPages(
            [(fds[share], off) for share, off in sources], writable, list(fds.values())
        )
        return InHeapMapping(self, remote_domid, refs, writable, pages)

    def _track(self, obj: InHeapShare | InHeapMapping) -> None:
        self._live.add(obj)
        world = self._platform.world
        if isinstance(obj, InHeapShare):
            world._shares.add(obj)
        else:
            world._mappings.add(obj)

    def _release(self, obj: InHeapShare | InHeapMapping) -> None:
        self._live.discard(obj)
        world = self._platform.world
        if isinstance(obj, InHeapShare):
            for ref in obj._refs:
                world._grants.pop((obj._domid, ref), None)
            world._refs_for(obj._domid).give_back(obj._refs)
            world._shares.discard(obj)
        else:
            world._mappings.discard(obj)


__all__ = ["FIRST_REF", "InHeapGrantTable", "InHeapMapping", "InHeapShare"]
