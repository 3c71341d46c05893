"""``qrexec``: Qubes RPC calls between Unix processes -- round trip, concurrency, bulk.

dom0 is the benchmark process: an [`aioxen.qrexec.Daemon`][aioxen.qrexec.daemon.Daemon]
with a VM ``vm1`` (domain 1), whose [`Agent`][aioxen.qrexec.agent.Agent] runs in a
second process (``python -m aioxen.bench.suites.qrexec agent ...``) and serves two
in-process Python services: ``bench.One`` (reads its stdin to EOF, answers one byte, exit
0) and ``bench.Sink`` (counts its stdin, answers the count).  A call is
``qrexec.call("vm1", svc, input=..., via=daemon)``: a control message to the agent, a
fresh data channel offered by dom0, the data handshake, stdin/stdout/exit code.

Cases (each repetition: warm-up, then >= ``ctx.seconds`` of steady state):

* ``call round trip`` -- sequential ``bench.One`` calls with 1 byte in: p50/p99 (µs),
  calls/s, and the CPU time per call of every process involved (the benchmark, the
  agent, xenstored, Qubes' daemon/agent and what they spawned; from ``/proc``), which a
  shared machine distorts far less than the wall-clock figures.  Goals (issue 17):
  p50 <= 1 ms, >= 1,000 calls/s.
* ``100 concurrent calls`` -- 100 calls started at once, again and again: calls/s.
* ``bulk through a call`` -- one ``bench.Sink`` call per round with a 64 MiB stdin
  (4 MiB with ``--quick``): GiB/s of stdin delivered (goal >= 1 GiB/s).

Mechanisms: aioxen over aioxen vchan on the ``unix`` platform (one ``aioxen xenstored``
process), and over Qubes' vchan-socket wire
([`aioxen.qrexec.vchan_socket`][]).  Baselines: ``process per call`` -- what Python
code does today to make a call, spawning a helper per call (here ``/bin/cat`` /
``cat >/dev/null``, no qrexec at all: the floor of the spawn approach); and, with
``--qubes-bin DIR`` (or ``$AIOXEN_BENCH_QUBES_BIN``: a directory holding Qubes'
``qrexec-daemon``, ``qrexec-agent`` and ``qrexec-client`` built against
libvchan-socket), Qubes' own C programs: ``qrexec-daemon`` and ``qrexec-agent`` as
processes, one ``qrexec-client`` per call (as Qubes' tools call it), the services being
shell scripts (the C agent runs executables only, fork+exec per call).  Run as root, the
Qubes programs run as ``nobody`` (``qrexec-agent`` as root would switch users through
PAM).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aioxen.bench.harness import (
    Collector,
    Context,
    Measurement,
    end_process,
    make_temp_dir,
    shm_dir,
    spawn,
    timed_async,
)
from aioxen.bench.mechanisms import XenstoredProcess
from aioxen.bench.suites.streams import GIB, percentile

NAME = "qrexec"
VM, VM_DOMID = "vm1", 1
CONCURRENT = 100
QUBES_BIN_ENV = "AIOXEN_BENCH_QUBES_BIN"

AIOXEN_VCHAN = "aioxen qrexec, vchan/unix"
AIOXEN_SOCKET = "aioxen qrexec, vchan-socket"
SPAWN = "process per call"
QUBES = "Qubes C qrexec, vchan-socket"
OURS = {AIOXEN_VCHAN: True, AIOXEN_SOCKET: True, SPAWN: False, QUBES: False}
NOTES = {
    SPAWN: "no qrexec: /bin/cat spawned per call",
    QUBES: "qrexec-client per call; services are sh scripts",
}

Call = Callable[[str, bytes], Awaitable[tuple[bytes, int]]]
"""``call(service, input) -> (stdout, exit code)``."""


# -- the aioxen agent process ------------------------------------------------------------


async def _agent_main(transport: str, where: str) -> None:
    from aioxen.qrexec.agent import Agent, ServiceRequest
    from aioxen.qrexec.channels import ChannelFactory, VchanChannels
    from aioxen.qrexec.vchan_socket import VchanSocketChannels

    plat: Any = None
    channels: ChannelFactory
    if transport == "vchan":  # aioxen vchan on the unix platform
        import aioxen

        plat = aioxen.platform(
            "unix",
            domid=VM_DOMID,
            root=os.environ["XEN_ROOT"],
            xenstored_path=os.environ["XENSTORED_PATH"],
        )
        await plat.__aenter__()
        channels = VchanChannels(plat)
    else:
        channels = VchanSocketChannels(where, VM_DOMID)
    agent = Agent(channels)

    @agent.service("bench.One")
    async def one(stdin: asyncio.StreamReader, stdout: Any, request: ServiceRequest) -> int:
        await stdin.read()
        stdout.write(b"y")
        return 0

    @agent.service("bench.Sink")
    async def sink(stdin: asyncio.StreamReader, stdout: Any, request: ServiceRequest) -> int:
        n = 0
        while chunk := await stdin.read(1 << 20):
            n += len(chunk)
        stdout.write(b"%d" % n)
        return 0

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with agent:
            await agent.wait_listening(30)
            print("ready", flush=True)
            await stop.wait()
    finally:
        if plat is not None:
            await plat.__aexit__(None, None, None)


def _start_agent(transport: str, where: str, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = spawn(
        [sys.executable, "-m", "aioxen.bench.suites.qrexec", "agent", transport, where],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        end_process(proc, 10)
        raise RuntimeError(f"the qrexec bench agent ({transport}) did not start")
    return proc


# -- Qubes' C programs -------------------------------------------------------------------


class QubesChain:
    """``qrexec-daemon`` (dom0) and ``qrexec-agent`` (``vm1``) from ``bin_dir`` over
    vchan-socket in a fresh directory; calls run ``qrexec-client``."""

    def __init__(self, bin_dir: str) -> None:
        self.bin = os.path.abspath(bin_dir)
        for prog in ("qrexec-daemon", "qrexec-agent", "qrexec-client"):
            if not os.access(os.path.join(self.bin, prog), os.X_OK):
                raise FileNotFoundError(f"--qubes-bin {bin_dir}: no executable {prog} there")
        self.dir = make_temp_dir("aioxen-bench-qubes-", shm_dir())
        self.procs: list[subprocess.Popen[Any]] = []
        self.run_as: dict[str, Any] = {}
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:  # the C agent switches users through PAM when root
            nobody = pwd.getpwnam("nobody")
            self.run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            self.user = "nobody"

    def _drop(self) -> None:
        os.setgroups([])
        os.setgid(self.run_as["group"])
        os.setuid(self.run_as["user"])

    def _env(self, domid: int) -> dict[str, str]:
        return {
            **os.environ,
            "VCHAN_DOMAIN": str(domid),
            "VCHAN_SOCKET_DIR": self.dir,
            "QREXEC_SERVICE_PATH": os.path.join(self.dir, "rpc"),
            "QUBES_RPC_CONFIG_PATH": os.path.join(self.dir, "rpc-config"),
        }

    def start(self) -> None:
        rpc = os.path.join(self.dir, "rpc")
        os.mkdir(rpc)
        os.mkdir(os.path.join(self.dir, "rpc-config"))
        for name, body in (("bench.One", "cat >/dev/null; printf y"), ("bench.Sink", "wc -c")):
            path = os.path.join(rpc, name)
            with open(path, "w", encoding="ascii") as f:
                f.write(f"#!/bin/sh\n{body}\n")
            os.chmod(path, 0o755)
        policy = os.path.join(self.dir, "policy")
        with open(policy, "w", encoding="ascii") as f:
            f.write("#!/bin/sh\necho result=deny\nexit 1\n")
        os.chmod(policy, 0o755)
        if self.run_as:
            for base, dirs, files in os.walk(self.dir):
                for name in [base, *(os.path.join(base, n) for n in dirs + files)]:
                    os.chown(name, self.run_as["user"], self.run_as["group"])
        quiet = subprocess.DEVNULL
        self.procs.append(
            spawn(
                [
                    os.path.join(self.bin, "qrexec-agent"),
                    "--no-fork-server",
                    f"--agent-socket={os.path.join(self.dir, 'agent.sock')}",
                ],
                env=self._env(VM_DOMID),
                stderr=quiet,
                **self.run_as,
            )
        )
        self.procs.append(
            spawn(
                [
                    os.path.join(self.bin, "qrexec-daemon"),
                    "--uuid=00000000-0000-4000-8000-000000000001",
                    f"--socket-dir={self.dir}",
                    f"--policy-program={policy}",
                    "--direct",
                    str(VM_DOMID),
                    VM,
                ],
                env=self._env(0),
                stderr=quiet,
                **self.run_as,
            )
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(self.dir, f"qrexec.{VM}")):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"Qubes' qrexec-daemon/-agent from {self.bin} did not start")
            time.sleep(0.02)

    async def call(self, service: str, data: bytes) -> tuple[bytes, int]:
        proc = await asyncio.create_subprocess_exec(
            os.path.join(self.bin, "qrexec-client"),
            f"--socket-dir={self.dir}",
            "-d",
            VM,
            f"{self.user}:QUBESRPC {service} dom0",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env(0),
            preexec_fn=self._drop if self.run_as else None,  # uvloop has no user=/group=
        )
        out, _ = await proc.communicate(data)
        assert proc.returncode is not None
        return out, proc.returncode

    def stop(self) -> None:
        while self.procs:
            end_process(self.procs.pop(), 10)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _spawn_call(service: str, data: bytes) -> tuple[bytes, int]:
    argv = ["/bin/cat"] if service == "bench.One" else ["/bin/sh", "-c", "wc -c"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate(data)
    assert proc.returncode is not None
    return out, proc.returncode


# -- measurements ------------------------------------------------------------------------


def _check(service: str, data: bytes, out: bytes, code: int) -> None:
    ok = code == 0 and (len(out) == 1 if service == "bench.One" else int(out) == len(data))
    if not ok:
        raise RuntimeError(f"qrexec bench: {service} answered {out[:40]!r}, exit {code}")


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU time (user + system, s) used so far by this process, its reaped children and
    the processes ``pids`` with their reaped children (``/proc``; ``None`` elsewhere)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None
        total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    return total


async def round_trips(
    call: Call, seconds: float, warmup: float, pids: list[int] | None = None
) -> tuple[list[float], float, float | None]:
    """Round-trip times (µs) of sequential 1-byte calls for >= ``seconds``, calls/s, and
    the CPU time per call (µs) of every process involved (this one, ``pids``, children):
    what a call costs whatever else the machine runs."""
    end = time.perf_counter() + warmup
    while True:
        out, code = await call("bench.One", b"x")
        _check("bench.One", b"x", out, code)
        if time.perf_counter() >= end:
            break
    rtts: list[float] = []
    cpu0 = cpu_seconds(pids or [])
    start = t1 = time.perf_counter()
    while t1 - start < seconds:
        t0 = time.perf_counter()
        out, code = await call("bench.One", b"x")
        t1 = time.perf_counter()
        _check("bench.One", b"x", out, code)
        rtts.append((t1 - t0) * 1e6)
    cpu1 = cpu_seconds(pids or [])
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / len(rtts) * 1e6
    return rtts, len(rtts) / (t1 - start), cpu


async def concurrent(call: Call, seconds: float, warmup: float) -> tuple[float, list[str]]:
    """Calls/s with ``CONCURRENT`` calls started at once, round after round, and the
    errors of calls that failed (reported, not hidden; all failing is an error)."""
    errors: list[str] = []

    async def step() -> float:
        results = await asyncio.gather(
            *(call("bench.One", b"x") for _ in range(CONCURRENT)), return_exceptions=True
        )
        done = 0
        for result in results:
            if isinstance(result, Exception):
                errors.append(repr(result)[:200])
                continue
            if isinstance(result, BaseException):
                raise result
            _check("bench.One", b"x", *result)
            done += 1
        if not done:
            raise RuntimeError(
                f"qrexec bench: all {CONCURRENT} concurrent calls failed: {errors[-1]}"
            )
        return done

    return await timed_async(step, seconds, warmup), errors


async def bulk(call: Call, data: bytes, seconds: float, warmup: float) -> float:
    """GiB/s of stdin delivered through ``bench.Sink`` calls of ``len(data)`` bytes."""

    async def step() -> float:
        out, code = await call("bench.Sink", data)
        _check("bench.Sink", data, out, code)
        return len(data)

    return await timed_async(step, seconds, warmup) / GIB


async def _measure_all(
    call: Call, ctx: Context, data: bytes, record: Callable[..., None], pids: list[int]
) -> None:
    rtts, rate, cpu = await round_trips(call, ctx.seconds, ctx.warmup, pids)
    case = "call round trip"
    record(case, "p50", "µs", False, percentile(rtts, 50.0))
    record(case, "p99", "µs", False, percentile(rtts, 99.0))
    record(case, "calls/s", "calls/s", True, rate)
    if cpu is not None:
        record(case, "CPU per call", "µs", False, cpu)
    rate, errors = await concurrent(call, ctx.seconds, ctx.warmup)
    case = f"{CONCURRENT} concurrent calls"
    record(case, "calls/s", "calls/s", True, rate)
    if errors:  # the rate counts only calls that succeeded
        record(case, "failed calls", "calls", False, float(len(errors)), errors[0])
    gib = await bulk(call, data, ctx.seconds, ctx.warmup)
    record(f"bulk through a call ({len(data) >> 20} MiB stdin)", "throughput", "GiB/s", True, gib)


async def _aioxen_session(
    transport: str,
    where: str,
    env: dict[str, str],
    ctx: Context,
    data: bytes,
    record: Any,
    pids: list[int],
) -> None:
    from aioxen.qrexec.channels import ChannelFactory, VchanChannels
    from aioxen.qrexec.client import call as qcall
    from aioxen.qrexec.daemon import Daemon
    from aioxen.qrexec.vchan_socket import VchanSocketChannels

    plat: Any = None
    channels: ChannelFactory
    if transport == "vchan":  # aioxen vchan on the unix platform
        import aioxen

        plat = aioxen.platform(
            "unix", domid=0, root=env["XEN_ROOT"], xenstored_path=env["XENSTORED_PATH"]
        )
        await plat.__aenter__()
        channels = VchanChannels(plat)
    else:
        channels = VchanSocketChannels(where, 0)
    try:
        async with Daemon(channels, domains={VM: VM_DOMID}) as daemon:
            await daemon.wait_connected(VM, timeout=60)

            async def call(service: str, data: bytes) -> tuple[bytes, int]:
                r = await qcall(VM, service, input=data, via=daemon)
                return r.stdout, r.exit_code

            await _measure_all(call, ctx, data, record, pids)
    finally:
        if plat is not None:
            await plat.__aexit__(None, None, None)


def qubes_bin(ctx: Context) -> str | None:
    """``--qubes-bin`` (``ctx.qubes_bin`` where the harness has it) or the environment."""
    return getattr(ctx, "qubes_bin", None) or os.environ.get(QUBES_BIN_ENV) or None


def run(ctx: Context) -> list[Measurement]:
    collector = Collector(NAME, ctx.loop)
    data = b"\x5a" * ((4 << 20) if ctx.quick else (64 << 20))
    mechs = [AIOXEN_VCHAN, AIOXEN_SOCKET, SPAWN]
    qubes_dir = qubes_bin(ctx)
    if qubes_dir:
        mechs.append(QUBES)
    xenstored = XenstoredProcess()
    socket_dir = make_temp_dir("aioxen-bench-vchan-socket-", shm_dir())  # tmpfs, as /run
    agents: list[subprocess.Popen[str]] = []
    chain: QubesChain | None = None
    try:
        env = xenstored.start()
        agents.append(_start_agent("vchan", "-", env))
        agents.append(_start_agent("socket", socket_dir, {}))
        if qubes_dir:
            chain = QubesChain(qubes_dir)
            chain.start()
        for rep in range(ctx.repetitions):
            for mech in mechs:
                ctx.progress(f"qrexec rep {rep + 1}/{ctx.repetitions} {mech}")

                def record(
                    case: str,
                    metric: str,
                    unit: str,
                    hib: bool,
                    value: float,
                    note: str = "",
                    mech: str = mech,
                ) -> None:
                    params = {"concurrency": CONCURRENT, "bulk_bytes": len(data)}
                    m = collector.get(
                        case,
                        mech,
                        metric,
                        unit,
                        hib,
                        OURS[mech],
                        params,
                        note or NOTES.get(mech, ""),
                    )
                    m.samples.append(value)

                main: Awaitable[None]
                if mech == AIOXEN_VCHAN:
                    pids = [agents[0].pid] + ([xenstored.proc.pid] if xenstored.proc else [])
                    main = _aioxen_session("vchan", "-", env, ctx, data, record, pids)
                elif mech == AIOXEN_SOCKET:
                    pids = [agents[1].pid]
                    main = _aioxen_session("socket", socket_dir, {}, ctx, data, record, pids)
                elif mech == SPAWN:
                    main = _measure_all(_spawn_call, ctx, data, record, [])
                else:
                    assert chain is not None
                    main = _measure_all(chain.call, ctx, data, record, [p.pid for p in chain.procs])
                with asyncio.Runner(loop_factory=ctx.loop_factory()) as runner:
                    runner.run(_as_coroutine(main))
    finally:
        for proc in agents:
            end_process(proc, 10)
        if chain is not None:
            chain.stop()
        xenstored.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
    return collector.results()


async def _as_coroutine(aw: Awaitable[None]) -> None:
    await aw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aioxen.bench.suites.qrexec")
    parser.add_argument("role", choices=["agent"])
    parser.add_argument("transport", choices=["vchan", "socket"])
    parser.add_argument("where", help="the vchan-socket directory ('-' for unix)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(_agent_main(args.transport, args.where))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
