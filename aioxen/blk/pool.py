"""Allocation of granted pages for blkfront's data (pure allocator + asyncio waiting).

Theory of operation
-------------------
The frontend grants its backend one fixed set of pages at connect time and stages all I/O
in them: writes are copied in before the request goes out, reads copied out after the
response.  Reusing the same grant refs is what makes *persistent grants* work (the backend
maps each ref once and keeps it mapped); it also keeps grant-table traffic off the data path
when the backend does not persist them.

[`PageAllocator`][] hands out runs of page indices.  It prefers one contiguous run
(first fit over a sorted list of free extents, so a transfer is a single ``memcpy`` and the
backend can coalesce adjacent pages), and falls back to scattered pages when free space is
fragmented.  [`PagePool`][] adds FIFO waiting: a caller that needs more pages than are
free waits until enough come back; a request never needs more pages than the pool holds.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque


class PageAllocator:
    """Free extents ``[start, end)`` kept sorted and coalesced."""

    def __init__(self, npages: int) -> None:
        if npages <= 0:
            raise ValueError("a pool needs at least one page")
        self.npages = npages
        self._starts: list[int] = [0]
        self._ends: list[int] = [npages]
        self.free = npages

    def alloc(self, n: int) -> list[int] | None:
        """``n`` page indices (contiguous if possible), or ``None`` if fewer are free."""
        if n <= 0 or n > self.free:
            return None
        starts, ends = self._starts, self._ends
        if n == 1:  # the common 4 KiB case: the first free page
            s = starts[0]
            if ends[0] == s + 1:
                del starts[0]
                del ends[0]
            else:
                starts[0] = s + 1
            self.free -= 1
            return [s]
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if e - s >= n:
                if e - s == n:
                    del starts[i]
                    del ends[i]
                else:
                    starts[i] = s + n
                self.free -= n
                return list(range(s, s + n))
        out: list[int] = []  # fragmented: take extents from the front
        while len(out) < n:
            s, e = starts[0], ends[0]
            take = min(e - s, n - len(out))
            out.extend(range(s, s + take))
            if s + take == e:
                del starts[0]
                del ends[0]
            else:
                starts[0] = s + take
        self.free -= n
        return out

    def release(self, pages: list[int]) -> None:
        """Return pages (any order) to the free list, merging neighbouring extents."""
        if not pages:
            return
        if len(pages) == 1:
            self._insert(pages[0], pages[0] + 1)
            self.free += 1
            return
        run_start = prev = pages[0]
        runs = []
        for p in pages[1:]:
            if p == prev + 1:
                prev = p
                continue
            runs.append((run_start, prev + 1))
            run_start = prev = p
        runs.append((run_start, prev + 1))
        for s, e in runs:
            self._insert(s, e)
        self.free += len(pages)

    def _insert(self, s: int, e: int) -> None:
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(starts, s)
        if (i < len(starts) and starts[i] < e) or (i > 0 and ends[i - 1] > s):
            raise ValueError(f"pages {s}..{e - 1} released twice")
        merge_left = i > 0 and ends[i - 1] == s
        merge_right = i < len(starts) and starts[i] == e
        if merge_left and merge_right:
            ends[i - 1] = ends[i]
            del starts[i]
            del ends[i]
        elif merge_left:
            ends[i - 1] = e
        elif merge_right:
            starts[i] = s
        else:
            starts.insert(i, s)
            ends.insert(i, e)

    def extents(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))


class PagePool:
    """A [`PageAllocator`][] whose callers wait, first come first served."""

    def __init__(self, npages: int) -> None:
        self.allocator = PageAllocator(npages)
        self._waiters: deque[tuple[int, asyncio.Future[list[int]]]] = deque()
        self._closed: BaseException | None = None

    @property
    def npages(self) -> int:
        return self.allocator.npages

    @property
    def free(self) -> int:
        return self.allocator.free

    async def alloc(self, n: int) -> list[int]:
        if self._closed is not None:
            raise self._closed
        if n > self.allocator.npages:
            raise ValueError(f"{n} pages requested from a pool of {self.allocator.npages}")
        if not self._waiters:
            pages = self.allocator.alloc(n)
            if pages is not None:
                return pages
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            return await fut
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            raise

    def try_alloc(self, n: int) -> list[int] | None:
        if self._waiters or self._closed is not None:
            return None
        return self.allocator.alloc(n)

    def release(self, pages: list[int]) -> None:
        self.allocator.release(pages)
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            got = self.allocator.alloc(n)
            if got is None:
                break
            self._waiters.popleft()
            fut.set_result(got)

    def close(self, exc: BaseException) -> None:
        """Fail every waiter (and later allocations) with ``exc``."""
        self._closed = exc
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


__all__ = ["PageAllocator", "PagePool"]
