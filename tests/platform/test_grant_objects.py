"""Shares, mappings and leak checks as every platform shares them (``_grants_common``,
``_leaks``): argument checks, the all-or-nothing close, close order at platform close.

Parametrised over the registered harnesses by the ``harness`` fixture (with its leak checks).
"""

from __future__ import annotations

import re

import pytest
from platform_harness import Harness

from aioxen import PAGE_SIZE, native
from aioxen.platforms.xen import XenPlatform

A, B = 1, 2


@pytest.mark.parametrize("npages", [True, 1.0, "1", -1])
async def test_share_rejects_non_positive_int_npages(harness: Harness, npages: object) -> None:
    a = await harness.platform(A)
    with pytest.raises(ValueError, match="npages"):
        a.grants.share(B, npages)  # type: ignore[arg-type]


@pytest.mark.parametrize("ref", [True, 8.0, 2**32])
async def test_map_rejects_invalid_refs(harness: Harness, ref: object) -> None:
    b = await harness.platform(B)
    with pytest.raises(ValueError, match=f"domain {A}"):
        b.grants.map(A, [ref])  # type: ignore[list-item]


async def test_failed_close_leaves_object_open_and_listed(harness: Harness) -> None:
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 1)
    m = b.grants.map(A, s.refs)
    view = m.buf[0:8]
    with pytest.raises(BufferError):
        m.close()
    assert not m.closed
    assert any("refs=" in leak for leak in b.leaks())  # type: ignore[attr-defined]
    view.release()
    m.close()
    assert m.closed and b.leaks() == []  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="closed"):
        m.buf  # noqa: B018 - a closed mapping has no buffer
    s.close()
    with pytest.raises(ValueError, match=re.escape(f"share of refs {s.refs}")):
        s.buf  # noqa: B018 - a closed share has no buffer
    assert a.leaks() == []  # type: ignore[attr-defined]


async def test_mapping_address_is_its_buffer(harness: Harness) -> None:
    a = await harness.platform(A)
    b = await harness.platform(B)
    s = a.grants.share(B, 2)
    m = b.grants.map(A, s.refs)
    assert m.address() == native.address_of(m.buf)  # type: ignore[attr-defined]
    m.close()
    s.close()


async def test_platform_close_closes_mappings_before_shares_and_channels(
    harness: Harness,
) -> None:
    """``close()`` unmaps first, so a mapping's unmap notify still reaches the peer."""
    a = await harness.platform(A)
    b = await harness.platform(B)
    la = await a.events.listen(B)
    cb = await b.events.connect(A, la.port)
    s = a.grants.share(B, 1)
    own = b.grants.share(A, 1)
    m = b.grants.map(A, s.refs)
    s.buf[PAGE_SIZE - 1] = 1
    m.set_unmap_notify(PAGE_SIZE - 1, cb)
    await b.close()
    assert m.closed and own.closed and cb.closed
    await la.wait(timeout=5)
    assert s.buf[PAGE_SIZE - 1] == 0
    s.close()
    la.close()


async def test_assert_cleaned_up_names_the_platform_and_the_leak(harness: Harness) -> None:
    a = await harness.platform(A)
    s = a.grants.share(B, 1)
    with pytest.raises(AssertionError) as ei:
        a.assert_cleaned_up()  # type: ignore[attr-defined]
    assert repr(a) in str(ei.value) and repr(s) in str(ei.value)
    s.close()
    a.assert_cleaned_up()  # type: ignore[attr-defined]


def test_xen_platform_has_leak_checks_without_devices() -> None:
    plat = XenPlatform(domid=0, device_dir="/nonexistent")
    assert plat.leaks() == []
    plat.assert_cleaned_up()
