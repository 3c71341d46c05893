"""XenStore error replies as Python exceptions.

Every error is a [`XenStoreError`][] (an ``OSError`` carrying ``errno``, the XenStore
error name, the operation and the path).  The common ones are *also* the matching built-in
exception, so ``except FileNotFoundError`` works:

=========  ===============================================
ENOENT     [`XenStoreNotFound`][] (``FileNotFoundError``)
EACCES     [`XenStorePermissionError`][] (``PermissionError``)
EEXIST     [`XenStoreExists`][] (``FileExistsError``)
EAGAIN     [`TransactionConflict`][] (commit lost a race: run the transaction again)
others     [`XenStoreError`][] with ``errno`` set
=========  ===============================================
"""

from __future__ import annotations

import errno as _errno
import os


class XenStoreError(OSError):
    """A XenStore ERROR reply (or a local refusal with the same meaning)."""

    def __init__(
        self, errno_value: int, name: str | None = None, *, op: str = "", path: str | None = None
    ) -> None:
        self.xs_name = name or _errno.errorcode.get(errno_value, str(errno_value))
        self.op = op
        where = f" {op}" if op else ""
        detail = f"XenStore{where} failed with {self.xs_name} ({os.strerror(errno_value)})"
        if path is not None:
            super().__init__(errno_value, detail, path)
        else:
            super().__init__(errno_value, detail)

    def __str__(self) -> str:
        text = str(self.strerror)
        if self.filename is not None:
            text += f": {self.filename!r}"
        return text


class XenStoreNotFound(XenStoreError, FileNotFoundError):
    """ENOENT: the node (or, for ``rm``, its parent) does not exist."""


class XenStorePermissionError(XenStoreError, PermissionError):
    """EACCES (or EPERM): the node's permissions deny this domain the operation."""


class XenStoreExists(XenStoreError, FileExistsError):
    """EEXIST: e.g. a watch with this path and token is already registered."""


class TransactionConflict(XenStoreError):
    """EAGAIN on TRANSACTION_END: another writer touched what the transaction used."""


_BY_ERRNO: dict[int, type[XenStoreError]] = {
    _errno.ENOENT: XenStoreNotFound,
    _errno.EACCES: XenStorePermissionError,
    _errno.EPERM: XenStorePermissionError,
    _errno.EEXIST: XenStoreExists,
    _errno.EAGAIN: TransactionConflict,
}


def error_for(
    errno_value: int, name: str | None = None, *, op: str = "", path: str | None = None
) -> XenStoreError:
    """The exception for an errno, naming the operation and path."""
    cls = _BY_ERRNO.get(errno_value, XenStoreError)
    return cls(errno_value, name, op=op, path=path)


__all__ = [
    "TransactionConflict",
    "XenStoreError",
    "XenStoreExists",
    "XenStoreNotFound",
    "XenStorePermissionError",
    "error_for",
]
