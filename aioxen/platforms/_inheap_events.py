"""In-heap event channels: two Python objects linked to each other, one process.

Theory of operation
-------------------
A port is an int, unique per domain within an [`InHeapWorld`][aioxen.platforms.inheap.InHeapWorld]
(counters start at 1, like Xen, which reserves port 0).  ``listen(remote_domid)`` registers an
*unbound* channel under ``(own domid, port)``; ``connect(remote_domid, port)`` looks that up,
checks it was offered to the connector's domid, allocates the connector's own port and links
the two objects.  A port is bound at most once.

``notify()`` sets a flag on the peer object and schedules (once per loop iteration, so
notifications coalesce) a flush on the peer's event loop, which hands the batch to
[`aioxen.platforms._channel.ChannelCore`][].  Closing one end schedules a "peer gone" on the
other the same way, after any notifications already sent, so nothing sent before the close is
lost.  Notifying from another thread or loop goes through ``call_soon_threadsafe``.  Notifying
an unbound port (nobody connected yet) is dropped, as Xen does.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aioxen.errors import PortNotOfferedError
from aioxen.platforms._channel import ChannelCore
from aioxen.platforms.base import check_domid

if TYPE_CHECKING:
    from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld


class InHeapEventChannel(ChannelCore):
    """One end of an in-heap event channel."""

    def __init__(
        self,
        owner: InHeapEventChannels,
        loop: asyncio.AbstractEventLoop,
        port: int,
        remote_domid: int,
    ) -> None:
        super().__init__(loop, port, remote_domid, owner.domid)
        self._owner: InHeapEventChannels | None = owner
        self._peer: InHeapEventChannel | None = None
        self._bound = False
        self._incoming = False
        self._incoming_lost = False
        self._flush_scheduled = False

    @property
    def bound(self) -> bool:
        """True once a peer connected (stays true after the peer left)."""
        return self._bound

    def notify(self) -> None:
        peer = self._peer
        if peer is not None and not self._closed:
            peer._post(lost=False)

    def _post(self, lost: bool) -> None:
        if lost:
            self._incoming_lost = True
        else:
            self._incoming = True
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        loop = self._loop
        if asyncio._get_running_loop() is loop:
            loop.call_soon(self._flush)
        else:
            try:
                loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the peer's loop is closed: nobody can observe it
                self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._incoming:
            self._incoming = False
            self._events_arrived()
        if self._incoming_lost:
            self._peer_gone()

    def close(self) -> None:
        if self._closed:
            return
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._forget(self)
        peer, self._peer = self._peer, None
        if peer is not None:
            peer._peer = None
            peer._post(lost=True)
        self._mark_closed()


class InHeapEventChannels:
    """The EVENTS implementation of one [`InHeapPlatform`][]."""

    def __init__(self, platform: InHeapPlatform) -> None:
        self._platform = platform
        self._live: set[InHeapEventChannel] = set()

    @property
    def domid(self) -> int:
        return self._platform.domid

    @property
    def world(self) -> InHeapWorld:
        return self._platform.world

    async def listen(self, remote_domid: int) -> InHeapEventChannel:
        check_domid(remote_domid, "remote_domid")
        loop = asyncio.get_running_loop()
        port = self.world._allocate_port(self.domid)
        ch = InHeapEventChannel(self, loop, port, remote_domid)
        self._register(ch)
        return ch

    async def connect(self, remote_domid: int, remote_port: int) -> InHeapEventChannel:
        check_domid(remote_domid, "remote_domid")
        loop = asyncio.get_running_loop()
        target = self.world._ports.get((remote_domid, remote_port))
        if target is None or target._bound or target.closed:
            raise ConnectionRefusedError(
                f"no unbound event channel port {remote_port} in domain {remote_domid}"
            )
        if target.remote_domid != self.domid:
            raise PortNotOfferedError(
                f"event channel port {remote_port} of domain {remote_domid} is offered to "
                f"domain {target.remote_domid}, not to domain {self.domid}"
            )
        port = self.world._allocate_port(self.domid)
        ch = InHeapEventChannel(self, loop, port, remote_domid)
        ch._peer, target._peer = target, ch
        ch._bound = target._bound = True
        self._register(ch)
        ch._bound_by_connect()
        target._peer_bound()
        return ch

    def _register(self, ch: InHeapEventChannel) -> None:
        self._live.add(ch)
        self.world._ports[(self.domid, ch.port)] = ch

    def _forget(self, ch: InHeapEventChannel) -> None:
        self._live.discard(ch)
        if self.world._ports.get((self.domid, ch.port)) is ch:
            del self.world._ports[(self.domid, ch.port)]

    def live(self) -> list[InHeapEventChannel]:
        """Channels opened through this object and not yet closed."""
        return sorted(self._live, key=lambda c: c.port)

    def close_all(self) -> None:
        for ch in self.live():
            ch.close()


__all__ = ["InHeapEventChannel", "InHeapEventChannels"]
