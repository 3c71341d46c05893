"""``aioxen xenstored``: the engine served on a Unix stream socket.

Theory of operation
-------------------
The socket speaks exactly the framing of Xen's ``/var/run/xenstored/socket``, so Xen's
``xenstore-*`` tools, libxenstore, pyxs and [`XenStoreClient`][aioxen.xenstore.XenStoreClient] all
work against it.  Each accepted connection becomes an
[`EngineConnection`][aioxen.xenstore.engine.EngineConnection] behind a plain `asyncio.Protocol`:
requests are decoded and handled in ``data_received`` itself (no reader task), and the
output -- replies and the watch events they fire, for every connection -- is corked until
the batch of requests that arrived together has been handled, then written with one
``write`` per connection.  Pipelined requests thus cost one read and one write here.

Identity.  As on Xen, a socket connection is dom0 (privileged).  A connection that wants to
act as another domain -- the ``unix`` platform's processes do -- sends, as its first
message, ``XS_CONTROL`` with payload ``aioxen-identify\\0<domid>\\0``.  The server then
treats the connection as ``domid``: unprivileged (unless 0), relative paths under
``/local/domain/<domid>``, quotas and permissions applied.  On that first identify the
domain's home ``/local/domain/<domid>`` (owned by it) and its ``domid`` key are created, and
the domain counts as introduced (``@introduceDomain`` fires).  Only a privileged connection
may identify, so a connection cannot change identity twice; the trust boundary is the
socket's file permissions (its directory is 0700), exactly as with Xen's root-only socket.

Hostile clients.  A header announcing more than 4096 payload bytes kills that connection
(Xen does the same); anything else malformed gets an ERROR reply.  Watch events for a
connection whose unsent output exceeds ``watch_event_backlog`` bytes (64 times that for
privileged connections) are dropped and counted in ``aioxen-stats``.

Budgets (memory).  A connection's *unsent* output is what its transport still buffers plus
what is corked.  The *budget* is ``outstanding`` maximum-size replies (``Quotas``).  Before
each request the server checks that the connection's unsent output -- and, for an
unprivileged domain, the sum over all of that domain's connections -- is within the budget;
if not, the request stays in the connection's input buffer, unparsed, and the connection is
*blocked*: reading pauses, and it is re-checked when its transport drains
(``resume_writing``) or on a short timer.  Reading also pauses while more than
``input_limit`` request bytes are buffered.  So one domain holds at most its budget plus one
reply of output, and each connection at most ``input_limit`` plus one read of input,
however many requests one read brought in.

Fairness (time).  Requests are handled in *turns*: at most ``turn_requests`` requests or
``turn_seconds`` of work per connection per turn.  A connection with requests left over
joins a round-robin queue served by one loop callback that gives every queued connection one
turn and then yields to the event loop (so newly readable sockets are read, and a newly
active connection is served in its own ``data_received``, before the next round).  Output is
flushed after each turn, one ``write`` per connection.

Persistence.  With a state file, the tree is loaded at start, saved every
``sync_interval`` seconds when changed, and saved on close -- so a clean shutdown
(SIGTERM/SIGINT) loses no committed write.  A save that fails (disk full, no descriptor
left) is logged once and retried every interval until one succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from types import TracebackType
from typing import Self, cast

from aioxen.errors import ProtocolError
from aioxen.xenstore import persist
from aioxen.xenstore._cork import CorkedOutput
from aioxen.xenstore.engine import Engine, EngineConnection, Quotas
from aioxen.xenstore.wire import HEADER, HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Message

log = logging.getLogger(__name__)

PRIVILEGED_BACKLOG_FACTOR = 64
MAX_FRAME = HEADER_SIZE + XENSTORE_PAYLOAD_MAX
TURN_REQUESTS = 64
"""Default: at most this many requests of one connection per turn."""
TURN_SECONDS = 0.002
"""Default: a connection's turn ends after this much work (checked after each request)."""
INPUT_LIMIT = 64 * 1024
"""Default: reading a connection pauses while this many request bytes are buffered."""
RECHECK_SECONDS = 0.01
"""How often blocked connections are re-checked (besides their transports' drain calls)."""


