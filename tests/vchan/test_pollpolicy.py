"""PollPolicy on its own: every decision of the busy-poll governor, with a fake clock.

The policy is pure (no asyncio, no rings, no clock of its own), so each test hands it
exact times and checks the answer and the state it leaves -- no timing sensitivity.
"""

from __future__ import annotations

import itertools

import pytest

from aioxen.pollpolicy import (
    CONTENDED_GAP,
    LATE_FINDS,
    MAX_BUSY_POLL,
    MAX_POLL_COOLDOWN,
    MIN_WINDOW_SCORE,
    POLL_AGAIN,
    POLL_COOLDOWN,
    POLL_ENDED,
    POLL_FOUND,
    POLL_YIELD,
    SHRINK_GAP,
    SPIN_PASS_MAX,
    YIELD_AFTER,
    PollPolicy,
    SpinPolicy,
)

CAP = 100e-6
T0 = 1000.0  # any clock origin: the policy only subtracts
TICK = 1e-6  # polls closer together than CONTENDED_GAP: never "late"


def opened(window: float = CAP) -> PollPolicy:
    """A policy with a window of ``window`` just opened at T0."""
    p = PollPolicy(CAP, T0 - 1.0)
    p.window = window
    assert p.activity(T0)
    return p


# -- activity -----------------------------------------------------------------------------
def test_activity_opens_a_window_once_and_then_extends_it() -> None:
    p = PollPolicy(CAP, T0)
    assert p.activity(T0 + 1) is True  # opened: the caller schedules the first poll
    assert p.polling and p.deadline == T0 + 1 + CAP and p.idle_since == T0 + 1
    assert p.last_poll == 0.0 and not p.yielded
    assert p.activity(T0 + 1 + 50e-6) is False  # already open: extended, nothing to schedule
    assert p.polling and p.deadline == pytest.approx(T0 + 1 + 50e-6 + CAP)


def test_activity_opens_nothing_at_window_zero_or_when_told_not_to() -> None:
    p = PollPolicy(0.0, T0)  # busy_poll=0: never polls
    assert p.activity(T0 + 1) is False and not p.polling
    assert p.idle_since == T0 + 1  # the wait still starts now (woken() measures from it)
    p = PollPolicy(CAP, T0)
    assert p.activity(T0 + 1, may_open=False) is False and not p.polling
    assert p.idle_since == T0 + 1


# -- woken: sizing the next window by the event's gap ---------------------------------------
def test_woken_within_the_maximum_grows_the_window() -> None:
    p = PollPolicy(CAP, T0)
    p.window = CAP / 4
    p.woken(T0 + CAP / 2)  # a longer window would have caught it: double
    assert p.window == CAP / 2
    p.woken(T0 + CAP)
    assert p.window == CAP
    p.woken(T0 + CAP)
    assert p.window == CAP  # never beyond the maximum
    p.window = 0.0
    p.woken(T0)  # from 0 it restarts at an eighth
    assert p.window == CAP / 8


def test_woken_long_after_shrinks_then_stops_polling() -> None:
    p = PollPolicy(CAP, T0)
    late = T0 + SHRINK_GAP * CAP * 1.01
    p.woken(late)
    assert p.window == CAP / 2
    p.woken(late)
    p.woken(late)
    assert p.window == CAP / 8  # still at least an eighth
    p.woken(late)
    assert p.window == 0.0  # below an eighth: off
    p.woken(late)
    assert p.window == 0.0


def test_woken_in_between_leaves_the_window() -> None:
    p = PollPolicy(CAP, T0)
    p.window = CAP / 2
    p.woken(T0 + 2 * CAP)  # later than the maximum, not SHRINK_GAP times later
    assert p.window == CAP / 2


def test_woken_respects_a_cooldown_then_restores_full_windows_on_probation() -> None:
    p = PollPolicy(CAP, T0)
    p._off(T0)
    assert p.window == 0.0 and p.cooldown_until == T0 + POLL_COOLDOWN
    p.idle_since = T0 + 1e-3
    p.woken(T0 + 1e-3 + CAP / 2)  # quick, but still cooling down: nothing changes
    assert p.window == 0.0 and p.cooldown_until == T0 + POLL_COOLDOWN
    t = T0 + POLL_COOLDOWN + 1e-3
    p.idle_since = t
    p.woken(t + CAP / 2)
    assert p.window == CAP and p.cooldown_until == 0.0
    assert p.window_score == 2 * MIN_WINDOW_SCORE


