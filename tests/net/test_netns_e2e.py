"""Real kernel traffic through netfront ↔ netback on the ``unix`` platform.

Two network namespaces, each with a TAP: ``aioxen netfront --tap`` runs in one (domain
1), ``aioxen netback --tap`` in the other (domain 0), both talking through an ``aioxen
xenstored`` and unix-platform grants/event channels.  The kernels then ping each other and
move 100 MiB over TCP each way (Python's HTTP server and curl), checked by SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_harness import CliProcess, NetNs, Xenstored

from aioxen.bench.harness import end_process

pytestmark = [pytest.mark.crossprocess, pytest.mark.timeout(240)]

FRONT_IP, BACK_IP = "10.231.0.1", "10.231.0.2"
MIB = 1 << 20


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def namespaces() -> Iterator[tuple[NetNs, NetNs]]:
    made: list[NetNs] = []
    try:
        front = NetNs("f")
        made.append(front)
        back = NetNs("b")
        made.append(back)
        front.add_tap("vif0", f"{FRONT_IP}/24")
        back.add_tap("vif0", f"{BACK_IP}/24")
        yield front, back
    finally:
        for ns in made:
            ns.delete()


@pytest.fixture
def xenstored() -> Iterator[Xenstored]:
    xs = Xenstored()
    try:
        yield xs
    finally:
        xs.stop()


@pytest.fixture
def vif_pair(
    namespaces: tuple[NetNs, NetNs], xenstored: Xenstored, loop_name: str
) -> Iterator[tuple[NetNs, NetNs, CliProcess, CliProcess]]:
    front_ns, back_ns = namespaces
    back = CliProcess(
        back_ns, xenstored.client_env(0), loop_name, "netback", "--frontend", "1", "--tap", "vif0"
    )
    front: CliProcess | None = None
    try:
        back.wait_ready()
        front = CliProcess(
            front_ns,
            xenstored.client_env(1),
            loop_name,
            "netfront",
            "--backend",
            "0",
            "--tap",
            "vif0",
        )
        line = front.wait_ready()
        assert "mac 00:16:3e:00:01:00" in line and "mtu 1500" in line
        yield front_ns, back_ns, front, back
    finally:
        codes = []
        if front is not None:
            codes.append(("netfront", front.stop(), front.stderr))
        codes.append(("netback", back.stop(), back.stderr))
        for name, code, err in codes:
            assert code == 143, f"{name} exited {code} (not 143 after SIGTERM):\n{err}"


def test_ping_200_no_loss(vif_pair: tuple[NetNs, NetNs, CliProcess, CliProcess]) -> None:
    front_ns, back_ns, _, _ = vif_pair
    # the vif's MAC came from XenStore onto the TAP
    link = front_ns.run("ip", "link", "show", "vif0").stdout
    assert "00:16:3e:00:01:00" in link
    res = front_ns.run("ping", "-c", "200", "-i", "0.005", "-W", "5", "-q", BACK_IP, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"200 packets transmitted, 200 received, 0% packet loss", res.stdout), (
        res.stdout
    )
    # and the other way, with full-size frames
    res = back_ns.run(
        "ping", "-c", "50", "-i", "0.005", "-s", "1472", "-M", "do", "-q", FRONT_IP, timeout=60
    )
    assert re.search(r"50 packets transmitted, 50 received, 0% packet loss", res.stdout), res.stdout


def _http_transfer(server_ns: NetNs, client_ns: NetNs, server_ip: str, tmp: Path) -> None:
    """Serve a 100 MiB random file from ``server_ns``; fetch it with curl in ``client_ns``."""
    src = tmp / "payload.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MIB))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    server = subprocess.Popen(
        server_ns.exec_args(
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            server_ip,
            "8080",
            "--directory",
            str(tmp),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        dst = tmp / "fetched.bin"
        deadline = time.monotonic() + 20
        while True:
            res = client_ns.run(
                "curl", "-sS", "--fail", "-o", str(dst), "--max-time", "120",
                f"http://{server_ip}:8080/payload.bin", timeout=150,
            )  # fmt: skip
            if res.returncode != 7 or time.monotonic() > deadline:  # 7: not listening yet
                break
            time.sleep(0.2)
        assert res.returncode == 0, res.stderr
        assert dst.stat().st_size == 100 * MIB
        assert hashlib.sha256(dst.read_bytes()).hexdigest() == want
    finally:
        end_process(server, 15)  # type: ignore[arg-type]


def test_tcp_100mib_both_ways(
    vif_pair: tuple[NetNs, NetNs, CliProcess, CliProcess], tmp_path: Path
) -> None:
    front_ns, back_ns, _, _ = vif_pair
    (tmp_path / "b").mkdir()
    (tmp_path / "f").mkdir()
    _http_transfer(back_ns, front_ns, BACK_IP, tmp_path / "b")  # backend -> frontend
    _http_transfer(front_ns, back_ns, FRONT_IP, tmp_path / "f")  # frontend -> backend


def test_switch_two_guests_and_uplink(xenstored: Xenstored, loop_name: str, tmp_path: Path) -> None:
    """``netback --switch`` with two frontends and a TAP uplink: three kernels, one L2."""
    made: list[NetNs] = []
    procs: list[CliProcess] = []
    try:
        host = NetNs("h")
        made.append(host)
        host.add_tap("up0", "10.231.1.254/24")
        guests = []
        for d in (1, 2):
            ns = NetNs(f"g{d}")
            made.append(ns)
            ns.add_tap("vif0", f"10.231.1.{d}/24")
            guests.append(ns)
        back = CliProcess(
            host, xenstored.client_env(0), loop_name, "netback", "--switch",
            "--frontend", "1", "--frontend", "2", "--tap", "up0",
        )  # fmt: skip
        procs.append(back)
        back.wait_ready()
        for d, ns in zip((1, 2), guests, strict=True):
            f = CliProcess(
                ns, xenstored.client_env(d), loop_name, "netfront", "--backend", "0",
                "--tap", "vif0",
            )  # fmt: skip
            procs.append(f)
            f.wait_ready()
        for ns, target in ((guests[0], "10.231.1.2"), (guests[1], "10.231.1.254"),
                           (host, "10.231.1.1")):  # fmt: skip
            res = ns.run("ping", "-c", "20", "-i", "0.01", "-W", "5", "-q", target, timeout=60)
            assert re.search(r"20 received, 0% packet loss", res.stdout), res.stdout + res.stderr
        (tmp_path / "s").mkdir()
        _http_transfer(guests[0], guests[1], "10.231.1.1", tmp_path / "s")
    finally:
        for p in reversed(procs):  # netfronts by SIGINT (130), the netback by SIGTERM (143)
            sig = 2 if p.args[0] == "netfront" else 15
            code = p.stop(sig)
            assert code == 128 + sig, f"{p.args[0]} exited {code} after signal {sig}:\n{p.stderr}"
        for ns in made:
            ns.delete()
