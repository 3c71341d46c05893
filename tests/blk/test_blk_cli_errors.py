"""``aioxen blkback`` / ``aioxen blkfront`` against the command-line standard (issue 16),
with the real ``aioxen`` entry point in real processes.

A table of bad command lines: each gives its exit status (2: usage, 1: refused), one
``aioxen CMD: ...`` message first on stderr, no traceback, and creates nothing (the
``$XEN_ROOT`` the command would use stays absent: no XenStore I/O happened).  Then the
behaviour that needs a live ``xenstored``: a device that never appears is reported with
what was awaited; ``--listen tcp:HOST:0`` is accepted; a port in use is one line, rc 1;
SIGINT exits 130 and SIGTERM 143 after the orderly close; a blkback with no frontend stops
promptly; an image the user may not write is a usage error that suggests ``--readonly``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli_run import AIOXEN, run, standard_error
from support.unix_user import other_user, require_user_creation
from support.xenstored import XenstoredProcess

pytestmark = pytest.mark.crossprocess
FRONT = 7


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "img"
    d.mkdir()
    sizes = {"ok": 1 << 20, "empty": 0, "odd": 1000, "odd4k": 5000}
    out = {}
    for name, size in sizes.items():
        (d / f"{name}.img").write_bytes(b"\xa5" * size)
        out[name] = str(d / f"{name}.img")
    out["dir"] = str(d)
    out["missing"] = str(d / "missing.img")
    return out


def offline_env(tmp_path: Path) -> dict[str, str]:
    """A world that does not exist: any XenStore or platform I/O would fail or create it."""
    root = tmp_path / "world"
    return {
        **os.environ,
        "XEN_ROOT": str(root),
        "XENSTORED_PATH": str(root / "xenstored" / "socket"),
        "AIOXEN_PLATFORM": "unix",
        "AIOXEN_DOMID": "0",
    }


BACK = ["blkback", "--frontend", "5", "--image"]
NBD = ["blkfront", "nbd"]

# (argv with {ok}/{empty}/... image placeholders, rc, program, words of the message)
BAD_INPUT: list[tuple[list[str], int, str, tuple[str, ...]]] = [
    ([*BACK, "{missing}"], 2, "aioxen blkback", ("--image", "missing.img", "no such file")),
    ([*BACK, "{dir}"], 2, "aioxen blkback", ("--image", "is a directory")),
    ([*BACK, "{ok}", "--devid", "foo"], 2, "aioxen blkback", ("--devid", "'foo'")),
    (
        ["blkback", "--image", "{ok}", "--frontend", "70000"],
        2,
        "aioxen blkback",
        ("--frontend", "70000"),
    ),
    (["blkback", "--image", "{ok}", "--frontend", "-1"], 2, "aioxen blkback", ("--frontend",)),
    (["blkback", "--image", "{ok}", "--frontend", "x"], 2, "aioxen blkback", ("--frontend",)),
    ([*BACK, "{ok}", "--max-queues", "0"], 2, "aioxen blkback", ("--max-queues",)),
    (
        [*BACK, "{ok}", "--max-ring-page-order", "9"],
        2,
        "aioxen blkback",
        ("--max-ring-page-order",),
    ),
    ([*BACK, "{ok}", "--workers", "0"], 2, "aioxen blkback", ("--workers",)),
    ([*BACK, "{ok}", "--queue-depth", "-3"], 2, "aioxen blkback", ("--queue-depth",)),
    (
        [*BACK, "{ok}", "--max-indirect-segments", "5000"],
        2,
        "aioxen blkback",
        ("--max-indirect-segments",),
    ),
    ([*BACK, "{empty}"], 1, "aioxen blkback", ("empty.img", "empty (0 bytes)")),
    ([*BACK, "{odd}"], 1, "aioxen blkback", ("1000 bytes", "last 488 bytes", "1024")),
    (
        [*BACK, "{odd4k}", "--sector-size", "4096"],
        1,
        "aioxen blkback",
        ("5000 bytes", "4096-byte", "last 904 bytes"),
    ),
    ([*NBD, "--listen", "garbage", "xvda"], 2, "aioxen blkfront nbd", ("--listen", "garbage")),
    ([*NBD, "--max-connections", "0", "xvda"], 2, "aioxen blkfront nbd", ("--max-connections",)),
    (
        [*NBD, "--listen", "127.0.0.1:99999", "xvda"],
        2,
        "aioxen blkfront nbd",
        ("--listen", "99999", "0..65535"),
    ),
    (
        [*NBD, "--listen", "tcp:127.0.0.1:65536", "xvda"],
        2,
        "aioxen blkfront nbd",
        ("--listen", "65536"),
    ),
    ([*NBD, "--listen", "127.0.0.1:http", "xvda"], 2, "aioxen blkfront nbd", ("--listen",)),
    (
        [*NBD, "--listen", "vchan:0/nbd", "xvda"],
        2,
        "aioxen blkfront nbd",
        ("--listen", "tcp:HOST:PORT or unix:PATH"),
    ),
    ([*NBD, "--listen", "unix:", "xvda"], 2, "aioxen blkfront nbd", ("--listen",)),
    ([*NBD, "xvd1"], 2, "aioxen blkfront nbd", ("DEVICE", "'xvd1'")),
    ([*NBD, "--timeout", "0", "xvda"], 2, "aioxen blkfront nbd", ("--timeout",)),
    ([*NBD, "--timeout", "-5", "xvda"], 2, "aioxen blkfront nbd", ("--timeout",)),
    ([*NBD, "--backend", "70000", "xvda"], 2, "aioxen blkfront nbd", ("--backend", "70000")),
    ([*NBD, "--queues", "0", "xvda"], 2, "aioxen blkfront nbd", ("--queues",)),
    ([*NBD, "--pool-pages", "0", "xvda"], 2, "aioxen blkfront nbd", ("--pool-pages",)),
    (["blkfront", "info", "foo"], 2, "aioxen blkfront info", ("DEVICE", "'foo'")),
]


@pytest.mark.parametrize(
    ("argv", "rc", "prog", "words"), BAD_INPUT, ids=[" ".join(r[0]) for r in BAD_INPUT]
)
def test_bad_input(
    tmp_path: Path,
    images: dict[str, str],
    argv: list[str],
    rc: int,
    prog: str,
    words: tuple[str, ...],
) -> None:
    env = offline_env(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run(env, *(a.format(**images) for a in argv))
    standard_error(proc, rc, prog, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert not (tmp_path / "world").exists()
    assert sorted(os.listdir(images["dir"])) == sorted(
        f"{n}.img" for n in ("ok", "empty", "odd", "odd4k")
    )


def test_help_is_complete_and_plain() -> None:
    """Every option has help text; no reST markup leaks into it."""
    for cmd in (["blkback"], ["blkfront"], ["blkfront", "nbd"], ["blkfront", "info"]):
        proc = subprocess.run([*AIOXEN, *cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "``" not in proc.stdout and ":mod:" not in proc.stdout, proc.stdout
    from aioxen.cli import build_parser, walk_parsers

    for parser in walk_parsers(build_parser()):
        if not parser.prog.startswith(("aioxen blkback", "aioxen blkfront")):
            continue
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"


def test_unwritable_image_suggests_readonly() -> None:
    """A user who may read but not write the image: usage error naming --readonly; with
    --readonly the same command gets past the image checks."""
    require_user_creation()
    with tempfile.TemporaryDirectory(prefix="aioxen-blkro-") as tmp, other_user() as user:
        top = Path(tmp)
        os.chmod(top, 0o755)  # (pytest's own tmp_path is private to root)
        image = top / "ro.img"
        image.write_bytes(bytes(1 << 16))
        os.chmod(image, 0o644)
        env = offline_env(top)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        argv = [user.python_exe, "-m", "aioxen", *BACK, str(image)]
        proc = user.run(argv, check=False, env=env)
        standard_error(proc, 2, "aioxen blkback", "--image", "not writable", "--readonly")
        proc = user.run([*argv, "--readonly"], check=False, env=env, timeout=60)
        assert proc.returncode == 1, proc.stderr  # past the checks: no world to serve in
        assert "--image" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert sorted(os.listdir(top)) == ["ro.img"]  # nothing created


# -- with a live xenstored ----------------------------------------------------------


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[XenstoredProcess]:
    xs = XenstoredProcess(tmp_path / "root")
    yield xs
    assert xs.alive(), "xenstored died"
    xs.stop()


class Daemon:
    """A long-running ``aioxen`` command, started and read up to its READY line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [*AIOXEN, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline()
        if not self.ready.startswith("READY"):
            _, err = self.proc.communicate(timeout=60)
            raise AssertionError(f"{args}: {self.ready!r} rc {self.proc.returncode}: {err}")

    def stop(self, sig: int) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=60)


