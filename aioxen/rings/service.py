"""The event → service → flush cycle every ring end on an event channel runs.

Theory of operation
-------------------
An end of an ``io/ring.h`` ring pair (an [`AsyncFrontRing`][aioxen.rings.aio.AsyncFrontRing], an
[`AsyncBackRing`][aioxen.rings.aio.AsyncBackRing], netfront's
`NetfrontQueue`, netback's [`Vif`][aioxen.net.vif.Vif])
receives its event channel's notifications through `EventChannel.set_handler`,
with no task waiting in a loop, and works in one cycle:

1. **service** (`RingService._service`): the end's own work on an event —
   consume responses or requests, move queued frames, answer what it can;
2. **flush** (`RingService._flush`): publish everything produced with one push per
   ring and at most one notification (the peer's event index decides);
3. **peer check**: an event channel whose peer is gone ends the end with the
   ``ConnectionResetError`` from `RingService._peer_gone_error` (naming the peer
   domain and the port), after what was already published was serviced.

Work produced outside an event (a caller submitting, a transport sending) is published
once per loop iteration: `RingService._schedule_flush` queues one
`RingService._run_flush` with ``call_soon``, however many entries were put; callers
that must publish at once call ``_run_flush`` directly.  A
[`ProtocolError`][aioxen.errors.ProtocolError] raised by the peer's ring in any step ends the end
with that error (`RingService._fail`, idempotent); nothing runs after ``_closed``.

A subclass sets ``_loop``, ``_channel``, ``_closed`` and ``_flush_scheduled`` in its
constructor and implements ``_service``, ``_flush``, ``_fail`` and ``_peer_gone_error``.
An end whose requests are batched by its callers (the generic front) sets
``flush_on_event = False``: its events only service, and its requests go out with the
scheduled flush of the iteration that produced them.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from aioxen.errors import ProtocolError


class RingService:
    """Base of every ring end driven by event-channel callbacks (see the module text)."""

    _poll_max: float = 0.0
    """Maximum busy-poll window in seconds; 0 (the default): the end never polls."""

    flush_on_event: ClassVar[bool] = True
    """Whether an event publishes what its service step produced (one push, one notify)."""

    _loop: asyncio.AbstractEventLoop
    _channel: Any  # an EventChannel, or None before it is bound
    _closed: bool
    _flush_scheduled: bool

    def _service(self) -> None:
        """The end's own work on an event (before the flush)."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Publish what was produced; notify the peer if its event index asks for it."""
        raise NotImplementedError

    def _fail(self, exc: BaseException) -> None:
        """End this end with ``exc`` (idempotent)."""
        raise NotImplementedError

    def _peer_gone_error(self) -> BaseException:
        """The error that ends this end when its event channel's peer is gone."""
        raise NotImplementedError

    def _woken(self) -> None:
        """An event arrived (an end that busy-polls tells its poll policy; see
        [`AsyncFrontRing`][aioxen.rings.aio.AsyncFrontRing])."""

    def _on_event(self) -> None:
        """The event-channel handler: service, flush, then the peer check."""
        if self._closed:
            return
        if self._poll_max:
            self._woken()
        try:
            self._service()
            if self.flush_on_event:
                self._flush()
        except ProtocolError as exc:
            self._fail(exc)
            return
        channel = self._channel
        if channel is not None and channel.peer_lost:
            self._fail(self._peer_gone_error())

    def _schedule_flush(self) -> None:
        """Publish at the end of this loop iteration (once, however often called)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        # _run_flush written out: this runs once per loop iteration per busy end.
        if not self._flush_scheduled:  # already done by an explicit _run_flush
            return
        self._flush_scheduled = False
        if self._closed:
            return
        try:
            self._flush()
        except ProtocolError as exc:
            self._fail(exc)

    def _run_flush(self) -> None:
        """Publish now; a ring violation ends the end."""
        self._flush_scheduled = False
        if self._closed:
            return
        try:
            self._flush()
        except ProtocolError as exc:
            self._fail(exc)


__all__ = ["RingService"]
