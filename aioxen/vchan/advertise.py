"""The XenStore half of the vchan handshake: publishing and finding an advertisement.

Theory of operation
-------------------
A server advertises one waiting endpoint under
``/local/domain/<server>/data/vchan/<client>/<port>`` (:func:`~aioxen.vchan.endpoint.vchan_path`)
as two decimal keys, ``ring-ref`` (grant of the control page) and ``event-channel`` (its
unbound port), written in *one transaction* together with permissions ``n<server>``
``r<client>`` on each key (libxenvchan's ``init_xs_srv``).  Re-advertising overwrites the
same keys; closing the server removes the directory.

A client watches ``<path>/event-channel`` (the key, not the directory: the client may
only read the keys) and, on every change, reads ``event-channel``, ``ring-ref`` and
``event-channel`` again.  Without a transaction (the per-domain transaction quota is 10)
the double read rejects a pair torn by a concurrent re-advertisement; a torn pair that
slipped through is caught by the endpoint checks (:class:`StaleAdvertisement`) and simply
retried on the next change.  Values of 0 or non-decimal text are a
:class:`~aioxen.ProtocolError` (libxenvchan treats 0 as invalid too).

Quotas.  Every concurrent connect in one process to the same path shares *one* XenStore
watch (:class:`_SharedWatch`; Xen allows 128 watches per domain), and advertisement
transactions are limited to a few at a time per store client (10 open transactions per
domain).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import weakref
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.platform.base import Platform

RING_REF = "ring-ref"
EVENT_CHANNEL = "event-channel"

MAX_CONCURRENT_TRANSACTIONS = 4
"""Advertisement transactions in flight per store client (Xen's quota is 10)."""

UNWATCH_TIMEOUT = 2.0

_RETRYABLE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOSPC, errno.EBUSY})


def _store(platform: Platform) -> Any:
    return platform.store


_tx_limits: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _tx_limit(store: Any) -> asyncio.Semaphore:
    sem = _tx_limits.get(store)
    if sem is None:
        sem = _tx_limits[store] = asyncio.Semaphore(MAX_CONCURRENT_TRANSACTIONS)
    return sem


async def publish(
    platform: Platform, path: str, peer_domid: int, ring_ref: int, event_channel: int
) -> None:
    """Write (or overwrite) the advertisement at ``path`` in one transaction."""
    from aioxen.xenstore import Perm

    store = _store(platform)
    perms = [Perm(platform.domid, "n"), Perm(peer_domid, "r")]

    async def body(tx: Any) -> None:
        for key, value in ((RING_REF, ring_ref), (EVENT_CHANNEL, event_channel)):
            await tx.write(f"{path}/{key}", str(value).encode("ascii"))
            await tx.set_perms(f"{path}/{key}", perms)

    async with _tx_limit(store):
        for attempt in range(50):
            try:
                await store.transact(body)
                return
            except OSError as exc:
                # Transaction quota exhausted by someone else: back off and retry.
                if exc.errno not in _RETRYABLE_ERRNOS or attempt == 49:
                    raise
                await asyncio.sleep(min(0.2, 0.005 * 2**attempt))


async def withdraw(platform: Platform, path: str) -> None:
    """Remove the advertisement directory (missing is fine)."""
    with contextlib.suppress(FileNotFoundError):
        await _store(platform).rm(path)


def _parse(value: bytes, key: str, path: str) -> int:
    text = value.decode("ascii", "replace").strip("\0")
    if not text.isdigit() or len(text) > 10 or int(text) == 0 or int(text) > 0xFFFFFFFF:
        raise ProtocolError(
            f"vchan advertisement {path}/{key} has invalid value {value!r} "
            "(expected a non-zero decimal u32)",
            field=key,
        )
    return int(text)


async def read(platform: Platform, path: str) -> tuple[int, int] | None:
    """``(ring_ref, event_channel)`` advertised at ``path``, or ``None`` if absent (or not
    yet readable by us)."""
    store = _store(platform)
    try:
        ec1 = await store.read(f"{path}/{EVENT_CHANNEL}")
        rr = await store.read(f"{path}/{RING_REF}")
        ec2 = await store.read(f"{path}/{EVENT_CHANNEL}")
    except (FileNotFoundError, PermissionError):
        return None
    if ec1 != ec2:
        return None  # torn by a re-advertisement; the watch fires again
    return _parse(rr, RING_REF, path), _parse(ec1, EVENT_CHANNEL, path)


class _SharedWatch:
    """One XenStore watch on a key, shared by every waiter in this process."""

    def __init__(self, store: Any, key: str, registry: dict[str, _SharedWatch]) -> None:
        self._store = store
        self._key = key
        self._registry = registry
        self._users = 0
        self._error: BaseException | None = None
        self.generation = 0
        self._changed = asyncio.Event()
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async with self._store.watch(self._key) as w:
                if not self._ready.done():
                    self._ready.set_result(None)
                async for _ in w:
                    self.generation += 1
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            self._error = exc
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        finally:
            if self._registry.get(self._key) is self:
                del self._registry[self._key]

    async def wait_registered(self) -> None:
        await asyncio.shield(self._ready)

    async def wait_change(self, seen: int, timeout: float) -> None:
        """Return once :attr:`generation` moved past ``seen`` (or after ``timeout``)."""
        if self._error is not None:
            raise self._error
        if self.generation != seen:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        if self._error is not None:
            raise self._error

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> asyncio.Task[None] | None:
        """Drop one user; the last one cancels the watch and gets its task to await."""
        self._users -= 1
        if self._users:
            return None
        if self._registry.get(self._key) is self:
            del self._registry[self._key]
        self._task.cancel()
        return self._task


_watches: weakref.WeakKeyDictionary[Any, dict[str, _SharedWatch]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def watch_key(platform: Platform, key: str) -> Any:
    """``async with watch_key(plat, key) as sw``: a shared watch (see :class:`_SharedWatch`)."""
    store = _store(platform)
    registry = _watches.get(store)
    if registry is None:
        registry = _watches[store] = {}
    sw = registry.get(key)
    if sw is None or sw._error is not None:
        sw = registry[key] = _SharedWatch(store, key, registry)
    sw.acquire()
    try:
        await sw.wait_registered()
        yield sw
    finally:
        task = sw.release()
        if task is not None:
            # Let the UNWATCH go out (bounded), so nothing is left registered or pending.
            await asyncio.wait([task], timeout=UNWATCH_TIMEOUT)


__all__ = ["EVENT_CHANNEL", "RING_REF", "publish", "read", "watch_key", "withdraw"]
