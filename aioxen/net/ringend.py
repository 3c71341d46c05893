"""What netfront's queue and netback's vif share: event handling and batched publishing.

Theory of operation
-------------------
Both ends of a vif work the same way around their data paths.  An event (or a scheduled
re-run) first does the end's own work (:meth:`RingEnd._service`: consume responses or
requests, move queued frames), then publishes everything produced with one
:meth:`~RingEnd._flush` (one push per ring, at most one notification).  Work produced
outside an event is published once per loop iteration by :meth:`RingEnd._schedule_flush`
(or at once with :meth:`RingEnd.flush`).  A :class:`~aioxen.errors.ProtocolError` from
the peer's ring ends the end (:meth:`RingEnd._fail`); so does an event channel whose
peer is gone, with ``ConnectionResetError`` naming the peer domain and the port.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioxen.errors import ProtocolError


class RingEnd:
    """Base of :class:`~aioxen.net.front_queue.NetfrontQueue` and :class:`~aioxen.net.vif.Vif`.

    A subclass sets ``_loop``, ``_channel``, ``stats``, ``_dead``, ``_flush_scheduled``,
    ``name``, ``_peer_role`` (``"backend"``/``"frontend"``) and ``_peer_domid``, and
    implements ``_service``, ``_flush`` and ``_fail``.
    """

    _loop: asyncio.AbstractEventLoop
    _channel: Any
    _dead: bool
    _flush_scheduled: bool
    _peer_role: str
    _peer_domid: int
    stats: Any
    name: Any

    def _service(self) -> None:
        """The end's own work on an event (before the flush)."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Publish what was produced; notify the peer if its event index asks for it."""
        raise NotImplementedError

    def _fail(self, exc: BaseException) -> None:
        """End this end with ``exc`` (idempotent)."""
        raise NotImplementedError

    def _on_event(self) -> None:
        if self._dead:
            return
        self.stats.events += 1
        try:
            self._service()
            self._flush()
        except ProtocolError as exc:
            self._fail(exc)
            return
        channel = self._channel
        if channel is not None and channel.peer_lost:
            self._fail(
                ConnectionResetError(
                    f"{self.name}: {self._peer_role} domain {self._peer_domid} went away "
                    f"(event channel port {channel.port})"
                )
            )

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if self._dead:
            return
        try:
            self._flush()
        except ProtocolError as exc:
            self._fail(exc)

    def flush(self) -> None:
        """Publish what is pending now (normally done once per loop iteration)."""
        if not self._dead:
            try:
                self._flush()
            except ProtocolError as exc:
                self._fail(exc)


__all__ = ["RingEnd"]
