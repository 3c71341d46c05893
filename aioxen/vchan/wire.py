"""The vchan wire format: control page, ring placement and the two byte rings.

Theory of operation
-------------------
A vchan (libxenvchan's format, ``xen/include/public/io/libxenvchan.h``) is one shared
*control page* plus two byte rings.  The page starts with a 24-byte header:

====== ==== ============== ======================================================
offset size field          meaning
====== ==== ============== ======================================================
0      4    ``left.cons``  LEFT ring (client -> server) consumer index
4      4    ``left.prod``  LEFT ring producer index
8      4    ``right.cons`` RIGHT ring (server -> client) consumer index
12     4    ``right.prod`` RIGHT ring producer index
16     2    ``left_order`` log2 of the LEFT ring size
18     2    ``right_order`` log2 of the RIGHT ring size
20     1    ``cli_live``   0 closed, 1 connected, 2 not yet connected
21     1    ``srv_live``   0 closed, 1 alive
22     1    ``cli_notify`` bits the *client* acts on (test-and-clear, then signal)
23     1    ``srv_notify`` bits the *server* acts on
24     4n   ``grants[]``   grant refs of out-of-page ring pages, LEFT first
====== ==== ============== ======================================================

A ring of order 10 lives in the control page at offset 1024, order 11 at offset 2048,
order 12..20 in ``2**(order-12)`` separately granted pages.  The *server* shares every
page and picks the orders ([`select_orders`][], exactly libxenvchan's rule); the
*client* maps them and validates what it finds ([`read_client_layout`][]).

Indices are free-running ``u32``; the byte offset is ``idx & (size - 1)``,
``used = prod - cons`` and ``space = size - used`` in u32 arithmetic.  A peer that makes
``used`` exceed ``size`` has corrupted the ring: [`ProtocolError`][aioxen.ProtocolError].

Notification (suppression) protocol.  Each side owns one notify byte.  To be woken, a side
atomically ORs ``NOTIFY_WRITE`` ("tell me when you write") or ``NOTIFY_READ`` ("tell me
when you consume") into the *peer's* byte, then re-checks the ring (the RMW is a full
fence, closing the race with the peer's update).  After producing or consuming, a side
atomically test-and-clears the matching bit in *its own* byte and signals the event
channel only if the bit was set.  [`VchanCore`][] never signals itself: it sets
[`VchanCore.notify_pending`][] and the caller sends one event.

End of stream.  The wire has no EOF.  aioxen adds one bit, [`NOTIFY_EOF`][] (0x80): the
writer ORs it into the *reader's* own notify byte after its final ``prod`` update and then
signals.  libxenvchan only ever ORs or clears bits 0x1/0x2 of these bytes (the client's one
plain store of ``srv_notify = WRITE`` happens at connect, before any data), so the bit
survives and a libxenvchan reader simply ignores it.  Our reader loads its notify byte
*before* ``prod``; when it saw the bit and the ring is empty, every byte the writer wrote
has been consumed.  A peer's live byte dropping to 0 is handled the same way: load live,
then drain up to the ``prod`` read afterwards.

Clean end or cut stream.  libxenvchan marks a close only by its live byte going to 0, which
is also what the unmap notification does when a process dies -- on the wire the two look the
same.  So that a reader can tell "the writer closed after all its data" from "the writer went
away with data unsent", an aioxen endpoint ORs [`NOTIFY_ENDS`][] (0x40) into the *peer's*
notify byte once it is connected, before it writes anything: "I end my stream with
[`NOTIFY_EOF`][]".  A reader whose own byte carries [`NOTIFY_ENDS`][] and whose peer is
gone without [`NOTIFY_EOF`][] has been cut off (the peer aborted, failed or died): that is
``ConnectionResetError``, never EOF.  Without [`NOTIFY_ENDS`][] (a libxenvchan peer) a
close stays an EOF, as libxenvchan's readers see it.  Like the EOF bit, it is set with an
atomic OR after the client's one plain store of ``srv_notify`` (at connect), and libxenvchan
only ever ORs or clears bits 0x1/0x2, so it survives and is ignored there.

Nothing here does I/O or touches asyncio: atomics and copies go through the native helper
([`aioxen.native`][]) on pinned ``memoryview``\\ s.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any, Final

from aioxen.errors import ProtocolError
from aioxen.native import Buffer, SharedBuffer, ffi, lib
from aioxen.platforms.base import PAGE_SIZE

# -- layout -------------------------------------------------------------------------------
LEFT_CONS: Final = 0
LEFT_PROD: Final = 4
RIGHT_CONS: Final = 8
RIGHT_PROD: Final = 12
LEFT_ORDER: Final = 16
RIGHT_ORDER: Final = 18
CLI_LIVE: Final = 20
SRV_LIVE: Final = 21
CLI_NOTIFY: Final = 22
SRV_NOTIFY: Final = 23
GRANTS: Final = 24
HEADER_SIZE: Final = 24

NOTIFY_WRITE: Final = 0x1
NOTIFY_READ: Final = 0x2
NOTIFY_EOF: Final = 0x80
"""aioxen's end-of-stream bit (see the module docstring); ignored by libxenvchan."""
NOTIFY_ENDS: Final = 0x40
"""aioxen's "I mark my clean end with [`NOTIFY_EOF`][]" bit, set by the peer in our
notify byte (see the module docstring); ignored by libxenvchan."""

