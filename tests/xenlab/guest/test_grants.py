"""Grant memory on real Xen: dom0 shares pages with itself (gntalloc) and maps them back
(gntdev), with read-only maps, error reporting and unmap notifies."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import pytest

from aioxen.platforms.base import PAGE_SIZE
from aioxen.platforms.xen import XenPlatform

HANG = 20.0  # hang guard only


async def test_share_and_map_same_memory(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 1)
    assert len(share.refs) == 1 and len(share.buf) == PAGE_SIZE
    assert bytes(share.buf) == bytes(PAGE_SIZE)  # fresh pages are zeroed
    m = plat.grants.map(0, share.refs)
    assert m.writable and not m.buf.readonly
    share.buf[0:5] = b"hello"
    assert bytes(m.buf[0:5]) == b"hello"
    m.buf[PAGE_SIZE - 3 :] = b"end"
    assert bytes(share.buf[PAGE_SIZE - 3 :]) == b"end"
    m.close()
    m.close()  # idempotent
    share.close()


async def test_refs_in_any_order_map_contiguously(plat: XenPlatform, plat2: XenPlatform) -> None:
    share = plat.grants.share(0, 8)
    for i in range(8):
        share.buf[i * PAGE_SIZE : i * PAGE_SIZE + 4] = b"pg%02d" % i
    order = [5, 0, 7, 7, 2]
    m = plat2.grants.map(0, [share.refs[i] for i in order])
    assert len(m.buf) == len(order) * PAGE_SIZE
    for slot, i in enumerate(order):
        assert bytes(m.buf[slot * PAGE_SIZE : slot * PAGE_SIZE + 4]) == b"pg%02d" % i
    m.buf[0] = ord("X")  # slot 0 is page 5
    assert share.buf[5 * PAGE_SIZE] == ord("X")
    m.close()
    share.close()


async def test_many_pages(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 64)
    m = plat.grants.map(0, share.refs)
    pattern = bytes(range(256)) * (64 * PAGE_SIZE // 256)
    share.buf[:] = pattern
    assert bytes(m.buf) == pattern
    m.close()
    share.close()


async def test_readonly_map_of_writable_share(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 2)
    m = plat.grants.map(0, share.refs, writable=False)
    assert not m.writable and m.buf.readonly
    share.buf[PAGE_SIZE] = 7
    assert m.buf[PAGE_SIZE] == 7
    with pytest.raises(TypeError):
        m.buf[0] = 1
    with pytest.raises(ValueError):
        m.set_unmap_notify(0, None)  # clearing a byte needs a writable mapping
    m.close()
    share.close()


async def test_readonly_share_refuses_writable_map(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 1, writable=False)
    share.buf[0] = 9  # the owner can always write
    ro = plat.grants.map(0, share.refs, writable=False)
    assert ro.buf[0] == 9
    with pytest.raises(PermissionError, match=f"ref {share.refs[0]} of domain 0"):
        plat.grants.map(0, share.refs, writable=True)
    ro.close()
    share.close()


async def test_unknown_ref_is_file_not_found(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 1)
    bogus = share.refs[0] + 100_000
    with pytest.raises(FileNotFoundError, match=f"ref {bogus} of domain 0"):
        plat.grants.map(0, [share.refs[0], bogus])
    share.close()
    # A revoked ref (closed share, nobody mapping it) is gone too.
    with pytest.raises(FileNotFoundError):
        plat.grants.map(0, share.refs)


async def test_ref_granted_to_another_domain(plat: XenPlatform) -> None:
    share = plat.grants.share(5, 1)  # offered to domain 5, not to us
    with pytest.raises((PermissionError, FileNotFoundError), match=f"ref {share.refs[0]}"):
        plat.grants.map(0, share.refs)
    share.close()


async def test_close_with_live_views_raises_buffer_error(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 1)
    m = plat.grants.map(0, share.refs)
    view = m.buf[10:20]
    with pytest.raises(BufferError):
        m.close()
    view[0] = 1  # still valid memory
    assert share.buf[10] == 1
    view.release()
    m.close()
    assert m.closed
    sview = share.buf[0:4]
    with pytest.raises(BufferError):
        share.close()
    sview.release()
    share.close()


async def test_mapping_unmap_notify_clears_byte_and_sends_event(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 2)
    a = await plat.events.listen(0)
    b = await plat.events.connect(0, a.port)
    await b.wait(timeout=HANG)  # Xen's initial event on the connecting side
    m = plat.grants.map(0, share.refs)
    share.buf[PAGE_SIZE + 20] = 1  # a "live" byte on the second page
    m.set_unmap_notify(PAGE_SIZE + 20, b)
    m.close()
    await a.wait(timeout=HANG)
    assert share.buf[PAGE_SIZE + 20] == 0
    share.close()


async def test_share_unmap_notify_on_close(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 1)
    a = await plat.events.listen(0)
    b = await plat.events.connect(0, a.port)
    await b.wait(timeout=HANG)
    m = plat.grants.map(0, share.refs)
    m.buf[21] = 1
    share.set_unmap_notify(21, a)
    share.close()
    await b.wait(timeout=HANG)
    assert m.buf[21] == 0  # the mapping still holds the page: the kernel cleared the byte
    m.close()


async def test_event_only_unmap_notify(plat: XenPlatform) -> None:
    share = plat.grants.share(0, 1)
    a = await plat.events.listen(0)
    b = await plat.events.connect(0, a.port)
    await b.wait(timeout=HANG)
    m = plat.grants.map(0, share.refs, writable=False)
    share.buf[3] = 1
    m.set_unmap_notify(None, b)
    m.close()
    await a.wait(timeout=HANG)
    assert share.buf[3] == 1
    share.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from aioxen.platforms.xen import XenPlatform

    async def main(port, ref):
        plat = XenPlatform(domid=0)
        await plat.open()
        ch = await plat.events.connect(0, port)
        m = plat.grants.map(0, [ref])
        m.buf[20] = 1
        m.set_unmap_notify(20, ch)
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
    """
)


