"""One owner per device instance: an owner record in the device's own XenStore directory.

Theory of operation
-------------------
A process that serves one end of a device (a blkback, a netback vif, a blkfront, a
netfront) writes an owner record ([`aioxen.ownership.Owner`][]: pid, process start
time from ``/proc/PID/stat``, boot id, pid namespace, a random claim nonce, what and the
command line) into that end's own directory -- the back end's
``/local/domain/B/backend/T/F/N`` or the front end's ``/local/domain/F/device/T/N``, which
only that domain (and the toolstack) may write on Xen too -- under [`OWNER_KEY`][].

The record is read, judged and written in one XenStore transaction
([`Claim.take_in`][]), so of two claimants racing for a free device exactly one commits
(the other's transaction conflicts, is retried, and then finds the winner's record).  A
record whose holder is alive makes the claim fail with [`DeviceInUse`][]
(``OSError(EADDRINUSE)``, a [`ResourceBusy`][aioxen.ownership.ResourceBusy]) naming the holder,
before anything was written; so does a record that cannot be parsed (never guess).

*Alive* is [`Owner.alive`][aioxen.ownership.Owner.alive] (liveness, not age: another
boot is dead, the pid must exist with the recorded start time), except for claims of this
very process (several platforms in one process, the ``inheap`` world,
tests that play a crashed process by dropping its XenStore connection): such a record is
alive only while its [`Claim`][] is held here
([`aioxen.ownership.holder_active`][]).  A dead holder's
record is simply overwritten: the new owner takes over, and the device's drivers clean up
what the dead one left, as they do for a crashed peer.

[`Claim.release`][] removes the record only if it is still ours, and
[`Claim.held_in`][] lets a caller remove more (a whole device it created) only if it
still owns it.  [`read_holder`][] is the read-only view used by ``info`` commands.
A record is only ever judged by a claimant of the same end, which runs in the domain that
wrote it (pids mean nothing across domains).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aioxen.ownership import Owner, ResourceBusy, claim_in, forget, holder_active, release_in

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient

OWNER_KEY = "aioxen-owner"
"""The key, in a device end's own directory, that holds its owner record."""


class DeviceInUse(ResourceBusy):
    """A device end is held by another live process (errno ``EADDRINUSE``)."""

    def __str__(self) -> str:
        return str(self.strerror)


holder_alive = holder_active
"""Whether a recorded holder still holds its claim ([`aioxen.ownership.holder_active`][]:
a claim of this process only while held here, any other by [`Owner.alive`][])."""


async def read_holder(store: Any, directory: str) -> Owner | None:
    """The owner record of a device end (via a client or a transaction), or ``None`` if
    there is none (or it is unreadable).  Reads only."""
    try:
        raw = await store.read(f"{directory}/{OWNER_KEY}")
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return Owner.decode(raw)
    except ValueError:
        return None


class Claim:
    """This process's claim on one device end (``directory``)."""

    def __init__(self, store: XenStoreClient, directory: str, what: str = "") -> None:
        self.store = store
        self.directory = directory
        self.what = what or directory
        self.record = Owner.current(self.what)
        self.released = False

    @property
    def key(self) -> str:
        return f"{self.directory}/{OWNER_KEY}"

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Claim {self.what} at {self.directory} {self.record.describe()} {state}>"

    async def take_in(self, tx: Any, *, require_dir: bool = True) -> None:
        """Judge the current record and write ours, inside transaction ``tx``:
        [`DeviceInUse`][] if a live process holds it (nothing written),
        ``FileNotFoundError`` if ``require_dir`` and the directory does not exist."""
        if self.released:
            raise RuntimeError(f"{self!r} was released")
        if require_dir:
            try:
                await tx.read(self.directory)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.what}: {self.directory} does not exist") from None
        try:
            await claim_in(tx, self.key, self.record, what=f"{self.what} ({self.directory})")
        except DeviceInUse:
            raise
        except ResourceBusy as exc:  # the device flavour, same errno and message
            raise DeviceInUse(str(exc.strerror), exc.holder) from None

    async def acquire(self) -> Claim:
        """Take the claim in its own transaction (see [`take_in`][]); returns self."""
        await self.store.transact(self.take_in)
        return self

    async def held_in(self, tx: Any) -> bool:
        """Whether the record in ``directory`` is still ours (inside ``tx``)."""
        holder = await read_holder(tx, self.directory)
        return holder is not None and holder.claim == self.record.claim

    async def release(self) -> bool:
        """Remove our record if it is still ours; afterwards the claim counts as dead even
        if XenStore could not be reached.  Returns whether a record was removed."""

        async def body(tx: Any) -> bool:
            return await release_in(tx, self.key, self.record)

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
        forget(self.record)


__all__ = ["OWNER_KEY", "Claim", "DeviceInUse", "holder_alive", "read_holder"]
