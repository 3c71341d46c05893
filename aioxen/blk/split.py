"""How blkfront cuts I/O into ring requests and merges queued ones (pure).

Theory of operation
-------------------
Every blkif request moves data through granted 4 KiB pages, one segment per page.  The
frontend stages each transfer in its own run of pool pages, starting at offset 0 of the first
page, so a transfer of ``n`` bytes needs ``ceil(n / 4096)`` segments: full pages (sectors
0..7) and a partial last page ([`aioxen.blk.blkif.segment_layout`][]).

A request carries at most ``max_segments`` segments: 11 inline (a direct request), or up to
the backend's ``feature-max-indirect-segments`` in an indirect request.  [`split`][]
cuts a transfer into chunks of at most ``max_segments`` pages; each chunk becomes one
request (or part of one, see below).

When the ring is full, chunks queue up.  Before a queued chunk goes out, [`merge_runs`][]
coalesces it with the chunks queued right behind it if they continue it on disk — same
direction, next sector, and the combined segment count still fits one request — so a burst
of small sequential I/O becomes a few large requests.  Merging never reorders: only
neighbours in queue order merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aioxen.blk.blkif import PAGE_SIZE, SECTOR_SIZE


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a transfer: ``nbytes`` at wire sector ``sector`` (512-byte units),
    ``offset`` bytes into the caller's buffer."""

    sector: int
    offset: int
    nbytes: int

    @property
    def npages(self) -> int:
        return pages_for(self.nbytes)


def pages_for(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) // PAGE_SIZE


def split(sector: int, nbytes: int, max_segments: int) -> list[Chunk]:
    """Cut ``nbytes`` at wire sector ``sector`` into chunks of at most ``max_segments``
    pages.  ``nbytes`` must be a positive multiple of 512."""
    if nbytes <= 0 or nbytes % SECTOR_SIZE:
        raise ValueError(f"transfer of {nbytes} bytes is not a positive multiple of 512")
    if max_segments < 1:
        raise ValueError("max_segments must be at least 1")
    step = max_segments * PAGE_SIZE
    out = []
    off = 0
    while off < nbytes:
        n = min(step, nbytes - off)
        out.append(Chunk(sector + off // SECTOR_SIZE, off, n))
        off += n
    return out


class Mergeable(Protocol):
    @property
    def kind(self) -> int: ...

    @property
    def sector(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def npages(self) -> int: ...


def continues(a: Mergeable, b: Mergeable) -> bool:
    """Does ``b`` start on disk exactly where ``a`` ends, in the same direction?"""
    return a.kind == b.kind and a.sector + a.nbytes // SECTOR_SIZE == b.sector


def merge_runs(
    queue: Sequence[Mergeable], max_segments: int, mergeable_kinds: frozenset[int]
) -> list[int]:
    """Group the head of ``queue`` into requests: return the sizes of consecutive groups
    (their sum is ``len(queue)``).  Items merge with their predecessor in the group when they
    continue it on disk, their kind is in ``mergeable_kinds`` and the group's pages fit in
    ``max_segments``."""
    sizes: list[int] = []
    i = 0
    n = len(queue)
    while i < n:
        head = queue[i]
        pages = head.npages
        j = i + 1
        if head.kind in mergeable_kinds:
            while j < n:
                nxt = queue[j]
                if not continues(queue[j - 1], nxt) or pages + nxt.npages > max_segments:
                    break
                pages += nxt.npages
                j += 1
        sizes.append(j - i)
        i = j
    return sizes


__all__ = ["Chunk", "Mergeable", "continues", "merge_runs", "pages_for", "split"]
