"""Every command works with any stdio (issue 13, finding 5).

``aioxen cat -l 2 p <&-`` and ``>&-`` used to abort with a libuv assertion (rc 134; the
peer then waited 30 s), and ``aioxen console 5 --timeout 1 </dev/null`` aborted too.  Here
the real commands run as subprocesses, on both event loops (``$AIOXEN_LOOP``), with stdin
and stdout each closed, ``/dev/null``, a regular file, a pipe or a terminal: no signal, no
traceback, the data goes where it should and the peer never hangs.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from apps_harness import AIOXEN
from support.xenstored import XenstoredProcess

pytestmark = [pytest.mark.crossprocess, pytest.mark.timeout(120)]

LOOPS = ["asyncio", "uvloop"]
T = 40  # hang guard, seconds


class Stdio:
    """stdin and stdout of one child process, each ``closed``, ``devnull``, ``file``,
    ``pipe`` or ``tty``; ``data`` is what its stdin carries (where it can carry any)."""

    def __init__(self, tmp: Path, name: str, stdin: str, stdout: str, data: bytes) -> None:
        self.kinds = (stdin, stdout)
        self.data = data if stdin in ("file", "pipe", "tty") else b""
        self.out_path = tmp / f"{name}.out"
        self._opened: list[int] = []
        self._master: int | None = None
        self._got = bytearray()
        self._threads: list[threading.Thread] = []
        self.kw: dict[str, object] = {}
        if "tty" in self.kinds:
            master, slave = pty.openpty()
            self._master = master
            self._opened.append(slave)
        if stdin == "file":
            (tmp / f"{name}.in").write_bytes(data)
            fd = os.open(tmp / f"{name}.in", os.O_RDONLY)
            self._opened.append(fd)
            self.kw["stdin"] = fd
        else:
            self.kw["stdin"] = self._spec(stdin)
        if stdout == "file":
            fd = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._opened.append(fd)
            self.kw["stdout"] = fd
        else:
            self.kw["stdout"] = self._spec(stdout)
        closed = [fd for fd, kind in enumerate(self.kinds) if kind == "closed"]
        if closed:
            self.kw["preexec_fn"] = lambda: [os.close(fd) for fd in closed]

    def _spec(self, kind: str) -> object:
        if kind == "pipe":
            return subprocess.PIPE
        if kind == "tty":
            return self._opened[0]
        return subprocess.DEVNULL  # closed: /dev/null, then closed in the child

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, **self.kw)  # type: ignore[call-overload]
        for fd in self._opened:
            os.close(fd)
        stdin, stdout = self.kinds
        if stdin == "pipe":
            assert proc.stdin is not None
            self._spawn(lambda: _feed(proc.stdin, self.data))  # type: ignore[arg-type]
        if stdout == "pipe":
            assert proc.stdout is not None
            self._spawn(lambda: self._collect(proc.stdout.read1))  # type: ignore[union-attr]
        if self._master is not None:
            if stdin == "tty":
                os.write(self._master, self.data + b"\x04")  # a line, then EOF (^D)
            if stdout == "tty":
                master = self._master
                self._spawn(lambda: self._collect(lambda n: os.read(master, n)))
        return proc

    def _spawn(self, fn: Callable[[], object]) -> None:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        self._threads.append(t)

    def _collect(self, read: Callable[[int], bytes]) -> None:
        while True:
            try:
                chunk = read(65536)
            except OSError:  # a terminal's EIO: every slave descriptor is closed
                return
            if not chunk:
                return
            self._got += chunk

    def current(self) -> bytes | None:
        """What arrived on stdout so far (``None`` where it cannot be seen)."""
        kind = self.kinds[1]
        if kind == "file":
            return self.out_path.read_bytes()
        if kind == "tty":
            return bytes(self._got).replace(b"\r\n", b"\n")
        if kind == "pipe":
            return bytes(self._got)
        return None

    def output(self) -> bytes | None:
        """What the process wrote to stdout, or ``None`` where it cannot be seen."""
        for t in self._threads:
            t.join(T)
        return self.current()

    def close(self) -> None:
        if self._master is not None:
            os.close(self._master)
            self._master = None


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
        pipe.close()  # type: ignore[attr-defined]
    except BrokenPipeError:
        pass


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        rc = proc.wait(T)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} hung") from None
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    return rc, err


@pytest.fixture
def stdio(tmp_path: Path) -> Iterator[Callable[..., Stdio]]:
    made: list[Stdio] = []

    def make(name: str, stdin: str, stdout: str, data: bytes = b"") -> Stdio:
        s = Stdio(tmp_path, name, stdin, stdout, data)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


_ports = iter(range(10**6))


def env_for(xenstored: XenstoredProcess, domid: int, loop: str) -> dict[str, str]:
    return {**xenstored.env(domid), "AIOXEN_LOOP": loop}


# -- aioxen cat: listener and connector with the same kind of stdio -------------------------

CAT_CASES = [
    ("closed", "closed"),
    ("closed", "pipe"),
    ("pipe", "closed"),
    ("devnull", "devnull"),
    ("file", "file"),
    ("pipe", "pipe"),
    ("tty", "tty"),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("stdin", "stdout"), CAT_CASES)
def test_cat_any_stdio(
    xenstored: XenstoredProcess,
    stdio: Callable[..., Stdio],
    loop: str,
    stdin: str,
    stdout: str,
) -> None:
    port = f"stdio{next(_ports)}"
    big = stdin != "tty"  # a terminal carries a line
    data_l = os.urandom(200_000) if big else b"typed at the listener\n"
    data_c = os.urandom(150_000) if big else b"typed at the connector\n"
    ls = stdio("listener", stdin, stdout, data_l)
    cs = stdio("connector", stdin, stdout, data_c)
    listener = ls.start([*AIOXEN, "cat", "-l", "2", port], env_for(xenstored, 0, loop))
    connector = cs.start([*AIOXEN, "cat", "0", port], env_for(xenstored, 2, loop))
    rc_c, err_c = finish(connector)
    rc_l, err_l = finish(listener)
    assert (rc_l, err_l) == (0, ""), ("listener", stdin, stdout)
    assert (rc_c, err_c) == (0, ""), ("connector", stdin, stdout)
    got_l, got_c = ls.output(), cs.output()
    for got, expected in ((got_l, cs.data), (got_c, ls.data)):
        if got is None:
            continue
        if stdout == "tty":  # the terminal also echoes what was typed at it
            assert expected in got, got
        else:
            assert got == expected, (len(got), len(expected))


# -- aioxen console --------------------------------------------------------------------------

_guests = iter(range(700, 800))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stdin", ["closed", "devnull"])
def test_console_without_a_device_fails_cleanly(
    xenstored: XenstoredProcess, stdio: Callable[..., Stdio], loop: str, stdin: str
) -> None:
    """The finding as reported: ``aioxen console 5 --timeout 1 </dev/null``."""
    s = stdio("console", stdin, "pipe")
    proc = s.start([*AIOXEN, "console", "5", "--timeout", "1"], env_for(xenstored, 0, loop))
    rc, err = finish(proc)
    assert rc == 1, err
    assert err.startswith("aioxen console: no console device 1 for domain 5"), err
    assert "Traceback" not in err
    assert s.output() == b""


CONSOLE_CASES = [("closed", "closed"), ("devnull", "devnull"), ("file", "file"), ("pipe", "pipe")]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("stdin", "stdout"), CONSOLE_CASES)
def test_console_back_end_any_stdio(
    xenstored: XenstoredProcess,
    stdio: Callable[..., Stdio],
    loop: str,
    stdin: str,
    stdout: str,
) -> None:
    """The back end runs with odd stdio, a guest with pipes: what the back end's stdin
    carries reaches the guest, what the guest types reaches the back end's stdout; the guest
    stops cleanly on SIGTERM, and the back end then ends by itself."""
    guest = next(_guests)
    add = subprocess.run(
        [*AIOXEN, "device", "add", "console", str(guest), "--devid", "1"],
        env=env_for(xenstored, 0, loop),
        capture_output=True,
        timeout=T,
    )
    assert add.returncode == 0, add.stderr
    to_guest = b"hello guest\n" if stdin in ("file", "pipe") else b""
    bs = stdio("back", stdin, stdout, to_guest)
    back = bs.start([*AIOXEN, "console", str(guest)], env_for(xenstored, 0, loop))
    front = subprocess.Popen(
        [*AIOXEN, "console", "--frontend", "0", "--timeout", str(T)],
        env=env_for(xenstored, guest, loop),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert front.stdin is not None and front.stdout is not None
        assert front.stderr is not None
        seen = b""
        while b"connected" not in seen:  # both ends are up (the back end went Connected)
            line = front.stderr.readline()
            assert line, f"the guest exited early: {seen!r}"
            seen += line
        if to_guest:
            assert front.stdout.readline() == to_guest
        front.stdin.write(b"hello host\n")
        front.stdin.flush()
        if stdout in ("file", "pipe"):
            _wait_for(lambda: bs.current() == b"hello host\n")
        front.send_signal(signal.SIGTERM)
        rc_f, err_f = finish(front)
        rc_b, err_b = finish(back)  # the console ended (no --follow): it exits by itself
    finally:
        for p in (front, back):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc_f == 143, err_f  # SIGTERM after a clean stop
    assert rc_b == 0, err_b
    assert "Traceback" not in err_b + err_f
    got = bs.output()
    if got is not None:
        assert got == b"hello host\n"


def _wait_for(cond: Callable[[], bool]) -> None:
    import time

    deadline = time.monotonic() + T
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- aioxen xenstore read / watch ----------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("stdin", "stdout"), [("closed", "closed"), ("closed", "file"), ("devnull", "pipe")]
)
def test_xenstore_read_and_watch_any_stdio(
    xenstored: XenstoredProcess,
    stdio: Callable[..., Stdio],
    loop: str,
    stdin: str,
    stdout: str,
) -> None:
    path = f"/local/domain/0/stdio{next(_ports)}"
    env = env_for(xenstored, 0, loop)
    write = subprocess.run(
        [*AIOXEN, "xenstore", "write", path, "value"], env=env, capture_output=True, timeout=T
    )
    assert write.returncode == 0, write.stderr
    for name, args, expected in (
        ("read", ["read", path], b"value\n"),
        ("watch", ["watch", path, "-n", "1"], path.encode() + b"\n"),
    ):
        s = stdio(name, stdin, stdout)
        rc, err = finish(s.start([*AIOXEN, "xenstore", *args], env))
        assert (rc, err) == (0, ""), name
        got = s.output()
        if got is not None:
            assert got == expected, name


@pytest.mark.parametrize("loop", LOOPS)
def test_console_back_end_on_a_terminal(xenstored: XenstoredProcess, loop: str) -> None:
    """On a terminal the back end goes raw: what is typed reaches the guest, the guest's
    output reaches the terminal, ``Ctrl-]`` detaches (rc 0), and the terminal's mode is
    restored."""
    guest = next(_guests)
    env = env_for(xenstored, 0, loop)
    add = subprocess.run(
        [*AIOXEN, "device", "add", "console", str(guest), "--devid", "1"],
        env=env,
        capture_output=True,
        timeout=T,
    )
    assert add.returncode == 0, add.stderr
    master, slave = pty.openpty()
    cooked = termios.tcgetattr(slave)
    back = subprocess.Popen(
        [*AIOXEN, "console", str(guest)], env=env, stdin=slave, stdout=slave, stderr=subprocess.PIPE
    )
    front = subprocess.Popen(
        [*AIOXEN, "console", "--frontend", "0", "--timeout", str(T)],
        env=env_for(xenstored, guest, loop),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert back.stderr is not None and front.stdout is not None and front.stdin is not None
        seen = b""
        while b"connected" not in seen:  # raw mode is set before the back end says this
            line = back.stderr.readline()
            assert line, f"the back end exited early: {seen!r}"
            seen += line
        front.stdin.write(b"from the guest\n")
        front.stdin.flush()
        out = b""
        while b"from the guest" not in out:
            chunk = os.read(master, 4096)
            assert chunk
            out += chunk
        os.write(master, b"typed\n")  # raw: passed on as typed, no line editing
        assert front.stdout.readline() == b"typed\n"
        os.write(master, b"\x1d")  # Ctrl-]: detach
        rc_b, err_b = finish(back)
        assert rc_b == 0, err_b
        assert "Traceback" not in err_b
        assert termios.tcgetattr(slave) == cooked, "the terminal was left raw"
        front.send_signal(signal.SIGTERM)
        rc_f, err_f = finish(front)
        assert rc_f in (0, 143), err_f  # ended by itself (back end gone) or by SIGTERM
    finally:
        for p in (front, back):
            if p.poll() is None:
                p.kill()
                p.wait()
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("loop", LOOPS)
def test_cat_on_a_terminal_typed_after_output(xenstored: XenstoredProcess, loop: str) -> None:
    """Interactive ``cat`` on a terminal (one open file for stdin and stdout): a line typed
    after output has appeared reaches the peer (uvloop's write-pipe transport used to read
    the terminal and swallow it)."""
    port = f"stdio{next(_ports)}"
    master, slave = pty.openpty()
    listener = subprocess.Popen(
        [*AIOXEN, "cat", "-l", "2", port],
        env=env_for(xenstored, 0, loop),
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    connector = subprocess.Popen(
        [*AIOXEN, "cat", "0", port],
        env=env_for(xenstored, 2, loop),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    try:
        assert connector.stdin is not None and connector.stdout is not None
        connector.stdin.write(b"from the connector\n")
        connector.stdin.flush()
        out = b""
        while b"from the connector" not in out:  # the listener's output side is running
            chunk = os.read(master, 4096)
            assert chunk
            out += chunk
        os.write(master, b"typed later\n")
        assert connector.stdout.readline() == b"typed later\n"
        os.write(master, b"\x04")  # ^D: the listener's input ends
        connector.stdin.close()
        rc_c, err_c = finish(connector)
        rc_l, err_l = finish(listener)
        assert (rc_l, err_l) == (0, "")
        assert (rc_c, err_c) == (0, "")
    finally:
        for p in (listener, connector):
            if p.poll() is None:
                p.kill()
                p.wait()
        os.close(master)
