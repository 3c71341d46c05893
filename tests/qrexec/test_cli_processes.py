"""qrexec between real processes on the unix platform: ``aioxen qrexec agent`` for two
VMs, ``aioxen qrexec daemon`` in dom0, calls with ``aioxen qrexec call`` / ``client-vm``
(dom0 -> VM, VM -> VM through the policy, refusal, 127), and a peer killed mid-call
(the other side ends with an error, nothing hangs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.xenstored import Xenstored

POLICY = """\
test.Echo  *  work  vault  allow
test.Slow  *  work  vault  allow
*          *  *     *      deny
"""


class Lab:
    def __init__(self, tmp: Path, xs: Xenstored) -> None:
        self.tmp, self.xs = tmp, xs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.qdir = tmp / "dom0"  # the daemon's client sockets
        self.qdir.mkdir(mode=0o700)
        self.rpc = tmp / "rpc"
        self.rpc.mkdir()
        echo = self.rpc / "test.Echo"
        echo.write_text('#!/bin/sh\necho "from $QREXEC_REMOTE_DOMAIN arg=$1"\ncat\n')
        echo.chmod(0o755)
        slow = self.rpc / "test.Slow"
        slow.write_text("#!/bin/sh\necho started\nexec sleep 600\n")
        slow.chmod(0o755)
        (tmp / "policy").write_text(POLICY)

    def start(self, domid: int, *args: str) -> subprocess.Popen[bytes]:
        r, w = os.pipe()
        p = subprocess.Popen(
            [sys.executable, "-m", "aioxen", "qrexec", *args, "--ready-fd", str(w)],
            env=self.xs.env(domid),
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(w)
        self.procs.append(p)
        with os.fdopen(r, "rb") as ready:
            assert ready.read(), f"{args[0]} never became ready (rc {p.wait(10)})"
        return p

    def vm_dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def run(self, domid: int, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "aioxen", "qrexec", *args],
            env=self.xs.env(domid),
            input=input,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            rc = p.wait(20)
            assert p.stderr is not None
            err = p.stderr.read().decode()
            p.stderr.close()
            assert rc in (143, -9), (p.args, rc, err)
            assert "Traceback" not in err, err


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    xs = Xenstored(tmp_path / "root")
    lab = Lab(tmp_path, xs)
    try:
        lab.start(
            2,
            "agent",
            "--services-dir",
            str(lab.rpc),
            "--trigger-socket",
            str(lab.vm_dir("work") / "qrexec-agent"),
        )
        lab.start(
            3,
            "agent",
            "--services-dir",
            str(lab.rpc),
            "--trigger-socket",
            str(lab.vm_dir("vault") / "qrexec-agent"),
        )
        lab.start(
            0,
            "daemon",
            "--domain",
            "work=2",
            "--domain",
            "vault=3",
            "--domain",
            "old=4",
            "--domain",
            "mid=5",
            "--policy",
            str(tmp_path / "policy"),
            "--socket-dir",
            str(lab.qdir),
        )
        yield lab
        lab.stop()
    finally:
        for p in lab.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert xs.stop() == 0


def test_calls_between_processes(lab: Lab) -> None:
    # dom0 -> VM (the daemon's client socket, as qrexec-client)
    r = lab.run(0, "call", "vault", "test.Echo+x", "--dir", str(lab.qdir), input=b"hi\n")
    assert (r.returncode, r.stdout) == (0, b"from dom0 arg=x\nhi\n"), r.stderr
    # VM -> VM through the policy (the agent's trigger socket, as qrexec-client-vm)
    trig = str(lab.vm_dir("work") / "qrexec-agent")
    r = lab.run(2, "client-vm", "vault", "test.Echo", "--trigger-socket", trig, input=b"yo")
    assert (r.returncode, r.stdout) == (0, b"from work arg=\nyo"), r.stderr
    # denied by the policy: 126 and one line on stderr
    vtrig = str(lab.vm_dir("vault") / "qrexec-agent")
    r = lab.run(3, "client-vm", "work", "test.Echo", "--trigger-socket", vtrig)
    assert r.returncode == 126, r.stderr
    assert r.stderr.decode().startswith("aioxen qrexec client-vm: test.Echo in work"), r.stderr
    # allowed, but no such service in dom0's call: 127
    r = lab.run(0, "call", "vault", "test.Nothing", "--dir", str(lab.qdir))
    assert r.returncode == 127, r.stderr


def test_service_killed_mid_call_ends_the_caller(lab: Lab) -> None:
    trig = str(lab.vm_dir("work") / "qrexec-agent")
    caller = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aioxen",
            "qrexec",
            "client-vm",
            "vault",
            "test.Slow",
            "--trigger-socket",
            trig,
        ],
        env=lab.xs.env(2),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert caller.stdout is not None
    assert caller.stdout.readline() == b"started\n"
    vault_agent = lab.procs[1]
    vault_agent.kill()  # the service side's agent (and its data channel) die
    vault_agent.wait()
    _, err = caller.communicate(timeout=60)
    assert caller.returncode == 1, err
    assert b"aioxen qrexec client-vm:" in err and b"Traceback" not in err, err
    # the daemon and the other VM keep serving: dom0 -> work still works
    r = lab.run(0, "call", "work", "test.Echo", "--dir", str(lab.qdir), input=b"ok")
    assert (r.returncode, r.stdout) == (0, b"from dom0 arg=\nok"), r.stderr


def test_caller_killed_mid_call_ends_the_service(lab: Lab) -> None:
    marker = lab.tmp / "service-ended"
    cat = lab.rpc / "test.Cat"
    cat.write_text(f"#!/bin/sh\necho started\ncat >/dev/null\ntouch {marker}\n")
    cat.chmod(0o755)
    caller = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aioxen",
            "qrexec",
            "call",
            "vault",
            "test.Cat",
            "--dir",
            str(lab.qdir),
        ],
        env=lab.xs.env(0),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert caller.stdout is not None
    assert caller.stdout.readline() == b"started\n"
    caller.kill()
    caller.communicate()
    deadline = time.monotonic() + 60
    while not marker.exists():  # the service saw its stdin end (no hang)
        assert time.monotonic() < deadline, "service never ended after its caller died"
        time.sleep(0.05)
    r = lab.run(0, "call", "vault", "test.Echo", "--dir", str(lab.qdir), input=b"again")
    assert (r.returncode, r.stdout) == (0, b"from dom0 arg=\nagain"), r.stderr


@pytest.mark.parametrize(("domid", "name", "version"), [(4, "old", 2), (5, "mid", 3)])
def test_multichunk_between_processes_at_older_versions(
    lab: Lab, domid: int, name: str, version: int
) -> None:
    """An agent process capped at v2 (4 KiB chunks) or v3: 1 MiB each way, intact."""
    cat = lab.rpc / "test.Cat"
    cat.write_text("#!/bin/sh\nexec cat\n")
    cat.chmod(0o755)
    lab.start(domid, "agent", "--services-dir", str(lab.rpc), "--max-version", str(version))
    data = os.urandom(1 << 20)
    r = lab.run(0, "call", name, "test.Cat", "--dir", str(lab.qdir), input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_processes_over_vchan_socket(tmp_path: Path) -> None:
    """The same commands over Qubes' vchan-socket wire (no xenstored, no platform):
    ``--vchan-socket`` with ``$VCHAN_SOCKET_DIR``/``$VCHAN_DOMAIN`` as Qubes' programs."""
    vdir = tmp_path / "vchan"
    vdir.mkdir(mode=0o700)
    qdir = tmp_path / "q"
    qdir.mkdir(mode=0o700)
    rpc = tmp_path / "rpc"
    rpc.mkdir()
    svc = rpc / "test.Echo"
    svc.write_text('#!/bin/sh\necho "from $QREXEC_REMOTE_DOMAIN"\ncat\n')
    svc.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("XEN_ROOT", "XENSTORED_PATH")}

    def env(domid: int) -> dict[str, str]:
        return {**base, "VCHAN_SOCKET_DIR": str(vdir), "VCHAN_DOMAIN": str(domid)}

    procs = []
    try:
        for domid, args in (
            (2, ["agent", "--services-dir", str(rpc)]),
            (0, ["daemon", "--domain", "work=2", "--socket-dir", str(qdir)]),
        ):
            r, w = os.pipe()
            p = subprocess.Popen(
                [sys.executable, "-m", "aioxen", "qrexec", *args, "--vchan-socket",
                 "--ready-fd", str(w)],
                env=env(domid), pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            os.close(w)
            procs.append(p)
            with os.fdopen(r, "rb") as ready:
                assert ready.read(), p.wait(10)
        res = subprocess.run(
            [sys.executable, "-m", "aioxen", "qrexec", "call", "work", "test.Echo",
             "--dir", str(qdir), "--vchan-socket"],
            env=env(0), input=b"over sockets", capture_output=True, timeout=60,
        )  # fmt: skip
        assert (res.returncode, res.stdout) == (0, b"from dom0\nover sockets"), res.stderr
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(20) == 143
            assert p.stderr is not None
            p.stderr.close()
