"""``VchanTransport``: an `asyncio.Transport` over a connected vchan.

Theory of operation
-------------------
The transport owns one [`Connection`][aioxen.vchan.endpoint.Connection] (the wire core, its
event channel and its grants).  Everything is driven by one callback, [`_service`][],
installed with ``EventChannel.set_handler``: it runs on every batch of events and after
``resume_reading``.  Each run

1. moves buffered outgoing bytes into the write ring;
2. delivers *everything* readable (one copy per contiguous span, not per chunk); when the
   ring is empty it asks the peer for a write notification and re-checks, so the peer
   only signals when we are really idle (notification suppression);
3. checks the peer's live byte and the channel's ``peer_lost``.

Writes go straight into the ring when nothing is queued; only the remainder is queued,
without a copy for ``bytes`` (the queue holds ``memoryview`` slices; other buffers are
copied once, as asyncio's socket transports do), and it moves into the ring as space
appears.  asyncio's high/low water marks drive ``pause_writing``/``resume_writing``; a
read notification is requested when the ring is full, so the peer's next consumption
wakes us.

Busy polling.  After a message (a write that fits the ring, or a delivery, of at most
[`aioxen.pollpolicy.POLL_MAX_MESSAGE`][] bytes) the transport may poll its rings
for a bounded, adaptive window instead of asking the peer for notifications: one look per
event-loop iteration ([`_poll`][], an ordinary ``call_soon`` callback); when the window
runs out it arms notifications and re-checks, exactly as without polling.  *Whether* and
*how long* to poll is decided by a [`PollPolicy`][aioxen.pollpolicy.PollPolicy] (its
module docstring is the theory of operation); the transport tells it each event with the
time, and does what it answers.  ``busy_poll`` is the window's maximum; ``busy_poll=0``
disables polling (the default where the peer cannot run concurrently, e.g. the
single-process ``inheap`` platform: [`aioxen.platforms.base.Platform.peer_runs_concurrently`][]).

Bulk spinning.  Bulk data through a ring smaller than the transfer makes one side wait,
every ring's worth, for the other to copy -- microseconds, while a sleep and an
event-channel wake-up cost tens.  So a writer that finds the ring full with bytes queued,
and a reader that empties the ring in the middle of a bulk delivery into a
`asyncio.BufferedProtocol`, first spin on the ring's indices in C for up to ``busy_poll``
(``_spin_wait``), and only then arm notifications and re-check; while both ends keep up,
no notification is sent at all.  A ``data_received`` reader (a ``StreamReader``) does not
spin: it pays a Python call and a copy per delivery, and a spinning reader takes each
write as it lands -- 4 KiB at a time from a 4 KiB writer -- where a sleeping one takes
the ring's worth that piled up meanwhile (measured: streams bulk at 4 and 16 KiB writes
through the default ring ran at about half the speed with reader spinning, while
BufferedProtocol bulk at 64 KiB and 1 MiB gained from it).  Instead, a stream reader
that took bulk and emptied the ring looks once more, unarmed, in the next loop iteration --
after its consumer ran, by when a spinning writer has usually refilled the ring -- and
only arms and re-checks if that look finds nothing: a stream of bulk writes then costs
the reader no wake-up per ring's worth and the writer no notification.  A
[`SpinPolicy`][aioxen.pollpolicy.SpinPolicy] stops spinning for a while when spins
time out or run mostly off the CPU (a busy machine), and a reader's pass hands the loop
back after [`aioxen.pollpolicy.SPIN_BATCH_MAX`][] bytes.

Delivery.  A `asyncio.BufferedProtocol` gets bytes copied once from the ring into
the buffer it returns from ``get_buffer``.  The stdlib ``StreamReaderProtocol`` (which
copies synchronously in ``data_received``) gets a ``memoryview`` of the ring itself, so
the only copy is into the ``StreamReader`` buffer; any other protocol gets ``bytes``.

End of stream.  ``write_eof()`` sets the EOF bit ([`NOTIFY_EOF`][aioxen.vchan.wire.NOTIFY_EOF])
once the buffered bytes are in the ring.  ``close()`` flushes, sets the EOF bit and our
live byte to 0, signals, then unmaps.  On the reading side, seeing the EOF bit (or the
peer's live byte at 0, or the channel's peer lost) is followed by draining up to the
``prod`` index read *afterwards*, so nothing written before the close is lost; then
``eof_received()``.  When the peer is gone for good, everything left in the ring is
delivered (even while reading is paused: at most one ring, 1 MiB) and
``connection_lost(None)`` follows; undeliverable queued writes make a later
``StreamWriter.drain()`` raise ``ConnectionResetError``.  A corrupt control page is a
[`ProtocolError`][aioxen.ProtocolError]: the connection is torn down and the error is passed to
``connection_lost``.

A cut stream is never a clean EOF.  Each transport announces
[`NOTIFY_ENDS`][aioxen.vchan.wire.NOTIFY_ENDS] to its peer when it starts (see
[`aioxen.vchan.wire`][]); ``close()`` ends the stream with the EOF bit, ``abort()``, a
fatal error and a process that dies do not.  So when a peer that announced it goes away
without the EOF bit, the reader gets ``connection_lost(ConnectionResetError)`` (a stream
reader raises it) instead of ``eof_received()``.  (A libxenvchan peer announces nothing;
its close stays an EOF.)

Closing the platform under a live transport.  Each transport registers with its platform
([`end_users`][aioxen.platforms.base.Platform.end_users]): when the platform closes, a transport
whose ``close()`` was called but whose queued bytes are not all in the ring yet gets up to
the platform's ``close_timeout`` to flush them (the peer must read); a transport that was
never closed, or whose flush does not finish in time, is aborted -- the peer sees
``ConnectionResetError``, the local protocol ``connection_lost(ConnectionAbortedError)``.
Only then is the shared memory released.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections import deque
from os import sched_yield as _sched_yield
from time import perf_counter
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.flowcontrol import WriteFlowControl
from aioxen.native import ffi
from aioxen.pollpolicy import (
    CONTENDED_GAP,
    DEFAULT_BUSY_POLL,
    LATE_FINDS,
    MAX_BUSY_POLL,
    MAX_POLL_COOLDOWN,
    MIN_WINDOW_SCORE,
    POLL_AGAIN,
    POLL_COOLDOWN,
    POLL_FOUND,
    POLL_MAX_MESSAGE,
    POLL_YIELD,
    SHRINK_GAP,
    SPIN_BATCH_MAX,
    SPIN_ROUNDS,
    YIELD_AFTER,
    PollPolicy,
    SpinPolicy,
)
from aioxen.vchan import wire
from aioxen.vchan.endpoint import Connection
from aioxen.vchan.wire import (
    NOTIFY_WRITE,
    STEP_CONS_SHIFT,
    STEP_EOF,
    STEP_LIVE,
    STEP_NOTIFY,
    STEP_USED,
)

_U32 = 0xFFFFFFFF

logger = logging.getLogger("aioxen.vchan")

DEFAULT_HIGH_WATER = 64 * 1024
_LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5


BUSY_POLL_ENV = "AIOXEN_VCHAN_BUSY_POLL"
"""Environment variable overriding the default ``busy_poll`` (seconds, e.g. ``0``)."""


def check_busy_poll(busy_poll: float | None, peer_runs_concurrently: bool = True) -> float:
    """Resolve and validate a ``busy_poll`` argument: ``None`` means ``$AIOXEN_VCHAN_BUSY_POLL``
    if set, else [`DEFAULT_BUSY_POLL`][] -- or 0 if the peer cannot run while we poll
    (the platform's [`aioxen.platforms.base.Platform.peer_runs_concurrently`][])."""
    if busy_poll is None:
        env = os.environ.get(BUSY_POLL_ENV)
        if not env:
            return DEFAULT_BUSY_POLL if peer_runs_concurrently else 0.0
        try:
            busy_poll = float(env)
        except ValueError:
            raise ValueError(f"${BUSY_POLL_ENV}={env!r} is not a number of seconds") from None
    if isinstance(busy_poll, bool) or not isinstance(busy_poll, (int, float)):
        raise TypeError(f"busy_poll must be a number of seconds, not {busy_poll!r}")
    if not 0 <= busy_poll <= MAX_BUSY_POLL:
        raise ValueError(f"busy_poll {busy_poll!r} out of range 0..{MAX_BUSY_POLL} s")
    return float(busy_poll)


def _cpu_to_spare() -> bool:
    """Whether the machine looks like it has a CPU to spare for spinning: the 1-minute load
    average at most the number of CPUs (both ends of a busy vchan count)."""
    try:
        return os.getloadavg()[0] <= (os.cpu_count() or 1)
    except OSError:
        return True


class VchanTransport(WriteFlowControl, asyncio.Transport):
    """A bidirectional byte-stream transport over one vchan.

    ``busy_poll``: the maximum busy-poll window in seconds (``None`` =
    `DEFAULT_BUSY_POLL`, or 0 where the peer cannot run concurrently, e.g. on the
    ``inheap`` platform; 0 disables polling; at most `MAX_BUSY_POLL`).

    Extra info: ``peer_domid``, ``port``, ``platform``, ``role`` (``"server"`` or
    ``"client"``), ``read_size``/``write_size`` (ring sizes in bytes), ``peername``
    (``(peer_domid, port)``), ``sockname`` (``(own domid, port)``) and ``busy_poll``.
    """

    default_high = DEFAULT_HIGH_WATER

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: Connection,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
        *,
        busy_poll: float | None = None,
    ) -> None:
        window = check_busy_poll(busy_poll, conn.platform.peer_runs_concurrently)
        info: dict[str, Any] = {
            "peer_domid": conn.peer_domid,
            "port": conn.port,
            "platform": conn.platform,
            "role": conn.role,
            "read_size": conn.core.read_size,
            "write_size": conn.core.write_size,
            "peername": (conn.peer_domid, conn.port),
            "sockname": (conn.platform.domid, conn.port),
            "busy_poll": window,
        }
        if extra:
            info.update(extra)
        super().__init__(info)
        self._loop = loop
        self._conn = conn
        self._core = conn.core
        self._channel = conn.channel
        self._protocol: asyncio.BaseProtocol = protocol
        self._buffered = False
        self._trusted = False
        self._set_protocol_kind(protocol)
        self._wbuf: deque[memoryview] = deque()  # queued writes, oldest first
        self._wlen = 0  # bytes in _wbuf
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False  # we called pause_writing()
        self._reading_paused = False
        self._closing = False  # close() called (or tearing down)
        self._eof_requested = False  # write_eof() called
        self._eof_sent = False
        self._peer_eof = False  # eof_received() delivered
        self._started = False
        self._conn_lost = 0  # >0 once connection_lost is scheduled
        self._service_scheduled = False
        self._in_service = False
        self._busy = 0  # >0 while our code runs with the core (release is deferred)
        # busy polling: the policy decides, we look at the rings (see pollpolicy.py)
        self._poll_max = window  # cached: write() tests it on every call
        self._policy = PollPolicy(window, perf_counter())
        self._spin = SpinPolicy(window, _cpu_to_spare)  # bulk spin-waits (see SpinPolicy)
        self._bulk_scheduled = False  # a delivery pass continues next loop iteration
        self._recheck_unarmed = False  # that pass is a stream reader's unarmed second look
        # a delivery pass this big is bulk (a message is at most POLL_MAX_MESSAGE; a
        # ring smaller than that is bulk when one pass empties a full ring)
        self._bulk_min = min(POLL_MAX_MESSAGE + 1, self._core.read_size)
        self._last_batch = 0  # bytes the last pump delivered
        self._rleft = 0  # bytes the last pump left in the read ring (a partial datagram)
        self._lost_waiters: list[asyncio.Future[None]] = []  # resolved by _teardown
        # We end our stream with the EOF bit: a close without it is a cut (wire docstring).
        self._core.announce_ends()
        plat = conn.platform
        plat.add_user(self)
        conn.on_release.append(lambda: plat.remove_user(self))
        loop.call_soon(self._start, waiter)

    # -- setup -----------------------------------------------------------------------------
    def _set_protocol_kind(self, protocol: asyncio.BaseProtocol) -> None:
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        # The stdlib stream protocol copies synchronously in data_received: give it a view.
        self._trusted = type(protocol) is asyncio.StreamReaderProtocol

    def _start(self, waiter: asyncio.Future[None] | None) -> None:
        try:
            self._protocol.connection_made(self)
        except BaseException as exc:
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            self._force_close(None)
            if not isinstance(exc, Exception):
                raise
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._started = True
        if self._conn_lost:
            return
        self._channel.set_handler(self._service)
        self._service()  # anything that arrived before the handler was installed

    def __repr__(self) -> str:
        state = "closed" if self._conn_lost else "closing" if self._closing else "open"
        return (
            f"<{type(self).__name__} {self._conn.describe()} {state} "
            f"rbuf={self._core.read_size} wbuf={self._wlen}>"
        )

    # -- the event handler -----------------------------------------------------------------
    def _scheduled_service(self) -> None:
        self._service_scheduled = False
        self._service()

    def _schedule_service(self) -> None:
        if not self._service_scheduled and not self._conn_lost:
            self._service_scheduled = True
            self._loop.call_soon(self._scheduled_service)

    def _service(self) -> None:
        """Event handler (and general kick): move data both ways; then poll or arm."""
        if self._conn_lost or not self._started or self._in_service:
            return
        if not self._poll_max:
            self._run_service(True)
        elif self._policy.polling:
            self._run_service(False)  # a window is open: it goes on watching
        else:
            self._policy.woken(perf_counter())
            self._run_service(True)
            if 0 < self._last_batch <= POLL_MAX_MESSAGE and not self._conn_lost:
                self._want_poll()  # a message came: its sequel may follow soon

    def _run_service(self, arm: bool) -> None:
        """One service pass.  ``arm``: ask the peer for notifications where we would wait
        (read ring empty, write ring full) and re-check; otherwise a poll window is open."""
        if self._conn_lost or not self._started or self._in_service:
            return
        self._in_service = True
        self._busy += 1
        self._spin.start()  # this callback's spinning budget (nested writes share it)
        try:
            core = self._core
            if self._wbuf:
                self._flush(arm)
            if not self._reading_paused and not self._peer_eof and not self._closing:
                live = self._pump(False, arm)  # validates both rings
            else:
                # not reading: still validate both rings and the live byte
                live = 1 if core.step(-1, False) & STEP_LIVE else 0
            if not self._conn_lost and (live == 0 or self._channel.peer_lost):
                self._peer_gone()
            elif core.notify_pending:
                core.notify_pending = False
                self._channel.notify()
        except ProtocolError as exc:
            self._fatal_error(exc)
        except Exception as exc:
            self._fatal_error(exc, "Fatal error on vchan transport")
        finally:
            self._in_service = False
            self._busy -= 1
            if self._conn_lost:
                self._maybe_release()

    # -- busy polling (the decisions are PollPolicy's) ----------------------------------
    def _want_poll(self) -> None:
        """A message went or came: extend the poll window, or open one (and schedule its
        first poll) if the policy says so."""
        if self._policy.activity(perf_counter(), not self._conn_lost):
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        """One poll: a single look at both rings (no notify bits touched); the policy
        says what next."""
        policy = self._policy
        if not policy.polling:
            return
        if self._conn_lost:
            policy.cancel()
            return
        core = self._core
        reading = not self._reading_paused and not self._peer_eof and not self._closing
        try:
            r = core.step(-1, False)
            found = not r & STEP_LIVE or (
                reading and ((r & STEP_USED) > self._rleft or r & STEP_EOF != 0)
            )
            if not found and self._wbuf:
                found = core.writable() > 0
        except ProtocolError as exc:
            policy.cancel()
            self._fatal_error(exc)
            return
        now = perf_counter()
        action = policy.polled(now, found, reading or bool(self._wbuf))
        if action == POLL_AGAIN:
            self._loop.call_soon(self._poll)
        elif action == POLL_YIELD:
            _sched_yield()  # perhaps the peer waits for our CPU: let it run
            self._loop.call_soon(self._poll)
        elif action == POLL_FOUND:
            if policy.polling:
                self._loop.call_soon(self._poll)
            self._run_service(not policy.polling)
            if policy.polling and self._last_batch > POLL_MAX_MESSAGE:
                # Bulk data, not a message: batches grow while we sleep between events,
                # and every delivery costs the protocol.  Back to notifications.
                policy.end_window(now)
                self._run_service(True)
        else:  # POLL_ENDED: back to notifications (arm, re-check, sleep)
            self._run_service(True)

    # -- reading ---------------------------------------------------------------------------
    def _pump(self, force: bool, arm: bool = True) -> int:
        """Deliver readable bytes until the ring is empty (then, with ``arm``, ask for a
        write notification and re-check) or reading is paused.  ``force``: the peer is
        gone, deliver everything, no arming.  Returns the peer's live byte as seen by the
        last check.

        Each step ([`step`][aioxen.vchan.wire.VchanCore.step], one native call that also
        releases what the previous delivery consumed) loads the EOF bit *before* the
        indices: if it was set and the ring is then found empty, the stream is complete.
        If it gets set later, the writer's event brings us back here.
        """
        core = self._core
        step = core.step_raw
        arm_bit = NOTIFY_WRITE if arm and not force else 0
        rsize = core.read_size
        # Bulk: an emptied ring is first watched by a short spin, unarmed (SpinPolicy) --
        # also on entry if the previous pass was bulk (an event for bytes that pass
        # already took must not re-arm: that would cost the writer a notification).
        # only a BufferedProtocol reader spins (see the module docstring: Bulk spinning)
        spin = arm_bit and self._buffered and self._spin.allowed(perf_counter())
        spins = SPIN_ROUNDS if spin else 0
        stream_bulk = arm_bit and not self._buffered
        bulk_min = self._bulk_min
        bulk = self._last_batch >= bulk_min
        recheck = self._recheck_unarmed
        self._recheck_unarmed = False
        r = step(-1, 0 if (spins and bulk) or recheck else arm_bit)
        self._last_batch = 0
        while True:
            if r < 0:
                raise core.step_error(r)
            used = r & STEP_USED
            if not used:
                if r & STEP_EOF:
                    self._deliver_eof()
                    return 1 if r & STEP_LIVE else 0
                if spins and (bulk or self._last_batch >= bulk_min) and r & STEP_LIVE:
                    spins -= 1
                    if not self._spin_wait(True):
                        spins = 0
                        r = step(-1, arm_bit)  # back to notifications: arm, re-check
                        continue
                    bulk = True
                    r = step(-1, 0)
                    continue
                if stream_bulk and self._last_batch >= bulk_min and r & STEP_LIVE:
                    # a stream reader that took bulk: look again, unarmed, once its
                    # consumer has run (module docstring: Bulk spinning)
                    self._recheck_unarmed = True
                    self._continue_bulk()
                    return 1
                if recheck:
                    recheck = False
                    r = step(-1, arm_bit)  # the look found nothing: arm, re-check
                    continue
                return 1 if r & STEP_LIVE else 0
            if spins and self._last_batch >= SPIN_BATCH_MAX:
                # enough for one callback while spinning: go on in the next loop iteration
                self._continue_bulk()
                return 1
            # after this delivery: arm only if no spin will watch the ring
            next_arm = 0 if spins and self._last_batch + used >= bulk_min else arm_bit
            if stream_bulk and self._last_batch + used >= bulk_min:
                next_arm = 0
            if self._buffered:
                self._last_batch += self._deliver_buffered(force, used)
                if self._conn_lost:
                    return 1
                stop = not force and (self._closing or self._reading_paused)
                r = step(-1, 0 if stop else next_arm)
                if stop:
                    if r < 0:
                        raise core.step_error(r)
                    return 1 if r & STEP_LIVE else 0
                continue
            view = core.read_view
            if view is None:  # released under us (aborted from a callback)
                return 1
            cons = (r >> STEP_CONS_SHIFT) & _U32
            off = cons & (rsize - 1)
            n = rsize - off
            if used < n:
                n = used
            chunk = view[off : off + n]
            self._last_batch += n
            protocol: Any = self._protocol
            if self._trusted:
                # the stdlib stream protocol copies synchronously: hand it the ring itself
                try:
                    protocol.data_received(chunk)
                finally:
                    chunk.release()
                if self._conn_lost:
                    return 1
                stop = not force and (self._closing or self._reading_paused)
                r = step((cons + n) & _U32, 0 if stop else next_arm)
                if r > 0 and r & STEP_NOTIFY:
                    core.notify_pending = True
            else:
                data = bytes(chunk)
                chunk.release()
                r = step((cons + n) & _U32, next_arm)
                if r > 0 and r & STEP_NOTIFY:
                    core.notify_pending = True
                protocol.data_received(data)
                if self._conn_lost:
                    return 1
                stop = not force and (self._closing or self._reading_paused)
            if stop:
                if r < 0:
                    raise core.step_error(r)
                return 1 if r & STEP_LIVE else 0

    def _spin_wait(self, reading: bool) -> bool:
        """Bulk spin ([`SpinPolicy`][aioxen.pollpolicy.SpinPolicy]) while the read
        ring stays empty (``reading``) or the write ring full.  True if it changed.

        Only while the peer is awake: if it asked to be notified (a notification is
        pending), it sleeps -- send it and do not spin: it can only answer after a wake-up,
        and on a busy machine our spinning would take the very CPU it needs to wake."""
        core = self._core
        if core.notify_pending:
            core.notify_pending = False
            self._channel.notify()
            return False
        spin = self._spin
        ns = spin.spin_ns()
        if not ns:
            return False  # this call's spinning budget is spent: notifications
        took = core.spin_readable(ns) if reading else core.spin_writable(ns)
        return spin.spun(perf_counter(), took)

    def _continue_bulk(self) -> None:
        """A delivery pass stopped with bulk data still coming: continue it in the next
        event-loop iteration (no notification needed; other callbacks run first)."""
        if not self._bulk_scheduled:
            self._bulk_scheduled = True
            self._loop.call_soon(self._bulk_pass)

    def _bulk_pass(self) -> None:
        self._bulk_scheduled = False
        self._run_service(True)

    def _deliver_buffered(self, force: bool, n: int) -> int:
        """Copy up to ``n`` bytes straight from the ring into the protocol's buffers (one
        native copy per ``get_buffer``); returns the count."""
        core = self._core
        protocol: Any = self._protocol
        total = 0
        while n > 0 and not self._conn_lost:
            buf = protocol.get_buffer(n)
            with ffi.from_buffer(buf, require_writable=True) as p:
                size = len(p)
                if not size:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                got = core.recv_into(p, min(size, n))
            if not got:
                return total
            total += got
            protocol.buffer_updated(got)
            n -= got
            if not force and (self._closing or self._reading_paused):
                return total
        return total

    def _deliver_eof(self) -> None:
        self._peer_eof = True
        logger.debug("%r received EOF", self)
        keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open and not self._closing:
            self.close()

    def _peer_gone(self) -> None:
        """The peer closed or died: deliver what it wrote, EOF, then lose the connection
        -- or, if its stream was cut ([`_cut_error`][]), ``ConnectionResetError``."""
        logger.debug("%r: peer gone", self)
        exc: Exception | None = None
        if not self._peer_eof and not self._closing:
            self._pump(True)
            if not self._peer_eof and not self._conn_lost:
                exc = self._cut_error()
                if exc is None:
                    self._peer_eof = True
                    self._protocol.eof_received()  # type: ignore[attr-defined]
        self._closing = True
        self._clear_queue()
        self._teardown(exc, set_live=True, eof=exc is None)

    def _cut_error(self) -> ConnectionResetError | None:
        """The peer is gone without the EOF bit: a ``ConnectionResetError`` if it had
        announced [`NOTIFY_ENDS`][aioxen.vchan.wire.NOTIFY_ENDS] (its stream was cut), else
        ``None`` (a libxenvchan peer: its close is the end of its stream)."""
        if self._conn.released or not self._core.peer_announced_ends():
            return None
        return ConnectionResetError(
            f"{self._conn.describe()}: the peer went away without ending its stream "
            "(aborted, failed or died); data it wrote may be missing"
        )

    # -- reading flow control ----------------------------------------------------------------
    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing and not self._conn_lost

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._schedule_service()

    # -- writing ---------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._wbuf or self._conn_lost or self._eof_requested or type(data) is not bytes:
            self._write_slow(data)
            return
        n = len(data)
        if not n:
            return
        core = self._core
        self._busy += 1
        try:
            put = core.send_raw(data, n)
            if put < 0:
                raise core.write_error()
            if put > _U32:
                put &= _U32
                self._channel.notify()
            if put != n:
                # the ring is full: bulk, not a message (no poll window; see _flush)
                self._enqueue(memoryview(data)[put:], n - put)
            elif self._poll_max and n <= POLL_MAX_MESSAGE:
                self._want_poll()  # a reply may follow: watch the ring for a while
        except ProtocolError as exc:
            self._fatal_error(exc)
        finally:
            self._busy -= 1
            if self._conn_lost:
                self._maybe_release()

    def _write_slow(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._conn_lost:
            if self._conn_lost >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("vchan write() after the connection was lost")
            self._conn_lost += 1
            return
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        if not n:
            return
        self._busy += 1
        try:
            put = 0
            core = self._core
            if not self._wbuf:
                with ffi.from_buffer(view) as p:
                    put = core.send(p, n)
                if core.notify_pending:
                    core.notify_pending = False
                    self._channel.notify()
            if put != n:
                # bytes are immutable: queue a view (also of a read-only view of bytes,
                # e.g. qrexec's chunks of one big write); anything else is copied once
                frozen = type(data) is bytes or (view.readonly and type(view.obj) is bytes)
                rest = view[put:] if frozen else memoryview(bytes(view[put:]))
                self._enqueue(rest, n - put)  # the ring is full: bulk, no poll window
            elif self._poll_max and n <= POLL_MAX_MESSAGE:
                self._want_poll()
        except ProtocolError as exc:
            self._fatal_error(exc)
        finally:
            self._busy -= 1
            if self._conn_lost:
                self._maybe_release()

    def _enqueue(self, view: memoryview, n: int) -> None:
        self._wbuf.append(view)
        self._wlen += n
        self._flush(not self._policy.polling)
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _clear_queue(self) -> None:
        self._wbuf.clear()
        self._wlen = 0

    def _flush(self, arm: bool = True) -> None:
        """Move queued bytes into the ring.  When it is full and ``arm``, ask for a read
        notification and re-check (otherwise a poll window watches for space)."""
        core = self._core
        wbuf = self._wbuf
        # Bulk: a full ring is first watched by a short spin, unarmed (SpinPolicy).
        spins = SPIN_ROUNDS if arm and self._spin.allowed(perf_counter()) else 0
        if spins and not self._in_service:
            self._spin.start()  # a write() from outside our callbacks: its own budget
        try:
            while wbuf:
                head = wbuf[0]
                size = head.nbytes
                with ffi.from_buffer(head) as p:
                    put = core.send(p, size)
                if put:
                    self._wlen -= put
                    if put == size:
                        wbuf.popleft()
                    else:
                        wbuf[0] = head[put:]
                elif not arm:
                    break
                elif spins:
                    spins -= 1
                    if not self._spin_wait(False):
                        spins = 0
                elif core.request_writable() == 0:
                    break
        except ProtocolError as exc:
            self._fatal_error(exc)
            return
        if core.notify_pending:
            core.notify_pending = False
            self._channel.notify()
        self._maybe_resume_protocol()
        if not wbuf:
            if self._closing and not self._conn_lost:
                self._teardown(None, set_live=True)
            elif self._eof_requested and not self._eof_sent:
                self._send_eof()

    def _send_eof(self) -> None:
        self._eof_sent = True
        self._core.shutdown_write()
        self._core.notify_pending = False
        self._channel.notify()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Shut down the write direction: the peer reads everything written so far, then
        EOF.  (Wire: the `NOTIFY_EOF` bit; a libxenvchan peer
        does not see it and only notices the final close.)"""
        if self._eof_requested or self._closing or self._conn_lost:
            return
        self._eof_requested = True
        if not self._wbuf:
            self._send_eof()

    # -- write flow control (limits and pause/resume: WriteFlowControl) --------------------
    def get_write_buffer_size(self) -> int:
        """Bytes queued in the transport (not yet in the ring)."""
        return self._wlen

    # -- closing ---------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or bool(self._conn_lost)

    def close(self) -> None:
        """Flush queued bytes into the ring, then end the stream and close the vchan.

        No more data is received.  ``connection_lost(None)`` follows once everything
        queued is in the ring (the peer can still read it after we unmap).
        """
        if self._closing or self._conn_lost:
            return
        self._closing = True
        if not self._wbuf:
            self._teardown(None, set_live=True)

    def abort(self) -> None:
        """Close at once, discarding queued bytes (no EOF bit: the peer just sees the close)."""
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._conn_lost:
            return
        self._closing = True
        self._clear_queue()
        self._teardown(exc, set_live=True, eof=False)

    def _fatal_error(self, exc: Exception, message: str | None = None) -> None:
        if isinstance(exc, (ProtocolError, OSError)):
            logger.debug("%r: %s", self, exc, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message or "Fatal error on vchan transport",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _teardown(self, exc: Exception | None, *, set_live: bool, eof: bool = True) -> None:
        """Mark the end on the wire, release the memory, schedule ``connection_lost``."""
        if self._conn_lost:
            return
        self._conn_lost = 1
        self._closing = True
        conn = self._conn
        if not conn.released:
            try:
                core = self._core
                if eof and not self._eof_sent:
                    self._eof_sent = True
                    core.shutdown_write()
                if set_live:
                    core.set_live(wire.LIVE_CLOSED)
                core.notify_pending = False
                self._channel.notify()
                self._channel.set_handler(None)
            except Exception:  # memory already unusable: nothing more to tell the peer
                logger.debug("%r: could not mark the close on the wire", self, exc_info=True)
        if self._protocol_paused:
            self._protocol_paused = False
        waiters, self._lost_waiters = self._lost_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self._loop.call_soon(self._call_connection_lost, exc)
        self._maybe_release()

    async def platform_closing(self, timeout: float) -> None:
        """The platform is closing ([`end_users`][aioxen.platforms.base.Platform.end_users]):
        give a ``close()`` in progress up to ``timeout`` seconds to move its queued bytes
        into the ring (the peer must read them), then abort whatever is still open, so the
        peer sees ``ConnectionResetError`` rather than a short stream and a clean EOF."""
        if self._conn_lost:
            return
        if self._closing and self._wbuf and timeout > 0:
            fut = self._loop.create_future()
            self._lost_waiters.append(fut)
            try:
                async with asyncio.timeout(timeout):
                    await fut
            except TimeoutError:
                pass
            finally:
                if fut in self._lost_waiters:
                    self._lost_waiters.remove(fut)
        if self._conn_lost:
            return
        what = "closing" if self._closing else "open"
        logger.debug("%r: aborted by the platform's close", self)
        self._force_close(
            ConnectionAbortedError(
                f"{self._conn.describe()}: platform closed with the stream still {what}"
                + (f" ({self._wlen} bytes not sent)" if self._wlen else "")
            )
        )

    def _maybe_release(self) -> None:
        """Release the shared memory as soon as the connection is over and none of our
        code is using the core (so that closing the platform right after ``close()``
        works); otherwise this happens when the outermost call returns."""
        if self._conn_lost and not self._busy and not self._conn.released:
            self._release()

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._started:
                self._protocol.connection_lost(exc)
        finally:
            self._release()

    def _release(self) -> None:
        try:
            self._conn.release()
        except Exception as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"error releasing {self._conn.describe()}",
                    "exception": exc,
                    "transport": self,
                }
            )

    def __del__(self) -> None:
        if not getattr(self, "_conn_lost", 1) and not self._conn.released:
            warnings.warn(f"unclosed transport {self!r}", ResourceWarning, stacklevel=1)

    # -- protocol ----------------------------------------------------------------------------
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._set_protocol_kind(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    @property
    def connection(self) -> Connection:
        """The underlying `Connection` (advanced use)."""
        return self._conn


__all__ = [
    "BUSY_POLL_ENV",
    "CONTENDED_GAP",
    "DEFAULT_BUSY_POLL",
    "DEFAULT_HIGH_WATER",
    "LATE_FINDS",
    "MAX_BUSY_POLL",
    "MAX_POLL_COOLDOWN",
    "MIN_WINDOW_SCORE",
    "POLL_COOLDOWN",
    "POLL_MAX_MESSAGE",
    "SHRINK_GAP",
    "YIELD_AFTER",
    "VchanTransport",
    "check_busy_poll",
]
