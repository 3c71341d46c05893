"""TAP glue: a TAP device wired to a backend vif or a netfront transport, whose other
side is the kernel's network stack.

Theory of operation
-------------------
A TAP with ``IFF_VNET_HDR`` speaks the same offloads as netif, so frames cross unchanged:
partial checksums and TCP super-frames go kernel → TAP → ring → TAP → kernel and are only
finished (or segmented) by the receiving kernel, which is what makes a TCP stream through
the pair fast.  The TAP is told (``TUNSETOFFLOAD``) to hand over only what the ring's far
end negotiated; a super-frame longer than netif's 65535-byte limit is re-cut into several
([`aioxen.net.offload.split_gso`][]).

Back-pressure: when the ring cannot take more (netfront's ``pause_writing``, a backend
vif's full RX queue) the TAP stops being read, so the kernel queues and, eventually,
drops — exactly what a NIC without free descriptors does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aioxen.net.keys import BackendFeatures
from aioxen.net.netif import XEN_NETIF_MAX_TX_SIZE, FrameInfo
from aioxen.net.offload import split_gso
from aioxen.net.tap import TapDevice, TapPort, set_mac, set_mtu
from aioxen.net.vif import Vif

log = logging.getLogger(__name__)

Frame = bytes | bytearray | memoryview


def _fit(
    send: Callable[[Frame, FrameInfo], object], limit: int
) -> Callable[[Frame, FrameInfo], None]:
    """Wrap ``send`` so that super-frames longer than ``limit`` are split first and other
    over-long frames are dropped."""

    def forward(frame: Frame, info: FrameInfo) -> None:
        if len(frame) <= limit:
            send(frame, info)
            return
        if info.gso_type:
            try:
                parts = split_gso(frame, info, limit)
            except ValueError as exc:
                log.debug("dropping %d-byte super-frame: %s", len(frame), exc)
                return
            for part, pinfo in parts:
                send(part, pinfo)
        else:
            log.debug("dropping %d-byte frame (limit %d)", len(frame), limit)

    return forward


def attach_tap_to_vif(vif: Vif, tap: TapDevice) -> TapPort:
    """Cross-connect a backend ``vif`` and ``tap``; returns the reading port (close it to
    detach)."""
    f = vif.features
    tap.set_offload(
        csum=f.csum_offload and f.ipv6_csum_offload,
        tso4=f.sg and f.gso_tcpv4 and f.csum_offload,
        tso6=f.sg and f.gso_tcpv6 and f.ipv6_csum_offload,
    )
    limit = XEN_NETIF_MAX_TX_SIZE if f.sg else 4096
    port = TapPort(tap, _fit(vif.send, limit))
    vif.set_deliver(tap.write_frame)
    vif.rx_pause = port.pause_reading
    vif.rx_resume = port.resume_reading
    port.resume_reading()
    return port


class TapFrontend(asyncio.DatagramProtocol):
    """A netfront protocol that forwards every frame to and from a TAP device.

    ``configure_link``: copy the vif's MAC and MTU from XenStore onto the TAP, so the
    kernel's interface *is* the guest NIC.
    """

    def __init__(self, tap: TapDevice, *, configure_link: bool = True) -> None:
        self.tap = tap
        self._configure = configure_link
        self.port: TapPort | None = None
        self.transport: Any = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        feats: BackendFeatures = transport.get_extra_info("backend_features")
        sg = feats.sg
        if self._configure:
            set_mac(self.tap.name, transport.get_extra_info("mac"))
            set_mtu(self.tap.name, transport.get_extra_info("mtu"))
        self.tap.set_offload(csum=True, tso4=sg and feats.gso_tcpv4, tso6=sg and feats.gso_tcpv6)
        limit = XEN_NETIF_MAX_TX_SIZE if sg else 4096
        self.port = TapPort(self.tap, _fit(self._send, limit))
        self.port.resume_reading()

    def _send(self, frame: Frame, info: FrameInfo) -> None:
        self.transport.sendto(frame, info)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.tap.write_frame(data, addr)

    def pause_writing(self) -> None:
        if self.port is not None:
            self.port.pause_reading()

    def resume_writing(self) -> None:
        if self.port is not None:
            self.port.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.port is not None:
            self.port.pause_reading()
        if not self.closed.done():
            self.closed.set_result(exc)


__all__ = ["TapFrontend", "attach_tap_to_vif"]
