"""Long-running commands in shells and under service managers (the CLI standard,
:mod:`aioxen.apps.clistd`), with real processes and real sockets:

* SIGINT -> 130, SIGTERM -> 143 and SIGHUP -> 129 after a clean stop, for ``xenstored``,
  ``bridge``, ``cat``, ``xenstore watch`` and ``console``; SIGHUP left ignored under
  ``nohup``;
* readiness: ``--env-file`` (atomic, 0600, sourced by a real shell, removed at stop),
  ``--ready-fd``, systemd's ``$NOTIFY_SOCKET`` (a real datagram socket, path and abstract);
* the documented shell pattern ``aioxen xenstored --root R --env-file R/env &`` returns;
* ``cat`` against a xenstored that stops answering: a clean message, no asyncio
  "Future exception was never retrieved".
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.xenstored import Xenstored

AIOXEN = [sys.executable, "-m", "aioxen"]
T = 60  # hang guard only


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XEN_ROOT", "XENSTORED_PATH", "AIOXEN_PLATFORM", "AIOXEN_DOMID")
        if k not in ("NOTIFY_SOCKET", "AIOXEN_DEBUG")
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def xs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    server = Xenstored(tmp_path_factory.mktemp("daemons") / "root")
    yield server
    assert server.stop() == 0


def _wait_file(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + T
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _end(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=T)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{proc.args} did not stop on signal {sig}") from None
    return proc.returncode, (err or b"").decode(errors="replace")


SIGNALS = [
    pytest.param(signal.SIGINT, 130, id="SIGINT"),
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    pytest.param(signal.SIGHUP, 129, id="SIGHUP"),
]


# -- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_xenstored_signal(tmp_path: Path, sig: int, status: int) -> None:
    root, env_file = tmp_path / "root", tmp_path / "root" / "env"
    proc = subprocess.Popen(
        [*AIOXEN, "xenstored", "--root", str(root), "--env-file", str(env_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    _wait_file(env_file, proc)
    rc, err = _end(proc, sig)
    assert (rc, err) == (status, "")
    assert not env_file.exists(), "the env file outlived the daemon"
    assert not (root / "xenstored" / "socket").exists()


def test_xenstored_started_with_sighup_ignored_keeps_ignoring_it(tmp_path: Path) -> None:
    """``nohup aioxen xenstored ...``: the hang-up does not stop it.  SIGHUP is sent
    first and SIGTERM after it; were SIGHUP handled, it would be the stop (129), since
    the lower-numbered of two pending signals is delivered first."""
    root, env_file = tmp_path / "root", tmp_path / "root" / "env"
    proc = subprocess.Popen(
        [*AIOXEN, "xenstored", "--root", str(root), "--env-file", str(env_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )  # fmt: skip
    _wait_file(env_file, proc)
    proc.send_signal(signal.SIGHUP)
    rc, err = _end(proc, signal.SIGTERM)
    assert (rc, err) == (143, "")
    assert not env_file.exists()


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_bridge_signal(sig: int, status: int) -> None:
    proc = subprocess.Popen(
        [*AIOXEN, "bridge", "--listen", "127.0.0.1:0", "--connect", "tcp:127.0.0.1:9"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"aioxen bridge: listening on tcp:127.0.0.1:")
    rc, err = _end(proc, sig)
    assert (rc, err) == (status, "")


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_cat_listener_signal(xs: Xenstored, sig: int, status: int) -> None:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [*AIOXEN, "cat", "-l", "2", f"sig{sig}", "--env-fd", str(w)], pass_fds=(w,),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=xs.env(0),
    )  # fmt: skip
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        assert ready.read() == b""  # EOF: the command is up (signals handled from here)
    rc, err = _end(proc, sig)
    assert rc == status, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_xenstore_watch_signal(xs: Xenstored, sig: int, status: int) -> None:
    proc = subprocess.Popen(
        [*AIOXEN, "xenstore", "watch", "/local"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=xs.env(0),
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"/local\n"  # the watch's first event: it is set
    rc, err = _end(proc, sig)
    assert rc == status, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("sig", "status"), SIGNALS)
def test_console_signal(xs: Xenstored, sig: int, status: int) -> None:
    guest = 700 + sig
    proc = subprocess.Popen(
        [*AIOXEN, "console", str(guest), "--create"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=xs.env(0),
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith(b"aioxen console: waiting for domain"), line
    rc, err = _end(proc, sig)
    assert rc == status, err
    assert "Traceback" not in err


# -- readiness -------------------------------------------------------------------------


def test_env_file_is_atomic_private_and_sourceable(tmp_path: Path) -> None:
    root, env_file = tmp_path / "root", tmp_path / "root" / "env"
    proc = subprocess.Popen(
        [*AIOXEN, "xenstored", "--root", str(root), "--env-file", str(env_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        _wait_file(env_file, proc)
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        text = env_file.read_text()
        assert text == (
            f"XEN_ROOT={root}; export XEN_ROOT;\n"
            f"XENSTORED_PATH={root}/xenstored/socket; export XENSTORED_PATH;\n"
        )
        assert [p.name for p in root.iterdir() if p.name.startswith(".env-")] == []
        sh = subprocess.run(
            ["sh", "-c", f'. "{env_file}" && {" ".join(AIOXEN)} xenstore write /t/x 42 && '
             f'{" ".join(AIOXEN)} xenstore read /t/x'],
            capture_output=True, timeout=T, env=_env(),
        )  # fmt: skip
        assert (sh.returncode, sh.stdout, sh.stderr) == (0, b"42\n", b"")
    finally:
        rc, err = _end(proc, signal.SIGTERM)
    assert (rc, err) == (143, "")


def test_the_shell_pattern_returns(tmp_path: Path) -> None:
    """What docs/apps.md shows: start in the background, wait for the file, source it."""
    script = f"""
