"""``aioxen cat`` as a Unix tool: real shells, real pipes, files, sockets and terminals.

Every test runs the real command in subprocesses; data is checksummed both ways and is
large enough to wrap the rings many times.
"""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from apps_harness import (
    AIOXEN,
    AIOXEN_SHELL,
    clean_env,
    parse_exports,
    random_file,
    run,
    sha256_file,
)
from support.xenstored import XenstoredProcess

pytestmark = pytest.mark.crossprocess

MiB = 1024 * 1024


def bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return run(["bash", "-c", script], env={**env, "AIOXEN": AIOXEN_SHELL}, cwd=cwd)


def test_shell_pipeline_embedded_world(tmp_path: Path) -> None:
    """The listener makes its own world; a second command joins it through ``eval``.
    4 KiB rings, megabytes each way: hundreds of wraps in both directions."""
    sum1 = random_file(tmp_path / "in1", 4 * MiB + 123, seed=1)
    sum2 = random_file(tmp_path / "in2", 3 * MiB + 77, seed=2)
    script = r"""
        mkfifo env.fifo
        $AIOXEN cat -l 2 foo --buffer-size 4096 --env-fd 3 3>env.fifo <in1 >out1 2>err1 &
        srv=$!
        eval "$(cat env.fifo)"
        echo "$XEN_ROOT" >root.txt
        [ "$AIOXEN_DOMID" = 2 ] && [ "$AIOXEN_PLATFORM" = unix ] || exit 90
        $AIOXEN cat 0 foo <in2 >out2 2>err2
        cli=$?
        wait $srv
        echo "client=$cli server=$?"
    """
    out = bash(script, tmp_path, clean_env())
    assert out.stdout.decode().split() == ["client=0", "server=0"], out
    assert sha256_file(tmp_path / "out2") == sum1
    assert sha256_file(tmp_path / "out1") == sum2
    assert (tmp_path / "err1").read_bytes() == b""
    assert (tmp_path / "err2").read_bytes() == b""
    root = (tmp_path / "root.txt").read_text().strip()
    assert root.startswith("/") and not os.path.exists(root), "the private world was not removed"


def test_eval_one_liner(tmp_path: Path) -> None:
    """``eval "$(aioxen cat -l ... --env-fd 3 3>&1 ... &)"`` returns as soon as the world is
    up (the listener closes fd 3), with the listener still running in the background."""
    sum1 = random_file(tmp_path / "in1", 2 * MiB, seed=3)
    sum2 = random_file(tmp_path / "in2", 2 * MiB + 1, seed=4)
    script = r"""
        eval "$($AIOXEN cat -l 2 bar --env-fd 3 3>&1 <in1 >out1 &)"
        $AIOXEN cat 0 bar <in2 >out2
        echo "client=$?"
        while [ -e "$XEN_ROOT" ]; do sleep 0.05; done  # the listener removes it last
    """
    out = bash(script, tmp_path, clean_env())
    assert out.stdout.decode().split() == ["client=0"], out
    assert sha256_file(tmp_path / "out2") == sum1
    assert sha256_file(tmp_path / "out1") == sum2


