"""One owner per device instance: an owner record in the device's own XenStore directory.

Theory of operation
-------------------
A process that serves one end of a device (a blkback, a netback vif, a blkfront, a
netfront) writes an *owner record* into that end's own directory -- the back end's
``/local/domain/B/backend/T/F/N`` or the front end's ``/local/domain/F/device/T/N``, which
only that domain (and the toolstack) may write on Xen too -- under :data:`OWNER_KEY`::

    pid=1234
    start=8812345          (field 22 of /proc/1234/stat: the process start time)
    boot=<boot id>         (/proc/sys/kernel/random/boot_id)
    token=<random hex>     (this claim, unique even within one process)
    cmd=aioxen blkback

The record is read, judged and written in one XenStore transaction
(:meth:`Claim.take_in`), so of two claimants racing for a free device exactly one commits
(the other's transaction conflicts, is retried, and then finds the winner's record).  A
record whose holder is alive makes the claim fail with :class:`DeviceInUse`
(``OSError(EADDRINUSE)``) naming the holder, before anything was written.

*Alive* is decided by liveness, not by age: a record from another boot is dead; a record
naming this process is alive while its token is held here (:meth:`Claim.release` drops
it); otherwise the pid must exist and its start time in ``/proc/PID/stat`` must equal the
recorded one (a recycled pid has another start time).  Where ``/proc`` is missing
(macOS) the pid's existence alone decides.  A record that cannot be parsed is treated as
stale.  A dead holder's record is simply overwritten: the new owner takes over (and the
device's drivers clean up what the dead one left, as they do for a crashed peer).

:meth:`Claim.release` removes the record only if it is still ours, and
:meth:`Claim.held_in` lets a caller remove more (a whole device it created) only if it
still owns it.  :func:`read_holder` is the read-only view used by ``info``/``ls`` commands.
Pid and start time are only meaningful in the domain that wrote them; a record is only
ever judged by a claimant of the same end, which runs in that same domain.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient

OWNER_KEY = "aioxen-owner"
"""The key, in a device end's own directory, that holds its owner record."""

_live_tokens: set[str] = set()  # claims held by this process


class DeviceInUse(OSError):
    """A device end is held by another live process (errno ``EADDRINUSE``)."""

    def __init__(self, message: str, holder: OwnerRecord | None = None) -> None:
        super().__init__(errno.EADDRINUSE, message)
        self.holder = holder

    def __str__(self) -> str:
        return str(self.strerror)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def process_start_time(pid: int) -> str | None:
    """Field 22 (``starttime``) of ``/proc/PID/stat``; ``None`` if there is no such
    process (or no ``/proc``)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": field 3 onwards
    return fields[19] if len(fields) > 19 else None


def boot_id() -> str:
    return (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()


def _have_proc() -> bool:
    return os.path.isdir("/proc/self")


@dataclass(frozen=True)
class OwnerRecord:
    """Who holds a device end."""

    pid: int
    start: str
    boot: str
    token: str
    cmd: str = ""

    @classmethod
    def mine(cls) -> OwnerRecord:
        """A fresh record for this process (its token is held until released)."""
        pid = os.getpid()
        cmd = " ".join(os.path.basename(a) for a in sys.argv[:2]) if sys.argv else ""
        rec = cls(pid, process_start_time(pid) or "", boot_id(), secrets.token_hex(8), cmd)
        _live_tokens.add(rec.token)
        return rec

    def encode(self) -> str:
        cmd = self.cmd.replace("\n", " ")[:80]
        return (
            f"pid={self.pid}\nstart={self.start}\nboot={self.boot}\ntoken={self.token}\ncmd={cmd}\n"
        )

    @classmethod
    def parse(cls, raw: bytes) -> OwnerRecord | None:
        """The record in ``raw``, or ``None`` if it is not one."""
        fields: dict[str, str] = {}
        for line in raw.decode(errors="replace").rstrip("\0").splitlines():
            k, sep, v = line.partition("=")
            if sep:
                fields[k.strip()] = v.strip()
        pid = fields.get("pid", "")
        if not pid.isdigit() or not fields.get("token"):
            return None
        return cls(int(pid), fields.get("start", ""), fields.get("boot", ""),
                   fields["token"], fields.get("cmd", ""))  # fmt: skip

    def alive(self) -> bool:
        """Whether the holder still runs (see the module docstring)."""
        mine = boot_id()
        if self.boot and mine and self.boot != mine:
            return False  # written before this machine (domain) last booted
        if self.pid == os.getpid() and self.start == (process_start_time(self.pid) or ""):
            return self.token in _live_tokens
        if _have_proc():
            start = process_start_time(self.pid)
            return start is not None and start == self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        cmd = f" ({self.cmd})" if self.cmd else ""
        return f"pid {self.pid}{cmd}"


async def read_holder(store: Any, directory: str) -> OwnerRecord | None:
    """The owner record of a device end (via a client or a transaction), or ``None`` if
    there is none (or it is unreadable).  Reads only."""
    try:
        raw = await store.read(f"{directory}/{OWNER_KEY}")
    except (FileNotFoundError, PermissionError):
        return None
    return OwnerRecord.parse(raw)


class Claim:
    """This process's claim on one device end (``directory``)."""

    def __init__(self, store: XenStoreClient, directory: str, what: str = "") -> None:
        self.store = store
        self.directory = directory
        self.what = what or directory
        self.record = OwnerRecord.mine()
        self.released = False

    @property
    def key(self) -> str:
        return f"{self.directory}/{OWNER_KEY}"

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Claim {self.what} at {self.directory} {self.record.describe()} {state}>"

    async def take_in(self, tx: Any, *, require_dir: bool = True) -> None:
        """Judge the current record and write ours, inside transaction ``tx``:
        :class:`DeviceInUse` if a live process holds it (nothing written),
        ``FileNotFoundError`` if ``require_dir`` and the directory does not exist."""
        if self.released:
            raise RuntimeError(f"{self!r} was released")
        if require_dir:
            try:
                await tx.read(self.directory)
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, f"{self.what}: {self.directory} does not exist"
                ) from None
        holder = await read_holder(tx, self.directory)
        if holder is not None and holder.token != self.record.token and holder.alive():
            raise DeviceInUse(
                f"{self.what} is in use: {self.directory} is held by {holder.describe()}",
                holder,
            )
        await tx.write(self.key, self.record.encode())

    async def acquire(self) -> Claim:
        """Take the claim in its own transaction (see :meth:`take_in`); returns self."""
        await self.store.transact(self.take_in)
        return self

    async def held_in(self, tx: Any) -> bool:
        """Whether the record in ``directory`` is still ours (inside ``tx``)."""
        holder = await read_holder(tx, self.directory)
        return holder is not None and holder.token == self.record.token

    async def release(self) -> bool:
        """Remove our record if it is still ours; afterwards the claim counts as dead even
        if XenStore could not be reached.  Returns whether a record was removed."""

        async def body(tx: Any) -> bool:
            if not await self.held_in(tx):
                return False
            with contextlib.suppress(FileNotFoundError):
                await tx.rm(self.key)
            return True

        try:
            if self.released:
                return False
            return await self.store.transact(body)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Count the claim as dead from now on without touching XenStore (a claim that
        was never taken, or whose store is gone)."""
        self.released = True
        _live_tokens.discard(self.record.token)


__all__ = [
    "OWNER_KEY",
    "Claim",
    "DeviceInUse",
    "OwnerRecord",
    "boot_id",
    "process_start_time",
    "read_holder",
]
