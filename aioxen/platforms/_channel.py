"""Delivery logic shared by every event-channel backend: pending flag, waiters, handler.

Theory of operation
-------------------
A backend (in-heap, Unix socket, ``/dev/xen/evtchn``) only has to tell a
[`ChannelCore`][] two things, always on the channel's event loop:

* [`ChannelCore._events_arrived`][] — one *batch* of one or more notifications came in;
* [`ChannelCore._peer_gone`][] — the remote end disappeared (closed, died, EOF).

The core turns that into the [`EventChannel`][aioxen.platforms.base.EventChannel] semantics:

* Notifications coalesce into a single ``pending`` flag.  A batch that arrives while tasks
  wait wakes all of them (they all return); otherwise it sets the flag and the next ``wait()``
  returns at once and clears it, so an event nobody waited for is remembered and none is lost
  (a waiter cancelled after being handed a batch puts the flag back).  ``wait()`` raises
  ``ConnectionResetError`` only once nothing is pending and the peer is gone (or the channel
  was closed), so a last notification sent just before the peer's close is still observed.
* With a handler installed ([`set_handler`][]) the batch is delivered by calling the handler
  directly from the backend's callback instead; the flag is consumed by the call.  Loss of the
  peer produces one further call with [`peer_lost`][] true.  Installing a handler while events
  are pending (or after the peer vanished) schedules one call, so nothing that arrived between
  ``connect`` and ``set_handler`` is dropped.

* The connecting end starts with one pending event ([`_bound_by_connect`][]).  Xen sets a
  port pending as ``BIND_INTERDOMAIN`` binds it; the ``unix`` and ``inheap`` backends call
  [`_bound_by_connect`][] so that every platform behaves alike (the ``xen`` backend gets
  the event from the kernel instead).

* A listening end whose backend sees the bind (``unix``: the connector's hello;
  ``inheap``: ``connect``) calls [`_peer_bound`][]; callbacks registered with
  [`when_bound`][] run then, once, from the loop (a server re-advertises at once instead
  of after the whole handshake).  Xen shows no bind: there they never run.

Handler exceptions go to the loop's exception handler; delivery continues.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ChannelCore:
    """Common state of one event-channel end bound to one event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, port: int, remote_domid: int, local_domid: int
    ) -> None:
        self._loop = loop
        self._port = port
        self._remote_domid = remote_domid
        self._local_domid = local_domid
        self._pending = False
        self._peer_lost = False
        self._lost_reported = False
        self._closed = False
        self._handler: Callable[[], None] | None = None
        self._kick_scheduled = False
        self._waiters: list[asyncio.Future[bool]] = []
        self._on_bound: list[Callable[[], None]] | None = None
        self._was_bound = False

    # -- read-only properties ------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def local_domid(self) -> int:
        return self._local_domid

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer_lost(self) -> bool:
        return self._peer_lost

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _describe(self) -> str:
        return (
            f"event channel port {self._port} of domain {self._local_domid} "
            f"(peer domain {self._remote_domid})"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "peer-lost" if self._peer_lost else "open"
        return (
            f"<{type(self).__name__} port={self._port} domid={self._local_domid} "
            f"remote_domid={self._remote_domid} {state}>"
        )

    # -- backend -> core -----------------------------------------------------------------
    def _events_arrived(self) -> None:
        """A batch of notifications arrived (call on the loop)."""
        if self._closed:
            return
        handler = self._handler
        if handler is not None:
            self._pending = False
            self._call(handler)
        elif self._waiters:
            self._wake(True)  # the waiters consume the batch
        else:
            self._pending = True

    def _bound_by_connect(self) -> None:
        """This end was just bound by ``connect``: start with one pending event, as Xen
        does (call on the loop, before anyone can wait or set a handler)."""
        self._pending = True

    def _peer_bound(self) -> None:
        """A peer bound this listening end (call on the loop): run the
        [`when_bound`][] callbacks, once."""
        self._was_bound = True
        callbacks, self._on_bound = self._on_bound, None
        for cb in callbacks or ():
            self._loop.call_soon(cb)

    def when_bound(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the loop, once) when a peer binds this listening end --
        soon if one already did.  Only backends that see binds ever call it."""
        if self._was_bound:
            self._loop.call_soon(callback)
        elif self._on_bound is None:
            self._on_bound = [callback]
        else:
            self._on_bound.append(callback)

    def _peer_gone(self) -> None:
        """The remote end went away (call on the loop).  Idempotent."""
        if self._peer_lost or self._closed:
            return
        self._peer_lost = True
        handler = self._handler
        if handler is not None:
            self._lost_reported = True
            self._call(handler)
        else:
            self._wake()

    def _wake(self, event: bool = False) -> None:
        """Resolve every waiter: ``True`` hands them an event, ``False`` asks them to
        re-check the channel state."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(event)

    def _call(self, handler: Callable[[], None]) -> None:
        try:
            handler()
        except Exception as exc:  # a buggy handler must not kill delivery
            self._loop.call_exception_handler(
                {
                    "message": f"exception in event handler of {self._describe()}",
                    "exception": exc,
                }
            )

    def _kick(self) -> None:
        """Schedule one handler call for state that arrived before the handler was set."""
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._run_kick)

    def _run_kick(self) -> None:
        self._kick_scheduled = False
        handler = self._handler
        if handler is None or self._closed:
            return
        if self._pending:
            self._pending = False
            self._call(handler)
        if self._peer_lost and not self._lost_reported and self._handler is handler:
            self._lost_reported = True
            self._call(handler)

    # -- public API ----------------------------------------------------------------------
    async def wait(self, timeout: float | None = None) -> None:
        if self._pending and self._handler is None:  # fast path: no timer, no future
            self._pending = False
            return
        if timeout is None:
            await self._wait()
        else:
            try:
                async with asyncio.timeout(timeout):
                    await self._wait()
            except TimeoutError as exc:
                if exc.args:
                    raise
                raise TimeoutError(f"no event on {self._describe()} within {timeout} s") from None

    async def _wait(self) -> None:
        while True:
            if self._handler is not None:
                raise RuntimeError(f"{self._describe()} delivers events to a handler")
            if self._pending:
                self._pending = False
                return
            if self._closed:
                raise ConnectionResetError(f"{self._describe()} is closed")
            if self._peer_lost:
                raise ConnectionResetError(f"peer of {self._describe()} went away")
            fut: asyncio.Future[bool] = self._loop.create_future()
            self._waiters.append(fut)
            try:
                if await fut:
                    return
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.result():
                    self._pending = True  # cancelled after being handed an event: keep it
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def set_handler(self, handler: Callable[[], None] | None) -> None:
        self._handler = handler
        if handler is None or self._closed:
            return
        if self._waiters:
            # Waiters would never be woken again; let them re-check (they raise RuntimeError).
            self._wake()
        if self._pending or (self._peer_lost and not self._lost_reported):
            self._kick()

    def _mark_closed(self) -> None:
        """Core part of ``close()``: mark closed and fail pending waits."""
        self._closed = True
        self._handler = None
        self._pending = False
        self._on_bound = None
        self._wake()


__all__ = ["ChannelCore"]
