"""Driving a PV domU from dom0 in the Xen lab: ``xl``, the domU's console, aioxen backends.

Theory of operation
-------------------
:func:`start_domu` builds a domain with ``xl create -p`` (no devices in its config) and
starts ``aioxen blkback`` and ``aioxen netback`` for it as separate processes; they create
the vbd and vif XenStore entries themselves (the toolstack's part, as ``xl`` would) and
print ``READY``.  The domU (``xenlab/domu-init``: busybox, Linux's ``xen-blkfront``,
``xen-netfront`` and ``ext4``) probes them like devices ``xl`` had made.  ``xl`` itself
never touches the devices, so no hotplug scripts run and libxl waits for no backend.

The domU is unpaused right after the backends are started, so it boots while they start;
Linux's frontends attach whenever the devices appear (hot-plug works as well as devices
present at boot).  The domU's console is the command channel.  ``xenconsoled`` (started by
``xenlab/guest-run.sh``) exposes it as a pty named in XenStore
(``/local/domain/D/console/tty``); :class:`Console` opens that pty raw and
:meth:`Console.run` sends one line::

    echo "@@<$((N+0))@@"; { CMD ; } </dev/null 2>&1; echo "@@>$((N+0)):$?@@"

The arithmetic makes the markers differ from the line's own echo, so the output of
command ``N`` is exactly what lies between its two expanded markers, whatever else (echo,
kernel messages) the console carries.  Every wait has a deadline (a hang guard); what the
console said is kept in ``<results>/domu-console-driver.log`` for post-mortems.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import subprocess
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path

XEN_BIN = Path("/usr/lib/xen-4.17/bin")
XL = str(XEN_BIN / "xl")
RESULTS = Path("/tmp/xenlab-results")
NAME = "aioxen-domu"
TAP = "aioxtap0"
DOM0_IP = "10.98.0.1"
DOMU_IP = "10.98.0.2"
MIB = 1 << 20


class DomuError(AssertionError):
    """The domU or its driver misbehaved (reported as a test failure)."""


def xenstore_read(path: str) -> str | None:
    out = subprocess.run(["xenstore-read", path], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else None


def sh(*cmd: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run a dom0 command; its stdout (``DomuError`` with its output if it fails)."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise DomuError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return out.stdout


class Console:
    """The domU's console pty, driven line by line (see the module docstring)."""

    def __init__(self, path: str, log: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd, termios.TCSANOW)
        self._buf = b""
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self._ids = itertools.count(1)

    def close(self) -> None:
        os.close(self.fd)
        self._log.close()

    def _fill(self, until: float) -> bool:
        """Read what the console has (waiting until ``until`` at most); False on timeout."""
        left = until - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([self.fd], [], [], left)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            data = os.read(self.fd, 65536)
            self._log.write(data)
            self._log.flush()
            self._buf += data.replace(b"\r", b"")
        return True

    def _send(self, line: str) -> None:
        data = line.encode() + b"\n"
        while data:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            data = data[n:]

    def start(self, cmd: str) -> int:
        """Send ``cmd`` bracketed by markers; its id for :meth:`wait`."""
        if "\n" in cmd:
            raise ValueError("one line per command")
        n = next(self._ids)
        self._send(
            f'echo "@@<$(({n}+0))@@"; {{ {cmd} ; }} </dev/null 2>&1; echo "@@>$(({n}+0)):$?@@"'
        )
        return n

    def wait(self, n: int, timeout: float) -> tuple[int, str] | None:
        """(exit status, output) of command ``n``; None if it has not finished in time."""
        pattern = re.compile(rb"@@<%d@@\n(.*?)@@>%d:(\d+)@@\n" % (n, n), re.DOTALL)
        until = time.monotonic() + timeout
        while True:
            m = pattern.search(self._buf)
            if m:
                self._buf = self._buf[m.end() :]
                return int(m.group(2)), m.group(1).decode(errors="replace")
            if not self._fill(until) and time.monotonic() >= until:
                return None

    def run(self, cmd: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run ``cmd`` in the domU; its output (``DomuError`` on failure or timeout)."""
        n = self.start(cmd)
        got = self.wait(n, timeout)
        if got is None:
            tail = self._buf[-2000:].decode(errors="replace")
            raise DomuError(f"domU command {cmd!r} did not finish in {timeout}s; console:\n{tail}")
        rc, out = got
        if check and rc != 0:
            raise DomuError(f"domU command {cmd!r} exited {rc}:\n{out}")
        return out

    def sync(self, timeout: float) -> None:
        """Wait until the domU's shell answers (it may still be booting)."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            n = self.start("true")
            if self.wait(n, 3.0) is not None:
                return
        raise DomuError(
            f"the domU's shell did not answer on {self.path} within {timeout}s; console:\n"
            + self._buf[-3000:].decode(errors="replace")
        )


@dataclass
class Backend:
    """An ``aioxen`` backend process serving the domU, its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str]) -> Backend:
        log = RESULTS / f"domu-{name}.log"
        env = dict(os.environ, AIOXEN_PLATFORM="xen", PYTHONUNBUFFERED="1")
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "aioxen", *args],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        return cls(name, proc, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, until: float) -> None:
        while "READY" not in self.output():
            if self.proc.poll() is not None:
                raise DomuError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > until:
                raise DomuError(f"{self.name} not READY in time:\n{self.output()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait; the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


@dataclass
class Domu:
    domid: int
    console: Console
    image: Path
    blkback: Backend
    netback: Backend
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds from :func:`start_domu`'s start to each step."""
    started: float = 0.0  # time.monotonic() when start_domu began
    destroyed: bool = False

    def mark(self, step: str) -> None:
        self.timings[step] = time.monotonic() - self.started

    def destroy(self) -> None:
        if not self.destroyed:
            self.destroyed = True
            sh(XL, "destroy", str(self.domid), check=False)


def _xl_config(path: Path, kernel: str, initrd: str) -> None:
    path.write_text(
        f'name = "{NAME}"\n'
        'type = "pv"\n'
        f'kernel = "{kernel}"\n'
        f'ramdisk = "{initrd}"\n'
        'extra = "console=hvc0 quiet loglevel=1 xenlab.watchdog=900"\n'
        "memory = 256\n"
        "vcpus = 1\n"
        'on_crash = "preserve"\n'
    )


def start_domu(image: Path, timeout: float = 300.0) -> Domu:
    """Create the domU, start both backends for it (``image`` is the disk) and reach the
    domU's shell.  The domU is unpaused as soon as the backends are started: it boots
    while they start (Python under TCG), and its frontends attach when the backends
    create the devices (Linux's xenbus handles devices that appear after boot)."""
    t0 = time.monotonic()
    until = t0 + timeout
    timings: dict[str, float] = {}
    cfg = Path("/tmp/xenlab-domu.cfg")
    _xl_config(cfg, os.environ["XENLAB_DOMU_KERNEL"], os.environ["XENLAB_DOMU_INITRD"])
    sh(XL, "create", "-p", str(cfg), timeout=120)
    domid = int(sh(XL, "domid", NAME).strip())
    timings["xl create -p"] = time.monotonic() - t0
    blkback = Backend.start("blkback", ["blkback", "--image", str(image), "--frontend", str(domid)])
    netback = Backend.start("netback", ["netback", "--frontend", str(domid), "--tap", TAP])
    console = None
    try:
        sh(XL, "unpause", str(domid))
        tty_path = None
        while tty_path is None:
            tty_path = xenstore_read(f"/local/domain/{domid}/console/tty")
            if tty_path is None:
                if time.monotonic() > until:
                    raise DomuError(f"no console tty for domain {domid}")
                time.sleep(0.2)
        console = Console(tty_path, RESULTS / "domu-console-driver.log")
        console.sync(max(until - time.monotonic(), 1.0))
        timings["domU shell"] = time.monotonic() - t0
        blkback.wait_ready(until)
        netback.wait_ready(until)
        timings["backends READY"] = time.monotonic() - t0
        sh("sysctl", "-q", f"net.ipv6.conf.{TAP}.disable_ipv6=1")  # a quiet link
        sh("ip", "addr", "add", f"{DOM0_IP}/24", "dev", TAP)
        sh("ip", "link", "set", TAP, "up")
    except BaseException:
        if console is not None:
            console.close()
        sh(XL, "destroy", str(domid), check=False)
        blkback.stop(10)
        netback.stop(10)
        raise
    return Domu(domid, console, image, blkback, netback, timings, t0)


def _ring_indices(domid: int, refs: dict[str, int]) -> str:
    """req_prod/req_event/rsp_prod/rsp_event of the frontend's shared rings, mapped
    read-only through gntdev (a second mapping beside the backend's)."""
    import asyncio
    import struct

    from aioxen.platforms.xen import XenPlatform

    async def peek() -> str:
        lines = []
        async with XenPlatform() as plat:
            for name, ref in refs.items():
                try:
                    m = plat.grants.map(domid, [ref], writable=False)
                except OSError as exc:
                    lines.append(f"{name} (gref {ref}): not mapped: {exc}")
                    continue
                try:
                    rp, re_, sp, se = struct.unpack_from("<4I", m.buf)
                finally:
                    m.close()
                lines.append(f"{name} (gref {ref}): req_prod={rp} req_event={re_} "
                             f"rsp_prod={sp} rsp_event={se}")  # fmt: skip
        return "\n".join(lines)

    return asyncio.run(peek())


def diagnose(d: Domu) -> str:
    """What the domU, dom0 and the shared rings look like now (for post-mortems)."""
    parts: list[str] = [f"timings: {d.timings}"]
    for cmd in (
        "dmesg | tail -n 80",
        "cat /proc/net/dev",
        "cat /sys/block/xvda/queue/write_cache /sys/block/xvda/inflight",
        "grep -i xen /proc/interrupts",
    ):
        try:
            parts.append(f"domU$ {cmd}\n{d.console.run(cmd, timeout=20, check=False)}")
        except (DomuError, OSError) as exc:
            parts.append(f"domU$ {cmd}\n{exc}")
    for argv in (
        ["ip", "-s", "link", "show", TAP],
        ["xenstore-ls", "-f", "/local/domain/0/backend"],
        ["xenstore-ls", "-f", f"/local/domain/{d.domid}/device"],
    ):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        parts.append(f"dom0$ {' '.join(argv)}\n{out.stdout}{out.stderr}")
    refs = {}
    for key in ("tx-ring-ref", "rx-ring-ref"):
        v = xenstore_read(f"/local/domain/{d.domid}/device/vif/0/{key}")
        if v and v.isdigit():
            refs[f"vif {key}"] = int(v)
    v = xenstore_read(f"/local/domain/{d.domid}/device/vbd/51712/ring-ref")
    if v and v.isdigit():
        refs["vbd ring-ref"] = int(v)
    try:
        parts.append(_ring_indices(d.domid, refs))
    except Exception as exc:  # diagnostics only
        parts.append(f"rings: {exc!r}")
    for b in (d.blkback, d.netback):
        parts.append(f"{b.name} (exit {b.proc.poll()}):\n{b.output()[-3000:]}")
    return "\n\n".join(parts)
