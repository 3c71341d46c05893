"""``PollPolicy``: when a shared-ring transport busy-polls its rings, and for how long.

Theory of operation
-------------------
Waking up through an event channel costs a system call on the writer, a wake-up of the
reader's event loop and a callback; a ring can instead be *polled*.  After a message --
a write, or a delivery, of at most [`POLL_MAX_MESSAGE`][] bytes -- the transport polls
its rings for a bounded *window* instead of asking the peer for notifications (bulk
transfers stay on notifications: while one side sleeps the other moves big batches, and
a delivery that big ends a window): one look per event-loop iteration, run as an ordinary
``call_soon`` callback, so other tasks, I/O and timers run in between (and after
[`YIELD_AFTER`][] without a find, one poll first yields the CPU with ``sched_yield``,
so a peer that shares our CPU is not kept waiting by the very loop that waits for it).
Each find extends the window; when it runs out the transport falls back to the notify
protocol: it sets the notify bit(s) and *re-checks* the rings (the atomic OR is a full
barrier), exactly as without polling, then sleeps until the event.  While both ends poll,
steady-state traffic needs no notify system call and no event-loop wake-up at all.

This module is the *decision* half, and nothing else: a pure state machine with no
asyncio, no rings and no clock of its own.  Like aioquic's ``recovery``/``congestion``
code it is handed the time (``now``, seconds from any monotonic clock) with each event,
and it answers what to do; the transport ([`aioxen.vchan.transport`][], and the io/ring.h
adapters of [`aioxen.rings.aio`][]) does it -- looks at the rings, schedules the next
poll, arms notifications.  The events are:

- [`PollPolicy.activity`][] -- a message was written or delivered: extend the open
  window, or open one (``True``: the caller schedules the first poll);
- [`PollPolicy.woken`][] -- the peer woke us by event while no window was open: size
  the next window;
- [`PollPolicy.polled`][] -- one poll looked at the rings: poll again
  ([`POLL_AGAIN`][], or [`POLL_YIELD`][] after yielding the CPU once), the poll found
  something ([`POLL_FOUND`][]; [`PollPolicy.polling`][] says whether the window goes
  on), or the window ended ([`POLL_ENDED`][]: arm notifications);
- [`PollPolicy.end_window`][] -- the transport ends the window itself (bulk data);
- [`PollPolicy.cancel`][] -- the connection is gone.

The window adapts like a halt-polling governor: [`PollPolicy.max`][] (the transport's
``busy_poll``) is its maximum.  When the peer's next activity arrives by event after a
window ran out, the gap since the wait began decides: within ``max`` (a longer window
would have caught it) the window doubles, up to the maximum; more than [`SHRINK_GAP`][]
times ``max`` later it halves, and below an eighth of the maximum polling stops, to
resume (at an eighth) once an event again arrives within ``max`` of the wait's start.

Contended CPUs end polling: two successive polls more than [`CONTENDED_GAP`][] apart
mean that we were descheduled -- spinning then only takes CPU time from whoever waits for
it, perhaps the peer.  If that poll found nothing (or more than [`LATE_FINDS`][] of the
recent finds came after such a pause), the window is halved and, unless the poll found
something, ends; once that drops it below an eighth of the maximum it is 0 and may not
grow again for [`POLL_COOLDOWN`][] seconds, twice as long each further time (up to
[`MAX_POLL_COOLDOWN`][]) until polls find the CPUs free again (a one-off hiccup costs
half a window; a busy machine turns polling off).  Likewise when fewer than
[`MIN_WINDOW_SCORE`][] of the recent windows found anything at all (the peer answers
later than a window lasts).  After a cooldown, the next event within ``max`` of the
wait's start restores the full window, on probation (a score just above the threshold).
So an idle or slow peer, or a busy machine, costs at most a few short windows, and a
chatty peer with CPUs to spare is polled.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_BUSY_POLL = 100e-6
"""Default maximum busy-poll window in seconds; 0 where the peer cannot run concurrently
([`peer_runs_concurrently`][aioxen.platforms.base.Platform.peer_runs_concurrently])."""
MAX_BUSY_POLL = 1e-3
"""Largest accepted ``busy_poll`` (seconds)."""
SHRINK_GAP = 4
"""The window halves only when the peer answered more than this many maximum windows
after the wait began."""
YIELD_AFTER = 20e-6
"""Seconds of fruitless polling after which a poll yields the CPU (once per wait)."""
CONTENDED_GAP = 50e-6
"""Two polls this far apart (we were off the CPU): halve the window (and end it, unless
the poll found something)."""
LATE_FINDS = 0.25
"""A find after a pause off the CPU counts as contention once more than this share of
recent finds did (a fruitless poll after such a pause always does)."""
MIN_WINDOW_SCORE = 0.25
"""Polling stops for a while when fewer than this share of recent windows found
anything."""
POLL_COOLDOWN = 10e-3
"""Seconds, after contention brought the window to 0, before it may grow again; doubled
each time contention brings it to 0 again (up to [`MAX_POLL_COOLDOWN`][]), until
polling finds the CPUs free again."""
MAX_POLL_COOLDOWN = 1.0
POLL_MAX_MESSAGE = 16 * 1024
"""Polling is for messages: a write or a delivery of more bytes than this opens no poll
window (and a delivery that big closes one).  Bulk transfers run on notifications, which
let each side move big batches while the other sleeps."""

SPIN_ROUNDS = 64
"""Bulk spin-waits ([`SpinPolicy`][]) one transport call may make: a writer's flush, or a
reader's delivery pass, before it falls back to notifications."""
SPIN_PASS_MAX = 1e-3
"""Seconds one such call may spend spinning in all (bounds how long one callback holds
the event loop, whatever ``busy_poll``)."""
SPIN_BATCH_MAX = 4 << 20
"""A reader's delivery pass spins only until it has delivered this many bytes; then it
lets the event loop run and continues in its next iteration."""
MIN_SPIN_SCORE = 0.5
"""Bulk spinning stops for a while when fewer than this share of recent spins saw the
peer move in time."""

