"""Setting up a vchan over any [`Platform`][aioxen.platforms.base.Platform].

Theory of operation
-------------------
The *server* shares every page, the *client* maps them (libxenvchan's roles; ``domid``
always names the peer).

Server ([`PendingServer`][]): ``listen`` an unbound event-channel port for the client
domain; share the control page with an unmap notification that clears ``srv_live`` and
signals (so our death is visible on the wire); share the out-of-page ring pages; write the
page ([`init_server_page`][aioxen.vchan.wire.init_server_page]).  The caller then advertises
``ring-ref`` (the control page's grant) and ``event-channel`` (the port) in XenStore
([`aioxen.vchan.advertise`][]) and awaits [`PendingServer.wait_connected`][], which
returns once the client set ``cli_live = 1``.

Client ([`attach_client`][]): bind the advertised port (on Xen only one binder can
succeed); map the control page; check it is still waiting for a client (``cli_live == 2``,
``srv_live == 1``) -- otherwise the advertisement was stale and [`StaleAdvertisement`][]
tells the caller to wait for the next one; validate the orders; *claim* the endpoint with
an atomic OR of 1 into ``cli_live`` (2 -> 3; exactly one claimant sees 2, whatever the
platform's binding guarantees); only then register the unmap notification on
``cli_live``; map the LEFT ring writable and the RIGHT ring read-only; set
``srv_notify = NOTIFY_WRITE`` and ``cli_live = 1`` and signal.  Our server treats the
transient 3 as "still connecting"; a libxenvchan server just sees a non-zero live byte.

A server that gives up on an endpoint nobody completed ([`PendingServer.retire`][])
first ORs a RETIRED bit into ``cli_live`` (2 -> 6): from then on no client can claim it,
so a slow client never goes live on an endpoint that is being torn down; if a client had
claimed it already (3), the server keeps it for one more bound instead.

Both produce a [`Connection`][]: the [`VchanCore`][aioxen.vchan.wire.VchanCore] plus the
channel and the grant objects, released in the right order by
[`Connection.release`][].  Every failure path releases what it acquired, so a cancelled
or failed setup leaves no port bound and no page shared or mapped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from aioxen.errors import PlatformError, ProtocolError
from aioxen.native import SharedBuffer
from aioxen.platforms.base import (
    PAGE_SIZE,
    EventChannel,
    Mapping,
    Platform,
    Share,
    check_domid,
)
from aioxen.vchan import wire

DEFAULT_SIZE = 65536
"""Default minimum size of each ring (64 KiB each way)."""

_PORT_RE = re.compile(r"[A-Za-z0-9_-]+")


def check_port(port: str) -> str:
    """Validate a vchan port name (``[A-Za-z0-9_-]+``) and return it; ``ValueError``."""
    if not isinstance(port, str):
        raise TypeError(f"vchan port must be a str, not {type(port).__name__}")
    if not _PORT_RE.fullmatch(port):
        raise ValueError(f"invalid vchan port {port!r}: must match [A-Za-z0-9_-]+")
    return port


def check_size(size: int, what: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{what} must be an int")
    if not 0 < size <= wire.MAX_RING_SIZE:
        raise ValueError(f"{what} {size} out of range 1..{wire.MAX_RING_SIZE}")
    return size


def vchan_path(server_domid: int, client_domid: int, port: str) -> str:
    """XenStore directory of an advertisement (libxenvchan's convention)."""
    return f"/local/domain/{server_domid}/data/vchan/{client_domid}/{port}"


RETIRED = 0x04
"""Bit a server ORs into ``cli_live`` to retire an unclaimed endpoint (see
[`PendingServer.retire`][]); never visible to a libxenvchan peer as a live value."""


class StaleAdvertisement(ConnectionRefusedError):
    """The advertised endpoint is gone or already taken; wait for the next advertisement."""


@dataclass(eq=False)
class Connection:
    """A connected vchan endpoint: the wire core and what must be released with it."""

    platform: Platform
    peer_domid: int
    port: str
    is_server: bool
    core: wire.VchanCore
    channel: EventChannel
    _grants: list[Share | Mapping] = field(default_factory=list)
    _views: list[memoryview] = field(default_factory=list)
    on_release: list[Callable[[], None]] = field(default_factory=list)
    released: bool = False

    @property
    def role(self) -> str:
        return "server" if self.is_server else "client"

    def describe(self) -> str:
        own = self.platform.domid
        if self.is_server:
            return f"vchan server domid {own} port {self.port!r} (client domid {self.peer_domid})"
        return f"vchan client domid {own} port {self.port!r} (server domid {self.peer_domid})"

    def release(self) -> None:
        """Unpin, unmap/unshare (the control page last: its unmap notification clears our
        live byte and signals the peer), then unbind the port.  Idempotent."""
        if self.released:
            return
        self.released = True
        self.core.release()
        _release_all(self._views, self._grants, self.channel)
        for cb in self.on_release:
            cb()


def _release_all(
    views: list[memoryview], grants: list[Share | Mapping], channel: EventChannel | None
) -> None:
    for v in views:
        v.release()
    views.clear()
    errors: list[BaseException] = []
    for g in reversed(grants):  # rings first, control page last
        try:
            g.close()
        except Exception as exc:  # keep releasing the rest
            errors.append(exc)
    grants.clear()
    if channel is not None:
        channel.close()
    if errors:
        raise errors[0]


class PendingServer:
    """A server endpoint that is set up and waiting for its client.

    Create with [`create`][]; advertise [`ring_ref`][] and [`event_channel`][];
    ``await wait_connected()``; or [`close`][] to give up (idempotent).
    """

    def __init__(
        self,
        platform: Platform,
        peer_domid: int,
        port: str,
        channel: EventChannel,
        grants: list[Share | Mapping],
        views: list[memoryview],
        ctrl: memoryview,
        read_ring: memoryview,
        write_ring: memoryview,
    ) -> None:
        self.platform = platform
        self.peer_domid = peer_domid
        self.port = port
        self._channel: EventChannel | None = channel
        self._grants = grants
        self._views = views
        self._ctrl = ctrl
        self._read_ring = read_ring
        self._write_ring = write_ring
        # (No isinstance() here: Share is a runtime-checkable Protocol, and that check
        # alone cost ~25 us per endpoint.)
        ctrl_share = cast(Share, grants[0])
        self.ring_ref: int = ctrl_share.refs[0]
        self.event_channel: int = channel.port
        self._done = False

    @classmethod
    async def create(
        cls,
        platform: Platform,
        peer_domid: int,
        port: str,
        *,
        read_size: int = DEFAULT_SIZE,
        write_size: int = DEFAULT_SIZE,
        initial_index: int = 0,
    ) -> PendingServer:
        """Bind a port and share and initialise the pages for one client of ``peer_domid``.

        ``read_size``/``write_size`` are minimum ring sizes (server -> client is the write
        ring); orders follow libxenvchan ([`select_orders`][aioxen.vchan.wire.select_orders]).
        """
        check_domid(peer_domid)
        check_port(port)
        left_order, right_order = wire.select_orders(read_size, write_size)
        channel = await platform.events.listen(peer_domid)
        grants: list[Share | Mapping] = []
        views: list[memoryview] = []
        try:
            if channel.port == 0:
                raise PlatformError("platform allocated event-channel port 0 (invalid for vchan)")
            # One share for the control page and both rings (one grant-table allocation
            # instead of three); the refs are handed out page by page.
            npages = 1 + wire.ring_pages(left_order) + wire.ring_pages(right_order)
            ctrl_share = platform.grants.share(peer_domid, npages, writable=True)
            grants.append(ctrl_share)
            refs = ctrl_share.refs
            if refs[0] == 0:
                raise PlatformError("platform allocated grant ref 0 (invalid for vchan)")
            ctrl_share.set_unmap_notify(wire.SRV_LIVE, channel)
            whole = ctrl_share.buf
            ctrl = whole[:PAGE_SIZE]
            views.append(ctrl)
            rings: list[memoryview] = []
            grant_lists: list[list[int]] = []
            page = 1
            for order in (left_order, right_order):
                offset = wire.in_page_offset(order)
                if offset is not None:
                    ring = ctrl[offset : offset + (1 << order)]
                    grant_lists.append([])
                else:
                    n = wire.ring_pages(order)
                    ring = whole[page * PAGE_SIZE : (page + n) * PAGE_SIZE]
                    grant_lists.append(list(refs[page : page + n]))
                    page += n
                views.append(ring)
                rings.append(ring)
            wire.init_server_page(
                ctrl,
                left_order,
                right_order,
                grant_lists[0],
                grant_lists[1],
                initial_index=initial_index,
            )
        except BaseException:
            _release_all(views, grants, channel)
            raise
        return cls(platform, peer_domid, port, channel, grants, views, ctrl, rings[0], rings[1])

    def describe(self) -> str:
        return (
            f"vchan server domid {self.platform.domid} port {self.port!r} "
            f"(client domid {self.peer_domid}, ring-ref {self.ring_ref}, "
            f"event-channel {self.event_channel})"
        )

    async def wait_connected(self, timeout: float | None = None) -> Connection:
        """Wait until the client sets ``cli_live = 1``; return the [`Connection`][].

        ``ConnectionAbortedError`` if the client went away before connecting (its live byte
        dropped to 0 or its end of the channel closed), ``ProtocolError`` for a live value
        other than 0/1/2, ``TimeoutError`` after ``timeout``.  On any failure the caller
        still owns this object and should [`close`][] it.
        """
        channel = self._channel
        if channel is None or self._done:
            raise RuntimeError(f"{self.describe()} is closed")
        async with asyncio.timeout(timeout):
            return await self._wait_connected(channel)

    async def _wait_connected(self, channel: EventChannel) -> Connection:
        while True:
            live = wire.live_byte(self._ctrl, wire.CLI_LIVE)
            if live == wire.LIVE_CONNECTED:
                return self._connected()
            if live == wire.LIVE_CLOSED:
                if wire.client_left_traces(self._ctrl):
                    return self._connected()  # it connected, wrote and closed before we looked
                raise ConnectionAbortedError(f"{self.describe()}: client closed before connecting")
            if live not in (wire.LIVE_WAITING, wire.LIVE_CLAIMING, wire.LIVE_WAITING | RETIRED):
                raise ProtocolError(
                    f"{self.describe()}: cli_live has invalid value {live}", field="cli_live"
                )
            try:
                await channel.wait()
            except ConnectionResetError:
                # The binder went away; it may still have connected just before.
                live = wire.live_byte(self._ctrl, wire.CLI_LIVE)
                if live == wire.LIVE_CONNECTED or (
                    live == wire.LIVE_CLOSED and wire.client_left_traces(self._ctrl)
                ):
                    return self._connected()
                raise ConnectionAbortedError(
                    f"{self.describe()}: client unbound before connecting"
                ) from None

    def _connected(self) -> Connection:
        channel = self._channel
        assert channel is not None
        core = wire.VchanCore(self._ctrl, self._read_ring, self._write_ring, is_server=True)
        conn = Connection(
            self.platform,
            self.peer_domid,
            self.port,
            True,
            core,
            channel,
            self._grants,
            self._views,
        )
        self._done = True
        self._channel = None
        return conn

    def maybe_bound(self) -> bool | None:
        """Has a client bound our port?  ``False``/``True`` where the platform shows it
        (``unix`` channels report ``state``, ``inheap`` ones ``bound``), ``None`` where it
        cannot tell (Xen gives no sign of a bind)."""
        channel = self._channel
        if channel is None:
            return False
        state = getattr(channel, "state", None)
        if isinstance(state, str):
            return state != "listening"
        bound = getattr(channel, "bound", None)
        if isinstance(bound, bool):
            return bound
        return None

    def when_bound(self, callback: Callable[[], None]) -> bool:
        """Arrange ``callback()`` (once, from the loop) for when a client binds the port.
        False, and nothing arranged, where the platform shows no binds (Xen)."""
        channel = self._channel
        if channel is None or self.maybe_bound() is None:
            return False
        hook = getattr(channel, "when_bound", None)
        if hook is None:
            return False
        hook(callback)
        return True

    def retire(self) -> bool:
        """Withdraw an endpoint no client has claimed, atomically with respect to clients.

        Sets bit [`RETIRED`][] in ``cli_live`` with one atomic OR.  If the old value was
        ``LIVE_WAITING`` (2) no client claimed it and none can any more (a claimant's OR
        of 1 now reads 6, not 2, and it backs off): returns True and the caller
        [`close`][] must follow.  Otherwise (a client claimed it, is connected, or left) the bit
        is cleared again with an atomic AND -- whatever the client wrote meanwhile is kept
        -- and False is returned."""
        if self._done:
            return False
        sb = SharedBuffer(self._ctrl)
        try:
            old = sb.fetch_or_u8(wire.CLI_LIVE, RETIRED)
            if old == wire.LIVE_WAITING:
                return True
            sb.fetch_and_u8(wire.CLI_LIVE, 0xFF & ~RETIRED)
            return False
        finally:
            sb.release()

    def close(self) -> None:
        """Give up waiting: unshare the pages (``srv_live`` drops to 0) and unbind."""
        if self._done:
            return
        self._done = True
        channel, self._channel = self._channel, None
        _release_all(self._views, self._grants, channel)


async def attach_client(
    platform: Platform,
    peer_domid: int,
    port: str,
    ring_ref: int,
    event_channel: int,
    *,
    read_size: int | None = None,
    write_size: int | None = None,
    on_bound: Callable[[], None] | None = None,
) -> Connection:
    """Connect as the client to the server endpoint ``(ring_ref, event_channel)`` of
    domain ``peer_domid``.

    ``read_size``/``write_size``, if given, are minimums the server's rings must meet
    (``ConnectionRefusedError`` otherwise).  ``on_bound()`` is called once the port is
    bound (the endpoint is ours or dead: the next waiter may look for the next one).
    [`StaleAdvertisement`][] when the endpoint is gone or already taken;
    ``ProtocolError`` for a malformed control page or ring grants that cannot be mapped.
    """
    where = (
        f"vchan server domid {peer_domid} port {port!r} "
        f"(ring-ref {ring_ref}, event-channel {event_channel})"
    )
    try:
        channel = await platform.events.connect(peer_domid, event_channel)
    except ConnectionError as exc:
        # Refused (no such unbound port: taken by another client, or gone), or the
        # listener went away while we bound: either way, not available to us.
        raise StaleAdvertisement(f"{where}: cannot bind event channel: {exc}") from exc
    if on_bound is not None:
        on_bound()
    grants: list[Share | Mapping] = []
    views: list[memoryview] = []
    sb: SharedBuffer | None = None  # one pin of the control page for the whole handshake
    try:
        try:
            ctrl_map = await platform.grants.map_async(peer_domid, [ring_ref], writable=True)
        except (FileNotFoundError, PermissionError) as exc:
            raise StaleAdvertisement(f"{where}: cannot map ring-ref: {exc}") from exc
        grants.append(ctrl_map)
        ctrl = ctrl_map.buf[:PAGE_SIZE]
        views.append(ctrl)
        sb = SharedBuffer(ctrl)
        cli_live = sb.load_u8(wire.CLI_LIVE)
        srv_live = sb.load_u8(wire.SRV_LIVE)
        if cli_live != wire.LIVE_WAITING or srv_live != 1:
            raise StaleAdvertisement(
                f"{where}: endpoint not waiting for a client (cli_live {cli_live}, "
                f"srv_live {srv_live})"
            )
        try:
            layout = wire.read_client_layout(ctrl)
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: {exc}", field=exc.field) from None
        if read_size is not None and layout.right_size < read_size:
            raise ConnectionRefusedError(
                f"{where}: server offers a {layout.right_size}-byte read ring, {read_size} required"
            )
        if write_size is not None and layout.left_size < write_size:
            raise ConnectionRefusedError(
                f"{where}: server offers a {layout.left_size}-byte write ring, "
                f"{write_size} required"
            )
        # Claim the endpoint atomically (2 -> 3): on Xen binding the port is already
        # exclusive, but a platform (or a torn advertisement read) may let two clients get
        # this far; exactly one sees the old value 2.  Then make our death visible.
        claimed = sb.fetch_or_u8(wire.CLI_LIVE, 1)  # LIVE_WAITING (2) -> LIVE_CLAIMING (3)
        if claimed != wire.LIVE_WAITING:
            raise StaleAdvertisement(f"{where}: endpoint taken by another client")
        ctrl_map.set_unmap_notify(wire.CLI_LIVE, channel)
        rings: list[memoryview] = []
        for name, order, refs, writable in (
            ("left", layout.left_order, layout.left_grants, True),
            ("right", layout.right_order, layout.right_grants, False),
        ):
            offset = wire.in_page_offset(order)
            if offset is not None:
                ring = ctrl[offset : offset + (1 << order)]
            else:
                try:
                    ring_map = await platform.grants.map_async(
                        peer_domid, list(refs), writable=writable
                    )
                except (FileNotFoundError, PermissionError) as exc:
                    if sb.load_u8(wire.SRV_LIVE) != 1:
                        raise StaleAdvertisement(f"{where}: server closed: {exc}") from exc
                    raise ProtocolError(
                        f"{where}: {name} ring grant refs {list(refs)} do not map: {exc}",
                        field="grants",
                    ) from exc
                grants.append(ring_map)
                ring = ring_map.buf[: 1 << order]
            views.append(ring)
            rings.append(ring)
        core = wire.VchanCore(ctrl, rings[1], rings[0], is_server=False)
        try:
            sb.store_u8(wire.SRV_NOTIFY, wire.NOTIFY_WRITE)
            sb.store_u8(wire.CLI_LIVE, wire.LIVE_CONNECTED)
        except BaseException:
            core.release()
            raise
    except BaseException:
        if sb is not None:
            sb.release()
        _release_all(views, grants, channel)
        raise
    sb.release()
    channel.notify()
    return Connection(platform, peer_domid, port, False, core, channel, grants, views)


__all__ = [
    "DEFAULT_SIZE",
    "Connection",
    "PendingServer",
    "StaleAdvertisement",
    "attach_client",
    "check_port",
    "check_size",
    "vchan_path",
]
