"""The asyncio XenStore client (``Platform.store``).

Theory of operation
-------------------
One [`XenStoreClient`][] owns one connection (opened lazily by the first call) over a
transport from [`aioxen.xenstore.transport`][].  Each request gets a fresh 32-bit
``req_id`` and a future in a table; the transport's reader resolves futures as replies
arrive, in any order, so any number of coroutines can have requests in flight at once.
Every request has a timeout (constructor default, per-call override): a server that
never answers raises ``TimeoutError`` naming the operation and path instead of hanging --
the failure mode of pyxs, whose reader thread waits forever on a reply that is not coming.

Watch events are routed by token to [`Watch`][] objects (unknown tokens are ignored).
A watch queues changed paths, coalescing duplicates that have not been consumed yet, so a
slow consumer costs memory proportional to the number of distinct paths, not of events.
The first event, which xenstored fires as soon as the watch is registered, is delivered
like any other.

Transactions: ``async with client.transaction() as tx`` starts one, routes ``tx``'s calls
with its id, commits on normal exit and aborts if the body raises.  A commit that lost a
race raises [`aioxen.xenstore.errors.TransactionConflict`][]; [`transact`][] runs a
body again until it commits (or the retries run out).

If the connection is lost, waiting requests raise ``ConnectionResetError`` and watches
stop with it; the next request opens a new connection.

Identity on the ``unix`` platform: a socket connection to ``aioxen xenstored`` acts as dom0
until its first message, ``CONTROL "aioxen-identify\\0<domid>\\0"``, makes it act as
``domid`` (see [`aioxen.xenstore.server`][]).  For domid 0 nothing is sent, so the same
client works against Xen's own xenstored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from aioxen.errors import ProtocolError
from aioxen.xenstore.errors import TransactionConflict, error_for
from aioxen.xenstore.transport import (
    DEFAULT_XENBUS,
    InProcessTransport,
    SocketTransport,
    Transport,
    XenbusTransport,
    default_socket_path,
)
from aioxen.xenstore.wire import (
    NUL,
    Message,
    Perm,
    PermLike,
    XsType,
    encode_perms,
    encode_write,
    join,
    parse_error,
    parse_perms,
    parse_u32,
    split_reply_strings,
)

if TYPE_CHECKING:
    from aioxen.xenstore.engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0
_UNSET: float = float("nan")
_token_counter = itertools.count(1)
_DRAIN_ABOVE = 1 << 16


class _Expired(Exception):
    """A request's timer fired (turned into ``TimeoutError`` naming the request)."""


