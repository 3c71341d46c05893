"""The ``unix`` platform: domains are ordinary processes on one machine, no Xen needed.

Theory of operation
-------------------
Every process that plays a domain names the same root directory (``root=`` or
``$XEN_ROOT``) and says which domid it plays (``domid=``, ``$AIOXEN_DOMID``).  The root
(mode 0700, created if missing; every file in it 0600) holds::

    $XEN_ROOT/
      evtchn/<domid>/next-port              port counter (flock)
      evtchn/<domid>/<port>.<peer-domid>    listening socket of an unbound port
      grants/<domid>/table                  grant table: header + 16-byte entry per ref (flock)
      grants/<domid>/share-<id>             backing pages of one share
      xenstored/socket                      the xenstored socket (default XENSTORED_PATH)

* Event channels ([`aioxen.platforms._unix_events`][]): one Unix stream socket per bound
  port; one byte per notification; EOF = the peer closed or died.
* Grants ([`aioxen.platforms._unix_grants`][]): page files, ``mmap``; maps compose any refs
  contiguously with ``MAP_FIXED`` and enforce grantee and read-only.
* XenStore: ``xenstored_path`` is where ``aioxen xenstored`` listens; the client lives in
  [`aioxen.xenstore`][].

Nothing needs root privileges; all processes must run as the same user.

Security: whoever can open the root's files can play any domain, so the root's permissions
are the trust boundary.  The root must be a real directory (never a link) owned by the
effective user with no group/other access, below directories only root or we can change;
everything under it is created 0700/0600 with ``O_NOFOLLOW`` (``O_EXCL`` when new) and
rewritten by rename ([`aioxen.platforms._rootdir`][]); anything else is refused with a
``PermissionError`` naming path, owner and mode.  Before connecting to the xenstored socket
the platform checks its directory the same way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aioxen.errors import PlatformError
from aioxen.platforms import _rootdir
from aioxen.platforms._leaks import ClosesAllOpened
from aioxen.platforms._unix_events import UnixEventChannel, UnixEventChannels
from aioxen.platforms._unix_grants import (
    TABLE_NAME,
    UnixGrantTable,
    UnixMapping,
    UnixShare,
    read_entries,
)
from aioxen.platforms.base import Platform

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient


def resolve_root(root: str | os.PathLike[str] | None) -> str:
    """``root`` or ``$XEN_ROOT`` as an absolute path; ``PlatformError`` if neither is set."""
    if root is None:
        root = os.environ.get("XEN_ROOT") or None
    if root is None:
        raise PlatformError(
            "the unix platform needs a root directory: pass root=... or set $XEN_ROOT "
            "(e.g. start `aioxen xenstored --root DIR` and eval the lines it prints)"
        )
    return os.path.abspath(os.fspath(root))


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and missing parents) with mode 0700, or check an existing one: a real
    directory owned by us, no group/other access, trusted ancestors.  ``RootPermissionError``
    (a ``PermissionError``) naming the path, owner and mode otherwise
    ([`aioxen.platforms._rootdir`][])."""
    try:
        _rootdir.ensure_private_dir(path)
    except NotADirectoryError as exc:
        raise PlatformError(f"{path} exists but is not a directory ({exc.strerror})") from None


class UnixPlatform(ClosesAllOpened, Platform):
    """One domain played by this process under ``root``."""

    name = "unix"

    def __init__(
        self,
        domid: int,
        root: str | os.PathLike[str] | None = None,
        xenstored_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(domid)
        self.root = resolve_root(root)
        ensure_private_dir(self.root)
        self._private_dirs: set[tuple[str, ...]] = set()
        if xenstored_path is None:
            xenstored_path = os.environ.get("XENSTORED_PATH") or os.path.join(
                self.root, "xenstored", "socket"
            )
        self.xenstored_path = os.fspath(xenstored_path)
        self._events = UnixEventChannels(self)
        self._grants = UnixGrantTable(self)

    def _ensure_dir(self, *parts: str) -> str:
        """Make (if missing) and check the private directory ``root/parts...`` (once per
        platform object); returns its path."""
        if parts not in self._private_dirs:
            _rootdir.ensure_private_subdirs(self.root, *parts)
            self._private_dirs.add(parts)
        return os.path.join(self.root, *parts)

    def _check_dir(self, *parts: str) -> str:
        """Check, without creating it, the directory ``root/parts...`` another domain made;
        ``FileNotFoundError`` if it does not exist yet."""
        if parts not in self._private_dirs:
            _rootdir.ensure_private_subdirs(self.root, *parts, create=False)
            self._private_dirs.add(parts)
        return os.path.join(self.root, *parts)

    @property
    def events(self) -> UnixEventChannels:
        return self._events

    @property
    def grants(self) -> UnixGrantTable:
        return self._grants

    def _create_store(self) -> XenStoreClient:
        from aioxen.xenstore.client import XenStoreClient

        # Inside our root the socket's directory must be private (another user's directory
        # there is the socket-hijack of issue 13); elsewhere it must be trusted.
        path = self.xenstored_path
        _rootdir.check_socket(path, private=_rootdir.inside(path, self.root))
        return XenStoreClient.for_unix_socket(path, self.domid)

    def __repr__(self) -> str:
        return f"<UnixPlatform domid={self.domid} root={self.root}>"


def root_leaks(root: str) -> list[str]:
    """Everything still bound or shared under ``root`` by any process: listening sockets,
    in-use grant entries and share backing files (for tests' leak checks)."""
    out: list[str] = []
    evtchn = os.path.join(root, "evtchn")
    for dom in sorted(os.listdir(evtchn)) if os.path.isdir(evtchn) else []:
        for name in sorted(os.listdir(os.path.join(evtchn, dom))):
            if name != "next-port":
                out.append(f"domain {dom}: unbound event channel socket {name}")
    grants = os.path.join(root, "grants")
    for dom in sorted(os.listdir(grants)) if os.path.isdir(grants) else []:
        d = os.path.join(grants, dom)
        for name in sorted(os.listdir(d)):
            if name == TABLE_NAME:
                for ref, (flags, grantee, sid, page, pid) in read_entries(
                    os.path.join(d, name)
                ).items():
                    out.append(
                        f"domain {dom}: grant ref {ref} in use (flags {flags}, grantee "
                        f"{grantee}, share {sid} page {page}, pid {pid})"
                    )
            else:
                out.append(f"domain {dom}: share backing file {name}")
    return out


__all__ = [
    "UnixEventChannel",
    "UnixEventChannels",
    "UnixGrantTable",
    "UnixMapping",
    "UnixPlatform",
    "UnixShare",
    "ensure_private_dir",
    "resolve_root",
    "root_leaks",
]
