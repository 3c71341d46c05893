"""Test-side driver of ``peer.py``: one real process playing another domain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

PEER_SCRIPT = Path(__file__).with_name("peer.py")


class PeerError(Exception):
    """The peer answered ``err <ExceptionName> <message>``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class PeerProcess:
    """Drive ``peer.py`` line by line (see its docstring for the commands)."""

    def __init__(self, proc: asyncio.subprocess.Process, domid: int) -> None:
        self.proc = proc
        self.domid = domid

    @classmethod
    async def start(cls, root: str | Path, domid: int, loop: str = "uvloop") -> PeerProcess:
        env = dict(os.environ, XEN_ROOT=str(root), AIOXEN_DOMID=str(domid), PEER_LOOP=loop)
        env.pop("AIOXEN_PLATFORM", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER_SCRIPT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        peer = cls(proc, domid)
        assert await peer.reply(timeout=30) == ["ready"]
        return peer

    def send(self, line: str) -> None:
        """Send a command without waiting for its answer (collect it with :meth:`reply`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def reply(self, timeout: float = 20) -> list[str]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise EOFError(f"peer domain {self.domid} exited ({self.proc.returncode})")
        words = line.decode().split()
        if words and words[0] == "err":
            raise PeerError(words[1], " ".join(words[2:]))
        return words

    async def cmd(self, line: str, timeout: float = 20) -> list[str]:
        """Send one command and return the words of its ``ok`` answer (without ``ok``)."""
        self.send(line)
        words = await self.reply(timeout)
        assert words[0] == "ok", words
        return words[1:]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def exit(self) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
                await self.cmd("exit")
        return await asyncio.wait_for(self.proc.wait(), 20)

    async def reap(self) -> None:
        """Kill (if still running) and wait, for fixture teardown."""
        self.kill()
        await asyncio.wait_for(self.proc.wait(), 20)
