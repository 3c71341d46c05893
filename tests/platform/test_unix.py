"""unix-specific behaviour: the root, its layout and modes, hostile files and sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

import aioxen
from aioxen import PAGE_SIZE, PlatformError, ProtocolError
from aioxen.platforms._unix_events import HELLO, HELLO_MAGIC, HELLO_VERSION
from aioxen.platforms._unix_grants import ENTRY, F_IN_USE, read_entries
from aioxen.platforms.unix import UnixPlatform, root_leaks


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def maps_perms(start: int, length: int) -> set[str]:
    """The permission strings of /proc/self/maps lines overlapping [start, start+length)."""
    perms = set()
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < start + length and hi > start:
                perms.add(line.split()[1])
    return perms


def test_root_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XEN_ROOT", raising=False)
    with pytest.raises(PlatformError, match="XEN_ROOT"):
        UnixPlatform(domid=1)


def test_root_from_env_created_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "a" / "root"
    monkeypatch.setenv("XEN_ROOT", str(root))
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    p = aioxen.platform("unix", domid=5)
    assert isinstance(p, UnixPlatform)
    assert p.root == str(root) and p.domid == 5
    assert mode(root) == 0o700
    assert p.xenstored_path == str(root / "xenstored" / "socket")
    monkeypatch.setenv("XENSTORED_PATH", "/somewhere/xs.sock")
    assert UnixPlatform(domid=1).xenstored_path == "/somewhere/xs.sock"
    assert UnixPlatform(domid=1, xenstored_path="/x").xenstored_path == "/x"


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(PlatformError, match="not a directory"):
        UnixPlatform(domid=1, root=f)


async def test_layout_and_file_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    async with UnixPlatform(1, root) as a, UnixPlatform(2, root) as b:
        ch = await a.events.listen(2)
        sock_path = root / "evtchn" / "1" / f"{ch.port}.2"
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode) and mode(sock_path) == 0o600
        assert mode(root / "evtchn" / "1" / "next-port") == 0o600
        assert mode(root / "evtchn") == 0o700 and mode(root / "evtchn" / "1") == 0o700
        share = a.grants.share(2, 2, writable=False)
        table = root / "grants" / "1" / "table"
        assert mode(table) == 0o600 and mode(root / "grants" / "1") == 0o700
        backing = root / "grants" / "1" / f"share-{share.share_id}"
        assert mode(backing) == 0o600 and backing.stat().st_size == 2 * PAGE_SIZE
        entries = read_entries(str(table))
        assert sorted(entries) == share.refs
        flags, grantee, sid, page, pid = entries[share.refs[1]]
        assert (flags, grantee, sid, page, pid) == (3, 2, share.share_id, 1, os.getpid())
        peer = await b.events.connect(1, ch.port)
        peer.notify()
        await ch.wait(timeout=5)
        assert not sock_path.exists()  # bound: the listening socket is gone
        assert root_leaks(str(root)) != []
        share.close()
        assert not backing.exists()
        assert read_entries(str(table)) == {}
    assert root_leaks(str(root)) == []


async def test_readonly_mapping_pages_are_prot_read(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        s = a.grants.share(2, 3)
        ro = b.grants.map(1, [s.refs[2], s.refs[0]], writable=False)
        rw = b.grants.map(1, [s.refs[1]])
        assert maps_perms(ro.address(), 2 * PAGE_SIZE) == {"r--s"}
        assert maps_perms(rw.address(), PAGE_SIZE) == {"rw-s"}
        assert ro.buf.readonly
        ro.close()
        rw.close()
        s.close()


async def test_long_root_path(tmp_path: Path) -> None:
    root = tmp_path / ("x" * 60) / ("y" * 60)
    async with UnixPlatform(1, root) as a, UnixPlatform(2, root) as b:
        ch = await a.events.listen(2)
        assert len(str(root / "evtchn" / "1" / f"{ch.port}.2")) > 108
        peer = await b.events.connect(1, ch.port)
        peer.notify()
        await ch.wait(timeout=5)
        ch.notify()
        await peer.wait(timeout=5)


async def test_stale_socket_is_refused(tmp_path: Path) -> None:
    async with UnixPlatform(2, tmp_path) as b:
        d = tmp_path / "evtchn" / "1"
        d.mkdir(parents=True, mode=0o700)  # private, like everything in a root
        d.parent.chmod(0o700)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(d / "7.2"))
        s.close()  # the socket file stays: as after a SIGKILL
        with pytest.raises(ConnectionRefusedError, match="stale"):
            await b.events.connect(1, 7)


async def test_bad_hello_is_dropped_and_port_keeps_listening(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        assert ch.listen_path is not None
        loop = asyncio.get_running_loop()
        for hello in (
            HELLO.pack(HELLO_MAGIC, HELLO_VERSION, 3, 99),  # claims domain 3
            HELLO.pack(b"NOPE", HELLO_VERSION, 2, 99),
            b"\x01\x02",  # truncated, then EOF
        ):
            rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            rogue.setblocking(False)
            await loop.sock_connect(rogue, ch.listen_path)
            await loop.sock_sendall(rogue, hello)
            if len(hello) < HELLO.size:
                rogue.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(loop.sock_recv(rogue, 16), 5) == b""  # dropped
            rogue.close()
        assert ch.state == "listening"
        peer = await b.events.connect(1, ch.port)
        peer.notify()
        await ch.wait(timeout=5)
        assert ch.remote_port == peer.port


async def test_listener_notify_before_accept_is_delivered(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        ch.notify()  # our reader has not accepted yet
        await peer.wait(timeout=5)


async def test_corrupt_table_entry_is_a_protocol_error(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        s = a.grants.share(2, 1)
        table = tmp_path / "grants" / "1" / "table"
        with open(table, "r+b") as f:  # a hostile/buggy writer: page far beyond the file
            f.seek(s.refs[0] * ENTRY.size)
            f.write(ENTRY.pack(F_IN_USE, 2, s.share_id, 1000, 0))
        with pytest.raises(ProtocolError) as ei:
            b.grants.map(1, s.refs)
        assert ei.value.field == "page"
        s.close()


async def test_table_with_wrong_magic(tmp_path: Path) -> None:
    d = tmp_path / "grants" / "1"
    d.mkdir(parents=True, mode=0o700)  # private, like everything in a root
    d.parent.chmod(0o700)
    (d / "table").write_bytes(b"GARBAGE!" * 16)
    async with UnixPlatform(1, tmp_path) as a:
        with pytest.raises(ProtocolError, match="magic"):
            a.grants.share(2, 1)


async def test_refs_reused_lowest_first_across_platform_objects(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a1, UnixPlatform(1, tmp_path) as a2:
        s1 = a1.grants.share(2, 2)
        s2 = a2.grants.share(2, 2)
        assert s1.refs == [8, 9] and s2.refs == [10, 11]
        s1.close()
        s3 = a2.grants.share(2, 3)
        assert s3.refs == [8, 9, 12]
        s2.close()
        s3.close()
