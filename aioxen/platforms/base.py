"""The platform interfaces: EVENTS (event channels), MEMORY (grant tables), XenStore.

Theory of operation
-------------------
Protocol code (vchan, rings, xenbus devices) never imports a backend.  It receives a
[`Platform`][] and uses three objects hanging off it:

* ``platform.events`` ([`EventChannels`][]): ``listen(remote_domid)`` allocates an
  unbound port that ``remote_domid`` may bind to; ``connect(remote_domid, remote_port)``
  binds to a peer's unbound port.  Both return an [`EventChannel`][].  An event carries no
  data; ``notify()`` sends one, ``await wait()`` returns once at least one arrived since the
  previous ``wait`` (events coalesce, none is lost).  Adapters that want a callback instead
  of a waiting task use [`EventChannel.set_handler`][].
* ``platform.grants`` ([`GrantTable`][]): ``share(remote_domid, npages)`` exports fresh
  zeroed pages and returns their grant references; ``map(remote_domid, refs)`` maps any list
  of a domain's refs, in any order, into one contiguous ``memoryview``.  Either side can ask
  for an *unmap notification* (Linux's ``SET_UNMAP_NOTIFY``): when the memory goes away
  (cleanly or because the process died) a byte is cleared and/or an event is sent.
* ``platform.store``: a XenStore client (see `aioxen.xenstore`).

Three implementations exist — ``inheap``, ``unix`` and ``xen`` — and
[`aioxen.platform`][] picks one.

Closing a platform ends what runs over it first.  Transports register as *users*
([`Platform.add_user`][]); ``close()`` begins with [`Platform.end_users`][], which gives
each of them (concurrently) at most `Platform.close_timeout` seconds to finish -- a
vchan transport being closed flushes its queued bytes, anything else is aborted so that its
peer sees ``ConnectionResetError`` -- and only then unmaps and unshares the memory.  A stream
is never cut short silently, and no ``BufferError`` comes from memory still in use.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient

logger = logging.getLogger("aioxen.platforms")

DEFAULT_CLOSE_TIMEOUT = 10.0
"""Seconds a closing platform gives its users to finish (`Platform.close_timeout`)."""

PAGE_SIZE = 4096
"""Grant and ring page size: always 4 KiB (``XEN_PAGE_SHIFT`` 12), on every platform."""

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0


def check_domid(domid: int, what: str = "domid") -> int:
    """Validate a domain id (0 .. 0x7FEF) and return it."""
    if not isinstance(domid, int) or isinstance(domid, bool):
        raise TypeError(f"{what} must be an int, not {type(domid).__name__}")
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"{what} {domid} out of range 0..{DOMID_FIRST_RESERVED - 1}")
    return domid


@runtime_checkable
class EventChannel(Protocol):
    """One end of a bound event channel."""

    @property
    def port(self) -> int:
        """The local port number (what a peer passes to ``connect``)."""
        ...

    @property
    def remote_domid(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def notify(self) -> None:
        """Send one event to the peer.  Never blocks; a no-op once the peer is gone."""
        ...

    async def wait(self, timeout: float | None = None) -> None:
        """Return once at least one event arrived since the previous ``wait``.

        Raises ``ConnectionResetError`` when the peer end went away (closed or died),
        ``TimeoutError`` after ``timeout`` seconds.  Cancellation leaves the channel usable.
        """
        ...

    def set_handler(self, handler: Callable[[], None] | None) -> None:
        """Deliver events by calling ``handler()`` on the event loop instead of waking
        ``wait``.  ``handler`` is called once per batch of coalesced events, and once more
        when the peer goes away (after which [`peer_lost`][] is true).  ``None`` restores
        ``wait`` delivery; events that arrived while a handler was set are not replayed."""
        ...

    @property
    def peer_lost(self) -> bool:
        """True once the platform has seen the peer end disappear."""
        ...

    def close(self) -> None:
        """Unbind the port.  Idempotent.  A pending ``wait`` raises ``ConnectionResetError``."""
        ...


@runtime_checkable
class EventChannels(Protocol):
    """The EVENTS signature."""

    async def listen(self, remote_domid: int) -> EventChannel:
        """Allocate an unbound port that ``remote_domid`` may ``connect`` to."""
        ...

    async def connect(self, remote_domid: int, remote_port: int) -> EventChannel:
        """Bind to ``remote_port`` of ``remote_domid``.  ``ConnectionRefusedError`` if no
        such unbound port exists or it was not offered to us (where the platform can tell,
        the latter is [`PortNotOfferedError`][aioxen.errors.PortNotOfferedError], also a
        ``PermissionError``).

        The new channel starts with one pending event on every platform, as on Xen (which
        sets a port pending as it binds it, since notifications sent before the bind may
        have been lost): the first ``wait()`` returns at once, or an installed handler is
        called once.  Events are hints to re-check shared state, so protocols need not
        care; tests that count events consume it first."""
        ...


@runtime_checkable
class Share(Protocol):
    """Pages this domain exports."""

    @property
    def refs(self) -> list[int]: ...

    @property
    def buf(self) -> memoryview:
        """The shared pages, ``len(refs) * 4096`` bytes, always writable by the owner."""
        ...

    @property
    def remote_domid(self) -> int: ...

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        """When this share goes away (``close`` or process death), clear the byte at
        ``offset`` (if not ``None``) and send an event on ``channel`` (if not ``None``)."""
        ...

    def close(self) -> None:
        """Revoke the grants.  Idempotent.  Existing foreign mappings stay valid memory."""
        ...


@runtime_checkable
class Mapping(Protocol):
    """Foreign pages mapped into this process."""

    @property
    def buf(self) -> memoryview:
        """Contiguous view of the mapped refs, in the order asked; read-only if mapped so."""
        ...

    @property
    def writable(self) -> bool: ...

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        """As [`Share.set_unmap_notify`][]; byte clearing needs a writable mapping
        (``ValueError`` otherwise, as for an offset outside the mapping)."""
        ...

    def close(self) -> None:
        """Unmap.  Idempotent.  ``BufferError`` if views derived from ``buf`` are alive."""
        ...


@runtime_checkable
class GrantTable(Protocol):
    """The MEMORY signature."""

    def share(self, remote_domid: int, npages: int, writable: bool = True) -> Share:
        """Export ``npages`` fresh zeroed pages to ``remote_domid``."""
        ...

    def map(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> Mapping:
        """Map ``refs`` granted by ``remote_domid`` contiguously.  ``FileNotFoundError``
        for unknown/revoked refs, ``PermissionError`` for refs granted to someone else or
        read-only refs mapped writable (messages name the domid and ref)."""
        ...

    async def map_async(
        self, remote_domid: int, refs: Sequence[int], writable: bool = True
    ) -> Mapping:
        """`map` for coroutines: never blocks the event loop (on ``xen``, mapping a
        paged-out page waits, up to ~210 ms, for Xen to page it in: `map` sleeps,
        this awaits).  Cancelling it leaves nothing mapped."""
        ...


@runtime_checkable
class PlatformUser(Protocol):
    """Something running over a platform that must end before its memory goes away (a
    transport): see [`Platform.end_users`][]."""

    async def platform_closing(self, timeout: float) -> None:
        """Finish within ``timeout`` seconds (flush what a ``close()`` still has queued),
        else abort, so that the peer never mistakes a cut stream for a clean end.
        Afterwards the user must hold no views of the platform's memory."""
        ...


