"""``aioxen.bridge``: the public API of vchan <-> TCP / Unix socket bridging, for programs.

This is the documented import path (``docs/apps.md``, ``docs/api.md``); it only re-exports.

::

    from aioxen import bridge

    b = await bridge.start_bridge("tcp:127.0.0.1:8080", "vchan:0/web")
    async with b:
        await b.serve_forever()

The implementation is the ``aioxen bridge`` application, `aioxen.apps.bridge` (beside
`aioxen.apps.cat` for ``aioxen cat``), with the address syntax in
`aioxen.apps.addresses`.  (The TAP <-> vif glue of the network devices is
`aioxen.net.tap_glue`, not a bridge of this kind.)
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
