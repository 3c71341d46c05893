"""Red-team pass: ``aioxen blkfront nbd`` with a stderr nobody reads, and hostile clients.

The NBD server logs a warning for every client that breaks the handshake.  Any local user
can reach its TCP port; with stderr a pipe nobody reads, a blocking log write froze the
export for its real users (and SIGTERM) once the pipe was full.  A real second user floods
bad handshakes; the export must keep serving and stop cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.unix_user import OtherUser
from support.unread_pipe import leftover, small_pipe
from support.xenstored import Xenstored

pytestmark = pytest.mark.crossprocess

TIMEOUT = 60  # hang guard only
FRONT = 7

BAD_CLIENTS = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                break
            greeting += chunk
        s.sendall(b"\\xff\\xff\\xff\\xff")  # unknown client flags: logged, then closed
        s.recv(1)
    except ConnectionResetError:
        pass
    except OSError as e:
        print("stuck at", i, e)
        break
    finally:
        s.close()
else:
    print("all", n)
"""

GOOD_CLIENT = """
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
g = b""
while len(g) < 18:
    g += s.recv(18 - len(g))
assert g[:16] == b"NBDMAGICIHAVEOPT", g
s.sendall(struct.pack(">I", 1))  # fixed newstyle
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 4) + b"xvda")  # NBD_OPT_EXPORT_NAME
r = b""
while len(r) < 10:
    r += s.recv(10 - len(r))
print("size", struct.unpack(">Q", r[:8])[0])
"""


def _start(xs: Xenstored, domid: int, *args: str, stderr: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioxen", *args],
        env=xs.env(domid),
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), (args, line, proc.poll())
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_nbd_export_survives_bad_clients_with_unread_stderr(
    mallory: OtherUser, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    xs = Xenstored(tmp_path / "root")
    r, w = small_pipe()  # nobody reads it; a bounded flood fills it
    procs: list[subprocess.Popen[str]] = []
    try:
        back = ["blkback", "--image", str(image), "--frontend", str(FRONT)]
        procs.append(_start(xs, 0, *back, stderr=subprocess.DEVNULL)[0])
        nbd = ["blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda"]
        front, ready = _start(xs, FRONT, *nbd, stderr=w)
        procs.append(front)
        os.close(w)
        w = -1
        # 'READY blkfront nbd listening on 127.0.0.1:PORT exporting ...'
        ready_port = ready.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1]
        flood = mallory.python(BAD_CLIENTS, ready_port, "300", timeout=TIMEOUT * 5)
        assert flood.stdout.strip() == "all 300", flood.stdout
        good = mallory.python(GOOD_CLIENT, ready_port, timeout=TIMEOUT)
        assert good.stdout.strip() == f"size {1 << 20}", good
        assert _stop(front) == 143  # old code: blocked in write(2), SIGTERM or not
    finally:
        for p in procs:
            _stop(p)
        if w >= 0:
            os.close(w)
        logged = leftover(r)
        xs.stop()
    assert b"unknown client flags" in logged
