"""Red-team pass: ``aioxen xenstored`` with a stderr nobody reads, and misbehaving domains.

On the unix platform every domain is a process that talks to the socket; one that sends
malformed frames gets its connection closed, and xenstored logs that.  With stderr a pipe
nobody reads, a blocking log write froze the store for every domain (and SIGTERM) once the
pipe was full.  Now log lines never block it (``aioxen.apps.stderr_log``).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from support.unread_pipe import leftover, small_pipe

pytestmark = pytest.mark.crossprocess

TIMEOUT = 60  # hang guard only
XS_READ = 2


def _frame(typ: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack("=IIII", typ, 1, 0, size) + payload


def test_xenstored_with_unread_stderr_survives_a_log_flood(tmp_path: Path) -> None:
    r, w = small_pipe()  # nobody reads it; a bounded flood fills it
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioxen", "xenstored", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=w,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    os.close(w)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("XEN_ROOT="), proc.poll()
        path = proc.stdout.readline().split("=", 1)[1].split(";", 1)[0]
        for i in range(300):  # ~90 bytes of log each: the 4 KiB pipe fills many times over
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(TIMEOUT)
                s.connect(path)
                # a payload length over 4096 is fatal for the connection: logged, closed
                s.sendall(_frame(XS_READ, b"", length=100_000))
                assert s.recv(1) == b"", f"connection {i} not closed"
        with socket.socket(socket.AF_UNIX) as s:  # the store still answers
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(_frame(XS_READ, b"/local/domain/0/nothing\0"))
            assert len(s.recv(4096)) >= 16
        proc.terminate()
        assert proc.wait(timeout=TIMEOUT) == 143  # old code: stuck in write(2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        logged = leftover(r)
    assert b"closing connection of domid 0" in logged
