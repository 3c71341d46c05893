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
Every file is opened with [`open_file`][aioxen.platforms._rootdir.open_file] (``O_NOFOLLOW``,
regular files only; ``O_EXCL`` for new share files) in directories checked to be private.

``share`` creates the backing file, writes the entries and ``mmap``\\ s the whole file for the
owner.  ``share.close()`` clears the entries and unlinks the file: new maps fail with
``FileNotFoundError`` while existing mappings keep the (now anonymous) pages alive and valid on
both sides.  ``map`` opens each distinct backing file (read-only for read-only maps) and
composes the pages contiguously with [`ComposedPages`][aioxen.platforms._pagemap.ComposedPages]
(``MAP_FIXED`` per page, ``PROT_READ`` for read-only maps).

Unmap notification: a clean ``close`` of a share or writable mapping clears the byte (with
``pwrite`` on the backing file, visible through every mapping) and notifies the channel.  If
the process dies instead, the channel's peer does it on its behalf from a record the process
kept ([`aioxen.platforms._unix_death`][], [`clear_granted_byte`][]), as Xen's kernel would.
Grants of a dead process stay in the table (with its pid) and its page files stay until the
root is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from aioxen.errors import ProtocolError
from aioxen.platforms._grants_common import ComposedMapping, FileShare, GrantTableBase
from aioxen.platforms._pagemap import ComposedPages
from aioxen.platforms._rootdir import open_file
from aioxen.platforms._unix_events import UnixEventChannel
from aioxen.platforms.base import PAGE_SIZE, EventChannel

