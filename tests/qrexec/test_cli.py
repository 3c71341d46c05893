"""``aioxen qrexec`` follows the CLI standard: usage errors exit 2 before any I/O,
runtime failures exit 1 with one ``aioxen qrexec ...:`` line, SIGINT -> 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.xenstored import Xenstored

AIOXEN = [sys.executable, "-m", "aioxen", "qrexec"]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        AIOXEN + args,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "XEN_ROOT": "/nonexistent-qrexec", **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "prefix", "words"),
    [
        (["daemon"], "aioxen qrexec daemon:", "--domain"),
        (["daemon", "--domain", "work"], "aioxen qrexec daemon:", "NAME=DOMID"),
        (["daemon", "--domain", "dom0=2"], "aioxen qrexec daemon:", "cannot name a VM"),
        (["daemon", "--domain", "work=0"], "aioxen qrexec daemon:", "daemon's own domain"),
        (["daemon", "--domain", "work=99999"], "aioxen qrexec daemon:", "domid"),
        (["daemon", "--domain", "a=2", "--domain", "b=2"], "aioxen qrexec daemon:", "only once"),
        (
            ["daemon", "--domain", "a=2", "--policy", "{missing}"],
            "aioxen qrexec daemon:",
            "--policy",
        ),
        (
            ["daemon", "--domain", "a=2", "--policy", "{badpolicy}"],
            "aioxen qrexec daemon:",
            "unknown action",
        ),
        (
            ["daemon", "--domain", "a=2", "--policy", "{badpolicy}", "--policy-socket", "x"],
            "aioxen qrexec daemon:",
            "not allowed with",
        ),
        (
            ["daemon", "--domain", "a=2", "--socket-dir", "{missing}"],
            "aioxen qrexec daemon:",
            "not a directory",
        ),
        (["agent", "--services-dir", "{missing}"], "aioxen qrexec agent:", "not a directory"),
        (["agent", "--max-version", "5"], "aioxen qrexec agent:", "2"),
        (["agent", "--trigger-mode", "rw"], "aioxen qrexec agent:", "not an octal file mode"),
        (["agent", "--trigger-mode", "4755"], "aioxen qrexec agent:", "out of range"),
        (
            ["daemon", "--domain", "a=2", "--socket-mode", "9"],
            "aioxen qrexec daemon:",
            "not an octal file mode",
        ),
        (["call", "vault", "bad/name"], "aioxen qrexec call:", "service name"),
        (["call", "va ult", "x"], "aioxen qrexec call:", "target"),
        (["call", "vault"], "aioxen qrexec call:", "service"),
        (
            ["client-vm", "vault", "my.Svc", "--timeout", "-1"],
            "aioxen qrexec client-vm:",
            "--timeout",
        ),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], prefix: str, words: str) -> None:
    bad = tmp_path / "bad.policy"
    bad.write_text("my.Svc * a b perhaps\n")
    args = [
        a.replace("{missing}", str(tmp_path / "missing")).replace("{badpolicy}", str(bad))
        for a in args
    ]
    r = run(args, {"XEN_ROOT": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(prefix) and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_runtime_errors_exit_1(tmp_path: Path) -> None:
    xs = Xenstored(tmp_path / "root")
    try:
        env = xs.env(0)
        # no daemon socket there: one line, rc 1
        r = subprocess.run(
            [*AIOXEN, "call", "vault", "my.Svc", "--dir", str(tmp_path / "nowhere")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("aioxen qrexec call:") and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        # client-vm in dom0 is a usage error found after parsing
        r = subprocess.run(
            [*AIOXEN, "client-vm", "vault", "my.Svc"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 2 and "not in dom0" in r.stderr, r.stderr
        # --debug shows the traceback
        r = subprocess.run(
            [*AIOXEN, "call", "vault", "my.Svc", "--dir", str(tmp_path / "x"), "--debug"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
    finally:
        assert xs.stop() == 0


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_agent_stops_on_signals(tmp_path: Path, sig: int, status: int) -> None:
    xs = Xenstored(tmp_path / "root")
    try:
        trig = tmp_path / "t"
        r, w = os.pipe()
        p = subprocess.Popen(
            [*AIOXEN, "agent", "--trigger-socket", str(trig), "--ready-fd", str(w)],
            env=xs.env(4),
            pass_fds=(w,),
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(w)
        with os.fdopen(r) as ready:
            assert "AIOXEN_QREXEC_TRIGGER=" in ready.read()
        assert trig.exists()
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == status, err
        assert not trig.exists(), "the trigger socket is removed at a clean stop"
    finally:
        assert xs.stop() == 0