# What :meth:`PollPolicy.polled` tells the transport to do.
POLL_AGAIN = 0
"""Nothing found, the window is open: schedule the next poll."""
POLL_YIELD = 1
"""Nothing found for a while: yield the CPU once (``sched_yield``), then poll again."""
POLL_FOUND = 2
"""The poll found something: service the rings (armed unless [`PollPolicy.polling`][]);
if the window is still open, schedule the next poll."""
POLL_ENDED = 3
"""The window ended: arm notifications, re-check, sleep until the event."""

_EWMA = 8  # moving averages weigh the newest sample 1/8


class PollPolicy:
    """The busy-poll governor of one transport: all state, no I/O (see the module
    docstring).  ``busy_poll`` is the maximum window in seconds (0: never poll); ``now``
    is the time of creation on the caller's clock."""

    # Plain attributes (no properties): the transport reads ``polling`` on its hot path.
    __slots__ = (
        "cooldown_len",
        "cooldown_until",
        "deadline",
        "found_in_window",
        "idle_since",
        "last_poll",
        "late_finds",
        "max",
        "polling",
        "window",
        "window_score",
        "yielded",
    )

    def __init__(self, busy_poll: float, now: float) -> None:
        self.max = busy_poll
        self.window = busy_poll  # current window, adapted in 0..max
        self.polling = False  # a window is open (the transport has a poll scheduled)
        self.deadline = 0.0  # the open window ends at this time unless extended
        self.idle_since = now  # when we last started waiting for the peer
        self.last_poll = 0.0  # when the previous poll of this window ran (0: none yet)
        self.yielded = False  # this wait already gave the CPU away once
        self.late_finds = 0.0  # moving share of finds that followed a pause off the CPU
        self.cooldown_len = 0.0  # the last cooldown (doubles while contention persists)
        self.cooldown_until = 0.0  # no growing the window before this time (0: none)
        self.found_in_window = False  # the open window found something
        self.window_score = 1.0  # moving share of recent windows that found something

    def __repr__(self) -> str:
        state = "polling" if self.polling else "idle"
        return f"<PollPolicy {state} window={self.window:g}/{self.max:g}s>"

    def woken(self, now: float) -> None:
        """The peer woke us by event while no window was open: size the next window by
        how long after the last wait began it came."""
        gap = now - self.idle_since
        cap = self.max
        window = self.window
        if gap <= cap:
            if self.cooldown_until:
                if now < self.cooldown_until:
                    return
                # A pause is over: one more try with full windows, on probation.
                self.cooldown_until = 0.0
                self.window = cap
                self.window_score = 2 * MIN_WINDOW_SCORE
            else:
                self.window = min(cap, max(2 * window, cap / 8))
        elif gap > SHRINK_GAP * cap and window:
            window /= 2
            self.window = window if window >= cap / 8 else 0.0

    def activity(self, now: float, may_open: bool = True) -> bool:
        """A message was written or delivered: the wait for the peer starts again.
        Extend the open window, or open one if the window is not 0 and ``may_open``.
        True means a window was opened: the caller schedules its first poll."""
        self.idle_since = now
        if self.polling:
            self.deadline = now + self.window
            return False
        if not self.window or not may_open:
            return False
        self.polling = True
        self.deadline = now + self.window
        self.last_poll = 0.0  # the first poll of a window is never "late"
        self.yielded = False
        return True

    def polled(self, now: float, found: bool, waiting: bool) -> int:
        """One poll of the open window looked at the rings at ``now``.  ``found``: there
        was something to do; ``waiting``: we still wait for something (we are reading,
        or have bytes queued for the write ring).  Returns [`POLL_AGAIN`][],
        [`POLL_YIELD`][], [`POLL_FOUND`][] or [`POLL_ENDED`][]."""
        late = self.last_poll != 0.0 and now - self.last_poll > CONTENDED_GAP
        self.last_poll = now
        if found:
            # How often finds come right after a pause off the CPU: now and then is a
            # hiccup, mostly means the CPUs are contended (the peer's answer, too,
            # waited for a CPU).
            self.late_finds += ((1.0 if late else 0.0) - self.late_finds) / _EWMA
            late = late and self.late_finds > LATE_FINDS
        if late:
            # We were off the CPU between two polls: the CPUs are contended, and spinning
            # only takes time from whoever (perhaps the peer) waits for one.  Halve the
            # window; if that leaves too little, sleep on notifications for a while.
            # (Polling pays only while both ends have a CPU to themselves.)
            window = self.window / 2
            if window < self.max / 8:
                self._off(now)  # off for a while, longer if contention persists
            else:
                self.window = window
        if found:
            self.found_in_window = True
            self.yielded = False
            self.idle_since = now
            self.deadline = now + self.window
            if not self.window:
                self.end_window(now)
            return POLL_FOUND
        if not late and waiting and now < self.deadline:
            if not self.yielded and now - self.idle_since > YIELD_AFTER:
                # Nothing for a while: perhaps the peer waits for our CPU.  Let it run,
                # once per wait (the next poll, if late and fruitless, ends the window).
                self.yielded = True
                return POLL_YIELD
            return POLL_AGAIN
        self.end_window(now)  # ran out, or we were off the CPU: back to notifications
        return POLL_ENDED

    def end_window(self, now: float) -> None:
        """Close the open window and score it: did it find anything?  When most recent
        windows found nothing, polling costs more than it saves (the peer answers later
        than a window lasts, or the CPUs are busy): turn it off for a while, twice as
        long each further time."""
        self.polling = False
        found = self.found_in_window
        self.found_in_window = False
        self.window_score += ((1.0 if found else 0.0) - self.window_score) / _EWMA
        if found:
            if self.window_score > 0.5:
                self.cooldown_len = 0.0  # polling works: forget past failures
        elif self.window_score < MIN_WINDOW_SCORE and self.window:
            self._off(now)

    def cancel(self) -> None:
        """The connection is gone (or broken): drop the open window without scoring it."""
        self.polling = False

    def _off(self, now: float) -> None:
        """Stop polling for a while -- twice as long as last time (up to the maximum)."""
        pause = min(MAX_POLL_COOLDOWN, 2 * self.cooldown_len or POLL_COOLDOWN)
        self.cooldown_len = pause
        self.cooldown_until = now + pause
        self.window = 0.0


