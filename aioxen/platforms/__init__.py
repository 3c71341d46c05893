"""Platform selection: ``aioxen.platform(name=None, **options)``.

``name`` is ``"xen"``, ``"unix"`` or ``"inheap"``.  Without a name the choice is
``$AIOXEN_PLATFORM`` if set, else ``"xen"`` when ``/dev/xen/evtchn`` exists, else
``"unix"`` when ``$XEN_ROOT`` is set, else [`PlatformError`][aioxen.errors.PlatformError].

Options common to all platforms: ``domid`` (default ``$AIOXEN_DOMID``, else 0 — on ``xen``
the real domid is read from XenStore).  ``unix`` also takes ``root`` (default ``$XEN_ROOT``)
and ``xenstored_path`` (default ``$XENSTORED_PATH``, else ``<root>/xenstored/socket``);
``inheap`` takes ``world`` (default: one shared per process).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping as _Environ  # (Mapping here is the grant mapping)
from typing import Any

from aioxen.errors import PlatformError
from aioxen.platforms.base import (
    PAGE_SIZE,
    EventChannel,
    EventChannels,
    GrantTable,
    Mapping,
    Platform,
    Share,
)

PLATFORM_NAMES = ("xen", "unix", "inheap")
EVTCHN_DEVICE = "/dev/xen/evtchn"


def choose_platform_name(
    environ: _Environ[str, str] | None = None, *, fallback: str | None = None
) -> str:
    """The platform name the environment selects (see module docstring).

    ``environ``: the environment to read (default ``os.environ``).  ``fallback``: the
    name to return instead of raising [`PlatformError`][] when the environment selects
    nothing (no ``$AIOXEN_PLATFORM``, not under Xen, no ``$XEN_ROOT``) -- e.g. ``"unix"``
    for a command that then creates a root of its own, as ``aioxen cat -l`` does."""
    env = os.environ if environ is None else environ
    name = env.get("AIOXEN_PLATFORM")
    if name:
        if name not in PLATFORM_NAMES:
            raise PlatformError(
                f"AIOXEN_PLATFORM={name!r} is not one of {', '.join(PLATFORM_NAMES)}"
            )
        return name
    if os.path.exists(EVTCHN_DEVICE):
        return "xen"
    if env.get("XEN_ROOT"):
        return "unix"
    if fallback is not None:
        return fallback
    raise PlatformError(
        "no aioxen platform available: not running under Xen (no /dev/xen/evtchn) and "
        "$XEN_ROOT is not set; start `aioxen xenstored --root DIR` and eval its output, "
        "or set AIOXEN_PLATFORM=inheap for a single process"
    )


def platform(name: str | None = None, **options: Any) -> Platform:
    """Create a [`Platform`][] (a new object on each call)."""
    if name is None:
        name = choose_platform_name()
    if "domid" not in options and name != "xen":
        options["domid"] = int(os.environ.get("AIOXEN_DOMID", "0"))
    if name == "inheap":
        from aioxen.platforms.inheap import InHeapPlatform

        return InHeapPlatform(**options)
    if name == "unix":
        from aioxen.platforms.unix import UnixPlatform

        return UnixPlatform(**options)
    if name == "xen":
        from aioxen.platforms.xen import XenPlatform

        return XenPlatform(**options)
    raise PlatformError(f"unknown platform {name!r}; expected one of {', '.join(PLATFORM_NAMES)}")


_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Platform] = (
    weakref.WeakKeyDictionary()
)


async def default_platform() -> Platform:
    """The environment-selected platform shared by device calls given ``platform=None``.

    One per running event loop, opened on first use; closed with the loop's lifetime.
    """
    loop = asyncio.get_running_loop()
    plat = _defaults.get(loop)
    if plat is None:
        plat = platform()
        await plat.open()
        _defaults[loop] = plat
    return plat


async def resolve(plat: Platform | None) -> Platform:
    """``plat`` itself, or the default platform for ``None``."""
    return plat if plat is not None else await default_platform()


__all__ = [
    "PAGE_SIZE",
    "PLATFORM_NAMES",
    "EventChannel",
    "EventChannels",
    "GrantTable",
    "Mapping",
    "Platform",
    "Share",
    "choose_platform_name",
    "default_platform",
    "platform",
    "resolve",
]
