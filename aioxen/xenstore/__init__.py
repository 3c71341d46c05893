"""XenStore: wire codec, client, and the ``aioxen xenstored`` engine and server.

* [`aioxen.xenstore.wire`][] -- the pure ``xs_wire.h`` codec.
* [`aioxen.xenstore.client`][] -- [`XenStoreClient`][] (``Platform.store``).
* [`aioxen.xenstore.engine`][] -- the xenstored engine (tree, permissions, transactions,
  watches, quotas), usable in-process.
* [`aioxen.xenstore.server`][] -- the engine on a Unix socket (``aioxen xenstored``).
"""

from __future__ import annotations

from aioxen.xenstore.client import Transaction, Watch, XenStoreClient
from aioxen.xenstore.errors import (
    TransactionConflict,
    XenStoreError,
    XenStoreExists,
    XenStoreNotFound,
    XenStorePermissionError,
)
from aioxen.xenstore.wire import Perm

__all__ = [
    "Perm",
    "Transaction",
    "TransactionConflict",
    "Watch",
    "XenStoreClient",
    "XenStoreError",
    "XenStoreExists",
    "XenStoreNotFound",
    "XenStorePermissionError",
]
