"""Mapping a run of consecutive grant refs on the ``unix`` platform (one table read for the
whole run): the same memory and the same precise errors as entry-by-entry mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from aioxen import PAGE_SIZE
from aioxen.platforms.unix import UnixPlatform


async def test_run_maps_the_granted_pages_in_order(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        share = a.grants.share(2, 6)
        for i in range(6):
            share.buf[i * PAGE_SIZE] = i + 1
        refs = share.refs
        assert refs == list(range(refs[0], refs[0] + 6))
        m = b.grants.map(1, refs[1:5], writable=False)
        assert [m.buf[i * PAGE_SIZE] for i in range(4)] == [2, 3, 4, 5]
        m.close()
        w = b.grants.map(1, refs, writable=True)
        w.buf[3 * PAGE_SIZE + 1] = 0x5A
        assert share.buf[3 * PAGE_SIZE + 1] == 0x5A
        w.close()
        r = b.grants.map(1, list(reversed(refs[:3])), writable=False)  # not ascending
        assert [r.buf[i * PAGE_SIZE] for i in range(3)] == [3, 2, 1]
        r.close()
        share.close()


async def test_run_with_a_bad_entry_raises_the_precise_error(tmp_path: Path) -> None:
    async with (
        UnixPlatform(1, tmp_path) as a,
        UnixPlatform(2, tmp_path) as b,
        UnixPlatform(3, tmp_path) as c,
    ):
        s1 = a.grants.share(2, 2)
        ro = a.grants.share(2, 2, writable=False)
        other = a.grants.share(3, 2)
        refs = s1.refs + ro.refs + other.refs
        assert refs == list(range(refs[0], refs[0] + 6))
        with pytest.raises(PermissionError, match="read-only"):
            b.grants.map(1, refs[:4], writable=True)
        with pytest.raises(PermissionError, match="granted to domain 3"):
            b.grants.map(1, refs[2:6], writable=False)
        m = b.grants.map(1, refs[:4], writable=False)  # read-only run over both shares
        m.close()
        revoked = s1.refs[1]
        s1.close()
        with pytest.raises(FileNotFoundError, match=f"grant ref {revoked} "):
            b.grants.map(1, refs[1:4], writable=False)
        with pytest.raises(FileNotFoundError):
            b.grants.map(1, [refs[-1] + 1, refs[-1] + 2], writable=False)  # beyond the table
        ro.close()
        other.close()
        assert c.grants.live() == []


async def test_revoke_frees_only_entries_still_owned_by_the_share(tmp_path: Path) -> None:
    import os

    from aioxen.platforms._unix_grants import ENTRY, ENTRY_SIZE, TABLE_NAME, read_entries

    async with UnixPlatform(1, tmp_path) as a:
        keep = a.grants.share(2, 3)
        gone = a.grants.share(2, 4)
        table = os.path.join(a.grants.domain_dir(1), TABLE_NAME)
        gone.close()  # the whole run is still its own: cleared in one write
        entries = read_entries(table)
        assert sorted(entries) == keep.refs
        third = a.grants.share(2, 4)  # reuses the freed refs
        assert third.refs == gone.refs
        # An entry of `third` taken over by another share id (as after a crash and a
        # reallocation): revoking `third` must leave it alone.
        foreign = ENTRY.pack(1, 2, 999, 0, 0)
        fd = os.open(table, os.O_RDWR)
        try:
            os.pwrite(fd, foreign, third.refs[2] * ENTRY_SIZE)
        finally:
            os.close(fd)
        third.close()
        entries = read_entries(table)
        assert sorted(entries) == sorted([*keep.refs, third.refs[2]])
        assert entries[third.refs[2]][2] == 999
        keep.close()


async def test_maps_of_one_share_in_a_row_open_its_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vchan client maps the control page and both rings of one share in a row: the
    backing file is opened once and the later maps reuse it -- while every map still
    checks the entries, so a revoked ref fails as before and the fd is released."""
    from aioxen.platforms import _unix_grants

    opened: list[str] = []
    real_open = _unix_grants.open_file

    def spy(path: str, flags: int, mode: int = 0o600) -> int:
        opened.append(path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(_unix_grants, "open_file", spy)
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        share = a.grants.share(2, 5)
        share.buf[PAGE_SIZE] = 7
        refs = share.refs
        b.grants.map(1, refs[:1]).close()  # (opens the table, then the share file)
        opened.clear()
        left = b.grants.map(1, refs[1:3], writable=True)
        right = b.grants.map(1, refs[3:], writable=False)
        assert opened == []  # both served by the file the first map opened
        assert left.buf[0] == 7
        left.buf[1] = 9
        assert share.buf[PAGE_SIZE + 1] == 9
        with pytest.raises(TypeError):
            right.buf[0] = 1  # still a read-only view
        left.close()
        right.close()
        share.close()
        with pytest.raises(FileNotFoundError, match=f"grant ref {refs[1]} "):
            b.grants.map(1, refs[1:3])
        other = a.grants.share(2, 1)
        opened.clear()
        b.grants.map(1, other.refs).close()  # another share: opened, the old fd let go
        assert opened == [str(tmp_path / "grants" / "1" / f"share-{other.share_id}")]
        other.close()
