"""xenbus front and back end drivers: the XenStore side of a split device.

Theory of operation
-------------------
A device (type ``T``, number ``N``) between front end domain ``F`` and back end domain
``B`` lives in two XenStore directories written by the toolstack
([`aioxen.xenbus.toolstack`][])::

    /local/domain/F/device/T/N          backend, backend-id, state, + the front's keys
    /local/domain/B/backend/T/F/N       frontend, frontend-id, online, state, + the back's

A [`DeviceRunner`][] drives one end.  It watches the peer's ``state`` key and its own
directory, and on every wake-up re-reads both (level-triggered: a burst of changes is one
step) and asks the pure state machine ([`aioxen.xenbus.state`][]) what to do.  The device
specific work is a [`BackendDriver`][] or [`FrontendDriver`][] subclass:

* back end: [`advertise`][BackendDriver.advertise] returns the feature keys written together
  with ``InitWait``; [`connect`][BackendDriver.connect] reads the front's ring references and
  maps them before ``Connected`` is published (it may return keys, written in one
  transaction with ``Connected``); [`disconnect`][BackendDriver.disconnect] unmaps.
* front end: [`connect`][FrontendDriver.connect] creates the rings and returns the keys to
  publish (written in one transaction with ``Initialised``, and removed again when the
  device resets); [`connected`][FrontendDriver.connected] runs when the back end reached
  ``Connected``.  A driver built like Linux netfront sets
  [`connect_state`][FrontendDriver.connect_state] to ``CONNECTED`` (its keys go out with
  ``Connected``, which is not "connected" until the back end is ``Connected`` too) and
  [`needs_init_wait`][FrontendDriver.needs_init_wait] (it connects only to a back end in
  ``InitWait``).

Once ``connect`` was called, ``disconnect`` is called before the next ``connect`` and when
the runner stops, whichever way it stops (also when cancelled half way through a connect).

A driver whose data path sees the peer die (the event channel reports it) calls
[`XenbusDevice.peer_lost`][] (or lets the runner notice by itself:
[`XenbusDevice.on_shutdown`][] as a ring's shutdown callback, [`XenbusDevice.supervise`][]
for a serving task): the runner disconnects and publishes ``Closed``, then waits for the
peer to come back (a restarted front end writes ``Initialising``, a restarted back end
``InitWait``) and connects again; the dead session's state is ignored until the peer
writes its state key again.  [`DeviceRunner.close`][] is the orderly teardown:
``Closing``, wait (bounded) for the peer to acknowledge (not for a front end that has
advertised nothing yet), disconnect, ``Closed``.  The
runner also stops when its own directory is removed, and a back end closes when the
toolstack writes ``online=0``.  Cancelling [`DeviceRunner.run`][] disconnects and
publishes ``Closed`` (best effort) before re-raising.

An application that owns a device runs the runner as an async context manager
(``async with DeviceRunner(dev, driver) as runner``: [`start`][DeviceRunner.start] on entry,
[`stop`][DeviceRunner.stop] — orderly close, then cancel — on exit) and waits for the
handshake with [`wait_connected`][DeviceRunner.wait_connected].

Feature negotiation: [`feature`][] reads a ``feature-*`` style flag (on iff ``"1"``);
[`read_int`][] reads a bounded integer; [`negotiate`][] combines what both ends offer.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from aioxen.errors import ProtocolError
from aioxen.platforms.base import Platform, check_domid
from aioxen.xenbus.claim import Claim
from aioxen.xenbus.state import (
    Action,
    Step,
    XenbusState,
    backend_step,
    close_done,
    frontend_step,
    parse_state,
)

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient

log = logging.getLogger(__name__)

S = XenbusState
_FRESH = object()  # marker: the peer's state is not left over from a lost session
_SESSION = (S.INITIALISED, S.CONNECTED, S.RECONFIGURING, S.RECONFIGURED)  # peer states of a session
_IDLE = (None, S.UNKNOWN, S.INITIALISING, S.CLOSED)  # peer states with no front end at work


def frontend_dir(frontend_domid: int, type_: str, devid: int) -> str:
    return f"/local/domain/{frontend_domid}/device/{type_}/{devid}"


def backend_dir(backend_domid: int, type_: str, frontend_domid: int, devid: int) -> str:
    return f"/local/domain/{backend_domid}/backend/{type_}/{frontend_domid}/{devid}"


async def read_opt(store: Any, path: str) -> bytes | None:
    """The value at ``path`` (via a client or a transaction), or ``None`` if missing."""
    try:
        value: bytes = await store.read(path)
        return value
    except FileNotFoundError:
        return None


def feature(value: bytes | None, default: bool = False) -> bool:
    """A ``feature-*`` flag: on iff the value is ``"1"``; missing means ``default``."""
    if value is None:
        return default
    return value.strip().rstrip(b"\0") == b"1"


def read_int(value: bytes | None, path: str, default: int, lo: int = 0, hi: int = 2**32 - 1) -> int:
    """A decimal value in ``lo..hi`` (``default`` if missing); ``ProtocolError`` naming
    ``path`` otherwise."""
    if value is None:
        return default
    text = value.strip().rstrip(b"\0")
    if not text.isdigit() or len(text) > 20:
        raise ProtocolError(f"{path}: {value[:32]!r} is not a decimal number", field=path)
    n = int(text)
    if not lo <= n <= hi:
        raise ProtocolError(f"{path}: {n} out of range {lo}..{hi}", field=path)
    return n


def negotiate(ours: Mapping[str, bool], theirs: Mapping[str, bool]) -> dict[str, bool]:
    """A feature is used iff both ends offer it."""
    return {name: on and theirs.get(name, False) for name, on in ours.items()}


class XenbusDevice:
    """One end of one device, as the driver sees it."""

    def __init__(
        self,
        platform: Platform,
        role: str,
        type_: str,
        devid: int,
        own_dir: str,
        peer_dir: str,
        peer_domid: int,
    ) -> None:
        self.platform = platform
        self.role = role
        self.type = type_
        self.devid = devid
        self.own_dir = own_dir
        self.peer_dir = peer_dir
        self.peer_domid = peer_domid
        self.state = S.UNKNOWN
        self.connected = False
        self._lost: BaseException | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def store(self) -> XenStoreClient:
        return self.platform.store

    def __repr__(self) -> str:
        return (
            f"<XenbusDevice {self.role} {self.type}/{self.devid} of domain "
            f"{self.platform.domid} (peer domain {self.peer_domid}) {self.state}>"
        )

    async def read(self, key: str) -> bytes | None:
        """A key of our own directory (``None`` if missing)."""
        return await read_opt(self.store, f"{self.own_dir}/{key}")

    async def read_peer(self, key: str) -> bytes | None:
        """A key of the peer's directory (``None`` if missing)."""
        return await read_opt(self.store, f"{self.peer_dir}/{key}")

    async def peer_feature(self, name: str, default: bool = False) -> bool:
        return feature(await self.read_peer(name), default)

    async def peer_int(self, name: str, default: int, lo: int = 0, hi: int = 2**32 - 1) -> int:
        return read_int(await self.read_peer(name), f"{self.peer_dir}/{name}", default, lo, hi)

    async def write(
        self, keys: Mapping[str, str | bytes], state: XenbusState | None = None
    ) -> None:
        """Write ``keys`` into our directory, and ``state`` last, in one transaction."""
        items = dict(keys)

        async def body(tx: Any) -> None:
            for k, v in items.items():
                await tx.write(f"{self.own_dir}/{k}", v)
            if state is not None:
                await tx.write(f"{self.own_dir}/state", state.wire)

        await self.store.transact(body)
        if state is not None:
            self.state = state

    async def remove(self, *keys: str) -> None:
        for k in keys:
            with contextlib.suppress(FileNotFoundError):
                await self.store.rm(f"{self.own_dir}/{k}")

    async def set_state(self, state: XenbusState) -> None:
        await self.store.write(f"{self.own_dir}/state", state.wire)
        self.state = state

    async def peer_state(self) -> XenbusState | None:
        return parse_state(await self.read_peer("state"), f"{self.peer_dir}/state")

    def peer_lost(self, exc: BaseException | None = None) -> None:
        """Tell the runner the data path saw the peer die (or misbehave): it disconnects,
        publishes ``Closed`` and waits for the peer to come back."""
        self._lost = exc or ConnectionResetError(f"{self!r}: peer lost")
        if self._wakeup is not None:
            self._wakeup.set()

    def on_shutdown(self, exc: BaseException | None) -> None:
        """A data path shutdown callback (``ring.add_shutdown_callback(dev.on_shutdown)``):
        ``None`` (our own close) is ignored, an error means [`peer_lost`][]."""
        if exc is not None:
            self.peer_lost(exc)

    def supervise(self, task: asyncio.Future[Any]) -> None:
        """Treat ``task`` (e.g. a ring's serving loop) ending with an exception as
        [`peer_lost`][]; a result or a cancellation (our own teardown) is ignored."""

        def done(t: asyncio.Future[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.info("%r: data path ended: %s", self, t.exception())
                self.peer_lost(t.exception())

        task.add_done_callback(done)


class BackendDriver(abc.ABC):
    """The device specific part of a back end."""

    type: ClassVar[str]

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        """Feature keys to publish together with ``InitWait``."""
        return {}

    @abc.abstractmethod
    async def connect(self, dev: XenbusDevice) -> Mapping[str, str] | None:
        """The front end is ``Initialised``: read its keys, map its rings, bind its event
        channels, and optionally return keys to write together with ``Connected``.
        Raising leaves the device unconnected until the front changes state."""

    async def disconnect(self, dev: XenbusDevice) -> None:  # noqa: B027 - optional hook
        """Tear the data path down (idempotent)."""

    async def reconfigure(self, dev: XenbusDevice) -> None:  # noqa: B027 - optional hook
        """The front end asked for a reconfiguration (``Reconfiguring``)."""


class FrontendDriver(abc.ABC):
    """The device specific part of a front end."""

    type: ClassVar[str]
    connect_state: ClassVar[XenbusState] = XenbusState.INITIALISED
    """The state published with [`connect`][]'s keys.  ``CONNECTED`` for drivers built
    like Linux netfront (Linux netback ignores ``Initialised``); the runner then treats
    the front end as ``Initialised`` until the back end is ``Connected`` too."""
    needs_init_wait: ClassVar[bool] = False
    """Connect only to a back end in ``InitWait``, whatever an earlier session left it in
    (Linux netfront's rule; see [`frontend_step`][aioxen.xenbus.state.frontend_step])."""

    @abc.abstractmethod
    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        """The back end is ready (``InitWait``): create the rings and event channels and
        return the keys to publish (``ring-ref``, ``event-channel``, ...)."""

    async def connected(self, dev: XenbusDevice) -> None:  # noqa: B027 - optional hook
        """The back end reached ``Connected``: start the data path."""

    async def disconnect(self, dev: XenbusDevice) -> None:  # noqa: B027 - optional hook
        """Tear the data path down (idempotent)."""

    def published_keys(self) -> tuple[str, ...]:
        """Keys (or directories such as ``queue-0``) that a previous front end may have
        left behind, removed when the runner starts and on reset (default: none); entries
        may be [`fnmatch`][] patterns (``"ring-ref*"``) over our directory's children.
        The keys the last [`connect`][] returned are removed on reset in any case."""
        return ()


class DeviceRunner:
    """Drive one end of one device through the xenbus handshake (see module docstring)."""

    def __init__(
        self,
        dev: XenbusDevice,
        driver: BackendDriver | FrontendDriver,
        *,
        reconnect: bool = True,
        close_timeout: float = 10.0,
        claim: Claim | None = None,
        exclusive: bool = True,
    ) -> None:
        self.dev = dev
        self.driver = driver
        self.reconnect = reconnect
        self.close_timeout = close_timeout
        self.claim = claim  # held by the caller (who releases it), or taken by run()
        self.exclusive = exclusive
        self._run_task: asyncio.Task[Any] | None = None  # the task in run(), while it runs
        self._finished = asyncio.Event()  # run() has cleaned up (claim released)
        self._wakeup = asyncio.Event()
        dev._wakeup = self._wakeup
        self._closing = False
        self._stopped = False
        self._connected_once: asyncio.Future[None] | None = None
        self._state_changed = asyncio.Event()
        self._close_expired = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._stale_peer: object = _FRESH
        self._peer_wrote = False  # the peer's state key was written since _stale_peer
        self._stale_until_changed = False  # _stale_peer goes only when the value changes
        self._attached = False  # driver.connect was called; disconnect is due
        self._published: tuple[str, ...] = ()  # top-level names of the front's last keys
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    @property
    def is_backend(self) -> bool:
        return isinstance(self.driver, BackendDriver)

    # -- public API --------------------------------------------------------------
    async def wait_state(self, *states: XenbusState, timeout: float | None = None) -> XenbusState:
        """Wait until our published state is one of ``states`` (``ConnectionResetError``,
        chained to the runner's error if it failed, once the runner stopped elsewhere)."""
        async with asyncio.timeout(timeout):
            while self.dev.state not in states:
                if self._stopped:
                    raise ConnectionResetError(
                        f"{self.dev!r}: runner stopped in {self.dev.state}"
                    ) from self.error
                self._state_changed.clear()
                await self._state_changed.wait()
        return self.dev.state

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the device is connected (a front end's
        [`connected`][FrontendDriver.connected] has run; ``Connected`` is published).  If the
        runner failed first its error is raised; if it stopped otherwise,
        ``ConnectionResetError``; ``TimeoutError`` after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                # (a front end with connect_state CONNECTED publishes it before the back
                # end acknowledged: connected() has run only once dev.connected is set)
                while not (self.dev.connected and self.dev.state == S.CONNECTED):
                    if self._stopped:
                        raise ConnectionResetError(
                            f"{self.dev!r}: runner stopped in {self.dev.state}"
                        ) from self.error
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except ConnectionResetError:
            if isinstance(self.error, Exception):
                raise self.error from None
            raise

    def start(self) -> asyncio.Task[None]:
        """Run [`run`][] in a task (once; later calls return the same task)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())
        return self._task

    async def stop(self, timeout: float | None = 10.0) -> None:
        """Orderly close (bounded by ``timeout``), then end [`start`][]'s task and wait
        for its cleanup.  Errors of the runner are not raised here (see [`error`][])."""
        task = self._task
        if task is None:
            return
        if not task.done():
            try:
                await self.close(timeout=timeout)
            except (TimeoutError, ConnectionResetError):
                pass
            else:  # Closed is published: run() returns by itself after its cleanup
                await asyncio.wait([task], timeout=timeout)
            task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: it is in self.error

    async def __aenter__(self) -> DeviceRunner:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def request_close(self) -> None:
        """Begin an orderly close (``Closing`` → ``Closed``); [`run`][] returns after."""
        self._closing = True
        self._wakeup.set()

    async def close(self, timeout: float | None = None) -> None:
        """Orderly close; returns once ``Closed`` was published (or the runner stopped)."""
        self.request_close()
        with contextlib.suppress(ConnectionResetError):
            await self.wait_state(S.CLOSED, timeout=timeout)
        run_task = self._run_task
        if run_task is not None and run_task is not asyncio.current_task():
            # run() returns right after Closed; its cleanup (the owner record) follows
            async with asyncio.timeout(timeout):
                await self._finished.wait()

    # -- the loop ----------------------------------------------------------------
    async def run(self) -> None:
        """Run until closed, until our directory disappears, or (back end) until the
        toolstack sets ``online=0`` and the close completes."""
        dev = self.dev
        store = dev.store
        own_claim = await self._claim() if self.claim is None and self.exclusive else None
        watches = [store.watch(dev.own_dir), store.watch(f"{dev.peer_dir}/state")]
        pumps: list[asyncio.Task[None]] = []
        self._run_task = asyncio.current_task()
        self._finished.clear()
        try:
            for w in watches:
                await w.start()
                pumps.append(asyncio.ensure_future(self._pump(w, w is watches[1])))
            await self._start()
            while True:
                self._wakeup.clear()
                if not await self._step():
                    break
                await self._wakeup.wait()
                for p in pumps:
                    if p.done():
                        p.result()  # a lost XenStore connection raises here
                        raise ConnectionResetError(f"{dev!r}: XenStore watch ended")
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon())
            raise
        except BaseException as exc:
            self.error = exc
            await asyncio.shield(self._abandon())
            raise
        finally:
            self._stopped = True
            self._state_changed.set()
            for p in pumps:
                p.cancel()
            for w in watches:
                with contextlib.suppress(Exception):
                    await w.close()
            try:
                if own_claim is not None:
                    await self._release(own_claim)
            finally:
                self._run_task = None
                self._finished.set()

    async def _claim(self) -> Claim:
        """Claim our directory before anything is written (``DeviceInUse`` if another
        live process serves this end: then nothing was touched)."""
        dev = self.dev
        what = (
            f"{dev.role} of {dev.type} {dev.devid} (domain {dev.platform.domid}, peer "
            f"domain {dev.peer_domid})"
        )
        claim = Claim(dev.store, dev.own_dir, what)
        try:
            return await claim.acquire()
        except BaseException as exc:
            claim.abandon()
            self.error = exc
            self._stopped = True
            self._state_changed.set()
            raise

    @staticmethod
    async def _release(claim: Claim) -> None:
        try:
            async with asyncio.timeout(2):
                await asyncio.shield(claim.release())
        except Exception as exc:
            claim.abandon()
            log.info("%r: could not remove the owner record: %r", claim, exc)
        except asyncio.CancelledError:
            claim.abandon()  # the shielded release goes on
            raise

    async def _pump(self, watch: Any, peer_state: bool = False) -> None:
        try:
            async for _ in watch:
                if peer_state:
                    self._peer_wrote = True
                self._wakeup.set()
        finally:
            self._wakeup.set()  # the main loop notices that the watch ended

    async def _publish(self, state: XenbusState, keys: Mapping[str, str] | None = None) -> None:
        if keys:
            await self.dev.write(keys, state)
        else:
            await self.dev.set_state(state)
        log.debug("%r -> %s", self.dev, state)
        self._state_changed.set()

    async def _start(self) -> None:
        if isinstance(self.driver, BackendDriver):
            await self._publish(S.INIT_WAIT, await self.driver.advertise(self.dev))
        else:
            # Taking over from a front end that died in a session (on Xen nothing tells
            # the back end): the back end's state belongs to the dead session -- a
            # Connected back end still serves the dead one's rings.  Ignore it until it
            # changes (the back end resets when it sees our Initialising); connecting to
            # it at once would "connect" to the old rings, and the back end's reset would
            # then shut ours down under the first requests.
            try:
                left, peer = (
                    parse_state(await self.dev.read("state"), f"{self.dev.own_dir}/state"),
                    await self.dev.peer_state(),
                )
            except ProtocolError:
                left = peer = None
            if left in _SESSION and peer in _SESSION:
                self._stale_peer = peer
                self._stale_until_changed = True  # its watch may fire without a change
            await self._remove_published()
            await self._publish(S.INITIALISING)

    async def _remove_published(self) -> None:
        assert isinstance(self.driver, FrontendDriver)
        names = dict.fromkeys((*self.driver.published_keys(), *self._published))
        self._published = ()
        patterns = [n for n in names if any(c in n for c in "*?[")]
        if patterns:
            try:
                present = await self.dev.store.directory(self.dev.own_dir)
            except FileNotFoundError:
                present = []
            for p in patterns:
                del names[p]
                names.update(dict.fromkeys(n for n in present if fnmatch.fnmatchcase(n, p)))
        await self.dev.remove(*names)

    async def _disconnect(self) -> None:
        if self._attached or self.dev.connected or self.dev.state in (S.INITIALISED, S.CONNECTED):
            self._attached = False
            self.dev.connected = False
            try:
                await self.driver.disconnect(self.dev)
            except Exception:
                log.exception("%r: disconnect failed", self.dev)

    async def _abandon(self) -> None:
        """Cancelled or failed: disconnect and say ``Closed`` (best effort, bounded; not
        if our directory is gone: writing would recreate it)."""
        with contextlib.suppress(Exception):
            await self._disconnect()
        if self.dev.state not in (S.CLOSED, S.UNKNOWN):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    if await self._own_dir_present():
                        await self._publish(S.CLOSED)

    async def _own_dir_present(self) -> bool:
        try:
            await self.dev.store.read(f"{self.dev.own_dir}/state")
        except FileNotFoundError:
            return False
        return True

    async def _step(self) -> bool:
        """One level-triggered step; False when the runner is done."""
        dev = self.dev
        if not await self._own_dir_present():
            log.info("%r: directory removed; stopping", dev)
            await self._disconnect()
            return False
        if dev._lost is not None and (
            self._closing or not (dev.connected or dev.state in (S.INITIALISED, S.CONNECTED))
        ):
            dev._lost = None  # stale: we are closing or already disconnected
        if dev._lost is not None:
            exc, dev._lost = dev._lost, None
            log.info("%r: data path lost the peer (%s)", dev, exc)
            await self._disconnect()
            if not self.reconnect:
                await self._publish(S.CLOSED)
                return False
            # The peer's state key may describe the dead session (rings advertised or
            # mapped): ignore such a state until it changes.  A peer already back at the
            # start of a handshake (InitWait, Initialising) is not stale.
            self._peer_wrote = False
            self._stale_until_changed = False
            try:
                stale = await dev.peer_state()
            except ProtocolError:
                stale = None
            self._stale_peer = stale if stale in _SESSION else _FRESH
            # Ready for the peer to come back (or to notice it never left).
            await self._perform(
                Step(Action.RESET, S.INIT_WAIT if self.is_backend else S.INITIALISING)
            )
        if self.is_backend and not self._closing and dev.state != S.CLOSED:
            online = await dev.read("online")
            if online is not None and not feature(online, True):
                log.info("%r: toolstack set online=0; closing", dev)
                self._closing = True
        try:
            peer = await dev.peer_state()
        except ProtocolError as exc:
            log.warning("%r: %s", dev, exc)
            peer = S.UNKNOWN
        if self._stale_peer is not _FRESH:
            # The same state written again (a new front end going straight to the state
            # the dead one was in) is a new session too.
            if peer == self._stale_peer and (self._stale_until_changed or not self._peer_wrote):
                peer = None  # the dead session's state: as if the peer were absent
            else:
                self._stale_peer = _FRESH
                self._stale_until_changed = False
        if self._closing:
            return await self._close_step(peer)
        if isinstance(self.driver, BackendDriver):
            step = backend_step(dev.state, peer)
        else:
            own = dev.state
            if own == S.CONNECTED and not dev.connected:
                own = S.INITIALISED  # keys published with Connected (connect_state), unacked
            step = frontend_step(
                own, peer, reconnect=self.reconnect, needs_init_wait=self.driver.needs_init_wait
            )
        if step.state is None and step.action == Action.NONE:
            return True
        before = dev.state
        await self._perform(step)
        if dev.state != before:
            self._wakeup.set()  # re-evaluate with the new own state (not after a failed
            # connect, which stays put until the peer changes: no busy retry loop)
        return True

    async def _close_step(self, peer: XenbusState | None) -> bool:
        dev = self.dev
        if dev.state == S.CLOSED:
            return False
        if dev.state != S.CLOSING:
            await self._publish(S.CLOSING)
            # A back end waits for the front end's acknowledgement unless there is no
            # front end at work (state absent, Unknown, Initialising, Closed) and it
            # attached nothing: such a front end may never answer (blkback's prompt stop).
            if self._attached or dev.connected or (self.is_backend and peer not in _IDLE):
                loop = asyncio.get_running_loop()
                self._close_timer = loop.call_later(self.close_timeout, self._close_timed_out)
                return True
            # A front end that has advertised nothing: no acknowledgement to wait for (a
            # back end in InitWait would not give one).
            self._close_expired = True
        if close_done(dev.state, peer) is not None or self._close_expired:
            if self._close_timer is not None:
                self._close_timer.cancel()
            await self._disconnect()
            await self._publish(S.CLOSED)
            return False
        return True

    def _close_timed_out(self) -> None:
        self._close_expired = True
        self._wakeup.set()

    async def _perform(self, step: Step) -> None:
        dev, driver = self.dev, self.driver
        keys: Mapping[str, str] | None = None
        for action in (step.action, step.also):
            if action is None or action == Action.NONE:
                continue
            if action == Action.DISCONNECT:
                await self._disconnect()
            elif action == Action.RESET:
                if isinstance(driver, BackendDriver):
                    await dev.write(await driver.advertise(dev))
                else:
                    await self._remove_published()
            elif action == Action.CONNECT:
                self._attached = True
                try:
                    if isinstance(driver, BackendDriver):
                        keys = await driver.connect(dev)
                        dev.connected = True
                    else:
                        keys = await driver.connect(dev)
                        self._published = tuple(dict.fromkeys(k.split("/", 1)[0] for k in keys))
                        await self._publish(driver.connect_state, keys)
                        return
                except (OSError, ProtocolError, ValueError) as exc:
                    log.warning("%r: connect failed: %s", dev, exc)
                    self._attached = False
                    with contextlib.suppress(Exception):
                        await driver.disconnect(dev)
                    return  # stay put; the next peer change tries again
            elif action == Action.CONNECTED:
                assert isinstance(driver, FrontendDriver)
                await driver.connected(dev)
                dev.connected = True
                self._state_changed.set()  # acknowledged (the state may be unchanged)
            elif action == Action.RECONFIGURE:
                assert isinstance(driver, BackendDriver)
                await driver.reconfigure(dev)
        if step.state is not None and (step.state != dev.state or keys):
            await self._publish(step.state, keys)


async def backend_device(
    platform: Platform, type_: str, frontend_domid: int, devid: int
) -> XenbusDevice:
    """The back end's view of device ``type_/devid`` of ``frontend_domid`` (its directory
    must exist: the toolstack creates it)."""
    check_domid(frontend_domid, "frontend_domid")
    own = backend_dir(platform.domid, type_, frontend_domid, devid)
    store = platform.store
    raw = await read_opt(store, f"{own}/frontend")
    if raw is None:
        raise FileNotFoundError(
            f"no {type_} device {devid} for domain {frontend_domid}: {own}/frontend is "
            f"missing (create it with `aioxen device add {type_} {frontend_domid}`)"
        )
    fdir = raw.decode(errors="replace").rstrip("\0")
    fid = read_int(await read_opt(store, f"{own}/frontend-id"), f"{own}/frontend-id",
                   frontend_domid, 0, 0x7FEF)  # fmt: skip
    if fid != frontend_domid:
        raise ProtocolError(
            f"{own}/frontend-id is {fid}, not {frontend_domid}", field="frontend-id"
        )
    return XenbusDevice(platform, "backend", type_, devid, own, fdir, frontend_domid)


async def frontend_device(
    platform: Platform,
    type_: str,
    devid: int,
    *,
    backend_domid: int | None = None,
    timeout: float | None = 30.0,
) -> XenbusDevice:
    """The front end's view of its device ``type_/devid``; waits (bounded) for the
    toolstack's ``backend``/``backend-id`` keys, which may appear late."""
    own = frontend_dir(platform.domid, type_, devid)
    store = platform.store
    async with asyncio.timeout(timeout):
        async with store.watch(own) as w:
            while True:
                raw_be = await read_opt(store, f"{own}/backend")
                raw_id = await read_opt(store, f"{own}/backend-id")
                if raw_be is not None and raw_id is not None:
                    break
                await w.next()
    be = read_int(raw_id, f"{own}/backend-id", 0, 0, 0x7FEF)
    if backend_domid is not None and be != backend_domid:
        raise ProtocolError(
            f"{own}/backend-id is {be}, not the expected {backend_domid}", field="backend-id"
        )
    bdir = raw_be.decode(errors="replace").rstrip("\0")
    return XenbusDevice(platform, "frontend", type_, devid, own, bdir, be)


__all__ = [
    "BackendDriver",
    "DeviceRunner",
    "FrontendDriver",
    "XenbusDevice",
    "backend_device",
    "backend_dir",
    "feature",
    "frontend_device",
    "frontend_dir",
    "negotiate",
    "read_int",
    "read_opt",
]
