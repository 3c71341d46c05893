"""``rings``: request/response round trips through an async ring pair across two processes.

aioxen's [`AsyncFrontRing`][aioxen.rings.aio.AsyncFrontRing] (this process, domain 1) talks to an
[`AsyncBackRing`][aioxen.rings.aio.AsyncBackRing] echo server in a child process (domain 0) on the
``unix`` platform: one shared page (netif TX request/response formats), one event channel.
The baseline is the same exchange over a Unix ``SOCK_SEQPACKET`` socket pair: one message
per request and per response, the server reading every waiting message before answering,
both ends driven by the same event loop type (``loop.add_reader`` and non-blocking
``send``/``recv``, the cheapest asyncio path).

A *round trip* is one request answered; the client sends ``batch`` requests, waits for all
their responses, and repeats for a fixed time.  Both clients build their requests once per
batch size (the ring assigns ids itself; the socket client's ids are fixed per position)
and both servers decode each request and encode a response carrying its id and size.
Mechanisms are interleaved inside each repetition so machine noise hits both alike.

Run it as ``aioxen bench rings`` (or ``python -m benchmarks rings``); this module is also
the child process's entry point (``python -m aioxen.bench.suites.rings serve-...``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import struct
import subprocess
import sys
from typing import Any

from aioxen.bench.harness import (
    NO_POLL,
    Context,
    Measurement,
    make_temp_dir,
    spawn,
    timed_async,
)

NAME = "rings"

BATCHES = (1, 8, 32)
FRONT_DOMID, BACK_DOMID = 1, 0
REQ = struct.Struct("<IHHHH")  # netif_tx_request
RSP = struct.Struct("<Hh")  # netif_tx_response


def _loop_factory(name: str) -> Any:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


# ----------------------------------------------------------------------------- servers


async def _serve_ring(root: str, refs: list[int], port: int, busy_poll: float | None) -> None:
    import aioxen
    from aioxen.net import netif as N
    from aioxen.rings.aio import AsyncBackRing

    async with aioxen.platform("unix", root=root, domid=BACK_DOMID) as plat:
        back = await AsyncBackRing.attach(
            plat, FRONT_DOMID, refs, port, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE,
            busy_poll=busy_poll,
        )  # fmt: skip
        print("READY", flush=True)

        def echo(req: N.NetifTxRequest) -> N.NetifTxResponse:
            return N.NetifTxResponse(req.id, req.size)

        try:
            await back.serve(echo)
        except ConnectionResetError:
            pass  # the client finished
        finally:
            back.close()


async def _serve_seqpacket(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        while True:
            try:
                msg = sock.recv(64)
            except BlockingIOError:
                return
            if not msg:
                loop.remove_reader(sock.fileno())
                if not done.done():
                    done.set_result(None)
                return
            _gref, _off, _flags, ident, size = REQ.unpack(msg)
            sock.send(RSP.pack(ident, size))

    loop.add_reader(sock.fileno(), readable)
    print("READY", flush=True)
    await done
    sock.close()


# ----------------------------------------------------------------------------- clients


class _SeqpacketClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.want = 0
        self.got: list[int] = []
        self.waiter: asyncio.Future[None] | None = None
        self._prebuilt: dict[int, list[bytes]] = {}
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                msg = self.sock.recv(64)
            except BlockingIOError:
                break
            if not msg:
                raise ConnectionResetError("seqpacket server went away")
            self.got.append(RSP.unpack(msg)[1])
        if len(self.got) >= self.want and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def exchange(self, sizes: list[int]) -> list[int]:
        msgs = self._prebuilt.get(len(sizes))
        if msgs is None:
            msgs = self._prebuilt[len(sizes)] = [
                REQ.pack(i, 0, 0, i, s) for i, s in enumerate(sizes)
            ]
        self.got = []
        self.want = len(sizes)
        send = self.sock.send
        for m in msgs:
            send(m)
        if len(self.got) < self.want:
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.got

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def _time_batches(exchange: Any, batch: int, seconds: float, warmup: float) -> float:
    """Round trips per second of ``exchange(sizes)`` with ``batch`` requests per call, in
    steady state: ``warmup`` seconds untimed, then at least ``seconds`` timed."""
    sizes = list(range(batch))

    async def step() -> float:
        got = await exchange(sizes)
        if sorted(got) != sizes:
            raise AssertionError(f"wrong responses: {got[:5]}...")
        return batch

    return await timed_async(step, seconds, warmup)


def _spawn(args: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = spawn(
        [sys.executable, "-m", "aioxen.bench.suites.rings", *args],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"benchmark server failed to start: {line!r}")
    return proc


async def _measure(ctx: Context) -> list[Measurement]:
    import aioxen
    from aioxen.net import netif as N
    from aioxen.rings.aio import AsyncFrontRing

    seconds = ctx.seconds
    loop_name = ctx.loop
    root = make_temp_dir("aioxen-rings-bench-")
    samples: dict[tuple[str, int], list[float]] = {}
    procs: list[subprocess.Popen[str]] = []
    try:
        async with aioxen.platform("unix", root=root, domid=FRONT_DOMID) as plat:
            front = await AsyncFrontRing.create(
                plat, BACK_DOMID, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE
            )
            # The same pair with busy polling off at both ends: what a machine without a
            # free core gets (flags the figures that need one, see harness.annotate).
            front_np = await AsyncFrontRing.create(
                plat, BACK_DOMID, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, busy_poll=0
            )
            client: _SeqpacketClient | None = None
            try:
                refs = ",".join(map(str, front.refs))
                procs.append(_spawn(["serve-ring", root, refs, str(front.port), loop_name]))
                refs_np = ",".join(map(str, front_np.refs))
                procs.append(
                    _spawn(["serve-ring", root, refs_np, str(front_np.port), loop_name, "0"])
                )
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                procs.append(_spawn(["serve-seqpacket", str(b.fileno()), loop_name], (b.fileno(),)))
                b.close()
                a.setblocking(False)
                client = _SeqpacketClient(a)

                prebuilt: dict[int, list[N.NetifTxRequest]] = {}

                def ring_exchange(ring: Any) -> Any:
                    async def exchange(sizes: list[int]) -> list[int]:
                        reqs = prebuilt.get(len(sizes))
                        if reqs is None:  # the ring assigns ids: the same requests go again
                            reqs = [N.NetifTxRequest(0, 0, 0, 0, s) for s in sizes]
                            prebuilt[len(sizes)] = reqs
                        rsps = await ring.request_many(reqs)
                        return [r.status for r in rsps]

                    return exchange

                mechanisms = [
                    ("ring/unix", ring_exchange(front)),
                    ("ring/unix" + NO_POLL, ring_exchange(front_np)),
                    ("seqpacket", client.exchange),
                ]
                for rep in range(ctx.repetitions):
                    for batch in BATCHES:
                        for name, fn in mechanisms:
                            ctx.progress(
                                f"rings rep {rep + 1}/{ctx.repetitions} batch {batch} {name}"
                            )
                            rate = await _time_batches(fn, batch, seconds, ctx.warmup)
                            samples.setdefault((name, batch), []).append(rate)
            finally:  # also on Ctrl-C: the ring's pin must go before the platform closes
                front.close()
                front_np.close()
                if client is not None:
                    client.close()
    finally:
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        shutil.rmtree(root, ignore_errors=True)
    return [
        Measurement(
            suite=NAME,
            case=f"batch {batch}",
            mechanism=name,
            metric="round trips",
            unit="req/s",
            higher_is_better=True,
            ours=name.startswith("ring/unix"),
            samples=values,
            params={"batch": batch, "seconds": seconds},
            loop=loop_name,
        )
        for (name, batch), values in samples.items()
    ]


def run(ctx: Context) -> list[Measurement]:
    """Both mechanisms at batch sizes 1, 8 and 32 on the context's event loop."""
    with asyncio.Runner(loop_factory=ctx.loop_factory()) as runner:
        return runner.run(_measure(ctx))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ring = sub.add_parser("serve-ring")
    ring.add_argument("root")
    ring.add_argument("refs")
    ring.add_argument("port", type=int)
    ring.add_argument("loop")
    ring.add_argument("busy_poll", type=float, nargs="?", default=None)
    seq = sub.add_parser("serve-seqpacket")
    seq.add_argument("fd", type=int)
    seq.add_argument("loop")
    args = parser.parse_args(argv)
    if args.cmd == "serve-ring":
        refs = [int(r) for r in args.refs.split(",")]
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            runner.run(_serve_ring(args.root, refs, args.port, args.busy_poll))
        return 0
    if args.cmd == "serve-seqpacket":
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            runner.run(_serve_seqpacket(args.fd))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
