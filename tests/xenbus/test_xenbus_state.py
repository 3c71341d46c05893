"""The pure xenbus state machine: parsing, the documented handshakes, and a model check
that two ends always reconnect after restarts, lost peers and resets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen import ProtocolError
from aioxen.xenbus.state import (
    Action,
    XenbusState,
    backend_step,
    close_done,
    frontend_step,
    legal_transition,
    parse_state,
)

S = XenbusState


def test_values_and_names_match_xenbus_h() -> None:
    assert [int(s) for s in S] == list(range(9))
    assert str(S.INIT_WAIT) == "InitWait" and S.RECONFIGURED.wire == "8"


@pytest.mark.parametrize(
    ("raw", "state"),
    [(b"4", S.CONNECTED), (b" 6\n", S.CLOSED), (b"2\x00", S.INIT_WAIT), (None, None)],
)
def test_parse_state(raw: bytes | None, state: XenbusState | None) -> None:
    assert parse_state(raw, "x/state") == state


@pytest.mark.parametrize("raw", [b"", b"9", b"-1", b"4a", b"0x4", b"1000", b"\xff"])
def test_parse_state_rejects_garbage_naming_the_path(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_state(raw, "/local/domain/3/device/vif/0/state")
    assert e.value.field == "/local/domain/3/device/vif/0/state"


def test_netback_style_handshake() -> None:
    # back end: InitWait; front end sets up rings -> Initialised; back connects.
    assert frontend_step(S.INITIALISING, S.INIT_WAIT).action == Action.CONNECT
    assert frontend_step(S.INITIALISING, S.INIT_WAIT).state == S.INITIALISED
    step = backend_step(S.INIT_WAIT, S.INITIALISED)
    assert (step.action, step.state) == (Action.CONNECT, S.CONNECTED)
    step = frontend_step(S.INITIALISED, S.CONNECTED)
    assert (step.action, step.state) == (Action.CONNECTED, S.CONNECTED)
    assert frontend_step(S.CONNECTED, S.CONNECTED).state is None
    assert backend_step(S.CONNECTED, S.CONNECTED).state is None


def test_front_end_may_skip_initialised_and_back_end_may_skip_initwait() -> None:
    assert backend_step(S.INIT_WAIT, S.CONNECTED).action == Action.CONNECT
    assert frontend_step(S.INITIALISING, S.CONNECTED).action == Action.CONNECT


def test_orderly_close_from_either_end() -> None:
    # front closes: back disconnects and follows
    assert backend_step(S.CONNECTED, S.CLOSING).action == Action.DISCONNECT
    assert backend_step(S.CONNECTED, S.CLOSING).state == S.CLOSING
    assert close_done(S.CLOSING, S.CLOSING) == S.CLOSED
    assert backend_step(S.CLOSING, S.CLOSED).state == S.CLOSED
    # back closes (e.g. toolstack removal): front disconnects, goes Closed
    step = frontend_step(S.CONNECTED, S.CLOSING)
    assert (step.action, step.state) == (Action.DISCONNECT, S.CLOSED)
    assert close_done(S.CLOSING, S.CONNECTED) is None


def test_restarts_reset_the_other_end() -> None:
    step = backend_step(S.CONNECTED, S.INITIALISING)  # front restarted
    assert (step.action, step.also, step.state) == (Action.DISCONNECT, Action.RESET, S.INIT_WAIT)
    step = frontend_step(S.CONNECTED, S.INIT_WAIT)  # back restarted
    assert (step.action, step.also, step.state) == (
        Action.DISCONNECT, Action.RESET, S.INITIALISING,
    )  # fmt: skip
    assert frontend_step(S.CONNECTED, S.INIT_WAIT, reconnect=False).state == S.CLOSED
    assert frontend_step(S.CLOSED, S.INIT_WAIT).action == Action.RESET


def test_reconfiguration() -> None:
    assert backend_step(S.CONNECTED, S.RECONFIGURING).action == Action.RECONFIGURE
    assert frontend_step(S.RECONFIGURING, S.RECONFIGURED).state == S.CONNECTED
    assert backend_step(S.RECONFIGURED, S.CONNECTED).state == S.CONNECTED


def test_every_step_is_a_legal_transition() -> None:
    for own in S:
        for peer in [None, *S]:
            for step in (backend_step(own, peer), frontend_step(own, peer)):
                if step.state is not None:
                    assert legal_transition(own, step.state), (own, peer, step)


EVENTS = st.lists(
    st.sampled_from(["front", "back", "front", "back", "front-restart", "back-restart",
                     "front-lost", "back-lost"]),
    max_size=30,
)  # fmt: skip


def _settle(fs: XenbusState, bs: XenbusState, rounds: int = 12) -> tuple[XenbusState, XenbusState]:
    for _ in range(rounds):
        fs = frontend_step(fs, bs).state or fs
        bs = backend_step(bs, fs).state or bs
    return fs, bs


@settings(max_examples=400, deadline=None)
@given(events=EVENTS)
def test_two_ends_always_reconnect(events: list[str]) -> None:
    """Whatever happened (steps in any order, restarts, lost peers), once both ends keep
    stepping they end up Connected, and stay there."""
    fs, bs = S.INITIALISING, S.INIT_WAIT  # as the runners start
    for ev in events:
        if ev == "front":
            fs = frontend_step(fs, bs).state or fs
        elif ev == "back":
            bs = backend_step(bs, fs).state or bs
        elif ev == "front-restart":
            fs = S.INITIALISING
        elif ev == "back-restart":
            bs = S.INIT_WAIT
        elif ev == "front-lost" and fs in (S.INITIALISED, S.CONNECTED):
            fs = S.INITIALISING  # the runner resets after its data path lost the peer
        elif ev == "back-lost" and bs == S.CONNECTED:
            bs = S.INIT_WAIT
    fs, bs = _settle(fs, bs)
    assert (fs, bs) == (S.CONNECTED, S.CONNECTED)
    assert _settle(fs, bs) == (S.CONNECTED, S.CONNECTED)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS, closer=st.sampled_from(["front", "back"]))
def test_close_from_either_end_ends_closed(events: list[str], closer: str) -> None:
    fs, bs = _settle(S.INITIALISING, S.INIT_WAIT)
    assert (fs, bs) == (S.CONNECTED, S.CONNECTED)
    if closer == "front":
        fs = S.CLOSING
        for _ in range(6):
            bs = backend_step(bs, fs).state or bs
            fs = close_done(fs, bs) or fs
        assert (fs, bs) == (S.CLOSED, S.CLOSED)
    else:
        bs = S.CLOSING
        for _ in range(6):
            fs = frontend_step(fs, bs, reconnect=False).state or fs
            bs = close_done(bs, fs) or bs
        assert (fs, bs) == (S.CLOSED, S.CLOSED)


# ------------------------------------------------------------------ netfront-style front ends


def test_netfront_style_front_end_connects_only_to_init_wait() -> None:
    """``needs_init_wait``: whatever an earlier session left the back end in, an
    Initialising front end waits (its Initialising makes the back end reset)."""
    for peer in (None, *S):
        step = frontend_step(S.INITIALISING, peer, needs_init_wait=True)
        if peer == S.INIT_WAIT:
            assert (step.action, step.state) == (Action.CONNECT, S.INITIALISED)
        else:
            assert step.state is None and step.action == Action.NONE, peer
    # the back end's side of it: a left-over Connected/Closing/Closed resets to InitWait
    for left in (S.CONNECTED, S.CLOSING, S.CLOSED):
        assert backend_step(left, S.INITIALISING).state == S.INIT_WAIT
    # every other own state follows the usual rules
    for own in S:
        if own != S.INITIALISING:
            for peer in (None, *S):
                assert frontend_step(own, peer, needs_init_wait=True) == frontend_step(own, peer)
    # and publishing Connected straight from Initialising is a legal transition
    assert legal_transition(S.INITIALISING, S.CONNECTED)


def _published(fs: XenbusState) -> XenbusState:
    """What a netfront-style front end shows the back end: its keys go out with
    Connected, and the runner steps it as Initialised until the back end is Connected."""
    return S.CONNECTED if fs == S.INITIALISED else fs


def _settle_netfront(
    fs: XenbusState, bs: XenbusState, rounds: int = 12
) -> tuple[XenbusState, XenbusState]:
    for _ in range(rounds):
        fs = frontend_step(fs, bs, needs_init_wait=True).state or fs
        bs = backend_step(bs, _published(fs)).state or bs
    return fs, bs


@settings(max_examples=400, deadline=None)
@given(
    events=EVENTS,
    left=st.sampled_from([S.INIT_WAIT, S.CONNECTED, S.CLOSING, S.CLOSED, S.INITIALISING]),
)
def test_netfront_style_ends_always_reconnect(events: list[str], left: XenbusState) -> None:
    """As above for a front end that publishes Connected with its keys and waits for
    InitWait, starting against a back end left in any state by an earlier front end."""
    fs, bs = S.INITIALISING, left
    for ev in events:
        if ev == "front":
            fs = frontend_step(fs, bs, needs_init_wait=True).state or fs
        elif ev == "back":
            bs = backend_step(bs, _published(fs)).state or bs
        elif ev == "front-restart":
            fs = S.INITIALISING
        elif ev == "back-restart":
            bs = S.INIT_WAIT
        elif ev == "front-lost" and fs in (S.INITIALISED, S.CONNECTED):
            fs = S.INITIALISING
        elif ev == "back-lost" and bs == S.CONNECTED:
            bs = S.INIT_WAIT
    fs, bs = _settle_netfront(fs, bs)
    assert (fs, bs) == (S.CONNECTED, S.CONNECTED)
    assert _settle_netfront(fs, bs) == (S.CONNECTED, S.CONNECTED)
