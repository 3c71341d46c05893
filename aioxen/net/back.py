"""netback: serve netfront vifs and switch their frames to a TAP, a switch or a callback.

Theory of operation
-------------------
The data path of one vif ([`Vif`][aioxen.net.vif.Vif]: TX parsing, RX copy, notify
batching, grant mapping) is [`aioxen.net.vif`][]; this module is its xenbus side.

**XenStore** ([`serve_vif`][]): the xenbus handshake is
[`DeviceRunner`][aioxen.xenbus.driver.DeviceRunner]'s; [`NetbackDriver`][] adds what is
netif's: features with InitWait; on the frontend's Connected (or Initialised), its ring
refs, event channel and features (``request-rx-copy`` is required), rings mapped and
channel bound before Connected.  When the frontend closes, dies (event channel lost) or
breaks the protocol the vif is disconnected and the device waits for the next frontend.
[`Netback`][] serves many vifs: the toolstack role ([`create_vif_device`][], what
``xl`` does on Xen, via [`aioxen.xenbus.toolstack`][]) plus one [`serve_vif`][] task
per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from aioxen.errors import ProtocolError
from aioxen.net.keys import (
    DEFAULT_MTU,
    FRONTEND_RING_KEYS,
    VIF,
    BackendFeatures,
    FrontendFeatures,
    default_mac,
    link_keys,
    parse_mac_value,
)
from aioxen.net.netif import FrameInfo
from aioxen.net.vif import Deliver, GrantCache, Vif, attach_vif
from aioxen.platforms.base import Platform
from aioxen.xenbus.claim import Claim
from aioxen.xenbus.driver import (
    BackendDriver,
    DeviceRunner,
    XenbusDevice,
    backend_device,
    backend_dir,
    frontend_dir,
    read_opt,
)
from aioxen.xenbus.toolstack import add_device, remove_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- xenbus


class NetbackDriver(BackendDriver):
    """The vif's xenbus back end: a [`Vif`][] per connection.

    Advertises ``features`` with ``InitWait``; [`connect`][] reads the frontend's
    features, ring refs and event channel (``request-rx-copy`` is required, split event
    channels were not offered), attaches the [`Vif`][] and starts it with the deliver
    function ``on_connect(vif)`` returns; [`disconnect`][] calls ``on_disconnect(vif)``
    and closes it.  A vif whose frontend dies or breaks the protocol reports it to the
    runner ([`peer_lost`][aioxen.xenbus.driver.XenbusDevice.peer_lost]), which disconnects and
    waits for the next frontend.
    """

    type = VIF

    def __init__(
        self,
        features: BackendFeatures,
        on_connect: Callable[[Vif], Deliver],
        on_disconnect: Callable[[Vif], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.features = features
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_end = on_end
        self.vif: Vif | None = None

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        return self.features.entries()

    async def connect(self, dev: XenbusDevice) -> None:
        where = dev.peer_dir
        ffeat = FrontendFeatures.parse({k: await dev.read_peer(k) for k in FrontendFeatures.KEYS})
        if not ffeat.rx_copy:
            raise ConnectionRefusedError(f"{where}: frontend did not request rx-copy")
        if await dev.read_peer("event-channel-tx") is not None:
            raise ProtocolError(
                f"{where}: split event channels were not offered", field="event-channel-tx"
            )
        refs = {k: await dev.peer_int(k, 0, 1) for k in FRONTEND_RING_KEYS}
        for k, v in refs.items():
            if not v:
                raise ProtocolError(f"{where}/{k} is missing", field=k)
        vif = await attach_vif(
            dev.platform,
            dev.peer_domid,
            dev.devid,
            tx_ring_ref=refs["tx-ring-ref"],
            rx_ring_ref=refs["rx-ring-ref"],
            event_channel=refs["event-channel"],
            features=ffeat,
            backend_features=self.features,
            deliver=_drop,
            on_lost=dev.peer_lost,
        )
        try:
            vif.set_deliver(self._on_connect(vif))
            vif.start()
        except BaseException:
            vif.close()
            raise
        self.vif = vif

    async def disconnect(self, dev: XenbusDevice) -> None:
        vif, self.vif = self.vif, None
        if vif is None:
            return
        if self._on_disconnect is not None:
            try:
                self._on_disconnect(vif)
            except Exception:
                log.exception("%r: on_disconnect failed", dev)
        vif.close()
        if self._on_end is not None:
            self._on_end()


DEFAULT_FEATURES = BackendFeatures(rx_copy=True, sg=True, gso_tcpv4=True, gso_tcpv6=True)


async def serve_vif(
    platform: Platform,
    frontend_domid: int,
    devid: int,
    *,
    on_connect: Callable[[Vif], Deliver],
    on_disconnect: Callable[[Vif], None] | None = None,
    features: BackendFeatures | None = None,
    once: bool = False,
    claim: Claim | None = None,
) -> None:
    """Serve vif ``devid`` of ``frontend_domid`` until its backend directory disappears
    or the toolstack sets ``online=0`` (or, with ``once``, until the first connection
    ends).

    ``on_connect(vif)`` is called for every connection and returns the function that
    receives the frontend's frames; ``on_disconnect(vif)`` when it ends.  Cancelling
    disconnects and publishes ``Closed``.  The vif is claimed first (``claim``: the
    caller's, else one taken here): [`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] if another
    live process serves it, and then nothing was changed.
    """
    dev = await backend_device(platform, VIF, frontend_domid, devid)
    driver = NetbackDriver(features or DEFAULT_FEATURES, on_connect, on_disconnect)
    runner = DeviceRunner(dev, driver, claim=claim)
    if once:
        driver._on_end = runner.request_close
    await runner.run()


async def create_vif_device(
    platform: Platform,
    frontend_domid: int,
    devid: int = 0,
    *,
    mac: bytes | None = None,
    mtu: int = DEFAULT_MTU,
    claim: Claim | None = None,
) -> None:
    """The toolstack's part (``xl network-attach``): create vif ``devid`` of
    ``frontend_domid`` with this domain as its backend ([`aioxen.xenbus.add_device`][]
    plus ``mac``, ``mtu`` and ``handle`` in both directories).  An existing device is
    replaced (state Initialising again), keeping its MAC unless ``mac`` is given.  With
    ``claim`` (on the backend directory) the device is created claimed, or
    [`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] raised with nothing changed."""
    if mac is None:
        fdir = frontend_dir(frontend_domid, VIF, devid)
        old = await read_opt(platform.store, f"{fdir}/mac")
        mac = parse_mac_value(old, f"{fdir}/mac") if old else default_mac(frontend_domid, devid)
    link = link_keys(mac, mtu, devid)
    await add_device(
        platform.store, VIF, frontend_domid, platform.domid, devid,
        frontend_keys=link, backend_keys=link, replace=True, claim=claim,
    )  # fmt: skip


async def destroy_vif_device(
    platform: Platform, frontend_domid: int, devid: int = 0, *, claim: Claim | None = None
) -> None:
    """Remove both directories of a vif (``xl network-detach`` after the ends closed);
    with ``claim``, only while the claim still holds."""
    with contextlib.suppress(FileNotFoundError):
        await remove_device(platform.store, VIF, frontend_domid, platform.domid, devid,
                            force=True, claim=claim)  # fmt: skip


def _drop(frame: bytes, info: FrameInfo) -> None:
    return None


class Netback:
    """Serve several vifs of this (backend) domain.

    ``connect(vif) -> deliver`` decides where each vif's frames go (a TAP, a switch, a
    callback); ``disconnect(vif)`` undoes it.  `add` claims the vif's backend
    ([`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] if another live process serves it:
    nothing is changed), creates the device (toolstack role) unless ``create=False`` and
    starts serving it.  [`close`][] removes only devices this instance still owns.
    """

    def __init__(
        self,
        platform: Platform,
        *,
        connect: Callable[[Vif], Deliver],
        disconnect: Callable[[Vif], None] | None = None,
        features: BackendFeatures | None = None,
    ) -> None:
        self.platform = platform
        self._connect = connect
        self._disconnect = disconnect
        self._features = features
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._claims: dict[tuple[int, int], Claim] = {}
        self.vifs: dict[tuple[int, int], Vif] = {}

    async def add(
        self,
        frontend_domid: int,
        devid: int = 0,
        *,
        create: bool = True,
        mac: bytes | None = None,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        key = (frontend_domid, devid)
        if key in self._tasks:
            raise ValueError(f"vif {frontend_domid}/{devid} is already served")
        claim = Claim(
            self.platform.store,
            backend_dir(self.platform.domid, VIF, frontend_domid, devid),
            f"vif {frontend_domid}/{devid}",
        )
        try:
            if create:
                await create_vif_device(
                    self.platform, frontend_domid, devid, mac=mac, mtu=mtu, claim=claim
                )
            else:
                await claim.acquire()
        except BaseException:
            claim.abandon()
            raise
        self._claims[key] = claim

        def on_connect(vif: Vif) -> Deliver:
            self.vifs[key] = vif
            return self._connect(vif)

        def on_disconnect(vif: Vif) -> None:
            self.vifs.pop(key, None)
            if self._disconnect is not None:
                self._disconnect(vif)

        task = asyncio.ensure_future(
            serve_vif(
                self.platform,
                frontend_domid,
                devid,
                on_connect=on_connect,
                on_disconnect=on_disconnect,
                features=self._features,
                claim=claim,
            )
        )
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: tuple[int, int], task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("vif %d/%d stopped: %r", key[0], key[1], task.exception())

    async def wait(self) -> None:
        """Wait until every served vif has stopped (or raise the first failure)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()))

    async def close(self, *, remove: bool = False) -> None:
        """Stop serving: disconnect every vif, backends go Closed (and remove the devices
        with ``remove`` -- only those still ours); then release the claims."""
        tasks = list(self._tasks.items())
        for _, t in tasks:
            t.cancel()
        for _, t in tasks:
            with contextlib.suppress(BaseException):
                await t
        claims, self._claims = self._claims, {}
        for (fe, devid), claim in claims.items():
            if remove:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        destroy_vif_device(self.platform, fe, devid, claim=claim), 2
                    )
            try:
                await asyncio.wait_for(claim.release(), 2)
            except Exception:
                claim.abandon()


__all__ = [
    "GrantCache",
    "Netback",
    "NetbackDriver",
    "Vif",
    "attach_vif",
    "create_vif_device",
    "destroy_vif_device",
    "serve_vif",
]
