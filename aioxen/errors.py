"""Exceptions shared by every layer.

aioxen raises the most specific built-in exception that fits (``PermissionError``,
``FileNotFoundError``, ``ConnectionResetError``, ``ConnectionRefusedError``,
``TimeoutError``) with the domid/port/path in the message.  The one exception of its own is
:class:`ProtocolError`: a peer broke the wire protocol (corrupt shared indices, malformed
messages, out-of-range values).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A peer violated the wire protocol; the message names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PortNotOfferedError(ConnectionRefusedError, PermissionError):
    """An event-channel port exists but was offered to another domain.

    Real Xen cannot tell this apart from "no such unbound port" (``BIND_INTERDOMAIN`` fails
    with ``EINVAL`` for both), so on every platform it is a ``ConnectionRefusedError``;
    where the platform knows the difference (``unix``, ``inheap``) it is also a
    ``PermissionError`` whose message names the domain the port is offered to.
    """


class PlatformError(RuntimeError):
    """No usable platform, or a platform was asked for something it cannot do."""


__all__ = ["PlatformError", "PortNotOfferedError", "ProtocolError"]
