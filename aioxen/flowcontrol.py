"""Write flow control shared by aioxen's asyncio transports.

Theory of operation
-------------------
asyncio's rule for a transport's write side: it counts the bytes it holds that have not
reached the wire yet; above the *high* water mark it calls ``protocol.pause_writing()``
once, and when the count has fallen to the *low* mark, ``protocol.resume_writing()``
once.  ``set_write_buffer_limits(high, low)`` follows the stdlib's defaults (``high`` is
``4 * low`` or [`WriteFlowControl.default_high`][]; ``low`` is ``high // 4``).  An
exception raised by either callback goes to the loop's exception handler, as in the
stdlib's transports.

[`WriteFlowControl`][] is the mixin that implements this.  A transport using it keeps
``_wlen`` (the count) up to date, sets ``_high``, ``_low`` and ``_protocol_paused`` in its
constructor, has ``_loop`` and ``_protocol``, and calls [`_maybe_pause_protocol`][]
after queueing and [`_maybe_resume_protocol`][] after draining.  This is an adapter
utility: protocol cores do not import it.  Users: netfront's
[`NetfrontTransport`][aioxen.net.transport.NetfrontTransport], the byte-ring
[`ByteRingTransport`][aioxen.rings.stream.ByteRingTransport] and vchan's transports.
"""

from __future__ import annotations

import asyncio


class WriteFlowControl:
    """asyncio high/low water-mark flow control for a transport's write buffer (a mixin:
    list it before the asyncio transport base class)."""

    default_high = 64 * 1024
    """``high`` when neither limit is given (``low`` is a quarter of it)."""

    _loop: asyncio.AbstractEventLoop
    _protocol: asyncio.BaseProtocol
    _wlen: int
    _high: int
    _low: int
    _protocol_paused: bool

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = self.default_high if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._wlen <= self._high or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._flow_callback_failed("protocol.pause_writing() failed", exc)

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._wlen <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._flow_callback_failed("protocol.resume_writing() failed", exc)

    def _flow_callback_failed(self, message: str, exc: Exception) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )


__all__ = ["WriteFlowControl"]