class XenStoreServer:
    """Serve an [`Engine`][] on a Unix socket.  ``async with server: ...``"""

    def __init__(
        self,
        socket_path: str,
        engine: Engine | None = None,
        *,
        state_file: str | None = None,
        sync_interval: float = 1.0,
        quotas: Quotas | None = None,
        turn_requests: int = TURN_REQUESTS,
        turn_seconds: float = TURN_SECONDS,
        input_limit: int = INPUT_LIMIT,
    ) -> None:
        if turn_requests < 1 or turn_seconds <= 0 or input_limit < MAX_FRAME:
            raise ValueError(
                f"turn_requests must be >= 1, turn_seconds > 0 and input_limit >= {MAX_FRAME}"
            )
        self.socket_path = socket_path
        self.turn_requests = turn_requests
        self.turn_seconds = turn_seconds
        self.input_limit = input_limit
        self.state_file = state_file
        self.sync_interval = sync_interval
        if engine is None:
            if state_file is not None and os.path.exists(state_file):
                engine = persist.load(state_file, quotas)
            else:
                engine = Engine(quotas)
        self.engine = engine
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._dirty: list[_Connection] = []  # connections with corked output
        self._flush_handle: asyncio.Handle | None = None
        self._ready: deque[_Connection] = deque()  # connections owed a turn, in order
        self._service_handle: asyncio.Handle | None = None
        self._blocked: set[_Connection] = set()  # over budget, waiting for output to drain
        self._recheck_handle: asyncio.TimerHandle | None = None
        self._domains: dict[int, set[_Connection]] = {}  # unprivileged domid -> connections
        self._peak_unsent: dict[int, int] = {}  # domid -> most unsent output seen at once
        self.engine.stats_extra = self._stats
        self._sync_task: asyncio.Task[None] | None = None
        self._saved_at = -1

    async def start(self) -> None:
        import errno
        import stat

        from aioxen.platforms._rootdir import RootPermissionError, describe, ensure_private_dir

        path = self.socket_path
        # Whoever can reach the socket is dom0, so its directory is the trust boundary: a
        # real directory of ours with no group/other access (created 0700 if missing);
        # another user's, or a link, is refused (issue 13: a socket hijacked by renaming).
        ensure_private_dir(
            os.path.dirname(os.path.abspath(path)), what="the directory of a xenstored socket"
        )
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):  # never remove (or follow) anything else
                raise RootPermissionError(
                    errno.EEXIST, f"{path} exists and is not a socket ({describe(st)})"
                )
            if _socket_alive(path):
                raise OSError(errno.EADDRINUSE, f"a xenstored is already listening on {path}")
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path)
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.chmod(path, 0o600)
        if self.state_file is not None:
            self._saved_at = self.engine.modified
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                self.save_if_changed()
            except OSError as exc:
                # A full disk or the descriptor limit -- which other users and domains can
                # bring about -- is transient: keep serving, say so once, retry each interval
                # (a failed save used to end this task for good, unnoticed).
                if not failing:
                    log.warning(
                        "xenstored: cannot save the state to %s: %s; retrying every %g s",
                        self.state_file,
                        exc,
                        self.sync_interval,
                    )
                failing = True
            else:
                if failing:
                    log.warning("xenstored: state saved to %s again", self.state_file)
                failing = False

    def save_if_changed(self) -> None:
        if self.state_file is not None and self.engine.modified != self._saved_at:
            persist.save(self.engine, self.state_file)
            self._saved_at = self.engine.modified

    async def close(self) -> None:
        """Stop listening, drop every connection, save the state (if persistent)."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for handle in (self._service_handle, self._recheck_handle):
            if handle is not None:
                handle.cancel()
        self._service_handle = self._recheck_handle = None
        self._ready.clear()
        self._blocked.clear()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        if conns:
            await asyncio.gather(*(c.lost for c in conns), return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self.save_if_changed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- budgets and turns -------------------------------------------------------------
    @property
    def budget(self) -> int:
        """Unsent output bytes allowed per connection and per unprivileged domain."""
        return max(1, self.engine.quotas.outstanding) * MAX_FRAME

    def _domain_unsent(self, domid: int) -> int:
        return sum(c.unsent() for c in self._domains.get(domid, ()))

    def _set_domain(self, conn: _Connection, old: int | None, new: int | None) -> None:
        """``conn`` now acts as unprivileged domain ``new`` (None: privileged/gone)."""
        if old is not None:
            members = self._domains.get(old)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self._domains[old]
        if new is not None:
            self._domains.setdefault(new, set()).add(conn)

    def _note_unsent(self, domid: int, unsent: int) -> None:
        if unsent > self._peak_unsent.get(domid, 0):
            self._peak_unsent[domid] = unsent

    def _enqueue(self, conn: _Connection) -> None:
        """Give ``conn`` a turn in the next round."""
        if conn.queued:
            return
        conn.queued = True
        self._ready.append(conn)
        if self._service_handle is None:
            self._service_handle = asyncio.get_running_loop().call_soon(self._service)

    def _service(self) -> None:
        """One round: a turn for each connection queued before it began; then yield."""
        self._service_handle = None
        ready = self._ready
        for _ in range(len(ready)):
            conn = ready.popleft()
            conn.queued = False
            conn.turn()
        if ready and self._service_handle is None:
            self._service_handle = asyncio.get_running_loop().call_soon(self._service)

    def _block(self, conn: _Connection) -> None:
        self._blocked.add(conn)
        if self._recheck_handle is None:
            self._recheck_handle = asyncio.get_running_loop().call_later(
                RECHECK_SECONDS, self._recheck
            )

    def _recheck(self, domid: int | None = None) -> None:
        """Unblock the blocked connections (of ``domid``, or all) that are within budget."""
        if domid is None:
            self._recheck_handle = None
        totals: dict[int, int] = {}  # each domain's unsent output, summed once per pass
        for conn in list(self._blocked):
            if domid is None or conn.domid == domid:
                total = None
                if conn.domid is not None:
                    total = totals.get(conn.domid)
                    if total is None:
                        total = totals[conn.domid] = self._domain_unsent(conn.domid)
                conn.recheck(total)
        if self._blocked and self._recheck_handle is None:
            self._recheck_handle = asyncio.get_running_loop().call_later(
                RECHECK_SECONDS, self._recheck
            )

    def _stats(self) -> dict[str, object]:
        """The server's part of ``aioxen-stats``: budgets and what is held against them."""
        return {
            "budget": self.budget,
            "input_limit": self.input_limit,
            "turn_requests": self.turn_requests,
            "turn_seconds": self.turn_seconds,
            "unsent": {str(d): self._domain_unsent(d) for d in self._domains},
            "peak_unsent": {str(d): n for d, n in self._peak_unsent.items()},
            "buffered_input": sum(len(c.inbuf) for c in self._conns),
            "blocked": len(self._blocked),
            "queued": len(self._ready),
        }

    # -- output batching -------------------------------------------------------------
    def _corked(self, conn: _Connection) -> None:
        """``conn`` has output waiting: flush it at the end of the current batch of
        requests (or, for output made outside one, on the next loop iteration)."""
        self._dirty.append(conn)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_all)

    def _flush_all(self, last: _Connection | None = None) -> None:
        """Write every corked output; ``last`` (the connection whose requests were just
        handled) goes last, so the watch events its requests fired reach their watchers
        before its own replies -- the order in which an uncorked server sends them."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            if conn is not last:
                conn.flush()
        if last is not None:
            last.flush()


class _Connection(asyncio.Protocol):
    """One client connection: request bytes are buffered in ``data_received`` and handled in
    turns (see the module docstring); replies and watch events are corked and written once
    per turn."""

    def __init__(self, server: XenStoreServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._conn: EngineConnection | None = None
        self.inbuf = bytearray()
        self._out = CorkedOutput()
        self._domain: int | None = None  # the unprivileged domain it counts against
        self.queued = False  # in the server's round-robin queue
        self._reading_paused = False
        self._eof = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def domid(self) -> int | None:
        return self._domain

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self._transport = cast(asyncio.Transport, base)  # uvloop: no subclass
        server = self._server
        quotas = server.engine.quotas
        budget = server.budget
        transport.set_write_buffer_limits(high=budget, low=budget // 2)
        conn = server.engine.connect(0, self._send)

        def backlog_ok(msg: Message) -> bool:
            limit = quotas.watch_event_backlog
            if conn.privileged:
                limit *= PRIVILEGED_BACKLOG_FACTOR
            ok = transport.get_write_buffer_size() + self._out.nbytes < limit
            if not ok and conn.dropped_events % 1000 == 0:
                log.warning(
                    "xenstored: dropping watch events for domid %d (unread output backlog)",
                    conn.domid,
                )
            return ok

        conn.event_filter = backlog_ok
        conn.on_kill = transport.abort
        self._conn = conn
        server._conns.add(self)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        self.inbuf += data
        if not self.queued and self not in self._server._blocked:
            self.turn()  # an idle connection is served at once (no added latency)
        else:
            self._update_reading()

    def eof_received(self) -> bool:
        # Requests still buffered are answered before the connection closes.
        self._eof = True
        return self.queued or self in self._server._blocked

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        if isinstance(exc, OSError):
            self._finish_buffered()
        self.inbuf.clear()
        if self._conn is not None:
            self._conn.close()
        server = self._server
        server._conns.discard(self)
        server._blocked.discard(self)
        server._set_domain(self, self._domain, None)
        self._domain = None
        if not self.lost.done():
            self.lost.set_result(None)

    def _finish_buffered(self) -> None:
        """The peer hung up (a reply's write failed) while requests it sent before hanging
        up were still buffered here, waiting for their turn: handle them, as if they had
        been read one at a time, with their replies discarded (``_send`` drops output once
        the transport is closing).  A client that writes and closes at once (an unbuffered
        ``xenstore-write; exit``) must not lose writes to the server's batching.  Bounded by
        ``input_limit`` plus one read; stops at the first malformed request."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        buf = self.inbuf
        pos = 0
        try:
            while not conn.closed:
                end = self._frame_end(pos)
                if not end:
                    break
                typ, req_id, tx_id, _ = HEADER.unpack_from(buf, pos)
                conn.handle(Message(typ, req_id, tx_id, bytes(buf[pos + HEADER_SIZE : end])))
                pos = end
        except ProtocolError as exc:
            log.info("xenstored: dropping the rest of a closed connection's input: %s", exc)

    def pause_writing(self) -> None:
        pass  # turns check the unsent output before each request

    def resume_writing(self) -> None:
        self.recheck()
        if self._domain is not None:
            self._server._recheck(self._domain)

    # -- budgets and turns ---------------------------------------------------------------
    def unsent(self) -> int:
        transport = self._transport
        queued = transport.get_write_buffer_size() if transport is not None else 0
        return queued + self._out.nbytes

    def _limit(self, domain_total: int | None = None) -> int:
        """How much unsent output this connection may hold before its next request
        (``domain_total``: its domain's unsent output, if the caller has summed it)."""
        server = self._server
        budget = server.budget
        if self._domain is None:
            return budget
        if domain_total is None:
            domain_total = server._domain_unsent(self._domain)
        others = domain_total - self.unsent()
        return min(budget, budget - others)

    def _frame_end(self, pos: int) -> int:
        """End offset of the request starting at ``pos``; 0 if it is not all here yet.
        Raises ProtocolError for an oversized header."""
        buf = self.inbuf
        if len(buf) - pos < HEADER_SIZE:
            return 0
        length = HEADER.unpack_from(buf, pos)[3]
        if length > XENSTORE_PAYLOAD_MAX:
            raise ProtocolError(
                f"XenStore payload length {length} exceeds XENSTORE_PAYLOAD_MAX "
                f"({XENSTORE_PAYLOAD_MAX})",
                field="len",
            )
        end = pos + HEADER_SIZE + length
        return end if end <= len(buf) else 0

    def turn(self) -> None:
        """Handle up to one turn's worth of buffered requests, within budget; flush."""
        conn = self._conn
        transport = self._transport
        if conn is None or transport is None or conn.closed or transport.is_closing():
            return
        server = self._server
        buf = self.inbuf
        size = len(buf)
        out = self._out
        unpack = HEADER.unpack_from
        pos = 0
        handled = 0
        limit = self._limit()
        turn_requests = server.turn_requests
        deadline = time.perf_counter() + server.turn_seconds
        try:
            while size - pos >= HEADER_SIZE:
                typ, req_id, tx_id, length = unpack(buf, pos)
                if length > XENSTORE_PAYLOAD_MAX:
                    self._frame_end(pos)  # raises the ProtocolError
                end = pos + HEADER_SIZE + length
                if end > size:
                    break
                if transport.get_write_buffer_size() + out.nbytes > limit:
                    break  # over budget: the request stays buffered
                if handled >= turn_requests or (handled and time.perf_counter() > deadline):
                    break
                msg = Message(typ, req_id, tx_id, bytes(buf[pos + HEADER_SIZE : end]))
                pos = end
                handled += 1
                conn.handle(msg)
                if conn.closed:
                    break
        except ProtocolError as exc:
            log.info("xenstored: closing connection of domid %d: %s", conn.domid, exc)
            server._flush_all()
            transport.abort()
            return
        finally:
            if pos:
                del buf[:pos]
            if handled:
                server._flush_all(last=self)
        if conn.closed:
            transport.close()
            return
        domain = None if conn.privileged else conn.domid
        if domain != self._domain:
            server._set_domain(self, self._domain, domain)
            self._domain = domain
        if domain is not None:
            server._note_unsent(domain, server._domain_unsent(domain))
        self._after_turn()

    def _after_turn(self) -> None:
        server = self._server
        try:
            more = len(self.inbuf) >= HEADER_SIZE and bool(self._frame_end(0))
        except ProtocolError:
            more = True  # the next turn kills the connection
        if more:
            if self.unsent() > self._limit():  # after the flush: what the kernel refused
                server._block(self)
            else:
                server._blocked.discard(self)
                server._enqueue(self)
        else:
            server._blocked.discard(self)
            if self._eof and self._transport is not None:
                self._transport.close()
        self._update_reading()

    def recheck(self, domain_total: int | None = None) -> None:
        """A blocked connection whose output drained below its limit is queued again."""
        server = self._server
        if self in server._blocked and self.unsent() <= self._limit(domain_total):
            server._blocked.discard(self)
            server._enqueue(self)
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        server = self._server
        pause = self in server._blocked or len(self.inbuf) >= server.input_limit
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # -- output --------------------------------------------------------------------------
    def _send(self, msg: Message) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        data = msg.encode()
        if not self._out:
            self._server._corked(self)
        self._out.append(data)

    def flush(self) -> None:
        self._out.write_to(self._transport)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


__all__ = ["XenStoreServer"]