set -e
R="{tmp_path}/root"
{" ".join(AIOXEN)} xenstored --root "$R" --env-file "$R/env" >/dev/null &
pid=$!
while [ ! -e "$R/env" ]; do sleep 0.1; done
. "$R/env"
{" ".join(AIOXEN)} xenstore write /hello world
{" ".join(AIOXEN)} xenstore read /hello
kill $pid
wait $pid || echo "status $?"
"""
    p = subprocess.run(["sh", "-c", script], capture_output=True, timeout=T, env=_env())
    assert (p.returncode, p.stdout, p.stderr) == (0, b"world\nstatus 143\n", b"")


def test_ready_fd(tmp_path: Path) -> None:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [*AIOXEN, "xenstored", "--root", str(tmp_path / "root"), "--ready-fd", str(w)],
        pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            text = ready.read()  # up to EOF: the daemon closed it once ready
        assert text.startswith(f"XEN_ROOT={tmp_path / 'root'}; export XEN_ROOT;\n".encode())
        assert (tmp_path / "root" / "xenstored" / "socket").exists()
    finally:
        rc, err = _end(proc, signal.SIGTERM)
    assert (rc, err) == (143, "")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_socket(tmp_path: Path, abstract: bool) -> None:
    """systemd's protocol: READY=1 (with STATUS) once serving, STOPPING=1 at SIGTERM."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"aioxen-test-{os.getpid()}-{id(tmp_path)}"
            sock.bind("\0" + name)
            where = "@" + name
        else:
            where = str(tmp_path / "notify")
            sock.bind(where)
        sock.settimeout(T)
        root = tmp_path / "root"
        proc = subprocess.Popen(
            [*AIOXEN, "xenstored", "--root", str(root)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=_env(NOTIFY_SOCKET=where),
        )  # fmt: skip
        try:
            msg = sock.recv(4096).decode()
            assert msg.splitlines()[0] == "READY=1", msg
            assert f"STATUS=serving {root}/xenstored/socket" in msg
            assert (root / "xenstored" / "socket").exists()  # ready means serving
        finally:
            rc, err = _end(proc, signal.SIGTERM)
        assert (rc, err) == (143, "")
        assert sock.recv(4096) == b"STOPPING=1"


def test_bridge_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "bridge.env"
    proc = subprocess.Popen(
        [*AIOXEN, "bridge", "--listen", "tcp:127.0.0.1:0", "--connect", "tcp:127.0.0.1:9",
         "--env-file", str(env_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        address = line.rsplit(" ", 1)[1].strip()
        _wait_file(env_file, proc)
        assert (
            env_file.read_text()
            == f"AIOXEN_BRIDGE_ADDRESS={address}; export AIOXEN_BRIDGE_ADDRESS;\n"
        )
    finally:
        rc, err = _end(proc, signal.SIGTERM)
    assert (rc, err) == (143, "")
    assert not env_file.exists()


# -- a xenstored that stops answering --------------------------------------------------


def test_cat_when_xenstored_stops_answering(tmp_path: Path) -> None:
    server = Xenstored(tmp_path / "root")
    try:
        server.proc.send_signal(signal.SIGSTOP)
        p = subprocess.run(
            [*AIOXEN, "cat", "0", "frozen", "--timeout", "2"],
            capture_output=True, timeout=T, env=server.env(2), stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        server.proc.send_signal(signal.SIGCONT)
        assert server.stop() == 0
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.startswith("aioxen cat: ") and len(err.splitlines()) == 1, err
    assert "within 2.0 s" in err  # what was awaited, and how long
    assert "never retrieved" not in err and "Traceback" not in err


@pytest.mark.parametrize("side", ["frontend", "backend"])
def test_console_timeout_says_what_was_awaited(xs: Xenstored, side: str) -> None:
    if side == "frontend":
        argv, env = ["console", "--frontend", "0", "--devid", "7", "--timeout", "1"], xs.env(31)
        says = "waited 1 s for the back end of console/7 in domain 0"
    else:
        argv, env = ["console", "32", "--create", "--devid", "7", "--timeout", "1"], xs.env(0)
        says = "waited 1 s for domain 32 to connect console/7"
    p = subprocess.run(
        [*AIOXEN, *argv], capture_output=True, timeout=T, env=env, stdin=subprocess.DEVNULL
    )
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.splitlines()[-1].startswith(f"aioxen console: {says}"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["xenstored", "bridge"])
def test_unwritable_env_file_stops_the_daemon(tmp_path: Path, command: str) -> None:
    env_file = tmp_path / "no-such-dir" / "env"
    if command == "xenstored":
        argv = ["xenstored", "--root", str(tmp_path / "root")]
    else:
        argv = ["bridge", "--listen", "127.0.0.1:0", "--connect", "tcp:127.0.0.1:9"]
    p = subprocess.run(
        [*AIOXEN, *argv, "--env-file", str(env_file)],
        capture_output=True, timeout=T, env=_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err == f"aioxen {command}: --env-file {env_file}: No such file or directory\n"
    assert not (tmp_path / "root" / "xenstored" / "socket").exists()
