"""One owner per resource: exclusive, atomic claims that survive crashes.

Theory of operation
-------------------
A claim is made by one *process* and recorded as an [`Owner`][]: the pid, the process
start time (field 22 of ``/proc/PID/stat``, clock ticks since boot), the kernel's boot id,
the pid namespace, the domid the claimant plays (if any), a short description and a
random *claim* nonce that tells two claims of one process apart.  Encoded as one line of
JSON (``Owner.encode``), it is what a second claimant reads to name the holder.

Liveness, not guesswork ([`Owner.alive`][]): a record is dead when it was written under
another boot of this kernel (boot id differs), when its pid no longer exists, or when the
pid now belongs to another process (start time differs).  A record written in another pid
namespace cannot be checked and counts as alive (a claimant never steals what it cannot
see).  Records are therefore only judged by processes of the same kernel: on Xen the owner
of a resource under ``/local/domain/N`` is always a process of domain N; on the ``unix``
platform every "domain" is a process of one host.

Two mechanisms use the record:

* **XenStore keys** -- [`claim_key`][] reads the owner key in a transaction and fails
  with [`ResourceBusy`][] (an ``OSError`` with ``errno.EADDRINUSE``) naming the holder
  if a live owner other than us holds it; otherwise it writes our record (optionally
  permissions, and whatever ``then(tx, stale_owner)`` writes) in the *same* transaction,
  so two racing claimants cannot both win (the loser's transaction conflicts, is retried,
  and then sees the winner).  [`release_key`][] removes paths only if the owner key
  still holds *our* claim, again in one transaction.  [`holder_of`][] reads a record;
  [`claim_in`][] / [`release_in`][] do the same inside a caller's open transaction.
  A record of this very process is judged by exact knowledge instead
  ([`holder_active`][]): it holds only while its claim is held here (from
  [`claim_in`][] until [`release_in`][] or [`forget`][]), so a server whose store
  connection died before it removed its record does not block its own process.
* **Files** -- [`FileLock`][] takes an ``flock`` on a lock file (created ``O_NOFOLLOW``,
  mode 0600, must be a regular file of ours with one link -- never a hard link to another
  file of ours, which writing the record would truncate); the kernel drops it when the
  process dies, so liveness is exact.  [`UnixSocketClaim`][] uses ``PATH.lock`` to claim a Unix
  socket path: a live socket at PATH (a connect succeeds) is ``ResourceBusy``; a stale
  socket of ours is replaced; a link, a non-socket or someone else's socket is refused.
  On release it unlinks PATH only if it is still the socket it bound (same device,
  inode and change time).  The socket is made owner-only (0600, or the ``mode`` given
  to ``bind``) whatever the umask, between ``bind`` and ``listen``: connecting needs write
  permission on the socket file, and a service started with umask 0 would otherwise let
  every local user connect (a connect before ``listen`` is refused, so there is no window).

API summary::

    me = Owner.current("vchan server port 'web'", domid=plat.domid)
    stale = await claim_key(store, f"{path}/owner", me, perms=[Perm(own, "n")])
    ...
    await release_key(store, f"{path}/owner", me, remove=[path])

    claim = UnixSocketClaim.acquire("/run/x.sock", what="aioxen bridge")
    sock = claim.bind()          # a bound AF_UNIX socket; listen()/hand it to asyncio
    ...
    claim.release()              # unlinks the socket (if still ours) and the lock file
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FileLock",
    "Owner",
    "ResourceBusy",
    "UnixSocketClaim",
    "claim_in",
    "claim_key",
    "forget",
    "holder_active",
    "holder_of",
    "release_in",
    "release_key",
]


class ResourceBusy(OSError):
    """A resource is held by another live owner (``errno.EADDRINUSE``); `holder`
    is its `Owner` record if known.  The message names the resource and holder."""

    def __init__(self, message: str, holder: Owner | None = None) -> None:
        super().__init__(errno.EADDRINUSE, message)
        self.holder = holder


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, ``None`` if there is no such
    process; ``-1`` if this system has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else -1
    except (PermissionError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):
        return None  # a zombie has exited: it holds nothing any more
    return int(rest[19])  # field 22: fields after comm start at field 3


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_ns(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":  # python -m PACKAGE
        argv[0] = "-m " + os.path.basename(os.path.dirname(argv[0]))
    elif argv:
        argv[0] = os.path.basename(argv[0])
    text = " ".join(argv)
    exe = os.path.basename(sys.executable or "python")
    text = f"{exe} {text}".strip()
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass(frozen=True)
class Owner:
    """Who holds a claim.  Build with [`current`][]; compare claims by [`claim`][]."""

    pid: int
    start: int | None
    boot: str | None
    pidns: str | None
    claim: str
    what: str = ""
    domid: int | None = None
    cmd: str = ""

    @classmethod
    def current(cls, what: str = "", *, domid: int | None = None) -> Owner:
        """A fresh claim record for this process (a new nonce each call)."""
        pid = os.getpid()
        start = _proc_start_time(pid)
        return cls(
            pid=pid,
            start=start if start is not None and start >= 0 else None,
            boot=_boot_id(),
            pidns=_pid_ns(),
            claim=secrets.token_hex(8),
            what=what,
            domid=domid,
            cmd=_command_line(),
        )

    def encode(self) -> bytes:
        fields: dict[str, Any] = {"pid": self.pid, "start": self.start, "boot": self.boot}
        fields.update(pidns=self.pidns, claim=self.claim, what=self.what)
        fields.update(domid=self.domid, cmd=self.cmd)
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Owner:
        """Parse [`encode`][]'s output; ``ValueError`` for anything else."""
        try:
            d = json.loads(raw.rstrip(b"\0").decode())
            pid = d["pid"]
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise ValueError
            start = d.get("start")
            if start is not None and not isinstance(start, int):
                raise ValueError
            domid = d.get("domid")
            if domid is not None and not isinstance(domid, int):
                raise ValueError
            claim = d["claim"]
            if not isinstance(claim, str) or not claim:
                raise ValueError
            return cls(
                pid=pid,
                start=start,
                boot=_opt_str(d.get("boot")),
                pidns=_opt_str(d.get("pidns")),
                claim=claim,
                what=str(d.get("what") or ""),
                domid=domid,
                cmd=str(d.get("cmd") or ""),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"not an aioxen owner record: {raw[:80]!r}") from None

    def alive(self) -> bool:
        """Is the claiming process still running?  See the module docstring."""
        own_boot = _boot_id()
        if self.boot and own_boot and self.boot != own_boot:
            return False
        if self.pidns and _pid_ns() not in (None, self.pidns):
            return True  # cannot see into another pid namespace: never steal
        start = _proc_start_time(self.pid)
        if start == -1:  # no /proc: existence of the pid is all we can check
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        if start is None:
            return False
        return self.start is None or start == self.start

    def describe(self) -> str:
        """``pid 123 (python3 -m aioxen bridge ...)``, plus what and domid when known."""
        parts = [f"pid {self.pid}"]
        if self.domid is not None:
            parts.append(f"domid {self.domid}")
        text = " ".join(parts)
        if self.what:
            text += f", {self.what}"
        if self.cmd:
            text += f" ({self.cmd})"
        return text


