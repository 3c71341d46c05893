"""An in-process learning Ethernet switch between vifs (and optionally a TAP uplink).

Theory of operation
-------------------
Each attached [`Port`][] is a frame sink with the offloads it accepts.  For every frame
a port delivers ([`LearningSwitch.input`][]):

1. the source MAC, if unicast, is learned (or moved) to the ingress port, with a
   timestamp; the table is bounded (oldest entry evicted) and entries expire after
   ``ageing`` seconds, as in an 802.1D bridge;
2. a unicast destination found in the table goes to that port only (and is dropped if that
   is the ingress port: the frame is already on its segment); broadcast, multicast and
   unknown unicast destinations are flooded to every other port;
3. before a frame leaves on a port, offloads the port does not accept are resolved in
   software (checksum completed, GSO super-frame segmented) by
   [`aioxen.net.offload.resolve_offloads`][].

The switch has no I/O and no event loop: ports are plain objects with a ``send`` method,
so it is tested directly and serves netback vifs, TAPs and callbacks alike.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from aioxen.net.netif import PLAIN, FrameInfo
from aioxen.net.offload import resolve_offloads

Frame = bytes | bytearray | memoryview


@runtime_checkable
class Port(Protocol):
    """Something frames can be switched to."""

    @property
    def name(self) -> str: ...

    @property
    def accept_csum(self) -> bool:
        """Whether frames with a partial checksum (``csum_blank``) may be sent as is."""
        ...

    @property
    def accept_gso(self) -> bool:
        """Whether TCP super-frames (GSO) may be sent as is."""
        ...

    def send(self, frame: Frame, info: FrameInfo) -> object:
        """Take one frame (a copy must be made if it is kept beyond the call)."""
        ...


@dataclass
class SwitchStats:
    frames_in: int = 0
    forwarded: int = 0
    flooded: int = 0
    filtered: int = 0
    dropped: int = 0  # offloads that could not be resolved
    learned: int = 0
    moved: int = 0


@dataclass
class FunctionPort:
    """A [`Port`][] around a function (e.g. the user callback of ``aioxen netback``)."""

    name: str
    func: Callable[[Frame, FrameInfo], object]
    accept_csum: bool = False
    accept_gso: bool = False
    frames: int = field(default=0)

    def send(self, frame: Frame, info: FrameInfo) -> object:
        self.frames += 1
        return self.func(frame, info)


def is_multicast(mac: bytes | memoryview) -> bool:
    """Group (multicast or broadcast) address: the I/G bit of the first octet."""
    return bool(mac[0] & 1)


class LearningSwitch:
    """A MAC-learning switch over [`Port`][] objects."""

    def __init__(
        self,
        *,
        max_entries: int = 4096,
        ageing: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self._ports: list[Port] = []
        self._table: OrderedDict[bytes, tuple[Port, float]] = OrderedDict()
        self._max = max_entries
        self._ageing = ageing
        self._clock = clock
        self.stats = SwitchStats()

    @property
    def ports(self) -> tuple[Port, ...]:
        return tuple(self._ports)

    def add_port(self, port: Port) -> None:
        if any(p is port for p in self._ports):
            raise ValueError(f"port {port.name} is already attached")
        self._ports.append(port)

    def remove_port(self, port: Port) -> None:
        """Detach ``port`` and forget every address learned on it."""
        self._ports = [p for p in self._ports if p is not port]
        for mac in [m for m, (p, _) in self._table.items() if p is port]:
            del self._table[mac]

    def lookup(self, mac: bytes) -> Port | None:
        entry = self._table.get(bytes(mac))
        if entry is None:
            return None
        port, seen = entry
        if self._clock() - seen > self._ageing:
            del self._table[bytes(mac)]
            return None
        return port

    def table(self) -> dict[bytes, str]:
        """The live MAC table, ``mac -> port name`` (expired entries omitted)."""
        now = self._clock()
        return {m: p.name for m, (p, t) in self._table.items() if now - t <= self._ageing}

    def _learn(self, mac: bytes, port: Port) -> None:
        entry = self._table.get(mac)
        if entry is None:
            self.stats.learned += 1
            if len(self._table) >= self._max:
                self._table.popitem(last=False)
        else:
            if entry[0] is not port:
                self.stats.moved += 1
            self._table.move_to_end(mac)
        self._table[mac] = (port, self._clock())

    def input(self, ingress: Port, frame: Frame, info: FrameInfo = PLAIN) -> None:
        """Switch one frame that arrived on ``ingress``."""
        self.stats.frames_in += 1
        if len(frame) < 14:
            self.stats.dropped += 1
            return
        dst = bytes(frame[0:6])
        src = bytes(frame[6:12])
        if not is_multicast(src):
            self._learn(src, ingress)
        if not is_multicast(dst):
            out = self.lookup(dst)
            if out is not None:
                if out is ingress:
                    self.stats.filtered += 1
                else:
                    self.stats.forwarded += 1
                    self._emit(out, frame, info)
                return
        self.stats.flooded += 1
        for port in self._ports:
            if port is not ingress:
                self._emit(port, frame, info)

    def _emit(self, port: Port, frame: Frame, info: FrameInfo) -> None:
        if info is PLAIN or (
            (port.accept_csum or not info.csum_blank) and (port.accept_gso or not info.gso_type)
        ):
            port.send(frame, info)
            return
        parts = resolve_offloads(
            frame, info, accept_csum=port.accept_csum, accept_gso=port.accept_gso
        )
        if not parts:
            self.stats.dropped += 1
        for part, pinfo in parts:
            port.send(part, pinfo)


__all__ = ["FunctionPort", "LearningSwitch", "Port", "SwitchStats", "is_multicast"]
