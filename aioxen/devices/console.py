"""Moved: the PV console lives in [`aioxen.console`][] ([`aioxen.console.device`][]).

This module only keeps the documented import path ``aioxen.devices.console`` working.
"""

from __future__ import annotations

from aioxen.console.device import (
    DEFAULT_DEVID,
    TYPE,
    ConsoleBackend,
    ConsoleBackendDriver,
    ConsoleFrontend,
    ConsoleFrontendDriver,
    XenbusState,
    create_console,
    remove_console,
)

__all__ = [
    "DEFAULT_DEVID",
    "TYPE",
    "ConsoleBackend",
    "ConsoleBackendDriver",
    "ConsoleFrontend",
    "ConsoleFrontendDriver",
    "XenbusState",
    "create_console",
    "remove_console",
]