def _opt_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


# -- XenStore keys -----------------------------------------------------------------------


async def holder_of(store: Any, key: str) -> Owner | None:
    """The record at ``key`` (``None`` if absent); ``ValueError`` if it is not one."""
    try:
        raw = await store.read(key)
    except FileNotFoundError:
        return None
    return Owner.decode(raw)


async def _holder_in(tx: Any, key: str, what: str) -> Owner | None:
    try:
        raw = await tx.read(key)
    except FileNotFoundError:
        return None
    try:
        return Owner.decode(raw)
    except ValueError:
        raise ResourceBusy(
            f"{what} is claimed by an unreadable owner record at {key} ({raw[:60]!r}); "
            f"remove it (aioxen xenstore rm {key}) if nothing uses it"
        ) from None


_held: set[str] = set()
"""Claim nonces this process holds through [`claim_in`][] (until [`release_in`][] or
[`forget`][])."""


def holder_active(holder: Owner) -> bool:
    """Does ``holder`` still hold its claim?  For a record of *this* process (same pid and
    start time) exact knowledge: only while the claim is held here (a server that was
    closed, or whose XenStore connection died before it could remove its record, no
    longer holds it); for any other process [`Owner.alive`][]."""
    if holder.pid == os.getpid():
        start = _proc_start_time(holder.pid)
        if holder.start is None or start is None or start < 0 or start == holder.start:
            return holder.claim in _held
    return holder.alive()


