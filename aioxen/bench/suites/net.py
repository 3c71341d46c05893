"""``net``: Ethernet frames through netfront/netback vs a Unix ``SOCK_SEQPACKET`` pair.

Two processes on the ``unix`` platform (plus an ``aioxen xenstored``): a netback serving
vif 1/0 (domain 0) and a netfront (domain 1).  For 64-byte, 1500-byte and 64 KiB
(scatter-gather) frames, one side sends as fast as flow control allows
(``pause_writing``/``resume_writing`` on netfront, the vif's RX queue hooks on netback)
and the other counts frames delivered to its Python callback; both directions are
measured.  The baseline is the same pair of processes exchanging the same frames over a
``socketpair(AF_UNIX, SOCK_SEQPACKET)`` from asyncio (``add_reader``/``add_writer``,
``recv``/``send`` until ``EAGAIN``), each frame handed to the same kind of callback.
Metrics: frames/s and Gbit/s (frame bytes only), identical case names for ratios.  Each
repetition first sends a warm-up burst (about ``ctx.warmup`` seconds' worth, untimed) whose
rate sizes the timed burst to last at least ``ctx.seconds``.

When run as root with ``ip`` and ``iperf3`` available (in the uvloop pass only: the
``aioxen`` command always runs on uvloop), ``TCP through TAP`` is measured too:
``aioxen netfront --tap`` and ``aioxen netback --tap`` in two network namespaces and
``iperf3`` between the kernels, against a kernel ``veth`` pair between two namespaces.

Peers run as ``python -m aioxen.bench.suites.net peer ROLE LOOP [FD]`` and take commands
on stdin (``recv SIZE COUNT``, ``send SIZE COUNT``), answering on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aioxen.bench.harness import Context, Measurement, end_process, make_temp_dir, shm_dir, spawn

NAME = "net"
SIZES = [(64, "64 B"), (1500, "1500 B"), (65535, "64 KiB SG")]
DIRECTIONS = [("front", "back", "front→back"), ("back", "front", "back→front")]
OURS = "netif/unix"
BASE = "seqpacket"


# --------------------------------------------------------------------------- peer side


class _Counter:
    """Counts frames of the armed size; reports the time of the last one."""

    def __init__(self) -> None:
        self.want = 0
        self.size = 0
        self.got = 0
        self.done: asyncio.Future[float] | None = None

    def arm(self, size: int, count: int) -> asyncio.Future[float]:
        self.size, self.want, self.got = size, count, 0
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def frame(self, data: bytes, addr: Any = None) -> None:
        if len(data) != self.size:
            return
        self.got += 1
        if self.got == self.want and self.done is not None and not self.done.done():
            self.done.set_result(time.perf_counter())


class _Gate:
    """An awaitable "may send" flag driven by pause/resume callbacks."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()

    def pause(self) -> None:
        self.open.clear()

    def resume(self) -> None:
        self.open.set()


async def _commands(send: Callable[[bytes, int], Any], counter: _Counter, gate: _Gate) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        words = line.split()
        size, count = int(words[1]), int(words[2])
        if words[0] == b"recv":
            fut = counter.arm(size, count)
            print("ARMED", flush=True)
            t_last = await fut
            print(f"DONE {t_last!r}", flush=True)
        elif words[0] == b"send":
            frame = bytes(size)
            t0 = time.perf_counter()
            for _ in range(count):
                while not gate.open.is_set():
                    await gate.open.wait()
                send(frame, size)
            t1 = time.perf_counter()
            print(f"SENT {t0!r} {t1!r}", flush=True)


async def _peer_netback() -> None:
    import aioxen
    from aioxen.net.back import Netback, Vif

    counter, gate = _Counter(), _Gate()
    vifs: list[Vif] = []
    connected = asyncio.Event()

    def connect(vif: Vif) -> Any:
        vif.rx_pause, vif.rx_resume = gate.pause, gate.resume
        vifs.append(vif)
        connected.set()
        return counter.frame

    async with aioxen.platform() as plat:
        netback = Netback(plat, connect=connect)
        await netback.add(1, 0)
        print("READY", flush=True)
        await connected.wait()

        def send(frame: bytes, size: int) -> None:
            vifs[-1].send(frame)

        try:
            await _commands(send, counter, gate)
        finally:
            await netback.close(remove=True)


