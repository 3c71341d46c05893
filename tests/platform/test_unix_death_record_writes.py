"""How the ``unix`` platform writes death-notification records
(``aioxen.platforms._unix_death.write_record``): the first record is created in place, later
changes replace it atomically, and a record cut short (a writer caught mid-write) never
yields more -- or other -- specs than were fully written."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen.platforms._unix_death import read_record, record_path, write_record


def test_first_record_is_created_in_place_then_replaced_and_removed(tmp_path: Path) -> None:
    path = record_path(str(tmp_path), 5)
    write_record(path, [(1, 8, 20)])
    assert read_record(path) == [(1, 8, 20)]
    assert os.stat(path).st_mode & 0o777 == 0o600
    write_record(path, [(1, 8, 20), (2, 9, 21)])  # existing record: replaced
    assert read_record(path) == [(1, 8, 20), (2, 9, 21)]
    write_record(path, [(2, 9, 21)])
    assert read_record(path) == [(2, 9, 21)]
    write_record(path, [])
    assert not os.path.exists(path)
    write_record(path, [(3, 10, 22)])  # created in place again after removal
    assert read_record(path) == [(3, 10, 22)]
    assert sorted(os.listdir(tmp_path)) == ["5.clear"]  # no temporary files left


def test_stale_record_of_a_previous_process_is_replaced(tmp_path: Path) -> None:
    path = record_path(str(tmp_path), 6)
    Path(path).write_text("7 7 7\n7 8 9\n")
    write_record(path, [(1, 2, 3)])
    assert read_record(path) == [(1, 2, 3)]


def test_unterminated_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "4.clear"
    path.write_text("1 8 20\n1 9 2")  # "1 9 2" may be the start of "1 9 21"
    assert read_record(str(path)) == [(1, 8, 20)]
    path.write_text("")
    assert read_record(str(path)) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**16), st.integers(0, 2**32 - 1), st.integers(0, 4095)),
        min_size=1,
        max_size=5,
    ),
    st.data(),
)
def test_truncated_record_yields_a_prefix_of_whole_specs(
    specs: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = record_path(d, 1)
        write_record(path, specs)
        full = Path(path).read_bytes()
        cut = data.draw(st.integers(0, len(full)))
        Path(path).write_bytes(full[:cut])
        got = read_record(path)
        assert got == specs[: len(got)]
        assert (len(got) == len(specs)) == (cut == len(full))
