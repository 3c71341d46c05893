"""Qubes' "vchan-socket" transport: qrexec channels as plain ``AF_UNIX`` streams.

Theory of operation
-------------------
Qubes builds its qrexec programs (``qrexec-agent``, ``qrexec-daemon``, ``qrexec-client``,
``qrexec-client-vm``) against ``libvchan-socket`` (QubesOS/qubes-core-vchan-socket) to test
them without Xen.  That library replaces a vchan by one Unix stream socket; this module
speaks the same thing from asyncio, so aioxen's agent/daemon and Qubes' programs can talk to
each other between ordinary processes.  What the library does on the wire (read from its
``vchan/init.c``, ``vchan/socket.c``, ``vchan/io.c`` and checked against the built library):

* **Path.**  ``$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock`` with the domids and
  the port as decimal integers; the local domid is ``$VCHAN_DOMAIN`` (``atoi``, default 0),
  because the libvchan API has no argument for it.  Its default directory,
  ``/var/run/vchan``, is a predictable shared path, so here the directory is always given.
* **Roles.**  The vchan *server* binds and listens (backlog 1) and accepts exactly one
  client; the *client* connects, retrying on ``ENOENT``/``ECONNREFUSED`` (every 100 µs, for
  ever) until the server is there -- so either side may start first.
* **Bytes.**  No handshake, no framing, no credentials: the stream carries exactly the
  bytes the vchan would.  Buffer sizes are the library's rings (``read_min``/``write_min``
  rounded up to a power of two, at least a page; a client always gets one page each way)
  plus the kernel's socket buffers; they do not appear on the wire.
* **Close.**  ``libvchan_close`` flushes what it buffered, then closes the socket; the peer
  reads EOF (or ``ECONNRESET``) and reports ``VCHAN_DISCONNECTED``.  The library treats a
  read of 0 as the end of the whole channel, so a half-close (``write_eof``) ends the
  channel for a Qubes peer too -- qrexec never half-closes a vchan (its EOFs are in-band
  zero-length messages).  The wire cannot tell a clean close from a killed peer; qrexec's
  framing does (a missing ``MSG_DATA_EXIT_CODE`` or a cut message).
* **Leftovers.**  The C server unlinks whatever is at the path before it binds and leaves
  its socket file behind when it closes.

Filesystem safety (the rules of ``aioxen.platforms._rootdir`` and
``aioxen.ownership.UnixSocketClaim``): the directory must be a private directory of ours
(made 0700 if missing; never a link; no group/other access); a listener claims its path
exclusively (``bind`` itself when nothing is there; ``UnixSocketClaim``'s lock when
something is) -- a live socket there is ``OSError(EADDRINUSE)`` naming it (told from
``/proc/net/unix`` where it exists, not by connecting: that would use up a C server's one
accept), a stale socket of
ours (e.g. one a Qubes program left) is replaced, a link, a non-socket or another user's
socket is refused -- and removes only the socket it bound, as soon as its one client is
accepted (or when it is closed unaccepted).  A client refuses a link or another user's
socket at the path.

API::

    channels = VchanSocketChannels(directory, local_domid=2)  # or .from_environ()
    pending = await channels.listen(0, 512, buffer_size=4096)  # path exists from now on
    reader, writer = await pending.accept()                    # the one client
    reader, writer = await channels.connect(0, 513)            # server domain 0, port 513
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Mapping
from typing import Literal

from ..ownership import ResourceBusy, UnixSocketClaim
from ..platforms import _rootdir
from .channels import DATA_BUFFER_SIZE, DEFAULT_ACCEPT_TIMEOUT

__all__ = ["PendingSocketChannel", "VchanSocketChannels", "socket_path"]

#: First reserved domid (``DOMID_FIRST_RESERVED``): domids are below it.
DOMID_LIMIT = 0x7FF0
#: The C library formats the port with ``%d`` from an ``int``.
PORT_LIMIT = 2**31
#: ``sizeof(sockaddr_un.sun_path)`` minus the terminating NUL.
_SUN_PATH_MAX = 107
#: Smallest StreamReader limit: one 64 KiB qrexec (v3+) chunk plus its header fits.
_MIN_READ_LIMIT = 2**16 + 8
#: Connect retry delays (seconds): quick at first (the peer is usually about to bind),
#: then a bounded poll; the C client retries every 100 µs.
_RETRY_FIRST = 0.0005
_RETRY_MAX = 0.05


def _check_domid(domid: int, what: str) -> int:
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid < DOMID_LIMIT:
        raise ValueError(f"{what} must be an int in [0, {DOMID_LIMIT}), got {domid!r}")
    return domid


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < PORT_LIMIT:
        raise ValueError(f"vchan-socket port must be an int in [0, 2**31), got {port!r}")
    return port


def socket_path(directory: str, server_domid: int, client_domid: int, port: int) -> str:
    """The path ``libvchan-socket`` uses for the channel (server, client, port)."""
    _check_domid(server_domid, "server domid")
    _check_domid(client_domid, "client domid")
    _check_port(port)
    path = os.path.join(directory, f"vchan.{server_domid}.{client_domid}.{port}.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise OSError(
            errno.ENAMETOOLONG,
            f"vchan-socket path {path} is longer than a Unix socket address allows "
            f"({_SUN_PATH_MAX} bytes): choose a shorter socket directory",
        )
    return path


_ACCEPTCON = 0x10000  # ``__SO_ACCEPTCON`` in /proc/net/unix's Flags: a listening socket


def _listening(path: str) -> bool | None:
    """Whether a socket bound at ``path`` listens, from ``/proc/net/unix`` (``None`` if
    that cannot be read).  Unlike a probing ``connect`` this does not touch the listener:
    a libvchan-socket server accepts exactly one connection, so a probe would use up the
    one its real client needs."""
    want = os.fsencode(path)
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                fields = line.rstrip(b"\n").split(None, 7)
                if len(fields) == 8 and fields[7] == want and int(fields[3], 16) & _ACCEPTCON:
                    return True
    except (OSError, ValueError):
        return None
    return False


def _check_peer_socket(path: str) -> None:
    """Before connecting: what is at ``path`` (if anything) must be a socket of ours or
    root's, never a link (the directory itself was checked private at construction)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _rootdir.RootPermissionError(
            errno.ELOOP, f"vchan-socket {path} is a symbolic link; refusing to follow it"
        )
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        raise _rootdir.RootPermissionError(
            errno.EPERM,
            f"refusing to connect to vchan-socket {path}: not a socket of yours or root's "
            f"({_rootdir.describe(st)})",
        )


