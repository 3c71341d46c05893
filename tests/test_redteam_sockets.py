"""Red-team pass: what another local user can do to a service's Unix listening socket.

A service manager may start a daemon with umask 0.  Connecting to a Unix socket needs write
permission on the socket file, so a listener bound under umask 0 (``srwxrwxrwx``) would
let every local user in -- through ``aioxen bridge`` to the vchan service behind it, into a
qrexec daemon, an NBD export.  Every listener made by ``UnixSocketClaim`` is owner-only
whatever the umask.  A real second user (created here) tries to connect.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.unix_user import OtherUser

from aioxen.ownership import UnixSocketClaim

pytestmark = pytest.mark.crossprocess

TIMEOUT = 60  # hang guard only


@pytest.fixture
def shared() -> Iterator[Path]:
    """A fresh directory like ``/tmp``: root's, world-writable, sticky."""
    d = Path(tempfile.mkdtemp(prefix="aioxen-rt-"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bridge_started_with_umask_0_listens_owner_only(mallory: OtherUser, shared: Path) -> None:
    sock = shared / "bridge.sock"
    argv = [sys.executable, "-m", "aioxen", "bridge", "--listen", f"unix:{sock}"]
    argv += ["--connect", f"unix:{shared / 'nothing-here.sock'}"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        umask=0,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, (line, proc.poll())
        mode = stat.S_IMODE(os.lstat(sock).st_mode)
        assert mode & 0o077 == 0, f"socket mode {mode:04o} under umask 0"
        assert mallory.connects(str(sock)) == "refused 13"  # EACCES
        with socket.socket(socket.AF_UNIX) as own:
            own.connect(str(sock))  # its owner still connects
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode in (0, 143, -15)
    assert not sock.exists()  # a clean stop still removes the socket it bound


def test_claim_bind_ignores_the_umask(mallory: OtherUser, shared: Path) -> None:
    path = shared / "claimed.sock"
    old = os.umask(0)
    try:
        claim = UnixSocketClaim.acquire(str(path), what="red-team test")
        sock = claim.bind()
    finally:
        os.umask(old)
    try:
        sock.listen()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert mallory.connects(str(path)) == "refused 13"
    finally:
        sock.close()
        claim.release()
    assert not path.exists()  # release still recognises the socket after the chmod


def test_lock_file_hard_linked_to_a_file_of_ours_is_left_alone(shared: Path) -> None:
    """With ``fs.protected_hardlinks = 0`` (the kernel's default; systemd's sysctl sets 1)
    another user may hard-link any file of ours into a shared directory, as the lock file
    of the socket path we are about to listen on.  The test makes that link itself (it
    cannot change the sysctl of the machine): the bridge must refuse, not truncate the file
    and write its owner record into it."""
    private = shared / "roots-own"
    private.mkdir(mode=0o700)
    precious = private / "precious"
    content = b"root's precious file\n" * 100
    precious.write_bytes(content)
    precious.chmod(0o600)
    os.link(precious, shared / "bridge.sock.lock")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aioxen",
            "bridge",
            "--listen",
            f"unix:{shared / 'bridge.sock'}",
            "--connect",
            f"unix:{shared / 'nothing-here.sock'}",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "hard links" in proc.stderr and "bridge.sock.lock" in proc.stderr, proc.stderr
    assert precious.read_bytes() == content
    assert not (shared / "bridge.sock").exists()
