"""Byte rings: the console (``io/console.h``) and XenStore (``io/xs_wire.h``) pages (pure).

Theory of operation
-------------------
Both pages hold two one-directional byte rings with free-running u32 ``cons``/``prod``
indices; byte ``i`` of a ring lives at ``data[i & (size - 1)]``.  A writer copies into the
free part (``size - (prod - cons)`` bytes) and then publishes ``prod`` with a release
store; a reader copies out ``prod - cons`` bytes and then releases the space by storing
``cons``.  The copies (including the split at the end of the buffer) are done by the
native helper (``ax_bring_write``/``ax_bring_read``), which loads each shared index once
and reports a ring whose indices claim more than ``size`` bytes in flight; we turn that
into [`ProtocolError`][aioxen.errors.ProtocolError] naming the peer-written field.

Names follow the *front end* (guest) view, as in the C headers:

=========== ================================ ==================================
page        front writes (back reads)        front reads (back writes)
=========== ================================ ==================================
console     ``out[2048]`` ``out_cons/prod``  ``in[1024]`` ``in_cons/prod``
xenstore    ``req[1024]`` ``req_cons/prod``  ``rsp[1024]`` ``rsp_cons/prod``
=========== ================================ ==================================

A [`ByteRing`][] is one endpoint (``side="front"`` or ``"back"``); the back end simply
uses the two rings the other way round.  Nothing here waits or notifies: callers pair the
ring with an event channel and notify after a read or write that changed an index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aioxen.errors import ProtocolError
from aioxen.native import Buffer, SharedBuffer, ffi, lib


@dataclass(frozen=True)
class Direction:
    """One byte ring inside a page."""

    data: int
    size: int
    cons: int
    prod: int
    cons_name: str
    prod_name: str


@dataclass(frozen=True)
class ByteRingLayout:
    """A page with two byte rings; ``out`` is written by the front end, ``in_`` by the back."""

    name: str
    out: Direction
    in_: Direction
    min_size: int


CONSOLE = ByteRingLayout(
    "console",
    out=Direction(1024, 2048, 3080, 3084, "out_cons", "out_prod"),
    in_=Direction(0, 1024, 3072, 3076, "in_cons", "in_prod"),
    min_size=3088,
)
"""``struct xencons_interface``."""

CONSOLE_CONNECTION = 3088
"""``connection`` (u8) of newer ``console.h`` versions: 0 connected, 1 disconnected."""

XENSTORE = ByteRingLayout(
    "xenstore",
    out=Direction(0, 1024, 2048, 2052, "req_cons", "req_prod"),
    in_=Direction(1024, 1024, 2056, 2060, "rsp_cons", "rsp_prod"),
    min_size=2080,
)
"""``struct xenstore_domain_interface``."""

XENSTORE_SERVER_FEATURES = 2064
XENSTORE_CONNECTION = 2068
XENSTORE_ERROR = 2072
XENSTORE_EVTCHN_PORT = 2076
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3


class ByteRing:
    """One endpoint of a two-way byte-ring page."""

    __slots__ = ("_error", "_layout", "_ptr", "_rx", "_sb", "_tx", "_view", "side")

    def __init__(
        self,
        buf: Buffer,
        layout: ByteRingLayout,
        *,
        side: Literal["front", "back"],
        init: bool = False,
        start: int = 0,
    ) -> None:
        """``init=True`` zeroes the indices (to ``start``, for wrap-around tests); only the
        side that creates the page should do so."""
        if side not in ("front", "back"):
            raise ValueError(f"side must be 'front' or 'back', not {side!r}")
        view = memoryview(buf).cast("B")
        if len(view) < layout.min_size:
            view.release()
            raise ValueError(f"{layout.name} page needs {layout.min_size} bytes, got {len(buf)}")
        self._view = view
        self._layout = layout
        self.side = side
        self._tx, self._rx = (
            (layout.out, layout.in_) if side == "front" else (layout.in_, layout.out)
        )
        self._sb = SharedBuffer(view)
        self._ptr = self._sb.pointer
        self._error: ProtocolError | None = None
        if init:
            for d in (layout.out, layout.in_):
                self._sb.store_u32(d.cons, start)
                self._sb.store_u32(d.prod, start)

    @property
    def layout(self) -> ByteRingLayout:
        return self._layout

    @property
    def shared(self) -> SharedBuffer:
        """Atomic access to the page (for the layout's extra fields)."""
        return self._sb

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    def _fail(self, d: Direction, peer_field: str) -> ProtocolError:
        cons, prod = self._sb.load_u32(d.cons), self._sb.load_u32(d.prod)
        self._error = ProtocolError(
            f"{self._layout.name} ring ({self.side} end): {peer_field} is corrupt: "
            f"{d.prod_name}={prod} {d.cons_name}={cons} claim more than {d.size} bytes",
            field=peer_field,
        )
        return self._error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._view is None:
            raise ValueError(f"{self._layout.name} ring is closed")

    def readable(self) -> int:
        """Bytes waiting to be read."""
        self._check()
        d = self._rx
        n = int(lib.ax_bring_used(self._ptr, d.cons, d.prod, d.size))
        if n < 0:
            raise self._fail(d, d.prod_name)
        return n

    def writable(self) -> int:
        """Free space in the outgoing ring."""
        self._check()
        d = self._tx
        n = int(lib.ax_bring_used(self._ptr, d.cons, d.prod, d.size))
        if n < 0:
            raise self._fail(d, d.cons_name)
        return d.size - n

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of ``data`` as fits; return the number of bytes written."""
        self._check()
        if not data:
            return 0
        d = self._tx
        src = ffi.from_buffer(data)
        try:
            n = int(
                lib.ax_bring_write(
                    self._ptr, d.cons, d.prod, self._ptr + d.data, d.size, src, len(src)
                )
            )
        finally:
            ffi.release(src)
        if n < 0:
            raise self._fail(d, d.cons_name)
        return n

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Copy up to ``len(buf)`` waiting bytes into ``buf``; return how many."""
        self._check()
        if not len(buf):
            return 0
        d = self._rx
        dst = ffi.from_buffer(buf, require_writable=True)
        try:
            n = int(
                lib.ax_bring_read(
                    self._ptr, d.cons, d.prod, self._ptr + d.data, d.size, dst, len(dst)
                )
            )
        finally:
            ffi.release(dst)
        if n < 0:
            raise self._fail(d, d.prod_name)
        return n

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all waiting bytes if ``n < 0``)."""
        limit = self._rx.size if n < 0 else min(n, self._rx.size)
        buf = bytearray(limit)
        got = self.readinto(buf)
        del buf[got:]
        return bytes(buf)

    def close(self) -> None:
        """Drop the pin on the page (idempotent)."""
        if self._view is not None:
            self._sb.release()
            self._view.release()
            self._view = None  # type: ignore[assignment]


__all__ = [
    "CONSOLE",
    "CONSOLE_CONNECTION",
    "XENSTORE",
    "XENSTORE_CONNECTION",
    "XENSTORE_ERROR",
    "XENSTORE_EVTCHN_PORT",
    "XENSTORE_SERVER_FEATURES",
    "ByteRing",
    "ByteRingLayout",
    "Direction",
]
