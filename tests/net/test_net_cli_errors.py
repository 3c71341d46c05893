"""``aioxen netback`` / ``aioxen netfront`` against the command-line standard (issue 16),
with the real ``aioxen`` entry point in real processes.

A table of bad command lines: each exits 2 with one ``aioxen CMD: ...`` message first on
stderr, no traceback, and creates nothing (the ``$XEN_ROOT`` it would use stays absent,
no TAP interface appears).  With a live ``xenstored``: a netfront whose device never
appears says what it waited for (rc 1, the ``--timeout`` given, not a bare
``TimeoutError``), and netback exits 130 on SIGINT and 143 on SIGTERM after removing its
vifs.  (netfront's 130/143 need a TAP: tests/net/test_netns_e2e.py checks them.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_harness import Xenstored
from support.cli_run import AIOXEN, run, standard_error

pytestmark = pytest.mark.crossprocess


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


TAP = f"axe{os.getpid() % 100000}"  # a name no test creates: it must not appear

# (argv, program, words of the message); every row is a usage error (rc 2)
BAD_INPUT: list[tuple[list[str], str, tuple[str, ...]]] = [
    (["netback", "--frontend", "70000", "--tap", TAP], "aioxen netback", ("--frontend", "70000")),
    (["netback", "--frontend", "-1", "--tap", TAP], "aioxen netback", ("--frontend",)),
    (["netback", "--frontend", "one", "--tap", TAP], "aioxen netback", ("--frontend",)),
    (["netback", "--frontend", "5"], "aioxen netback", ("--tap", "--switch")),
    (
        ["netback", "--frontend", "5", "--frontend", "6", "--tap", TAP],
        "aioxen netback",
        ("--switch",),
    ),
    (
        ["netback", "--frontend", "5", "--devid", "foo", "--tap", TAP],
        "aioxen netback",
        ("--devid", "foo"),
    ),
    (["netback", "--frontend", "5", "--devid", "-1", "--tap", TAP], "aioxen netback", ("--devid",)),
    (
        ["netback", "--frontend", "5", "--mtu", "10", "--tap", TAP],
        "aioxen netback",
        ("--mtu", "68..65535"),
    ),
    (
        ["netback", "--frontend", "5", "--mac", "zz", "--tap", TAP],
        "aioxen netback",
        ("--mac", "zz"),
    ),
    (["netback", "--frontend", "5", "--tap", "x" * 16], "aioxen netback", ("--tap", "15 bytes")),
    (["netback", "--frontend", "5", "--tap", "a/b"], "aioxen netback", ("--tap",)),
    (["netback", "--tap", TAP], "aioxen netback", ("--frontend",)),
    (["netfront"], "aioxen netfront", ("--tap",)),
    (["netfront", "--tap", TAP, "--backend", "70000"], "aioxen netfront", ("--backend", "70000")),
    (["netfront", "--tap", TAP, "--timeout", "0"], "aioxen netfront", ("--timeout",)),
    (["netfront", "--tap", TAP, "--timeout", "soon"], "aioxen netfront", ("--timeout",)),
    (["netfront", "--tap", TAP, "--devid", "x"], "aioxen netfront", ("--devid",)),
]


@pytest.mark.parametrize(
    ("argv", "prog", "words"), BAD_INPUT, ids=[" ".join(r[0]) for r in BAD_INPUT]
)
def test_bad_input(tmp_path: Path, argv: list[str], prog: str, words: tuple[str, ...]) -> None:
    root = tmp_path / "world"
    env = {
        **os.environ,
        "XEN_ROOT": str(root),
        "XENSTORED_PATH": str(root / "xenstored" / "socket"),
        "AIOXEN_PLATFORM": "unix",
        "AIOXEN_DOMID": "0",
    }
    proc = run(env, *argv)
    standard_error(proc, 2, prog, *words)
    assert list(tmp_path.iterdir()) == []  # nothing created: no world, no files
    assert not link_exists(TAP)


def test_help_is_complete_and_plain() -> None:
    for cmd in ("netback", "netfront"):
        proc = subprocess.run([*AIOXEN, cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "``" not in proc.stdout and ":mod:" not in proc.stdout, proc.stdout
    from aioxen.cli import build_parser, walk_parsers

    for parser in walk_parsers(build_parser()):
        if parser.prog in ("aioxen netback", "aioxen netfront"):
            for action in parser._actions:
                assert action.help, f"{parser.prog} {action.option_strings}: no help"


@pytest.fixture
def xs() -> Iterator[Xenstored]:
    server = Xenstored()
    try:
        yield server
    finally:
        server.stop()


def test_netfront_without_backend_says_what_was_awaited(xs: Xenstored) -> None:
    start = time.monotonic()
    proc = run(xs.client_env(3), "netfront", "--tap", TAP, "--timeout", "1")
    standard_error(
        proc, 1, "aioxen netfront", "vif 3/0", "after 1 s", "/local/domain/3/device/vif/0/backend"
    )
    assert time.monotonic() - start < 50  # the 1 s asked for
    assert not link_exists(TAP)  # the TAP is touched only once the device is there


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_netback_signal_exit_status(xs: Xenstored, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [*AIOXEN, "netback", "--switch", "--frontend", "4"], env=xs.client_env(0),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY netback domain 0 serving vif 4/0"), line
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (128 + sig, ""), err
    gone = run(xs.client_env(0), "xenstore", "read", "/local/domain/0/backend/vif/4/0/state")
    assert gone.returncode == 1, gone.stdout  # removed what it created


def test_netfront_backend_that_never_connects_is_named(xs: Xenstored) -> None:
    """The vif exists (a toolstack made it) but no netback serves it: the message names
    the backend directory and both ends' states; the TAP (opened for the connect) is gone
    after the exit."""
    add = run(xs.client_env(0), "device", "add", "vif", "3", "--key", "mac=00:16:3e:00:00:03")
    assert add.returncode == 0, add.stderr
    proc = run(xs.client_env(3), "netfront", "--tap", TAP, "--timeout", "1")
    standard_error(
        proc, 1, "aioxen netfront", "vif 3/0", "backend /local/domain/0/backend/vif/3/0",
        "did not connect within 1 s", "frontend state", "backend state",
    )  # fmt: skip
    assert not link_exists(TAP)


def test_netback_tells_a_supervisor(xs: Xenstored, tmp_path: Path) -> None:
    """``$NOTIFY_SOCKET`` gets ``READY=1`` once the vifs are served, ``STOPPING=1`` at the
    stop."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)  # hang guard
    env = {**xs.client_env(0), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(
        [*AIOXEN, "netback", "--switch", "--frontend", "4"], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        msg = notify.recv(4096).decode()
        assert msg == "READY=1\nSTATUS=READY netback domain 0 serving vif 4/0", msg
        proc.send_signal(signal.SIGINT)
        assert notify.recv(4096) == b"STOPPING=1"
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (130, ""), err
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
