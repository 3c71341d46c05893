"""The multi-queue key layout shared by split devices (``blkif.h``, ``netif.h``).

Theory of operation
-------------------
A back end that can serve several queues (one ring set and event channel each) offers
``multi-queue-max-queues = M`` with its features.  A front end that uses one queue
publishes its per-queue keys (``ring-ref``, ``event-channel``, ...) at the top of its
directory, exactly as a front end that knows nothing of queues would; one that uses
``N > 1`` queues writes ``multi-queue-num-queues = N`` and each queue's keys under
``queue-0/`` .. ``queue-<N-1>/`` instead, and keys common to all queues (``protocol``,
``ring-page-order``, ...) stay at the top::

    multi-queue-num-queues = "2"         (only when N > 1)
    ring-page-order = "1"                (shared)
    queue-0/ring-ref0 = ...              queue-1/ring-ref0 = ...
    queue-0/event-channel = ...          queue-1/event-channel = ...

[`queue_keys`][] builds that layout for the front end; [`peer_queue_dirs`][] reads it
back on the back end as one key prefix per queue (``""`` for a single queue), with the
count validated against what the back end offered.  [`STALE_KEYS`][] are the names a
front end removes before it starts (a previous front end may have used more queues).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aioxen.xenbus.driver import XenbusDevice

KEY_MAX_QUEUES = "multi-queue-max-queues"
KEY_NUM_QUEUES = "multi-queue-num-queues"
STALE_KEYS = (KEY_NUM_QUEUES, "queue-*")
"""Patterns for [`published_keys`][aioxen.xenbus.driver.FrontendDriver.published_keys]."""


def queue_dir(q: int, nqueues: int) -> str:
    """The key prefix of queue ``q`` of ``nqueues``: ``""`` or ``"queue-<q>/"``."""
    if not 0 <= q < nqueues:
        raise ValueError(f"queue {q} of {nqueues}")
    return "" if nqueues == 1 else f"queue-{q}/"


def queue_keys(
    per_queue: Sequence[Mapping[str, str]], shared: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The front end's keys for ``len(per_queue)`` queues (each queue's own keys) plus the
    ``shared`` ones, laid out as above."""
    n = len(per_queue)
    if n < 1:
        raise ValueError("at least one queue")
    keys = dict(shared or {})
    if n > 1:
        keys[KEY_NUM_QUEUES] = str(n)
    for q, own in enumerate(per_queue):
        prefix = queue_dir(q, n)
        for name, value in own.items():
            keys[prefix + name] = value
    return keys


async def peer_queue_dirs(dev: XenbusDevice, max_queues: int) -> list[str]:
    """Back end: the key prefix of each queue the front end set up (``[""]`` for one).
    A ``multi-queue-num-queues`` outside ``1..max_queues`` is a
    [`ProtocolError`][aioxen.errors.ProtocolError] naming the key."""
    n = await dev.peer_int(KEY_NUM_QUEUES, 1, 1, max(1, max_queues))
    return [queue_dir(q, n) for q in range(n)]


__all__ = [
    "KEY_MAX_QUEUES",
    "KEY_NUM_QUEUES",
    "STALE_KEYS",
    "peer_queue_dirs",
    "queue_dir",
    "queue_keys",
]
