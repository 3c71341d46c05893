"""Network devices: the netif codec, netfront (an asyncio DatagramTransport) and netback.

* [`create_frontend`][] — connect a vif and get ``(transport, protocol)``;
* [`Netback`][aioxen.net.back.Netback] — serve vifs, with frames going to a TAP
  (`aioxen.net.tap`), a learning switch (`aioxen.net.switch`) or a callback;
* [`aioxen.net.netif`][] — the ``io/netif.h`` wire format.
"""

from __future__ import annotations

from aioxen.net.back import Netback, Vif, create_vif_device, serve_vif
from aioxen.net.front import NetfrontTransport, create_frontend
from aioxen.net.netif import PLAIN, FrameInfo, NetStats

__all__ = [
    "PLAIN",
    "FrameInfo",
    "NetStats",
    "Netback",
    "NetfrontTransport",
    "Vif",
    "create_frontend",
    "create_vif_device",
    "serve_vif",
]
