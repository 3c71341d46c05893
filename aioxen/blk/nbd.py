"""An NBD server exporting [`BlockDevice`][aioxen.blk.device.BlockDevice] objects.

Theory of operation
-------------------
[`start_server`][] listens on TCP or a Unix socket (a path a live server holds is
refused, a dead server's replaced); each connection runs
`NBDConnection`: the fixed-newstyle handshake (``NBD_OPT_GO``/``INFO``/``LIST``/
``EXPORT_NAME``/``ABORT``/``STRUCTURED_REPLY`` and the ``base:allocation`` meta context),
then the transmission phase.  Wire encoding lives in `aioxen.blk.nbdwire`.

Transmission is concurrent: the connection's reader task parses one request at a time
(reading a write's payload immediately, so the stream stays in sync) and starts a task per
request; replies go out as requests finish, in any order, each written with a single
``write`` call so replies never interleave.  The number of requests and payload bytes in
flight per connection is bounded, which also bounds memory.

The device works in sectors; NBD in bytes.  Reads of partial sectors read the covering
sectors.  Writes of partial sectors read-modify-write the edge sectors; so that such a
read-modify-write never undoes a concurrent write to the same sector, every write-type
command holds a lock on the sector range it touches (`RangeLock`).  Clients that
asked for block sizes (``NBD_INFO_BLOCK_SIZE``) are told the sector size as the minimum
and never send partial sectors.

Errors in a request become an NBD error for that request (``EINVAL`` for bad ranges,
``EPERM`` for writes to a read-only export, ``EIO`` for device errors, ...) and the session
continues; a malformed message ends the session.

Shutdown ([`NBDServer.shutdown`][], what ``aioxen blkfront nbd`` does on SIGINT/SIGTERM)
stops listening, lets each session's requests in flight finish and their replies go out,
then closes the connections, before the devices close: a request that got no reply is
one the client sees fail (the connection closed under it), never a silent success.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aioxen.blk import nbdwire as W
from aioxen.blk.device import BlockDevice
from aioxen.ownership import UnixSocketClaim

log = logging.getLogger("aioxen.blk.nbd")

MAX_REQUEST = 32 << 20
"""Largest read/write payload accepted (advertised as the maximum block size)."""
MAX_OPTION = 64 << 10
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 128 << 20
ZERO_CHUNK = 1 << 20


class RangeLock:
    """Exclusive locks on half-open integer ranges; overlapping holders wait in turn."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, asyncio.Event]] = []

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            blocker = next((ev for s, e, ev in self._held if s < end and start < e), None)
            if blocker is None:
                break
            await blocker.wait()
        entry = (start, end, asyncio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()


def nbd_errno(exc: BaseException) -> int:
    """Map an exception from a device to an NBD error number."""
    if isinstance(exc, PermissionError):
        return W.EPERM
    if isinstance(exc, ValueError):
        return W.EINVAL
    if isinstance(exc, MemoryError):
        return W.ENOMEM
    if isinstance(exc, OSError) and exc.errno is not None:
        return {
            _errno.EPERM: W.EPERM,
            _errno.EROFS: W.EPERM,
            _errno.EACCES: W.EPERM,
            _errno.ENOMEM: W.ENOMEM,
            _errno.EINVAL: W.EINVAL,
            _errno.ENOSPC: W.ENOSPC,
            _errno.EOVERFLOW: W.EOVERFLOW,
            _errno.EOPNOTSUPP: W.ENOTSUP,
            _errno.ESHUTDOWN: W.ESHUTDOWN,
        }.get(exc.errno, W.EIO)
    return W.EIO


class _RequestError(Exception):
    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


@dataclass
class Export:
    name: str
    device: BlockDevice
    description: str = ""
    locks: RangeLock = field(default_factory=RangeLock)


class NBDConnection:
    """One client session."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        default_export: str | None = None,
    ) -> None:
        self.exports = exports
        self.default_export = default_export
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.no_zeroes = False
        self.meta_context = False
        self.export: Export | None = None
        self.peer = writer.get_extra_info("peername")
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._done = asyncio.Event()  # serve() has finished
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._room = asyncio.Condition()

    # ------------------------------------------------------------------ handshake

    def _lookup(self, name: str) -> Export | None:
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.exports.get(name)

    def transmission_flags(self, exp: Export) -> int:
        dev = exp.device
        flags = W.FLAG_HAS_FLAGS | W.FLAG_SEND_WRITE_ZEROES | W.FLAG_CAN_MULTI_CONN
        if dev.can_flush:
            flags |= W.FLAG_SEND_FLUSH | W.FLAG_SEND_FUA
        if dev.readonly:
            flags |= W.FLAG_READ_ONLY
        elif dev.can_discard:
            flags |= W.FLAG_SEND_TRIM
        if self.structured:
            flags |= W.FLAG_SEND_DF
        return flags

    def _send(self, data: bytes) -> None:
        self.writer.write(data)

    async def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self._send(W.option_reply(option, kind, data))
        await self.writer.drain()

    async def handshake(self) -> bool:
        """Run option haggling; True when transmission starts."""
        self._send(W.greeting())
        await self.writer.drain()
        (cflags,) = W.CLIENT_FLAGS.unpack(await self.reader.readexactly(4))
        if cflags & ~(W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES):
            log.warning("nbd %s: unknown client flags %#x; closing", self.peer, cflags)
            return False
        self.no_zeroes = bool(cflags & W.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = W.OPTION_HEADER.unpack(await self.reader.readexactly(16))
            if magic != W.IHAVEOPT:
                raise W.NBDError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                # too big to buffer: skip it and refuse
                while length:
                    chunk = await self.reader.read(min(length, 1 << 16))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", length)
                    length -= len(chunk)
                await self._reply(option, W.REP_ERR_TOO_BIG)
                continue
            data = await self.reader.readexactly(length)
            done = await self._option(option, data)
            if done is not None:
                return done

    async def _option(self, option: int, data: bytes) -> bool | None:
        if option == W.OPT_EXPORT_NAME:
            exp = self._lookup(data.decode(errors="replace"))
            if exp is None:
                log.warning("nbd %s: unknown export %r; closing", self.peer, data)
                return False
            self.export = exp
            reply = W.EXPORT_NAME_REPLY.pack(exp.device.size, self.transmission_flags(exp))
            self._send(reply + (b"" if self.no_zeroes else bytes(124)))
            await self.writer.drain()
            return True
        if option == W.OPT_ABORT:
            with contextlib.suppress(ConnectionError):
                await self._reply(option, W.REP_ACK)
            return False
        if option == W.OPT_LIST:
            if data:
                await self._reply(option, W.REP_ERR_INVALID)
                return None
            for name in self.exports:
                raw = name.encode()
                self._send(W.option_reply(option, W.REP_SERVER, struct.pack(">I", len(raw)) + raw))
            await self._reply(option, W.REP_ACK)
            return None
        if option in (W.OPT_INFO, W.OPT_GO):
            return await self._info(option, data)
        if option == W.OPT_STRUCTURED_REPLY:
            if data or self.structured:
                await self._reply(option, W.REP_ERR_INVALID)
                return None
            self.structured = True
            await self._reply(option, W.REP_ACK)
            return None
        if option in (W.OPT_LIST_META_CONTEXT, W.OPT_SET_META_CONTEXT):
            await self._meta_context(option, data)
            return None
        await self._reply(option, W.REP_ERR_UNSUP)
        return None

    async def _info(self, option: int, data: bytes) -> bool | None:
        try:
            req = W.parse_info_request(data)
        except W.NBDError as exc:
            await self._reply(option, W.REP_ERR_INVALID, str(exc).encode())
            return None
        exp = self._lookup(req.name)
        if exp is None:
            await self._reply(option, W.REP_ERR_UNKNOWN, f"no export {req.name!r}".encode())
            return None
        dev = exp.device
        self._send(
            W.option_reply(
                option, W.REP_INFO, W.info_export(dev.size, self.transmission_flags(exp))
            )
        )
        ss = dev.sector_size
        self._send(
            W.option_reply(option, W.REP_INFO, W.info_block_size(ss, max(ss, 4096), MAX_REQUEST))
        )
        if W.INFO_NAME in req.items:
            self._send(W.option_reply(option, W.REP_INFO, W.info_string(W.INFO_NAME, exp.name)))
        if W.INFO_DESCRIPTION in req.items and exp.description:
            self._send(
                W.option_reply(
                    option, W.REP_INFO, W.info_string(W.INFO_DESCRIPTION, exp.description)
                )
            )
        await self._reply(option, W.REP_ACK)
        if option == W.OPT_GO:
            self.export = exp
            return True
        return None

    async def _meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            await self._reply(option, W.REP_ERR_INVALID, b"structured replies not negotiated")
            return
        try:
            req = W.parse_meta_context_request(data)
        except W.NBDError as exc:
            await self._reply(option, W.REP_ERR_INVALID, str(exc).encode())
            return
        if self._lookup(req.name) is None:
            await self._reply(option, W.REP_ERR_UNKNOWN, f"no export {req.name!r}".encode())
            return
        queries = req.queries
        if option == W.OPT_LIST_META_CONTEXT and not queries:
            queries = ("base:",)
        chosen = any(q in ("base:", W.META_BASE_ALLOCATION) for q in queries)
        if option == W.OPT_SET_META_CONTEXT:
            self.meta_context = chosen
        if chosen:
            ctx = struct.pack(">I", 1) + W.META_BASE_ALLOCATION.encode()
            self._send(W.option_reply(option, W.REP_META_CONTEXT, ctx))
        await self._reply(option, W.REP_ACK)

    # ------------------------------------------------------------------ transmission

    async def _admit(self, nbytes: int) -> None:
        async with self._room:
            await self._room.wait_for(
                lambda: (
                    self._in_flight == 0
                    or (
                        self._in_flight < MAX_IN_FLIGHT
                        and self._in_flight_bytes + nbytes <= MAX_IN_FLIGHT_BYTES
                    )
                )
            )
            self._in_flight += 1
            self._in_flight_bytes += nbytes

    async def _release(self, nbytes: int) -> None:
        async with self._room:
            self._in_flight -= 1
            self._in_flight_bytes -= nbytes
            self._room.notify_all()

    async def transmission(self) -> None:
        assert self.export is not None
        exp = self.export
        try:
            while True:
                try:
                    header = await self.reader.readexactly(W.REQUEST.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        log.warning("nbd %s: connection closed mid-request", self.peer)
                    return
                req = W.parse_request(header)
                if req.type == W.CMD_DISC:
                    return
                if self._stopping:  # no reply: the client sees the connection end under
                    # the request, an error -- never a silent success
                    await self._skip(req.length if req.type == W.CMD_WRITE else 0)
                    continue
                payload_len = req.length if req.type == W.CMD_WRITE else 0
                cost = req.length if req.type in (W.CMD_READ, W.CMD_WRITE) else 0
                if payload_len > MAX_REQUEST:
                    await self._skip(payload_len)
                    self._finish(req, _RequestError(W.EOVERFLOW, "write larger than 32 MiB"))
                    continue
                await self._admit(min(cost, MAX_IN_FLIGHT_BYTES))
                payload = await self.reader.readexactly(payload_len) if payload_len else b""
                task = asyncio.ensure_future(self._run(exp, req, payload, cost))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def _skip(self, n: int) -> None:
        while n:
            chunk = await self.reader.read(min(n, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)

    async def _run(self, exp: Export, req: W.Request, payload: bytes, cost: int) -> None:
        try:
            try:
                data = await self._execute(exp, req, payload)
            except _RequestError as exc:
                self._finish(req, exc)
            except Exception as exc:  # device errors: report, keep the session
                log.warning(
                    "nbd %s: %s at %d+%d failed: %r",
                    self.peer, W.CMD_NAMES.get(req.type, req.type), req.offset, req.length, exc,
                )  # fmt: skip
                self._finish(req, _RequestError(nbd_errno(exc), str(exc)))
            else:
                self._finish(req, None, data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
        finally:
            await self._release(min(cost, MAX_IN_FLIGHT_BYTES))

    def _finish(
        self, req: W.Request, err: _RequestError | None, data: bytes | memoryview | None = None
    ) -> None:
        if self.writer.is_closing():
            return
        cookie = req.cookie
        if err is not None:
            if self.structured:
                self._send(W.structured_error(cookie, err.error, str(err)))
            else:
                self._send(W.simple_reply(cookie, err.error))
            return
        if req.type == W.CMD_READ:
            assert data is not None
            if self.structured:
                if len(data):
                    head = W.structured_data_header(cookie, req.offset, len(data))
                else:
                    head = W.structured_none(cookie)
            else:
                head = W.simple_reply(cookie)
            self.writer.writelines([head, data])
            return
        if req.type == W.CMD_BLOCK_STATUS:
            assert data is not None
            self._send(bytes(data))
            return
        self._send(W.simple_reply(cookie))

    def _check_range(self, dev: BlockDevice, req: W.Request, write: bool) -> None:
        if req.offset + req.length > dev.size:
            raise _RequestError(
                W.ENOSPC if write else W.EINVAL,
                f"{req.offset}+{req.length} is past the end of the export ({dev.size} bytes)",
            )
        if write and dev.readonly:
            raise _RequestError(W.EPERM, "export is read-only")

    async def _execute(
        self, exp: Export, req: W.Request, payload: bytes
    ) -> bytes | memoryview | None:
        dev = exp.device
        kind = req.type
        if kind == W.CMD_READ:
            if req.length > MAX_REQUEST:
                raise _RequestError(W.EOVERFLOW, "read larger than 32 MiB")
            self._check_range(dev, req, False)
            return await read_bytes(dev, req.offset, req.length)
        if kind == W.CMD_WRITE:
            self._check_range(dev, req, True)
            await write_bytes(dev, exp.locks, req.offset, payload)
        elif kind == W.CMD_WRITE_ZEROES:
            self._check_range(dev, req, True)
            await zero_bytes(dev, exp.locks, req.offset, req.length)
        elif kind == W.CMD_TRIM:
            self._check_range(dev, req, True)
            if dev.can_discard:
                await trim_bytes(dev, exp.locks, req.offset, req.length)
        elif kind == W.CMD_FLUSH:
            if dev.can_flush:
                await dev.flush()
            return None
        elif kind == W.CMD_BLOCK_STATUS:
            if not (self.structured and self.meta_context):
                raise _RequestError(W.EINVAL, "no meta context negotiated")
            self._check_range(dev, req, False)
            if req.length == 0:
                raise _RequestError(W.EINVAL, "zero-length block status")
            return W.block_status(req.cookie, 1, [(req.length, 0)])
        else:
            raise _RequestError(W.EINVAL, f"unsupported command {kind}")
        if req.flags & W.CMD_FLAG_FUA and dev.can_flush:
            await dev.flush()
        return None

    async def stop(self, timeout: float = 10.0) -> None:
        """Orderly end of the session (server shutdown): take no new request, let the
        requests in flight finish and their replies go out (bounded by ``timeout``), then
        close the connection.  A client with a request still unanswered sees the
        connection close -- an error, never a silent success."""
        self._stopping = True
        transport = self.writer.transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        with contextlib.suppress(Exception):
            async with asyncio.timeout_at(deadline):
                await self.writer.drain()
        if transport.is_closing():
            return
        if self._tasks:
            transport.abort()  # replies still missing: cut, do not look finished
            return
        # Every reply is out: end our direction (the client reads them all, then EOF) and
        # keep reading -- and ignoring -- until the client closes, so that no unread
        # request makes the kernel reset the connection over replies not yet read.
        with contextlib.suppress(Exception):
            if transport.can_write_eof():
                transport.write_eof()
        try:
            async with asyncio.timeout_at(deadline):
                await self._done.wait()
        except TimeoutError:
            transport.abort()

    async def serve(self) -> None:
        try:
            if await self.handshake():
                await self.transmission()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except W.NBDError as exc:
            log.warning("nbd %s: protocol error: %s; closing", self.peer, exc)
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self._done.set()


# ---------------------------------------------------------------------- byte-level I/O


async def read_bytes(dev: BlockDevice, offset: int, length: int) -> bytes | memoryview:
    """Read any byte range (partial sectors read the covering sectors)."""
    if length == 0:
        return b""
    ss = dev.sector_size
    start = offset - offset % ss
    end = -(-(offset + length) // ss) * ss
    buf = bytearray(end - start)
    await dev.read_into(start // ss, buf)
    if start == offset and end == offset + length:
        return buf  # type: ignore[return-value]
    return memoryview(buf)[offset - start : offset - start + length]


async def write_bytes(dev: BlockDevice, locks: RangeLock, offset: int, data: bytes) -> None:
    """Write any byte range; partial edge sectors are read, modified and written back
    under the range lock."""
    if not data:
        return
    ss = dev.sector_size
    start = offset - offset % ss
    end = -(-(offset + len(data)) // ss) * ss
    async with locks.hold(start, end):
        if start == offset and end == offset + len(data):
            await dev.write(start // ss, data)
            return
        buf = bytearray(end - start)
        head_partial = offset != start
        tail_partial = (offset + len(data)) != end
        if head_partial:
            await dev.read_into(start // ss, memoryview(buf)[:ss])
        if tail_partial and (end - ss >= start + ss or not head_partial):
            await dev.read_into((end - ss) // ss, memoryview(buf)[len(buf) - ss :])
        buf[offset - start : offset - start + len(data)] = data
        await dev.write(start // ss, buf)


async def zero_bytes(dev: BlockDevice, locks: RangeLock, offset: int, length: int) -> None:
    chunk = bytes(min(length, ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(len(chunk), end - offset)
        await write_bytes(dev, locks, offset, chunk[:n])
        offset += n


async def trim_bytes(dev: BlockDevice, locks: RangeLock, offset: int, length: int) -> None:
    """Discard the whole sectors inside the range (trim is advisory; edges are kept)."""
    ss = dev.sector_size
    start = -(-offset // ss) * ss
    end = (offset + length) // ss * ss
    if end <= start:
        return
    async with locks.hold(start, end):
        await dev.discard(start // ss, (end - start) // ss)


# ---------------------------------------------------------------------- server


def parse_listen(spec: str) -> tuple[str, str | int]:
    """``tcp:HOST:PORT``, ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``unix:PATH`` ->
    ``(host, port)`` or ``("unix", path)``; port 0 picks a free one.  ``ValueError``
    naming what is wrong (a port above 65535 is refused, not wrapped around)."""
    if spec.startswith("unix:"):
        if not spec[5:]:
            raise ValueError(f"listen address {spec!r}: expected unix:PATH")
        return "unix", spec[5:]
    if spec.startswith("vchan:"):
        raise ValueError(f"listen address {spec!r}: NBD listens on tcp:HOST:PORT or unix:PATH")
    tcp = spec[4:] if spec.startswith("tcp:") else spec
    host, sep, port = tcp.rpartition(":")
    if not sep or not port.isdecimal():
        raise ValueError(f"listen address {spec!r}: expected [tcp:]HOST:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {spec!r}: write an IPv6 host in brackets: [{host}]:PORT")
    number = int(port)
    if number > 65535:
        raise ValueError(f"listen address {spec!r}: TCP port {number} out of range 0..65535")
    return host or "0.0.0.0", number


def bind_tcp(listen: str) -> socket.socket | None:
    """Bind (and listen on) the TCP address ``listen`` names, for [`start_server`][]'s
    ``sock`` -- so that a port in use fails before any device is connected; ``None`` for
    a Unix address.  ``OSError`` naming the address ("address already in use")."""
    host, addr = parse_listen(listen)
    if isinstance(addr, str):
        return None
    try:
        infos = socket.getaddrinfo(host, addr, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, where = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen(100)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:  # one line naming the address ("address already in use")
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"NBD listen address {listen}: {reason}") from exc
    return sock


class NBDServer:
    """A listening NBD server: asyncio's ``Server`` (``sockets``, ``close``,
    ``wait_closed``, ``async with``, ``serve_forever``) plus [`shutdown`][], and
    ownership of its Unix socket path (`UnixSocketClaim`: removed
    on close only while it is still the one we bound)."""

    def __init__(
        self, server: asyncio.AbstractServer, unix_claim: UnixSocketClaim | None = None
    ) -> None:
        self._server = server
        self.connections: set[NBDConnection] = set()
        self._unix = unix_claim

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(getattr(self._server, "sockets", None) or ())

    def is_serving(self) -> bool:
        return self._server.is_serving()

    def close(self) -> None:
        """Stop listening (sessions go on; see [`shutdown`][])."""
        self._server.close()
        unix, self._unix = self._unix, None
        if unix is not None:
            unix.release()  # unlinks the socket only if it is still the one we bound

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop listening, then end every session in order (`NBDConnection.stop`):
        requests in flight are answered, nothing new is taken, connections close."""
        self.close()
        conns = list(self.connections)
        for c in conns:
            c._stopping = True  # at once: no request read from now on is started
        if conns:
            await asyncio.gather(*(c.stop(timeout) for c in conns), return_exceptions=True)
        await self.wait_closed()

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    exports: Mapping[str, BlockDevice] | list[Export],
    listen: str = "127.0.0.1:10809",
    *,
    default_export: str | None = None,
    on_connection: Callable[[NBDConnection], Awaitable[None]] | None = None,
    sock: socket.socket | None = None,
    max_connections: int | None = None,
) -> NBDServer:
    """Serve ``exports`` (name -> device) over NBD on ``listen``.  The empty export name
    selects ``default_export`` (default: the first export).  A Unix socket path held by a
    live server is refused with ``OSError(EADDRINUSE)``; a dead server's is replaced.
    ``sock``: a TCP socket [`bind_tcp`][] bound for ``listen`` already (the server
    takes it over).  ``max_connections`` (``None``: only the descriptor limit) bounds the
    sessions open at once: one more is closed as soon as it is accepted, before the
    greeting, and logged -- a client opening connections without end cannot take the
    server from the others."""
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    table: dict[str, Export] = {}
    if isinstance(exports, list):
        table = {e.name: e for e in exports}
    else:
        table = {name: Export(name, dev) for name, dev in exports.items()}
    if not table:
        raise ValueError("no exports")
    if default_export is None:
        default_export = next(iter(table))

    conns: set[NBDConnection] = set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if max_connections is not None and len(conns) >= max_connections:
            log.warning(
                "%s: closed at once, %d sessions open (max_connections)",
                writer.get_extra_info("peername") or "a client",
                len(conns),
            )
            writer.transport.abort()
            return
        conn = NBDConnection(table, reader, writer, default_export=default_export)
        conns.add(conn)
        try:
            if on_connection is not None:
                await on_connection(conn)
            await conn.serve()
        finally:
            conns.discard(conn)

    host, addr = parse_listen(listen)
    if sock is not None and not isinstance(addr, str):
        tcp = await asyncio.start_server(client, sock=sock, limit=1 << 20)
        server = NBDServer(tcp)
    elif isinstance(addr, str):
        claim = UnixSocketClaim.acquire(addr, what="aioxen NBD server")  # live: EADDRINUSE
        try:
            sock = claim.bind()
            unix = await asyncio.start_unix_server(client, sock=sock, limit=1 << 20)
        except BaseException:
            claim.release()
            raise
        server = NBDServer(unix, claim)
    else:
        try:
            tcp = await asyncio.start_server(client, host, addr, limit=1 << 20, reuse_address=True)
        except OSError as exc:  # one line naming the address ("address already in use")
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"NBD listen address {listen}: {reason}") from exc
        server = NBDServer(tcp)
    server.connections = conns
    return server


__all__ = [
    "MAX_REQUEST",
    "Export",
    "NBDConnection",
    "NBDServer",
    "RangeLock",
    "bind_tcp",
    "nbd_errno",
    "parse_listen",
    "read_bytes",
    "start_server",
    "trim_bytes",
    "write_bytes",
    "zero_bytes",
]