LIVE_CLOSED: Final = 0
LIVE_CONNECTED: Final = 1
LIVE_WAITING: Final = 2
LIVE_CLAIMING: Final = 3
"""aioxen-only, transient: a client claimed the endpoint (atomic OR of 1 into ``cli_live``)
and is mapping the rings; it stores 1 next.  Never seen once connected."""

MIN_ORDER: Final = 10
MAX_ORDER: Final = 20
PAGE_SHIFT: Final = 12
MAX_RING_SIZE: Final = 1 << MAX_ORDER
SMALL_RING_SIZE: Final = 1024  # order 10, in the control page at offset 1024
LARGE_RING_SIZE: Final = 2048  # order 11, in the control page at offset 2048

_U32: Final = 0xFFFFFFFF

# The fields of a :meth:`VchanCore.step` result (``ax_vchan_step``, one int64).
STEP_USED: Final = 0x1FFFFF
"""Mask of the readable byte count (at most 1 MiB: 21 bits)."""
STEP_CONS_SHIFT: Final = 21
"""``(r >> STEP_CONS_SHIFT) & 0xFFFFFFFF`` is the read ring's ``cons`` the step saw."""
STEP_EOF: Final = 1 << 53
"""The peer's [`NOTIFY_EOF`][] was set (loaded before the indices)."""
STEP_LIVE: Final = 1 << 54
"""The peer's live byte is 1 (validated 0 or 1)."""
STEP_NOTIFY: Final = 1 << 55
"""Publishing ``new_cons`` found the peer's READ request: signal it."""
# Negative step results: what was found corrupt (:meth:`VchanCore.step_error`).
STEP_ERR_READ: Final = -1
STEP_ERR_WRITE: Final = -2
STEP_ERR_LIVE: Final = -3


def _min_order(size: int) -> int:
    """libxenvchan's ``min_order``: the smallest order >= 12 whose ring holds ``size``."""
    order = PAGE_SHIFT
    while size > (1 << order):
        order += 1
    return order


def select_orders(left_min: int, right_min: int) -> tuple[int, int]:
    """The ring orders a libxenvchan server picks for minimum sizes ``left_min`` (client ->
    server, the server's *read* ring) and ``right_min`` (server -> client).

    Small rings go into the control page (order 10 at 1024, order 11 at 2048) when that
    saves pages, exactly as ``libxenvchan_server_init`` does.  ``ValueError`` for sizes
    above 1 MiB or below 0.
    """
    for name, value in (("left", left_min), ("right", right_min)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} ring size must be an int")
        if value < 0 or value > MAX_RING_SIZE:
            raise ValueError(f"{name} ring size {value} out of range 0..{MAX_RING_SIZE}")
    if left_min <= SMALL_RING_SIZE and right_min <= LARGE_RING_SIZE:
        return 10, 11
    if left_min <= LARGE_RING_SIZE and right_min <= SMALL_RING_SIZE:
        return 11, 10
    if left_min <= LARGE_RING_SIZE:
        return 11, _min_order(right_min)
    if right_min <= LARGE_RING_SIZE:
        return _min_order(left_min), 11
    return _min_order(left_min), _min_order(right_min)