async def _peer_netfront() -> None:
    import aioxen
    from aioxen.net.front import create_frontend

    counter, gate = _Counter(), _Gate()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            counter.frame(data)

        def pause_writing(self) -> None:
            gate.pause()

        def resume_writing(self) -> None:
            gate.resume()

    async with aioxen.platform() as plat:
        transport, _ = await create_frontend(Proto, 0, 0, platform=plat)
        print("READY", flush=True)
        sendto = transport.sendto

        def send(frame: bytes, size: int) -> None:
            sendto(frame)

        try:
            await _commands(send, counter, gate)
        finally:
            transport.close()
            await transport.wait_closed()


async def _peer_seqpacket(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    counter, gate = _Counter(), _Gate()
    recv = sock.recv
    frame_cb = counter.frame

    def readable() -> None:
        for _ in range(256):
            try:
                data = recv(70000)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(fd)
                return
            frame_cb(data)

    pending: deque[bytes] = deque()
    sendb = sock.send

    def writable() -> None:
        while pending:
            try:
                sendb(pending[0])
            except BlockingIOError:
                return
            pending.popleft()
        loop.remove_writer(fd)
        gate.resume()

    def send(frame: bytes, size: int) -> None:
        if not pending:
            try:
                sendb(frame)
                return
            except BlockingIOError:
                pass
        pending.append(frame)
        if gate.open.is_set():
            gate.pause()
            loop.add_writer(fd, writable)

    loop.add_reader(fd, readable)
    print("READY", flush=True)
    try:
        await _commands(send, counter, gate)
    finally:
        loop.remove_reader(fd)
        if pending:
            loop.remove_writer(fd)
        sock.close()


def peer_main(argv: list[str]) -> int:
    role, loop_name = argv[0], argv[1]
    if loop_name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        if role == "netback":
            runner.run(_peer_netback())
        elif role == "netfront":
            runner.run(_peer_netfront())
        elif role == "seqpacket":
            runner.run(_peer_seqpacket(int(argv[2])))
        else:
            raise SystemExit(f"unknown peer role {role!r}")
    return 0


# --------------------------------------------------------------------------- orchestration


class _Proc:
    def __init__(self, args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()):
        self.proc: subprocess.Popen[str] = spawn(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=pass_fds,
        )
        line = self.readline(60)
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"net benchmark peer {args[-2:]} failed to start: {line!r}")

    def readline(self, timeout: float = 120) -> str:
        assert self.proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("net benchmark peer did not answer")
        sel.close()
        return self.proc.stdout.readline().strip()

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                end_process(self.proc, 5)


