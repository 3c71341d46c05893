"""inheap-specific behaviour: the world, leak reports, dispatch, threads, hostile refs."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aioxen
from aioxen import PAGE_SIZE
from aioxen.platform.inheap import InHeapPlatform, InHeapWorld, default_world


def test_dispatch_and_default_world() -> None:
    p = aioxen.platform("inheap", domid=4)
    assert isinstance(p, InHeapPlatform)
    assert p.domid == 4 and p.name == "inheap"
    assert p.world is default_world()
    w = InHeapWorld()
    assert aioxen.platform("inheap", domid=0, world=w).world is w  # type: ignore[attr-defined]


def test_world_has_xenstore_engine_slot() -> None:
    w = InHeapWorld()
    assert w.xenstore_engine is None
    w.xenstore_engine = object()
    assert InHeapWorld().xenstore_engine is None


def test_bad_domid() -> None:
    with pytest.raises(ValueError):
        InHeapPlatform(domid=0x7FF0)


async def test_assert_cleaned_up_lists_leaks() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)
    w.assert_cleaned_up()
    la = await a.events.listen(2)
    s = a.grants.share(2, 1)
    m = b.grants.map(1, s.refs)
    with pytest.raises(AssertionError) as ei:
        w.assert_cleaned_up()
    msg = str(ei.value)
    assert f"port={la.port}" in msg and "InHeapShare" in msg and "InHeapMapping" in msg
    with pytest.raises(AssertionError):
        a.assert_cleaned_up()
    m.close()
    b.assert_cleaned_up()
    await a.close()
    a.assert_cleaned_up()
    w.assert_cleaned_up()


async def test_revoked_refs_are_reused_lowest_first() -> None:
    w = InHeapWorld()
    a = InHeapPlatform(1, w)
    s1 = a.grants.share(2, 3)
    assert s1.refs == [8, 9, 10]
    s1.close()
    s2 = a.grants.share(2, 2)
    assert s2.refs == [8, 9]
    await a.close()


async def test_notify_from_another_thread() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)
    la = await a.events.listen(2)
    cb = await b.events.connect(1, la.port)
    t = threading.Thread(target=cb.notify)
    t.start()
    await la.wait(timeout=5)
    t.join()
    await a.close()
    await b.close()
    w.assert_cleaned_up()


async def test_default_world_platform_closes_cleanly() -> None:
    p = aioxen.platform("inheap", domid=7)
    async with p:
        ch = await p.events.listen(7)
        peer = await p.events.connect(7, ch.port)
        peer.notify()
        await ch.wait(timeout=5)
    assert p.leaks() == []  # type: ignore[attr-defined]


# Hostile input: any list of refs maps, or fails with the documented exception, never crashes
_REFS = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(refs=_REFS, writable=st.booleans(), revoke=st.booleans())
def test_map_arbitrary_refs(refs: list[int], writable: bool, revoke: bool) -> None:
    w = InHeapWorld()
    a, b, c = InHeapPlatform(1, w), InHeapPlatform(2, w), InHeapPlatform(3, w)
    rw = a.grants.share(2, 4)  # refs 8..11
    ro = a.grants.share(2, 3, writable=False)  # refs 12..14
    other = a.grants.share(3, 2)  # refs 15..16, granted to domain 3
    for s in (rw, ro, other):
        for i, ref in enumerate(s.refs):
            s.buf[i * PAGE_SIZE] = ref
    if revoke:
        ro.close()
    valid = set(rw.refs) | (set() if revoke else set(ro.refs))
    readonly = set() if revoke else set(ro.refs)
    expected: type[Exception] | None = None
    for ref in refs:
        if ref in set(other.refs):
            expected = PermissionError
            break
        if ref not in valid:
            expected = FileNotFoundError
            break
        if writable and ref in readonly:
            expected = PermissionError
            break
    if expected is None:
        m = b.grants.map(1, refs, writable=writable)
        assert [m.buf[i * PAGE_SIZE] for i in range(len(refs))] == refs
        assert m.buf.readonly is (not writable)
        m.close()
    else:
        with pytest.raises(expected):
            b.grants.map(1, refs, writable=writable)
    assert c.grants.map(1, other.refs).buf[0] == other.refs[0]  # the grantee may
    for obj in list(c.grants.live()) + list(a.grants.live()):
        obj.close()
    w.assert_cleaned_up()


def test_leaked_channel_of_closed_loop_does_not_break_notify() -> None:
    w = InHeapWorld()
    a, b = InHeapPlatform(1, w), InHeapPlatform(2, w)

    async def setup() -> tuple[object, object]:
        la = await a.events.listen(2)
        cb = await b.events.connect(1, la.port)
        return la, cb

    la, cb = asyncio.run(setup())
    cb.notify()  # type: ignore[attr-defined]  # la's loop is closed: silently dropped
    la.close()  # type: ignore[attr-defined]
    cb.close()  # type: ignore[attr-defined]
    w.assert_cleaned_up()
