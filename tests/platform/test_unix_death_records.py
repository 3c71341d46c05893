"""The death-notification records of the ``unix`` platform (``aioxen.platforms._unix_death``):
what a survivor does with a record it finds, including records it must not trust."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen import PAGE_SIZE
from aioxen.platforms._unix_death import (
    clear_for_dead_peer,
    read_record,
    record_path,
    write_record,
)
from aioxen.platforms.unix import UnixPlatform


def test_write_read_roundtrip_and_empty_removes(tmp_path: Path) -> None:
    path = record_path(str(tmp_path), 7)
    assert path.endswith("7.clear")
    write_record(path, [(1, 8, 0), (2, 4095, 4095)])
    assert read_record(path) == [(1, 8, 0), (2, 4095, 4095)]
    write_record(path, [])
    assert not os.path.exists(path)
    assert read_record(path) == []  # a missing record is an empty one


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_records_yield_only_well_formed_specs(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "1.clear")
        with open(path, "wb") as f:
            f.write(data)
        for domid, ref, offset in read_record(path):
            assert domid >= 0 and ref >= 0 and 0 <= offset < PAGE_SIZE


def test_out_of_page_offsets_and_malformed_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "3.clear"
    path.write_text("1 8 4096\n1 8\nx y z\n-1 8 0\n1 9 17\n")
    assert read_record(str(path)) == [(1, 9, 17)]


async def test_survivor_skips_unknown_refs_domains_and_clears_known(tmp_path: Path) -> None:
    root = tmp_path / "xenroot"
    async with UnixPlatform(domid=1, root=root) as plat:
        share = plat.grants.share(2, 2)
        share.buf[PAGE_SIZE + 5] = 1
        share.buf[5] = 1
        path = record_path(str(tmp_path), 9)
        # a ref nobody granted, a domain without a table, then the real one (page 1)
        write_record(path, [(1, 999, 5), (42, 8, 5), (1, share.refs[1], 5)])
        assert clear_for_dead_peer(str(root), path)
        assert share.buf[PAGE_SIZE + 5] == 0 and share.buf[5] == 1
        assert not os.path.exists(path)
        assert not clear_for_dead_peer(str(root), path)  # nothing left to do
        ref = share.refs[0]
        share.close()
        write_record(path, [(1, ref, 5)])  # revoked since: skipped, no error
        assert clear_for_dead_peer(str(root), path)
