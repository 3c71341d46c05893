"""The xenbus device state machine (``io/xenbus.h``), pure.

Theory of operation
-------------------
Each end of a split device publishes its [`XenbusState`][] as a decimal string in
``<its dir>/state`` and reacts to the other end's.  This module decides the reaction; it
knows nothing about XenStore, rings or asyncio.  A driver calls [`backend_step`][] or
[`frontend_step`][] with its own state and the peer's (``None`` when the peer's
directory or ``state`` key is missing) and gets a `Step`: an [`Action`][] for
the driver to perform, and the state to publish once it is done.  The rules follow
Linux's xenbus drivers (``netback``/``blkback`` ``frontend_changed``, ``netfront``/
``blkfront`` ``backend_changed``) and the handshake in ``blkif.h``:

Back end (starts by advertising its features and entering ``InitWait``):

* front ``Initialised`` or ``Connected`` while we are not connected: ``CONNECT`` (map the
  rings the front advertised), then ``Connected``;
* front ``Closing``: ``DISCONNECT``, then ``Closing``, and ``Closed`` once the front is;
  front ``Closed``/gone: ``DISCONNECT``, then ``Closed``;
* front back at ``Initialising`` while we are connected or closed (the front restarted):
  ``DISCONNECT`` if connected, then ``RESET``: advertise again and enter ``InitWait``;
* front ``Reconfiguring`` while connected: ``RECONFIGURE``, then ``Reconfigured``;
  front ``Connected`` again: back to ``Connected``.

Front end (starts in ``Initialising``):

* back ``InitWait`` (or later: some back ends skip it) while we are ``Initialising``:
  ``CONNECT`` (create and advertise rings), then ``Initialised``;
* back ``Connected`` while we are ``Initialised``: ``CONNECTED``, then ``Connected``;
* back ``Closing`` or ``Closed``/gone while we are up: ``DISCONNECT``, then ``Closed``;
* back ``InitWait``/``Initialising`` while we are ``Connected`` or ``Closed`` (the back
  end restarted): ``DISCONNECT`` if connected, then ``RESET`` to ``Initialising`` — the
  next step connects again;
* back ``Reconfigured`` while we are ``Reconfiguring``: ``Connected``.

A front end built like Linux netfront (``needs_init_wait``) connects only to a back end
in ``InitWait``: while ``Initialising`` it waits for it whatever else the back end shows
(``Connected``, ``Closing`` or ``Closed`` left from an earlier front end), since its own
``Initialising`` is what makes such a back end reset.  It also publishes its keys with
``Connected`` rather than ``Initialised`` (Linux netback connects only then); until the
back end is ``Connected`` too, the driver passes ``INITIALISED`` as its own state.

A local close goes ``Closing`` → wait for the peer to be ``Closing``/``Closed`` (or gone)
→ ``Closed``; [`close_done`][] says when the wait is over.  [`parse_state`][] turns
a XenStore value into a state, and raises [`ProtocolError`][aioxen.errors.ProtocolError] naming
the path for garbage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from aioxen.errors import ProtocolError


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    def __str__(self) -> str:
        return _NAMES[self]

    @property
    def wire(self) -> str:
        """The XenStore value (decimal)."""
        return str(int(self))


_NAMES = {
    XenbusState.UNKNOWN: "Unknown",
    XenbusState.INITIALISING: "Initialising",
    XenbusState.INIT_WAIT: "InitWait",
    XenbusState.INITIALISED: "Initialised",
    XenbusState.CONNECTED: "Connected",
    XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed",
    XenbusState.RECONFIGURING: "Reconfiguring",
    XenbusState.RECONFIGURED: "Reconfigured",
}

S = XenbusState


def parse_state(raw: bytes | None, path: str = "state") -> XenbusState | None:
    """The state stored at ``path`` (``None`` if the key is missing).

    Accepts optional surrounding whitespace and a trailing NUL (some writers add one);
    anything else is a [`ProtocolError`][] naming ``path``."""
    if raw is None:
        return None
    text = raw.strip().rstrip(b"\0").strip()
    if not text.isdigit() or len(text) > 3:
        raise ProtocolError(f"{path}: {raw[:32]!r} is not a xenbus state", field=path)
    try:
        return XenbusState(int(text))
    except ValueError:
        raise ProtocolError(f"{path}: {int(text)} is not a xenbus state", field=path) from None


class Action(enum.Enum):
    """What the driver must do before publishing `Step.state`."""

    NONE = "none"
    CONNECT = "connect"  # back: map the front's rings; front: create and advertise rings
    CONNECTED = "connected"  # front: the back end is ready; start the data path
    DISCONNECT = "disconnect"  # tear the data path down (rings, channels, mappings)
    RESET = "reset"  # back: advertise features again; front: clear ring keys
    RECONFIGURE = "reconfigure"  # back: apply the front's new configuration


@dataclass(frozen=True)
class Step:
    action: Action
    state: XenbusState | None  # publish this afterwards (None: leave the state alone)
    also: Action | None = None  # a second action to run after the first (DISCONNECT+RESET)


NOTHING = Step(Action.NONE, None)

_UP = (S.CONNECTED, S.RECONFIGURING, S.RECONFIGURED)


def backend_step(own: XenbusState, peer: XenbusState | None) -> Step:
    """The back end's reaction to the front being in ``peer`` while we are in ``own``."""
    if peer is None or peer in (S.UNKNOWN, S.CLOSED):
        if own in _UP:
            return Step(Action.DISCONNECT, S.CLOSED)
        if own == S.CLOSING:
            return Step(Action.NONE, S.CLOSED)
        return NOTHING  # waiting (InitWait) for a front end to (re)appear
    if peer == S.CLOSING:
        if own in _UP:
            return Step(Action.DISCONNECT, S.CLOSING)
        return NOTHING
    if peer == S.INITIALISING:
        if own in _UP:
            return Step(Action.DISCONNECT, S.INIT_WAIT, also=Action.RESET)
        if own in (S.CLOSED, S.CLOSING, S.UNKNOWN, S.INITIALISING, S.INITIALISED):
            return Step(Action.RESET, S.INIT_WAIT)
        return NOTHING
    if peer in (S.INITIALISED, S.CONNECTED):
        if own in (S.INIT_WAIT, S.INITIALISING, S.INITIALISED):
            return Step(Action.CONNECT, S.CONNECTED)
        if own == S.RECONFIGURED and peer == S.CONNECTED:
            return Step(Action.NONE, S.CONNECTED)
        return NOTHING
    if peer == S.RECONFIGURING:
        if own == S.CONNECTED:
            return Step(Action.RECONFIGURE, S.RECONFIGURED)
        return NOTHING
    return NOTHING  # InitWait / Reconfigured are not front end states


