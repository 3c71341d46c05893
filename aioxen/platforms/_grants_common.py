"""What the three grant backends share: the share/mapping objects and the table's front half.

Theory of operation
-------------------
Every share and mapping, on every platform, is a [`GrantMemory`][]: its refs, the peer
domain, whether it is writable, a ``closed`` flag and one close sequence:

1. ``_unmap()`` takes the memory out of this process, all or nothing: while views derived
   from ``buf`` are alive it raises ``BufferError`` and the object stays open and usable;
2. the object is marked closed;
3. ``_end()`` ends the grant (revokes the refs, or unmaps the foreign pages) and performs
   the unmap notification.

Two ways of holding the memory:

* [`OwnedPages`][]: ``buf`` is the view of one ``mmap`` the object owns (a share's whole
  backing file on ``inheap``/``unix``; a gntalloc or gntdev range on ``xen``);
* [`ComposedMapping`][]: ``buf`` is a [`ComposedPages`][aioxen.platforms._pagemap.ComposedPages]
  (``inheap``/``unix`` mappings: pages from any files, in any order).

Two places where the unmap notification happens.  On ``xen`` the kernel does it, on
``close`` or process death (the backend hands it over with an ioctl in
``set_unmap_notify``).  On ``inheap`` and ``unix`` ``close`` does it itself
([`NotifyOnClose`][]): once the grant has ended, clear the byte through the backing
file, close the files, then send the event, so a peer woken by it sees the byte cleared.

[`GrantTableBase`][] is the MEMORY signature's common front: the same argument checks
(and errors) on every platform, then the backend's ``_share``/``_map`` (how pages are
allocated, looked up and mapped), then bookkeeping of what is open: ``live()``, and
``close_all()``, which closes mappings before shares so their unmap notifications still
reach open channels.  A table of [`NotifyOnClose`][] objects revokes a closed share's
refs in [`GrantTableBase._release`][].
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import MutableSet, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from aioxen.platforms._pagemap import (
    ComposedPages,
    OwnedView,
    check_npages,
    check_refs,
    check_unmap_notify,
)
from aioxen.platforms.base import PAGE_SIZE, EventChannel, check_domid

# Plain classes, not abc.ABC: isinstance() and construction stay cheap on the map path.


class GrantMemory:
    """A share or a mapping: refs, peer, writability and the close sequence."""

    _kind: ClassVar[str]
    """``"share"`` or ``"mapping"`` (in messages; mappings are closed first)."""

    def __init__(self, remote_domid: int, refs: list[int], writable: bool) -> None:
        self._remote_domid = remote_domid
        self._refs = refs
        self._writable = writable
        self._closed = False

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def writable(self) -> bool:
        """A share: whether the peer may map it writable.  A mapping: whether it is."""
        return self._writable

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap and end the grant.  Idempotent.  ``BufferError`` (and nothing changed)
        while views derived from ``buf`` are alive."""
        if self._closed:
            return
        self._unmap()
        self._closed = True
        self._end()

    def _unmap(self) -> None:
        """Take the memory out of this process, all or nothing (``BufferError``)."""
        raise NotImplementedError

    def _end(self) -> None:
        """End the grant and perform the unmap notification (after ``_unmap``)."""
        raise NotImplementedError

    @property
    def _size(self) -> int:
        return len(self._refs) * PAGE_SIZE

    @property
    def _can_clear_byte(self) -> bool:
        """The owner always writes its share; a mapping must be writable."""
        return self._kind == "share" or self._writable

    def _mode_state(self) -> str:
        """``rw open``, ``ro closed``, ... for reprs."""
        return f"{'rw' if self._writable else 'ro'} {'closed' if self._closed else 'open'}"

    def _describe(self) -> str:
        """``share of refs [...]`` / ``mapping of refs [...] of domain N``, for messages."""
        if self._kind == "share":
            return f"share of refs {self._refs}"
        return f"mapping of refs {self._refs} of domain {self._remote_domid}"


class OwnedPages(OwnedView, GrantMemory):
    """``buf`` is the view of one ``mmap`` this object owns (set with [`_own`][])."""

    def _own(self, mm: mmap.mmap) -> None:
        self._mm = mm
        self._view = memoryview(mm)

    @property
    def buf(self) -> memoryview:
        view = self._view
        if view is None:
            raise ValueError(f"{self._describe()} is closed")
        return view

    def _unmap(self) -> None:
        self._unmap_view()


TableT = TypeVar("TableT", bound="GrantTableBase[Any, Any]")


class NotifyOnClose(GrantMemory, Generic[TableT]):
    """A share or mapping of ``_table`` (set by the subclass) that performs its unmap
    notification in ``close``; the table revokes and forgets it ([`_end`][])."""

    _table: TableT | None
    _notify_offset: int | None = None
    _notify_channel: EventChannel | None = None

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        check_unmap_notify(offset, self._size, self._can_clear_byte, self._kind)
        self._notify_offset, self._notify_channel = offset, channel
        self._death_notify(offset, channel)

    def _death_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        """Arrange the notification for this process's death (``None``: withdraw it).
        Nothing to do by default: an in-heap "domain" cannot die alone."""

    def _end(self) -> None:
        table, self._table = self._table, None
        if table is not None:
            table._release(self)
        self._close_files(self._notify_offset)
        if self._notify_channel is not None:
            self._notify_channel.notify()
        self._death_notify(None, None)

    def _close_files(self, clear_offset: int | None) -> None:
        """Write 0 at ``clear_offset`` (if not ``None``) through the backing file — the
        memory is already unmapped — then close the files."""
        raise NotImplementedError


