"""``aioxen bridge`` as a command: curl -> TCP/Unix -> bridge -> vchan -> bridge -> TCP ->
``python -m http.server``, every hop a real process, several downloads at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from apps_harness import AIOXEN, random_file, sha256_file
from support.xenstored import XenstoredProcess

from aioxen.platforms.unix import root_leaks

pytestmark = pytest.mark.crossprocess

MiB = 1024 * 1024


class Proc:
    """A background process whose first stdout line we wait for."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline().decode()
        assert self.first_line, (args, self.proc.poll(), self.proc.stderr)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; return the status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode()


def _listening(p: Proc) -> str:
    m = re.fullmatch(r"aioxen bridge: listening on (\S+)\n", p.first_line)
    assert m, p.first_line
    return m.group(1)


def test_curl_through_two_bridges(tmp_path: Path, xenstored: XenstoredProcess) -> None:
    site = tmp_path / "site"
    site.mkdir()
    sums = {
        name: random_file(site / name, size, seed)
        for name, size, seed in [("big.bin", 8 * MiB + 3, 10), ("small.txt", 1000, 11)]
    }
    procs: list[Proc] = []
    try:
        http = Proc(
            [
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(site),
            ]
        )
        procs.append(http)
        m = re.search(r"port (\d+)", http.first_line)
        assert m, http.first_line
        http_port = m.group(1)
        # domain 0 offers the web server to domain 2 as vchan port "web"
        offer = Proc(
            [
                *AIOXEN,
                "bridge",
                "--listen",
                "vchan:2/web",
                "--connect",
                f"tcp:127.0.0.1:{http_port}",
            ],
            env=xenstored.env(0),
        )
        procs.append(offer)
        assert _listening(offer) == "vchan:2/web"
        # domain 2 uses it through a local TCP port and a Unix socket
        use_tcp = Proc(
            [*AIOXEN, "bridge", "-v", "--listen", "tcp:127.0.0.1:0", "--connect", "vchan:0/web"],
            env=xenstored.env(2),
        )
        procs.append(use_tcp)
        tcp_addr = _listening(use_tcp)
        m = re.fullmatch(r"tcp:127\.0\.0\.1:(\d+)", tcp_addr)
        assert m, tcp_addr
        sock = tmp_path / "web.sock"
        use_unix = Proc(
            [*AIOXEN, "bridge", "-v", "--listen", f"unix:{sock}", "--connect", "vchan:0/web"],
            env=xenstored.env(2),
        )
        procs.append(use_unix)
        assert _listening(use_unix) == f"unix:{sock}"

        base = f"http://127.0.0.1:{m.group(1)}"
        via_tcp = ["curl", "-sS", "--fail"]
        via_unix = ["curl", "-sS", "--fail", "--unix-socket", str(sock)]
        curls = [(use_tcp, f"tcp{i}", "big.bin", [*via_tcp, f"{base}/big.bin"]) for i in range(4)]
        curls += [
            (use_unix, f"unix{i}", "big.bin", [*via_unix, "http://web/big.bin"]) for i in range(2)
        ]
        curls += [(use_tcp, "small", "small.txt", [*via_tcp, f"{base}/small.txt"])]
        # all at once: two bridge processes connect to the vchan server concurrently
        running = [
            (
                name,
                want,
                subprocess.Popen([*args, "-o", str(tmp_path / name)], stderr=subprocess.PIPE),
            )
            for _, name, want, args in curls
        ]
        failed = []
        for name, want, p in running:
            _, err = p.communicate(timeout=60)
            if p.returncode != 0 or sha256_file(tmp_path / name) != sums[want]:
                failed.append((name, p.returncode, err))
        if failed:
            logs = {str(p.proc.args[-3:]): p.stop() for p in procs}
            pytest.fail(f"downloads failed: {failed}\nprocesses: {logs}")

        for p, n in ((use_tcp, 5), (use_unix, 2)):
            rc, err = p.stop()
            assert rc == 143, err
            assert err.count("bridged to vchan:0/web") == n, err
            assert err.count("closed:") == n, err
        rc, err = offer.stop()
        assert (rc, err) == (143, "")
        assert not sock.exists()
        assert root_leaks(str(xenstored.root)) == []
    finally:
        for p in procs:
            p.stop()
            for f in (p.proc.stdout, p.proc.stderr):
                if f is not None:
                    f.close()


def test_bridge_command_errors(xenstored: XenstoredProcess, tmp_path: Path) -> None:
    bad = subprocess.run(
        [*AIOXEN, "bridge", "--listen", "tcp:nowhere", "--connect", "vchan:0/x"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert b"expected tcp:HOST:PORT" in bad.stderr
    blocker = Proc(
        [*AIOXEN, "bridge", "--listen", "tcp:127.0.0.1:0", "--connect", "tcp:127.0.0.1:9"],
    )
    try:
        addr = _listening(blocker)
        busy = subprocess.run(
            [*AIOXEN, "bridge", "--listen", addr, "--connect", "vchan:0/x"],
            capture_output=True,
            timeout=60,
            check=False,
            env=xenstored.env(2),
        )
        assert busy.returncode == 1
        lines = busy.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"aioxen bridge: cannot listen on {addr}:")
    finally:
        rc, err = blocker.stop()
        assert rc == 143, err