def frontend_step(
    own: XenbusState,
    peer: XenbusState | None,
    *,
    reconnect: bool = True,
    needs_init_wait: bool = False,
) -> Step:
    """The front end's reaction to the back being in ``peer`` while we are in ``own``.

    With ``reconnect=False`` a front end whose back end went away stays ``Closed``; with
    ``needs_init_wait`` an ``Initialising`` front end waits for ``InitWait``."""
    if needs_init_wait and own == S.INITIALISING and peer != S.INIT_WAIT:
        return NOTHING
    if peer is None or peer in (S.UNKNOWN, S.CLOSED, S.CLOSING):
        if own in (*_UP, S.INITIALISED):
            return Step(Action.DISCONNECT, S.CLOSED)
        if own == S.CLOSING or (own == S.INITIALISING and peer == S.CLOSING):
            return Step(Action.NONE, S.CLOSED)
        return NOTHING  # waiting for a back end to (re)appear
    if peer in (S.INITIALISING, S.INIT_WAIT):
        if own in _UP:
            if not reconnect:
                return Step(Action.DISCONNECT, S.CLOSED)
            return Step(Action.DISCONNECT, S.INITIALISING, also=Action.RESET)
        if own == S.CLOSED and reconnect:
            return Step(Action.RESET, S.INITIALISING)
        if own == S.INITIALISING and peer == S.INIT_WAIT:
            return Step(Action.CONNECT, S.INITIALISED)
        return NOTHING
    if peer == S.CONNECTED:
        if own == S.INITIALISING:
            return Step(Action.CONNECT, S.INITIALISED)  # a back end that skipped InitWait
        if own == S.INITIALISED:
            return Step(Action.CONNECTED, S.CONNECTED)
        if own == S.RECONFIGURED:
            return Step(Action.NONE, S.CONNECTED)
        return NOTHING
    if peer == S.RECONFIGURED:
        if own == S.RECONFIGURING:
            return Step(Action.NONE, S.CONNECTED)
        return NOTHING
    return NOTHING  # Initialised / Reconfiguring are not back end states


def close_done(own: XenbusState, peer: XenbusState | None) -> XenbusState | None:
    """During a local close (we published ``Closing``): the next state to publish, or
    ``None`` to keep waiting.  The peer acknowledging (``Closing``, ``Closed`` or gone)
    lets us go ``Closed``."""
    if own == S.CLOSING and (peer is None or peer in (S.CLOSING, S.CLOSED, S.UNKNOWN)):
        return S.CLOSED
    return None


def legal_transition(old: XenbusState, new: XenbusState) -> bool:
    """Whether an end may move from ``old`` to ``new`` (used to sanity-check drivers)."""
    if old == new:
        return True
    if new in (S.CLOSING, S.CLOSED):
        return True
    if new in (S.INITIALISING, S.INIT_WAIT):
        return old in (S.UNKNOWN, S.INITIALISING, S.CLOSED, S.CLOSING, *_UP, S.INITIALISED)
    if new == S.INITIALISED:
        return old in (S.INITIALISING, S.INIT_WAIT)
    if new == S.CONNECTED:
        return old in (S.INITIALISING, S.INIT_WAIT, S.INITIALISED, S.RECONFIGURING, S.RECONFIGURED)
    if new == S.RECONFIGURING:
        return old == S.CONNECTED
    if new == S.RECONFIGURED:
        return old in (S.CONNECTED, S.RECONFIGURING)
    return False


__all__ = [
    "Action",
    "Step",
    "XenbusState",
    "backend_step",
    "close_done",
    "frontend_step",
    "legal_transition",
    "parse_state",
]