# -- polled: one look at the rings ---------------------------------------------------------
def test_fruitless_polls_go_on_until_the_deadline_then_end_the_window() -> None:
    p = opened()
    assert p.polled(T0 + TICK, False, True) == POLL_AGAIN
    assert p.polling
    t = T0 + TICK
    while t + TICK < T0 + YIELD_AFTER:
        t += TICK
        assert p.polled(t, False, True) == POLL_AGAIN
    t += 2 * TICK  # past YIELD_AFTER without a find: yield the CPU, once per wait
    assert p.polled(t, False, True) == POLL_YIELD and p.yielded
    t += TICK
    assert p.polled(t, False, True) == POLL_AGAIN
    while t + TICK < T0 + CAP:
        t += TICK
        assert p.polled(t, False, True) == POLL_AGAIN
    assert p.polled(T0 + CAP + TICK, False, True) == POLL_ENDED
    assert not p.polling


def test_nothing_to_wait_for_ends_the_window() -> None:
    p = opened()
    assert p.polled(T0 + TICK, False, False) == POLL_ENDED  # not reading, nothing queued
    assert not p.polling


def test_a_find_extends_the_window_and_resets_the_yield() -> None:
    p = opened()
    p.yielded = True
    assert p.polled(T0 + 5 * TICK, True, True) == POLL_FOUND
    assert p.polling and p.found_in_window and not p.yielded
    assert p.idle_since == T0 + 5 * TICK and p.deadline == T0 + 5 * TICK + CAP


def test_late_fruitless_poll_halves_and_ends_the_window() -> None:
    p = opened()
    assert p.polled(T0 + TICK, False, True) == POLL_AGAIN  # first poll: never late
    late = T0 + TICK + CONTENDED_GAP * 1.01  # we were off the CPU in between
    assert p.polled(late, False, True) == POLL_ENDED
    assert p.window == CAP / 2 and not p.polling


def test_the_first_poll_of_a_window_is_never_late() -> None:
    p = opened()
    # however long after the window opened it runs (last_poll is 0 at the start)
    # (past YIELD_AFTER, so it yields -- but it does not end or halve the window)
    assert p.polled(T0 + CONTENDED_GAP * 1.5, False, True) == POLL_YIELD
    assert p.window == CAP and p.polling


def test_contention_at_a_small_window_turns_polling_off_with_growing_cooldowns() -> None:
    p = opened(CAP / 8)
    p.polled(T0 + TICK, False, True)
    t = T0 + TICK + 2 * CONTENDED_GAP
    assert p.polled(t, False, True) == POLL_ENDED
    assert p.window == 0.0 and p.cooldown_until == t + POLL_COOLDOWN
    assert p.cooldown_len == POLL_COOLDOWN
    lens = []
    for _ in range(12):  # contention persists: each pause twice as long, up to the max
        p._off(t)
        lens.append(p.cooldown_len)
    assert lens[0] == 2 * POLL_COOLDOWN and lens[-1] == MAX_POLL_COOLDOWN
    assert all(b >= a for a, b in itertools.pairwise(lens))


def test_late_finds_count_only_when_most_finds_are_late() -> None:
    p = opened()
    p.polled(T0 + TICK, True, True)
    t = T0 + TICK + 2 * CONTENDED_GAP
    assert p.polled(t, True, True) == POLL_FOUND  # one late find: a hiccup
    assert p.window == CAP and p.polling
    assert 0 < p.late_finds <= LATE_FINDS
    halved = False
    for _ in range(8):  # late find after late find: the CPUs are contended
        t += 2 * CONTENDED_GAP
        assert p.polled(t, True, True) == POLL_FOUND
        halved = halved or p.window < CAP
    assert halved and p.late_finds > LATE_FINDS


def test_a_find_that_drops_the_window_to_zero_ends_it() -> None:
    p = opened(CAP / 8)
    p.late_finds = 1.0  # the recent finds all came after pauses
    p.polled(T0 + TICK, True, True)
    t = T0 + TICK + 2 * CONTENDED_GAP
    assert p.polled(t, True, True) == POLL_FOUND
    assert p.window == 0.0 and not p.polling  # serve it armed; no further poll
    assert p.cooldown_until == t + POLL_COOLDOWN


# -- end_window / cancel: scoring windows -----------------------------------------------------
def test_windows_that_find_nothing_turn_polling_off() -> None:
    p = PollPolicy(CAP, T0)
    t = T0
    ended = 0
    while p.window:
        assert p.activity(t)
        t += CAP + TICK
        assert p.polled(t, False, True) == POLL_ENDED
        ended += 1
        assert ended < 20
    assert p.window_score < MIN_WINDOW_SCORE and p.cooldown_until == t + POLL_COOLDOWN
    assert ended > 1  # not after one miss: it takes a run of fruitless windows


def test_windows_that_find_forget_past_cooldowns() -> None:
    p = PollPolicy(CAP, T0)
    p.cooldown_len = 4 * POLL_COOLDOWN
    p.window_score = 0.4
    t = T0
    for _ in range(4):
        assert p.activity(t)
        assert p.polled(t + TICK, True, True) == POLL_FOUND
        t += 1.0
        p.end_window(t)  # the transport ends a window itself (bulk data)
        assert not p.polling and not p.found_in_window
    assert p.window_score > 0.5 and p.cooldown_len == 0.0


