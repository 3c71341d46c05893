"""The PV console (``io/console.h``): a split device on the xenbus framework.

* :mod:`aioxen.console.device` -- the back end and front end drivers and their asyncio
  stream endpoints (:class:`ConsoleBackend`, :class:`ConsoleFrontend`), and the toolstack
  step (:func:`create_console`, :func:`remove_console`).
* :mod:`aioxen.console.cli` -- ``aioxen console DOMID``.

Like :mod:`aioxen.net` and :mod:`aioxen.blk`, one package per device; the console's byte
ring itself is :data:`aioxen.rings.byte.CONSOLE`.  See ``docs/rings.md``.
"""

from __future__ import annotations

from aioxen.console.device import (
    DEFAULT_DEVID,
    ConsoleBackend,
    ConsoleBackendDriver,
    ConsoleFrontend,
    ConsoleFrontendDriver,
    create_console,
    remove_console,
)

__all__ = [
    "DEFAULT_DEVID",
    "ConsoleBackend",
    "ConsoleBackendDriver",
    "ConsoleFrontend",
    "ConsoleFrontendDriver",
    "create_console",
    "remove_console",
]