if TYPE_CHECKING:
    from aioxen.platforms.unix import UnixPlatform

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
    with open(open_file(path, os.O_RDONLY), "rb") as f:
        data = f.read()
    out = {}
    for ref in range(FIRST_REF, len(data) // ENTRY_SIZE):
        entry = ENTRY.unpack_from(data, ref * ENTRY_SIZE)
        if entry[0] & F_IN_USE:
            out[ref] = entry
    return out


_FREE_ENTRY = bytes(ENTRY_SIZE)
_IN_USE_BYTE = bytes(1 if b & F_IN_USE else 0 for b in range(256))
"""``bytes.translate`` table: a record's first byte (low byte of ``flags``) -> 1 if in use."""


def find_free_refs(table: bytes, npages: int) -> list[int]:
    """The ``npages`` lowest free refs (>= ``FIRST_REF``) of the table contents ``table``.

    A ref is free if its record's ``F_IN_USE`` bit is clear or the record lies (even
    partly) beyond the end of ``table``.  The scan runs at C speed: a stride slice picks
    every record's flags byte, ``translate`` maps it to 0 (free) / 1 (in use), and
    ``find`` jumps from one run of free refs to the next.  The result may exceed
    ``MAX_REFS``; the caller checks.
    """
    if npages <= 0:
        return []
    nrecords = len(table) // ENTRY_SIZE
    used = table[: nrecords * ENTRY_SIZE : ENTRY_SIZE].translate(_IN_USE_BYTE)
    refs: list[int] = []
    need = npages
    pos = FIRST_REF
    while need:
        start = used.find(0, pos)
        if start < 0:
            start = max(pos, nrecords)
            refs.extend(range(start, start + need))
            break
        end = used.find(1, start)
        if end < 0:
            end = nrecords
        take = min(end - start, need)
        refs.extend(range(start, start + take))
        need -= take
        pos = end
    return refs


def ref_runs(refs: Sequence[int]) -> list[tuple[int, int]]:
    """``refs`` (in the given order) as ``(first, count)`` runs of consecutive ascending
    refs -- one ``pread``/``pwrite`` per run instead of one per ref."""
    runs: list[tuple[int, int]] = []
    first = prev = -2
    for r in refs:
        if r == prev + 1:
            prev = r
            continue
        if first >= 0:
            runs.append((first, prev - first + 1))
        first = prev = r
    if first >= 0:
        runs.append((first, prev - first + 1))
    return runs


def _read_refs(tfd: int, refs: Sequence[int]) -> dict[int, bytes]:
    """The raw records of ``refs`` (>= ``FIRST_REF``; shorter than a record if beyond the
    end of the table), one ``pread`` per run of consecutive refs."""
    out: dict[int, bytes] = {}
    for first, count in ref_runs(sorted({r for r in refs if r >= FIRST_REF})):
        raw = os.pread(tfd, count * ENTRY_SIZE, first * ENTRY_SIZE)
        for i in range(count):
            out[first + i] = raw[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE]
    return out


def clear_granted_byte(root: str, granter: int, ref: int, offset: int) -> None:
    """Write 0 at ``offset`` of the page behind grant ``ref`` of domain ``granter``, through
    its share's backing file (the unmap notification a dead process could not perform:
    [`aioxen.platforms._unix_death`][]).  A revoked ref or a vanished file is skipped."""
    d = os.path.join(root, "grants", str(granter))
    try:
        tfd = open_file(os.path.join(d, TABLE_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        with _flock(tfd, exclusive=False):
            raw = os.pread(tfd, ENTRY_SIZE, ref * ENTRY_SIZE)
    finally:
        os.close(tfd)
    if len(raw) < ENTRY_SIZE:
        return
    flags, _grantee, share_id, page, _pid = ENTRY.unpack(raw)
    if not flags & F_IN_USE:
        return
    try:
        fd = open_file(os.path.join(d, share_file_name(share_id)), os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        if (page + 1) * PAGE_SIZE <= os.fstat(fd).st_size:
            os.pwrite(fd, b"\0", page * PAGE_SIZE + offset)
    finally:
        os.close(fd)


class _DeathNotify:
    """Mixin of [`UnixShare`][] and [`UnixMapping`][]: keep a byte-clearing unmap
    notification on record with its channel, so that the channel's peer performs it if
    this process dies ([`aioxen.platforms._unix_death`][])."""

    _refs: list[int]
    _death_channel: UnixEventChannel | None = None
    _death_token: int | None = None

    def _granter(self) -> int:
        raise NotImplementedError

    def _death_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        if self._death_channel is not None and self._death_token is not None:
            self._death_channel.withdraw_death_clear(self._death_token)
        self._death_channel = self._death_token = None
        if offset is not None and isinstance(channel, UnixEventChannel):
            spec = (self._granter(), self._refs[offset // PAGE_SIZE], offset % PAGE_SIZE)
            self._death_token = channel.add_death_clear(spec)
            self._death_channel = channel


class UnixShare(_DeathNotify, FileShare["UnixGrantTable"]):
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
        super().__init__(table, remote_domid, refs, writable, fd)
        self._share_id = share_id

    @property
    def share_id(self) -> int:
        return self._share_id

    def _granter(self) -> int:
        table = self._table
        return table.domid if table is not None else -1

    def __repr__(self) -> str:
        return (
            f"<UnixShare id={self._share_id} to {self._remote_domid} refs={self._refs} "
            f"{self._mode_state()}>"
        )


class UnixMapping(_DeathNotify, ComposedMapping["UnixGrantTable"]):
    """Another domain's granted pages, mapped contiguously."""

    def _granter(self) -> int:
        return self._remote_domid


class UnixGrantTable(GrantTableBase[UnixShare, UnixMapping]):
    """The MEMORY implementation of one [`UnixPlatform`][]."""

    def __init__(self, platform: UnixPlatform) -> None:
        super().__init__(set())
        self._platform = platform
        self._table_fd: int | None = None
        self._remote_tables: dict[int, int] = {}  # domid -> read-only table fd (maps)
        # The backing file of the share mapped last: (domid, share id, writable, fd, size).
        # A vchan client maps three ranges of one share in a row (control page, rings);
        # the later maps dup() this fd instead of opening and checking the file again.
        # Safe: share ids are never reused within a root, the entries are still checked
        # under the lock on every map, and share files never shrink.  It pins at most one
        # share's pages after that share is revoked, until the next map or close_all.
        self._last_backing: tuple[int, int, bool, int, int] | None = None
        self._dirs: dict[int, str] = {}  # domid -> domain_dir (the root never changes)

    @property
    def domid(self) -> int:
        return self._platform.domid

    def domain_dir(self, domid: int) -> str:
        d = self._dirs.get(domid)
        if d is None:
            d = self._dirs[domid] = os.path.join(self._platform.root, "grants", str(domid))
        return d

    def _own_table(self) -> int:
        if self._table_fd is None:
            d = self._platform._ensure_dir("grants", str(self.domid))
            self._table_fd = open_file(os.path.join(d, TABLE_NAME), os.O_RDWR | os.O_CREAT)
        return self._table_fd

    # -- export --------------------------------------------------------------------------
    def _share(self, remote_domid: int, npages: int, writable: bool) -> UnixShare:
        tfd = self._own_table()
        d = self.domain_dir(self.domid)
        table_path = os.path.join(d, TABLE_NAME)
        flags = F_IN_USE | (0 if writable else F_READONLY)
        pid = os.getpid() & 0xFFFFFFFF
        with _flock(tfd, exclusive=True):
            share_id, size = _read_header(tfd, table_path)
            data = os.pread(tfd, size, 0)
            refs = find_free_refs(data, npages)
            if refs[-1] >= MAX_REFS:
                raise OSError(f"grant table {table_path} is full ({MAX_REFS} refs)")
            os.pwrite(tfd, HEADER.pack(HEADER_MAGIC, HEADER_VERSION, 0, share_id + 1, 0), 0)
            path = os.path.join(d, share_file_name(share_id))
            fd = open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                os.ftruncate(fd, npages * PAGE_SIZE)
                pack = ENTRY.pack
                page = 0
                for first, count in ref_runs(refs):  # one pwrite per run of free refs
                    records = [
                        pack(flags, remote_domid, share_id, p, pid)
                        for p in range(page, page + count)
                    ]
                    os.pwrite(tfd, b"".join(records), first * ENTRY_SIZE)
                    page += count
                share = UnixShare(self, share_id, fd, refs, remote_domid, writable)
            except BaseException:
                self._clear_entries(tfd, share_id, refs)
                os.close(fd)
                os.unlink(path)
                raise
        return share

    def _release(self, obj: UnixShare | UnixMapping) -> None:
        if isinstance(obj, UnixShare):
            self._revoke(obj.share_id, obj._refs)
        self._live.discard(obj)

    def _revoke(self, share_id: int, refs: Sequence[int]) -> None:
        tfd = self._own_table()
        d = self.domain_dir(self.domid)
        with _flock(tfd, exclusive=True):
            self._clear_entries(tfd, share_id, refs)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, share_file_name(share_id)))

    @staticmethod
    def _clear_entries(tfd: int, share_id: int, refs: Sequence[int]) -> None:
        """Zero the in-use entries of ``refs`` that still belong to ``share_id`` (caller
        holds LOCK_EX): one ``pread`` and at most one ``pwrite`` per run of refs."""
        for first, count in ref_runs(sorted(refs)):
            raw = bytearray(os.pread(tfd, count * ENTRY_SIZE, first * ENTRY_SIZE))
            if len(raw) == count * ENTRY_SIZE and all(
                flags & F_IN_USE and sid == share_id
                for flags, _, sid, _, _ in ENTRY.iter_unpack(raw)
            ):  # the usual case: the whole run is still ours
                os.pwrite(tfd, _FREE_ENTRY * count, first * ENTRY_SIZE)
                continue
            changed = False
            for off in range(0, len(raw) - ENTRY_SIZE + 1, ENTRY_SIZE):
                flags, _, sid, _, _ = ENTRY.unpack_from(raw, off)
                if flags & F_IN_USE and sid == share_id:
                    raw[off : off + ENTRY_SIZE] = _FREE_ENTRY
                    changed = True
            if changed:
                os.pwrite(tfd, raw, first * ENTRY_SIZE)

    # -- import --------------------------------------------------------------------------
    def _remote_table(self, remote_domid: int, d: str, first_ref: int) -> int:
        """A read-only fd of ``remote_domid``'s table, kept open after the first map (a
        table file is never replaced while its root exists)."""
        tfd = self._remote_tables.get(remote_domid)
        if tfd is None:
            table_path = os.path.join(d, TABLE_NAME)
            try:
                self._platform._check_dir("grants", str(remote_domid))
                tfd = open_file(table_path, os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"grant ref {first_ref} of domain {remote_domid} does not exist "
                    f"(domain {remote_domid} has no grant table {table_path})"
                ) from None
            self._remote_tables[remote_domid] = tfd
        return tfd

    def _map(self, remote_domid: int, refs: list[int], writable: bool) -> UnixMapping:
        d = self.domain_dir(remote_domid)
        tfd = self._remote_table(remote_domid, d, refs[0])
        fds: dict[int, int] = {}
        sizes: dict[int, int] = {}
        sources: list[tuple[int, int]] = []
        try:
            with _flock(tfd, exclusive=False):
                checked = self._check_run(tfd, refs, remote_domid, writable)
                if checked is None:  # not one ascending run: entry by entry
                    entries = _read_refs(tfd, refs)
                    checked = [
                        self._check_entry(entries.get(ref, b""), remote_domid, ref, writable)
                        for ref in refs
                    ]
                for ref, (share_id, page) in zip(refs, checked, strict=True):
                    fd = fds.get(share_id)
                    if fd is None:
                        fd, sizes[share_id] = self._backing(
                            d, remote_domid, ref, share_id, writable
                        )
                        fds[share_id] = fd
                    if (page + 1) * PAGE_SIZE > sizes[share_id]:
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
        pages = ComposedPages(sources, writable, list(fds.values()))
        return UnixMapping(self, remote_domid, refs, writable, pages)

    def _backing(
        self, d: str, remote_domid: int, ref: int, share_id: int, writable: bool
    ) -> tuple[int, int]:
        """A new fd of share ``share_id``'s backing file and its size (caller holds the
        table's lock and checked the entry): a ``dup`` of the last one's if it is the
        same share, else opened (and remembered)."""
        last = self._last_backing
        if last is not None and last[:2] == (remote_domid, share_id) and (last[2] or not writable):
            # A writable fd serves a read-only map too: the pages are mapped PROT_READ.
            return os.dup(last[3]), last[4]
        fd = self._open_backing(d, remote_domid, ref, share_id, writable)
        try:
            size = os.fstat(fd).st_size
            keep = os.dup(fd)
        except BaseException:
            os.close(fd)
            raise
        self._forget_backing()
        self._last_backing = (remote_domid, share_id, writable, keep, size)
        return fd, size

    def _forget_backing(self) -> None:
        last, self._last_backing = self._last_backing, None
        if last is not None:
            os.close(last[3])

    def _check_run(
        self, tfd: int, refs: list[int], remote_domid: int, writable: bool
    ) -> list[tuple[int, int]] | None:
        """Fast path for ``refs`` that are one run of consecutive ascending refs (a vchan
        ring, a share mapped whole): one ``pread`` and one pass over the records, each
        checked as [`_check_entry`][] does.  ``None`` if ``refs`` is not such a run, or
        anything is wrong (the caller then takes the entry-by-entry path, which raises the
        precise error)."""
        first, n = refs[0], len(refs)
        if first < FIRST_REF or refs[-1] != first + n - 1 or (n > 1 and refs[1] != first + 1):
            return None
        if n > 2 and refs != list(range(first, first + n)):
            return None
        raw = os.pread(tfd, n * ENTRY_SIZE, first * ENTRY_SIZE)
        if len(raw) != n * ENTRY_SIZE:
            return None
        bad = F_READONLY if writable else 0
        me = self.domid
        out = []
        for flags, grantee, share_id, page, _pid in ENTRY.iter_unpack(raw):
            if not flags & F_IN_USE or flags & bad or grantee != me:
                return None
            out.append((share_id, page))
        return out

    def _check_entry(
        self, raw: bytes, remote_domid: int, ref: int, writable: bool
    ) -> tuple[int, int]:
        what = f"grant ref {ref} of domain {remote_domid}"
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
            return open_file(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"grant ref {ref} of domain {remote_domid} was revoked ({path} is gone)"
            ) from None

    # -- bookkeeping ---------------------------------------------------------------------
    def close_all(self, ignore_busy: bool = False) -> None:
        """Close every mapping, then every share, then the table files."""
        super().close_all(ignore_busy)
        self._forget_backing()
        if self._table_fd is not None:
            os.close(self._table_fd)
            self._table_fd = None
        tables, self._remote_tables = self._remote_tables, {}
        for fd in tables.values():
            os.close(fd)


__all__ = [
    "ENTRY",
    "FIRST_REF",
    "F_IN_USE",
    "F_READONLY",
    "HEADER",
    "UnixGrantTable",
    "UnixMapping",
    "UnixShare",
    "find_free_refs",
    "read_entries",
    "ref_runs",
    "share_file_name",
]