def forget(owner: Owner) -> None:
    """Give up ``owner``'s claim in this process without touching XenStore (e.g. when the
    store connection is gone): its record then counts as dead for later claimants."""
    _held.discard(owner.claim)


async def claim_in(
    tx: Any,
    key: str,
    owner: Owner,
    *,
    what: str | None = None,
    perms: Sequence[Any] | None = None,
    then: Callable[[Any, Owner | None], Awaitable[None]] | None = None,
) -> Owner | None:
    """[`claim_key`][]'s work inside an open transaction ``tx`` (the caller commits)."""
    label = what or f"XenStore key {key}"
    holder = await _holder_in(tx, key, label)
    if holder is not None and holder.claim == owner.claim:
        holder = None  # ours already
    if holder is not None and holder_active(holder):
        raise ResourceBusy(f"{label} is in use by {holder.describe()}", holder)
    _held.add(owner.claim)
    await tx.write(key, owner.encode())
    if perms is not None:
        await tx.set_perms(key, list(perms))
    if then is not None:
        await then(tx, holder)
    return holder


async def claim_key(
    store: Any,
    key: str,
    owner: Owner,
    *,
    what: str | None = None,
    perms: Sequence[Any] | None = None,
    then: Callable[[Any, Owner | None], Awaitable[None]] | None = None,
) -> Owner | None:
    """Claim ``key`` for ``owner`` atomically (one XenStore transaction, retried on
    conflict).  ``ResourceBusy`` naming the holder if another live claim holds it --
    nothing is written then.  ``perms`` are set on the key; ``then(tx, stale)`` runs inside
    the same transaction (e.g. to clear a dead owner's leftovers).  Returns the dead
    owner's record that was replaced, or ``None``.  [`claim_in`][] does the same inside
    a transaction of the caller's."""

    async def body(tx: Any) -> Owner | None:
        return await claim_in(tx, key, owner, what=what, perms=perms, then=then)

    result: Owner | None = await store.transact(body)
    return result


async def release_in(
    tx: Any, key: str, owner: Owner, *, remove: Sequence[str] | None = None
) -> bool:
    """[`release_key`][]'s work inside an open transaction ``tx``."""
    forget(owner)
    try:
        raw = await tx.read(key)
    except FileNotFoundError:
        return False
    try:
        if Owner.decode(raw).claim != owner.claim:
            return False
    except ValueError:
        return False
    for p in list(remove) if remove is not None else [key]:
        with contextlib.suppress(FileNotFoundError):
            await tx.rm(p)
    return True


async def release_key(
    store: Any, key: str, owner: Owner, *, remove: Sequence[str] | None = None
) -> bool:
    """If ``key`` still holds ``owner``'s claim, remove ``remove`` (default: ``key``) in one
    transaction and return True; otherwise touch nothing and return False."""

    async def body(tx: Any) -> bool:
        return await release_in(tx, key, owner, remove=remove)

    result: bool = await store.transact(body)
    return result


# -- files -------------------------------------------------------------------------------