def _expire(fut: asyncio.Future[Message]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


def _expire_all(futs: list[asyncio.Future[Message]]) -> None:
    for fut in futs:
        _expire(fut)


def _reply_payload(reply: Message, typ: XsType, op: str, path: str | None) -> bytes:
    """The payload of ``reply`` to a ``typ`` request, or the error it carries."""
    if reply.type == XsType.ERROR:
        name, errnum = parse_error(reply.payload)
        raise error_for(errnum, name, op=op, path=path)
    if reply.type != typ:
        raise ProtocolError(
            f"XenStore {op}: reply type {reply.type_name} to a {typ.name} request",
            field="type",
        )
    return reply.payload


def _path_bytes(path: str | bytes) -> bytes:
    raw = path.encode() if isinstance(path, str) else bytes(path)
    if NUL in raw:
        raise ValueError(f"XenStore path {path!r} contains a NUL byte")
    if not raw:
        raise ValueError("XenStore path is empty")
    return raw


def _path_str(path: str | bytes) -> str:
    return path if isinstance(path, str) else path.decode("utf-8", "surrogateescape")


def _value_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


_Req = tuple[XsType, bytes, str, str | None]
"""A request of a pipelined batch: type, payload, operation name and path (for errors)."""


class Batch:
    """Requests that leave together: one write, one round trip, replies in order.

    Build it with ``client.batch()`` (or ``tx.batch()`` inside a transaction), add
    requests with [`read`][], [`write`][], [`set_perms`][] and [`rm`][] (nothing is sent
    yet; each returns its index), then ``await batch.run()``: the list of results in
    order -- a read's value, the reply's payload for the others -- with a failed request's
    exception *in its place* (not raised), so the caller decides what an error means.
    Every reply is in when ``run`` returns: nothing is left in flight.
    """

    __slots__ = ("_ops", "_requests")

    def __init__(self, ops: _Ops) -> None:
        self._ops = ops
        self._requests: list[_Req] = []

    def __len__(self) -> int:
        return len(self._requests)

    def _add(self, req: _Req) -> int:
        if self._requests and self._requests[-1][0] == XsType.TRANSACTION_END:
            raise RuntimeError("nothing can follow a batch's commit")
        self._requests.append(req)
        return len(self._requests) - 1

    def read(self, path: str | bytes) -> int:
        return self._add((XsType.READ, _path_bytes(path) + NUL, "read", _path_str(path)))

    def write(self, path: str | bytes, value: bytes | bytearray | memoryview | str) -> int:
        raw = encode_write(_path_bytes(path), _value_bytes(value))
        return self._add((XsType.WRITE, raw, "write", _path_str(path)))

    def set_perms(self, path: str | bytes, perms: Sequence[PermLike]) -> int:
        if not perms:
            raise ValueError("set_perms needs at least the owner entry")
        raw = _path_bytes(path) + NUL + encode_perms(perms)
        return self._add((XsType.SET_PERMS, raw, "set_perms", _path_str(path)))

    def rm(self, path: str | bytes) -> int:
        return self._add((XsType.RM, _path_bytes(path) + NUL, "rm", _path_str(path)))

    def commit(self) -> int:
        """A transaction's batch only: end it with a commit, sent after the other
        requests (a conflict is the ``TransactionConflict`` in its place).  Only for
        requests whose failure leaves nothing worth aborting -- the commit does not wait
        for them.  The transaction counts as finished from ``run`` on."""
        if not isinstance(self._ops, Transaction):
            raise TypeError("only a transaction's batch can commit")
        return self._add((XsType.TRANSACTION_END, b"T\x00", "commit", None))

    async def run(self, *, timeout: float | None = _UNSET) -> list[bytes | Exception]:
        """Send the requests (once) and return their results in order (see the class)."""
        requests, self._requests = self._requests, []
        if not requests:
            return []
        return await self._ops._run_batch(requests, timeout)


class _Ops:
    """The path operations shared by the client and a transaction."""

    _tx_id = 0

    async def _call(
        self, typ: XsType, payload: bytes, *, op: str, path: str | None, timeout: float | None
    ) -> bytes:
        raise NotImplementedError

    async def _run_batch(
        self, requests: list[_Req], timeout: float | None
    ) -> list[bytes | Exception]:
        raise NotImplementedError

    def batch(self) -> Batch:
        """A [`Batch`][] of requests to pipeline (in this transaction, for a transaction)."""
        return Batch(self)

    async def read(self, path: str | bytes, *, timeout: float | None = _UNSET) -> bytes:
        """The value at ``path`` (``FileNotFoundError`` if there is no such node)."""
        return await self._call(
            XsType.READ, _path_bytes(path) + NUL, op="read", path=_path_str(path), timeout=timeout
        )

    async def write(
        self,
        path: str | bytes,
        value: bytes | bytearray | memoryview | str,
        *,
        timeout: float | None = _UNSET,
    ) -> None:
        """Set ``path`` to ``value``, creating it and missing parents."""
        await self._call(
            XsType.WRITE,
            encode_write(_path_bytes(path), _value_bytes(value)),
            op="write",
            path=_path_str(path),
            timeout=timeout,
        )

    async def mkdir(self, path: str | bytes, *, timeout: float | None = _UNSET) -> None:
        """Make sure ``path`` exists (an existing value is left alone)."""
        await self._call(
            XsType.MKDIR, _path_bytes(path) + NUL, op="mkdir", path=_path_str(path), timeout=timeout
        )

    async def rm(self, path: str | bytes, *, timeout: float | None = _UNSET) -> None:
        """Remove ``path`` and everything below it (no error if it does not exist)."""
        await self._call(
            XsType.RM, _path_bytes(path) + NUL, op="rm", path=_path_str(path), timeout=timeout
        )

    async def directory(self, path: str | bytes, *, timeout: float | None = _UNSET) -> list[str]:
        """Names of the children of ``path`` (long listings use DIRECTORY_PART)."""
        spath = _path_str(path)
        raw = _path_bytes(path)
        try:
            payload = await self._call(
                XsType.DIRECTORY, raw + NUL, op="directory", path=spath, timeout=timeout
            )
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
            return await self._directory_part(raw, spath, timeout)
        return [name.decode("utf-8", "surrogateescape") for name in split_reply_strings(payload)]

    async def _directory_part(self, raw: bytes, spath: str, timeout: float | None) -> list[str]:
        for _attempt in range(8):
            listing = b""
            generation: bytes | None = None
            offset = 0
            while True:
                payload = await self._call(
                    XsType.DIRECTORY_PART,
                    join(raw, str(offset)),
                    op="directory",
                    path=spath,
                    timeout=timeout,
                )
                gen, _, chunk = payload.partition(NUL)
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break  # the directory changed under us: start over
                listing += chunk
                offset += len(chunk)
                if len(chunk) <= 1 or chunk.endswith(b"\x00\x00"):
                    names = split_reply_strings(listing[:-1] if listing else listing)
                    return [n.decode("utf-8", "surrogateescape") for n in names if n]
        raise TransactionConflict(errno.EAGAIN, op="directory", path=spath)

    async def exists(self, path: str | bytes, *, timeout: float | None = _UNSET) -> bool:
        """True if ``path`` exists (readable or not is not asked: EACCES raises)."""
        try:
            await self.read(path, timeout=timeout)
        except FileNotFoundError:
            return False
        return True

    async def get_perms(self, path: str | bytes, *, timeout: float | None = _UNSET) -> list[Perm]:
        """The permission list of ``path``: owner (and default access) first."""
        payload = await self._call(
            XsType.GET_PERMS,
            _path_bytes(path) + NUL,
            op="get_perms",
            path=_path_str(path),
            timeout=timeout,
        )
        return list(parse_perms(split_reply_strings(payload)))

    async def set_perms(
        self, path: str | bytes, perms: Sequence[PermLike], *, timeout: float | None = _UNSET
    ) -> None:
        """Replace the permission list of ``path`` (``Perm`` objects or ``"n0"``, ``"r2"``)."""
        if not perms:
            raise ValueError("set_perms needs at least the owner entry")
        await self._call(
            XsType.SET_PERMS,
            _path_bytes(path) + NUL + encode_perms(perms),
            op="set_perms",
            path=_path_str(path),
            timeout=timeout,
        )


class Transaction(_Ops):
    """An open transaction; use via ``async with client.transaction() as tx``."""

    def __init__(self, client: XenStoreClient, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout
        self._tx_id = 0
        self._finished = False

    @property
    def tx_id(self) -> int:
        return self._tx_id

    async def _call(
        self, typ: XsType, payload: bytes, *, op: str, path: str | None, timeout: float | None
    ) -> bytes:
        if self._tx_id == 0 or self._finished:
            raise RuntimeError("transaction is not open")
        return await self._client._request(
            typ, payload, tx_id=self._tx_id, op=op, path=path, timeout=timeout
        )

    async def _run_batch(
        self, requests: list[_Req], timeout: float | None
    ) -> list[bytes | Exception]:
        if self._tx_id == 0 or self._finished:
            raise RuntimeError("transaction is not open")
        if requests[-1][0] == XsType.TRANSACTION_END:
            self._finished = True  # committed by this batch (not again on exit)
        return await self._client._many_results(requests, timeout, self._tx_id)

    async def start(self) -> Self:
        payload = await self._client._request(
            XsType.TRANSACTION_START, NUL, op="transaction_start", path=None, timeout=self._timeout
        )
        try:
            self._tx_id = parse_u32(payload.rstrip(NUL), "transaction id")
        except ProtocolError as exc:
            raise ProtocolError(f"XenStore TRANSACTION_START reply: {exc}", field="tx_id") from None
        if self._tx_id == 0:
            raise ProtocolError("XenStore allocated transaction id 0", field="tx_id")
        return self

    async def _end(self, commit: bool) -> None:
        if self._finished:
            return
        self._finished = True
        await self._client._request(
            XsType.TRANSACTION_END,
            b"T\x00" if commit else b"F\x00",
            tx_id=self._tx_id,
            op="commit" if commit else "abort",
            path=None,
            timeout=self._timeout,
        )

    async def commit(self) -> None:
        """Commit; ``TransactionConflict`` if another writer got in first."""
        await self._end(True)

    async def abort(self) -> None:
        await self._end(False)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.commit()
        elif not self._finished:
            # Best effort; the server also drops it when the connection goes.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._end(False))


class Watch:
    """A registered watch; ``async for changed_path in watch``.

    Use as ``async with client.watch(path) as w``.  Paths come back as strings, relative if
    the watch path was relative.  Iteration raises ``ConnectionResetError`` if the
    connection is lost and ends after [`close`][].
    """

    def __init__(self, client: XenStoreClient, path: str | bytes, token: bytes | None) -> None:
        self._client = client
        self.path = _path_str(path)
        self._raw_path = _path_bytes(path)
        self.token = token or f"aioxen-{next(_token_counter)}".encode()
        self._pending: dict[str, None] = {}
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None
        self._registered = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<Watch {self.path!r} token={self.token!r}>"

    def _event(self, path: str) -> None:
        self._pending[path] = None
        self._wakeup.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wakeup.set()

    async def next(self, timeout: float | None = None) -> str:
        """The next changed path; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not self._pending:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise StopAsyncIteration
                self._wakeup.clear()
                await self._wakeup.wait()
        path = next(iter(self._pending))
        del self._pending[path]
        return path

    def pending(self) -> list[str]:
        """Changed paths already queued (without waiting or consuming them)."""
        return list(self._pending)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        return await self.next()

    async def start(self) -> Self:
        await self._client._add_watch(self)
        self._registered = True
        return self

    async def close(self) -> None:
        """Unregister (idempotent).  Pending iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._registered:
            self._registered = False
            await self._client._remove_watch(self)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class XenStoreClient(_Ops):
    """An asyncio XenStore client.  Build it with one of the ``for_*`` constructors."""

    def __init__(
        self,
        transport_factory: Callable[[], Transport],
        *,
        domid: int | None = None,
        identify: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        where: str = "xenstore",
    ) -> None:
        self._factory = transport_factory
        self._domid = domid
        self._identify = identify
        self.timeout = timeout
        self.where = where
        self._transport: Transport | None = None
        self._open_lock: asyncio.Lock | None = None
        self._limit: asyncio.Semaphore | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._watches: dict[bytes, Watch] = {}
        self._next_req = random.randrange(1, 1 << 31)
        self._closed = False

    # -- constructors ----------------------------------------------------------------

    @classmethod
    def for_unix_socket(
        cls, path: str | None = None, domid: int = 0, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> XenStoreClient:
        """A client of the xenstored socket at ``path`` (default ``$XENSTORED_PATH``, else
        ``/var/run/xenstored/socket``) acting as ``domid``.  Connects on first use; for a
        non-zero ``domid`` the first message is the ``aioxen-identify`` control."""
        sock = path or default_socket_path()
        return cls(
            lambda: SocketTransport(sock),
            domid=domid,
            identify=domid != 0,
            timeout=timeout,
            where=sock,
        )

    @classmethod
    def for_xenbus(
        cls,
        device: str = DEFAULT_XENBUS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        opener: Callable[[str], int] | None = None,
    ) -> XenStoreClient:
        """A client of the Linux ``/dev/xen/xenbus`` device (inside a Xen guest).

        ``opener(device) -> fd`` replaces ``os.open`` (tests give it a socket standing in
        for the kernel)."""
        return cls(lambda: XenbusTransport(device, opener), timeout=timeout, where=device)

    @classmethod
    def in_process(
        cls, engine: Engine, domid: int, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> XenStoreClient:
        """A client of an in-process `Engine`."""
        return cls(
            lambda: InProcessTransport(engine, domid),
            domid=domid,
            timeout=timeout,
            where=f"in-process xenstore (domid {domid})",
        )

    @property
    def domid(self) -> int | None:
        """The domid this client acts as, if known (``None`` over xenbus)."""
        return self._domid

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def __repr__(self) -> str:
        return f"<XenStoreClient {self.where} domid={self._domid}>"

    # -- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection now (otherwise the first request does)."""
        await self._ensure_open(self.timeout)

    async def _ensure_open(self, timeout: float | None) -> Transport:
        transport = self._transport
        if transport is not None:
            return transport
        if self._closed:
            raise ConnectionResetError(f"XenStore client for {self.where} is closed")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._transport is not None:
                return self._transport
            transport = self._factory()
            async with asyncio.timeout(timeout):
                await transport.open(self._on_message, lambda exc: self._on_lost(transport, exc))
            self._transport = transport
            limit = transport.max_in_flight
            self._limit = asyncio.Semaphore(limit) if limit else None
            if self._identify and self._domid:
                try:
                    await self._request(
                        XsType.CONTROL,
                        join("aioxen-identify", str(self._domid)),
                        op="identify",
                        path=None,
                        timeout=timeout,
                    )
                except BaseException:
                    self._transport = None
                    await transport.close()
                    raise
            return transport

    def _on_message(self, msg: Message) -> None:
        if msg.type == XsType.WATCH_EVENT:
            parts = split_reply_strings(msg.payload)
            if len(parts) < 2:
                log.warning("%s: malformed watch event %r ignored", self.where, msg.payload)
                return
            watch = self._watches.get(parts[1])
            if watch is not None:
                watch._event(parts[0].decode("utf-8", "surrogateescape"))
            return
        fut = self._pending.pop(msg.req_id, None)
        if fut is None:
            log.debug("%s: reply to unknown req_id %d ignored", self.where, msg.req_id)
        elif not fut.done():
            fut.set_result(msg)

    def _on_lost(self, transport: Transport, exc: BaseException | None) -> None:
        if self._transport is transport:
            self._transport = None
        err: BaseException
        if isinstance(exc, ProtocolError):
            err = exc
        else:
            err = ConnectionResetError(
                f"XenStore connection to {self.where} lost" + (f": {exc}" if exc else "")
            )
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for watch in self._watches.values():
            watch._fail(err)
        self._watches.clear()

    async def close(self) -> None:
        """Close the connection (idempotent).  Waiting requests raise ConnectionResetError."""
        self._closed = True
        for watch in list(self._watches.values()):
            watch._closed = True
            watch._wakeup.set()
        self._watches.clear()  # closed by us: their iteration ends, it does not fail
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()
            self._on_lost(transport, None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- requests --------------------------------------------------------------------

    def _new_req_id(self) -> int:
        while True:
            self._next_req = (self._next_req + 1) & 0xFFFFFFFF
            if self._next_req not in self._pending:
                return self._next_req

    async def _request(
        self,
        typ: XsType,
        payload: bytes,
        *,
        tx_id: int = 0,
        op: str,
        path: str | None,
        timeout: float | None = _UNSET,
    ) -> bytes:
        if timeout is not None and timeout != timeout:  # _UNSET is NaN
            timeout = self.timeout
        transport = self._transport
        if transport is None or self._limit is not None:
            reply = await self._request_slow(typ, payload, tx_id, op, path, timeout)
        else:
            # Fast path (connected socket or in-process): one future, one timer.
            loop = asyncio.get_running_loop()
            req_id = self._new_req_id()
            fut: asyncio.Future[Message] = loop.create_future()
            self._pending[req_id] = fut
            timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
            try:
                transport.send(Message(typ, req_id, tx_id, payload))
                if transport.backlog() > _DRAIN_ABOVE:
                    async with asyncio.timeout(timeout):
                        await transport.drain()
                reply = await fut
            except (_Expired, TimeoutError):
                raise self._timeout_error(op, path, timeout) from None
            finally:
                if timer is not None:
                    timer.cancel()
                if self._pending.get(req_id) is fut:
                    del self._pending[req_id]
        return _reply_payload(reply, typ, op, path)

    async def read_many(
        self, paths: Sequence[str | bytes], *, timeout: float | None = _UNSET
    ) -> list[bytes]:
        """The values at ``paths``, read pipelined (the requests leave back to back: one
        round trip).  The first error is raised once every reply is in."""
        return await self._many(
            [(XsType.READ, _path_bytes(p) + NUL, "read", _path_str(p)) for p in paths], timeout
        )

    async def write_many(
        self,
        items: Sequence[tuple[str | bytes, bytes | bytearray | memoryview | str]],
        *,
        timeout: float | None = _UNSET,
    ) -> None:
        """Write ``(path, value)`` pairs pipelined, in order (one round trip).  The first
        error is raised once every reply is in."""
        await self._many(
            [
                (XsType.WRITE, encode_write(_path_bytes(p), _value_bytes(v)), "write", _path_str(p))
                for p, v in items
            ],
            timeout,
        )

    async def _many(
        self, requests: list[_Req], timeout: float | None, tx_id: int = 0
    ) -> list[bytes]:
        """[`_many_results`][] raising the first error (once every reply is in)."""
        results = await self._many_results(requests, timeout, tx_id)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return cast(list[bytes], results)

    async def _many_results(
        self, requests: list[_Req], timeout: float | None, tx_id: int = 0
    ) -> list[bytes | Exception]:
        """Send ``requests`` (type, payload, op, path) back to back -- in one write where
        the transport can -- and collect their replies (or errors) in order, without a
        task per request (kept dense for the vchan set-up path, which pipelines its
        reads and writes)."""
        if timeout is not None and timeout != timeout:  # _UNSET is NaN
            timeout = self.timeout
        transport = self._transport
        results: list[Any] = []
        if transport is None or self._limit is not None:  # connect first / in-flight limit
            results = await asyncio.gather(
                *(
                    self._request(t, p, tx_id=tx_id, op=o, path=pa, timeout=timeout)
                    for t, p, o, pa in requests
                ),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, Exception):
                    raise r  # a cancellation is not a result
        else:
            loop = asyncio.get_running_loop()
            sent: list[tuple[int, asyncio.Future[Message]]] = []
            timer = None
            try:
                msgs = []
                for typ, payload, _op, _path in requests:
                    req_id = self._new_req_id()
                    fut: asyncio.Future[Message] = loop.create_future()
                    self._pending[req_id] = fut
                    sent.append((req_id, fut))
                    msgs.append(Message(typ, req_id, tx_id, payload))
                send_many = getattr(transport, "send_many", None)
                if send_many is not None:
                    send_many(msgs)
                else:
                    for msg in msgs:
                        transport.send(msg)
                if timeout is not None:
                    timer = loop.call_later(timeout, _expire_all, [f for _, f in sent])
                if transport.backlog() > _DRAIN_ABOVE:
                    async with asyncio.timeout(timeout):
                        await transport.drain()
                for (typ, _payload, op, path), (_req_id, fut) in zip(requests, sent, strict=True):
                    try:
                        results.append(_reply_payload(await fut, typ, op, path))
                    except _Expired:
                        results.append(self._timeout_error(op, path, timeout))
                    except Exception as exc:
                        results.append(exc)
            except TimeoutError:  # the drain
                op, path = requests[0][2], requests[0][3]
                raise self._timeout_error(op, path, timeout) from None
            finally:
                if timer is not None:
                    timer.cancel()
                for req_id, fut in sent:
                    if self._pending.get(req_id) is fut:
                        del self._pending[req_id]
        return results

    def _timeout_error(self, op: str, path: str | None, timeout: float | None) -> TimeoutError:
        what = f" {path!r}" if path is not None else ""
        return TimeoutError(f"XenStore {op}{what} on {self.where}: no reply within {timeout} s")

    async def _request_slow(
        self,
        typ: XsType,
        payload: bytes,
        tx_id: int,
        op: str,
        path: str | None,
        timeout: float | None,
    ) -> Message:
        """Connect first if needed, and respect the transport's in-flight limit."""
        try:
            async with asyncio.timeout(timeout):
                transport = await self._ensure_open(timeout)
                if self._limit is not None:
                    async with self._limit:
                        return await self._roundtrip(transport, typ, payload, tx_id)
                return await self._roundtrip(transport, typ, payload, tx_id)
        except TimeoutError:
            raise self._timeout_error(op, path, timeout) from None

    async def _roundtrip(
        self, transport: Transport, typ: XsType, payload: bytes, tx_id: int
    ) -> Message:
        req_id = self._new_req_id()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            transport.send(Message(typ, req_id, tx_id, payload))
            if transport.backlog() > _DRAIN_ABOVE:
                await transport.drain()
            return await fut
        finally:
            if self._pending.get(req_id) is fut:
                del self._pending[req_id]

    async def _call(
        self, typ: XsType, payload: bytes, *, op: str, path: str | None, timeout: float | None
    ) -> bytes:
        return await self._request(typ, payload, op=op, path=path, timeout=timeout)

    async def _run_batch(
        self, requests: list[_Req], timeout: float | None
    ) -> list[bytes | Exception]:
        return await self._many_results(requests, timeout)

    # -- transactions ----------------------------------------------------------------

    def transaction(self, *, timeout: float | None = _UNSET) -> Transaction:
        """``async with client.transaction() as tx:`` -- commit on exit, abort on error."""
        if timeout is not None and timeout != timeout:
            timeout = self.timeout
        return Transaction(self, timeout)

    async def transact(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        retries: int = 16,
        timeout: float | None = _UNSET,
    ) -> T:
        """Run ``await fn(tx)`` in a transaction, again after each ``TransactionConflict``
        (up to ``retries`` more times, with a short random backoff); returns its result."""
        for attempt in itertools.count():
            try:
                async with self.transaction(timeout=timeout) as tx:
                    result = await fn(tx)
                return result
            except TransactionConflict:
                if attempt >= retries:
                    raise
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- watches ---------------------------------------------------------------------

    def watch(self, path: str | bytes, *, token: bytes | str | None = None) -> Watch:
        """``async with client.watch(path) as w: async for changed in w: ...``"""
        raw_token = token.encode() if isinstance(token, str) else token
        return Watch(self, path, raw_token)

    async def _add_watch(self, watch: Watch) -> None:
        if watch.token in self._watches:
            raise ValueError(f"watch token {watch.token!r} already in use on this client")
        await self._ensure_open(self.timeout)
        self._watches[watch.token] = watch
        try:
            await self._request(
                XsType.WATCH, join(watch._raw_path, watch.token), op="watch", path=watch.path
            )
        except BaseException:
            self._watches.pop(watch.token, None)
            raise

    async def _remove_watch(self, watch: Watch) -> None:
        if self._watches.get(watch.token) is not watch:
            return  # connection lost or client closed: the server forgot it already
        del self._watches[watch.token]
        with contextlib.suppress(ConnectionError):
            await self._request(
                XsType.UNWATCH, join(watch._raw_path, watch.token), op="unwatch", path=watch.path
            )

    # -- domains and control ---------------------------------------------------------

    async def get_domain_path(self, domid: int, *, timeout: float | None = _UNSET) -> str:
        payload = await self._request(
            XsType.GET_DOMAIN_PATH,
            join(str(domid)),
            op="get_domain_path",
            path=None,
            timeout=timeout,
        )
        return payload.rstrip(NUL).decode()

    async def is_domain_introduced(self, domid: int, *, timeout: float | None = _UNSET) -> bool:
        payload = await self._request(
            XsType.IS_DOMAIN_INTRODUCED,
            join(str(domid)),
            op="is_domain_introduced",
            path=None,
            timeout=timeout,
        )
        return payload.rstrip(NUL) == b"T"

    async def introduce(
        self, domid: int, mfn: int = 0, port: int = 0, *, timeout: float | None = _UNSET
    ) -> None:
        await self._request(
            XsType.INTRODUCE,
            join(str(domid), str(mfn), str(port)),
            op="introduce",
            path=None,
            timeout=timeout,
        )

    async def release(self, domid: int, *, timeout: float | None = _UNSET) -> None:
        await self._request(
            XsType.RELEASE, join(str(domid)), op="release", path=None, timeout=timeout
        )

    async def set_target(self, domid: int, target: int, *, timeout: float | None = _UNSET) -> None:
        await self._request(
            XsType.SET_TARGET,
            join(str(domid), str(target)),
            op="set_target",
            path=None,
            timeout=timeout,
        )

    async def control(self, *args: str | bytes, timeout: float | None = _UNSET) -> bytes:
        """Send a CONTROL command; returns the reply payload without its final NUL."""
        payload = await self._request(
            XsType.CONTROL, join(*args), op="control", path=None, timeout=timeout
        )
        return payload[:-1] if payload.endswith(NUL) else payload


__all__ = [
    "DEFAULT_TIMEOUT",
    "Batch",
    "Perm",
    "Transaction",
    "Watch",
    "XenStoreClient",
    "default_socket_path",
]
