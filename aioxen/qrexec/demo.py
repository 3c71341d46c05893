"""``python -m aioxen.qrexec.demo``: Qubes RPC between three Unix processes, no Qubes, no Xen.

Theory of operation
-------------------
Domain 0 (this process) creates a private unix-platform world (a temporary
``$XEN_ROOT`` with its xenstored inside this process) and runs a qrexec
[`Daemon`][aioxen.qrexec.daemon.Daemon] for two VMs, ``work`` (domain 2) and ``vault``
(domain 3), with this policy::

    demo.Greet  *  work  vault  allow
    *           *  *     *      deny

It then starts the two VMs as child processes (``--vm vault``, ``--vm work``), each an
[`Agent`][aioxen.qrexec.agent.Agent] offering control port 512 to dom0.  ``vault``
serves the Python service ``demo.Greet``; ``work`` calls ``demo.Greet+friend`` in
``vault`` (dom0 checks the policy and tells both VMs the data port; the data then flows
directly between the two VM processes over vchan), times a series of calls, and tries a
call the policy denies (exit status 126).  ``work`` reports as one JSON line; dom0 prints
it, stops ``vault`` and removes the world.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from aioxen.apps.embedded import EmbeddedRoot
from aioxen.qrexec.agent import Agent, ServiceRequest
from aioxen.qrexec.channels import VchanChannels
from aioxen.qrexec.daemon import Daemon
from aioxen.qrexec.policy import RulePolicy

DOMAINS = {"work": 2, "vault": 3}
POLICY = """\
demo.Greet  *  work  vault  allow
*           *  *     *      deny
"""
ROUNDS = 200
TIMEOUT = 60.0


async def _vm_vault() -> dict[str, Any]:
    from aioxen.platforms import resolve

    plat = await resolve(None)
    async with plat:
        agent = Agent(VchanChannels(plat))

        @agent.service("demo.Greet")
        async def greet(
            stdin: asyncio.StreamReader, stdout: asyncio.StreamWriter, req: ServiceRequest
        ) -> int:
            text = (await stdin.read()).decode()
            stdout.write(f"hello {req.argument}, {req.source}; you said {text!r}".encode())
            return 0

        from aioxen.cli import StopSignals

        with StopSignals((signal.SIGTERM,)) as stop:
            async with agent:
                await stop.wait()
    return {}


async def _vm_work() -> dict[str, Any]:
    from aioxen.platforms import resolve

    plat = await resolve(None)
    async with plat, Agent(VchanChannels(plat)) as agent:
        await agent.wait_connected(timeout=TIMEOUT)
        first = await agent.call("vault", "demo.Greet+friend", input=b"hi", timeout=TIMEOUT)
        t0 = time.perf_counter()
        for _ in range(ROUNDS):
            r = await agent.call("vault", "demo.Greet+x", input=b"", timeout=TIMEOUT)
            assert r.exit_code == 0
        per_call = (time.perf_counter() - t0) / ROUNDS
        denied = await agent.call("vault", "demo.Secret", timeout=TIMEOUT)
        version = agent.version
    return {
        "stdout": first.stdout.decode(),
        "exit_code": first.exit_code,
        "per_call_us": per_call * 1e6,
        "denied_exit_code": denied.exit_code,
        "version": version,
    }


async def _child(name: str, world: EmbeddedRoot) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioxen.qrexec.demo",
        "--vm",
        name,
        env={**os.environ, **world.environ(DOMAINS[name])},
        stdout=asyncio.subprocess.PIPE,
    )


async def run_demo() -> int:
    print("aioxen qrexec demo: dom0 and two VMs as Unix processes on the unix platform")
    async with EmbeddedRoot(prefix="aioxen-qrexec-demo-") as world:
        async with world.platform(0) as plat:
            daemon = Daemon(VchanChannels(plat), domains=DOMAINS, policy=RulePolicy.parse(POLICY))
            async with daemon:
                print(f"dom0 (pid {os.getpid()}): daemon for {DOMAINS}, policy:")
                print("".join(f"    {line}\n" for line in POLICY.splitlines()), end="")
                vault = await _child("vault", world)
                procs = [vault]
                try:
                    async with asyncio.timeout(TIMEOUT):
                        await daemon.wait_connected("vault")  # the target first
                        work = await _child("work", world)
                        procs.insert(0, work)
                        await daemon.wait_connected("work")
                        print(f"vault (pid {vault.pid}) and work (pid {work.pid}) connected")
                        out, _ = await work.communicate()
                finally:
                    for p in procs:
                        if p.returncode is None:
                            p.send_signal(signal.SIGTERM)
                    for p in procs:
                        try:
                            async with asyncio.timeout(10):
                                await p.wait()
                        except TimeoutError:
                            p.kill()
                            await p.wait()
        if work.returncode != 0:
            print(f"work exited with status {work.returncode}", file=sys.stderr)
            return 1
        r = json.loads(out)
        print(f"work -> vault demo.Greet+friend (protocol v{r['version']}): {r['stdout']!r}, "
              f"exit {r['exit_code']}")  # fmt: skip
        print(f"{ROUNDS} calls, {r['per_call_us']:.0f} us per call (policy check included)")
        print(f"work -> vault demo.Secret: denied by the policy, exit {r['denied_exit_code']}")
        ok = r["exit_code"] == 0 and r["denied_exit_code"] == 126 and "friend" in r["stdout"]
    print("removed the world")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aioxen.qrexec.demo", description=__doc__)
    parser.add_argument("--vm", choices=sorted(DOMAINS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vm is None:
        return asyncio.run(run_demo())
    report = asyncio.run(_vm_work() if args.vm == "work" else _vm_vault())
    if report:
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
