"""blkback's data path: serve one blkif ring from a [`BlockSource`][aioxen.blk.source.BlockSource].

Theory of operation
-------------------
A `RingServer` takes batches of requests from an
[`AsyncBackRing`][aioxen.rings.aio.AsyncBackRing] and answers every one of them, in whatever order
they finish:

1. **Validate** (`aioxen.blk.blkif.check_request`): operation, segment count and
   bounds, sector range, alignment, features offered, read-only.  A bad request gets
   ``BLKIF_RSP_ERROR`` (or ``BLKIF_RSP_EOPNOTSUPP`` for operations not offered) and one
   log line; the ring keeps being served.
2. **Map** the data pages.  With persistent grants each grant ref is mapped once, on first
   use, and stays mapped until disconnect (``feature-persistent``); refs first seen
   together are mapped in one call, so they sit next to each other and adjacent segments
   become one I/O vector.  Without persistent grants the request's refs are mapped in one
   call (writable only for reads, which write into them) and unmapped *before* the response
   is published, as the frontend may revoke the grants once it sees the answer.  Indirect
   segment pages are copied out once and decoded from the copy.
3. **Run**: ``preadv``/``pwritev`` go straight between the file and the mapped pages.  When
   the source can complete the I/O without blocking (tmpfs image, page-cache hit, memory
   source) it runs inline and the response is written in the same loop iteration — no task
   is created; otherwise a task runs it, at most ``queue_depth`` at a time.  FLUSH and
   BARRIER ``fdatasync`` after their data, so every acknowledged write is durable once a
   flush is acknowledged.  A BARRIER also orders: it starts after every earlier request has
   finished, and later requests wait for it.  DISCARD punches a hole (``secure``: zeroes
   the range durably first).
4. **Respond**: responses of one loop iteration are pushed together, one notify at most.

A grant ref that fails to map, or an I/O error, fails that request alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aioxen.blk.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    MAX_INDIRECT_SEGMENTS,
    OP_NAMES,
    PAGE_SIZE,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    BadRequest,
    BlkifAnyRequest,
    BlkifRequest,
    BlkifResponse,
    BlkifSegment,
    BlkIO,
    Limits,
    check_indirect_segments,
    check_request,
    response_operation,
)
from aioxen.blk.source import BlockSource
from aioxen.platforms.base import Mapping, Platform
from aioxen.rings.aio import AsyncBackRing

log = logging.getLogger("aioxen.blk.back")

PUBLISH_EVERY = 32
"""Responses are published (pushed, notifying if the frontend waits) at least every this
many, so that both ends work at the same time instead of taking turns by batches."""
LOG_FIRST_ERRORS = 50
"""Bad requests logged individually per ring before the log is rate-limited."""


@dataclass
class BackendConfig:
    """What a blkback offers.  Feature flags are also limited by what the source can do."""

    max_indirect_segments: int = 256
    max_ring_page_order: int = 4
    persistent: bool = True
    max_queues: int = 4
    queue_depth: int = 64
    max_persistent_grants: int = 16384
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    discard_secure: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.max_indirect_segments <= MAX_INDIRECT_SEGMENTS:
            raise ValueError(
                f"max_indirect_segments {self.max_indirect_segments} out of range "
                f"0..{MAX_INDIRECT_SEGMENTS}"
            )
        if not 0 <= self.max_ring_page_order <= 4:
            raise ValueError("max_ring_page_order must be 0..4")
        if self.max_queues < 1 or self.queue_depth < 1:
            raise ValueError("max_queues and queue_depth must be positive")


def limits_for(source: BlockSource, config: BackendConfig) -> Limits:
    discard = config.discard and source.can_discard and not source.readonly
    return Limits(
        sectors=source.size // SECTOR_SIZE,
        sector_size=source.sector_size,
        readonly=source.readonly,
        flush=config.flush,
        barrier=config.barrier,
        discard=discard,
        discard_secure=discard and config.discard_secure,
        max_indirect_segments=config.max_indirect_segments,
    )


@dataclass
class RingStats:
    requests: int = 0
    inline: int = 0
    errors: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    mapped_persistent: int = 0


class _Pages:
    """Mapped pages of one request: per segment ``(buffer, page index)``; ``temps`` are
    mappings to close when the request finishes."""

    __slots__ = ("locs", "temps")

    def __init__(self, locs: list[tuple[memoryview, int]], temps: list[Mapping]) -> None:
        self.locs = locs
        self.temps = temps


def iovecs(segs: Sequence[BlkifSegment], locs: list[tuple[memoryview, int]]) -> list[memoryview]:
    """I/O vectors for ``segs``; segments on consecutive pages of one mapping that meet at
    a page boundary are joined into one vector."""
    out: list[memoryview] = []
    run_buf: memoryview | None = None
    run_start = run_end = 0
    for s, (buf, page) in zip(segs, locs, strict=True):
        start = (page << 12) + (s[1] << 9)
        end = (page << 12) + ((s[2] + 1) << 9)
        if run_buf is buf and run_end == start:
            run_end = end
            continue
        if run_buf is not None:
            out.append(run_buf[run_start:run_end])
        run_buf, run_start, run_end = buf, start, end
    if run_buf is not None:
        out.append(run_buf[run_start:run_end])
    return out


def iovecs_full(locs: list[tuple[memoryview, int]]) -> list[memoryview]:
    """I/O vectors for whole-page segments (the common indirect case)."""
    buf0, first = locs[0]
    n = len(locs)
    if locs[-1] == (buf0, first + n - 1) and locs == [(buf0, first + i) for i in range(n)]:
        return [buf0[first << 12 : (first + n) << 12]]  # one mapping, in order: one vector
    out: list[memoryview] = []
    run_buf, run_start, run_end = buf0, first, first + 1
    for buf, page in locs[1:]:
        if buf is run_buf and page == run_end:
            run_end += 1
            continue
        out.append(run_buf[run_start << 12 : run_end << 12])
        run_buf, run_start, run_end = buf, page, page + 1
    out.append(run_buf[run_start << 12 : run_end << 12])
    return out


class RingServer:
    """Serve one ring (one queue) of one frontend."""

    def __init__(
        self,
        platform: Platform,
        frontend_domid: int,
        ring: AsyncBackRing[BlkifAnyRequest, BlkifResponse],
        source: BlockSource,
        limits: Limits,
        *,
        persistent: bool = False,
        queue_depth: int = 64,
        max_persistent_grants: int = 16384,
        name: str | None = None,
    ) -> None:
        self.platform = platform
        self.domid = frontend_domid
        self.ring = ring
        self.source = source
        self.limits = limits
        self.persistent = persistent
        self.max_persistent = max_persistent_grants
        self.name = name or f"blkback(dom{frontend_domid})"
        self.stats = RingStats()
        self._sem = asyncio.Semaphore(queue_depth)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ordered: deque[BlkIO] = deque()
        self._pump: asyncio.Task[None] | None = None
        # persistent grants: gref -> (mapping buffer, page index)
        self._cache: dict[int, tuple[memoryview, int]] = {}
        self._maps: list[Mapping] = []
        self._responses: list[BlkifResponse] = []
        self._in_batch = False
        self._flush_scheduled = False
        self._step = limits.sector_size // SECTOR_SIZE

    # ------------------------------------------------------------------ serving loop

    async def run(self) -> None:
        """Serve until the ring closes; in-flight I/O is finished, not abandoned."""
        try:
            async for batch in self.ring.batches():
                self._in_batch = True
                try:
                    for req in batch:
                        self._accept(req)
                finally:
                    self._in_batch = False
                    self._flush_responses()
        finally:
            if self._pump is not None:
                self._pump.cancel()
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            self._flush_responses()
            self.release()

    def release(self) -> None:
        """Unmap every persistently mapped page (after the ring stopped).

        A slice of a mapping that a finished request's traceback (a reference cycle) still
        holds pins it: collect such garbage once and retry before giving up on a mapping."""
        self._cache.clear()
        busy: list[Mapping] = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                busy.append(m)
        if busy:
            gc.collect()
            for m in busy:
                try:
                    m.close()
                except BufferError:
                    log.error("%s: %r is still in use; left mapped", self.name, m)
        self._maps.clear()

    def _accept(self, req: BlkifAnyRequest) -> None:
        self.stats.requests += 1
        if (
            isinstance(req, BlkifRequest)
            and req.operation <= BLKIF_OP_WRITE
            and not self._ordered
            and self._fast_rw(req)
        ):
            return
        try:
            io = check_request(req, self.limits)
        except BadRequest as exc:
            self._refuse(req.id, response_operation(req), exc, req.operation)
            return
        if self._ordered or io.kind == BLKIF_OP_WRITE_BARRIER:
            self._ordered.append(io)
            if self._pump is None:
                self._pump = asyncio.ensure_future(self._run_ordered())
            return
        self._start(io)

    def _fast_rw(self, req: BlkifRequest) -> bool:
        """Direct READ/WRITE whose checks pass and whose I/O completes without blocking:
        done here, no task.  False: take the general path (which also reports errors)."""
        op, n, segs, sector = req.operation, req.nr_segments, req.seg, req.sector_number
        lim = self.limits
        if not 0 < n <= BLKIF_MAX_SEGMENTS_PER_REQUEST or (op and lim.readonly):
            return False
        step = self._step
        total = 0
        for s in segs:
            first, last = s[1], s[2]
            if last > 7 or first > last:
                return False
            if step > 1 and (first % step or (last + 1) % step):
                return False
            total += last - first + 1
        if sector + total > lim.sectors or (step > 1 and sector % step):
            return False
        locs: list[tuple[memoryview, int]] | None = None
        temps: list[Mapping] = []
        if self.persistent:
            cache = self._cache
            try:
                locs = [cache[s[0]] for s in segs]
            except KeyError:
                locs = None
        if locs is None:
            return False
        vecs = iovecs(segs, locs)
        offset = sector << 9
        try:
            if op == BLKIF_OP_READ:
                done = self.source.readv_nowait(offset, vecs)
            else:
                done = self.source.writev_nowait(offset, vecs)
        except Exception:
            return False  # the general path retries and reports the error
        if not done:
            io = BlkIO(req.id, op, op, sector, total, segs)
            self._spawn(self._finish_rw(io, _Pages(locs, temps), vecs))
            return True
        self.stats.inline += 1
        self._respond(req.id, op, BLKIF_RSP_OKAY)
        return True

    def _refuse(self, ident: int, rsp_op: int, exc: BadRequest, op: int) -> None:
        self.stats.errors += 1
        n = self.stats.errors
        if n <= LOG_FIRST_ERRORS or n % 1000 == 0:
            log.warning(
                "%s: refusing %s request id %d (status %d): %s%s",
                self.name, OP_NAMES.get(op, f"op-{op}"), ident, exc.status, exc.reason,
                f" [{n} refused so far]" if n > LOG_FIRST_ERRORS else "",
            )  # fmt: skip
        self._respond(ident, rsp_op, exc.status)

    def _respond(self, ident: int, rsp_op: int, status: int) -> None:
        rsps = self._responses
        rsps.append(tuple.__new__(BlkifResponse, (ident, rsp_op, status)))
        if len(rsps) >= PUBLISH_EVERY:
            # publish now: the frontend starts on these while we serve the rest
            self._flush_responses()
            return
        if not self._in_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_responses)

    def _flush_responses(self) -> None:
        """Write the queued responses into the ring and publish them now."""
        self._flush_scheduled = False
        rsps, self._responses = self._responses, []
        if rsps and not self.ring.closed:
            self.ring.respond_many(rsps)
            self.ring.flush()

    def _start(self, io: BlkIO) -> None:
        if io.kind in (BLKIF_OP_READ, BLKIF_OP_WRITE) and not io.indirect_grefs:
            try:
                pages = self._map([sg[0] for sg in io.segments], io.kind == BLKIF_OP_READ)
            except BadRequest as exc:
                self._refuse(io.id, io.rsp_operation, exc, io.kind)
                return
            vecs = iovecs(io.segments, pages.locs)
            try:
                done = (
                    self.source.readv_nowait(io.sector * SECTOR_SIZE, vecs)
                    if io.kind == BLKIF_OP_READ
                    else self.source.writev_nowait(io.sector * SECTOR_SIZE, vecs)
                )
            except Exception as exc:
                self._unmap(pages, vecs)
                self._io_failed(io, exc)
                return
            if done:
                self._unmap(pages, vecs)
                self.stats.inline += 1
                self._respond(io.id, io.rsp_operation, BLKIF_RSP_OKAY)
                return
            self._spawn(self._finish_rw(io, pages, vecs))
            return
        self._spawn(self._execute(io))

    def _spawn(self, coro: Any) -> None:
        self._inflight += 1
        self._idle.clear()
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: request task crashed: %r", self.name, task.exception())

    async def _run_ordered(self) -> None:
        try:
            while self._ordered:
                io = self._ordered[0]
                if io.kind == BLKIF_OP_WRITE_BARRIER:
                    await self._idle.wait()
                    self._ordered.popleft()
                    self._inflight += 1
                    self._idle.clear()
                    try:
                        await self._execute(io)
                    finally:
                        self._inflight -= 1
                        if self._inflight == 0:
                            self._idle.set()
                else:
                    self._ordered.popleft()
                    self._start(io)
        finally:
            self._pump = None

    # ------------------------------------------------------------------ grant mapping

    def _map_refs(self, refs: list[int], writable: bool) -> Mapping:
        try:
            return self.platform.grants.map(self.domid, refs, writable=writable)
        except (FileNotFoundError, PermissionError, ValueError, OSError) as exc:
            raise BadRequest(
                BLKIF_RSP_ERROR,
                f"grant refs {_refs_str(refs)} of domain {self.domid} do not map: {exc}",
            ) from exc

    def _map(self, grefs: list[int], device_writes: bool) -> _Pages:
        """Map the pages ``grefs``; ``device_writes``: the backend writes into them."""
        if self.persistent:
            cache = self._cache
            missing = list(dict.fromkeys(g for g in grefs if g not in cache))
            if missing and len(cache) + len(missing) <= self.max_persistent:
                try:
                    m: Mapping | None = self._map_refs(missing, True)
                except BadRequest:
                    m = None  # e.g. read-only grants: fall back to a one-off mapping
                if m is not None:
                    buf = m.buf
                    self._maps.append(m)
                    for i, g in enumerate(missing):
                        cache[g] = (buf, i)
                    self.stats.mapped_persistent = len(cache)
            try:
                return _Pages([cache[g] for g in grefs], [])
            except KeyError:
                pass
        unique = list(dict.fromkeys(grefs))
        m = self._map_refs(unique, device_writes)
        buf = m.buf
        index = {g: i for i, g in enumerate(unique)}
        return _Pages([(buf, index[g]) for g in grefs], [m])

    def _unmap(self, pages: _Pages, vecs: list[memoryview]) -> None:
        for v in vecs:
            v.release()  # slices pin the mapping (persistent ones too, until released)
        if not pages.temps:
            return
        pages.locs.clear()
        for m in pages.temps:
            m.close()
        pages.temps.clear()

    def _indirect_segments(self, io: BlkIO) -> None:
        """Copy and decode the indirect segment pages of ``io`` (then check them)."""
        refs = list(io.indirect_grefs)
        nbytes = io.nr_indirect_segments * SEGMENT_SIZE
        if self.persistent:
            pages = self._map(refs, False)  # indirect pages persist too (as in Linux)
            try:
                data = b"".join(
                    [bytes(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for buf, i in pages.locs]
                )[:nbytes]
            finally:
                self._unmap(pages, [])
        else:
            m = self._map_refs(refs, False)
            try:
                data = bytes(m.buf[:nbytes])
            finally:
                m.close()
        check_indirect_segments(io, data, self.limits)

    # ------------------------------------------------------------------ execution

    def _io_failed(self, io: BlkIO, exc: BaseException) -> None:
        self.stats.errors += 1
        log.warning(
            "%s: %s request id %d at sector %d (%d sectors) failed: %r",
            self.name, OP_NAMES.get(io.kind, io.kind), io.id, io.sector, io.nr_sectors, exc,
        )  # fmt: skip
        self._respond(io.id, io.rsp_operation, BLKIF_RSP_ERROR)

    async def _finish_rw(self, io: BlkIO, pages: _Pages, vecs: list[memoryview]) -> None:
        try:
            async with self._sem:
                if io.kind == BLKIF_OP_READ:
                    await self.source.readv(io.sector * SECTOR_SIZE, vecs)
                else:
                    await self.source.writev(io.sector * SECTOR_SIZE, vecs)
        except Exception as exc:
            self._unmap(pages, vecs)
            self._io_failed(io, exc)
            return
        self._unmap(pages, vecs)
        self._respond(io.id, io.rsp_operation, BLKIF_RSP_OKAY)

    async def _execute(self, io: BlkIO) -> None:
        """Run a request that needs more than one step (indirect, flush, barrier, discard)."""
        name = OP_NAMES.get(io.kind, str(io.kind))
        self.stats.ops[name] = self.stats.ops.get(name, 0) + 1
        try:
            if io.indirect_grefs:
                self._indirect_segments(io)
            pages: _Pages | None = None
            vecs: list[memoryview] = []
            if io.full_grefs is not None:
                pages = self._map(io.full_grefs, io.kind == BLKIF_OP_READ)
                vecs = iovecs_full(pages.locs)
            elif io.segments:
                pages = self._map([sg[0] for sg in io.segments], io.kind == BLKIF_OP_READ)
                vecs = iovecs(io.segments, pages.locs)
        except BadRequest as exc:
            self._refuse(io.id, io.rsp_operation, exc, io.kind)
            return
        try:
            async with self._sem:
                offset = io.sector * SECTOR_SIZE
                if io.kind == BLKIF_OP_READ:
                    await self.source.readv(offset, vecs)
                elif io.kind == BLKIF_OP_WRITE:
                    await self.source.writev(offset, vecs)
                elif io.kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                    if vecs:
                        await self.source.writev(offset, vecs)
                    await self.source.flush()
                elif io.kind == BLKIF_OP_DISCARD:
                    await self.source.discard(offset, io.nr_sectors * SECTOR_SIZE, secure=io.secure)
        except Exception as exc:
            if pages is not None:
                self._unmap(pages, vecs)
            self._io_failed(io, exc)
            return
        if pages is not None:
            self._unmap(pages, vecs)
        self._respond(io.id, io.rsp_operation, BLKIF_RSP_OKAY)


def _refs_str(refs: list[int]) -> str:
    if len(refs) <= 8:
        return ",".join(map(str, refs))
    return ",".join(map(str, refs[:8])) + f",... ({len(refs)} refs)"


__all__ = ["BackendConfig", "RingServer", "RingStats", "iovecs", "limits_for"]