async def _streams(
    sock: socket.socket, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock, limit=limit)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # device, inode and change time: an inode number alone is reused at once on tmpfs
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class _PathHold:
    """Our hold on a socket path: the bind itself (fast path: nothing was there, bind is
    exclusive) or a ``UnixSocketClaim`` (a stale socket was replaced under its lock).
    ``release`` unlinks the path only if it is still the socket we bound."""

    def __init__(self, path: str, claim: UnixSocketClaim | None) -> None:
        self.path = path
        self.claim = claim
        self.ident: tuple[int, int, int] | None = None

    def bind(self) -> socket.socket:
        if self.claim is not None:
            return self.claim.bind()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            self.ident = _identity(os.lstat(self.path))
        except BaseException:
            sock.close()
            raise
        return sock

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            return
        ident, self.ident = self.ident, None
        if ident is not None:
            try:
                if _identity(os.lstat(self.path)) == ident:
                    os.unlink(self.path)
            except OSError:
                pass


class PendingSocketChannel:
    """A bound, listening vchan-socket server waiting for its one client."""

    def __init__(self, hold: _PathHold, sock: socket.socket, path: str, limit: int) -> None:
        self.path = path
        self._claim: _PathHold | None = hold
        self._sock: socket.socket | None = sock
        self._limit = limit

    async def accept(
        self, timeout: float | None = DEFAULT_ACCEPT_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Await the one client; the listening socket and its path are gone afterwards
        (also on timeout or cancel).  ``TimeoutError`` naming the path after ``timeout``
        seconds (``None``: no limit); ``ConnectionAbortedError`` if closed before."""
        sock = self._sock
        if sock is None:
            raise ConnectionAbortedError(
                errno.ECONNABORTED, f"vchan-socket {self.path} is closed (or already accepted)"
            )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(sock)
        except TimeoutError:
            raise TimeoutError(
                f"vchan-socket: no client connected to {self.path} within {timeout} s"
            ) from None
        finally:
            self.close()
        try:
            return await _streams(conn, self._limit)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Stop listening and remove the socket file (only if it is still ours).
        Idempotent."""
        sock, self._sock = self._sock, None
        claim, self._claim = self._claim, None
        if sock is not None:
            sock.close()
        if claim is not None:
            claim.release()

    async def aclose(self) -> None:
        """``close()``: here everything is released at once.  Idempotent."""
        self.close()

    async def __aenter__(self) -> PendingSocketChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._sock is not None:
            self.close()


class VchanSocketChannels:
    """qrexec channels over Qubes' vchan-socket wire in ``directory`` as ``local_domid``."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        local_domid: int,
        *,
        connect_timeout: float | None = DEFAULT_ACCEPT_TIMEOUT,
    ) -> None:
        self.local_domid = _check_domid(local_domid, "local domid")
        self.connect_timeout = connect_timeout
        self.directory = _rootdir.ensure_private_dir(directory, what="a vchan-socket directory")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> VchanSocketChannels:
        """Take the directory from ``$VCHAN_SOCKET_DIR`` and the domid from
        ``$VCHAN_DOMAIN`` (default 0), as ``libvchan-socket`` does.  ``ValueError`` if
        ``$VCHAN_SOCKET_DIR`` is unset (its C default is a shared system path) or
        ``$VCHAN_DOMAIN`` is not a domid."""
        env = os.environ if environ is None else environ
        directory = env.get("VCHAN_SOCKET_DIR")
        if not directory:
            raise ValueError("$VCHAN_SOCKET_DIR is not set: name the vchan-socket directory")
        raw = env.get("VCHAN_DOMAIN", "0")
        try:
            domid = int(raw, 10)
        except ValueError:
            raise ValueError(f"$VCHAN_DOMAIN={raw!r}: not a domid") from None
        if not 0 <= domid < DOMID_LIMIT:
            raise ValueError(f"$VCHAN_DOMAIN={raw!r}: not a domid (0..{DOMID_LIMIT - 1})")
        return cls(directory, domid)

    def __repr__(self) -> str:
        return f"VchanSocketChannels({self.directory!r}, local_domid={self.local_domid})"

    def path(self, server_domid: int, client_domid: int, port: int) -> str:
        """The socket path of channel (server, client, port) in our directory."""
        return socket_path(self.directory, server_domid, client_domid, port)

    async def listen(
        self, peer_domid: int, port: int, *, buffer_size: int = DATA_BUFFER_SIZE
    ) -> PendingSocketChannel:
        """Be the vchan server for ``peer_domid`` on ``port``: the socket is bound and
        listening when this returns; ``accept()`` awaits the client.  ``buffer_size``
        bounds what is buffered in this process each way (the wire has no ring size)."""
        if buffer_size <= 0:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
        path = self.path(self.local_domid, peer_domid, port)
        hold = _PathHold(path, None)
        try:
            sock = hold.bind()  # the common case, cheap: nothing is at the path
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Something is there: a live listener is left alone; a stale socket of ours
            # (a Qubes server leaves its socket behind) is replaced under the path's lock.
            if _listening(path):
                raise ResourceBusy(
                    f"vchan-socket {path} is in use: a process listens on it (left alone)"
                ) from None
            hold = _PathHold(
                path,
                UnixSocketClaim.acquire(
                    path, what=f"vchan-socket server {self.local_domid}->{peer_domid} port {port}"
                ),
            )
            try:
                sock = hold.bind()
            except BaseException:
                hold.release()
                raise
        try:
            sock.listen(1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            hold.release()
            raise
        return PendingSocketChannel(hold, sock, path, max(buffer_size, _MIN_READ_LIMIT))

    async def connect(
        self,
        server_domid: int,
        port: int,
        *,
        timeout: float | Literal["default"] | None = "default",
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Be the vchan client of ``server_domid``'s ``port``: like the C library, wait
        (retrying) until the server listens; ``TimeoutError`` naming the path after
        ``timeout`` seconds (default: the factory's ``connect_timeout``; ``None``: until
        cancelled)."""
        if timeout == "default":
            timeout = self.connect_timeout
        path = self.path(server_domid, self.local_domid, port)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = _RETRY_FIRST
        while True:
            _check_peer_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            except BaseException:
                sock.close()
                raise
            else:
                try:
                    return await _streams(sock, _MIN_READ_LIMIT)
                except BaseException:
                    sock.close()
                    raise
            if deadline is not None and loop.time() + delay > deadline:
                raise TimeoutError(
                    f"vchan-socket: no server for domain {server_domid} port {port} at "
                    f"{path} within {timeout} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)