def _peer_args(role: str, loop: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aioxen.bench.suites.net", "peer", role, loop, *extra]


def _one_way(sender: _Proc, receiver: _Proc, size: int, count: int) -> float:
    """Frames per second from the sender's first ``send`` to the receiver's last frame."""
    receiver.command(f"recv {size} {count}")
    if receiver.readline() != "ARMED":
        raise RuntimeError("receiver did not arm")
    sender.command(f"send {size} {count}")
    sent = sender.readline().split()
    done = receiver.readline().split()
    if sent[0] != "SENT" or done[0] != "DONE":
        raise RuntimeError(f"net benchmark: unexpected replies {sent} {done}")
    return count / (float(done[1]) - float(sent[1]))


def _counts(ctx: Context) -> dict[int, int]:
    """Frames of the first warm-up burst per frame size (later ones follow the rate)."""
    if ctx.quick:
        return {64: 4_000, 1500: 4_000, 65535: 400}
    return {64: 30_000, 1500: 30_000, 65535: 3_000}


def _steady(
    sender: _Proc, receiver: _Proc, size: int, first: int, ctx: Context, last: float = 0.0
) -> float:
    """Frames per second over at least ``ctx.seconds`` of bursts, after an untimed
    warm-up burst (``first`` frames, about ``ctx.warmup`` seconds' worth).  Bursts are
    sized from the previous repetition's rate ``last`` (else the warm-up's); if a burst
    ends too soon another one makes up the missing time, and the figure is all timed
    frames over all timed bursts' time."""
    est = _one_way(sender, receiver, size, first)
    est = last or est
    frames, elapsed = 0, 0.0
    while elapsed < ctx.seconds:
        count = max(100, int(est * (ctx.seconds - elapsed) * 1.05))
        est = _one_way(sender, receiver, size, count)
        frames += count
        elapsed += count / est
    return frames / elapsed


def _xenstored() -> Any:
    """An ``aioxen xenstored`` whose ``$XEN_ROOT`` (hence every grant page file) is on
    tmpfs when ``/dev/shm`` exists: on a disk-backed ``/tmp`` the pages would be dirty
    page cache under writeback, which is not what shared memory costs."""
    from aioxen.bench.mechanisms import XenstoredProcess

    xs = XenstoredProcess()
    shm = shm_dir()
    if shm is not None:
        shutil.rmtree(xs.root, ignore_errors=True)
        xs.root = make_temp_dir("aioxen-bench-net-", shm)
    return xs


def run(ctx: Context) -> list[Measurement]:
    counts = _counts(ctx)
    warm_counts: dict[tuple[str, str], tuple[int, float]] = {}
    results: dict[tuple[str, str, str], Measurement] = {}

    def m(case: str, mech: str, metric: str, unit: str, params: dict[str, Any]) -> Measurement:
        key = (case, mech, metric)
        if key not in results:
            results[key] = Measurement(
                suite=NAME,
                case=case,
                mechanism=mech,
                metric=metric,
                unit=unit,
                higher_is_better=True,
                ours=mech.startswith("netif"),
                params=params,
                loop=ctx.loop,
            )
        return results[key]

    xs = _xenstored()
    env_base = xs.start()
    procs: dict[str, _Proc] = {}
    try:
        env = dict(os.environ, **env_base, AIOXEN_PLATFORM="unix")
        procs["back"] = _Proc(_peer_args("netback", ctx.loop), dict(env, AIOXEN_DOMID="0"))
        procs["front"] = _Proc(_peer_args("netfront", ctx.loop), dict(env, AIOXEN_DOMID="1"))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        try:
            procs["sp-front"] = _Proc(
                _peer_args("seqpacket", ctx.loop, str(a.fileno())), dict(os.environ), (a.fileno(),)
            )
            procs["sp-back"] = _Proc(
                _peer_args("seqpacket", ctx.loop, str(b.fileno())), dict(os.environ), (b.fileno(),)
            )
        finally:
            a.close()
            b.close()
        for rep in range(ctx.repetitions):
            for size, label in SIZES:
                count = counts[size]
                for src, dst, arrow in DIRECTIONS:
                    case = f"{label} {arrow}"
                    for mech, s_key, d_key in (
                        (OURS, src, dst),
                        (BASE, f"sp-{src}", f"sp-{dst}"),
                    ):
                        ctx.progress(f"net rep {rep + 1}/{ctx.repetitions} {case} {mech}")
                        first, last = warm_counts.get((case, mech), (count, 0.0))
                        fps = _steady(procs[s_key], procs[d_key], size, first, ctx, last)
                        warm_counts[(case, mech)] = (max(100, int(fps * ctx.warmup)), fps)
                        params = {"frame": size, "seconds": ctx.seconds}
                        m(case, mech, "frames/s", "frames/s", params).samples.append(fps)
                        m(case, mech, "throughput", "Gbit/s", params).samples.append(
                            fps * size * 8 / 1e9
                        )
    finally:
        for p in procs.values():
            p.stop()
        xs.stop()
    out = list(results.values())
    # the aioxen CLI runs on uvloop whatever --loop says: measure the TAP path once
    if ctx.loop == "uvloop" and os.geteuid() == 0 and shutil.which("iperf3") and shutil.which("ip"):
        try:
            out += _tcp_through_tap(ctx)
        except Exception as exc:  # reported, never fatal for the other figures
            ctx.progress(f"net: TCP through TAP skipped: {exc!r}")
    return out


# --------------------------------------------------------------------------- TCP via TAP


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def _iperf(client_ns: str, server_ns: str, address: str, seconds: int, omit: int = 0) -> float:
    server = spawn(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            res = subprocess.run(
                ["ip", "netns", "exec", client_ns, "iperf3", "-c", address, "-t", str(seconds),
                 "-O", str(omit), "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + omit + 30,
            )  # fmt: skip
            try:
                report = json.loads(res.stdout)
                return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
            except (ValueError, KeyError, TypeError):
                time.sleep(0.2)  # server not listening yet, or a failed run: try again
        raise RuntimeError(f"iperf3 failed: {res.stdout[-300:]} {res.stderr[-300:]}")
    finally:
        server.terminate()
        server.wait(10)


def _tcp_through_tap(ctx: Context) -> list[Measurement]:
    seconds = max(1, round(ctx.seconds))
    omit = 0 if ctx.quick else 1  # iperf3 -O: the first second is warm-up, not counted
    tag = f"axb{os.getpid()}"
    nss = [f"{tag}f", f"{tag}b", f"{tag}v1", f"{tag}v2"]
    made: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    xs: Any = None
    res: dict[str, Measurement] = {}
    try:
        for ns in nss:
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for ns, addr in ((nss[0], "10.232.0.1/24"), (nss[1], "10.232.0.2/24")):
            _ip("-n", ns, "tuntap", "add", "dev", "vif0", "mode", "tap", "vnet_hdr")
            _ip("-n", ns, "addr", "add", addr, "dev", "vif0")
            _ip("-n", ns, "link", "set", "vif0", "up")
        _ip("link", "add", f"{tag}a", "netns", nss[2], "type", "veth", "peer", "name",
            f"{tag}z", "netns", nss[3])  # fmt: skip
        _ip("-n", nss[2], "addr", "add", "10.233.0.1/24", "dev", f"{tag}a")
        _ip("-n", nss[3], "addr", "add", "10.233.0.2/24", "dev", f"{tag}z")
        _ip("-n", nss[2], "link", "set", f"{tag}a", "up")
        _ip("-n", nss[3], "link", "set", f"{tag}z", "up")
        xs = _xenstored()
        env = dict(os.environ, **xs.start(), AIOXEN_PLATFORM="unix")
        for ns, domid, args in (
            (nss[1], "0", ["netback", "--frontend", "1", "--tap", "vif0"]),
            (nss[0], "1", ["netfront", "--backend", "0", "--tap", "vif0"]),
        ):
            p = spawn(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "aioxen", *args],
                stdout=subprocess.PIPE,
                text=True,
                env=dict(env, AIOXEN_DOMID=domid),
            )
            procs.append(p)
            assert p.stdout is not None
            if not p.stdout.readline().startswith("READY"):
                raise RuntimeError(f"aioxen {args[0]} did not start")
        for rep in range(ctx.repetitions):
            for mech, cns, sns, addr in (
                ("netif+tap/unix", nss[0], nss[1], "10.232.0.2"),
                ("veth (kernel)", nss[2], nss[3], "10.233.0.2"),
            ):
                ctx.progress(f"net rep {rep + 1}/{ctx.repetitions} TCP {mech}")
                gbit = _iperf(cns, sns, addr, seconds, omit)
                if mech not in res:
                    res[mech] = Measurement(
                        suite=NAME,
                        case="TCP through TAP (iperf3)",
                        mechanism=mech,
                        metric="throughput",
                        unit="Gbit/s",
                        higher_is_better=True,
                        ours=mech.startswith("netif"),
                        params={"seconds": seconds},
                        loop="uvloop",
                    )
                res[mech].samples.append(gbit)
    finally:
        for p in reversed(procs):  # the frontend first: it disconnects cleanly
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
            if p.poll() is None:
                p.kill()
                p.wait()
        if xs is not None:
            xs.stop()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
    return list(res.values())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        sys.exit(peer_main(sys.argv[2:]))
    raise SystemExit("usage: python -m aioxen.bench.suites.net peer ROLE LOOP [FD]")