class FileShare(OwnedPages, NotifyOnClose[TableT]):
    """A share whose pages are one file (``fd``, owned), ``mmap``\\ ed whole for the owner."""

    _kind = "share"

    def __init__(
        self, table: TableT, remote_domid: int, refs: list[int], writable: bool, fd: int
    ) -> None:
        super().__init__(remote_domid, refs, writable)
        self._table = table
        self._fd = fd
        self._own(mmap.mmap(fd, len(refs) * PAGE_SIZE))

    def _close_files(self, clear_offset: int | None) -> None:
        if clear_offset is not None:
            os.pwrite(self._fd, b"\0", clear_offset)
        os.close(self._fd)


class ComposedMapping(NotifyOnClose[TableT]):
    """Foreign pages composed contiguously from their backing files."""

    _kind = "mapping"

    def __init__(
        self,
        table: TableT,
        remote_domid: int,
        refs: list[int],
        writable: bool,
        pages: ComposedPages,
    ) -> None:
        super().__init__(remote_domid, refs, writable)
        self._table = table
        self._pages = pages

    @property
    def buf(self) -> memoryview:
        return self._pages.view

    def address(self) -> int:
        """Start address of the mapping (to inspect ``/proc/self/maps``)."""
        return self._pages.address()

    def _unmap(self) -> None:
        self._pages.unmap()

    def _close_files(self, clear_offset: int | None) -> None:
        if clear_offset is not None:
            self._pages.clear_byte(clear_offset)
        self._pages.close_fds()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} of domain {self._remote_domid} refs={self._refs} "
            f"{self._mode_state()}>"
        )


ShareT = TypeVar("ShareT", bound=GrantMemory)
MappingT = TypeVar("MappingT", bound=GrantMemory)


class GrantTableBase(Generic[ShareT, MappingT]):
    """The MEMORY signature: checks and bookkeeping here, pages in the backend.

    ``live`` is where created objects are tracked: a set ([`NotifyOnClose`][] objects
    leave it through [`_release`][] on close) or a ``WeakSet`` (objects dropped without
    ``close`` end their grants in finalizers).
    """

    def __init__(self, live: MutableSet[ShareT | MappingT]) -> None:
        self._live = live

    def share(self, remote_domid: int, npages: int, writable: bool = True) -> ShareT:
        check_domid(remote_domid, "remote_domid")
        check_npages(npages)
        share = self._share(remote_domid, npages, writable)
        self._track(share)
        return share

    def map(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> MappingT:
        check_domid(remote_domid, "remote_domid")
        mapping = self._map(remote_domid, check_refs(refs, remote_domid), writable)
        self._track(mapping)
        return mapping

    async def map_async(
        self, remote_domid: int, refs: Sequence[int], writable: bool = True
    ) -> MappingT:
        """`map` for coroutines: the same result and errors, but any wait (``xen``:
        a paged-out page being paged in) awaits instead of blocking the event loop."""
        check_domid(remote_domid, "remote_domid")
        mapping = await self._map_async(remote_domid, check_refs(refs, remote_domid), writable)
        self._track(mapping)
        return mapping

    async def _map_async(self, remote_domid: int, refs: list[int], writable: bool) -> MappingT:
        """[`_map`][] for [`map_async`][]; by default it never waits, so the same."""
        return self._map(remote_domid, refs, writable)

    def _share(self, remote_domid: int, npages: int, writable: bool) -> ShareT:
        """Allocate ``npages`` zeroed pages granted to ``remote_domid`` (arguments checked)."""
        raise NotImplementedError

    def _map(self, remote_domid: int, refs: list[int], writable: bool) -> MappingT:
        """Look up and map ``refs`` of ``remote_domid`` contiguously (arguments checked)."""
        raise NotImplementedError

    def _track(self, obj: ShareT | MappingT) -> None:
        self._live.add(obj)

    def _release(self, obj: ShareT | MappingT) -> None:
        """``obj`` was closed (and unmapped): revoke a share's refs, stop tracking it."""
        self._live.discard(obj)

    def live(self) -> list[ShareT | MappingT]:
        """Shares and mappings created here and not yet closed."""
        return [o for o in list(self._live) if not o.closed]

    def close_all(self, ignore_busy: bool = False) -> None:
        """Close every mapping, then every share, created here.  ``ignore_busy`` leaves
        open those with live views (their ``BufferError`` is swallowed)."""
        busy = (BufferError,) if ignore_busy else ()
        for obj in sorted(self.live(), key=lambda o: o._kind != "mapping"):
            with contextlib.suppress(*busy):
                obj.close()


__all__ = [
    "ComposedMapping",
    "FileShare",
    "GrantMemory",
    "GrantTableBase",
    "NotifyOnClose",
    "OwnedPages",
]