def test_cancel_drops_the_window_without_scoring() -> None:
    p = opened()
    score = p.window_score
    p.cancel()
    assert not p.polling and p.window_score == score and "idle" in repr(p)


# -- SpinPolicy: the bulk spin governor --------------------------------------------------
def spin_result(took_ns: int, off_cpu_ns: int = 0) -> int:
    """An ``ax_vchan_spin`` result: the peer moved after ``took_ns``, ``off_cpu_ns`` of
    them spent off the CPU."""
    return took_ns | off_cpu_ns << 24


def test_spin_policy_never_spins_at_busy_poll_zero() -> None:
    assert not SpinPolicy(0.0).allowed(T0)
    p = SpinPolicy(CAP)
    assert p.max_ns == 100_000 and p.allowed(T0)


def test_spins_that_see_the_peer_move_keep_spinning() -> None:
    p = SpinPolicy(CAP)
    for i in range(100):
        assert p.spun(T0 + i * TICK, spin_result(3_000)) is True
        assert p.allowed(T0 + i * TICK)
    assert p.score == pytest.approx(1.0)


def test_failed_spins_pause_spinning_with_growing_cooldowns() -> None:
    p = SpinPolicy(CAP)
    now = T0
    for expected in (POLL_COOLDOWN, 2 * POLL_COOLDOWN, 4 * POLL_COOLDOWN):
        while p.allowed(now):
            assert p.spun(now, -1) is False  # timed out
            now += TICK
        assert p.cooldown_len == pytest.approx(expected)
        assert not p.allowed(now + expected / 2)  # paused
        now += expected + TICK
        assert p.allowed(now)  # then back, on probation: one more failure pauses again
        assert p.score < 0.75
    for _ in range(200):
        now += MAX_POLL_COOLDOWN
        while p.allowed(now):
            p.spun(now, -1)
    assert p.cooldown_len == MAX_POLL_COOLDOWN  # capped


def test_a_spin_mostly_off_the_cpu_counts_as_contention() -> None:
    """The peer moved, but we were descheduled for most of the spin: the CPUs are busy, so
    that spin fails the score (it still reports that the peer moved)."""
    p = SpinPolicy(CAP)
    now = T0
    spins = 0
    while p.allowed(now):
        assert p.spun(now, spin_result(40_000, 30_000)) is True
        spins += 1
        now += TICK
    assert 1 < spins < 20 and p.off_until > now
    q = SpinPolicy(CAP)
    for _ in range(100):  # a little time off the CPU is no contention
        q.spun(now, spin_result(40_000, 10_000))
    assert q.allowed(now) and q.score == pytest.approx(1.0)


def test_successful_spins_forget_past_cooldowns() -> None:
    p = SpinPolicy(CAP)
    now = T0
    while p.allowed(now):
        p.spun(now, -1)
    assert p.cooldown_len == POLL_COOLDOWN
    now += POLL_COOLDOWN + TICK
    for _ in range(50):
        assert p.allowed(now)
        p.spun(now, spin_result(1_000))
    assert p.cooldown_len == 0.0 and p.score > 0.75


def test_spinning_per_call_is_bounded_by_a_budget() -> None:
    """One transport call spins at most SPIN_PASS_MAX in all, whatever busy_poll."""
    p = SpinPolicy(MAX_BUSY_POLL)
    p.start()
    total = 0
    while ns := p.spin_ns():
        assert ns <= p.max_ns
        p.spun(T0, spin_result(ns // 3))  # the peer moved after a third of the spin
        total += ns // 3
    assert total <= SPIN_PASS_MAX * 1e9
    p.start()  # the next call
    assert p.spin_ns() == p.max_ns
    p.spun(T0, -1)  # a timeout spends a whole spin
    assert p.spin_ns() == SPIN_PASS_MAX * 1e9 - p.max_ns


def test_spinning_starts_and_resumes_only_when_calm_says_so() -> None:
    busy = [True]
    p = SpinPolicy(CAP, lambda: not busy[0])
    assert not p.allowed(T0)  # a busy machine: no spinning to begin with
    assert not p.allowed(T0 + POLL_COOLDOWN / 2)  # and not asked again at once
    busy[0] = False
    assert p.allowed(T0 + 2 * POLL_COOLDOWN)
    while p.allowed(T0 + 3 * POLL_COOLDOWN):
        p.spun(T0 + 3 * POLL_COOLDOWN, -1)  # spins fail: a pause
    busy[0] = True
    later = p.off_until + TICK
    assert not p.allowed(later)  # the pause ended, but the machine is busy: it goes on
    busy[0] = False
    assert p.allowed(later + MAX_POLL_COOLDOWN)
