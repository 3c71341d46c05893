"""Unix event channels: one Unix-domain stream socket per bound port, one byte per event.

Theory of operation
-------------------
Files, under ``$XEN_ROOT/evtchn/<domid>/`` (directories 0700, files 0600):

* ``next-port`` — the domain's port counter (decimal text).  Every port a domain uses,
  listening or connecting, is taken from it under an exclusive ``flock``, so ports are unique
  within a domain even when several processes play that domid.  Ports start at 1 and are
  never reused while the root exists, so a stale socket can never be mistaken for a new one.
* ``<port>.<offered-domid>`` — the listening socket of an *unbound* port ``<port>`` that
  domain ``<offered-domid>`` may connect to.  It exists from ``listen`` until a peer is
  accepted (or the channel closes); then it is unlinked, so a port accepts exactly one peer.

``listen(remote_domid)`` allocates a port, binds and ``listen``\\ s (backlog 8) right away and
watches the socket with ``loop.add_reader``: a peer can connect before the listener's loop
ever runs, the kernel queues it.  ``connect(remote_domid, port)`` connects to
``<port>.<own domid>``; if only ``<port>.<other>`` exists the port was offered to someone
else (``PermissionError``); if nothing (or a stale socket from a dead process) answers,
``ConnectionRefusedError``.  A port binds exactly one peer even when several connectors
race for it (say, vchan clients in different processes answering one advertisement): the
connector first *claims* the port by atomically renaming ``<port>.<own domid>`` to a private
name, connects through that name and unlinks it.  Only one ``rename`` can succeed; the
losers find no socket and get ``ConnectionRefusedError`` at once, exactly as for a port that
is already bound.  The connector then sends a 12-byte hello ``"AXEV", u16 version,
u16 domid, u32 own port`` (little endian).  The listener accepts one connection, checks the
hello (magic, version, announced domid == offered domid — a mismatch is dropped and the port
keeps listening), then closes and unlinks its listening socket.

After that every notification is one byte (value irrelevant) sent with ``MSG_DONTWAIT``: if
the socket buffer is full the peer has plenty of unread notifications already, so dropping the
byte only coalesces.  The receiving fd is an asyncio reader; each readiness callback does one
``recv`` of everything available and reports one batch to
[`ChannelCore`][aioxen.platforms._channel.ChannelCore].

Doorbells.  A socket byte costs the sender an skb and the receiver a ``recv``; an ``eventfd``
(a pipe where there is none) is several times cheaper to ring.  So once connected, each end
makes a *doorbell* -- an ``eventfd`` it watches with ``loop.add_reader`` (or a pipe's read
end) -- and passes its ringing end to the peer over the socket (one byte ``D`` with
``SCM_RIGHTS``).  From the moment an end has received the peer's doorbell it notifies by
ringing it (``eventfd_write`` of 1, or one byte into the pipe; ``EAGAIN`` only coalesces)
instead of sending a byte (a channel made when many fds are open already --
[`doorbell_fd_limit`][] -- keeps to socket bytes).  Semantics are unchanged: any byte
or doorbell reading is one batch, so the switch-over loses or reorders nothing, and a
peer that passes no doorbell (or anything that is neither an eventfd nor a pipe) is simply
notified by socket bytes.  The socket stays
the channel: its EOF still reports the peer gone.  EOF — the peer closed, or its process died
(SIGKILL closes its sockets too) — reports the peer gone, which wakes waiters with
``ConnectionResetError`` and calls the handler with ``peer_lost`` true.  A listener that
``notify``\\ s before its peer is accepted remembers it and sends one byte on acceptance.

Unix socket paths are limited to ~108 bytes; longer ones are reached through
``/proc/self/fd/<dirfd>/<name>`` (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import itertools
import os
import resource
import socket
import stat
import struct
import threading
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aioxen.errors import PortNotOfferedError
from aioxen.platforms._channel import ChannelCore
from aioxen.platforms._rootdir import RootPermissionError, describe, open_file
from aioxen.platforms._unix_death import ClearSpec, clear_for_dead_peer, record_path, write_record
from aioxen.platforms.base import check_domid

if TYPE_CHECKING:
    from aioxen.platforms.unix import UnixPlatform

HELLO = struct.Struct("<4sHHI")
HELLO_MAGIC = b"AXEV"
HELLO_VERSION = 1
PORT_COUNTER = "next-port"
LISTEN_BACKLOG = 8
RECV_SIZE = 65536
_recv_buffers = threading.local()  # one receive buffer per thread (each loop has one thread)


def _recv_buffer() -> memoryview:
    buf: memoryview | None = getattr(_recv_buffers, "buf", None)
    if buf is None:
        buf = _recv_buffers.buf = memoryview(bytearray(RECV_SIZE))
    return buf


_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_ANC_SIZE = socket.CMSG_SPACE(4 * 4)  # room for a few fds; extra ones are closed
DOORBELL_BYTE = b"D"
_NO_FDS: list[int] = []  # (never modified) "read with recv_into, no fds possible"


@functools.cache
def doorbell_fd_limit() -> int:
    """Doorbells cost two fds per channel: none is made once a channel's socket fd number
    (about the number of fds open) reaches a quarter of the soft ``RLIMIT_NOFILE``, so many
    channels under a default limit of 1,024 stay within it (they use socket bytes)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft // 4 if soft > 0 else 1 << 30