async def test_process_death_fires_unmap_notify(plat: XenPlatform) -> None:
    """vchan's crash detection: a killed mapper's notify clears the byte and sends the event."""
    share = plat.grants.share(0, 1)
    a = await plat.events.listen(0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(a.port),
        str(share.refs[0]),
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line == b"ready\n"
        assert share.buf[20] == 1
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), HANG)
        await a.wait(timeout=HANG)
        assert share.buf[20] == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    share.close()


async def test_platform_close_releases_grants(plat: XenPlatform) -> None:
    other = XenPlatform()
    async with other:
        share = other.grants.share(0, 1)
        share.buf[0] = 5
        m = other.grants.map(0, share.refs)
        keep = plat.grants.map(0, share.refs)
    assert share.closed and m.closed
    assert keep.buf[0] == 5  # a foreign mapping stays valid memory after the share is gone
    keep.close()
    # Linux ends a grant that was still mapped at unshare time from a deferred timer:
    # poll (the loop's bound is only a hang guard) until Xen has revoked the ref.
    for _ in range(int(HANG / 0.2)):
        try:
            plat.grants.map(0, share.refs).close()
        except FileNotFoundError:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"ref {share.refs[0]} still mappable {HANG} s after its share closed")


async def test_leaks_lists_what_is_open(plat2: XenPlatform) -> None:
    share = plat2.grants.share(0, 1)
    m = plat2.grants.map(0, share.refs, writable=False)
    ch = await plat2.events.listen(0)
    leaks = plat2.leaks()
    assert len(leaks) == 3 and any(f"port={ch.port}" in x for x in leaks)
    ch.close()
    m.close()
    share.close()
    assert plat2.leaks() == []
