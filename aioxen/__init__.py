"""aioxen: asyncio-native Xen inter-domain communication.

The same protocol code (vchan, shared-memory rings, XenStore/xenbus devices) runs on three
platforms: real Xen (``xen``), ordinary processes on one machine (``unix``) and one process
(``inheap``).  Start with [`aioxen.platform`][].
"""

from __future__ import annotations

from aioxen.errors import PlatformError, ProtocolError
from aioxen.platforms import Platform, default_platform, platform
from aioxen.platforms.base import PAGE_SIZE

__version__ = "0.1.0"

__all__ = [
    "PAGE_SIZE",
    "Platform",
    "PlatformError",
    "ProtocolError",
    "__version__",
    "default_platform",
    "platform",
]
