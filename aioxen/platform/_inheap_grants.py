"""In-heap grant tables: real shared pages in memfds, the table in Python dicts.

Theory of operation
-------------------
Shared memory must really be shared: a write through a mapping is visible through the share
and vice versa, and a mapping may compose any refs, in any order, into one contiguous view.
``bytearray`` pages cannot do that without copying, so every share is backed by its own
anonymous memory file (``os.memfd_create``): the owner's ``buf`` is an ``mmap`` of the whole
memfd, and a mapping is a :class:`~aioxen.platform._pagemap.ComposedPages` — a reserved
region with each page ``MAP_FIXED`` from its share's memfd, exactly as the ``unix`` platform
does with files.  Read-only mappings map ``PROT_READ`` and hand out read-only memoryviews.

The grant table is ``world._grants[(granting domid, ref)] -> _Grant`` (share, page index,
grantee, writable).  Refs are allocated per granting domain, lowest free first, from 8 (Xen
reserves 0..7).  ``share.close()`` revokes the refs and closes the owner's view and memfd;
the kernel keeps the pages alive for mappings that still exist, so they stay valid memory.
"""

from __future__ import annotations

import heapq
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aioxen.platform._pagemap import MAX_REF, ComposedPages, check_refs, check_unmap_notify
from aioxen.platform.base import PAGE_SIZE, EventChannel, check_domid

if TYPE_CHECKING:
    from aioxen.platform.inheap import InHeapPlatform, InHeapWorld

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


class InHeapShare:
    """Pages exported by an in-heap domain."""

    def __init__(
        self, table: InHeapGrantTable, remote_domid: int, npages: int, writable: bool
    ) -> None:
        self._table: InHeapGrantTable | None = table
        self._domid = table.domid
        self._remote_domid = remote_domid
        self._writable = writable
        self._fd = os.memfd_create(f"aioxen-inheap-d{self._domid}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, npages * PAGE_SIZE)
            self._mm = mmap.mmap(self._fd, npages * PAGE_SIZE)
        except BaseException:
            os.close(self._fd)
            raise
        self._view: memoryview | None = memoryview(self._mm)
        self._refs = table.world._refs_for(self._domid).take(npages)
        for i, ref in enumerate(self._refs):
            table.world._grants[(self._domid, ref)] = _Grant(self, i, remote_domid, writable)
        self._notify_offset: int | None = None
        self._notify_channel: EventChannel | None = None

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def buf(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"share of refs {self._refs} (domain {self._domid}) is closed")
        return self._view

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def writable(self) -> bool:
        """Whether the grantee may map the pages writable."""
        return self._writable

    @property
    def closed(self) -> bool:
        return self._table is None

    def _fd_for_mapping(self) -> int:
        return os.dup(self._fd)

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        check_unmap_notify(offset, len(self._refs) * PAGE_SIZE, True, "share")
        self._notify_offset, self._notify_channel = offset, channel

    def close(self) -> None:
        table = self._table
        if table is None:
            return
        if self._view is not None:
            self._view.release()
            self._view = None
        try:
            self._mm.close()
        except BufferError:
            self._view = memoryview(self._mm)
            raise
        self._table = None
        world = table.world
        for ref in self._refs:
            world._grants.pop((self._domid, ref), None)
        world._refs_for(self._domid).give_back(self._refs)
        table._live.discard(self)
        world._shares.discard(self)
        if self._notify_offset is not None:
            os.pwrite(self._fd, b"\0", self._notify_offset)
        os.close(self._fd)
        if self._notify_channel is not None:
            self._notify_channel.notify()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<InHeapShare domid={self._domid} -> {self._remote_domid} refs={self._refs} "
            f"{'rw' if self._writable else 'ro'} {state}>"
        )


class InHeapMapping:
    """Foreign in-heap pages mapped contiguously."""

    def __init__(
        self,
        table: InHeapGrantTable,
        remote_domid: int,
        refs: list[int],
        pages: ComposedPages,
    ) -> None:
        self._table: InHeapGrantTable | None = table
        self._remote_domid = remote_domid
        self._refs = refs
        self._pages = pages
        self._notify_offset: int | None = None
        self._notify_channel: EventChannel | None = None

    @property
    def buf(self) -> memoryview:
        return self._pages.view

    @property
    def writable(self) -> bool:
        return self._pages.writable

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def closed(self) -> bool:
        return self._table is None

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        check_unmap_notify(offset, len(self._refs) * PAGE_SIZE, self.writable, "mapping")
        self._notify_offset, self._notify_channel = offset, channel

    def close(self) -> None:
        table = self._table
        if table is None:
            return
        self._pages.unmap()
        self._table = None
        table._live.discard(self)
        table.world._mappings.discard(self)
        if self._notify_offset is not None:
            self._pages.clear_byte(self._notify_offset)
        self._pages.close_fds()
        if self._notify_channel is not None:
            self._notify_channel.notify()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        mode = "rw" if self.writable else "ro"
        return f"<InHeapMapping of domain {self._remote_domid} refs={self._refs} {mode} {state}>"


class InHeapGrantTable:
    """The MEMORY implementation of one :class:`InHeapPlatform`."""

    def __init__(self, platform: InHeapPlatform) -> None:
        self._platform = platform
        self._live: set[InHeapShare | InHeapMapping] = set()

    @property
    def domid(self) -> int:
        return self._platform.domid

    @property
    def world(self) -> InHeapWorld:
        return self._platform.world

    def share(self, remote_domid: int, npages: int, writable: bool = True) -> InHeapShare:
        check_domid(remote_domid, "remote_domid")
        if not isinstance(npages, int) or npages < 1:
            raise ValueError(f"npages must be a positive int, not {npages!r}")
        share = InHeapShare(self, remote_domid, npages, writable)
        self._live.add(share)
        self.world._shares.add(share)
        return share

    def map(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> InHeapMapping:
        check_domid(remote_domid, "remote_domid")
        ref_list = check_refs(refs, remote_domid)
        grants = self.world._grants
        fds: dict[InHeapShare, int] = {}
        sources: list[tuple[InHeapShare, int]] = []
        for ref in ref_list:
            g = grants.get((remote_domid, ref))
            if g is None:
                raise FileNotFoundError(
                    f"grant ref {ref} of domain {remote_domid} does not exist or was revoked"
                )
            if g.grantee != self.domid:
                raise PermissionError(
                    f"grant ref {ref} of domain {remote_domid} is granted to domain "
                    f"{g.grantee}, not to domain {self.domid}"
                )
            if writable and not g.writable:
                raise PermissionError(
                    f"grant ref {ref} of domain {remote_domid} is read-only; map it with "
                    "writable=False"
                )
            sources.append((g.share, g.index * PAGE_SIZE))
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
        m = InHeapMapping(self, remote_domid, ref_list, pages)
        self._live.add(m)
        self.world._mappings.add(m)
        return m

    def live(self) -> list[InHeapShare | InHeapMapping]:
        return list(self._live)

    def close_all(self) -> None:
        mappings = [o for o in self._live if isinstance(o, InHeapMapping)]
        for m in mappings:
            m.close()
        for obj in list(self._live):
            obj.close()


__all__ = ["FIRST_REF", "InHeapGrantTable", "InHeapMapping", "InHeapShare"]
