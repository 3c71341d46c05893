"""What netfront's queue and netback's vif add to the ring-service cycle.

Theory of operation
-------------------
Both ends of a vif run [`RingService`][aioxen.rings.service.RingService]'s cycle (event →
service → flush → peer check; one scheduled flush per loop iteration), like the generic
ring adapters.  [`RingEnd`][] adds what is a vif's: the peer is named by its role
(``"backend"``/``"frontend"``) and domain in the ``ConnectionResetError`` that ends an end
whose event channel lost its peer, events are counted in ``stats.events`` (by the
``_service`` step), and [`RingEnd.flush`][] publishes at once — used in the middle of a
batch (every ``PUSH_EVERY`` slots) so the peer can start while the rest is filled; any
scheduled flush still runs.
"""

from __future__ import annotations

from typing import Any

from aioxen.errors import ProtocolError
from aioxen.rings.service import RingService


class RingEnd(RingService):
    """Base of [`aioxen.net.front_queue.NetfrontQueue`][] and [`aioxen.net.vif.Vif`][].

    A subclass sets what [`RingService`][aioxen.rings.service.RingService] needs plus ``stats``,
    ``name``, ``_peer_role`` and ``_peer_domid``, and implements ``_service`` (counting
    ``stats.events``), ``_flush`` and ``_fail``.
    """

    _peer_role: str
    _peer_domid: int
    stats: Any
    name: Any

    def _peer_gone_error(self) -> BaseException:
        return ConnectionResetError(
            f"{self.name}: {self._peer_role} domain {self._peer_domid} went away "
            f"(event channel port {self._channel.port})"
        )

    def flush(self) -> None:
        """Publish what is pending now (normally done once per loop iteration)."""
        if not self._closed:
            try:
                self._flush()
            except ProtocolError as exc:
                self._fail(exc)


__all__ = ["RingEnd"]