def ring_pages(order: int) -> int:
    """Separately granted pages a ring of ``order`` needs (0 for in-page rings)."""
    return 1 << (order - PAGE_SHIFT) if order >= PAGE_SHIFT else 0


def in_page_offset(order: int) -> int | None:
    """Byte offset of an in-page ring inside the control page, ``None`` if external."""
    if order == 10:
        return 1024
    if order == 11:
        return 2048
    return None


@dataclass(frozen=True)
class Layout:
    """Ring orders and grant refs, as found in (or written to) a control page."""

    left_order: int
    right_order: int
    left_grants: tuple[int, ...]
    right_grants: tuple[int, ...]

    @property
    def left_size(self) -> int:
        return 1 << self.left_order

    @property
    def right_size(self) -> int:
        return 1 << self.right_order


def check_orders(left_order: int, right_order: int) -> None:
    """Validate a pair of ring orders as a libxenvchan client does; ``ProtocolError``."""
    for name, order in (("left_order", left_order), ("right_order", right_order)):
        if not MIN_ORDER <= order <= MAX_ORDER:
            raise ProtocolError(
                f"vchan control page: {name} {order} out of range {MIN_ORDER}..{MAX_ORDER}",
                field=name,
            )
    if left_order == right_order and left_order < PAGE_SHIFT:
        raise ProtocolError(
            f"vchan control page: both rings claim the in-page slot of order {left_order}",
            field="left_order",
        )


def init_server_page(
    page: Buffer,
    left_order: int,
    right_order: int,
    left_grants: list[int],
    right_grants: list[int],
    *,
    initial_index: int = 0,
) -> None:
    """Write a fresh control page as a server does before advertising it.

    The page is zeroed, the orders and grant refs written, ``cli_live = 2`` (waiting),
    ``srv_live = 1`` and ``cli_notify = NOTIFY_WRITE`` (the server wants to hear about the
    client's first write).  ``initial_index`` (default 0) seeds all four indices; any value
    is wire-legal and tests use values near ``2**32`` to exercise wrap-around.
    """
    check_orders(left_order, right_order)
    if len(left_grants) != ring_pages(left_order) or len(right_grants) != ring_pages(right_order):
        raise ValueError("grant list lengths do not match the ring orders")
    view = memoryview(page).cast("B")
    if len(view) < PAGE_SIZE:
        raise ValueError(f"control page must be {PAGE_SIZE} bytes, got {len(view)}")
    view[:PAGE_SIZE] = bytes(PAGE_SIZE)
    idx = initial_index & _U32
    struct.pack_into("<IIIIHH", view, 0, idx, idx, idx, idx, left_order, right_order)
    grants = list(left_grants) + list(right_grants)
    struct.pack_into(f"<{len(grants)}I", view, GRANTS, *grants)
    sb = SharedBuffer(view)
    try:
        sb.store_u8(SRV_NOTIFY, 0)
        sb.store_u8(CLI_NOTIFY, NOTIFY_WRITE)
        sb.store_u8(SRV_LIVE, 1)
        sb.store_u8(CLI_LIVE, LIVE_WAITING)  # release: everything above is visible first
    finally:
        sb.release()
        view.release()


def read_client_layout(page: Buffer) -> Layout:
    """Read and validate the orders and grant refs a client finds in a mapped page.

    Each field is read exactly once.  ``ProtocolError`` names the bad field.
    """
    view = memoryview(page).cast("B")
    try:
        if len(view) < PAGE_SIZE:
            raise ValueError(f"control page must be {PAGE_SIZE} bytes, got {len(view)}")
        left_order, right_order = struct.unpack_from("<HH", view, LEFT_ORDER)
        check_orders(left_order, right_order)
        nl, nr = ring_pages(left_order), ring_pages(right_order)
        # At most 2 * 256 refs: 24 + 2048 bytes, always inside the page.
        grants = struct.unpack_from(f"<{nl + nr}I", view, GRANTS)
    finally:
        view.release()
    return Layout(left_order, right_order, tuple(grants[:nl]), tuple(grants[nl:]))


# -- the connected endpoint ------------------------------------------------------------------