class SpinPolicy:
    """The bulk spin governor of one transport: all state, no I/O.

    Bulk data through a ring smaller than the transfer makes one side wait, every ring's
    worth, for the other to copy: a few microseconds, while sleeping until an event costs
    a system call on each side and a wake-up (tens of microseconds).  So a writer that
    finds the ring full with bytes still queued, or a reader that emptied the ring in the
    middle of a bulk delivery (more than [`POLL_MAX_MESSAGE`][] bytes) into a buffered
    protocol (the vchan transport says why not a ``data_received`` one), first spins on
    the ring's indices for up to ``max_ns`` nanoseconds (``aioxen._native``'s
    ``ax_vchan_spin``) before asking the peer for a notification -- which, while both ends
    spin, suppresses the notifications (and their system calls) altogether.  At most
    [`SPIN_ROUNDS`][] spins and [`SPIN_PASS_MAX`][] seconds of spinning per call, and a
    reader's pass stops spinning after [`SPIN_BATCH_MAX`][] bytes.

    Spinning pays only while the peer runs on another CPU.  ``calm`` (if given) is asked
    before spinning starts and whenever a pause ends, and answers whether there is a CPU
    to spare (the transport compares the load average with the CPU count); no, and the
    pause goes on.  Each spin reports whether the peer moved in time, and whether we kept
    our CPU for at least three quarters of it ([`spun`][]); when fewer
    than [`MIN_SPIN_SCORE`][] of recent spins did both, spinning stops for
    [`POLL_COOLDOWN`][] seconds, twice as long each further time (up to
    [`MAX_POLL_COOLDOWN`][]), then resumes on probation.  ``busy_poll = 0``
    (e.g. a single-process platform) never spins."""

    __slots__ = ("budget_ns", "calm", "cooldown_len", "max_ns", "off_until", "score")

    def __init__(self, busy_poll: float, calm: Callable[[], bool] | None = None) -> None:
        self.max_ns = int(busy_poll * 1e9)  # the longest spin (0: never spin)
        self.calm = calm  # asked before spinning starts or resumes: a CPU to spare?
        self.score = 1.0  # moving share of recent spins that saw the peer move in time
        self.off_until = -1.0  # no spinning before this time (0: not paused; -1: ask calm)
        self.cooldown_len = 0.0  # the last pause (doubles while spins keep failing)
        self.budget_ns = 0  # spinning left to the current call (see start)

    def __repr__(self) -> str:
        return f"<SpinPolicy max={self.max_ns}ns score={self.score:.2f}>"

    def allowed(self, now: float) -> bool:
        """May the transport spin at ``now``?"""
        if not self.max_ns:
            return False
        if self.off_until:
            if now < self.off_until:
                return False
            if self.calm is not None and not self.calm():
                # no CPU to spare (say, the load average exceeds the CPUs): ask again later
                self.off_until = now + (self.cooldown_len or POLL_COOLDOWN)
                return False
            self.off_until = 0.0
        return True

    def start(self) -> None:
        """A transport call that may spin begins (not a nested one): its spinning budget
        is [`SPIN_PASS_MAX`][]."""
        self.budget_ns = int(SPIN_PASS_MAX * 1e9)

    def spin_ns(self) -> int:
        """How long the next spin of this call may last (0: the call's budget is spent)."""
        return min(self.max_ns, max(self.budget_ns, 0))

    def spun(self, now: float, result: int) -> bool:
        """A spin ended with ``result`` (``ax_vchan_spin``'s: -1 if it timed out, else the
        nanoseconds it took in bits 0..23 and those of them spent off the CPU in bits
        24..47).  Returns whether the peer moved.  A spin counts as a success only if the
        peer moved and we kept the CPU for most of it (otherwise the CPUs are contended)."""
        moved = result >= 0
        took = result & 0xFFFFFF if moved else self.max_ns
        self.budget_ns -= max(took, 1000)  # each spin costs at least a microsecond
        good = moved and 4 * (result >> 24) <= took  # at most a quarter off the CPU
        self.score += ((1.0 if good else 0.0) - self.score) / _EWMA
        if good:
            if self.score > 0.75:
                self.cooldown_len = 0.0  # spinning works: forget past failures
        elif self.score < MIN_SPIN_SCORE:
            pause = min(MAX_POLL_COOLDOWN, 2 * self.cooldown_len or POLL_COOLDOWN)
            self.cooldown_len = pause
            self.off_until = now + pause
            self.score = MIN_SPIN_SCORE + 1 / _EWMA  # probation after the pause
        return moved


__all__ = [
    "CONTENDED_GAP",
    "DEFAULT_BUSY_POLL",
    "LATE_FINDS",
    "MAX_BUSY_POLL",
    "MAX_POLL_COOLDOWN",
    "MIN_SPIN_SCORE",
    "MIN_WINDOW_SCORE",
    "POLL_AGAIN",
    "POLL_COOLDOWN",
    "POLL_ENDED",
    "POLL_FOUND",
    "POLL_MAX_MESSAGE",
    "POLL_YIELD",
    "SHRINK_GAP",
    "SPIN_BATCH_MAX",
    "SPIN_PASS_MAX",
    "SPIN_ROUNDS",
    "YIELD_AFTER",
    "PollPolicy",
    "SpinPolicy",
]
