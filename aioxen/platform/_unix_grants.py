"""Unix grant tables: page files and a locked table file under ``$XEN_ROOT/grants/<domid>/``.

Theory of operation
-------------------
On-disk layout of one granting domain (directory 0700, files 0600):

``table``
    The grant table: 16-byte little-endian records, the record of grant ref ``r`` at byte
    ``16 * r``.  Refs 0..7 are reserved (as on Xen), so record 0 is free to hold the header
    ``"AXGT", u16 version (1), u16 0, u32 next_share_id, u32 0``.  An entry is
    ``u16 flags, u16 grantee domid, u32 share id, u32 page index, u32 owner pid`` with flags
    ``1 = in use`` and ``2 = read-only``; an all-zero record is a free ref.  Refs are taken
    lowest-free-first from 8.
``share-<id>``
    The backing file of one share: ``npages * 4096`` bytes, page ``i`` at offset ``4096*i``.
    Share ids come from the header counter and are never reused within a root.  Files are
    never truncated once created (a shrinking file would ``SIGBUS`` its mappers).

Concurrency: several processes may play one domid and any process may map.  Allocation and
revocation hold an exclusive ``flock`` on ``table``; ``map`` holds a shared one while it
reads the entries *and opens the backing files*, so a ref cannot be revoked between the check
and the open.  Every record read is validated (flags, page index within the file).

``share`` creates the backing file, writes the entries and ``mmap``\\ s the whole file for the
owner.  ``share.close()`` clears the entries and unlinks the file: new maps fail with
``FileNotFoundError`` while existing mappings keep the (now anonymous) pages alive and valid on
both sides.  ``map`` opens each distinct backing file (read-only for read-only maps) and
composes the pages contiguously with :class:`~aioxen.platform._pagemap.ComposedPages`
(``MAP_FIXED`` per page, ``PROT_READ`` for read-only maps).

Unmap notification: a clean ``close`` of a share or writable mapping clears the byte (with
``pwrite`` on the backing file, visible through every mapping) and notifies the channel.  If
the process dies instead, nothing runs — but its sockets close, so the peer's event channel
sees EOF and reports the peer gone: on this platform "peer lost" on the channel is the
process-death form of the unmap notification, and protocols must treat both alike.  Grants of
a dead process stay in the table (with its pid) and its page files stay until the root is
removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from aioxen.errors import ProtocolError
from aioxen.platform._pagemap import ComposedPages, check_refs, check_unmap_notify
from aioxen.platform.base import PAGE_SIZE, EventChannel, check_domid

if TYPE_CHECKING:
    from aioxen.platform.unix import UnixPlatform

HEADER = struct.Struct("<4sHHII")
HEADER_MAGIC = b"AXGT"
HEADER_VERSION = 1
ENTRY = struct.Struct("<HHIII")
ENTRY_SIZE = ENTRY.size
F_IN_USE = 0x1
F_READONLY = 0x2
FIRST_REF = 8
MAX_REFS = 1 << 20
TABLE_NAME = "table"


def share_file_name(share_id: int) -> str:
    return f"share-{share_id}"


@contextlib.contextmanager
def _flock(fd: int, exclusive: bool) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_header(fd: int, path: str) -> tuple[int, int]:
    """``(next_share_id, file size)``; initialises an empty table (caller holds LOCK_EX)."""
    raw = os.pread(fd, HEADER.size, 0)
    if not raw:
        os.pwrite(fd, HEADER.pack(HEADER_MAGIC, HEADER_VERSION, 0, 1, 0), 0)
        os.ftruncate(fd, FIRST_REF * ENTRY_SIZE)
        return 1, FIRST_REF * ENTRY_SIZE
    if len(raw) < HEADER.size:
        raise ProtocolError(f"grant table {path} is truncated", field="header")
    magic, version, _, next_id, _ = HEADER.unpack(raw)
    if magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise ProtocolError(
            f"grant table {path} has magic {magic!r} version {version}, expected "
            f"{HEADER_MAGIC!r} version {HEADER_VERSION}",
            field="magic",
        )
    return next_id, os.fstat(fd).st_size


def read_entries(path: str) -> dict[int, tuple[int, int, int, int, int]]:
    """All in-use entries of a table file: ``{ref: (flags, grantee, share, page, pid)}``."""
    with open(path, "rb") as f:
        data = f.read()
    out = {}
    for ref in range(FIRST_REF, len(data) // ENTRY_SIZE):
        entry = ENTRY.unpack_from(data, ref * ENTRY_SIZE)
        if entry[0] & F_IN_USE:
            out[ref] = entry
    return out


class UnixShare:
    """Pages exported by this domain: a backing file plus table entries."""

    def __init__(
        self,
        table: UnixGrantTable,
        share_id: int,
        fd: int,
        refs: list[int],
        remote_domid: int,
        writable: bool,
    ) -> None:
        self._table: UnixGrantTable | None = table
        self._share_id = share_id
        self._fd = fd
        self._refs = refs
        self._remote_domid = remote_domid
        self._writable = writable
        self._mm = mmap.mmap(fd, len(refs) * PAGE_SIZE)
        self._view: memoryview | None = memoryview(self._mm)
        self._notify_offset: int | None = None
        self._notify_channel: EventChannel | None = None

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def buf(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"share of refs {self._refs} is closed")
        return self._view

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def share_id(self) -> int:
        return self._share_id

    @property
    def closed(self) -> bool:
        return self._table is None

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        check_unmap_notify(offset, len(self._refs) * PAGE_SIZE, True, "share")
        self._notify_offset, self._notify_channel = offset, channel

    def close(self) -> None:
        table = self._table
        if table is None:
            return
        if self._view is not None:
            self._view.release()
            self._view = None
        try:
            self._mm.close()
        except BufferError:
            self._view = memoryview(self._mm)
            raise
        self._table = None
        table._revoke(self._share_id, self._refs)
        table._live.discard(self)
        if self._notify_offset is not None:
            os.pwrite(self._fd, b"\0", self._notify_offset)
        os.close(self._fd)
        if self._notify_channel is not None:
            self._notify_channel.notify()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        mode = "rw" if self._writable else "ro"
        return (
            f"<UnixShare id={self._share_id} to {self._remote_domid} refs={self._refs} "
            f"{mode} {state}>"
        )


class UnixMapping:
    """Another domain's granted pages, mapped contiguously."""

    def __init__(
        self, table: UnixGrantTable, remote_domid: int, refs: list[int], pages: ComposedPages
    ) -> None:
        self._table: UnixGrantTable | None = table
        self._remote_domid = remote_domid
        self._refs = refs
        self._pages = pages
        self._notify_offset: int | None = None
        self._notify_channel: EventChannel | None = None

    @property
    def buf(self) -> memoryview:
        return self._pages.view

    @property
    def writable(self) -> bool:
        return self._pages.writable

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def closed(self) -> bool:
        return self._table is None

    def address(self) -> int:
        """Start address of the mapping (to inspect ``/proc/self/maps``)."""
        return self._pages.address()

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        check_unmap_notify(offset, len(self._refs) * PAGE_SIZE, self.writable, "mapping")
        self._notify_offset, self._notify_channel = offset, channel

    def close(self) -> None:
        table = self._table
        if table is None:
            return
        self._pages.unmap()
        self._table = None
        table._live.discard(self)
        if self._notify_offset is not None:
            self._pages.clear_byte(self._notify_offset)
        self._pages.close_fds()
        if self._notify_channel is not None:
            self._notify_channel.notify()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        mode = "rw" if self.writable else "ro"
        return f"<UnixMapping of domain {self._remote_domid} refs={self._refs} {mode} {state}>"


