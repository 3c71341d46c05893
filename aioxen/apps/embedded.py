"""A private ``unix``-platform world: a temporary ``$XEN_ROOT`` plus an in-process xenstored.

Theory of operation
-------------------
``aioxen cat -l`` without ``$XEN_ROOT`` and the demo need a world of their own, the way
MirageOS's ``unixcat -l`` made one: [`EmbeddedRoot`][] creates a fresh root directory
(``mkdtemp``: unpredictable name, mode 0700, in ``$XDG_RUNTIME_DIR`` when that is a private
directory of ours, else in the system's temporary directory), serves
[`aioxen.xenstore.server.XenStoreServer`][] on ``ROOT/xenstored/socket`` in the caller's
event loop, and renders the shell export lines
another process evaluates to join that world as some domain ([`EmbeddedRoot.exports`][]).
Closing stops the server (dropping its clients) and removes the whole root.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from types import TracebackType
from typing import Self

from aioxen.platforms._rootdir import default_parent, ensure_private_dir
from aioxen.platforms.unix import UnixPlatform
from aioxen.xenstore.server import XenStoreServer


class EmbeddedRoot:
    """``async with EmbeddedRoot() as world:`` -- ``world.root``, ``world.socket``."""

    def __init__(self, prefix: str = "aioxen-") -> None:
        self._prefix = prefix
        self.root = ""
        self.socket = ""
        self._server: XenStoreServer | None = None

    async def start(self) -> None:
        # A fresh, unpredictable, private directory (mkdtemp makes it 0700), in
        # $XDG_RUNTIME_DIR when that is ours, never a fixed shared path; checked like any
        # root before use.
        self.root = tempfile.mkdtemp(prefix=self._prefix, dir=default_parent())
        try:
            ensure_private_dir(self.root)
            self.socket = os.path.join(self.root, "xenstored", "socket")
            server = XenStoreServer(self.socket)
            await server.start()
            self._server = server
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    async def close(self) -> None:
        """Stop the xenstored and remove the root (idempotent)."""
        server, self._server = self._server, None
        try:
            if server is not None:
                await server.close()
        finally:
            if self.root:
                shutil.rmtree(self.root, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def environ(self, domid: int) -> dict[str, str]:
        """The environment variables a process needs to play ``domid`` in this world."""
        return {
            "XEN_ROOT": self.root,
            "XENSTORED_PATH": self.socket,
            "AIOXEN_PLATFORM": "unix",
            "AIOXEN_DOMID": str(domid),
        }

    def exports(self, domid: int) -> str:
        """Shell lines (``NAME=value; export NAME;``) for [`environ`][], for ``eval``."""
        return "".join(
            f"{k}={shlex.quote(v)}; export {k};\n" for k, v in self.environ(domid).items()
        )

    def platform(self, domid: int) -> UnixPlatform:
        """A (not yet opened) platform object playing ``domid`` in this world."""
        return UnixPlatform(domid, root=self.root, xenstored_path=self.socket)


__all__ = ["EmbeddedRoot"]
