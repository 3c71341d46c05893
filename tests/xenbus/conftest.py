"""xenbus tests: the ``world`` fixture (inheap and unix) from ``xenbus_world``."""

from __future__ import annotations

from xenbus_world import world, xenstored_proc

__all__ = ["world", "xenstored_proc"]