class UnixGrantTable:
    """The MEMORY implementation of one :class:`UnixPlatform`."""

    def __init__(self, platform: UnixPlatform) -> None:
        self._platform = platform
        self._live: set[UnixShare | UnixMapping] = set()
        self._table_fd: int | None = None

    @property
    def domid(self) -> int:
        return self._platform.domid

    def domain_dir(self, domid: int) -> str:
        return os.path.join(self._platform.root, "grants", str(domid))

    def _own_table(self) -> int:
        if self._table_fd is None:
            d = self.domain_dir(self.domid)
            self._platform._ensure_dir(d)
            self._table_fd = os.open(
                os.path.join(d, TABLE_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        return self._table_fd

    # -- export --------------------------------------------------------------------------
    def share(self, remote_domid: int, npages: int, writable: bool = True) -> UnixShare:
        check_domid(remote_domid, "remote_domid")
        if not isinstance(npages, int) or isinstance(npages, bool) or npages < 1:
            raise ValueError(f"npages must be a positive int, not {npages!r}")
        tfd = self._own_table()
        d = self.domain_dir(self.domid)
        table_path = os.path.join(d, TABLE_NAME)
        flags = F_IN_USE | (0 if writable else F_READONLY)
        pid = os.getpid() & 0xFFFFFFFF
        with _flock(tfd, exclusive=True):
            share_id, size = _read_header(tfd, table_path)
            os.pwrite(tfd, HEADER.pack(HEADER_MAGIC, HEADER_VERSION, 0, share_id + 1, 0), 0)
            data = os.pread(tfd, size, 0)
            refs: list[int] = []
            ref = FIRST_REF
            while len(refs) < npages:
                off = ref * ENTRY_SIZE
                if off + ENTRY_SIZE > len(data) or not ENTRY.unpack_from(data, off)[0] & F_IN_USE:
                    refs.append(ref)
                ref += 1
            if refs[-1] >= MAX_REFS:
                raise OSError(f"grant table {table_path} is full ({MAX_REFS} refs)")
            path = os.path.join(d, share_file_name(share_id))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, npages * PAGE_SIZE)
                for i, r in enumerate(refs):
                    os.pwrite(
                        tfd, ENTRY.pack(flags, remote_domid, share_id, i, pid), r * ENTRY_SIZE
                    )
                share = UnixShare(self, share_id, fd, refs, remote_domid, writable)
            except BaseException:
                for r in refs:
                    if r * ENTRY_SIZE < os.fstat(tfd).st_size:
                        os.pwrite(tfd, bytes(ENTRY_SIZE), r * ENTRY_SIZE)
                os.close(fd)
                os.unlink(path)
                raise
        self._live.add(share)
        return share

    def _revoke(self, share_id: int, refs: Sequence[int]) -> None:
        tfd = self._own_table()
        d = self.domain_dir(self.domid)
        with _flock(tfd, exclusive=True):
            for r in refs:
                raw = os.pread(tfd, ENTRY_SIZE, r * ENTRY_SIZE)
                if len(raw) == ENTRY_SIZE:
                    flags, _, sid, _, _ = ENTRY.unpack(raw)
                    if flags & F_IN_USE and sid == share_id:
                        os.pwrite(tfd, bytes(ENTRY_SIZE), r * ENTRY_SIZE)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, share_file_name(share_id)))

    # -- import --------------------------------------------------------------------------
    def map(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> UnixMapping:
        check_domid(remote_domid, "remote_domid")
        ref_list = check_refs(refs, remote_domid)
        d = self.domain_dir(remote_domid)
        table_path = os.path.join(d, TABLE_NAME)
        try:
            tfd = os.open(table_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"grant ref {ref_list[0]} of domain {remote_domid} does not exist "
                f"(domain {remote_domid} has no grant table {table_path})"
            ) from None
        fds: dict[int, int] = {}
        sources: list[tuple[int, int]] = []
        try:
            with _flock(tfd, exclusive=False):
                for ref in ref_list:
                    share_id, page = self._check_entry(tfd, remote_domid, ref, writable)
                    fd = fds.get(share_id)
                    if fd is None:
                        fd = fds[share_id] = self._open_backing(
                            d, remote_domid, ref, share_id, writable
                        )
                    if (page + 1) * PAGE_SIZE > os.fstat(fd).st_size:
                        raise ProtocolError(
                            f"grant ref {ref} of domain {remote_domid} names page {page} beyond "
                            f"the end of {share_file_name(share_id)}",
                            field="page",
                        )
                    sources.append((fd, page * PAGE_SIZE))
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        finally:
            os.close(tfd)
        pages = ComposedPages(sources, writable, list(fds.values()))
        m = UnixMapping(self, remote_domid, ref_list, pages)
        self._live.add(m)
        return m

    def _check_entry(
        self, tfd: int, remote_domid: int, ref: int, writable: bool
    ) -> tuple[int, int]:
        what = f"grant ref {ref} of domain {remote_domid}"
        raw = os.pread(tfd, ENTRY_SIZE, ref * ENTRY_SIZE) if ref >= FIRST_REF else b""
        if len(raw) < ENTRY_SIZE:
            raise FileNotFoundError(f"{what} does not exist or was revoked")
        flags, grantee, share_id, page, _pid = ENTRY.unpack(raw)
        if not flags & F_IN_USE:
            raise FileNotFoundError(f"{what} does not exist or was revoked")
        if grantee != self.domid:
            raise PermissionError(
                f"{what} is granted to domain {grantee}, not to domain {self.domid}"
            )
        if writable and flags & F_READONLY:
            raise PermissionError(f"{what} is read-only; map it with writable=False")
        return share_id, page

    @staticmethod
    def _open_backing(d: str, remote_domid: int, ref: int, share_id: int, writable: bool) -> int:
        path = os.path.join(d, share_file_name(share_id))
        try:
            return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"grant ref {ref} of domain {remote_domid} was revoked ({path} is gone)"
            ) from None

    # -- bookkeeping ---------------------------------------------------------------------
    def live(self) -> list[UnixShare | UnixMapping]:
        return list(self._live)

    def close_all(self) -> None:
        mappings = [o for o in self._live if isinstance(o, UnixMapping)]
        for m in mappings:
            m.close()
        for obj in list(self._live):
            obj.close()
        if self._table_fd is not None:
            os.close(self._table_fd)
            self._table_fd = None


__all__ = [
    "ENTRY",
    "FIRST_REF",
    "F_IN_USE",
    "F_READONLY",
    "HEADER",
    "UnixGrantTable",
    "UnixMapping",
    "UnixShare",
    "read_entries",
    "share_file_name",
]
