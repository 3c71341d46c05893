"""``aioxen.bridge``: vchan <-> TCP / Unix socket bridging for programs.

::

    from aioxen import bridge

    b = await bridge.start_bridge("tcp:127.0.0.1:8080", "vchan:0/web")
    async with b:
        await b.serve_forever()

The implementation lives in :mod:`aioxen.apps.bridge` and :mod:`aioxen.apps.addresses`;
see ``docs/apps.md``.
"""

from __future__ import annotations

from aioxen.apps.addresses import Address, TcpAddress, UnixAddress, VchanAddress, parse_address
from aioxen.apps.bridge import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE,
    Bridge,
    ConnectionInfo,
    start_bridge,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_GRACE",
    "Address",
    "Bridge",
    "ConnectionInfo",
    "TcpAddress",
    "UnixAddress",
    "VchanAddress",
    "parse_address",
    "start_bridge",
]
