"""asyncio adapters for ``io/ring.h`` rings: [`AsyncFrontRing`][], [`AsyncBackRing`][].

Theory of operation
-------------------
Both adapters pair a pure ring ([`aioxen.rings.sring`][]) with an event channel from the
platform and receive events through [`EventChannel.set_handler`][], so no task sits in a
``wait()`` loop.  The cycle (event → service → flush, one scheduled flush per loop
iteration, a ring violation or a lost peer ends the adapter) is
[`RingService`][aioxen.rings.service.RingService]'s, shared with netfront and netback.

**Front.** The front owns the request ``id`` space: ids ``0 .. nr_ents - 1`` are handed out
from a free list and written into each request (`EntryFormat.with_id`), so a slot and
an id are always taken together and a full ring simply means "no free id".  Callers wait in
FIFO order for a free id (back-pressure).  Requests put during one event-loop iteration are
published with one push and at most one notify (the push is scheduled with
``call_soon``).  [`submit_many`][AsyncFrontRing.submit_many] (and its non-waiting form
[`AsyncFrontRing.submit_many_nowait`][]) writes many requests with one copy and returns
one future per request: what [`submit`][AsyncFrontRing.submit] does, at the cost of one call.
On an event the front takes every published response, matches it to its
outstanding id (an unknown or already answered id is a [`ProtocolError`][] on field
``id``), resolves the caller's future, frees the id and runs the final check before going
back to sleep.  A caller cancelled after its request was published keeps its id reserved
until the response arrives, which is then dropped: ids are never reused while the back end
may still answer them.

**Back.** The back takes requests in batches (``async for batch in back.batches()``, or
``async for req in back``, or [`AsyncBackRing.serve`][] with a handler).  Responses
given to `respond` are written into the ring at once and published together at the
end of the loop iteration: one push, at most one notify, per batch.  With
``check_ids=True`` the back also rejects a front that reuses an id still being served.

**Busy polling.** After an end publishes (requests, or responses) it may watch the
peer's producer index for a window instead of sleeping: one validated look per loop
iteration (``call_soon``), with its event index left unarmed so that, by ``io/ring.h``'s
own rule, the peer's pushes need no notification; when the window runs out the end arms
and re-checks as without polling.  How long, and whether at all, is decided by vchan's
pure `aioxen.pollpolicy.PollPolicy` (``busy_poll`` is its maximum;
0 turns polling off, the default where the peer cannot run concurrently).

**Shutdown.** `close` (or the peer's event channel going away, or a protocol
violation) shuts the adapter down: every pending request, free-slot waiter and iterator is
failed with a clear error (``ConnectionResetError`` naming the ring and domain, or the
[`ProtocolError`][] itself), the event handler is removed, and later calls raise the same
error.  Resources the adapter created itself ([`AsyncFrontRing.create`][],
[`AsyncBackRing.attach`][]) are released: ring pin, grant share/mapping, event channel.

Size: ~820 lines, just over the project's ~800 guide, on purpose: the front and back
adapters are mirror images built on the same ``_Adapter``, batching and release helpers,
and are kept side by side so a change to one is made to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import operator
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from os import sched_yield as _sched_yield
from time import perf_counter
from typing import Any, Generic, Self, TypeVar, cast

from aioxen.errors import ProtocolError
from aioxen.platforms.base import EventChannel, Mapping, Platform, Share
from aioxen.pollpolicy import (
    DEFAULT_BUSY_POLL,
    MAX_BUSY_POLL,
    POLL_AGAIN,
    POLL_FOUND,
    POLL_YIELD,
    PollPolicy,
)
from aioxen.rings.formats import EntryFormat, batch_codec
from aioxen.rings.service import RingService
from aioxen.rings.sring import BackRing, FrontRing, _Ring, ring_pages

Req = TypeVar("Req")
Rsp = TypeVar("Rsp")


class RingShutdown(ConnectionResetError):
    """The ring was shut down (locally, or because its peer went away) while this
    operation was pending."""


def _release(resources: list[Any]) -> None:
    """Close ``resources`` in order, ignoring ones already closed."""
    errors: list[BaseException] = []
    for r in resources:
        try:
            r.close()
        except Exception as exc:  # keep releasing the rest
            errors.append(exc)
    resources.clear()
    if errors:
        raise errors[0]


def check_busy_poll(busy_poll: float | None, peer_runs_concurrently: bool = True) -> float:
    """Resolve a ``busy_poll`` argument: ``None`` means `DEFAULT_BUSY_POLL` (100 µs) where the
    peer runs concurrently, else 0 (no polling); otherwise 0..`MAX_BUSY_POLL` seconds."""
    if busy_poll is None:
        return DEFAULT_BUSY_POLL if peer_runs_concurrently else 0.0
    if isinstance(busy_poll, bool) or not isinstance(busy_poll, (int, float)):
        raise TypeError(f"busy_poll must be a number of seconds, not {busy_poll!r}")
    if not 0 <= busy_poll <= MAX_BUSY_POLL:
        raise ValueError(f"busy_poll {busy_poll!r} out of range 0..{MAX_BUSY_POLL} s")
    return float(busy_poll)


class _Adapter(RingService):
    """State shared by both adapters: channel, shutdown, owned resources, busy polling;
    the event → service → flush cycle and the once-per-iteration flush are
    [`RingService`][]'s."""

    _ring: _Ring[Any, Any]  # set by the subclass
    _channel: EventChannel

    def __init__(self, channel: EventChannel, name: str, busy_poll: float = 0.0) -> None:
        self._poll_max = check_busy_poll(busy_poll)
        self._policy = PollPolicy(self._poll_max, perf_counter())
        self._channel = channel
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._error: BaseException | None = None
        self._closed = False
        self._owned: list[Any] = []  # closed after the ring, in order
        self._flush_scheduled = False
        self._shutdown_callbacks: list[Callable[[BaseException | None], None]] = []

    def add_shutdown_callback(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error)`` (soon, on the loop) once the adapter shuts down:
        ``error`` is ``None`` for a local [`close`][], else why (peer gone, protocol
        violation).  Devices use it to tell their xenbus runner the peer was lost."""
        if self._closed:
            self._loop.call_soon(callback, self._error)
        else:
            self._shutdown_callbacks.append(callback)

    def _run_shutdown_callbacks(self) -> None:
        callbacks, self._shutdown_callbacks = self._shutdown_callbacks, []
        for cb in callbacks:
            self._loop.call_soon(cb, self._error)

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> EventChannel:
        return self._channel

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> BaseException | None:
        """Why the adapter shut down (``None`` for a plain local close or while open)."""
        return self._error

    def _shutdown_error(self) -> BaseException:
        if self._error is not None:
            return self._error
        return RingShutdown(f"ring {self._name} is shut down")

    def _check_open(self) -> None:
        if self._closed:
            raise self._shutdown_error()

    def _peer_gone_error(self) -> RingShutdown:  # RingService: the peer check's error
        return RingShutdown(
            f"ring {self._name}: peer domain {self._channel.remote_domid} went away "
            f"(event channel port {self._channel.port})"
        )

    def _fail(self, exc: BaseException) -> None:
        self._shutdown(exc)

    def _shutdown(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    # -- busy polling (the decisions are PollPolicy's, as for vchan) --------------------
    @property
    def busy_poll(self) -> float:
        """The maximum busy-poll window in seconds (0: this end never polls)."""
        return self._poll_max

    def _woken(self) -> None:
        """An event came while no poll window was open: let the policy size the next."""
        if not self._policy.polling:
            self._policy.woken(perf_counter())

    def _want_poll(self) -> None:
        """We published entries: the peer's answer may follow soon.  Extend the poll
        window, or open one (and schedule its first poll) if the policy says so."""
        policy = self._policy
        now = perf_counter()
        if policy.activity(now, not self._closed):
            self._loop.call_soon(self._poll)
        elif policy.polling:
            # We just ran (a batch decoded, answered, published): the gap to the next poll
            # starts now, or a big batch's own work would look like time off the CPU.
            policy.last_poll = now

    def _poll(self) -> None:
        """One poll: a validated look at the peer's producer index (no event index
        written, so the peer does not notify while we watch); the policy says what next."""
        policy = self._policy
        if not policy.polling:
            return
        if self._closed:
            policy.cancel()
            return
        try:
            found = self._peek()
        except ProtocolError as exc:
            policy.cancel()
            self._fail(exc)
            return
        action = policy.polled(perf_counter(), found, True)
        if action == POLL_AGAIN:
            self._loop.call_soon(self._poll)
        elif action == POLL_YIELD:
            _sched_yield()  # perhaps the peer waits for our CPU: let it run
            self._loop.call_soon(self._poll)
        elif action == POLL_FOUND:
            if policy.polling:
                self._loop.call_soon(self._poll)
            self._poll_found()  # services; re-arms the event index if the window closed
        else:  # POLL_ENDED: back to notifications -- arm, re-check, sleep
            self._poll_ended()

    def _peek(self) -> bool:
        """Whether the peer published something for us (validated; may raise)."""
        raise NotImplementedError

    def _poll_found(self) -> None:
        raise NotImplementedError

    def _poll_ended(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Shut down (see the subclass), then release the ring and whatever
        ``create``/``attach`` allocated.  Idempotent."""
        self._shutdown(None)
        self._ring.close()
        _release(self._owned)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def _consume(it: Iterable[Any]) -> None:
    """Run an iterator to exhaustion at C speed."""
    deque(it, maxlen=0)