def test_two_processes_through_pipes_with_exports_on_stderr(tmp_path: Path) -> None:
    """Without ``--env-fd`` the export lines go to stderr (stdout carries data); stdin and
    stdout are pipes here (the event-loop pipe transports, with back-pressure)."""
    data1 = os.urandom(3 * MiB)
    data2 = os.urandom(4 * MiB + 5)
    listener = subprocess.Popen(
        [*AIOXEN, "cat", "-l", "2", "pipes"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        bufsize=0,
    )
    try:
        assert listener.stderr is not None
        lines = b"".join(listener.stderr.readline() for _ in range(4)).decode()
        exports = parse_exports(lines)
        assert set(exports) == {"XEN_ROOT", "XENSTORED_PATH", "AIOXEN_PLATFORM", "AIOXEN_DOMID"}
        assert exports["AIOXEN_DOMID"] == "2"
        client = subprocess.Popen(
            [*AIOXEN, "cat", "0", "pipes"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(**exports),
        )
        results: dict[str, tuple[bytes, bytes]] = {}

        def talk(name: str, proc: subprocess.Popen[bytes], data: bytes) -> None:
            results[name] = proc.communicate(data, timeout=60)

        threads = [
            threading.Thread(target=talk, args=("listener", listener, data1)),
            threading.Thread(target=talk, args=("client", client, data2)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert listener.returncode == 0 and client.returncode == 0, results
        assert results["client"][0] == data1
        assert results["listener"][0] == data2
        assert results["client"][1] == b"" and results["listener"][1] == b""
        assert not os.path.exists(exports["XEN_ROOT"])
    finally:
        for p in (listener,):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_socket_stdio_and_existing_world(tmp_path: Path, xenstored: XenstoredProcess) -> None:
    """stdin and stdout are one socket (as under inetd or socat): the end of the vchan
    is a ``shutdown(SHUT_WR)`` on it.  With ``$XEN_ROOT`` set no world is created."""
    sum1 = random_file(tmp_path / "in1", 2 * MiB + 9, seed=5)
    data2 = os.urandom(3 * MiB)
    listener = subprocess.Popen(
        [*AIOXEN, "cat", "-l", "2", "sock", "--buffer-size", "16384"],
        stdin=(tmp_path / "in1").open("rb"),
        stdout=(tmp_path / "out1").open("wb"),
        stderr=subprocess.PIPE,
        env=xenstored.env(0),
    )
    ours, theirs = socket.socketpair()
    client = subprocess.Popen(
        [*AIOXEN, "cat", "0", "sock"],
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
        env=xenstored.env(2),
    )
    theirs.close()
    try:
        received = bytearray()
        ours.settimeout(60)

        def send() -> None:
            ours.sendall(data2)
            ours.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := ours.recv(65536):
            received += chunk
        sender.join(60)
        assert client.wait(60) == 0
        assert listener.wait(60) == 0
        assert client.stderr is not None and client.stderr.read() == b""
        assert listener.stderr is not None and listener.stderr.read() == b""
        assert hashlib.sha256(received).hexdigest() == sum1
        assert (tmp_path / "out1").read_bytes() == data2
    finally:
        ours.close()
        for p in (listener, client):
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stderr, p.stdin, p.stdout):
                if f is not None:
                    f.close()


def test_half_close_through_sort(tmp_path: Path, xenstored: XenstoredProcess) -> None:
    """A service that answers only after the end of its input (``sort``): the client's
    stdin EOF must reach it as the vchan EOF, and its output must come back while the
    other direction is already closed."""
    script = r"""
        mkfifo back
        $AIOXEN cat -l 2 sortsvc <back | sort >back &
        svc=$!
        printf 'pear\napple\nfig\n' | AIOXEN_DOMID=2 $AIOXEN cat 0 sortsvc >sorted
        cli=$?
        wait $svc
        echo "client=$cli service=$?"
    """
    out = bash(script, tmp_path, xenstored.env(0))
    assert out.stdout.decode().split() == ["client=0", "service=0"], out
    assert (tmp_path / "sorted").read_text() == "apple\nfig\npear\n"


def _one_error_line(out: subprocess.CompletedProcess[bytes]) -> str:
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("aioxen cat: "), lines
    return lines[0]


def test_errors_are_one_line_with_status(xenstored: XenstoredProcess) -> None:
    cases = {
        "nosrv": ([*AIOXEN, "cat", "--timeout", "0.3", "0", "nosuch"], xenstored.env(2)),
        "lonely": ([*AIOXEN, "cat", "-l", "--timeout", "0.3", "2", "lonely"], xenstored.env(0)),
        "noplat": ([*AIOXEN, "cat", "0", "foo"], clean_env()),
        "inheap": ([*AIOXEN, "cat", "0", "foo"], clean_env(AIOXEN_PLATFORM="inheap")),
        "badport": ([*AIOXEN, "cat", "0", "no/slash"], clean_env()),
        "badfd": ([*AIOXEN, "cat", "-l", "2", "x", "--env-fd", "9"], clean_env()),
    }
    procs = {
        name: subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, (args, env) in cases.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)

    assert out["nosrv"].returncode == 1
    assert "no vchan server for domid 0 port 'nosuch'" in _one_error_line(out["nosrv"])
    assert out["lonely"].returncode == 1
    assert _one_error_line(out["lonely"]) == (
        "aioxen cat: no client from domain 2 port 'lonely' within 0.3 s"
    )
    assert out["noplat"].returncode == 1
    assert "no aioxen platform available" in _one_error_line(out["noplat"])
    assert out["inheap"].returncode == 1
    assert "inheap" in _one_error_line(out["inheap"])
    assert out["badport"].returncode == 2
    assert b"invalid vchan port" in out["badport"].stderr
    assert out["badfd"].returncode == 2  # checked before the event loop opens its own fds
    assert b"--env-fd: file descriptor 9: Bad file descriptor" in out["badfd"].stderr
    assert all(o.stdout == b"" for o in out.values())


def test_connection_reset_when_the_peer_goes_away(
    tmp_path: Path, xenstored: XenstoredProcess
) -> None:
    """The listener's reader (``head``) leaves; the listener stops quietly with 141 (as
    SIGPIPE would); the client, still sending, reports the reset and fails."""
    random_file(tmp_path / "big", 16 * MiB, seed=6)
    script = r"""
        mkfifo toHead
        $AIOXEN cat -l 2 rst </dev/null >toHead 2>srv.err &
        srv=$!
        head -c 1000 toHead >/dev/null &
        AIOXEN_DOMID=2 $AIOXEN cat 0 rst <big >/dev/null 2>cli.err
        cli=$?
        wait $srv
        echo "client=$cli server=$?"
    """
    out = bash(script, tmp_path, xenstored.env(0))
    assert out.stdout.decode().split() == ["client=1", "server=141"], out
    assert (tmp_path / "srv.err").read_bytes() == b""
    assert (tmp_path / "cli.err").read_text() == (
        "aioxen cat: connection reset: domain 0 port 'rst' closed before all input was sent\n"
    )


def test_sigterm_cleans_up_the_embedded_world() -> None:
    listener = subprocess.Popen(
        [*AIOXEN, "cat", "-l", "2", "waiting"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
        bufsize=0,
    )
    try:
        assert listener.stderr is not None
        exports = parse_exports(b"".join(listener.stderr.readline() for _ in range(4)).decode())
        root = exports["XEN_ROOT"]
        assert os.path.isdir(root)
        listener.send_signal(signal.SIGTERM)
        assert listener.wait(30) == 143
        assert listener.stderr.read() == b""
        assert not os.path.exists(root)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
        assert listener.stderr is not None
        listener.stderr.close()


def test_terminal_stdin_is_abandoned_when_the_peer_closes(
    tmp_path: Path, xenstored: XenstoredProcess
) -> None:
    """An interactive client: once the peer closed the whole vchan there is nobody to send
    to, so the client exits 0 without waiting for the terminal -- and leaves the terminal
    in blocking mode, as it found it."""
    data = os.urandom(MiB)
    (tmp_path / "in1").write_bytes(data)
    master, slave = pty.openpty()
    listener = subprocess.Popen(
        [*AIOXEN, "cat", "-l", "2", "tty"],
        stdin=(tmp_path / "in1").open("rb"),
        stdout=subprocess.DEVNULL,
        env=xenstored.env(0),
    )
    client = subprocess.Popen(
        [*AIOXEN, "cat", "0", "tty"],
        stdin=slave,
        stdout=subprocess.PIPE,
        env=xenstored.env(2),
    )
    try:
        assert os.get_blocking(slave)
        assert client.stdout is not None
        received = bytearray()
        while len(received) < len(data):
            chunk = client.stdout.read(len(data) - len(received))
            assert chunk, "client ended its output early"
            received += chunk
        assert received == data
        # the client closes its output once it saw the listener's EOF (all input sent);
        # a listener stopped before that would have cut its stream: a reset, not rc 0
        assert client.stdout.read() == b""
        listener.send_signal(signal.SIGTERM)  # the peer goes away for good
        assert listener.wait(30) == 143
        assert client.wait(30) == 0
        assert client.stdout.read() == b""
        assert os.get_blocking(slave), "the terminal was left non-blocking"
    finally:
        for p in (listener, client):
            if p.poll() is None:
                p.kill()
                p.wait()
        if client.stdout is not None:
            client.stdout.close()
        os.close(master)
        os.close(slave)