def test_missing_device_says_what_was_awaited(xenstored: XenstoredProcess) -> None:
    start = time.monotonic()
    proc = run(xenstored.env(FRONT), *NBD, "--timeout", "1", "--listen", "tcp:127.0.0.1:0", "xvdq")
    standard_error(
        proc,
        1,
        "aioxen blkfront nbd",
        "vbd xvdq",
        f"domain {FRONT}",
        "after 1 s",
        f"/local/domain/{FRONT}/device/vbd/",
        "/backend",
    )
    assert time.monotonic() - start < 50  # the 1 s asked for, not the 30 s default


def test_serve_tcp_address_signals_and_port_in_use(
    xenstored: XenstoredProcess, images: dict[str, str]
) -> None:
    back = Daemon(xenstored.env(0), "blkback", "--image", images["ok"], "--frontend", str(FRONT))
    front = None
    try:
        assert "(1048576 bytes)" in back.ready
        front = Daemon(xenstored.env(FRONT), *NBD, "--listen", "tcp:127.0.0.1:0", "xvda")
        where = front.ready.split("listening on ", 1)[1].split()[0]
        host, port = where.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, front.ready
        # a port in use: one line, rc 1 -- and at once, before waiting for any device
        # (xvdq does not exist: waiting for it first would end in a timeout instead)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            for listen in (f"127.0.0.1:{taken}", f"tcp:127.0.0.1:{taken}"):
                proc = run(xenstored.env(FRONT), *NBD, "--listen", listen, "xvdq")
                standard_error(proc, 1, "aioxen blkfront nbd", listen, "in use")
                assert len(proc.stderr.splitlines()) == 1, proc.stderr
        rc, err = front.stop(signal.SIGINT)
        assert (rc, err) == (130, ""), err
        front = None
        rc, err = back.stop(signal.SIGINT)
        assert (rc, err) == (130, ""), err
    finally:
        if front is not None:
            front.kill()
        back.kill()