class VchanCore:
    """One endpoint's view of a connected vchan: its read ring and its write ring.

    Built over the control page and the two ring buffers (``memoryview``\\ s the caller
    mapped or shared; in-page rings are slices of the control page).  It pins them with
    [`SharedBuffer`][aioxen.native.SharedBuffer]; call [`release`][] before unmapping.

    Methods that produce or consume may require an event to be sent to the peer: they set
    [`notify_pending`][], which the caller clears after one ``EventChannel.notify()``.

    Reading has two families.  The stream transport's: [`step`][] (and its unchecked
    form [`step_raw`][]), one native call that releases what was read, checks both rings
    and the peer's live byte, and arms when empty, plus [`recv_into`][] for
    ``BufferedProtocol`` objects.  The datagram (framed) reader's: [`peer_eof`][] then
    [`readable`][] / [`request_readable`][], [`peek`][] (a header),
    [`read_span`][] + [`consume`][].
    """

    __slots__ = (
        "_cfg",
        "_ctrl",
        "_ctrl_sb",
        "_own_live",
        "_own_notify",
        "_peer_live",
        "_peer_notify",
        "_rcons",
        "_read_name",
        "_rmask",
        "_rprod",
        "_rring",
        "_rring_sb",
        "_rsize",
        "_span_cons",
        "_wcons",
        "_wprod",
        "_wring",
        "_wring_sb",
        "_write_name",
        "_wsize",
        "is_server",
        "notify_pending",
        "read_view",
        "send_raw",
        "step_raw",
    )

    def __init__(
        self,
        ctrl: memoryview,
        read_ring: memoryview,
        write_ring: memoryview,
        *,
        is_server: bool,
    ) -> None:
        rsize, wsize = len(read_ring), len(write_ring)
        for size in (rsize, wsize):
            if size < SMALL_RING_SIZE or size > MAX_RING_SIZE or size & (size - 1):
                raise ValueError(f"ring size {size} is not a power of two in 1 KiB..1 MiB")
        self.is_server = is_server
        self.notify_pending = False
        if is_server:
            self._rcons, self._rprod, self._wcons, self._wprod = (
                LEFT_CONS,
                LEFT_PROD,
                RIGHT_CONS,
                RIGHT_PROD,
            )
            self._own_live, self._peer_live = SRV_LIVE, CLI_LIVE
            self._own_notify, self._peer_notify = SRV_NOTIFY, CLI_NOTIFY
            self._read_name, self._write_name = "left", "right"
        else:
            self._rcons, self._rprod, self._wcons, self._wprod = (
                RIGHT_CONS,
                RIGHT_PROD,
                LEFT_CONS,
                LEFT_PROD,
            )
            self._own_live, self._peer_live = CLI_LIVE, SRV_LIVE
            self._own_notify, self._peer_notify = CLI_NOTIFY, SRV_NOTIFY
            self._read_name, self._write_name = "right", "left"
        self._ctrl_sb = SharedBuffer(ctrl)
        self._ctrl: Any = self._ctrl_sb.pointer
        self._rring_sb = SharedBuffer(read_ring)
        self._wring_sb = SharedBuffer(write_ring)
        self._rring: Any = self._rring_sb.pointer
        self._wring: Any = self._wring_sb.pointer
        self._rsize = rsize
        self._rmask = rsize - 1
        self._span_cons = 0
        self._cfg: Any = ffi.new(
            "uint32_t[9]",
            [
                self._rcons,
                self._rprod,
                self._own_notify,
                self._peer_live,
                self._peer_notify,
                self._wcons,
                self._wprod,
                rsize,
                wsize,
            ],
        )
        self._wsize = wsize
        self.read_view: memoryview | None = read_ring
        """The read ring as a ``memoryview`` (for single-copy delivery by the adapter)."""
        self._bind_raw()

    def _bind_raw(self) -> None:
        # C-level partials of the two hottest calls (no Python frame per call); rebound to
        # the dead page on release.
        self.step_raw: Any = functools.partial(lib.ax_vchan_step, self._ctrl, self._cfg)
        """``step_raw(new_cons, arm_bit)``: [`step`][] without the error check (a
        negative result goes to [`step_error`][])."""
        self.send_raw: Any = functools.partial(
            lib.ax_vchan_send,
            self._ctrl,
            self._wcons,
            self._wprod,
            self._own_notify,
            self._wring,
            self._wsize,
        )
        """``send_raw(src, n)``: [`send`][] unchecked: ``-1`` corrupt, else the count,
        plus ``1 << 32`` if the peer asked to be notified."""

    # -- sizes -----------------------------------------------------------------------------
    @property
    def read_size(self) -> int:
        return self._rsize

    @property
    def write_size(self) -> int:
        return self._wsize

    # -- errors ----------------------------------------------------------------------------
    def _corrupt(self, reading: bool) -> ProtocolError:
        if reading:
            name, cons_off, prod_off, size = self._read_name, self._rcons, self._rprod, self._rsize
        else:
            name, cons_off, prod_off, size = (
                self._write_name,
                self._wcons,
                self._wprod,
                self._wsize,
            )
        # Values re-read for the message only; the decision was made on a single read.
        prod = lib.ax_load_u32(self._ctrl, prod_off)
        cons = lib.ax_load_u32(self._ctrl, cons_off)
        return ProtocolError(
            f"vchan {name} ring corrupt: {name}.prod - {name}.cons = "
            f"{(prod - cons) & _U32} exceeds ring size {size} "
            f"(prod {prod:#x}, cons {cons:#x})",
            field=f"{name}.prod",
        )

    # -- reading ---------------------------------------------------------------------------
    def readable(self) -> int:
        """Bytes waiting in the read ring (validated)."""
        n: int = lib.ax_bring_used(self._ctrl, self._rcons, self._rprod, self._rsize)
        if n < 0:
            raise self._corrupt(True)
        return n

    def request_readable(self) -> int:
        """Ask the peer to signal its next write, then re-check: returns [`readable`][]."""
        n: int = lib.ax_vchan_arm(
            self._ctrl, self._peer_notify, NOTIFY_WRITE, self._rcons, self._rprod, self._rsize
        )
        if n < 0:
            raise self._corrupt(True)
        return n

    def read_span(self) -> tuple[int, int]:
        """``(offset, count)`` of the contiguous readable bytes in the read ring.

        ``prod`` and ``cons`` are each loaded once (acquire) and validated; the span stops
        at the end of the ring (the rest follows at offset 0).  Use with [`consume`][].
        """
        prod: int = lib.ax_load_u32(self._ctrl, self._rprod)
        cons: int = lib.ax_load_u32(self._ctrl, self._rcons)
        used = (prod - cons) & _U32
        if used > self._rsize:
            raise self._corrupt(True)
        self._span_cons = cons
        off = cons & self._rmask
        return off, min(used, self._rsize - off)

    def step(self, new_cons: int, arm: bool) -> int:
        """The reader's fused step (one native call, ``ax_vchan_step``): if ``new_cons``
        >= 0, publish it as the read ring's ``cons`` and test-and-clear our READ request
        bit (result bit [`STEP_NOTIFY`][]: signal the peer); then load our notify byte,
        the peer's live byte and both rings' indices, each once, validating both rings and
        the live byte (``ProtocolError``); with ``arm`` and an empty read ring (no EOF),
        ask the peer for a write notification and re-check.

        Returns the fields [`STEP_USED`][] (readable count), ``cons`` at
        [`STEP_CONS_SHIFT`][], and the flags [`STEP_EOF`][], [`STEP_LIVE`][],
        [`STEP_NOTIFY`][].  ``new_cons`` must be ``cons`` from the previous step plus
        the bytes read (u32): the index is never re-read from shared memory to compute it.
        """
        r: int = lib.ax_vchan_step(self._ctrl, self._cfg, new_cons, NOTIFY_WRITE if arm else 0)
        if r < 0:
            raise self.step_error(r)
        return r

    def step_error(self, r: int) -> ProtocolError:
        """The ``ProtocolError`` for a negative [`step`][] result."""
        if r == STEP_ERR_LIVE:
            return self._bad_live(lib.ax_load_u8(self._ctrl, self._peer_live))
        return self._corrupt(r == STEP_ERR_READ)

    def write_error(self) -> ProtocolError:
        """The ``ProtocolError`` for a negative [`send_raw`][] result."""
        return self._corrupt(False)

    def consume(self, n: int) -> None:
        """Release ``n`` bytes read through [`read_span`][] (``cons += n``, release
        store) and arrange a READ notification if the peer asked for one.

        The new index is computed from the ``cons`` that [`read_span`][] validated, not
        from a second read of shared memory."""
        self._span_cons = cons = (self._span_cons + n) & _U32
        if lib.ax_vchan_consume(self._ctrl, self._rcons, self._own_notify, cons, NOTIFY_READ):
            self.notify_pending = True

    def recv_into(self, dst: Any, n: int) -> int:
        """Copy up to ``n`` bytes into ``dst`` (a cffi pointer or ``bytes``-like accepted by
        cffi) and release them; returns the count."""
        got: int = lib.ax_vchan_recv(
            self._ctrl, self._rcons, self._rprod, self._own_notify, self._rring, self._rsize, dst, n
        )
        if 0 <= got <= _U32:
            return got  # the common cases, checked inline
        return self._moved(got, True)

    def _moved(self, r: int, reading: bool) -> int:
        """The byte count of a native recv/send result ``r`` that is not a plain count:
        negative (corrupt ring: ``ProtocolError``) or with bit 32 set (the peer asked to be
        notified: [`notify_pending`][])."""
        if r < 0:
            raise self._corrupt(reading)
        self.notify_pending = True
        return r & _U32

    def peek(self, n: int) -> bytes | None:
        """The next ``n`` bytes without consuming them, or ``None`` if fewer are there."""
        prod: int = lib.ax_load_u32(self._ctrl, self._rprod)
        cons: int = lib.ax_load_u32(self._ctrl, self._rcons)
        used = (prod - cons) & _U32
        if used > self._rsize:
            raise self._corrupt(True)
        if used < n:
            return None
        out = bytearray(n)
        with ffi.from_buffer(out) as p:
            lib.ax_ring_copy_out(self._rring, self._rsize, cons, p, n)
        return bytes(out)

    def peer_eof(self) -> bool:
        """True once the peer set [`NOTIFY_EOF`][] in our notify byte (writer shut down).

        Load this *before* [`readable`][]: when it was true and the ring is then empty,
        the stream is complete.
        """
        return bool(lib.ax_load_u8(self._ctrl, self._own_notify) & NOTIFY_EOF)

    # -- writing ---------------------------------------------------------------------------
    def writable(self) -> int:
        """Free bytes in the write ring (validated)."""
        n: int = lib.ax_bring_used(self._ctrl, self._wcons, self._wprod, self._wsize)
        if n < 0:
            raise self._corrupt(False)
        return self._wsize - n

    def request_writable(self) -> int:
        """Ask the peer to signal when it consumes, then re-check: returns [`writable`][]."""
        n: int = lib.ax_vchan_arm(
            self._ctrl, self._peer_notify, NOTIFY_READ, self._wcons, self._wprod, self._wsize
        )
        if n < 0:
            raise self._corrupt(False)
        return self._wsize - n

    def send(self, src: Any, n: int) -> int:
        """Copy up to ``n`` bytes from ``src`` (``bytes`` or a cffi pointer) into the write
        ring and publish them; returns the count (0 when the ring is full)."""
        put: int = self.send_raw(src, n)
        if 0 <= put <= _U32:
            return put
        return self._moved(put, False)

    def spin_readable(self, max_ns: int) -> int:
        """Spin at most ``max_ns`` nanoseconds while the read ring is empty: -1, or the
        nanoseconds until it was not | those spent off the CPU << 24.  (Only a hint: read
        through [`step`][].)"""
        r: int = lib.ax_vchan_spin(self._ctrl, self._rcons, self._rprod, 0, max_ns)
        return r

    def spin_writable(self, max_ns: int) -> int:
        """Spin at most ``max_ns`` nanoseconds while the write ring is full: -1, or the
        nanoseconds until it was not | those spent off the CPU << 24.  (Only a hint: write
        through [`send`][].)"""
        r: int = lib.ax_vchan_spin(self._ctrl, self._wcons, self._wprod, self._wsize, max_ns)
        return r

    def announce_ends(self) -> None:
        """Tell the peer that we end our stream with [`NOTIFY_EOF`][]: OR
        [`NOTIFY_ENDS`][] into its notify byte (once connected, before writing)."""
        lib.ax_fetch_or_u8(self._ctrl, self._peer_notify, NOTIFY_ENDS)

    def peer_announced_ends(self) -> bool:
        """True if the peer set [`NOTIFY_ENDS`][] in our notify byte: its close without
        [`NOTIFY_EOF`][] means its stream was cut."""
        return bool(lib.ax_load_u8(self._ctrl, self._own_notify) & NOTIFY_ENDS)

    def shutdown_write(self) -> None:
        """Mark our write direction finished: OR [`NOTIFY_EOF`][] into the peer's notify
        byte (after every ``prod`` update) and always signal."""
        lib.ax_fetch_or_u8(self._ctrl, self._peer_notify, NOTIFY_EOF)
        self.notify_pending = True

    # -- liveness --------------------------------------------------------------------------
    def peer_live(self) -> int:
        """The peer's live byte, validated: 0 (closed) or 1 (connected).  (A client's 2,
        "not yet connected", is only legal during setup, which does not use this.)"""
        value: int = lib.ax_load_u8(self._ctrl, self._peer_live)
        if value > 1:
            raise self._bad_live(value)
        return value

    def _bad_live(self, value: int) -> ProtocolError:
        name = "cli_live" if self.is_server else "srv_live"
        return ProtocolError(
            f"vchan control page: {name} has invalid value {value} (expected 0 or 1)",
            field=name,
        )

    def set_live(self, value: int) -> None:
        """Store our own live byte (release)."""
        lib.ax_store_u8(self._ctrl, self._own_live, value)

    # -- teardown --------------------------------------------------------------------------
    def release(self) -> None:
        """Drop the pins on the shared memory (idempotent).

        Afterwards the core points at a private all-zero dummy page and rings, so a stray
        call (a bug in the caller) sees an empty, idle vchan instead of touching memory
        that may be unmapped.
        """
        if self.read_view is None:
            return
        self.read_view = None
        dead = _dead().pointer
        self._ctrl = self._rring = self._wring = dead
        self._bind_raw()
        for sb in (self._rring_sb, self._wring_sb, self._ctrl_sb):
            sb.release()

    @property
    def released(self) -> bool:
        return self.read_view is None


