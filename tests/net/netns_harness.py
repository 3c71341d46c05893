"""Test scaffolding: network namespaces with TAP devices, an ``aioxen xenstored`` and
``aioxen`` CLI processes running inside namespaces.

Only namespaces created here are ever sent traffic; addresses are in 10.231.0.0/24 inside
them.  Everything is torn down by the fixtures (processes terminated, namespaces deleted).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from aioxen.bench.harness import end_process

RUN_CLI = str(Path(__file__).with_name("run_cli.py"))
_counter = itertools.count()


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout


class NetNs:
    """A network namespace with loopback up; deleted by :meth:`delete`."""

    def __init__(self, tag: str) -> None:
        self.name = f"axt{os.getpid()}{tag}{next(_counter)}"
        ip("netns", "add", self.name)
        ip("link", "set", "lo", "up", netns=self.name)

    def add_tap(self, dev: str, address: str | None = None, *, up: bool = True) -> None:
        """A persistent TAP with vnet headers (so aioxen can attach with offloads)."""
        ip("tuntap", "add", "dev", dev, "mode", "tap", "vnet_hdr", netns=self.name)
        if address:
            ip("addr", "add", address, "dev", dev, netns=self.name)
        if up:
            ip("link", "set", dev, "up", netns=self.name)

    def exec_args(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_args(*cmd), capture_output=True, text=True, timeout=timeout)

    def delete(self) -> None:
        ip("netns", "del", self.name, check=False)


class Xenstored:
    """``aioxen xenstored --root DIR`` as a child process; :attr:`env` for clients."""

    def __init__(self) -> None:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # grant pages on tmpfs
        self.root = tempfile.mkdtemp(prefix="aioxen-net-", dir=shm)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aioxen", "xenstored", "--root", self.root],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.env: dict[str, str] = {}
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        while len(self.env) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("xenstored did not print its exports")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"xenstored exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            key, _, value = line.split(";", 1)[0].partition("=")
            if key in ("XEN_ROOT", "XENSTORED_PATH"):
                self.env[key] = value

    def client_env(self, domid: int) -> dict[str, str]:
        return {
            **os.environ,
            **self.env,
            "AIOXEN_PLATFORM": "unix",
            "AIOXEN_DOMID": str(domid),
        }

    def stop(self) -> None:
        end_process(self.proc, 15)
        shutil.rmtree(self.root, ignore_errors=True)


class CliProcess:
    """An ``aioxen`` subcommand (through ``run_cli.py LOOP``) inside a namespace."""

    def __init__(self, ns: NetNs, env: dict[str, str], loop: str, *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            ns.exec_args(sys.executable, RUN_CLI, loop, *args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._err = threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True)
        self._err.start()

    def _drain(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.stderr_lines.append(line)

    def wait_ready(self, timeout: float = 30) -> str:
        """The ``READY ...`` line (the process must print it within ``timeout``)."""
        assert self.proc.stdout is not None
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("READY"):
                    result.append(line.strip())
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            raise TimeoutError(
                f"aioxen {' '.join(self.args)} not ready after {timeout} s; "
                f"exit={self.proc.poll()} stderr:\n{''.join(self.stderr_lines)}"
            )
        return result[0]

    def stop(self, sig: int = 15) -> int:
        """Stop with signal ``sig`` (SIGTERM; the command exits 128 + sig after a clean
        stop), SIGKILL after 15 s; the exit status."""
        if sig != 15 and self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        code = end_process(self.proc, 15)
        self._err.join(2)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)
