"""Contiguous views of scattered file pages: the mapping half of grant memory.

Theory of operation
-------------------
A grant mapping must present *any* list of granted pages — from several shares, in any
order, possibly repeated — as one contiguous ``memoryview`` that is *the same memory* as the
granter's pages (not a copy).  Both the ``inheap`` platform (pages in memfds) and the ``unix``
platform (pages in files under ``$XEN_ROOT``) keep every page in some file at some offset, so
one mechanism serves both:

1. reserve ``n`` pages of address space with Python's own ``mmap.mmap(-1, n * 4096)``
   (read-only reservation for read-only maps), so Python owns the region, hands out the
   ``memoryview``, and refuses to ``close`` it while views are exported (``BufferError``);
2. ``MAP_FIXED`` each page (adjacent pages of one file are merged into one call) from its
   file over the reservation with ``PROT_READ`` or ``PROT_READ | PROT_WRITE``, through
   [`aioxen.native.mmap_fixed`][];
3. ``close`` is Python's ``mmap.close`` — one ``munmap`` of the whole range.

The object keeps the file descriptors it was given (it owns them) so that an unmap
notification can clear a byte with ``pwrite`` *after* the region is gone: the close is then
all-or-nothing — either the region is still mapped (``BufferError``) or every side effect ran.

The all-or-nothing unmap of an ``mmap`` and the one view handed out of it is
[`OwnedView`][], which every share and mapping that owns its ``mmap`` uses too.  Argument
checks shared by the grant backends ([`check_refs`][], [`check_npages`][],
[`check_unmap_notify`][]) live here as well.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

from aioxen import native
from aioxen.platforms.base import PAGE_SIZE

MAX_REF = 2**32 - 1
"""Grant refs are u32 on the wire."""


def check_refs(refs: Sequence[int], remote_domid: int) -> list[int]:
    """Validate a list of grant refs to map (non-empty, u32 ints)."""
    out = list(refs)
    if not out:
        raise ValueError(f"no grant refs given to map from domain {remote_domid}")
    for ref in out:
        if not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref <= MAX_REF:
            raise ValueError(f"invalid grant ref {ref!r} of domain {remote_domid}")
    return out


def check_npages(npages: int) -> int:
    """Validate a number of pages to share (a positive int, not a bool)."""
    if not isinstance(npages, int) or isinstance(npages, bool) or npages < 1:
        raise ValueError(f"npages must be a positive int, not {npages!r}")
    return npages


def check_unmap_notify(offset: int | None, size: int, writable: bool, what: str) -> None:
    """Validate an unmap-notify byte offset for a share/mapping of ``size`` bytes."""
    if offset is None:
        return
    if not isinstance(offset, int) or not 0 <= offset < size:
        raise ValueError(f"unmap-notify offset {offset!r} outside {what} of {size} bytes")
    if not writable:
        raise ValueError(f"unmap-notify byte clearing needs a writable {what}")


class OwnedView:
    """Mixin: an ``mmap`` (``_mm``) its holder owns and the one ``memoryview`` of it
    (``_view``) handed out; the holder sets both."""

    __slots__ = ("_mm", "_view")
    _mm: mmap.mmap | None
    _view: memoryview | None

    def _unmap_view(self) -> bool:
        """Release ``_view`` and unmap ``_mm``; ``False`` if already done.  While views
        derived from ``_view`` are alive: ``BufferError``, and the mapping and a usable
        ``_view`` stay."""
        mm = self._mm
        if mm is None:
            return False
        view = self._view
        if view is not None:
            view.release()  # BufferError here if the view itself is exported (e.g. pinned)
            self._view = None
        try:
            mm.close()
        except BufferError:
            self._view = memoryview(mm)
            raise
        self._mm = None
        return True


class ComposedPages(OwnedView):
    """``len(sources)`` pages, page ``i`` being ``sources[i] = (fd, file_offset)``.

    Takes ownership of every fd in ``fds`` (closed by [`close_fds`][], also on failure here).
    """

    __slots__ = ("_fds", "_sources", "_writable")

    def __init__(
        self, sources: Sequence[tuple[int, int]], writable: bool, fds: Sequence[int]
    ) -> None:
        self._fds = list(fds)
        self._sources = list(sources)
        self._writable = writable
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:
            if not self._sources:
                raise ValueError("cannot map an empty list of pages")
            length = len(self._sources) * PAGE_SIZE
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            region = mmap.mmap(-1, length, access=access)
            self._mm = region
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            base = native.address_of(region)
            for first, count, fd, offset in _runs(self._sources):
                native.mmap_fixed(base + first * PAGE_SIZE, count * PAGE_SIZE, prot, fd, offset)
            self._view = memoryview(region)
        except BaseException:
            self.close_fds()
            if self._mm is not None:
                self._mm.close()
                self._mm = None
            raise

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("mapping is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def writable(self) -> bool:
        return self._writable

    def address(self) -> int:
        """Start address of the region (for tests that inspect ``/proc/self/maps``)."""
        return native.address_of(self.view)

    unmap = OwnedView._unmap_view
    """Unmap the region; ``False`` if already done.  ``BufferError`` (nothing changed)
    while views derived from [`view`][] are alive."""

    def clear_byte(self, offset: int) -> None:
        """Write 0 at ``offset`` of the composed range via the backing file (works after
        [`unmap`][]; needs a writable mapping)."""
        fd, file_offset = self._sources[offset // PAGE_SIZE]
        os.pwrite(fd, b"\0", file_offset + offset % PAGE_SIZE)

    def close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def _runs(sources: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Merge adjacent pages of one file: ``[(first_index, count, fd, file_offset)]``."""
    runs: list[tuple[int, int, int, int]] = []
    for i, (fd, off) in enumerate(sources):
        if runs:
            first, count, rfd, roff = runs[-1]
            if rfd == fd and roff + count * PAGE_SIZE == off:
                runs[-1] = (first, count + 1, rfd, roff)
                continue
        runs.append((i, 1, fd, off))
    return runs


__all__ = [
    "MAX_REF",
    "ComposedPages",
    "OwnedView",
    "check_npages",
    "check_refs",
    "check_unmap_notify",
]