_DEAD: SharedBuffer | None = None


def _dead() -> SharedBuffer:
    """A process-wide zeroed buffer (one control page + the largest ring) for dead cores."""
    global _DEAD
    if _DEAD is None:
        _DEAD = SharedBuffer(bytearray(MAX_RING_SIZE + PAGE_SIZE))
    return _DEAD


def live_byte(page: Buffer, offset: int) -> int:
    """Atomically load one live/notify byte of a control page (used during setup)."""
    sb = SharedBuffer(page)
    try:
        return sb.load_u8(offset)
    finally:
        sb.release()


def client_left_traces(page: Buffer) -> bool:
    """Did a client that is now closed (``cli_live`` 0) ever go live and leave something?

    True if its left ring holds bytes (``left.prod != left.cons``) or it set
    [`NOTIFY_ENDS`][]/[`NOTIFY_EOF`][] in the server's notify byte.  A server that
    finds ``cli_live`` already 0 must then deliver the connection (the reader drains the
    bytes, then sees EOF or a reset) instead of dropping it as "closed before connecting".
    """
    sb = SharedBuffer(page)
    try:
        if sb.load_u8(SRV_NOTIFY) & (NOTIFY_ENDS | NOTIFY_EOF):
            return True
        return sb.load_u32(LEFT_PROD) != sb.load_u32(LEFT_CONS)
    finally:
        sb.release()


__all__ = [
    "CLI_LIVE",
    "CLI_NOTIFY",
    "GRANTS",
    "HEADER_SIZE",
    "LEFT_CONS",
    "LEFT_ORDER",
    "LEFT_PROD",
    "LIVE_CLAIMING",
    "LIVE_CLOSED",
    "LIVE_CONNECTED",
    "LIVE_WAITING",
    "MAX_ORDER",
    "MAX_RING_SIZE",
    "MIN_ORDER",
    "NOTIFY_ENDS",
    "NOTIFY_EOF",
    "NOTIFY_READ",
    "NOTIFY_WRITE",
    "RIGHT_CONS",
    "RIGHT_ORDER",
    "RIGHT_PROD",
    "SRV_LIVE",
    "SRV_NOTIFY",
    "STEP_CONS_SHIFT",
    "STEP_EOF",
    "STEP_ERR_LIVE",
    "STEP_ERR_READ",
    "STEP_ERR_WRITE",
    "STEP_LIVE",
    "STEP_NOTIFY",
    "STEP_USED",
    "Layout",
    "VchanCore",
    "check_orders",
    "client_left_traces",
    "in_page_offset",
    "init_server_page",
    "live_byte",
    "read_client_layout",
    "ring_pages",
    "select_orders",
]
