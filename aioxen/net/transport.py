"""netfront's ``asyncio.DatagramTransport``: Ethernet frames in, frames out.

Theory of operation
-------------------
[`NetfrontTransport`][] is the asyncio face of one
[`NetfrontQueue`][aioxen.net.front_queue.NetfrontQueue] (the data path).  ``sendto(frame, info)``
hands a frame to the queue; when the ring or the TX pages are full, frames wait in a FIFO
whose size drives ``pause_writing``/``resume_writing`` (asyncio's high/low water marks,
[`WriteFlowControl`][aioxen.flowcontrol.WriteFlowControl]), and enter the ring in order as the queue
reports freed pages.  Received frames go straight from the queue to
``protocol.datagram_received(frame, info)``.  ``pause_reading`` stops consuming
responses, so the backend runs out of buffers, as with a NIC.  A queue that fails
(protocol violation, backend gone) ends the transport with ``connection_lost(exc)``;
``close()`` runs the xenbus teardown the driver gave ([`aioxen.net.front`][]).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from aioxen.flowcontrol import WriteFlowControl
from aioxen.net.front_queue import NetfrontQueue
from aioxen.net.keys import BackendFeatures
from aioxen.net.netif import (
    PAGE_SIZE,
    PLAIN,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    FrameInfo,
)

log = logging.getLogger(__name__)


class NetfrontTransport(WriteFlowControl, asyncio.DatagramTransport):
    """The DatagramTransport of one vif: ``sendto(frame, info=None)``.

    ``get_extra_info`` keys: ``mac`` (bytes), ``mtu``, ``devid``, ``backend_domid``,
    ``backend_features`` (`BackendFeatures`), ``frontend_features``, ``platform``,
    ``stats`` ([`NetStats`][]).
    """

    _protocol: asyncio.DatagramProtocol

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.DatagramProtocol,
        *,
        extra: dict[str, Any],
        max_frame: int,
    ) -> None:
        super().__init__(extra)
        self._extras = extra
        self._loop = loop
        self._protocol = protocol
        self._queue_obj: NetfrontQueue | None = None
        self._pending: deque[tuple[bytes, FrameInfo]] = deque()
        self._wlen = 0
        self._high = self.default_high
        self._low = self.default_high // 4
        self._protocol_paused = False
        self._closing = False
        self._lost = False
        self._max_frame = max_frame
        self._closed_fut: asyncio.Future[None] = loop.create_future()
        self._gso_ok: frozenset[int] = frozenset()
        self._try_send: Callable[[Any, FrameInfo], bool] = lambda data, info: False
        self._teardown: Callable[[Exception | None], Any] | None = None
        self._teardown_task: asyncio.Task[None] | None = None
        self.dropped_after_close = 0

    def _attach(self, queue: NetfrontQueue, teardown: Callable[[Exception | None], Any]) -> None:
        self._queue_obj = queue
        self._try_send = queue.try_send
        self._teardown = teardown
        self._extras["stats"] = queue.stats
        feats: BackendFeatures | None = self._extras.get("backend_features")
        ok = set()
        if feats is not None and self._max_frame > PAGE_SIZE:
            if feats.gso_tcpv4:
                ok.add(XEN_NETIF_GSO_TYPE_TCPV4)
            if feats.gso_tcpv6:
                ok.add(XEN_NETIF_GSO_TYPE_TCPV6)
        self._gso_ok = frozenset(ok)

    # -- DatagramTransport -----------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extras.get(name, default)

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Send one Ethernet frame.  ``addr`` is ``None`` or a [`FrameInfo`][] (offload
        metadata).  ``ValueError`` for an empty frame or one larger than the vif allows."""
        if addr is None:
            info = PLAIN
        elif isinstance(addr, FrameInfo):
            info = addr
            if info.gso_type and info.gso_type not in self._gso_ok:
                raise ValueError(f"netfront: backend did not offer GSO type {info.gso_type}")
        else:
            raise TypeError(f"netfront: addr must be None or FrameInfo, not {type(addr).__name__}")
        n = len(data)
        if n == 0 or n > self._max_frame:
            raise ValueError(f"netfront: frame of {n} bytes (allowed 1..{self._max_frame})")
        if self._closing:
            self.dropped_after_close += 1
            return
        if not self._pending and self._try_send(data, info):
            return
        q = self._queue_obj
        assert q is not None
        self._pending.append((bytes(data), info))
        self._wlen += n
        if len(self._pending) == 1:
            q.flush()
            q.want_tx_space()
        self._maybe_pause_protocol()

    def _tx_space(self) -> None:
        q = self._queue_obj
        if q is None:
            return
        pending = self._pending
        while pending:
            frame, info = pending[0]
            if not q.try_send(frame, info):
                q.want_tx_space()
                break
            pending.popleft()
            self._wlen -= len(frame)
        self._maybe_resume_protocol()
        if self._closing and not pending:
            self._start_teardown(None)

    def get_write_buffer_size(self) -> int:
        return self._wlen

    def pause_reading(self) -> None:
        if self._queue_obj is not None:
            self._queue_obj.pause_reading()

    def resume_reading(self) -> None:
        if self._queue_obj is not None:
            self._queue_obj.resume_reading()

    def is_reading(self) -> bool:
        q = self._queue_obj
        return q is not None and q._reading and not self._closing

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Stop accepting frames, send the queued ones, then disconnect (xenbus Closing →
        Closed) and call ``connection_lost(None)``."""
        if self._closing or self._lost:
            return
        self._closing = True
        if self._queue_obj is not None:
            self._queue_obj.pause_reading()
        if not self._pending:
            self._start_teardown(None)

    def abort(self) -> None:
        """Drop queued frames and disconnect at once."""
        if self._lost:
            return
        self._closing = True
        self._pending.clear()
        self._wlen = 0
        self._start_teardown(None)

    async def wait_closed(self) -> None:
        """Wait until the transport is fully torn down."""
        await asyncio.shield(self._closed_fut)

    def _connection_failed(self, exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            exc = ConnectionResetError(repr(exc))
        """The queue died or the backend left: tear down and report ``exc``."""
        self._pending.clear()
        self._wlen = 0
        self._start_teardown(exc)

    def _start_teardown(self, exc: Exception | None) -> None:
        if self._teardown_task is not None:
            return
        self._closing = True
        self._teardown_task = self._loop.create_task(self._run_teardown(exc))

    async def _run_teardown(self, exc: Exception | None) -> None:
        try:
            if self._teardown is not None:
                await self._teardown(exc)
        except Exception as err:  # teardown problems must not hide the original cause
            log.debug("netfront teardown: %r", err)
        finally:
            self._lost = True
            try:
                self._protocol.connection_lost(exc)
            finally:
                if not self._closed_fut.done():
                    self._closed_fut.set_result(None)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return (
            f"<NetfrontTransport devid={self._extras.get('devid')} "
            f"backend={self._extras.get('backend_domid')} {state}>"
        )


__all__ = ["NetfrontTransport"]