class Platform(abc.ABC):
    """A domain's view of the hypervisor services: ``events``, ``grants``, ``store``.

    Use as an async context manager (``async with plat:``) so that everything it opened is
    closed on exit.  ``domid`` is this domain's own id.

    ``close_timeout`` (seconds, default [`DEFAULT_CLOSE_TIMEOUT`][]; settable per object)
    bounds how long ``close()`` waits for transports that are still flushing a ``close()``
    (see [`end_users`][]).
    """

    name: str = "abstract"
    """For messages and repr only: callers never branch on it (they read the
    capabilities below)."""
    _store: XenStoreClient | None = None
    _users: dict[PlatformUser, None] | None = None
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT

    # -- capabilities: what protocol code may assume (each platform sets them) ----------
    peer_runs_concurrently: bool = True
    """Whether a peer domain runs while this one's event loop runs (another process or
    a real domain).  ``False`` on ``inheap``, where both ends share one thread: busy
    polling for the peer only delays it (vchan's ``busy_poll`` defaults to 0)."""
    single_process: bool = False
    """Whether every domain of this platform lives in this one process (``inheap``):
    other programs cannot be its peers."""
    kernel_xenbus_drivers: bool = False
    """Whether this domain's kernel has xenbus drivers of its own that may bind a device
    before we do (``xen``: a Linux guest's ``hvc_xen``, ``xen-blkfront``, ...; their
    bindings are visible in ``/sys/bus/xen``).  Front ends check it before taking a
    device (see ``aioxen.console.inuse``)."""
    grant_share_limit: int | None = None
    """How many pages one process can have shared (granted) at a time by default, if the
    platform has a fixed limit (``xen``: gntalloc's ``limit`` module parameter, 1024);
    ``None``: only memory limits it.  Devices size their grant pools to stay below it."""

    def __init__(self, domid: int) -> None:
        self._domid = check_domid(domid)

    @property
    def domid(self) -> int:
        return self._domid

    @property
    @abc.abstractmethod
    def events(self) -> EventChannels: ...

    @property
    @abc.abstractmethod
    def grants(self) -> GrantTable: ...

    @property
    def store(self) -> XenStoreClient:
        """The XenStore client for this domain (created on first use; connects lazily)."""
        if self._store is None:
            self._store = self._create_store()
        return self._store

    def _create_store(self) -> XenStoreClient:
        """Build this platform's XenStore client; each platform overrides it."""
        raise NotImplementedError(f"platform {self.name!r} has no XenStore client")

    async def _close_store(self) -> None:
        """Close the XenStore client if one was created (platforms call this in close)."""
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    def add_user(self, user: PlatformUser) -> None:
        """Register ``user`` (a transport) to be ended by [`end_users`][] on close."""
        if self._users is None:
            self._users = {}
        self._users[user] = None

    def remove_user(self, user: PlatformUser) -> None:
        """Forget ``user`` (it released its memory).  Idempotent."""
        if self._users is not None:
            self._users.pop(user, None)

    async def end_users(self) -> None:
        """End every registered user, concurrently, before the memory goes: each gets
        ``close_timeout`` seconds to flush a ``close()`` in progress and is then aborted
        (its peer sees ``ConnectionResetError``, never a clean EOF after a cut).  Every
        platform's ``close()`` calls this first."""
        users = list(self._users or ())
        if not users:
            return
        timeout = max(0.0, float(self.close_timeout))
        results = await asyncio.gather(
            *(u.platform_closing(timeout) for u in users), return_exceptions=True
        )
        for user, result in zip(users, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                logger.warning("%r: ending %r failed", self, user, exc_info=result)

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources that need a running loop; called by ``__aenter__``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything this platform object opened.  Idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} domid={self._domid}>"


__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DOMID_FIRST_RESERVED",
    "PAGE_SIZE",
    "EventChannel",
    "EventChannels",
    "GrantTable",
    "Mapping",
    "Platform",
    "PlatformUser",
    "Share",
    "check_domid",
]
