"""unix grant-ref allocation: the C-speed free-ref scan and the batched table I/O.

``find_free_refs`` is checked against the obvious record-by-record scan; the real table is
driven through fragmentation, reuse, wrap past the end of the file and exhaustion, and the
on-disk entries are compared with what the live shares hold.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioxen import PAGE_SIZE
from aioxen.platforms._unix_grants import (
    ENTRY,
    ENTRY_SIZE,
    F_IN_USE,
    F_READONLY,
    FIRST_REF,
    HEADER,
    HEADER_MAGIC,
    HEADER_VERSION,
    MAX_REFS,
    UnixShare,
    find_free_refs,
    read_entries,
    ref_runs,
)
from aioxen.platforms.unix import UnixPlatform


def reference_free_refs(table: bytes, npages: int) -> list[int]:
    """The original allocator: record by record, lowest free first."""
    refs: list[int] = []
    ref = FIRST_REF
    while len(refs) < npages:
        off = ref * ENTRY_SIZE
        if off + ENTRY_SIZE > len(table) or not ENTRY.unpack_from(table, off)[0] & F_IN_USE:
            refs.append(ref)
        ref += 1
    return refs


def table_bytes(flags: list[int], tail: bytes = b"") -> bytes:
    """A table whose ref ``FIRST_REF + i`` has flags ``flags[i]`` (plus a ragged ``tail``)."""
    head = HEADER.pack(HEADER_MAGIC, HEADER_VERSION, 0, 1, 0).ljust(FIRST_REF * ENTRY_SIZE, b"\0")
    body = b"".join(ENTRY.pack(f, 1, 7, 0, 0) for f in flags)
    return head + body + tail


@settings(max_examples=300)
@given(
    flags=st.lists(st.sampled_from([0, F_IN_USE, F_IN_USE | F_READONLY, F_READONLY, 0x100])),
    npages=st.integers(0, 40),
    tail=st.binary(max_size=ENTRY_SIZE - 1),
)
def test_find_free_refs_matches_reference(flags: list[int], npages: int, tail: bytes) -> None:
    table = table_bytes(flags, tail)
    got = find_free_refs(table, npages)
    assert got == reference_free_refs(table, npages)
    assert len(set(got)) == len(got) == npages
    assert all(r >= FIRST_REF for r in got)


def test_find_free_refs_edge_cases() -> None:
    assert find_free_refs(b"", 3) == [8, 9, 10]
    assert find_free_refs(table_bytes([]), 2) == [8, 9]
    assert find_free_refs(table_bytes([F_IN_USE] * 5), 2) == [13, 14]
    # Free refs inside the table first, then past its end.
    assert find_free_refs(table_bytes([F_IN_USE, 0, F_IN_USE, 0, F_IN_USE]), 4) == [9, 11, 13, 14]
    # Only the F_IN_USE bit of the flags counts (read-only alone, or high bits, are free).
    assert find_free_refs(table_bytes([F_READONLY, 0x100, F_IN_USE]), 3) == [8, 9, 11]
    # A ragged last record counts as free (it is overwritten whole).
    assert find_free_refs(table_bytes([F_IN_USE], b"\x01\x00\x02"), 1) == [9]


@given(st.lists(st.integers(0, 60), unique=True))
def test_ref_runs_cover_refs_in_order(refs: list[int]) -> None:
    runs = ref_runs(refs)
    assert [r for first, count in runs for r in range(first, first + count)] == refs
    assert all(count >= 1 for _, count in runs)
    # Maximal: adjacent runs never continue each other.
    for (f1, c1), (f2, _) in itertools.pairwise(runs):
        assert f2 != f1 + c1


def live_entries(shares: list[UnixShare]) -> dict[int, tuple[int, int]]:
    """``{ref: (share id, page)}`` the live shares own."""
    return {r: (s.share_id, i) for s in shares for i, r in enumerate(s.refs)}


def check_table(root: str, shares: list[UnixShare]) -> None:
    path = os.path.join(root, "grants", "1", "table")
    entries = read_entries(path) if os.path.exists(path) else {}  # created by the first share
    assert {r: (e[2], e[3]) for r, e in entries.items()} == live_entries(shares)
    assert all(e[1] == 2 and e[4] == os.getpid() for e in entries.values())


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("share"), st.integers(1, 20)),
            st.tuples(st.just("close"), st.integers(0, 1000)),
        ),
        max_size=30,
    )
)
async def test_allocation_model(ops: list[tuple[str, int]]) -> None:
    """Shares and closes in any order: refs are unique, freed refs are reused lowest
    first (exactly the model's choice), and the table holds exactly the live entries."""
    root = tempfile.mkdtemp(prefix="aioxen-alloc-")
    try:
        async with UnixPlatform(1, root) as a:
            shares: list[UnixShare] = []
            for op, n in ops:
                if op == "share":
                    used = set(live_entries(shares))
                    expect = [r for r in range(FIRST_REF, FIRST_REF + 1000) if r not in used][:n]
                    s = a.grants.share(2, n, writable=n % 2 == 0)
                    assert s.refs == expect
                    shares.append(s)
                elif shares:
                    shares.pop(n % len(shares)).close()
                check_table(root, shares)
            for s in shares:
                s.close()
            check_table(root, [])
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_fragmented_table_reuses_holes_and_maps(tmp_path: Path) -> None:
    """A share spanning several holes is mapped page by page in share order."""
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        singles = [a.grants.share(2, 1) for _ in range(10)]
        for s in singles[1::3]:
            s.close()  # holes at refs 9, 12, 15
        big = a.grants.share(2, 5)
        assert big.refs == [9, 12, 15, 18, 19]
        for i in range(5):
            big.buf[i * PAGE_SIZE] = 0x40 + i
        m = b.grants.map(1, big.refs)
        assert bytes(m.buf[i * PAGE_SIZE] for i in range(5)) == b"\x40\x41\x42\x43\x44"
        # Any order and subset composes the same pages.
        m2 = b.grants.map(1, [big.refs[4], big.refs[0], big.refs[2]], writable=False)
        assert bytes(m2.buf[i * PAGE_SIZE] for i in range(3)) == b"\x44\x40\x42"
        m.close()
        m2.close()
        big.close()
        for s in singles:
            s.close()
        assert read_entries(str(tmp_path / "grants" / "1" / "table")) == {}


async def test_map_checks_every_ref_in_a_run(tmp_path: Path) -> None:
    """Batched table reads still check each ref: a revoked ref in the middle of a run of
    valid ones, a ref past the table's end and a read-only ref in a writable map fail with
    that ref's message."""
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        s1 = a.grants.share(2, 3)
        s2 = a.grants.share(2, 1)
        s3 = a.grants.share(2, 2, writable=False)
        assert (s1.refs, s2.refs, s3.refs) == ([8, 9, 10], [11], [12, 13])
        s2.close()
        with pytest.raises(FileNotFoundError, match="grant ref 11 of domain 1"):
            b.grants.map(1, [8, 9, 10, 11, 12])
        with pytest.raises(FileNotFoundError, match="grant ref 500 of domain 1"):
            b.grants.map(1, [8, 500])
        with pytest.raises(PermissionError, match="grant ref 13 of domain 1 is read-only"):
            b.grants.map(1, [9, 10, 13])
        m = b.grants.map(1, [13, 12, 10, 9, 8], writable=False)
        assert len(m.buf) == 5 * PAGE_SIZE
        m.close()
        for s in (s1, s3):
            s.close()
        assert b.grants.live() == [] and a.grants.live() == []


async def test_revoke_leaves_other_shares_entries_alone(tmp_path: Path) -> None:
    """Closing a share clears only its own entries, even inside one run of refs that
    other shares (here: of another process playing the same domid) interleave with."""
    async with UnixPlatform(1, tmp_path) as a1, UnixPlatform(1, tmp_path) as a2:
        x = [a1.grants.share(2, 1) for _ in range(3)]
        y = [a2.grants.share(2, 1) for _ in range(3)]
        x[1].close()
        z = a2.grants.share(2, 1)  # takes x[1]'s ref, inside the run 8..13
        assert z.refs == x[1].refs
        for s in (x[0], x[2]):
            s.close()
        entries = read_entries(str(tmp_path / "grants" / "1" / "table"))
        assert sorted(entries) == sorted(r for s in [*y, z] for r in s.refs)
        for s in [*y, z]:
            s.close()


async def test_exhaustion_and_the_last_refs(tmp_path: Path) -> None:
    """A table with every ref below MAX_REFS - 2 in use: the last two refs can be shared,
    then the table is full (OSError naming it) and nothing is left behind."""
    d = tmp_path / "grants" / "1"
    d.mkdir(parents=True, mode=0o700)
    d.parent.chmod(0o700)  # parents=True makes the parent with the default mode
    table = d / "table"
    nused = MAX_REFS - 2 - FIRST_REF
    header = HEADER.pack(HEADER_MAGIC, HEADER_VERSION, 0, 100, 0).ljust(
        FIRST_REF * ENTRY_SIZE, b"\0"
    )
    table.write_bytes(header + ENTRY.pack(F_IN_USE, 2, 99, 0, 1) * nused)
    async with UnixPlatform(1, tmp_path) as a:
        with pytest.raises(OSError, match="is full"):
            a.grants.share(2, 3)
        last = a.grants.share(2, 2)
        assert last.refs == [MAX_REFS - 2, MAX_REFS - 1]
        assert last.share_id == 100  # the failed share consumed no share id
        with pytest.raises(OSError, match="is full"):
            a.grants.share(2, 1)
        assert sorted(os.listdir(d)) == ["share-100", "table"]
        last.close()
        again = a.grants.share(2, 1)
        assert again.refs == [MAX_REFS - 2]
        again.close()
    assert sorted(os.listdir(d)) == ["table"]


async def test_remote_table_kept_open_only_once_it_exists(tmp_path: Path) -> None:
    """A map before the granter has a table fails (and caches nothing); later maps use the
    table kept open; closing the platform closes it."""
    before = set(os.listdir("/proc/self/fd"))
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        with pytest.raises(FileNotFoundError, match="has no grant table"):
            b.grants.map(1, [8])
        s = a.grants.share(2, 2)
        for _ in range(3):
            m = b.grants.map(1, s.refs)
            m.close()
        s.close()
        with pytest.raises(FileNotFoundError, match="grant ref 8 of domain 1"):
            b.grants.map(1, [8])  # revoked: seen through the kept-open table
    assert set(os.listdir("/proc/self/fd")) == before
