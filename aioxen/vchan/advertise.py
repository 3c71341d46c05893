"""The XenStore half of the vchan handshake: publishing and finding an advertisement.

Theory of operation
-------------------
A server advertises one waiting endpoint under
``/local/domain/<server>/data/vchan/<client>/<port>`` ([`aioxen.vchan.endpoint.vchan_path`][])
as two decimal keys, ``ring-ref`` (grant of the control page) and ``event-channel`` (its
unbound port), written in *one transaction* together with permissions ``n<server>``
``r<client>`` on each key (libxenvchan's ``init_xs_srv``).  Re-advertising overwrites the
same keys ([`republish`][]: ``ring-ref`` first, ``event-channel`` last, no transaction,
one round trip); closing the server removes the directory.

Ownership.  One server per path: the first [`publish`][] also claims the path with an
``owner`` key (an [`aioxen.ownership.Owner`][] record: pid, process start time, boot id;
permission ``n<server>``, so only the server domain reads it) *in the same transaction*.  A
second server finds a live owner there and fails with
[`ResourceBusy`][aioxen.ownership.ResourceBusy] (``EADDRINUSE``) naming it, having written
nothing; a dead owner's advertisement (process gone, or pid reused) is taken over.
libxenvchan clients read only ``ring-ref`` and ``event-channel`` and never see the extra
key.  [`withdraw`][] removes the directory only while the owner key still holds our
claim (one transaction), so a server never removes another's advertisement.  An
advertisement without an owner key (a libxenvchan server, or aioxen before 0.2) cannot be
checked for liveness; it is replaced, with a warning.

A client watches ``<path>/event-channel`` (the key, not the directory: the client may
only read the keys) and, on every change, reads ``event-channel``, ``ring-ref`` and
``event-channel`` again (the three requests pipelined: one round trip).  Without a
transaction (the per-domain transaction quota is 10) the double read rejects a pair torn
by a concurrent re-advertisement; a torn pair that slipped through is caught by the
endpoint checks ([`aioxen.vchan.endpoint.StaleAdvertisement`][]) and simply retried
on the next change.
Values of 0 or non-decimal text are a [`ProtocolError`][aioxen.ProtocolError] (libxenvchan treats
0 as invalid too).

Quotas and coordination.  Every concurrent connect in one process to the same path shares
*one* XenStore watch ([`_SharedWatch`][]; Xen allows 128 watches per domain), which
outlives its last user by [`WATCH_LINGER`][] seconds so that successive connects reuse
it (its task ends with the XenStore connection, when the platform closes), and they take
turns ([`_SharedWatch.turn`][]): one waiter at a time reads and tries the current
advertisement, and once it took one, the next waits for the watch to report the next
advertisement instead of trying the taken one.  So N concurrent clients cost N reads, not
N per advertisement.  The watch reads each new advertisement as soon as it is reported
(while it exists: during connects and the linger), so the next connect usually finds it
read already and starts with the bind.  Advertisement transactions are limited to a few
at a time per store client (10 open transactions per domain).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.ownership import Owner, ResourceBusy, claim_in, forget, release_in
from aioxen.platforms.base import Platform
from aioxen.xenstore.errors import TransactionConflict

logger = logging.getLogger("aioxen.vchan")

RING_REF = "ring-ref"
EVENT_CHANNEL = "event-channel"
OWNER = "owner"
"""Key of the owner record (not part of libxenvchan's wire format; clients ignore it)."""

MAX_CONCURRENT_TRANSACTIONS = 1
"""Advertisement transactions in flight per store client.  One: the advertisements of one
process for one peer are siblings, and sibling creations in concurrent transactions always
conflict (as in Xen), so running them side by side only burns retries -- with 100 servers
started at once about 1% failed with ``TransactionConflict`` when 4 ran together."""

ADVERTISE_RETRIES = 64
"""Conflict retries of one advertisement transaction (other processes of the domain may
advertise siblings at the same moment); ``transact`` backs off randomly between them."""

WATCH_LINGER = 2.0
"""Seconds a shared watch outlives its last user, so back-to-back connects reuse it."""

_QUOTA_ERRNOS = frozenset({errno.ENOSPC, errno.EBUSY})
"""Errors of a full transaction quota (other clients of our domain hold the transactions):
[`publish`][] backs off and tries again.  Conflicts (``TransactionConflict``) are
retried by ``store.transact`` itself, once."""
QUOTA_RETRIES = 50


def _store(platform: Platform) -> Any:
    return platform.store


_tx_limits: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _tx_limit(store: Any) -> asyncio.Semaphore:
    sem = _tx_limits.get(store)
    if sem is None:
        sem = _tx_limits[store] = asyncio.Semaphore(MAX_CONCURRENT_TRANSACTIONS)
    return sem


def server_owner(platform: Platform, path: str) -> Owner:
    """A fresh owner record for a server of this process advertising at ``path``."""
    return Owner.current(f"vchan server at {path}", domid=platform.domid)


class _Pipelined:
    """The open transaction as [`claim_in`][aioxen.ownership.claim_in] and
    [`release_in`][aioxen.ownership.release_in] see it in [`publish`][] and
    [`withdraw`][]: reads are answered from one pipelined batch made up front (or read
    at once), writes, permission changes and removals are queued and leave together in
    one batch ([`flush`][], or ``batch.run()`` with the commit) -- one round trip instead
    of one per request.  A queued request's error is raised by ``flush``, still inside
    the transaction (which then aborts)."""

    def __init__(self, tx: Any, reads: dict[str, bytes | Exception]) -> None:
        self._tx = tx
        self._reads = reads
        self.batch = tx.batch()
        """The queued requests (add more before [`flush`][])."""

    async def read(self, path: str) -> bytes:
        value = self._reads.get(path)
        if value is None:
            return bytes(await self._tx.read(path))  # not read up front: a round trip
        if isinstance(value, Exception):
            raise value
        return value

    def peek(self, path: str) -> bytes | Exception | None:
        """What the up-front batch read at ``path`` (``None``: not read)."""
        return self._reads.get(path)

    async def write(self, path: str, value: bytes) -> None:
        self.batch.write(path, value)

    async def set_perms(self, path: str, perms: Any) -> None:
        self.batch.set_perms(path, perms)

    async def rm(self, path: str) -> None:
        self.batch.rm(path)

    async def flush(self) -> None:
        for result in await self.batch.run():
            if isinstance(result, Exception):
                raise result


async def publish(
    platform: Platform,
    path: str,
    peer_domid: int,
    ring_ref: int,
    event_channel: int,
    owner: Owner | None = None,
) -> None:
    """Write (or overwrite) the advertisement at ``path`` in one transaction; with
    ``owner``, claim the path in that same transaction (``ResourceBusy`` naming the live
    holder, nothing written; see the module docstring).

    Pipelined: the transaction is four round trips whatever it writes -- start; read the
    owner key and ``event-channel`` together; the owner record, ``ring-ref``,
    ``event-channel`` and their permissions together; commit."""
    from aioxen.xenstore import Perm

    store = _store(platform)
    perms = [Perm(platform.domid, "n"), Perm(peer_domid, "r")]
    owner_key = f"{path}/{OWNER}"
    ec_key = f"{path}/{EVENT_CHANNEL}"

    def write_keys(tx: Any) -> None:
        for key, value in ((RING_REF, ring_ref), (EVENT_CHANNEL, event_channel)):
            tx.write(f"{path}/{key}", str(value).encode("ascii"))
            tx.set_perms(f"{path}/{key}", perms)

    async def body(tx: Any) -> None:
        if owner is None:
            ptx = _Pipelined(tx, {})
            write_keys(ptx.batch)
            await ptx.flush()
            return
        first = tx.batch()
        first.read(owner_key)
        first.read(ec_key)
        owner_raw, ec_raw = await first.run()
        ptx = _Pipelined(tx, {owner_key: owner_raw, ec_key: ec_raw})

        async def then(ptx: _Pipelined, stale: Owner | None) -> None:
            if stale is not None:
                logger.info("vchan %s: taking over from dead %s", path, stale.describe())
            else:
                ec = ptx.peek(ec_key)
                if isinstance(ec, Exception):
                    if not isinstance(ec, (FileNotFoundError, PermissionError)):
                        raise ec
                else:
                    logger.warning(
                        "vchan %s: replacing an advertisement without an owner record "
                        "(a libxenvchan server, or a leftover)",
                        path,
                    )
            write_keys(ptx.batch)

        await claim_in(
            ptx,
            owner_key,
            owner,
            what=f"vchan advertisement {path}",
            perms=[Perm(platform.domid, "n")],
            then=then,
        )
        await ptx.flush()

    async with _tx_limit(store):
        for attempt in range(QUOTA_RETRIES):
            try:
                await store.transact(body, retries=ADVERTISE_RETRIES)  # retries conflicts
                return
            except ResourceBusy:
                raise
            except TransactionConflict:
                raise  # transact's own retries are spent: no second layer
            except OSError as exc:
                # Transaction quota exhausted by someone else: back off and retry.
                if exc.errno not in _QUOTA_ERRNOS or attempt == QUOTA_RETRIES - 1:
                    raise
                await asyncio.sleep(min(0.2, 0.005 * 2**attempt))


async def republish(platform: Platform, path: str, ring_ref: int, event_channel: int) -> None:
    """Overwrite an advertisement this server already published at ``path`` (the keys and
    their permissions exist): ``ring-ref`` then ``event-channel``, pipelined, no
    transaction -- one round trip, and one watch event (for ``event-channel``, written
    last).  A reader that catches the pair half-written is covered by its double read of
    ``event-channel`` and the endpoint checks (see the module docstring)."""
    store = _store(platform)
    items = [
        (f"{path}/{RING_REF}", str(ring_ref).encode("ascii")),
        (f"{path}/{EVENT_CHANNEL}", str(event_channel).encode("ascii")),
    ]
    many = getattr(store, "write_many", None)
    if many is not None:
        await many(items)  # pipelined, no task per request
    else:
        await _all([store.write(k, v) for k, v in items])


async def withdraw(platform: Platform, path: str, owner: Owner | None = None) -> None:
    """Remove the advertisement directory (missing is fine) -- with ``owner``, only while
    its owner key still holds that claim (checked in the same transaction)."""
    store = _store(platform)
    if owner is None:
        with contextlib.suppress(FileNotFoundError):
            await store.rm(path)
        return

    async def body(tx: Any) -> bool:
        # Pipelined: the owner check is one round trip, then the removal and the commit
        # leave together (a removal that fails leaves nothing for the commit to apply).
        ptx = _Pipelined(tx, {})
        if not await release_in(ptx, f"{path}/{OWNER}", owner, remove=[path]):
            return False
        ptx.batch.commit()
        for result in await ptx.batch.run():
            if isinstance(result, Exception) and not isinstance(result, FileNotFoundError):
                raise result
        return True

    if not await store.transact(body):
        logger.debug("vchan %s: not removed, no longer ours", path)


async def _all(coros: list[Any]) -> list[Any]:
    """Run requests concurrently; the first failure is raised after all have finished
    (nothing is left running on the connection)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


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
    ec_key = f"{path}/{EVENT_CHANNEL}"
    try:
        # Pipelined (one round trip); xenstored answers them in order.
        keys = [ec_key, f"{path}/{RING_REF}", ec_key]
        many = getattr(store, "read_many", None)
        if many is not None:
            ec1, rr, ec2 = await many(keys)  # no task per request
        else:
            ec1, rr, ec2 = await _all([store.read(k) for k in keys])
    except (FileNotFoundError, PermissionError):
        return None
    if ec1 != ec2:
        return None  # torn by a re-advertisement; the watch fires again
    return _parse(rr, RING_REF, path), _parse(ec1, EVENT_CHANNEL, path)


class _SharedWatch:
    """One XenStore watch on a key, shared by every waiter in this process.

    With ``prefetch`` (a coroutine function reading the advertisement), every change
    starts that read at once, while the watch exists (its users' connects, then the
    linger): the next connect finds the advertisement already read -- in a connect/close
    loop the read overlaps the previous connection instead of preceding the next one.
    """

    def __init__(
        self,
        store: Any,
        key: str,
        registry: dict[str, _SharedWatch],
        prefetch: Callable[[], Awaitable[tuple[int, int] | None]] | None = None,
    ) -> None:
        self._store = store
        self._key = key
        self._registry = registry
        self._prefetch = prefetch
        self._prefetched: tuple[int, asyncio.Future[tuple[int, int] | None]] | None = None
        self._users = 0
        self._error: BaseException | None = None
        self.generation = 0
        self.turn = asyncio.Lock()
        """Held by the one waiter of this process that reads and tries the advertisement."""
        self.consumed = -1
        """The generation whose advertisement a waiter of this process already took."""
        self.consumed_ad: tuple[int, int] | None = None
        """That advertisement (a later event may still show it: not worth trying)."""
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._linger: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future[None] = loop.create_future()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async with self._store.watch(self._key) as w:
                if not self._ready.done():
                    self._ready.set_result(None)
                async for _ in w:
                    self.generation += 1
                    if self._prefetch is not None:
                        self._start_prefetch()
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
                # Marked retrieved: its waiter may have timed out and gone (asyncio would
                # log "Future exception was never retrieved"); later waiters still get it.
                self._ready.exception()
            self._error = exc
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        finally:
            if self._registry.get(self._key) is self:
                del self._registry[self._key]

    def _start_prefetch(self) -> None:
        assert self._prefetch is not None
        old = self._prefetched
        if old is not None and not old[1].done():
            old[1].cancel()  # superseded: nobody asked for that generation
        fut = asyncio.ensure_future(self._prefetch())
        fut.add_done_callback(_retrieve)
        self._prefetched = (self.generation, fut)

    async def read(
        self, seen: int, fresh: Callable[[], Awaitable[tuple[int, int] | None]]
    ) -> tuple[int, int] | None:
        """The advertisement as of generation ``seen``: the prefetched read of that
        generation if there is one (each is handed out once), else ``fresh()``."""
        pre = self._prefetched
        if pre is not None and pre[0] == seen:
            self._prefetched = None
            if not pre[1].cancelled():
                return await asyncio.shield(pre[1])
        return await fresh()

    async def wait_registered(self) -> None:
        await asyncio.shield(self._ready)

    async def wait_change(self, seen: int, timeout: float) -> bool:
        """Return once [`generation`][] moved past ``seen`` (True) or after ``timeout``
        (False)."""
        if self._error is not None:
            raise self._error
        if self.generation != seen:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        if self._error is not None:
            raise self._error
        return self.generation != seen

    def acquire(self) -> None:
        self._users += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def release(self) -> None:
        """Drop one user; after the last one the watch lingers [`WATCH_LINGER`][] s
        (a new user takes it over), then it is removed (UNWATCH)."""
        self._users -= 1
        if not self._users:
            if self._task.done():
                self._stop()
            else:
                self._linger = self._loop.call_later(WATCH_LINGER, self._stop)

    def _stop(self) -> None:
        self._linger = None
        if self._users:
            return
        if self._registry.get(self._key) is self:
            del self._registry[self._key]
        self._task.cancel()
        pre, self._prefetched = self._prefetched, None
        if pre is not None:
            pre[1].cancel()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a prefetch's outcome retrieved (nobody may ask for it)."""
    if not fut.cancelled():
        fut.exception()


_watches: weakref.WeakKeyDictionary[Any, dict[str, _SharedWatch]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def watch_key(platform: Platform, key: str) -> Any:
    """``async with watch_key(plat, key) as sw``: a shared watch (see [`_SharedWatch`][])."""
    store = _store(platform)
    registry = _watches.get(store)
    if registry is None:
        registry = _watches[store] = {}
    sw = registry.get(key)
    if sw is None or sw._error is not None:
        prefetch = None
        if key.endswith("/" + EVENT_CHANNEL):
            path = key[: -len(EVENT_CHANNEL) - 1]

            def prefetch() -> Awaitable[tuple[int, int] | None]:
                return read(platform, path)  # the module's read, looked up at call time

        sw = registry[key] = _SharedWatch(store, key, registry, prefetch)
    sw.acquire()
    try:
        await sw.wait_registered()
        yield sw
    finally:
        sw.release()


__all__ = [
    "EVENT_CHANNEL",
    "OWNER",
    "RING_REF",
    "forget",
    "publish",
    "read",
    "republish",
    "server_owner",
    "watch_key",
    "withdraw",
]
