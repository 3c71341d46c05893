"""netfront: a Xen virtual NIC as an ``asyncio.DatagramTransport`` of Ethernet frames.

Theory of operation
-------------------
netfront has three parts: the data path ([`aioxen.net.front_queue`][]: rings, pools,
batching, hostile-backend checks), the transport ([`aioxen.net.transport`][]) and, here,
the xenbus driver and [`create_frontend`][], which ties them together.

**XenStore** ([`create_frontend`][]): the xenbus handshake is
[`DeviceRunner`][aioxen.xenbus.driver.DeviceRunner]'s; [`NetfrontDriver`][] adds what is
netif's.  ``mac``/``mtu`` come from the frontend directory the toolstack created; once the
backend is in ``InitWait`` the driver reads its features, sets the queue up and the runner
publishes ring refs, event channel and features with ``state=Connected`` (Linux netfront's
order); the transport starts when the backend is ``Connected`` too.  Closing goes Closing
→ (backend Closing/Closed) → Closed, then releases grants and the channel; a backend that
closes, dies or breaks the protocol ends the transport and the runner (no reconnect: a
transport is one connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from aioxen.errors import ProtocolError
from aioxen.net.front_queue import NetfrontQueue
from aioxen.net.keys import FRONTEND_RING_KEYS, VIF, BackendFeatures, FrontendFeatures, parse_link
from aioxen.net.netif import PAGE_SIZE, XEN_NETIF_MAX_TX_SIZE, FrameInfo, NetStats
from aioxen.net.transport import NetfrontTransport
from aioxen.platforms.base import Platform
from aioxen.xenbus.claim import Claim, DeviceInUse
from aioxen.xenbus.driver import (
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    frontend_device,
    frontend_dir,
    read_opt,
)
from aioxen.xenbus.state import XenbusState, parse_state

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- xenbus

CLOSE_TIMEOUT = 2.0
"""Seconds a closing netfront waits for the backend to acknowledge (``Closing``)."""


class NetfrontDriver(FrontendDriver):
    """The vif's xenbus front end: a [`NetfrontQueue`][] per connection.

    [`connect`][] reads the backend's features, sets the queue up and returns its keys,
    which the runner publishes with ``Connected`` (Linux netback ignores ``Initialised``)
    once the backend is in ``InitWait``; [`connected`][] resolves [`ready`][].
    [`disconnect`][] releases the queue and ends the transport using it with
    ``ConnectionResetError`` (the backend closed, went away or was removed).
    """

    type = VIF
    connect_state = XenbusState.CONNECTED
    needs_init_wait = True

    def __init__(self, *, offload: bool, sg: bool) -> None:
        self._offload = offload
        self._sg = sg
        self.queue: NetfrontQueue | None = None
        self.backend_features = BackendFeatures()
        self.frontend_features = FrontendFeatures()
        self.transport: NetfrontTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def published_keys(self) -> tuple[str, ...]:
        return (*FRONTEND_RING_KEYS, *FrontendFeatures.KEYS)

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        values = {k: await dev.read_peer(k) for k in BackendFeatures.KEYS}
        try:
            bfeat = BackendFeatures.parse(values)
            if not bfeat.rx_copy:
                raise ConnectionRefusedError(
                    f"backend {dev.peer_dir} does not offer feature-rx-copy"
                )
        except (ProtocolError, ConnectionRefusedError) as exc:
            self._not_ready(exc)
            raise
        use_sg = self._sg and bfeat.sg
        ffeat = FrontendFeatures(
            rx_copy=True,
            rx_notify=True,
            sg=use_sg,
            gso_tcpv4=self._offload and use_sg,
            gso_tcpv6=self._offload and use_sg,
            csum_offload=self._offload,
            ipv6_csum_offload=self._offload,
            persistent=True,
        )
        queue = NetfrontQueue(
            dev.platform,
            dev.peer_domid,
            deliver=_no_protocol_yet,
            tx_space=self._tx_space,
            fail=self._data_path_failed,
            name=f"netfront(vif {dev.platform.domid}/{dev.devid})",
        )
        await queue.setup()  # releases what it got on failure
        self.queue, self.backend_features, self.frontend_features = queue, bfeat, ffeat
        return {
            "tx-ring-ref": str(queue.tx_ring_ref),
            "rx-ring-ref": str(queue.rx_ring_ref),
            "event-channel": str(queue.event_channel),
            **ffeat.entries(),
        }

    async def connected(self, dev: XenbusDevice) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    async def disconnect(self, dev: XenbusDevice) -> None:
        queue, self.queue = self.queue, None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport._connection_failed(
                ConnectionResetError(
                    f"backend {dev.peer_dir} of vif {dev.platform.domid}/{dev.devid} closed, "
                    "went away or was removed"
                )
            )
        if queue is not None:
            queue.close()

    def _not_ready(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)

    def _tx_space(self) -> None:
        if self.transport is not None:
            self.transport._tx_space()

    def _data_path_failed(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.transport._connection_failed(exc)


async def create_frontend(
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    backend_domid: int | None = None,
    devid: int = 0,
    *,
    platform: Platform | None = None,
    offload: bool = False,
    sg: bool = True,
    timeout: float = 10.0,
    claim: Claim | None = None,
) -> tuple[NetfrontTransport, asyncio.DatagramProtocol]:
    """Connect vif ``devid`` of this domain to its backend and return ``(transport,
    protocol)``.

    The toolstack (``xl``, or ``aioxen netback`` on ``unix``) must have created the
    frontend directory; ``backend_domid``, if given, must match its ``backend-id``.
    ``offload=True`` accepts partial checksums and GSO super-frames on receive (for
    protocols that pass frames on to a kernel, like a TAP); with the default ``False``
    every received frame has complete checksums and is at most MTU-sized.  ``sg`` allows
    frames larger than a page (needed for GSO and for MTUs above 4082).  ``timeout``
    bounds the whole handshake (``TimeoutError``).

    The vif is claimed before anything is written (`aioxen.xenbus.claim`; pass
    ``claim`` if the caller holds one, which it then releases): if another live process
    uses it, [`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] (``EADDRINUSE``) is raised and
    nothing is changed.
    """
    from aioxen.platforms import resolve

    plat = await resolve(platform)
    runner: DeviceRunner | None = None
    driver: NetfrontDriver | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                dev = await frontend_device(plat, VIF, devid, timeout=None)
                if backend_domid is not None and dev.peer_domid != backend_domid:
                    raise ValueError(
                        f"vif {devid} of domain {plat.domid} is served by domain "
                        f"{dev.peer_domid}, not {backend_domid}"
                    )
                mac, mtu = parse_link(await dev.read("mac"), await dev.read("mtu"), dev.own_dir)
                driver = NetfrontDriver(offload=offload, sg=sg)
                runner = DeviceRunner(
                    dev, driver, reconnect=False, close_timeout=CLOSE_TIMEOUT, claim=claim
                )
                task = runner.start()
                await asyncio.wait([driver.ready, task], return_when=asyncio.FIRST_COMPLETED)
                if not driver.ready.done():
                    if isinstance(runner.error, DeviceInUse):
                        raise runner.error  # another live netfront has this vif: untouched
                    raise ConnectionResetError(
                        f"netfront {dev.own_dir}: handshake ended before the backend connected"
                    ) from runner.error
                driver.ready.result()  # the connect error, if the backend was unusable
        except TimeoutError:  # say what was awaited
            raise TimeoutError(await _timeout_message(plat, devid, timeout, runner)) from None
        return _open_transport(protocol_factory, runner, driver, mac, mtu)
    except BaseException:
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(runner.stop(timeout=CLOSE_TIMEOUT + 1))
        if driver is not None and driver.ready.done() and not driver.ready.cancelled():
            driver.ready.exception()  # retrieved (it may be what is being raised)
        raise


async def _timeout_message(
    plat: Platform, devid: int, timeout: float, runner: DeviceRunner | None
) -> str:
    """What [`create_frontend`][] waited for when its ``timeout`` expired."""
    what = f"vif {plat.domid}/{devid}"
    if runner is None:
        own = frontend_dir(plat.domid, VIF, devid)
        return (
            f"{what}: no such device after {timeout:g} s (waited for {own}/backend and "
            "backend-id, which the toolstack or aioxen netback writes)"
        )
    dev = runner.dev
    states = []
    for side, d in (("frontend", dev.own_dir), ("backend", dev.peer_dir)):
        try:
            st = parse_state(await read_opt(dev.store, f"{d}/state"), f"{d}/state")
        except (ProtocolError, OSError):
            st = None
        states.append(f"{side} state {'missing' if st is None else st}")
    return (
        f"{what}: backend {dev.peer_dir} (domain {dev.peer_domid}) did not connect within "
        f"{timeout:g} s ({', '.join(states)})"
    )


def _open_transport(
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    runner: DeviceRunner,
    driver: NetfrontDriver,
    mac: bytes,
    mtu: int,
) -> tuple[NetfrontTransport, asyncio.DatagramProtocol]:
    """The connected queue as a transport with its protocol (no await: the runner cannot
    disconnect the queue half way through)."""
    dev, queue = runner.dev, driver.queue
    if queue is None:
        raise ConnectionResetError(f"netfront {dev.own_dir}: backend left while connecting")
    bfeat = driver.backend_features
    transport = NetfrontTransport(
        asyncio.get_running_loop(),
        protocol_factory(),
        extra={
            "mac": mac,
            "mtu": mtu,
            "devid": dev.devid,
            "backend_domid": dev.peer_domid,
            "backend_path": dev.peer_dir,
            "frontend_path": dev.own_dir,
            "backend_features": bfeat,
            "frontend_features": driver.frontend_features,
            "platform": dev.platform,
        },
        max_frame=XEN_NETIF_MAX_TX_SIZE if driver.frontend_features.sg else PAGE_SIZE,
    )

    async def teardown(exc: Exception | None) -> None:
        q = driver.queue
        if q is not None:
            q.flush()
        if exc is not None:  # the backend died or misbehaved: disconnect, Closed
            dev.peer_lost(exc)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                await runner.wait_state(XenbusState.CLOSED, timeout=CLOSE_TIMEOUT)
        await runner.stop(timeout=CLOSE_TIMEOUT + 1)  # orderly: Closing, Closed

    protocol = transport._protocol
    driver.transport = transport
    transport._attach(queue, teardown)
    queue.set_deliver(protocol.datagram_received)
    protocol.connection_made(transport)
    queue.start()
    return transport, protocol


def _no_protocol_yet(frame: bytes, info: FrameInfo) -> None:
    raise RuntimeError("netfront delivered a frame before the protocol existed")


__all__ = ["NetStats", "NetfrontDriver", "NetfrontQueue", "NetfrontTransport", "create_frontend"]
