"""aioxen.qrexec.vchan_socket against a separate process speaking libvchan-socket's wire.

The peer (``python test_vchan_socket.py server|client ...``, at the bottom of this file)
does what QubesOS/qubes-core-vchan-socket's ``libvchan`` (HEAD e1da6da, ``vchan/init.c``,
``vchan/socket.c``, ``vchan/io.c``) was observed to do -- read in its source and checked by
running Qubes' own ``node`` test program (built against that library) against
``VchanSocketChannels`` both ways with 5 MiB of random data (all four role/direction
combinations byte-exact):

* path ``$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock``, local domid from
  ``$VCHAN_DOMAIN``;
* the server ``unlink``\\ s whatever is at the path, binds, ``listen(1)``, accepts one
  client, and leaves its socket file behind when it closes;
* the client ``connect``\\ s, retrying on ``ENOENT``/``ECONNREFUSED`` every 100 µs;
* no handshake bytes: the stream is the vchan's bytes; close flushes, then closes the
  socket (the peer sees EOF).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aioxen.ownership import ResourceBusy
from aioxen.qrexec.channels import ChannelFactory
from aioxen.qrexec.vchan_socket import VchanSocketChannels, _listening, socket_path

HANG = 30.0  # hang guard only
DATA = os.urandom(3 * 1024 * 1024 + 17)  # many socket-buffers' worth, odd length


def _peer(
    directory: Path, my_domid: int, role: str, mode: str, peer_domid: int, port: int
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, VCHAN_SOCKET_DIR=str(directory), VCHAN_DOMAIN=str(my_domid))
    return subprocess.Popen(
        [sys.executable, __file__, role, mode, str(peer_domid), str(port)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


async def _communicate(proc: subprocess.Popen[bytes], data: bytes = b"") -> tuple[bytes, int]:
    def run() -> tuple[bytes, int]:
        out, _ = proc.communicate(data, timeout=HANG)
        return out, proc.returncode

    return await asyncio.to_thread(run)


@pytest.fixture
def vdir(tmp_path: Path) -> Path:
    d = tmp_path / "vchan"
    d.mkdir(mode=0o700)
    return d


async def test_listen_names_the_path_and_a_peer_client_streams_both_ways(vdir: Path) -> None:
    chans = VchanSocketChannels(vdir, 2)
    pending = await chans.listen(0, 514, buffer_size=4096)
    path = vdir / "vchan.2.0.514.sock"
    assert pending.path == str(path) == chans.path(2, 0, 514)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    peer = _peer(vdir, 0, "client", "echo", 2, 514)  # VCHAN_DOMAIN=0, server domain 2
    reader, writer = await asyncio.wait_for(pending.accept(), HANG)
    assert not path.exists()  # the one client is in: the path is gone
    assert not Path(str(path) + ".lock").exists()

    async def send() -> None:
        writer.write(DATA)
        await writer.drain()

    sender = asyncio.create_task(send())
    echoed = await asyncio.wait_for(reader.readexactly(len(DATA)), HANG)
    await sender
    writer.close()  # flush, then close: the peer's read sees EOF and it exits
    _, rc = await _communicate(peer)
    assert echoed == DATA
    assert rc == 0


async def test_connect_waits_for_a_server_that_starts_later(vdir: Path) -> None:
    chans = VchanSocketChannels(vdir, 3)
    connecting = asyncio.create_task(chans.connect(0, 600, timeout=HANG))
    await asyncio.sleep(0.2)
    assert not connecting.done()
    peer = _peer(vdir, 0, "server", "write", 3, 600)  # dom0 serves domain 3
    writing = asyncio.create_task(_communicate(peer, DATA))
    reader, writer = await connecting
    got = await asyncio.wait_for(reader.read(), HANG)
    writer.close()
    _, rc = await writing
    assert got == DATA
    assert rc == 0
    # The C server leaves its socket file behind.
    assert stat.S_ISSOCK(os.lstat(vdir / "vchan.0.3.600.sock").st_mode)


async def test_a_peer_client_that_started_first_is_accepted(vdir: Path) -> None:
    peer = _peer(vdir, 0, "client", "write", 5, 700)
    reading = asyncio.create_task(_communicate(peer, DATA))
    await asyncio.sleep(0.2)  # the peer is retrying on ENOENT
    pending = await VchanSocketChannels(vdir, 5).listen(0, 700, buffer_size=65536)
    reader, writer = await asyncio.wait_for(pending.accept(), HANG)
    got = await asyncio.wait_for(reader.read(), HANG)
    writer.close()
    _, rc = await reading
    assert got == DATA
    assert rc == 0


async def test_aioxen_to_aioxen(vdir: Path) -> None:
    factory: ChannelFactory = VchanSocketChannels(vdir, 7)  # the protocol, statically
    assert isinstance(factory, ChannelFactory)
    server = VchanSocketChannels(vdir, 7)
    client = VchanSocketChannels(vdir, 8)
    async with await server.listen(8, 513, buffer_size=4096) as pending:
        (cr, cw), (sr, sw) = await asyncio.gather(client.connect(7, 513), pending.accept())
    cw.write(b"ping")
    assert await sr.readexactly(4) == b"ping"
    sw.write(b"pong")
    sw.close()
    assert await cr.read() == b"pong"
    cw.close()


async def test_stale_socket_left_by_a_peer_server_is_replaced(vdir: Path) -> None:
    peer = _peer(vdir, 2, "server", "write", 0, 800)  # serves dom0 as domain 2
    writing = asyncio.create_task(_communicate(peer, b"x"))
    reader, writer = await VchanSocketChannels(vdir, 0).connect(2, 800, timeout=HANG)
    assert await reader.read() == b"x"
    writer.close()
    await writing
    path = vdir / "vchan.2.0.800.sock"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # stale, nobody listens
    pending = await VchanSocketChannels(vdir, 2).listen(0, 800, buffer_size=4096)
    assert os.lstat(path).st_ino != 0
    pending.close()
    assert not path.exists()


async def test_a_live_listener_is_not_replaced(vdir: Path) -> None:
    peer = _peer(vdir, 2, "server", "write", 0, 801)
    path = vdir / "vchan.2.0.801.sock"
    deadline = time.monotonic() + HANG
    while not _listening(str(path)):  # bound is not enough: listen() must have run
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    before = os.lstat(path)
    with pytest.raises(ResourceBusy) as info:
        await VchanSocketChannels(vdir, 2).listen(0, 801, buffer_size=4096)
    assert info.value.errno == errno.EADDRINUSE
    assert str(path) in str(info.value)
    after = os.lstat(path)
    assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)
    # ... and the peer still gets its client.
    writing = asyncio.create_task(_communicate(peer, b"still here"))
    reader, writer = await VchanSocketChannels(vdir, 0).connect(2, 801, timeout=HANG)
    assert await reader.read() == b"still here"
    writer.close()
    await writing


async def test_links_and_non_sockets_are_refused(vdir: Path, tmp_path: Path) -> None:
    chans = VchanSocketChannels(vdir, 1)
    target = tmp_path / "elsewhere.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(target))
        s.listen(1)
        os.symlink(target, vdir / "vchan.1.0.900.sock")
        os.symlink(target, vdir / "vchan.0.1.900.sock")
        with pytest.raises(FileExistsError, match="symbolic link"):
            await chans.listen(0, 900, buffer_size=4096)
        with pytest.raises(PermissionError, match="symbolic link"):
            await chans.connect(0, 900, timeout=HANG)
    (vdir / "vchan.1.0.901.sock").write_bytes(b"")
    (vdir / "vchan.0.1.901.sock").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not a socket"):
        await chans.listen(0, 901, buffer_size=4096)
    with pytest.raises(PermissionError, match="not a socket"):
        await chans.connect(0, 901, timeout=HANG)
    assert (vdir / "vchan.1.0.901.sock").read_bytes() == b""  # untouched


async def test_another_users_socket_is_refused(vdir: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: chown to another uid must be possible")
        pytest.skip("needs root to chown a socket to another uid")
    chans = VchanSocketChannels(vdir, 1)
    for name in ("vchan.1.0.902.sock", "vchan.0.1.902.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(vdir / name))
        s.close()
        os.chown(vdir / name, 54321, -1)
    with pytest.raises(PermissionError, match="uid 54321"):
        await chans.listen(0, 902, buffer_size=4096)
    with pytest.raises(PermissionError, match="not a socket of yours"):
        await chans.connect(0, 902, timeout=HANG)
    assert os.lstat(vdir / "vchan.1.0.902.sock").st_uid == 54321


def test_the_directory_must_be_private(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(PermissionError, match="group/other"):
        VchanSocketChannels(shared, 0)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PermissionError, match="symbolic link"):
        VchanSocketChannels(tmp_path / "link", 0)
    made = VchanSocketChannels(tmp_path / "new" / "dir", 0)
    assert stat.S_IMODE(os.lstat(made.directory).st_mode) == 0o700


def test_from_environ(vdir: Path) -> None:
    chans = VchanSocketChannels.from_environ({"VCHAN_SOCKET_DIR": str(vdir), "VCHAN_DOMAIN": "42"})
    assert (chans.directory, chans.local_domid) == (str(vdir), 42)
    assert VchanSocketChannels.from_environ({"VCHAN_SOCKET_DIR": str(vdir)}).local_domid == 0
    with pytest.raises(ValueError, match="VCHAN_SOCKET_DIR"):
        VchanSocketChannels.from_environ({"VCHAN_DOMAIN": "1"})
    for bad in ("x", "-1", "32752", ""):
        with pytest.raises(ValueError, match="VCHAN_DOMAIN"):
            VchanSocketChannels.from_environ({"VCHAN_SOCKET_DIR": str(vdir), "VCHAN_DOMAIN": bad})


def test_addresses_are_validated(vdir: Path) -> None:
    assert socket_path("/d", 0, 12, 513) == "/d/vchan.0.12.513.sock"
    for args in ((-1, 0, 1), (0, 0x7FF0, 1), (0, 0, -1), (0, 0, 2**31), (True, 0, 1)):
        with pytest.raises(ValueError):
            socket_path("/d", *args)
    with pytest.raises(OSError) as info:
        socket_path("/" + "d" * 100, 0, 0, 513)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(ValueError):
        VchanSocketChannels(vdir, 0x7FF0)


async def test_close_or_cancel_before_a_client_removes_the_path(vdir: Path) -> None:
    chans = VchanSocketChannels(vdir, 4)
    pending = await chans.listen(0, 1000, buffer_size=4096)
    path = Path(pending.path)
    assert path.exists()
    pending.close()
    assert not path.exists() and not Path(f"{path}.lock").exists()
    with pytest.raises(ConnectionAbortedError, match=str(path)):
        await pending.accept()
    pending = await chans.listen(0, 1000, buffer_size=4096)
    task = asyncio.create_task(pending.accept())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not path.exists()


async def test_close_leaves_a_socket_that_replaced_ours(vdir: Path) -> None:
    # A Qubes server unlinks whatever is at its path and binds its own: closing ours
    # afterwards must not remove theirs.
    pending = await VchanSocketChannels(vdir, 4).listen(0, 1004, buffer_size=4096)
    os.unlink(pending.path)
    with socket.socket(socket.AF_UNIX) as theirs:
        theirs.bind(pending.path)
        pending.close()
        assert stat.S_ISSOCK(os.lstat(pending.path).st_mode)


async def test_timeouts_name_the_path(vdir: Path) -> None:
    with pytest.raises(TimeoutError, match=r"vchan\.9\.4\.1001\.sock"):
        await VchanSocketChannels(vdir, 4).connect(9, 1001, timeout=0.2)
    with pytest.raises(TimeoutError, match=r"vchan\.9\.4\.1002\.sock"):
        await VchanSocketChannels(vdir, 4, connect_timeout=0.2).connect(9, 1002)
    pending = await VchanSocketChannels(vdir, 4).listen(9, 1003, buffer_size=4096)
    with pytest.raises(TimeoutError, match=r"vchan\.4\.9\.1003\.sock"):
        await pending.accept(timeout=0.2)
    assert not os.path.lexists(pending.path)


async def test_a_killed_peer_ends_the_stream(vdir: Path) -> None:
    pending = await VchanSocketChannels(vdir, 6).listen(0, 1100, buffer_size=4096)
    peer = _peer(vdir, 0, "client", "hold", 6, 1100)  # reads, never writes, never exits
    reader, writer = await asyncio.wait_for(pending.accept(), HANG)
    writer.write(b"x" * 100000)
    peer.send_signal(signal.SIGKILL)
    await asyncio.to_thread(peer.wait)
    # The wire cannot tell a kill from a close (no handshake, no trailer): EOF or reset,
    # never a hang; qrexec's framing is what notices a cut message.
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), HANG) == b""
    writer.close()


# -- the peer: libvchan-socket's behaviour, as observed -----------------------------------


def _peer_main(role: str, mode: str, peer_domid: int, port: int) -> int:
    directory = os.environ["VCHAN_SOCKET_DIR"]
    me = int(os.environ.get("VCHAN_DOMAIN", "0"))
    server, client = (me, peer_domid) if role == "server" else (peer_domid, me)
    path = f"{directory}/vchan.{server}.{client}.{port}.sock"
    if role == "server":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        conn, _ = listener.accept()
    else:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                conn.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.0001)
    if mode == "write":
        while chunk := os.read(0, 65536):
            conn.sendall(chunk)
    elif mode == "read":
        while chunk := conn.recv(65536):
            sys.stdout.buffer.write(chunk)
    elif mode == "echo":
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
    elif mode == "hold":
        while conn.recv(65536):
            pass
    conn.close()  # flushed (sendall), then closed; the socket file stays (as the C lib)
    return 0


if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
