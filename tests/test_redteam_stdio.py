"""Red-team pass: a service whose stderr nobody reads, and clients that make it log.

``aioxen bridge`` logs a warning for every connection it cannot carry to its target (the
vchan service is restarting, say).  With stderr a pipe nobody reads -- or a terminal stopped
with Ctrl-S -- a blocking log write froze the whole bridge after 64 KiB of warnings,
SIGTERM included; any local user who can reach its TCP port could cause that.  Log lines
now go through a bounded queue and a writer thread ([`aioxen.apps.stderr_log`][]).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from support.unix_user import OtherUser
from support.unread_pipe import leftover, small_pipe

from aioxen.apps.stderr_log import StderrLogHandler

pytestmark = pytest.mark.crossprocess

TIMEOUT = 60  # hang guard only

FLOOD = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.recv(1)  # the bridge ends the connection: its target is down
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


def test_bridge_with_unread_stderr_survives_a_warning_flood(mallory: OtherUser) -> None:
    r, w = small_pipe()
    argv = [sys.executable, "-m", "aioxen", "bridge", "--listen", "tcp:127.0.0.1:0"]
    argv += ["--connect", "unix:/nonexistent-aioxen-target/x.sock"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=w, text=True)
    os.close(w)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        port = line.strip().rsplit(":", 1)[1]
        # ~100 bytes of warning per connection: 300 fill the 4 KiB pipe several times over
        flood = mallory.python(FLOOD, port, "300", timeout=TIMEOUT * 5)
        assert flood.stdout.strip() == "all 300", flood.stdout
        proc.terminate()
        proc.wait(timeout=TIMEOUT)  # old code: blocked in write(2), SIGTERM or not
        assert proc.returncode in (143, -15), proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        logged = leftover(r)
    assert b"cannot connect to unix:/nonexistent-aioxen-target/x.sock" in logged


def test_handler_drops_instead_of_blocking_and_says_so() -> None:
    r, w = small_pipe()
    handler = StderrLogHandler(w, limit=8192)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("aioxen.test_redteam_stdio")
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(2000):  # 100 KiB: far more than the pipe plus the queue
            log.warning("line %04d %s", i, "x" * 40)  # returns at once, pipe full or not
        assert handler.dropped > 0
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read_all(r)), daemon=True)
        reader.start()  # now somebody reads: the queue drains, then the count is reported
        handler.flush(timeout=TIMEOUT)  # hang guard only
        handler.close()  # stop the writer
    finally:
        log.removeHandler(handler)
        os.close(w)
    reader.join(TIMEOUT)
    os.close(r)
    text = got.decode()
    assert text.startswith("line 0000 ")
    assert f"aioxen: {handler.dropped} log lines dropped" in text
    assert text.count("\n") == 2000 - handler.dropped + 1


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out


def test_handler_waits_on_a_non_blocking_stderr() -> None:
    """stderr inherited non-blocking (O_NONBLOCK is shared by every process on the pipe):
    a full pipe is waited out in the writer thread, no line is lost."""
    r, w = small_pipe()
    os.set_blocking(w, False)
    handler = StderrLogHandler(w)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("aioxen.test_redteam_stdio.nonblocking")
    log.propagate = False
    log.addHandler(handler)
    filler = 0
    try:
        while True:  # fill the pipe: every write the handler tries now would block
            filler += os.write(w, b"-" * 512)
    except BlockingIOError:
        pass
    try:
        for i in range(200):
            log.warning("line %04d %s", i, "y" * 40)
        deadline = time.monotonic() + TIMEOUT  # hang guard only
        while handler.queued_lines() == 200 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the writer took the first line and met the full pipe
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read_all(r)), daemon=True)
        reader.start()
        handler.flush(timeout=TIMEOUT)  # hang guard only
        handler.close()
    finally:
        log.removeHandler(handler)
        os.close(w)
    reader.join(TIMEOUT)
    os.close(r)
    assert got[:filler] == b"-" * filler
    lines = got[filler:].decode().splitlines()
    assert handler.dropped == 0
    assert lines == [f"line {i:04d} {'y' * 40}" for i in range(200)]