def make_doorbell() -> tuple[int, int]:
    """A doorbell: ``(fd to watch, fd to ring)`` -- one non-blocking ``eventfd`` for both
    where the system has it, else a non-blocking pipe."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    r, w = os.pipe()
    for fd in (r, w):
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    return r, w


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array("i")
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
            fds.extend(got)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    return fds


_MAX_SUN_PATH = 100
_claims = itertools.count()


class _State(enum.Enum):
    LISTENING = "listening"
    HELLO = "awaiting-hello"
    CONNECTED = "connected"
    CLOSED = "closed"


@contextlib.contextmanager
def socket_address(path: str) -> Iterator[str]:
    """A ``sun_path`` naming ``path``: itself if short enough, else a ``/proc/self/fd`` alias
    through an open directory fd (valid inside the ``with``)."""
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        yield path
        return
    dirname, name = os.path.split(path)
    dfd = os.open(dirname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{name}"
    finally:
        os.close(dfd)


def open_port_counter(domain_dir: str) -> int:
    """Open (creating it) the port counter of the domain whose evtchn directory is
    ``domain_dir``; pass the fd to [`take_port`][]."""
    return open_file(os.path.join(domain_dir, PORT_COUNTER), os.O_RDWR | os.O_CREAT)


def take_port(counter_fd: int) -> int:
    """Take the next port number from an open port counter (under ``LOCK_EX``)."""
    fcntl.flock(counter_fd, fcntl.LOCK_EX)
    try:
        text = os.pread(counter_fd, 64, 0).strip()
        port = int(text) if text else 1
        os.pwrite(counter_fd, f"{port + 1:<20d}\n".encode(), 0)
        return port
    finally:
        fcntl.flock(counter_fd, fcntl.LOCK_UN)


def allocate_port(domain_dir: str) -> int:
    """Take the next port number of the domain whose evtchn directory is ``domain_dir``."""
    fd = open_port_counter(domain_dir)
    try:
        return take_port(fd)
    finally:
        os.close(fd)


def listening_offers(domain_dir: str, port: int) -> list[int]:
    """The domids that unbound port ``port`` in ``domain_dir`` is currently offered to."""
    prefix = f"{port}."
    out = []
    try:
        names = os.listdir(domain_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            out.append(int(name[len(prefix) :]))
    return out


def _check_is_socket(path: str, name: str) -> None:
    """Refuse to connect through ``path`` (the claimed ``name``) unless it is a socket:
    ``connect`` follows links, and the root holds nothing but our own sockets."""
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise RootPermissionError(
            errno.EPERM,
            f"refusing to connect to {name}: not a socket ({describe(st)}"
            f"{', a symbolic link' if stat.S_ISLNK(st.st_mode) else ''}); "
            f"nothing but event channel sockets belongs there",
        )


def _chmod_socket(path: str) -> None:
    """``chmod 0600`` the socket we just bound at ``path`` -- never through a link."""
    if stat.S_ISSOCK(os.lstat(path).st_mode):
        os.chmod(path, 0o600)


class UnixEventChannel(ChannelCore):
    """One end of a Unix-socket event channel."""

    def __init__(
        self,
        owner: UnixEventChannels,
        loop: asyncio.AbstractEventLoop,
        port: int,
        remote_domid: int,
        *,
        listener: socket.socket | None = None,
        listen_path: str | None = None,
        conn: socket.socket | None = None,
        remote_port: int | None = None,
    ) -> None:
        super().__init__(loop, port, remote_domid, owner.domid)
        self._owner: UnixEventChannels | None = owner
        self._lsock = listener
        self._listen_path = listen_path
        self._conn = conn
        self._remote_port = remote_port
        self._hello = b""
        self._deferred_notify = False
        self._death_clears: dict[int, ClearSpec] = {}
        self._bell: int | None = None  # our doorbell's watched fd (see Doorbells)
        self._peer_bell: int | None = None  # the peer's doorbell, once it passed it
        self._peer_bell_is_pipe = False
        if listener is not None:
            self._state = _State.LISTENING
            loop.add_reader(listener.fileno(), self._on_acceptable)
        else:
            assert conn is not None
            self._state = _State.CONNECTED
            loop.add_reader(conn.fileno(), self._on_readable)
            self._offer_doorbell()

    @property
    def remote_port(self) -> int | None:
        """The peer's port, once known (connector: always; listener: after the hello)."""
        return self._remote_port

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def listen_path(self) -> str | None:
        """The listening socket's path while the port is unbound."""
        return self._listen_path if self._state is _State.LISTENING else None

    # -- sending -------------------------------------------------------------------------
    def notify(self) -> None:
        conn = self._conn
        if self._state is _State.CONNECTED:
            if conn is None:
                return  # peer gone
            bell = self._peer_bell
            if bell is not None:
                try:
                    if self._peer_bell_is_pipe:
                        os.write(bell, b"\x01")
                    else:
                        os.eventfd_write(bell, 1)
                except OSError:
                    pass  # EAGAIN: the doorbell is rung already (coalesces); else peer gone
                return
            try:
                conn.send(b"\x01", _SEND_FLAGS)
            except BlockingIOError:
                pass  # the peer has unread notifications queued: this one coalesces
            except OSError:
                pass  # the peer is gone; the EOF on our reader reports it
        elif self._state is not _State.CLOSED:
            self._deferred_notify = True

    # -- doorbells (see the module docstring) ---------------------------------------------
    def _offer_doorbell(self) -> None:
        """Connected: make our doorbell, watch it, pass its ringing end to the peer."""
        conn = self._conn
        if conn is None or self._bell is not None or conn.fileno() >= doorbell_fd_limit():
            return
        watch, ring = make_doorbell()
        try:
            conn.sendmsg(
                [DOORBELL_BYTE],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [ring]).tobytes())],
                _SEND_FLAGS,
            )
        except OSError:  # no room or the peer is gone: it keeps getting socket bytes
            os.close(watch)
            if ring != watch:
                os.close(ring)
            return
        if ring != watch:
            os.close(ring)  # the peer holds the write end now
        self._bell = watch
        self._loop.add_reader(watch, self._on_doorbell)

    def _adopt_doorbell(self, fds: list[int]) -> None:
        """Keep the first fd the peer passed as its doorbell if it is one; close the rest."""
        for fd in fds:
            if self._peer_bell is None and self._state is _State.CONNECTED:
                try:
                    pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
                except OSError:
                    pipe = False
                if pipe or _is_eventfd(fd):
                    os.set_blocking(fd, False)
                    self._peer_bell = fd
                    self._peer_bell_is_pipe = pipe
                    continue
            os.close(fd)

    def _on_doorbell(self) -> None:
        bell = self._bell
        if bell is None:
            return
        try:
            os.read(bell, 4096)  # an eventfd's counter (8 bytes), or the pipe's bytes
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        self._events_arrived()

    def _close_doorbells(self) -> None:
        bell, self._bell = self._bell, None
        if bell is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._loop.remove_reader(bell)
            os.close(bell)
        peer, self._peer_bell = self._peer_bell, None
        if peer is not None:
            os.close(peer)

    # -- unmap notification on process death (see aioxen.platforms._unix_death) ----------
    def add_death_clear(self, spec: ClearSpec) -> int:
        """Record that if this process dies, the peer is to clear the byte ``spec`` names
        (then deliver an event).  Returns a token for [`withdraw_death_clear`][]."""
        token = next(_claims)
        self._death_clears[token] = spec
        self._write_death_record()
        return token

    def withdraw_death_clear(self, token: int) -> None:
        if self._death_clears.pop(token, None) is not None:
            self._write_death_record()

    def _death_record(self) -> str | None:
        owner = self._owner
        if owner is None:
            return None
        return record_path(owner.domain_dir(owner.domid), self._port)

    def _write_death_record(self) -> None:
        path = self._death_record()
        if path is not None and self._state is not _State.CLOSED:
            write_record(path, list(self._death_clears.values()))

    def _peer_died(self) -> None:
        """EOF: perform the dead peer's recorded notifications, then report it gone."""
        owner = self._owner
        if owner is not None and self._remote_port is not None:
            path = record_path(owner.domain_dir(self._remote_domid), self._remote_port)
            if clear_for_dead_peer(owner.root, path):
                self._events_arrived()
        self._peer_gone()

    # -- listener ------------------------------------------------------------------------
    def _on_acceptable(self) -> None:
        lsock = self._lsock
        if self._state is not _State.LISTENING or lsock is None:
            return
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._loop.call_exception_handler(
                {"message": f"accept failed on {self._describe()}", "exception": exc}
            )
            return
        conn.setblocking(False)
        self._loop.remove_reader(lsock.fileno())
        self._conn = conn
        self._hello = b""
        self._state = _State.HELLO
        self._loop.add_reader(conn.fileno(), self._on_readable)
        # The connector sends its hello right after connecting: it is usually here already,
        # so read it now instead of one loop iteration later.
        self._on_readable()

    def _reject(self) -> None:
        """Drop a connection whose hello was wrong; keep listening."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._loop.remove_reader(conn.fileno())
            conn.close()
        self._state = _State.LISTENING
        assert self._lsock is not None
        self._loop.add_reader(self._lsock.fileno(), self._on_acceptable)

    def _on_hello(self, data: bytes) -> None:
        self._hello += data
        if len(self._hello) < HELLO.size:
            return
        magic, version, domid, port = HELLO.unpack_from(self._hello)
        rest = self._hello[HELLO.size :].strip(DOORBELL_BYTE)  # the marker is no event
        self._hello = b""
        if magic != HELLO_MAGIC or version != HELLO_VERSION or domid != self._remote_domid:
            self._reject()
            return
        lsock, self._lsock = self._lsock, None
        if lsock is not None:
            lsock.close()
        if self._listen_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._listen_path)
        self._remote_port = port
        self._state = _State.CONNECTED
        self._offer_doorbell()
        self._peer_bound()
        if self._deferred_notify:
            self._deferred_notify = False
            self.notify()
        if rest:
            self._events_arrived()

    # -- receiving -----------------------------------------------------------------------
    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        buf = _recv_buffer()
        fds: list[int] = _NO_FDS
        try:
            if self._peer_bell is None:  # the peer's doorbell may come with these bytes
                n, ancdata, _flags, _addr = conn.recvmsg_into([buf], _ANC_SIZE, _RECV_FLAGS)
                fds = _received_fds(ancdata)
            else:
                n = conn.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0  # ECONNRESET and friends: the peer is gone
        if self._state is _State.HELLO:
            if not n:
                self._adopt_doorbell(fds)  # (closes them: not connected)
                self._reject()
            else:
                self._on_hello(bytes(buf[:n]))
                self._adopt_doorbell(fds)  # kept only if the hello was accepted
            return
        if fds:
            self._adopt_doorbell(fds)
        if n and fds is not _NO_FDS and not bytes(buf[:n]).strip(DOORBELL_BYTE):
            return  # only the peer's doorbell marker: no notification
        if n:
            self._events_arrived()  # one batch, however many bytes (events coalesce)
            return
        self._loop.remove_reader(conn.fileno())
        conn.close()
        self._conn = None
        self._peer_died()

    # -- closing -------------------------------------------------------------------------
    def close(self) -> None:
        if self._state is _State.CLOSED:
            return
        was_listening = self._state in (_State.LISTENING, _State.HELLO)
        if self._death_clears:  # a clean close: the peer must not act for a dead process
            self._death_clears.clear()
            path = self._death_record()
            if path is not None:
                write_record(path, [])
        self._state = _State.CLOSED
        self._close_doorbells()
        for sock in (self._conn, self._lsock):
            if sock is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        self._conn = self._lsock = None
        if was_listening and self._listen_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._listen_path)
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._live.discard(self)
        self._mark_closed()


class UnixEventChannels:
    """The EVENTS implementation of one [`UnixPlatform`][]."""

    def __init__(self, platform: UnixPlatform) -> None:
        self._platform = platform
        self._live: set[UnixEventChannel] = set()
        self._counter_fd: int | None = None
        self._dirs: dict[int, str] = {}  # domid -> domain_dir (the root never changes)

    @property
    def domid(self) -> int:
        return self._platform.domid

    @property
    def root(self) -> str:
        return self._platform.root

    def domain_dir(self, domid: int) -> str:
        d = self._dirs.get(domid)
        if d is None:
            d = self._dirs[domid] = os.path.join(self._platform.root, "evtchn", str(domid))
        return d

    def _own_dir(self) -> str:
        return self._platform._ensure_dir("evtchn", str(self.domid))

    def _allocate_port(self, own_dir: str | None = None) -> int:
        """The next own port, through the port counter kept open after the first use."""
        fd = self._counter_fd
        if fd is None:
            fd = self._counter_fd = open_port_counter(own_dir or self._own_dir())
        return take_port(fd)

    async def listen(self, remote_domid: int) -> UnixEventChannel:
        check_domid(remote_domid, "remote_domid")
        loop = asyncio.get_running_loop()
        d = self._own_dir()
        for _ in range(64):
            port = self._allocate_port(d)
            path = os.path.join(d, f"{port}.{remote_domid}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                with socket_address(path) as addr:
                    sock.bind(addr)  # never follows a link: one in its place -> EADDRINUSE
                _chmod_socket(path)
                sock.listen(LISTEN_BACKLOG)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue  # the counter was reset under a live root: take the next one
                raise
            ch = UnixEventChannel(self, loop, port, remote_domid, listener=sock, listen_path=path)
            self._live.add(ch)
            return ch
        raise OSError(errno.EADDRINUSE, f"no free event channel port in {d}")

    async def connect(self, remote_domid: int, remote_port: int) -> UnixEventChannel:
        check_domid(remote_domid, "remote_domid")
        if not isinstance(remote_port, int) or isinstance(remote_port, bool) or remote_port < 0:
            raise ValueError(f"invalid event channel port {remote_port!r}")
        loop = asyncio.get_running_loop()
        rdir = self.domain_dir(remote_domid)
        path = os.path.join(rdir, f"{remote_port}.{self.domid}")
        where = f"event channel port {remote_port} of domain {remote_domid}"
        claimed = f"{path}.claimed-{os.getpid()}-{next(_claims)}"
        with contextlib.suppress(FileNotFoundError):  # not there yet: reported below
            self._platform._check_dir("evtchn", str(remote_domid))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                os.rename(path, claimed)  # the atomic claim: one connector wins
                _check_is_socket(claimed, path)  # connect(2) would follow a link
                with socket_address(claimed) as addr:
                    sock.connect(addr)
            except FileNotFoundError:
                offers = listening_offers(rdir, remote_port)
                if offers:
                    raise PortNotOfferedError(
                        f"{where} is offered to domain {offers[0]}, not to domain {self.domid}"
                    ) from None
                raise ConnectionRefusedError(
                    f"no unbound {where} ({path} does not exist)"
                ) from None
            except ConnectionRefusedError:
                raise ConnectionRefusedError(
                    f"nobody listens on {where} (stale socket {path})"
                ) from None
            except BlockingIOError:
                raise ConnectionRefusedError(f"{where} is busy accepting another peer") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claimed)
            port = self._allocate_port()
            hello = HELLO.pack(HELLO_MAGIC, HELLO_VERSION, self.domid, port)
            try:
                sent = sock.send(hello, _SEND_FLAGS)
            except (BrokenPipeError, ConnectionResetError):
                raise ConnectionRefusedError(f"{where} was closed while binding") from None
            if sent != len(hello):
                raise ConnectionResetError(f"could not send hello to {where}")
        except BaseException:
            sock.close()
            raise
        ch = UnixEventChannel(self, loop, port, remote_domid, conn=sock, remote_port=remote_port)
        self._live.add(ch)
        ch._bound_by_connect()
        return ch

    def live(self) -> list[UnixEventChannel]:
        return sorted(self._live, key=lambda c: c.port)

    def close_all(self) -> None:
        """Close every channel, then the port counter."""
        for ch in self.live():
            ch.close()
        fd, self._counter_fd = self._counter_fd, None
        if fd is not None:
            os.close(fd)


__all__ = [
    "HELLO",
    "UnixEventChannel",
    "UnixEventChannels",
    "allocate_port",
    "listening_offers",
    "open_port_counter",
    "socket_address",
    "take_port",
]
