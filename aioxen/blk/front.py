"""blkfront's data path: an async block device over one or more blkif rings.

Theory of operation
-------------------
[`BlkFront`][] implements [`BlockDevice`][aioxen.blk.device.BlockDevice].  At connect time it
shares a fixed *pool* of data pages (plus one set of indirect-descriptor pages per ring
slot) with the backend and creates its rings ([`AsyncFrontRing`][aioxen.rings.aio.AsyncFrontRing],
one per queue).  The xenbus handshake that advertises them lives in
[`aioxen.blk.vbd`][]; this module is the I/O engine.

A call such as ``await dev.read(sector, count)``:

1. is validated (range, alignment, read-only) and converted to wire sectors (512 bytes);
2. is cut into chunks of at most ``max_segments`` pages (`aioxen.blk.split.split`):
   11 for direct requests, or the negotiated indirect limit;
3. each chunk takes a run of pool pages (waiting if the pool is exhausted), writes copy
   their data in, and the chunk goes to its queue (with several queues, 1 MiB stripes of
   the disk map to the queues in turn).  If that ring has a
   free slot the request is encoded at once and staged: the direct requests of one loop
   iteration go to the ring together (one
   [`submit_many_nowait`][aioxen.rings.aio.AsyncFrontRing.submit_many_nowait], one push, at most one
   notify); otherwise the chunk waits in the queue's backlog, where a drain
   task merges neighbouring chunks that continue each other on disk into one request
   (`aioxen.blk.split.merge_runs`) as slots free up.  A flush or barrier is sent
   after the requests staged before it;
4. requests are encoded straight to slot bytes (`RequestEncoder`,
   with each pool page's full-page segment encoded once); requests with more than 11
   segments become ``BLKIF_OP_INDIRECT`` requests whose descriptors are written into that
   slot's indirect pages;
5. when a response arrives, reads copy their data out of the pool, the pages return to
   the pool and the caller's future resolves (``OSError(EIO)`` for ``BLKIF_RSP_ERROR``,
   ``OSError(EOPNOTSUPP)`` for ``BLKIF_RSP_EOPNOTSUPP``).

Pages belong to an I/O until its response arrives, even if the caller is cancelled —
the backend may still be writing into them.  Because the same grant refs are reused for
every request, a backend offering ``feature-persistent`` maps each of them only once.

Size: ~850 lines, one over the project's ~800 guide, kept in one module on purpose: the
pool, the per-queue batching and the response path share ``BlkFront``'s state and are
read together as one I/O engine; the pure negotiation (``negotiate``) is the only part
that could leave, and it is 80 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioxen.blk.blkif import (
    ABI_X86_64,
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    MAX_INDIRECT_SEGMENTS,
    OP_NAMES,
    PAGE_SIZE,
    SECTOR_SIZE,
    VDISK_READONLY,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    RequestEncoder,
    encoded_request_format,
    indirect_pages_for,
    response_format,
)
from aioxen.blk.device import check_io
from aioxen.blk.pool import PagePool
from aioxen.blk.split import merge_runs, split
from aioxen.platforms.base import Platform, Share
from aioxen.rings.aio import AsyncFrontRing

log = logging.getLogger("aioxen.blk.front")

MERGEABLE = frozenset({BLKIF_OP_READ, BLKIF_OP_WRITE})
PAGE_SHIFT = 12
_SEG_ENC = RequestEncoder.segment
DEFAULT_POOL_PAGES = 2048
STRIPE_SHIFT = 11
"""Multi-queue striping: wire sectors ``>> 11`` (1 MiB) pick the queue."""


class BlkError(OSError):
    """A blkif request failed (the backend answered ``BLKIF_RSP_ERROR``/``EOPNOTSUPP``)."""


@dataclass
class BackendInfo:
    """What the backend advertised (read from its xenstore directory)."""

    sectors: int
    """Capacity in 512-byte units."""
    sector_size: int = 512
    physical_sector_size: int = 512
    info: int = 0
    mode: str = "w"
    flush: bool = False
    barrier: bool = False
    discard: bool = False
    discard_secure: bool = False
    discard_granularity: int = 0
    discard_alignment: int = 0
    persistent: bool = False
    max_indirect_segments: int = 0
    max_ring_page_order: int = 0
    max_queues: int = 1

    @property
    def readonly(self) -> bool:
        return bool(self.info & VDISK_READONLY) or self.mode == "r"


@dataclass
class FrontendConfig:
    """What the frontend asks for (each limited by what the backend offers)."""

    ring_page_order: int = 2
    queues: int = 1
    max_indirect_segments: int = 256
    pool_pages: int | None = None
    """Granted data pages (``None``: 2048 = 8 MiB, or 5/8 of the platform's
    [`grant_share_limit`][aioxen.platforms.base.Platform.grant_share_limit] if it has one: 640 on
    ``xen``, where Linux's gntalloc lets a process grant at most 1024 pages by default)."""

    def resolved_pool_pages(self, platform: Platform) -> int:
        if self.pool_pages is not None:
            return self.pool_pages
        limit = platform.grant_share_limit  # stay well under a per-process grant limit
        return DEFAULT_POOL_PAGES if limit is None else min(DEFAULT_POOL_PAGES, limit * 5 // 8)

    persistent: bool = True


@dataclass
class Negotiated:
    """The outcome of the handshake, as the frontend uses it."""

    ring_page_order: int
    queues: int
    max_segments: int
    indirect: bool
    persistent: bool
    abi: str = ABI_X86_64


def negotiate(backend: BackendInfo, config: FrontendConfig) -> Negotiated:
    order = max(0, min(config.ring_page_order, backend.max_ring_page_order))
    queues = max(1, min(config.queues, backend.max_queues))
    ind = min(config.max_indirect_segments, backend.max_indirect_segments, MAX_INDIRECT_SEGMENTS)
    indirect = ind > BLKIF_MAX_SEGMENTS_PER_REQUEST
    max_segments = ind if indirect else BLKIF_MAX_SEGMENTS_PER_REQUEST
    if config.pool_pages is not None:
        max_segments = min(max_segments, config.pool_pages)
    return Negotiated(
        ring_page_order=order,
        queues=queues,
        max_segments=max_segments,
        indirect=indirect,
        persistent=config.persistent and backend.persistent,
    )


class _Op:
    """One chunk of I/O (or a flush/discard) on its way through a queue."""

    __slots__ = (
        "cancelled",
        "future",
        "kind",
        "nbytes",
        "npages",
        "nsectors",
        "pages",
        "sector",
        "secure",
        "view",
    )  # fmt: skip

    def __init__(
        self,
        kind: int,
        sector: int,
        nbytes: int,
        pages: list[int],
        view: memoryview | None,
        future: asyncio.Future[None],
    ) -> None:
        self.kind = kind
        self.sector = sector
        self.nbytes = nbytes
        self.pages = pages
        self.npages = len(pages)
        self.view = view
        self.future = future
        self.cancelled = False
        self.nsectors = 0
        self.secure = False


@dataclass
class _Queue:
    index: int
    ring: AsyncFrontRing[bytes, BlkifResponse]
    capacity: int
    ind_share: Share | None
    ind_pages: int
    ind_free: list[int]
    inflight: int = 0
    backlog: deque[_Op] = field(default_factory=deque)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    drainer: asyncio.Task[None] | None = None
    outbox: list[bytes] = field(default_factory=list)  # encoded, counted in inflight
    outops: list[_Op] = field(default_factory=list)  # their ops


@dataclass
class FrontStats:
    requests: int = 0
    indirect: int = 0
    merged: int = 0
    errors: int = 0


class BlkFront:
    """An async block device backed by a blkback in ``backend_domid``.

    Build it with [`create`][] (which shares the pool and creates the rings), advertise
    [`queue_keys`][] to the backend, and [`close`][] it when done.  Sectors in the API
    are logical sectors of `sector_size` bytes.
    """

    def __init__(
        self,
        platform: Platform,
        backend_domid: int,
        backend: BackendInfo,
        config: FrontendConfig | None = None,
        *,
        handle: int = 0,
        name: str | None = None,
    ) -> None:
        """Prefer [`create`][]; a bare instance has no rings until `open`."""
        self.platform = platform
        self.backend_domid = backend_domid
        self.backend = backend
        self.config = config = config or FrontendConfig()
        self.handle = handle
        self.name = name or f"blkfront(dom{backend_domid}/{handle})"
        self.negotiated = negotiate(backend, config)
        self.stats = FrontStats()
        self._closed = False
        self._queues: list[_Queue] = []
        self._share: Share | None = None
        self._data: memoryview | None = None
        self._grefs: list[int] = []
        pool_pages = config.resolved_pool_pages(platform)
        self.negotiated.max_segments = min(self.negotiated.max_segments, pool_pages)
        self.pool = PagePool(pool_pages)
        self._max_bytes = self.negotiated.max_segments * PAGE_SIZE
        self._loop = asyncio.get_running_loop()
        self._enc = RequestEncoder(self.negotiated.abi, handle)
        self._full_segs: list[bytes] = []

    @classmethod
    async def create(
        cls,
        platform: Platform,
        backend_domid: int,
        backend: BackendInfo,
        config: FrontendConfig | None = None,
        *,
        handle: int = 0,
        name: str | None = None,
        ring_start: int = 0,
    ) -> BlkFront:
        """Share the data pool and create the rings (not yet advertised)."""
        self = cls(platform, backend_domid, backend, config, handle=handle, name=name)
        await self.open(ring_start=ring_start)
        if backend.sectors:
            try:
                self.configure(backend)
            except BaseException:
                await self.close()
                raise
        return self

    async def open(self, *, ring_start: int = 0) -> None:
        neg = self.negotiated
        platform, domid = self.platform, self.backend_domid
        try:
            self._share = platform.grants.share(domid, self.pool.npages)
            self._data = self._share.buf
            self._grefs = self._share.refs
            req_fmt = encoded_request_format(neg.abi)
            rsp_fmt = response_format(neg.abi)
            self._enc = RequestEncoder(neg.abi, self.handle)
            self._full_segs = [_SEG_ENC(g, 0, 7) for g in self._grefs]
            for q in range(neg.queues):
                ring: AsyncFrontRing[bytes, BlkifResponse] = (
                    await AsyncFrontRing.create(
                        platform, domid, req_fmt, rsp_fmt,
                        order=neg.ring_page_order, start=ring_start,
                        name=f"{self.name}/q{q}",
                        busy_poll=0,  # I/O completes in the back end's threads: no polling
                    )
                )  # fmt: skip
                cap = ring.ring.nr_ents
                self._queues.append(_Queue(q, ring, cap, None, 0, list(range(cap - 1, -1, -1))))
        except BaseException:
            self._release()
            raise

    def configure(self, backend: BackendInfo) -> None:
        """Adopt the backend's device properties and data-path features (read once it is
        ``Connected``): size, sector sizes, flush/discard, indirect segments, persistence.
        Allocates the indirect descriptor pages if indirect requests will be used."""
        if self._share is None:
            raise RuntimeError(f"{self.name}: configure() before open()")
        if backend.sector_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"{self.name}: backend sector-size {backend.sector_size}")
        old = self.negotiated
        neg = negotiate(backend, self.config)
        neg.ring_page_order, neg.queues, neg.abi = old.ring_page_order, old.queues, old.abi
        neg.max_segments = min(neg.max_segments, self.pool.npages)
        self.backend = backend
        self.negotiated = neg
        self._max_bytes = neg.max_segments * PAGE_SIZE
        ind_pages = indirect_pages_for(neg.max_segments) if neg.indirect else 0
        for q in self._queues:
            if q.ind_share is not None and q.ind_pages >= ind_pages:
                continue
            if q.ind_share is not None:
                q.ind_share.close()
                q.ind_share = None
            q.ind_pages = ind_pages
            if ind_pages:
                q.ind_share = self.platform.grants.share(self.backend_domid, q.capacity * ind_pages)

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return self.backend.sectors * SECTOR_SIZE

    @property
    def sector_size(self) -> int:
        return self.backend.sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.backend.physical_sector_size

    @property
    def readonly(self) -> bool:
        return self.backend.readonly

    @property
    def can_flush(self) -> bool:
        return self.backend.flush or self.backend.barrier

    @property
    def can_discard(self) -> bool:
        return self.backend.discard and not self.readonly

    @property
    def max_request_bytes(self) -> int:
        return self.negotiated.max_segments * PAGE_SIZE

    @property
    def in_flight(self) -> int:
        return sum(q.inflight + len(q.backlog) for q in self._queues)

    def queue_keys(self) -> list[dict[str, str]]:
        """Per queue: the ring/event-channel keys to advertise (``ring-ref`` or
        ``ring-page-order`` + ``ring-refN``, and ``event-channel``)."""
        out = []
        for q in self._queues:
            keys: dict[str, str] = {"event-channel": str(q.ring.port)}
            refs = q.ring.refs
            if self.negotiated.ring_page_order == 0:
                keys["ring-ref"] = str(refs[0])
            else:
                for i, r in enumerate(refs):
                    keys[f"ring-ref{i}"] = str(r)
            out.append(keys)
        return out

    # ------------------------------------------------------------------ public I/O

    async def read(self, sector: int, count: int) -> bytes:
        buf = bytearray(count * self.backend.sector_size)
        await self.read_into(sector, buf)
        return bytes(buf)

    async def read_into(self, sector: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        ss = self.backend.sector_size
        if n % ss or sector < 0 or sector * ss + n > self.backend.sectors * SECTOR_SIZE:
            check_io(self, sector, n)
        if n == 0:
            return
        if n <= self._max_bytes:
            await self._io(BLKIF_OP_READ, sector * ss >> 9, view)
        else:
            await self._transfer(BLKIF_OP_READ, sector * ss >> 9, view)

    async def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        ss = self.backend.sector_size
        if (
            n % ss
            or sector < 0
            or sector * ss + n > self.backend.sectors * SECTOR_SIZE
            or self.backend.readonly
        ):
            check_io(self, sector, n, write=True)
        if n == 0:
            return
        if n <= self._max_bytes:
            await self._io(BLKIF_OP_WRITE, sector * ss >> 9, view)
        else:
            await self._transfer(BLKIF_OP_WRITE, sector * ss >> 9, view)

    async def flush(self) -> None:
        """Make every completed write durable (FLUSH_DISKCACHE, else a WRITE_BARRIER)."""
        if self.backend.flush:
            kind = BLKIF_OP_FLUSH_DISKCACHE
        elif self.backend.barrier:
            kind = BLKIF_OP_WRITE_BARRIER
        else:
            return
        await self._submit_op(_Op(kind, 0, 0, [], None, self._new_future()))

    async def discard(self, sector: int, count: int, *, secure: bool = False) -> None:
        """Release ``count`` sectors (``secure``: ask the backend to erase them)."""
        off = check_io(self, sector, count * self.sector_size, write=True)
        if not self.can_discard:
            raise OSError(errno.EOPNOTSUPP, f"{self.name}: the backend offers no discard")
        if count == 0:
            return
        op = _Op(BLKIF_OP_DISCARD, off // SECTOR_SIZE, 0, [], None, self._new_future())
        op.nsectors = count * self.sector_size // SECTOR_SIZE
        op.secure = secure and self.backend.discard_secure
        await self._submit_op(op)

    # ------------------------------------------------------------------ engine

    def _new_future(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def _transfer(self, kind: int, wire_sector: int, view: memoryview) -> None:
        chunks = split(wire_sector, len(view), self.negotiated.max_segments)
        results = await asyncio.gather(
            *(self._io(kind, c.sector, view[c.offset : c.offset + c.nbytes]) for c in chunks),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _io(self, kind: int, wire_sector: int, view: memoryview) -> None:
        """One chunk (at most ``max_segments`` pages): stage, submit, wait."""
        if self._closed:
            raise ConnectionResetError(f"{self.name} is closed")
        n = len(view)
        npages = (n + PAGE_SIZE - 1) >> PAGE_SHIFT
        pages = self.pool.try_alloc(npages)
        if pages is None:
            pages = await self.pool.alloc(npages)
        if kind == BLKIF_OP_WRITE:
            self._copy_in(pages, view)
            op = _Op(kind, wire_sector, n, pages, None, self._loop.create_future())
        else:
            op = _Op(kind, wire_sector, n, pages, view, self._loop.create_future())
        qs = self._queues
        q = qs[0] if len(qs) == 1 else qs[(wire_sector >> STRIPE_SHIFT) % len(qs)]
        if npages <= BLKIF_MAX_SEGMENTS_PER_REQUEST and q.inflight < q.capacity and not q.backlog:
            # fast path: a direct request for one op, sent right away
            full = self._full_segs
            rest = n & (PAGE_SIZE - 1)
            if rest:
                segs = [full[p] for p in pages[:-1]]
                segs.append(_SEG_ENC(self._grefs[pages[-1]], 0, (rest >> 9) - 1))
            else:
                segs = [full[p] for p in pages]
            q.inflight += 1
            self.stats.requests += 1
            q.outbox.append(self._enc.direct(kind, wire_sector, segs))
            q.outops.append(op)
            if len(q.outops) == 1:
                self._loop.call_soon(self._send_outbox, q)
        else:
            q.backlog.append(op)
            self._wake_drainer(q)
        try:
            await op.future
        except asyncio.CancelledError:
            op.cancelled = True  # pages stay reserved until the response (or until drained)
            raise

    def _send_outbox(self, q: _Queue) -> None:
        """Submit the direct requests of this loop iteration to ``q``'s ring together."""
        reqs, ops = q.outbox, q.outops
        if not ops:
            return
        q.outbox, q.outops = [], []
        try:
            futures = q.ring.submit_many_nowait(reqs)
        except BaseException as exc:  # the ring shut down
            q.inflight -= len(ops)
            for op in ops:
                self._fail(op, _fresh(exc))
            return
        q.ring.flush()  # publish now: this is already the end of the batch
        done = self._completed_one
        for fut, op in zip(futures, ops):  # noqa: B905
            fut.add_done_callback(functools.partial(done, q, op))
        if len(futures) < len(ops):  # no free slot after all: the backlog takes the rest
            rest = ops[len(futures) :]
            q.inflight -= len(rest)
            q.backlog.extendleft(reversed(rest))
            self._wake_drainer(q)

    async def _submit_op(self, op: _Op) -> None:
        if self._closed:
            if op.pages:
                self.pool.release(op.pages)
            raise ConnectionResetError(f"{self.name} is closed")
        qs = self._queues
        q = qs[0] if len(qs) == 1 else qs[(op.sector >> STRIPE_SHIFT) % len(qs)]
        if q.inflight < q.capacity and not q.backlog:
            await self._send(q, [op])
        else:
            q.backlog.append(op)
            self._wake_drainer(q)
        try:
            await op.future
        except asyncio.CancelledError:
            op.cancelled = True  # pages stay reserved until the response (or until drained)
            raise

    def _wake_drainer(self, q: _Queue) -> None:
        if q.drainer is None or q.drainer.done():
            q.drainer = asyncio.ensure_future(self._drain(q))
        else:
            q.room.set()

    async def _drain(self, q: _Queue) -> None:
        while q.backlog and not self._closed:
            if q.inflight >= q.capacity:
                q.room.clear()
                await q.room.wait()
                continue
            while q.backlog and q.backlog[0].cancelled:
                self._drop(q.backlog.popleft())
            if not q.backlog:
                break
            max_segments = self.negotiated.max_segments
            group = merge_runs(_head(q.backlog, 64), max_segments, MERGEABLE)[0]
            ops = [q.backlog.popleft() for _ in range(group)]
            if len(ops) > 1:
                self.stats.merged += len(ops) - 1
            await self._send(q, ops)

    def _drop(self, op: _Op) -> None:
        if op.pages:
            self.pool.release(op.pages)
            op.pages = []
        if not op.future.done():
            op.future.cancel()

    def _segments(self, ops: list[_Op]) -> list[bytes]:
        full, grefs = self._full_segs, self._grefs
        segs: list[bytes] = []
        for op in ops:
            pages = op.pages
            rest = op.nbytes & (PAGE_SIZE - 1)
            if rest:
                segs += [full[p] for p in pages[:-1]]
                segs.append(_SEG_ENC(grefs[pages[-1]], 0, (rest >> 9) - 1))
            else:
                segs += [full[p] for p in pages]
        return segs

    def _build(self, q: _Queue, ops: list[_Op]) -> tuple[bytes, int | None]:
        head = ops[0]
        kind = head.kind
        if kind == BLKIF_OP_DISCARD:
            flag = BLKIF_DISCARD_SECURE if head.secure else 0
            req = BlkifRequestDiscard(kind, flag, self.handle, 0, head.sector, head.nsectors)
            return self._enc.encode(req), None
        if not head.pages:  # flush / barrier without data
            return self._enc.direct(kind, 0, ()), None
        segs = self._segments(ops)
        if len(segs) <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return self._enc.direct(kind, head.sector, segs), None
        assert q.ind_share is not None, "indirect request without indirect pages"
        slot = q.ind_free.pop()
        npages = indirect_pages_for(len(segs))
        base = slot * q.ind_pages * PAGE_SIZE
        q.ind_share.buf[base : base + 8 * len(segs)] = b"".join(segs)
        refs = tuple(q.ind_share.refs[slot * q.ind_pages : slot * q.ind_pages + npages])
        self.stats.indirect += 1
        ind = BlkifRequestIndirect(
            BLKIF_OP_INDIRECT, kind, len(segs), 0, head.sector, self.handle, refs
        )
        return self._enc.encode(ind), slot

    async def _send(self, q: _Queue, ops: list[_Op]) -> None:
        if q.outops:
            self._send_outbox(q)  # requests issued earlier go first (barriers order)
        req, slot = self._build(q, ops)
        q.inflight += 1
        self.stats.requests += 1
        try:
            rfut = await q.ring.submit(req)
        except BaseException as exc:
            q.inflight -= 1
            if slot is not None:
                q.ind_free.append(slot)
            for op in ops:
                self._fail(op, exc)
            raise
        if len(ops) == 1 and slot is None:
            rfut.add_done_callback(functools.partial(self._completed_one, q, ops[0]))
        else:
            rfut.add_done_callback(functools.partial(self._completed, q, ops, slot))

    def _fail(self, op: _Op, exc: BaseException) -> None:
        if op.pages:
            self.pool.release(op.pages)
            op.pages = []
        if not op.future.done():
            op.future.set_exception(exc)

    def _completed_one(self, q: _Queue, op: _Op, rfut: asyncio.Future[BlkifResponse]) -> None:
        """The common case: one op, direct request."""
        try:
            failed = rfut.result().status != BLKIF_RSP_OKAY
        except BaseException:
            failed = True
        if failed:
            self._completed(q, [op], None, rfut)
            return
        q.inflight -= 1
        if op.view is not None and not op.cancelled:
            self._copy_out(op.pages, op.view)
        if op.pages:
            self.pool.release(op.pages)
        if not op.future.done():
            op.future.set_result(None)
        if q.backlog:
            q.room.set()

    def _completed(
        self,
        q: _Queue,
        ops: list[_Op],
        slot: int | None,
        rfut: asyncio.Future[BlkifResponse],
    ) -> None:
        q.inflight -= 1
        if slot is not None:
            q.ind_free.append(slot)
        if rfut.cancelled():
            exc: BaseException | None = ConnectionResetError(f"{self.name}: ring shut down")
            status = None
        else:
            exc = rfut.exception()
            status = None if exc is not None else rfut.result().status
        for op in ops:
            if exc is not None:
                self._fail(op, _fresh(exc))
                continue
            if status != BLKIF_RSP_OKAY:
                self.stats.errors += 1
                code = errno.EOPNOTSUPP if status == BLKIF_RSP_EOPNOTSUPP else errno.EIO
                self._fail(
                    op,
                    BlkError(
                        code,
                        f"{self.name}: {OP_NAMES.get(op.kind, op.kind)} at wire sector "
                        f"{op.sector} ({op.nbytes or op.nsectors * SECTOR_SIZE} bytes) failed "
                        f"with status {status}",
                    ),
                )
                continue
            if op.view is not None and not op.cancelled:
                self._copy_out(op.pages, op.view)
            if op.pages:
                self.pool.release(op.pages)
                op.pages = []
            if not op.future.done():
                op.future.set_result(None)
        if q.backlog:
            q.room.set()

    # ------------------------------------------------------------------ copies

    def _copy_in(self, pages: list[int], view: memoryview) -> None:
        data = self._data
        assert data is not None
        if len(pages) == 1:
            start = pages[0] << PAGE_SHIFT
            data[start : start + len(view)] = view
            return
        pos, total = 0, len(view)
        for start, count in _runs(pages):
            n = min(count * PAGE_SIZE, total - pos)
            data[start * PAGE_SIZE : start * PAGE_SIZE + n] = view[pos : pos + n]
            pos += n

    def _copy_out(self, pages: list[int], view: memoryview) -> None:
        data = self._data
        assert data is not None
        if len(pages) == 1:
            start = pages[0] << PAGE_SHIFT
            view[:] = data[start : start + len(view)]
            return
        pos, total = 0, len(view)
        for start, count in _runs(pages):
            n = min(count * PAGE_SIZE, total - pos)
            view[pos : pos + n] = data[start * PAGE_SIZE : start * PAGE_SIZE + n]
            pos += n

    # ------------------------------------------------------------------ shutdown

    def _release(self) -> None:
        for q in self._queues:
            if q.drainer is not None:
                q.drainer.cancel()
            q.ring.close()
            if q.ind_share is not None:
                q.ind_share.close()
        self._queues = []
        share, self._share = self._share, None
        if share is not None:
            self._data = None
            share.close()

    async def close(self) -> None:
        """Fail outstanding I/O with ``ConnectionResetError`` and release rings and pool."""
        if self._closed:
            return
        self._closed = True
        exc = ConnectionResetError(f"{self.name} is closed")
        self.pool.close(exc)
        for q in self._queues:
            while q.backlog:
                self._fail(q.backlog.popleft(), _fresh(exc))
            outops, q.outbox, q.outops = q.outops, [], []
            q.inflight -= len(outops)
            for op in outops:
                self._fail(op, _fresh(exc))
        drainers = [q.drainer for q in self._queues if q.drainer is not None]
        self._release()
        for d in drainers:
            with contextlib.suppress(BaseException):
                await d

    def add_shutdown_callback(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error)`` when any of the rings shuts down: ``None`` for our own
        [`close`][], else why (the backend went away, or broke the protocol)."""
        for q in self._queues:
            q.ring.add_shutdown_callback(callback)

    def shutdown_error(self) -> BaseException | None:
        """Why a ring shut down (peer gone, protocol error), if one did."""
        for q in self._queues:
            if q.ring.closed:
                return q.ring.error or ConnectionResetError(f"{q.ring.name} shut down")
        return None

    def __repr__(self) -> str:
        return (
            f"<BlkFront {self.name} {self.size} bytes ss={self.sector_size}"
            f"{' ro' if self.readonly else ''} queues={len(self._queues)}>"
        )


def _head(d: deque[_Op], n: int) -> list[_Op]:
    out: list[_Op] = []
    for op in d:
        if len(out) == n or op.cancelled:
            break
        out.append(op)
    return out


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``(start, count)`` of a page list, in order."""
    if len(pages) == 1:
        return [(pages[0], 1)]
    out: list[tuple[int, int]] = []
    start = prev = pages[0]
    for p in pages[1:]:
        if p == prev + 1:
            prev = p
            continue
        out.append((start, prev - start + 1))
        start = prev = p
    out.append((start, prev - start + 1))
    return out


def _fresh(exc: BaseException) -> BaseException:
    try:
        new = type(exc)(*exc.args)
    except Exception:
        return exc
    new.__cause__ = exc
    return new


def describe(dev: BlkFront) -> dict[str, Any]:
    n = dev.negotiated
    return {
        "size": dev.size,
        "sector_size": dev.sector_size,
        "readonly": dev.readonly,
        "queues": n.queues,
        "ring_page_order": n.ring_page_order,
        "max_segments": n.max_segments,
        "indirect": n.indirect,
        "persistent": n.persistent,
        "flush": dev.can_flush,
        "discard": dev.can_discard,
    }


__all__ = [
    "BackendInfo",
    "BlkError",
    "BlkFront",
    "FrontStats",
    "FrontendConfig",
    "Negotiated",
    "describe",
    "negotiate",
]