def test_blkback_without_frontend_stops_promptly(
    xenstored: XenstoredProcess, images: dict[str, str]
) -> None:
    """No frontend ever came: nothing to wait for (it waited its 5 s close timeout)."""
    back = Daemon(xenstored.env(0), "blkback", "--image", images["ok"], "--frontend", "9")
    state = "/local/domain/0/backend/vbd/9/51712/state"
    try:
        deadline = time.monotonic() + 60  # hang guard
        while run(xenstored.env(0), "xenstore", "read", state).stdout.strip() != "2":
            assert time.monotonic() < deadline, "blkback never reached InitWait"
            time.sleep(0.1)
        start = time.monotonic()  # serving, in InitWait: the state the 5 s wait came from
        rc, err = back.stop(signal.SIGTERM)
        elapsed = time.monotonic() - start
    finally:
        back.kill()
    assert (rc, err) == (143, ""), err
    assert elapsed < 4, f"blkback took {elapsed:.1f} s to stop"  # the old wait was 5 s
    proc = run(xenstored.env(0), "xenstore", "read", "/local/domain/0/backend/vbd/9/51712")
    assert proc.returncode != 0  # removed what it created


def test_backend_that_never_connects_is_named(xenstored: XenstoredProcess) -> None:
    """The device exists (a toolstack made it) but no blkback serves it: the message names
    the backend directory and both ends' states."""
    add = run(xenstored.env(0), "device", "add", "vbd", str(FRONT), "--devid", "51728")
    assert add.returncode == 0, add.stderr
    proc = run(xenstored.env(FRONT), *NBD, "--timeout", "1", "--listen", "127.0.0.1:0", "xvdb")
    standard_error(
        proc, 1, "aioxen blkfront nbd", "vbd xvdb (51728)", f"domain {FRONT}",
        f"backend /local/domain/0/backend/vbd/{FRONT}/51728", "did not connect within 1 s",
        "frontend state", "backend state",
    )  # fmt: skip


def test_readiness_for_supervisors(
    xenstored: XenstoredProcess, images: dict[str, str], tmp_path: Path
) -> None:
    """``--ready-fd N`` gets a line and is closed once blkback serves; systemd's
    ``$NOTIFY_SOCKET`` gets ``READY=1`` (with the READY line as status), then
    ``STOPPING=1`` on the way out."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)  # hang guard
    rfd, wfd = os.pipe()
    env = {**xenstored.env(0), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    try:
        proc = subprocess.Popen(
            [*AIOXEN, "blkback", "--image", images["ok"], "--frontend", "9",
             "--ready-fd", str(wfd)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, pass_fds=(wfd,),
        )  # fmt: skip
        os.close(wfd)
        try:
            with os.fdopen(rfd, "rb") as ready:
                assert ready.read() == b"\n"  # written, then closed: EOF
            msg = notify.recv(4096).decode()
            assert msg.startswith("READY=1\nSTATUS=READY blkback domain 0 serving"), msg
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            _, err = proc.communicate(timeout=60)
            assert (proc.returncode, err) == (143, ""), err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        notify.close()
