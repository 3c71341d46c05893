"""The PV console (``io/console.h``): a split device on the xenbus framework.

* `aioxen.console.device` -- the back end and front end drivers and their asyncio
  stream endpoints ([`ConsoleBackend`][], [`ConsoleFrontend`][]), and the toolstack
  step ([`create_console`][], [`remove_console`][]).
* `aioxen.console.cli` -- ``aioxen console DOMID``.

Like [`aioxen.net`][] and [`aioxen.blk`][], one package per device; the console's byte
ring itself is [`aioxen.rings.byte.CONSOLE`][].  See ``docs/rings.md``.
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