class _Batch:
    """The responses one ``submit``/``request_many`` call is waiting for."""

    __slots__ = ("future", "remaining", "results", "single")

    def __init__(self, future: asyncio.Future[Any], n: int, single: bool = False) -> None:
        self.future = future
        self.remaining = n
        self.results: list[Any] = [None] * n
        self.single = single

    def finish(self) -> None:
        if not self.future.done():  # a cancelled caller's answers are dropped
            self.future.set_result(self.results[0] if self.single else self.results)


class AsyncFrontRing(_Adapter, Generic[Req, Rsp]):
    """Submit requests, await their responses.

    Build one over an existing ring and channel, or let [`create`][] share the pages and
    allocate the channel.  Usable as an async context manager (closes on exit).
    """

    _ring: FrontRing[Req, Rsp]

    def __init__(
        self,
        ring: FrontRing[Req, Rsp],
        channel: EventChannel,
        *,
        name: str | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        super().__init__(channel, name or ring.name, busy_poll)
        self._ring = ring
        self._req_fmt = ring.request_format
        self._rsp_fmt = ring.response_format
        nids = ring.nr_ents
        if 0 < ring.request_format.id_bits < 64:
            nids = min(nids, 1 << ring.request_format.id_bits)
        self._free_ids: list[int] = list(range(nids))  # oldest-freed first
        self._pending: dict[int, tuple[_Batch, int]] = {}
        self._slot_waiters: deque[asyncio.Future[int]] = deque()
        self._req_codec = batch_codec(ring.request_format, ring.slot_size)
        self._rsp_codec = batch_codec(ring.response_format, ring.slot_size)
        self.refs: list[int] = []
        self.port: int = channel.port
        channel.set_handler(self._on_event)

    @classmethod
    async def create(
        cls,
        platform: Platform,
        remote_domid: int,
        req_fmt: EntryFormat[Req],
        rsp_fmt: EntryFormat[Rsp],
        *,
        order: int = 0,
        start: int = 0,
        name: str | None = None,
        busy_poll: float | None = None,
    ) -> AsyncFrontRing[Req, Rsp]:
        """Share ``2**order`` zeroed pages with ``remote_domid``, initialise the ring in
        them and listen on a new event channel.  Advertise `refs` and `port`
        to the back end (e.g. as ``ring-ref``/``event-channel`` in XenStore).
        ``busy_poll``: the maximum busy-poll window in seconds after requests go out
        (``None``: `DEFAULT_BUSY_POLL` (100 µs) where the platform's peer runs concurrently,
        else 0; 0 never polls)."""
        label = name or f"front(to {remote_domid})"
        window = check_busy_poll(busy_poll, platform.peer_runs_concurrently)
        share: Share = platform.grants.share(remote_domid, ring_pages(order))
        ring: FrontRing[Req, Rsp] | None = None
        try:
            ring = FrontRing(share.buf, req_fmt, rsp_fmt, start=start, name=label)
            channel = await platform.events.listen(remote_domid)
        except BaseException:
            if ring is not None:
                ring.close()
            share.close()
            raise
        self = cls(ring, channel, name=label, busy_poll=window)
        self._owned = [share, channel]
        self.refs = share.refs
        return self

    @property
    def ring(self) -> FrontRing[Req, Rsp]:
        return self._ring

    @property
    def in_flight(self) -> int:
        """Requests submitted whose responses have not arrived yet."""
        return len(self._pending)

    @property
    def free_slots(self) -> int:
        return len(self._free_ids)

    # -- submitting ------------------------------------------------------------------
    async def _acquire_ids(self, most: int) -> list[int]:
        """Between 1 and ``most`` free ids; waits (FIFO with other callers) for the first."""
        self._check_open()
        free = self._free_ids
        if not free or self._slot_waiters:
            fut: asyncio.Future[int] = self._loop.create_future()
            self._slot_waiters.append(fut)
            try:
                ids = [await fut]
            except BaseException:
                if fut in self._slot_waiters:
                    self._slot_waiters.remove(fut)
                elif fut.done() and not fut.cancelled() and fut.exception() is None:
                    free.insert(0, fut.result())  # handed an id: give it back
                    self._wake_slot_waiters()
                raise
            if self._slot_waiters:
                return ids
            most -= 1
        else:
            ids = []
        n = min(most, len(free))
        ids += free[:n]
        del free[:n]
        return ids

    def _wake_slot_waiters(self) -> None:
        """Hand free ids to slot waiters, first come first served."""
        while self._free_ids and self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(self._free_ids.pop(0))

    def _put(self, batch: _Batch, base: int, reqs: Sequence[Req], ids: list[int]) -> None:
        """Write ``reqs`` (positions ``base..`` of ``batch``) with ``ids`` into the ring."""
        try:
            self._ring.put_encoded(self._req_codec.pack_with_ids(reqs, ids))
        except BaseException:
            self._free_ids[0:0] = ids
            raise
        slots = zip(itertools.repeat(batch), range(base, base + len(ids)))
        self._pending.update(zip(ids, slots))  # noqa: B905

    async def submit(self, req: Req) -> asyncio.Future[Rsp]:
        """Wait for a free slot, queue ``req`` (its ``id`` is replaced by a fresh one) and
        return a future for the response.  The request is published with the other
        requests of this loop iteration."""
        ids = await self._acquire_ids(1)
        batch = _Batch(self._loop.create_future(), 1, single=True)
        self._put(batch, 0, (req,), ids)
        self._schedule_flush()
        return batch.future

    def _put_each(self, reqs: Sequence[Req], ids: list[int]) -> list[asyncio.Future[Rsp]]:
        """Write ``reqs`` with ``ids`` in one go; one future (one single batch) each."""
        try:
            self._ring.put_encoded(self._req_codec.pack_with_ids(reqs, ids))
        except BaseException:
            self._free_ids[0:0] = ids
            raise
        new = self._loop.create_future
        batches = [_Batch(new(), 1, True) for _ in ids]
        self._pending.update(zip(ids, zip(batches, itertools.repeat(0))))  # noqa: B905
        return [b.future for b in batches]

    def submit_many_nowait(self, reqs: Sequence[Req]) -> list[asyncio.Future[Rsp]]:
        """Queue as many of ``reqs`` as there are free slots, in order and without
        waiting (none while other callers wait for a slot), and return one response
        future per queued request: ``len(result)`` tells how many went in.  They are
        written with one copy and published with the other requests of this loop
        iteration."""
        self._check_open()
        free = self._free_ids
        if self._slot_waiters or not free or not reqs:
            return []
        n = min(len(reqs), len(free))
        ids = free[:n]
        del free[:n]
        futures = self._put_each(reqs if n == len(reqs) else reqs[:n], ids)
        self._schedule_flush()
        return futures

    async def submit_many(self, reqs: Iterable[Req]) -> list[asyncio.Future[Rsp]]:
        """Queue all of ``reqs`` and return one response future per request, in order:
        [`submit`][] for many requests at the cost of one.  As many as there are free
        slots are written at once; the rest wait for slots (first come, first served).
        Cancelled while waiting, the requests already queued stay queued and their
        responses are dropped, as with [`request_many`][]."""
        batch = reqs if type(reqs) is list or isinstance(reqs, Sequence) else list(reqs)
        futures = self.submit_many_nowait(batch)
        while len(futures) < len(batch):
            ids = await self._acquire_ids(len(batch) - len(futures))
            futures += self._put_each(batch[len(futures) : len(futures) + len(ids)], ids)
            self._schedule_flush()
        return futures

    async def request(self, req: Req, *, timeout: float | None = None) -> Rsp:
        """Submit ``req`` and wait for its response.  Cancellation (or ``timeout``) while
        waiting for a slot submits nothing; after submission the slot stays reserved until
        the back end answers, and the answer is dropped."""
        async with asyncio.timeout(timeout):
            fut = await self.submit(req)
            return await fut

    async def request_many(self, reqs: Iterable[Req], *, timeout: float | None = None) -> list[Rsp]:
        """Submit all of ``reqs`` and return their responses in order.  As many requests
        as there are free slots go out in one push (one notify at most); the rest follow
        as slots free up."""
        batch_reqs = reqs if type(reqs) is list or isinstance(reqs, Sequence) else list(reqs)
        if not batch_reqs:
            return []
        if timeout is None:
            return await self._request_many(batch_reqs)
        async with asyncio.timeout(timeout):
            return await self._request_many(batch_reqs)

    async def _request_many(self, reqs: Sequence[Req]) -> list[Rsp]:
        n = len(reqs)
        batch = _Batch(self._loop.create_future(), n)
        free = self._free_ids
        if n <= len(free) and not self._slot_waiters and not self._closed:
            # The usual case, written out (no _acquire_ids coroutine): all ids are free.
            ids = free[:n]
            del free[:n]
            self._put(batch, 0, reqs, ids)
            self._run_flush()
            return await batch.future  # type: ignore[no-any-return]
        done = 0
        while done < n:
            ids = await self._acquire_ids(n - done)
            self._put(batch, done, reqs[done : done + len(ids)], ids)
            done += len(ids)
            self._run_flush()
        results: list[Rsp] = await batch.future
        return results

    def _flush(self) -> None:
        ring = self._ring
        if not ring.unpushed:
            return
        if ring.push_requests():
            self._channel.notify()
        if self._poll_max:
            self._want_poll()  # the answers may come soon: watch rsp_prod for a while

    def flush(self) -> None:
        """Publish queued requests now instead of at the end of the loop iteration."""
        self._check_open()
        self._run_flush()

    # -- receiving (RingService._on_event runs the service step and the peer check) ---
    flush_on_event = False  # requests go out with the scheduled flush of their iteration

    def _peek(self) -> bool:
        return self._ring.unconsumed_responses() > 0

    def _poll_found(self) -> None:
        try:
            self._service()
        except ProtocolError as exc:
            self._fail(exc)

    def _poll_ended(self) -> None:
        try:
            if self._ring.final_check_for_responses():
                self._service()
        except ProtocolError as exc:
            self._fail(exc)

    def _service(self) -> None:
        ring, pending, free, ids_of = self._ring, self._pending, self._free_ids, self._rsp_codec.ids
        freed = False
        while True:
            rsps = ring.take_responses()
            if rsps:
                ids = ids_of(rsps)
                entries = list(map(pending.pop, ids, itertools.repeat(None)))
                bad = entries.index(None) if None in entries else -1
                if bad >= 0:  # deliver what came before the first bad id, then fail
                    bad_id = ids[bad]
                    del entries[bad:], rsps[bad:], ids[bad:]
                free.extend(ids)
                good = cast("list[tuple[_Batch, int]]", entries)
                batches = set(map(_first, good))
                if len(batches) == 1:  # the usual case: one request_many call's answers
                    (batch,) = batches
                    setitem = batch.results.__setitem__
                    _consume(map(setitem, map(_second, good), rsps))
                    batch.remaining -= len(rsps)
                    if not batch.remaining:
                        batch.finish()
                else:
                    for (batch, k), rsp in zip(good, rsps):  # noqa: B905
                        batch.results[k] = rsp
                        batch.remaining -= 1
                        if not batch.remaining:
                            batch.finish()
                if bad >= 0:
                    raise ProtocolError(
                        f"ring {self._name}: response with id {bad_id}, which is not an "
                        f"outstanding request (unknown or already answered)",
                        field="id",
                    )
                freed = True
            if self._policy.polling:  # a poll window watches rsp_prod: leave rsp_event be
                break
            if not ring.final_check_for_responses():
                break
        if freed and self._slot_waiters:
            self._wake_slot_waiters()

    # -- shutdown --------------------------------------------------------------------
    def _shutdown(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._policy.cancel()
        if exc is not None:
            self._error = exc
        err = self._shutdown_error()
        self._channel.set_handler(None)
        for batch, _ in self._pending.values():
            fut = batch.future
            if not fut.done():
                fut.set_exception(_copy_error(err))
                fut.exception()  # the caller may have given up; don't warn about it
        self._pending.clear()
        for w in self._slot_waiters:
            if not w.done():
                w.set_exception(_copy_error(err))
        self._slot_waiters.clear()
        self._run_shutdown_callbacks()

    def close(self) -> None:
        """Shut down (failing pending requests with [`RingShutdown`][]) and release
        the ring and whatever [`create`][] allocated.  Idempotent."""
        super().close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"in_flight={len(self._pending)}"
        return f"<AsyncFrontRing {self._name} {state}>"


def _copy_error(err: BaseException) -> BaseException:
    """A fresh exception per waiter (tracebacks must not be shared between tasks)."""
    if isinstance(err, ProtocolError):
        new: BaseException = ProtocolError(str(err), field=err.field)
    else:
        try:
            new = type(err)(*err.args)
        except Exception:
            return err
    new.__cause__ = err
    return new


Handler = Callable[[Req], "Awaitable[Rsp] | Rsp"]


def _first_reused(ids: list[int], serving: set[int]) -> int:
    seen: set[int] = set()
    for i in ids:
        if i in serving or i in seen:
            return i
        seen.add(i)
    raise AssertionError("no reused id")


class AsyncBackRing(_Adapter, Generic[Req, Rsp]):
    """Serve requests: iterate over them and [`respond`][], or [`serve`][] a handler."""

    _ring: BackRing[Req, Rsp]

    def __init__(
        self,
        ring: BackRing[Req, Rsp],
        channel: EventChannel,
        *,
        name: str | None = None,
        check_ids: bool = True,
        busy_poll: float = 0.0,
    ) -> None:
        super().__init__(channel, name or ring.name, busy_poll)
        self._ring = ring
        self._req_fmt = ring.request_format
        self._rsp_fmt = ring.response_format
        self._check_ids = check_ids and ring.request_format.id_bits > 0
        self._serving: set[int] = set()
        self._event = False
        self._waiter: asyncio.Future[None] | None = None
        self._buffer: deque[Req] = deque()
        self._req_codec = batch_codec(ring.request_format, ring.slot_size)
        self._rsp_codec = batch_codec(ring.response_format, ring.slot_size)
        self._handler: Callable[[], None] = self._on_event  # what an event (or a poll) runs
        channel.set_handler(self._on_channel_event if self._poll_max else self._on_event)

    def _set_handler(self, handler: Callable[[], None]) -> None:
        self._handler = handler
        self._channel.set_handler(self._on_channel_event if self._poll_max else handler)

    def _on_channel_event(self) -> None:
        """The channel handler while polling is configured: tell the policy, then run
        the current handler."""
        self._woken()
        self._handler()

    @classmethod
    async def attach(
        cls,
        platform: Platform,
        remote_domid: int,
        refs: Sequence[int],
        port: int,
        req_fmt: EntryFormat[Req],
        rsp_fmt: EntryFormat[Rsp],
        *,
        name: str | None = None,
        check_ids: bool = True,
        busy_poll: float | None = None,
    ) -> AsyncBackRing[Req, Rsp]:
        """Map the front end's ring pages ``refs`` and bind to its event channel ``port``.
        ``busy_poll``: the maximum busy-poll window in seconds after responses go out
        (``None``: `DEFAULT_BUSY_POLL` (100 µs) where the platform's peer runs concurrently,
        else 0; 0 never polls)."""
        label = name or f"back(to {remote_domid})"
        window = check_busy_poll(busy_poll, platform.peer_runs_concurrently)
        mapping: Mapping = platform.grants.map(remote_domid, refs)
        ring: BackRing[Req, Rsp] | None = None
        try:
            ring = BackRing(mapping.buf, req_fmt, rsp_fmt, name=label)
            channel = await platform.events.connect(remote_domid, port)
        except BaseException:
            if ring is not None:
                ring.close()
            mapping.close()
            raise
        self = cls(ring, channel, name=label, check_ids=check_ids, busy_poll=window)
        self._owned = [mapping, channel]
        return self

    @property
    def ring(self) -> BackRing[Req, Rsp]:
        return self._ring

    @property
    def serving(self) -> int:
        """Requests taken whose responses were not yet given."""
        return self._ring.pending_responses

    # -- events ----------------------------------------------------------------------
    def _on_event(self) -> None:
        # The back's service step runs in its consumer (next_batch / serve), so an event
        # only wakes it; serve() with a plain handler installs its own cycle.
        if self._closed:
            return
        self._event = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait_event(self) -> None:
        while not self._event:
            if self._channel.peer_lost:
                self._shutdown(self._peer_gone_error())
            self._check_open()
            w = self._waiter = self._loop.create_future()
            try:
                await w
            finally:
                self._waiter = None
        self._event = False

    # -- taking requests -------------------------------------------------------------
    def _take(self) -> list[Req]:
        try:
            reqs = self._ring.take_requests()
            if self._check_ids and reqs:
                ids = self._req_codec.ids(reqs)
                serving = self._serving
                fresh = set(ids)
                if len(fresh) != len(ids) or not serving.isdisjoint(fresh):
                    dup = _first_reused(ids, serving)
                    raise ProtocolError(
                        f"ring {self._name}: request id {dup} reused while still being served",
                        field="id",
                    )
                serving |= fresh
            return reqs
        except ProtocolError as exc:
            self._shutdown(exc)
            raise

    async def next_batch(self) -> list[Req]:
        """Wait for and take every published request (at least one)."""
        while True:
            self._check_open()
            reqs = self._take()
            if reqs:
                return reqs
            if self._policy.polling:
                more = False  # a poll window watches req_prod and sets the event
            else:
                try:
                    more = self._ring.final_check_for_requests()
                except ProtocolError as exc:
                    self._shutdown(exc)
                    raise
            if not more:
                await self._wait_event()

    async def batches(self) -> AsyncIterator[list[Req]]:
        """Yield batches of requests until [`close`][]; raises when the peer goes away
        (``ConnectionResetError``) or misbehaves ([`ProtocolError`][])."""
        while True:
            try:
                batch = await self.next_batch()
            except RingShutdown:
                if self._error is None:
                    return  # local close: orderly end of iteration
                raise
            yield batch

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Req:
        if not self._buffer:
            try:
                self._buffer.extend(await self.next_batch())
            except RingShutdown:
                if self._error is None:
                    raise StopAsyncIteration from None
                raise
        return self._buffer.popleft()

    # -- responding ------------------------------------------------------------------
    def respond(self, rsp: Rsp) -> None:
        """Queue a response; responses of one loop iteration are pushed together."""
        self.respond_many((rsp,))

    def respond_many(self, rsps: Iterable[Rsp]) -> None:
        """Queue several responses (one encode and copy into the ring)."""
        self._check_open()
        batch = rsps if type(rsps) is list or isinstance(rsps, Sequence) else list(rsps)
        if batch:
            self._put_responses(batch)
            self._schedule_flush()

    def _put_responses(self, batch: Sequence[Rsp]) -> None:
        if self._check_ids:
            ids = set(self._rsp_codec.ids(batch))
            if len(ids) != len(batch) or not ids <= self._serving:
                raise ValueError(
                    f"ring {self._name}: responses must answer distinct requests being "
                    f"served; ids {sorted(ids - self._serving)} are not being served"
                )
            self._ring.put_responses(batch)
            self._serving -= ids
        else:
            self._ring.put_responses(batch)

    def _flush(self) -> None:
        ring = self._ring
        if not ring.unpushed:
            return
        if ring.push_responses():
            self._channel.notify()
        if self._poll_max:
            self._want_poll()  # the next requests may come soon: watch req_prod a while

    def _peek(self) -> bool:
        return self._ring.unconsumed_requests() > 0

    def _poll_found(self) -> None:
        self._handler()  # the event handler: takes the requests (it catches its errors)

    def _poll_ended(self) -> None:
        try:
            more = self._ring.final_check_for_requests()
        except ProtocolError as exc:
            self._shutdown(exc)
            return
        if more:
            self._handler()

    def flush(self) -> None:
        """Publish queued responses now."""
        self._check_open()
        self._run_flush()

    async def serve(self, handler: Handler[Req, Rsp]) -> None:
        """Answer every request with ``handler(req)``.

        A plain function runs right in the event-channel callback: each batch is taken,
        answered and pushed (one push, at most one notify) before the loop moves on.  A
        coroutine function's calls run concurrently as tasks and their answers are pushed
        together at the end of each loop iteration.  Returns after [`close`][]; raises
        ``ConnectionResetError`` when the peer goes away, [`ProtocolError`][] when it
        misbehaves, and the handler's own exception (after shutting the ring down).
        Cancelling ``serve`` stops serving and leaves the ring open.
        """
        if inspect.iscoroutinefunction(handler):
            await self._serve_tasks(handler)
        else:
            await self._serve_callback(handler)  # type: ignore[arg-type]

    async def _serve_callback(self, handler: Callable[[Req], Rsp]) -> None:
        if self._closed:
            if self._error is not None:
                raise self._error
            return  # closed locally before serving started
        done: asyncio.Future[None] = self._loop.create_future()
        failure: list[BaseException] = []
        checked: list[type] = []  # result types known not to be awaitable

        def on_event() -> None:
            if self._closed:
                return
            try:
                final_check = self._ring.final_check_for_requests
                while True:
                    reqs = self._buffer_and_take() if self._buffer else self._take()
                    if reqs:
                        results = list(map(handler, reqs))
                        if type(results[0]) not in checked:  # isawaitable is an ABC check
                            if inspect.isawaitable(results[0]):
                                raise TypeError(
                                    "serve(): handler returned an awaitable; make it an async def"
                                )
                            checked.append(type(results[0]))
                        self._put_responses(results)
                        self._run_flush()
                    if self._policy.polling or not final_check():
                        break  # (a poll window watches req_prod: leave req_event be)
            except ProtocolError as exc:
                self._shutdown(exc)
            except Exception as exc:
                failure.append(exc)
                self._shutdown(RingShutdown(f"ring {self._name}: handler failed: {exc!r}"))
            else:
                if self._channel.peer_lost:
                    self._shutdown(self._peer_gone_error())
            if self._closed and not done.done():
                done.set_result(None)

        self._waiter = done  # _shutdown resolves it
        self._set_handler(on_event)
        try:
            on_event()  # requests published before we started listening
            await done
        finally:
            self._waiter = None
            if not self._closed:
                self._set_handler(self._on_event)
        if failure:
            raise failure[0]
        if self._error is not None:
            raise self._error

    def _buffer_and_take(self) -> list[Req]:
        if self._buffer:  # requests an iterator took but did not hand out yet
            reqs = list(self._buffer)
            self._buffer.clear()
            return reqs
        return self._take()

    async def _serve_tasks(self, handler: Callable[[Req], Awaitable[Rsp]]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []

        async def run(aw: Awaitable[Rsp]) -> None:
            try:
                rsp = await aw
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                failure.append(exc)
                self._shutdown(RingShutdown(f"ring {self._name}: handler failed: {exc!r}"))
                return
            if not self._closed:
                self.respond(rsp)

        try:
            async for batch in self.batches():
                for req in batch:
                    t = asyncio.ensure_future(run(handler(req)))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        except RingShutdown:
            if failure:
                raise failure[0] from None
            raise
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        if failure:
            raise failure[0]

    # -- shutdown --------------------------------------------------------------------
    def _shutdown(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        if self._ring.unpushed and exc is None:
            with contextlib.suppress(ProtocolError):
                self._flush()  # a local close still publishes what was answered
        self._closed = True
        self._policy.cancel()
        if exc is not None:
            self._error = exc
        self._channel.set_handler(None)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._run_shutdown_callbacks()

    def close(self) -> None:
        """Publish answered responses, stop iteration, release the ring and whatever
        [`attach`][] allocated.  Idempotent."""
        super().close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"serving={self.serving}"
        return f"<AsyncBackRing {self._name} {state}>"


__all__ = ["AsyncBackRing", "AsyncFrontRing", "RingShutdown"]
