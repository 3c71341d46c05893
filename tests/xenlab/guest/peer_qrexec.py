"""The peer domU's half of the cross-domain qrexec and bridge tests (and how dom0 starts it).

Theory of operation
-------------------
Like :mod:`peer` (whose helpers and runner this module reuses: ``stream``, ``say``,
``exchange``, ``run``), this runs *inside the peer domU* as ``python -S -m peer_qrexec
LOOP ACTION ARGS...``, started from dom0 through the domU's console, on aioxen's ``xen``
platform as any guest program would.  Its actions are registered into ``peer.ACTIONS``,
so the output conventions are the same (``READY``, ``RESULT``, ``ERROR <type>: ...``):

* ``qrexec-agent MAX_VERSION CALLS`` -- aioxen's qrexec :class:`~aioxen.qrexec.Agent`
  for dom0 (the vchan server of control port 512) with Python services (``test.Echo``,
  ``test.Bulk``, ``test.Slow``), a services directory with executables (``test.Env``,
  ``test.NotExec``) and a trigger socket; ``READY pid=P trigger=PATH`` once port 512 is
  offered, ``CONNECTED version=N`` once dom0's daemon is in, then each call of
  ``CALLS`` (``target/service/seed/nbytes`` separated by ``,``; ``-`` for none) made
  from the domU through the daemon's policy, one ``CALL i exit=... out=LEN:SHA256
  err=...`` line each, then ``CALLS done``; then it serves until killed.
* ``bulk-server KIND WHERE COUNT`` -- a TCP (``tcp PORT``, on the domU's 127.0.0.1) or
  vchan (``vchan DOMID/PORT``) server for ``COUNT`` connections speaking
  :func:`serve_bulk`'s protocol, one ``CONN ...`` line per connection.

dom0's side of the bulk protocol is :func:`bulk_client`; :func:`command` and
:func:`spawn` are how dom0 starts this module in the domU (a background process whose
exit status is kept, so a test can check that SIGTERM stopped it cleanly).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peer import ACTIONS, HANG, exchange, run, say, stream

if TYPE_CHECKING:
    from peerdomu import Peer, Spawned

CHUNK = 1 << 16

# --------------------------------------------------------------------------- qrexec services


async def bulk_service(stdin: asyncio.StreamReader, stdout: Any, req: Any) -> int:
    """``test.Bulk+SEED-N``: sends ``stream(SEED, N)`` while reading its stdin to EOF at
    the same time; the stdin's length and SHA-256 go to stderr."""
    seed, _, n = req.argument.partition("-")
    data = memoryview(stream(int(seed), int(n)))

    async def send() -> None:
        for i in range(0, len(data), CHUNK):
            stdout.write(data[i : i + CHUNK])
            await stdout.drain()

    async def receive() -> tuple[int, str]:
        h = hashlib.sha256()
        got = 0
        while chunk := await stdin.read(CHUNK):
            h.update(chunk)
            got += len(chunk)
        return got, h.hexdigest()

    _, (got, digest) = await asyncio.gather(send(), receive())
    req.stderr.write(f"got={got} sha256={digest}".encode())
    return 0


ENV_SERVICE = """#!/bin/sh
read x
echo "argv=$# [$1] in=$x"
echo "remote=$QREXEC_REMOTE_DOMAIN full=$QREXEC_SERVICE_FULL_NAME arg=$QREXEC_SERVICE_ARGUMENT"
echo "agent=$QREXEC_AGENT_PID ppid=$PPID"
echo err >&2
exit 3
"""


def services_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pq-rpc-"))
    (d / "test.Env").write_text(ENV_SERVICE)
    (d / "test.Env").chmod(0o755)
    (d / "test.NotExec").write_text("#!/bin/sh\n")
    return d


