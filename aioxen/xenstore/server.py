"""``aioxen xenstored``: the engine served on a Unix stream socket.

Theory of operation
-------------------
The socket speaks exactly the framing of Xen's ``/var/run/xenstored/socket``, so Xen's
``xenstore-*`` tools, libxenstore, pyxs and :class:`~aioxen.xenstore.XenStoreClient` all
work against it.  Each accepted connection becomes an
:class:`~aioxen.xenstore.engine.EngineConnection` behind a plain :class:`asyncio.Protocol`:
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
(Xen does the same); anything else malformed gets an ERROR reply.  Nothing one connection
does stops the others being served.  Flow control: the server stops reading a connection's
requests while ``outstanding`` maximum-size replies are unsent (the writer's high-water
mark) and drops watch events for a connection whose unsent output exceeds
``watch_event_backlog`` bytes (64 times that for privileged connections), counting them in
``aioxen-stats``.

Persistence.  With a state file, the tree is loaded at start, saved every
``sync_interval`` seconds when changed, and saved on close -- so a clean shutdown
(SIGTERM/SIGINT) loses no committed write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from types import TracebackType
from typing import Self, cast

from aioxen.errors import ProtocolError
from aioxen.xenstore import persist
from aioxen.xenstore._cork import CorkedOutput
from aioxen.xenstore.engine import Engine, EngineConnection, Quotas
from aioxen.xenstore.wire import HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Decoder, Message

log = logging.getLogger(__name__)

PRIVILEGED_BACKLOG_FACTOR = 64


class XenStoreServer:
    """Serve an :class:`Engine` on a Unix socket.  ``async with server: ...``"""

    def __init__(
        self,
        socket_path: str,
        engine: Engine | None = None,
        *,
        state_file: str | None = None,
        sync_interval: float = 1.0,
        quotas: Quotas | None = None,
    ) -> None:
        self.socket_path = socket_path
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
        self._sync_task: asyncio.Task[None] | None = None
        self._saved_at = -1

    async def start(self) -> None:
        import errno
        import stat

        from aioxen.platform._rootdir import RootPermissionError, describe, ensure_private_dir

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
        while True:
            await asyncio.sleep(self.sync_interval)
            self.save_if_changed()

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
    """One client connection: requests are decoded in ``data_received`` and handled at
    once; replies and watch events are corked and written once per batch of requests
    (one ``write`` for all the replies to requests that arrived together).

    Flow control: writing is paused above ``outstanding`` maximum-size replies of unsent
    output (the transport's high-water mark); reading is then paused too, until the
    output drains below the low-water mark.
    """

    def __init__(self, server: XenStoreServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._conn: EngineConnection | None = None
        self._decoder = Decoder()
        self._out = CorkedOutput()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self._transport = cast(asyncio.Transport, base)  # uvloop: no subclass
        server = self._server
        quotas = server.engine.quotas
        transport.set_write_buffer_limits(
            high=max(1, quotas.outstanding) * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX)
        )
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
        transport = self._transport
        if conn is None or transport is None or conn.closed:
            return
        decoder = self._decoder
        decoder.feed(data)
        try:
            messages = decoder.messages()
        except ProtocolError as exc:
            log.info("xenstored: closing connection of domid %d: %s", conn.domid, exc)
            self._server._flush_all()
            transport.abort()
            return
        try:
            for msg in messages:
                conn.handle(msg)
                if conn.closed:
                    break
        finally:
            self._server._flush_all(last=self)
        if conn.closed:
            transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        if self._conn is not None:
            self._conn.close()
        self._server._conns.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

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
