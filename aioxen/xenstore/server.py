"""``aioxen xenstored``: the engine served on a Unix stream socket.

Theory of operation
-------------------
The socket speaks exactly the framing of Xen's ``/var/run/xenstored/socket``, so Xen's
``xenstore-*`` tools, libxenstore, pyxs and :class:`~aioxen.xenstore.XenStoreClient` all
work against it.  Each accepted connection becomes an
:class:`~aioxen.xenstore.engine.EngineConnection`; decoded requests go to the engine and
its output is written back through the stdlib ``StreamWriter``.

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
from typing import Self

from aioxen.errors import ProtocolError
from aioxen.xenstore import persist
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
        self._handlers: set[asyncio.Task[None]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._saved_at = -1

    async def start(self) -> None:
        path = self.socket_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            if _socket_alive(path):
                raise OSError(f"a xenstored is already listening on {path}")
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._client, path, limit=1 << 16)
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
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
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

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - keep serving the others
            log.exception("xenstored connection handler failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        quotas = self.engine.quotas
        transport.set_write_buffer_limits(
            high=max(1, quotas.outstanding) * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX)
        )

        def send(msg: Message) -> None:
            if not transport.is_closing():
                transport.write(msg.encode())

        conn: EngineConnection = self.engine.connect(0, send)

        def backlog_ok(msg: Message) -> bool:
            limit = quotas.watch_event_backlog
            if conn.privileged:
                limit *= PRIVILEGED_BACKLOG_FACTOR
            ok = transport.get_write_buffer_size() < limit
            if not ok and conn.dropped_events % 1000 == 0:
                log.warning(
                    "xenstored: dropping watch events for domid %d (unread output backlog)",
                    conn.domid,
                )
            return ok

        conn.event_filter = backlog_ok
        conn.on_kill = transport.abort
        decoder = Decoder()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                decoder.feed(data)
                try:
                    messages = decoder.messages()
                except ProtocolError as exc:
                    log.info("xenstored: closing connection of domid %d: %s", conn.domid, exc)
                    transport.abort()
                    return
                for msg in messages:
                    conn.handle(msg)
                    if conn.closed:
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            conn.close()


def _socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


__all__ = ["XenStoreServer"]