class FileLock:
    """An exclusive ``flock`` on a lock file; the kernel releases it if we die."""

    def __init__(self, path: str, fd: int, owner: Owner) -> None:
        self.path = path
        self.owner = owner
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: str, owner: Owner | None = None, *, what: str | None = None) -> FileLock:
        """Take the lock at ``path`` (created 0600, never through a link) or raise
        ``ResourceBusy`` naming the holder; ``PermissionError`` if ``path`` is not a
        regular file of ours."""
        owner = owner or Owner.current(what or "")
        label = what or f"lock file {path}"
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PermissionError(
                        errno.EPERM, f"lock file {path} is a symbolic link; refusing to use it"
                    ) from None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise PermissionError(
                        errno.EPERM,
                        f"lock file {path} is not a regular file owned by uid {os.geteuid()} "
                        f"(uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); refusing to use it",
                    )
                if st.st_nlink > 1:  # 0: unlinked by its holder as we opened it (retried below)
                    # A hard link someone put there to a file of ours (possible in a shared
                    # directory when fs.protected_hardlinks is 0): we would truncate it.
                    raise PermissionError(
                        errno.EPERM,
                        f"lock file {path} has {st.st_nlink} hard links (a link to another "
                        f"file of uid {st.st_uid}?); refusing to use it -- remove it",
                    )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder_file(fd)
                    who = holder.describe() if holder is not None else "another process"
                    raise ResourceBusy(
                        f"{label} is in use by {who} (lock {path})", holder
                    ) from None
                try:
                    now = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # unlinked by its previous holder as we locked it: again
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, owner.encode() + b"\n", 0)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            return cls(path, fd, owner)
        raise ResourceBusy(f"{label}: lock file {path} keeps being replaced")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink the lock file (while still holding it) and drop the lock.  Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                now = os.stat(self.path, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(self.path)
        finally:
            os.close(fd)


def _read_holder_file(fd: int) -> Owner | None:
    try:
        return Owner.decode(os.pread(fd, 4096, 0).strip())
    except (OSError, ValueError):
        return None


def _probe_unix_socket(path: str) -> bool | None:
    """True if something accepts connections at ``path``, False if refused (stale),
    ``None`` if it cannot be told."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return False
        except (BlockingIOError, InterruptedError):
            return True  # backlog full: a live listener
        except FileNotFoundError:
            return False
        except OSError:
            return None
        return True


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """What tells our socket file from a later one at the same path: device and inode
    (an inode number is reused at once on tmpfs) plus the change time in ns."""
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class UnixSocketClaim:
    """Exclusive use of a Unix socket path (see the module docstring)."""

    def __init__(self, path: str, lock: FileLock | None) -> None:
        self.path = path
        self._lock = lock
        self._ident: tuple[int, int, int] | None = None

    @classmethod
    def acquire(cls, path: str, *, what: str = "") -> UnixSocketClaim:
        """Claim ``path``; ``ResourceBusy`` if it is live or locked by a live process,
        ``FileExistsError`` if it is not a socket (or is a link), ``PermissionError`` if
        it is another user's.  A stale socket of ours is removed."""
        if path.startswith("\0"):  # abstract socket: the kernel makes bind() exclusive
            return cls(path, None)
        label = f"Unix socket {path}"
        owner = Owner.current(what)
        lock = FileLock.acquire(path + ".lock", owner, what=label)
        try:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return cls(path, lock)
            if stat.S_ISLNK(st.st_mode):
                raise FileExistsError(
                    errno.EEXIST, f"{path} exists and is a symbolic link; not replacing it"
                )
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(
                    errno.EEXIST,
                    f"{path} exists and is not a socket ({stat.filemode(st.st_mode)}); "
                    "not replacing it",
                )
            if st.st_uid != os.geteuid():
                raise PermissionError(
                    errno.EPERM,
                    f"{path} is a socket of uid {st.st_uid}, not ours (uid {os.geteuid()}); "
                    "not replacing it",
                )
            live = _probe_unix_socket(path)
            if live is None:
                raise ResourceBusy(f"{label} exists and cannot be probed; not replacing it")
            if live:
                raise ResourceBusy(f"{label} is in use (a process accepts connections on it)")
            os.unlink(path)  # stale: nobody listens, and we hold the lock
        except BaseException:
            lock.release()
            raise
        return cls(path, lock)

    def bind(self, mode: int = 0o600) -> socket.socket:
        """A new ``AF_UNIX`` stream socket bound to the path (not yet listening), its
        file set to ``mode`` (default owner-only) whatever the process's umask."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            if not self.path.startswith("\0"):
                st = os.lstat(self.path)
                if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                    raise PermissionError(
                        errno.EPERM, f"{self.path} was replaced right after bind; not using it"
                    )
                # Not listening yet, so nobody can have connected through the umask's mode.
                os.chmod(self.path, mode)
                st = os.lstat(self.path)
                self._ident = _identity(st)
        except BaseException:
            sock.close()
            raise
        return sock

    def release(self) -> None:
        """Unlink the socket if it is still the one we bound, then drop the lock."""
        ident, self._ident = self._ident, None
        try:
            if ident is not None:
                with contextlib.suppress(OSError):
                    if _identity(os.lstat(self.path)) == ident:
                        os.unlink(self.path)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
