"""Is this domain's ``console/N`` already driven by another front end (a kernel driver)?

Theory of operation
-------------------
A guest kernel may carry its own console front end: Linux's ``hvc_xen`` (built into the
Debian kernels) has a xenbus driver, ``xenconsole``, that binds every ``console/N``
(N > 0) appearing for its domain, grants its own page and publishes ``ring-ref``,
``port`` and ``Initialised``.  An aioxen [`ConsoleFrontend`][aioxen.console.ConsoleFrontend]
opened on the same device would overwrite those keys and fight the kernel for the ring.
So before its runner writes anything, the front end asks [`check_frontend_free`][]:

* **sysfs** (only on the ``xen`` platform, where the front end is this very domain):
  a xenbus device ``T/N`` appears as ``/sys/bus/xen/devices/T-N``; its ``driver`` link
  names the bound kernel driver (``.../drivers/xenconsole``); its ``module`` link, where
  there is one, names the kernel module (a built-in driver may have none: then Linux's
  name from [`LINUX_SOURCES`][], ``hvc_xen``).  A bound driver is
  [`FrontendInUse`][] (``EBUSY``) naming both and the ``unbind`` file that releases the
  device.  It is never overridden: the kernel is alive by definition.
* **XenStore** (every platform): the front end's own ``state`` is ``Initialised``,
  ``Connected`` or ``Reconfigur*`` (a session at work) but no aioxen owner record
  (``aioxen.xenbus.claim``) says which process wrote it: a foreign front end -- a kernel
  driver, or another program -- is at work, [`FrontendInUse`][] again.  With an owner
  record the claim decides as for every device: a live holder is ``EADDRINUSE``, a dead
  one's state is taken over (an aioxen front end that crashed is recovered by liveness).
  A foreign state left behind by a front end that died without an owner record cannot be
  told from a live one, so only an explicit ``force=True`` (``aioxen console --frontend
  --force``) takes such a device over.

This is a check before the claim, not a lock: a kernel driver binding in between is not
caught (it binds when the device appears, long before a user starts a front end).
"""

from __future__ import annotations

import errno
import os

from aioxen.xenbus.claim import read_holder
from aioxen.xenbus.driver import XenbusDevice, read_opt
from aioxen.xenbus.state import XenbusState, parse_state

SYSFS_XEN = "/sys/bus/xen"
"""Where Linux shows the xen bus: ``devices/T-N`` and ``drivers/NAME``."""

LINUX_SOURCES = {"xenconsole": "hvc_xen", "vbd": "xen-blkfront", "vif": "xen-netfront"}
"""Linux's name (module or source file) of its xenbus front end drivers, for a built-in
driver whose sysfs directory has no ``module`` link (Debian's ``xenconsole`` has none)."""

S = XenbusState
BUSY_STATES = (S.INITIALISED, S.CONNECTED, S.RECONFIGURING, S.RECONFIGURED)
"""Front end states that mean a front end is at work on the device."""


class FrontendInUse(OSError):
    """Another front end drives the device (``errno.EBUSY``): a kernel driver named by
    sysfs (`driver`, `module`), or a foreign XenStore state (`driver` is ``None``).
    `path` is the sysfs link or the XenStore ``state`` key that says so."""

    def __init__(
        self, message: str, path: str, driver: str | None = None, module: str | None = None
    ) -> None:
        super().__init__(errno.EBUSY, message)
        self.path = path
        self.driver = driver
        self.module = module

    def __str__(self) -> str:
        return str(self.strerror)


def kernel_driver(type_: str, devid: int, sysfs: str = SYSFS_XEN) -> tuple[str, str | None] | None:
    """``(driver, module)`` of the kernel driver bound to xenbus device ``type_-devid``
    (``module`` from the driver's ``module`` link, else [`LINUX_SOURCES`][], else
    ``None``), or ``None`` if none is bound (or there is no such sysfs)."""
    try:
        target = os.readlink(f"{sysfs}/devices/{type_}-{devid}/driver")
    except OSError:
        return None
    driver = os.path.basename(target.rstrip("/"))
    try:
        module: str | None = os.path.basename(
            os.readlink(f"{sysfs}/drivers/{driver}/module").rstrip("/")
        )
    except OSError:
        module = LINUX_SOURCES.get(driver)
    return driver, module


def kernel_driver_error(
    what: str, type_: str, devid: int, driver: str, module: str | None, sysfs: str = SYSFS_XEN
) -> FrontendInUse:
    """The [`FrontendInUse`][] for a bound kernel driver, with the way to unbind it."""
    name = f"{type_}-{devid}"
    link = f"{sysfs}/devices/{name}/driver"
    who = f"{driver} ({module})" if module and module != driver else driver
    return FrontendInUse(
        f"{what} is in use by the kernel driver {who}: {link} -> {driver}; unbind it first "
        f"(echo {name} > {sysfs}/drivers/{driver}/unbind, and echo 0 > "
        f"{sysfs}/drivers_autoprobe keeps the kernel off devices that appear later)",
        link,
        driver,
        module,
    )


async def check_frontend_free(
    dev: XenbusDevice, *, force: bool = False, sysfs: str = SYSFS_XEN
) -> None:
    """Raise [`FrontendInUse`][] if a kernel driver (sysfs, ``xen`` platform) or a foreign
    front end (XenStore state without an aioxen owner record, unless ``force``) holds
    front end device ``dev``.  Reads only."""
    what = f"{dev.type}/{dev.devid} of domain {dev.platform.domid}"
    if dev.platform.kernel_xenbus_drivers:
        bound = kernel_driver(dev.type, dev.devid, sysfs)
        if bound is not None:
            raise kernel_driver_error(what, dev.type, dev.devid, *bound, sysfs=sysfs)
    if force:
        return
    path = f"{dev.own_dir}/state"
    state = parse_state(await read_opt(dev.store, path), path)
    if state not in BUSY_STATES:
        return
    if await read_holder(dev.store, dev.own_dir) is not None:
        return  # an aioxen front end's: the claim judges it (live: EADDRINUSE; dead: ours)
    assert state is not None
    raise FrontendInUse(
        f"{what} is in use by another front end: {path} is {state.value} ({state.name.title()}) "
        f"and no aioxen process claims it (a kernel driver such as hvc_xen, or another "
        f"program); if it is a stale state left by a front end that died, take the device "
        f"over with force=True (aioxen console --frontend --force)",
        path,
    )


__all__ = [
    "BUSY_STATES",
    "LINUX_SOURCES",
    "SYSFS_XEN",
    "FrontendInUse",
    "check_frontend_free",
    "kernel_driver",
    "kernel_driver_error",
]
