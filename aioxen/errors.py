"""Exceptions shared by every layer.

aioxen raises the most specific built-in exception that fits (``PermissionError``,
``FileNotFoundError``, ``ConnectionResetError``, ``ConnectionRefusedError``,
``TimeoutError``) with the domid/port/path in the message.  Its own exception classes
subclass the built-in one they refine, so ``except OSError`` (etc.) keeps working.

Defined here, shared by every layer:

- [`ProtocolError`][] -- a peer broke the wire protocol (corrupt shared indices,
  malformed messages, out-of-range values); ``field`` names the offending field.
- [`PortNotOfferedError`][] (``ConnectionRefusedError``, ``PermissionError``) -- an
  event-channel port offered to another domain.
- [`PlatformError`][] (``RuntimeError``) -- no usable platform, or a platform asked for
  something it cannot do.

Defined beside the code that raises them:

- [`aioxen.xenstore.errors.XenStoreError`][] (``OSError``) and its subclasses
  ``XenStoreNotFound`` (``FileNotFoundError``), ``XenStorePermissionError``
  (``PermissionError``), ``XenStoreExists`` (``FileExistsError``),
  ``TransactionConflict`` -- XenStore error replies.
- [`aioxen.ownership.ResourceBusy`][] (``OSError``, ``errno.EADDRINUSE``) -- a
  resource held by another live owner.
- [`aioxen.platforms._rootdir.RootPermissionError`][] (``PermissionError``) -- an
  unsafe root directory, file or socket.
- [`aioxen.vchan.endpoint.StaleAdvertisement`][] (``ConnectionRefusedError``) -- a
  vchan advertisement that is gone or already taken.
- [`aioxen.rings.aio.RingShutdown`][] (``ConnectionResetError``) -- a ring shut down
  under a pending operation; ``RingFull`` (in `aioxen.rings`) -- a local usage
  error, no free slot.
- [`aioxen.blk.front.BlkError`][] (``OSError``) -- a failed blkif request;
  ``aioxen.blk.nbdwire.NBDError`` -- a malformed NBD message; ``aioxen.blk.blkif.BadRequest``
  -- a request the back end refuses (internal to the back end).
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
