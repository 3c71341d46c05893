"""The ``unix`` platform's unmap notification on process death.

Theory of operation
-------------------
On Xen, a share's or mapping's unmap notification (``set_unmap_notify(offset, channel)``)
happens when the object is closed *or when its process dies*: the kernel clears the byte
and sends the event.  That is how protocols learn of a crashed peer (vchan's live bytes),
since Xen tells nobody that the other end of an event channel went away.  On ``unix`` a
clean ``close`` does it in-process ([`aioxen.platforms._grants_common.NotifyOnClose`][]);
for death, the *survivor* does it on the dead process's behalf:

* While a byte-clearing notification is registered on a channel end, the registering
  process keeps a record file ``$XEN_ROOT/evtchn/<domid>/<port>.clear`` beside its ports:
  one line per registration, ``<granting domid> <ref> <offset within the page>\n`` (the
  page is named by its grant, so the record means the same thing to every process).  The
  file is replaced atomically (write + ``rename``) whenever the set changes and removed
  once it is empty, and before the channel end closes.  The common case -- the first
  registration on a channel end, no record yet -- skips the temporary file: the record is
  created exclusively (``O_EXCL``) and written with one ``write``.  A reader that finds
  it empty or cut short is safe because only newline-terminated lines count (a record
  cut mid-line yields the complete lines before the cut, and the first write holds
  every line).
* The peer of that channel sees EOF on its socket when the process dies (its sockets close
  with it).  Before it reports the peer gone, it reads the dead end's record, finds each
  page through the granting domain's grant table (share id and page index), writes 0 at
  the byte through the share's backing file (which every mapping of the page sees),
  removes the record and delivers one event.  So the survivor observes what it would on
  Xen: the byte cleared and an event, then (a ``unix`` bonus) ``peer_lost``.

A record that names a revoked ref or a vanished file is skipped: a clean close already
did the clearing.  Records are trusted no more than the rest of ``$XEN_ROOT`` (one user),
and are opened, created and replaced with [`aioxen.platforms._rootdir`][]'s rules (never
through a link, ``O_EXCL`` when new, replaced by ``rename``).
"""

from __future__ import annotations

import contextlib
import os

from aioxen.platforms._rootdir import open_file, replace_file
from aioxen.platforms.base import PAGE_SIZE

RECORD_SUFFIX = ".clear"

ClearSpec = tuple[int, int, int]
"""(granting domid, grant ref, byte offset within that page)."""


def record_path(domain_dir: str, port: int) -> str:
    """Where channel end ``port`` of the domain in ``domain_dir`` keeps its record."""
    return os.path.join(domain_dir, f"{port}{RECORD_SUFFIX}")


def write_record(path: str, specs: list[ClearSpec]) -> None:
    """Replace the record at ``path`` with ``specs`` atomically (remove it if empty)."""
    if not specs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    data = "".join(f"{domid} {ref} {offset}\n" for domid, ref, offset in specs).encode()
    try:
        fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        pass  # replace the existing record atomically (below)
    else:
        # No record yet: write it in place (see the module docstring for why a reader
        # never takes a partial record for more than it says).
        try:
            if os.write(fd, data) == len(data):
                return
        finally:
            os.close(fd)
    replace_file(path, data)  # a temporary file beside it (O_EXCL), then rename


def read_record(path: str) -> list[ClearSpec]:
    """The specs in the record at ``path``; malformed lines, and a last line without its
    newline (a record being written), are ignored."""
    try:
        fd = open_file(path, os.O_RDONLY)  # never through a link
    except FileNotFoundError:
        return []
    with open(fd, encoding="ascii", errors="replace", newline="") as f:
        lines = f.read().split("\n")[:-1]  # only newline-terminated lines
    specs = []
    for line in lines:
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            domid, ref, offset = (int(f) for f in fields)
            if offset < PAGE_SIZE:
                specs.append((domid, ref, offset))
    return specs


def clear_for_dead_peer(root: str, path: str) -> bool:
    """Perform the dead process's notifications recorded at ``path`` and remove the record.

    Returns whether there was anything to do (the caller then delivers one event)."""
    from aioxen.platforms._unix_grants import clear_granted_byte

    specs = read_record(path)
    for domid, ref, offset in specs:
        clear_granted_byte(root, domid, ref, offset)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return bool(specs)


__all__ = [
    "RECORD_SUFFIX",
    "ClearSpec",
    "clear_for_dead_peer",
    "read_record",
    "record_path",
    "write_record",
]
