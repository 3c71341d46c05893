"""Hostile grant-ref lists: every list maps correctly or fails with the documented error."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen import PAGE_SIZE, Platform
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld
from aioxen.platforms.unix import UnixPlatform, root_leaks


@contextmanager
def inheap_world() -> Iterator[Callable[[int], Platform]]:
    w = InHeapWorld()
    yield lambda domid: InHeapPlatform(domid, w)
    w.assert_cleaned_up()


@contextmanager
def unix_world() -> Iterator[Callable[[int], Platform]]:
    with tempfile.TemporaryDirectory() as root:
        yield lambda domid: UnixPlatform(domid, root)
        assert root_leaks(root) == []


WORLDS = {"inheap": inheap_world, "unix": unix_world}
REFS = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=24), st.integers(min_value=0, max_value=2**32 - 1)
    ),
    min_size=1,
    max_size=10,
)


@pytest.mark.parametrize("world", sorted(WORLDS))
@settings(max_examples=60, deadline=None)
@given(refs=REFS, writable=st.booleans(), revoke=st.booleans())
def test_map_arbitrary_refs(world: str, refs: list[int], writable: bool, revoke: bool) -> None:
    with WORLDS[world]() as make:
        a, b, c = make(1), make(2), make(3)
        rw = a.grants.share(2, 4)  # refs 8..11
        ro = a.grants.share(2, 3, writable=False)  # refs 12..14
        other = a.grants.share(3, 2)  # refs 15..16, granted to domain 3
        for s in (rw, ro, other):
            for i, ref in enumerate(s.refs):
                s.buf[i * PAGE_SIZE] = ref
        readonly = set(ro.refs)
        if revoke:
            ro.close()
            readonly = set()
        valid = set(rw.refs) | readonly
        expected: type[Exception] | None = None
        for ref in refs:
            if ref in other.refs:
                expected = PermissionError
            elif ref not in valid:
                expected = FileNotFoundError
            elif writable and ref in readonly:
                expected = PermissionError
            if expected is not None:
                break
        if expected is None:
            m = b.grants.map(1, refs, writable=writable)
            assert [m.buf[i * PAGE_SIZE] for i in range(len(refs))] == refs
            assert m.buf.readonly is (not writable)
            m.close()
        else:
            with pytest.raises(expected) as ei:
                b.grants.map(1, refs, writable=writable)
            assert "domain 1" in str(ei.value)
        mc = c.grants.map(1, other.refs)  # the real grantee may
        assert mc.buf[0] == other.refs[0]
        mc.close()
        for s in (rw, ro, other):
            s.close()
        for p in (a, b, c):
            assert p.leaks() == []  # type: ignore[attr-defined]
