"""Small asyncio helpers shared by the protocol layers.

[`wait_out`][] waits for a clean-up task to finish even while the caller is being
cancelled: what that task releases (an advertisement, an endpoint) must not outlive
whoever awaited it.  The cancellation is handed back, to be re-raised once the caller has
finished its own clean-up.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_out(fut: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait until ``fut`` is done, also through cancellations of the calling task;
    return the last ``CancelledError`` that interrupted the wait (the caller re-raises it
    when done), or ``None``.  ``fut``'s own result or exception is left in it."""
    interrupted: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait((fut,))
        except asyncio.CancelledError as exc:
            interrupted = exc
    return interrupted


__all__ = ["wait_out"]
