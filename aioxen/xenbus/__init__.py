"""xenbus: the device state machine, front/back end drivers and the toolstack step.

* [`aioxen.xenbus.state`][] — ``XenbusState`` and the pure transition rules.
* [`aioxen.xenbus.driver`][] — [`DeviceRunner`][], [`BackendDriver`][],
  [`FrontendDriver`][], feature helpers.
* [`aioxen.xenbus.multiqueue`][] — the ``multi-queue-*`` / ``queue-N/`` key layout.
* [`aioxen.xenbus.toolstack`][] — create / remove / list devices as ``xl`` does.
"""

from __future__ import annotations

from aioxen.xenbus.driver import (
    BackendDriver,
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    backend_device,
    feature,
    frontend_device,
    negotiate,
)
from aioxen.xenbus.multiqueue import peer_queue_dirs, queue_keys
from aioxen.xenbus.state import XenbusState
from aioxen.xenbus.toolstack import DeviceInfo, add_device, list_devices, remove_device

__all__ = [
    "BackendDriver",
    "DeviceInfo",
    "DeviceRunner",
    "FrontendDriver",
    "XenbusDevice",
    "XenbusState",
    "add_device",
    "backend_device",
    "feature",
    "frontend_device",
    "list_devices",
    "negotiate",
    "peer_queue_dirs",
    "queue_keys",
    "remove_device",
]
