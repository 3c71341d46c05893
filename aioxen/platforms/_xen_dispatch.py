"""Port dispatch for one ``/dev/xen/evtchn`` file descriptor (pure: no I/O, no asyncio).

Theory of operation
-------------------
The kernel's evtchn device queues the number of every port that fired (a native u32) and
*masks* that port from then until user space writes the number back.  One fd serves every
port a platform object binds, so the port numbers must be fanned out to the channels:
[`PortDispatcher`][] maps each bound port to a [`PortSink`][] (in practice an
[`ChannelCore`][aioxen.platforms._channel.ChannelCore], which owns the coalescing flag, the
waiters and the handler).

The I/O layer ([`aioxen.platforms._xen_events`][]) reads one port per readiness callback,
[`parse`][PortDispatcher.parse]\\ s it, writes the *registered* ports back to unmask them
([`encode`][PortDispatcher.encode]), and only then calls [`dispatch`][PortDispatcher.dispatch],
so that an event arriving while the sink runs is queued again rather than lost.  A port
that is no longer registered (unbound after it fired) is a stale entry and is dropped.
After a ring overflow the device is reset and [`fire_all`][PortDispatcher.fire_all] gives every
sink one (possibly spurious) batch, because the lost entries can no longer say which ports
fired; a spurious wake-up is harmless, a lost one is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from aioxen.platforms.xen_abi import EVTCHN_PORT


class PortSink(Protocol):
    """What a bound port delivers to."""

    def _events_arrived(self) -> None: ...

    def _peer_gone(self) -> None: ...


class PortDispatcher:
    """Fan port numbers read from one evtchn fd out to their sinks."""

    def __init__(self) -> None:
        self._sinks: dict[int, PortSink] = {}

    def add(self, port: int, sink: PortSink) -> None:
        if port in self._sinks:
            raise ValueError(f"event channel port {port} is already registered")
        self._sinks[port] = sink

    def remove(self, port: int) -> PortSink | None:
        return self._sinks.pop(port, None)

    def get(self, port: int) -> PortSink | None:
        return self._sinks.get(port)

    def __contains__(self, port: object) -> bool:
        return port in self._sinks

    def __len__(self) -> int:
        return len(self._sinks)

    def __iter__(self) -> Iterator[PortSink]:
        return iter(list(self._sinks.values()))

    def ports(self) -> list[int]:
        return list(self._sinks)

    @staticmethod
    def parse(data: bytes) -> list[int]:
        """Port numbers in a ``read()`` result (a trailing partial word is ignored)."""
        usable = len(data) - len(data) % EVTCHN_PORT.size
        return [p for (p,) in EVTCHN_PORT.iter_unpack(data[:usable])]

    @staticmethod
    def encode(ports: list[int]) -> bytes:
        """What to ``write()`` to unmask ``ports``."""
        return b"".join(EVTCHN_PORT.pack(p) for p in ports)

    def to_unmask(self, ports: list[int]) -> list[int]:
        """The registered ports among ``ports`` (each once, in order)."""
        return list(dict.fromkeys(p for p in ports if p in self._sinks))

    def dispatch(self, port: int) -> bool:
        """Deliver one batch to ``port``'s sink; false for a stale (unregistered) port."""
        sink = self._sinks.get(port)
        if sink is None:
            return False
        sink._events_arrived()
        return True

    def fire_all(self) -> None:
        """One (possibly spurious) batch for every sink: after an overflow."""
        for sink in self:
            sink._events_arrived()

    def lose_all(self) -> None:
        """Every sink's peer is unreachable: the device itself failed."""
        for sink in self:
            sink._peer_gone()


__all__ = ["PortDispatcher", "PortSink"]
