"""vchan: libxenvchan wire-compatible byte streams between domains, for asyncio.

::

    from aioxen import vchan

    async with vchan.connect(domid, port) as (reader, writer): ...
    reader, writer = await vchan.open_connection(domid, port)
    server = await vchan.start_server(client_connected_cb, domid, port)
    transport, protocol = await vchan.create_connection(protocol_factory, domid, port)
    server = await vchan.create_server(protocol_factory, domid, port)
    transport, protocol = await vchan.create_datagram_endpoint(factory, domid, port)

``domid`` is always the *peer*; the server shares the pages (and picks the ring sizes),
the client maps them.  Every call takes ``platform=None`` (the loop's default platform).
Modules: `wire` (pure format), `endpoint` (setup
over a Platform), `advertise` (XenStore), `transport`,
`server`, `streams`, `protocols`,
`datagram`.  See ``docs/vchan.md``.
"""

from __future__ import annotations

from aioxen.vchan.client import DEFAULT_CONNECT_TIMEOUT
from aioxen.vchan.datagram import (
    MAX_DATAGRAM_HEADER,
    VchanDatagramTransport,
    create_datagram_endpoint,
)
from aioxen.vchan.endpoint import DEFAULT_SIZE, check_port, vchan_path
from aioxen.vchan.protocols import create_connection, create_server
from aioxen.vchan.server import VchanServer
from aioxen.vchan.streams import accept, connect, open_connection, start_server
from aioxen.vchan.transport import DEFAULT_BUSY_POLL, MAX_BUSY_POLL, VchanTransport
from aioxen.vchan.wire import MAX_RING_SIZE, NOTIFY_EOF, select_orders

__all__ = [
    "DEFAULT_BUSY_POLL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_SIZE",
    "MAX_BUSY_POLL",
    "MAX_DATAGRAM_HEADER",
    "MAX_RING_SIZE",
    "NOTIFY_EOF",
    "VchanDatagramTransport",
    "VchanServer",
    "VchanTransport",
    "accept",
    "check_port",
    "connect",
    "create_connection",
    "create_datagram_endpoint",
    "create_server",
    "open_connection",
    "select_orders",
    "start_server",
    "vchan_path",
]