async def act_qrexec_agent(plat: Any, max_version: str, calls: str) -> None:
    from aioxen.qrexec import Agent, ServiceRequest, VchanChannels

    agent = Agent(VchanChannels(plat), max_version=int(max_version), services_dir=services_dir())

    @agent.service("test.Echo")
    async def echo(stdin: asyncio.StreamReader, stdout: Any, req: ServiceRequest) -> int:
        stdout.write(f"{req.source}:{req.argument}:{req.user}:".encode() + await stdin.read())
        return 7

    @agent.service("test.Slow")
    async def slow(stdin: asyncio.StreamReader, stdout: Any, req: ServiceRequest) -> int:
        stdout.write(b"started\n")
        await stdout.drain()
        await asyncio.sleep(600)
        return 0

    agent.add_service("test.Bulk", bulk_service)
    trigger = Path(tempfile.mkdtemp(prefix="pq-trig-")) / "qrexec-agent"
    async with agent:
        await agent.start_trigger_socket(trigger)
        await agent.wait_listening(timeout=HANG)
        say(f"READY pid={os.getpid()} trigger={trigger}")
        await agent.wait_connected(timeout=HANG)
        say(f"CONNECTED version={agent.version}")
        for i, spec in enumerate(c for c in calls.split(",") if c != "-"):
            target, service, seed, n = spec.split("/")
            data = stream(int(seed or 0), int(n))
            r = await agent.call(target, service, input=data, timeout=HANG)
            digest = hashlib.sha256(r.stdout).hexdigest()
            say(f"CALL {i} exit={r.exit_code} out={len(r.stdout)}:{digest} err={r.stderr!r}")
        say("CALLS done")
        await agent.serve_forever()


ACTIONS["qrexec-agent"] = act_qrexec_agent

# --------------------------------------------------------------------------- bulk over a bridge


async def serve_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """One connection of the bulk protocol, the server's side.  The client sends a line
    ``SEED N`` then ``stream(SEED + 1, N)`` and EOF; the server sends ``stream(SEED, N)``
    and EOF meanwhile.  A ``HOLD`` line instead: the server answers ``held`` and waits
    for the end of the connection.  Returns the line to report."""
    header = await asyncio.wait_for(reader.readline(), HANG)
    if header == b"HOLD\n":
        writer.write(b"held\n")
        await writer.drain()
        try:
            rest = await reader.read()
            return f"CONN hold eof rest={len(rest)}"
        except ConnectionError as exc:
            return f"CONN hold reset {type(exc).__name__}"
    seed, n = (int(x) for x in header.split())
    got, digest = await exchange(reader, writer, n, seed)
    return f"CONN seed={seed} received={got} sha256={digest}"


async def bulk_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seed: int, n: int
) -> tuple[int, str]:
    """The client's side of :func:`serve_bulk`: (bytes received, their SHA-256)."""
    writer.write(b"%d %d\n" % (seed, n))
    return await exchange(reader, writer, n, seed + 1)


async def act_bulk_server(plat: Any, kind: str, where: str, count: str) -> None:
    from aioxen import vchan

    left = int(count)
    done = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal left
        try:
            say(await serve_bulk(reader, writer))
        except Exception as exc:  # reported; the test fails on the missing CONN line
            say(f"CONN failed {type(exc).__name__}: {exc}")
        finally:
            writer.close()
            left -= 1
            if left == 0:
                done.set()

    server: Any
    if kind == "tcp":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        server = await asyncio.start_server(on_client, "127.0.0.1", int(where))
    else:
        domid, port = where.split("/")
        server = await vchan.start_server(on_client, int(domid), port, platform=plat)
    async with server:
        say("READY")
        await asyncio.wait_for(done.wait(), 600)
    say("RESULT done")


ACTIONS["bulk-server"] = act_bulk_server

# --------------------------------------------------------------------------- dom0's side

_ids = itertools.count(1)


def command(peer: Peer, loop: str, action: str, *args: object) -> str:
    """The domU command line running ``action`` of this module."""
    argv = " ".join(shlex.quote(str(a)) for a in (loop, action, *args))
    return f"{peer.python_command()} -m peer_qrexec {argv}"


def spawn(peer: Peer, cmd: str) -> Spawned:
    """Start ``cmd`` in the domU in the background (init's child, as :meth:`Peer.spawn`),
    its output in a file and its exit status in ``<file>.rc`` once it ends."""
    from peerdomu import Spawned

    out = f"/tmp/pq-{next(_ids)}.out"
    pid = peer.console.run(
        f"( ( {cmd} >{out} 2>&1 & echo $! >{out}.pid; wait $!; echo $? >{out}.rc ) & );"
        f" while [ ! -s {out}.pid ]; do sleep 0.05; done; cat {out}.pid"
    )
    return Spawned(peer, int(pid.strip()), out)


def exit_status(proc: Spawned) -> int | None:
    """The exit status of a :func:`spawn`'ed process (None while it runs)."""
    text = proc.peer.console.run(f"cat {proc.out}.rc 2>/dev/null", check=False).strip()
    return int(text) if text else None


if __name__ == "__main__":
    os.environ.setdefault("AIOXEN_PLATFORM", "xen")
    sys.exit(run(sys.argv[1:]))
