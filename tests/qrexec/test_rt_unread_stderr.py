"""Red-team pass: dom0's ``aioxen qrexec daemon`` with a stderr nobody reads, and a hostile VM.

A VM controls its own agent, and the daemon logs a warning for every request with a bad
service name (then refuses it and keeps the link).  With stderr a pipe nobody reads, a
blocking log write froze the daemon -- for every VM, SIGTERM included -- once the pipe was
full.  The hostile agent here is this test process playing domain 42 on the unix platform;
the daemon is a real ``aioxen qrexec daemon`` process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

from support.unread_pipe import leftover, small_pipe
from support.xenstored import Xenstored

from aioxen.platforms.unix import UnixPlatform
from aioxen.qrexec import VchanChannels
from aioxen.qrexec import wire as w
from aioxen.qrexec.channels import CONTROL_PORT
from aioxen.qrexec.framing import exchange_hello

GUARD = 60  # hang guard only
EVIL = 42


def _trigger(ident: bytes) -> bytes:
    """MSG_TRIGGER_SERVICE4 to 'evil' with an invalid service name ('../x')."""
    body = bytes(64) + b"evil".ljust(64, b"\0") + ident.ljust(32, b"\0") + b"../x\0"
    return struct.pack("<II", w.MSG_TRIGGER_SERVICE4, len(body)) + body


async def test_daemon_with_unread_stderr_survives_a_hostile_vm(tmp_path: Path) -> None:
    xs = Xenstored(tmp_path / "root")
    qdir = tmp_path / "dom0"
    qdir.mkdir(mode=0o700)
    r, wfd = small_pipe()  # nobody reads it; a bounded flood fills it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aioxen",
            "qrexec",
            "daemon",
            "--domain",
            f"evil={EVIL}",
            "--socket-dir",
            str(qdir),
        ],
        env=xs.env(0),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=wfd,
    )
    os.close(wfd)
    try:
        async with UnixPlatform(EVIL, root=xs.root) as plat:
            evil = VchanChannels(plat)
            pending = await evil.listen(0, CONTROL_PORT, buffer_size=4096)
            try:
                reader, writer = await pending.accept(timeout=GUARD)  # the daemon connects
            finally:
                pending.close()
            await exchange_hello(reader, writer, version=4, min_version=2)
            async with asyncio.timeout(GUARD * 3):  # old code: no reply after ~40 requests
                for i in range(300):  # ~90 bytes of warning each: the pipe fills many times
                    ident = f"S{i}".encode()
                    writer.write(_trigger(ident))
                    head = await reader.readexactly(8)
                    body = await reader.readexactly(struct.unpack("<II", head)[1])
                    assert struct.unpack("<I", head[:4])[0] == w.MSG_SERVICE_REFUSED
                    assert w.parse_service_params(body) == ident.decode()
            writer.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, GUARD) == 143  # old code: stuck in write(2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        logged = leftover(r)
        xs.stop()
    assert b"bad request from evil" in logged
