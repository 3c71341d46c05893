"""The ``xen`` platform: real event channels, grants and XenStore through Linux's /dev/xen.

Theory of operation
-------------------
This module only assembles the pieces; each has its own module and docstring:

* events — [`aioxen.platforms._xen_events`][]: one ``/dev/xen/evtchn`` fd per platform
  object, watched with ``loop.add_reader``; one port read, unmasked and dispatched per
  wake-up ([`aioxen.platforms._xen_dispatch`][]); ``EFBIG`` overflow handled with
  ``IOCTL_EVTCHN_RESET``.
* grants — [`aioxen.platforms._xen_grants`][]: ``/dev/xen/gntalloc`` to share,
  ``/dev/xen/gntdev`` to map, ``mmap`` of the offsets the ioctls return, unmap notifies.
* ABI — [`aioxen.platforms.xen_abi`][]: every ioctl number and struct layout, checked
  against ``libxen-dev``'s headers by ``tests/test_xen_abi.py``.

**Peer loss on Xen** is not reported by the hypervisor: a dead peer's interdomain port just
stops delivering.  Protocols detect it through shared memory — the peer's unmap notify
clears a live byte and sends a last event — so ``EventChannel.peer_lost`` is only true here
when the evtchn device itself reports an error.

**Own domid.**  ``XenPlatform(domid=N)`` states it.  Without it [`XenPlatform.open`][]
learns it ([`XenPlatform._discover_domid`][]): 0 when ``/proc/xen/capabilities`` says
``control_d`` (dom0), otherwise the relative XenStore key ``domid`` read through
[`store`][aioxen.platforms.base.Platform.store].  Until then [`XenPlatform.domid`][] raises.

Opening needs ``/dev/xen/evtchn``; without it [`XenPlatform.open`][] raises
``FileNotFoundError`` naming the device.  gntalloc and gntdev are opened on first use.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from aioxen.errors import PlatformError
from aioxen.platforms._leaks import LeakChecks
from aioxen.platforms._xen_events import XenEventChannel, XenEventChannels
from aioxen.platforms._xen_grants import XenGrantTable, XenMapping, XenShare
from aioxen.platforms.base import Platform, check_domid

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient

DEFAULT_DEVICE_DIR = "/dev/xen"
CAPABILITIES_PATH = "/proc/xen/capabilities"
GNTALLOC_DEFAULT_LIMIT = 1024
"""Pages one process may have granted through gntalloc at a time (the Linux module
parameter ``limit``, default 1024): [`Platform.grant_share_limit`][]."""


def is_control_domain(path: str = CAPABILITIES_PATH) -> bool:
    """True in dom0 (xenfs reports ``control_d``)."""
    try:
        with open(path) as f:
            return "control_d" in f.read()
    except OSError:
        return False


class XenPlatform(LeakChecks, Platform):
    """The ``xen`` platform: this process runs in a Xen domain with ``/dev/xen`` devices.

    ``domid``: this domain's id if known, else learned by `open`.
    ``device_dir``: where the devices live (default ``/dev/xen``).
    """

    name = "xen"
    grant_share_limit = GNTALLOC_DEFAULT_LIMIT
    kernel_xenbus_drivers = True

    def __init__(self, domid: int | None = None, device_dir: str = DEFAULT_DEVICE_DIR) -> None:
        super().__init__(0 if domid is None else domid)
        self._domid_known = domid is not None
        self._device_dir = device_dir
        self._events = XenEventChannels(device_dir, self._known_domid)
        self._grants = XenGrantTable(device_dir)
        self._opened = False
        self._closed = False

    def _known_domid(self) -> int | None:
        return self._domid if self._domid_known else None

    @property
    def domid(self) -> int:
        if not self._domid_known:
            raise PlatformError(
                "the xen platform learns its domid in open(): use `async with plat:` "
                "(or pass domid=...)"
            )
        return self._domid

    @property
    def device_dir(self) -> str:
        return self._device_dir

    @property
    def events(self) -> XenEventChannels:
        return self._events

    @property
    def grants(self) -> XenGrantTable:
        return self._grants

    async def open(self) -> None:
        if self._closed:
            raise PlatformError("this xen platform object is closed; create a new one")
        if self._opened:
            return
        self._events.open(asyncio.get_running_loop())
        self._opened = True
        if not self._domid_known:
            self._domid = check_domid(await self._discover_domid(), "own domid")
            self._domid_known = True

    async def _discover_domid(self) -> int:
        """This domain's id: 0 in dom0, else XenStore's relative key ``domid``."""
        if is_control_domain():
            return 0
        try:
            store = self.store
        except NotImplementedError:
            raise PlatformError(
                "cannot learn this domain's id: not dom0 and no XenStore client; "
                "pass domid=... to aioxen.platform('xen', ...)"
            ) from None
        value = await store.read("domid")
        try:
            return int(value)
        except ValueError:
            raise PlatformError(f"XenStore key 'domid' holds {value!r}, not a number") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.end_users()  # transports first: flush (bounded) or abort
        self._events.close()
        self._grants.close()
        await self._close_store()

    def _create_store(self) -> XenStoreClient:
        """Xen's own rule (libxenstore): the xenstored socket if it exists (dom0 running
        xenstored), else the kernel's ``/dev/xen/xenbus``."""
        from aioxen.platforms._rootdir import check_socket
        from aioxen.xenstore.client import XenStoreClient
        from aioxen.xenstore.transport import default_socket_path

        sock = default_socket_path()
        if os.path.exists(sock):
            check_socket(sock, private=False)  # a listener another user could have planted
            return XenStoreClient.for_unix_socket(sock, 0)
        return XenStoreClient.for_xenbus(os.path.join(self._device_dir, "xenbus"))

    def __repr__(self) -> str:
        domid = self._domid if self._domid_known else "?"
        return f"<XenPlatform domid={domid} devices={self._device_dir}>"


__all__ = [
    "XenEventChannel",
    "XenEventChannels",
    "XenGrantTable",
    "XenMapping",
    "XenPlatform",
    "XenShare",
    "is_control_domain",
]
