"""dom0's side of the peer domU: a PV guest running the host's Python and aioxen.

Theory of operation
-------------------
:func:`start_peer` creates the domain with ``xl create`` from the kernel of the lab's
image and ``$XENLAB_PEER_INITRD`` (:func:`xenlab.lab.build_peer_initrd`: busybox, the
``evtchn``/``gntdev``/``gntalloc`` modules, the host's interpreter and stdlib, uvloop,
cffi's backend and this tree's ``aioxen``, all at the host's own paths).  It has no
devices: everything it needs is in its initramfs, and aioxen reaches XenStore through
the kernel's ``/dev/xen/xenbus`` like any guest program.

Its console is the command channel (:class:`domu.Console`, a shell on ``hvc0``).
:meth:`Peer.run` runs ``python -S -m peer ACTION ...`` (``tests/xenlab/guest/peer.py``)
in the foreground and returns its output; :meth:`Peer.spawn` starts one in the
background with its output in a file of the domU, which :class:`Spawned` polls and can
``kill -9``.  Both are blocking (the console is a pty read with ``select``); async tests
call them through ``asyncio.to_thread`` so dom0's own aioxen keeps running meanwhile.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from domu import RESULTS, XL, Console, DomuError, sh, xenstore_read

NAME = "aioxen-peer"
MEMORY_MB = 384  # the initramfs (~65 MB unpacked) lives in RAM
_spawn_ids = itertools.count(1)


def _xl_config(path: Path, ramdisk: Path) -> None:
    path.write_text(
        f'name = "{NAME}"\n'
        'type = "pv"\n'
        f'kernel = "{os.environ["XENLAB_DOMU_KERNEL"]}"\n'
        f'ramdisk = "{ramdisk}"\n'
        'extra = "console=hvc0 quiet loglevel=1 xenlab.watchdog=900"\n'
        f"memory = {MEMORY_MB}\n"
        "vcpus = 1\n"
        'on_crash = "preserve"\n'
    )


@dataclass
class Spawned:
    """A background ``peer`` action in the domU."""

    peer: Peer
    pid: int
    out: str  # its output file in the domU

    def output(self) -> str:
        return self.peer.console.run(f"cat {self.out}", timeout=60, check=False)

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match[str]:
        """Poll the output until ``pattern`` matches (``DomuError`` if the process ended
        without it, or on timeout)."""
        until = time.monotonic() + timeout
        while True:
            text = self.peer.console.run(
                f"cat {self.out}; kill -0 {self.pid} 2>/dev/null || echo '@@ended@@'",
                timeout=60, check=False,
            )  # fmt: skip
            m = re.search(pattern, text, re.MULTILINE)
            if m:
                return m
            if "@@ended@@" in text or time.monotonic() > until:
                raise DomuError(f"peer pid {self.pid}: no {pattern!r}; output:\n{text}")
            time.sleep(0.3)

    def kill9(self) -> None:
        self.peer.console.run(f"kill -9 {self.pid}")

    def kill9_if_alive(self) -> None:
        """Clean-up: kill -9 the process if it still runs (no error if it just ended --
        checking ``alive()`` first races with a process on its way out)."""
        self.peer.console.run(f"kill -9 {self.pid} 2>/dev/null; true", check=False)

    def alive(self) -> bool:
        return self.peer.console.run(f"kill -0 {self.pid} 2>/dev/null && echo alive",
                                     check=False).strip() == "alive"  # fmt: skip


@dataclass
class Peer:
    domid: int
    console: Console
    python: str
    pythonpath: str
    timings: dict[str, float] = field(default_factory=dict)

    def python_command(self, env: str = "") -> str:
        """``env ... python -S``: the host's interpreter in the domU, the tree importable."""
        base = f"PYTHONPATH={self.pythonpath} PYTHONDONTWRITEBYTECODE=1 AIOXEN_PLATFORM=xen"
        return f"env {base} {env} {self.python} -S"

    def command(self, loop: str, action: str, *args: object) -> str:
        argv = " ".join(shlex.quote(str(a)) for a in (loop, action, *args))
        return f"{self.python_command()} -m peer {argv}"

    def run(self, loop: str, action: str, *args: object, timeout: float = 300.0) -> str:
        """Run an action in the foreground; its output (``DomuError`` if it failed)."""
        return self.console.run(self.command(loop, action, *args), timeout=timeout)

    def spawn(self, loop: str, action: str, *args: object) -> Spawned:
        """Start an action in the background, from a subshell: the process is init's
        child, not the console shell's (busybox ash on hvc0 exited, to be restarted by
        ``domu-init``, whenever one of its own background jobs ended)."""
        out = f"/tmp/peer-{next(_spawn_ids)}.out"
        pid = self.console.run(f"( {self.command(loop, action, *args)} >{out} 2>&1 & echo $! )")
        return Spawned(self, int(pid.strip()), out)

    def destroy(self) -> None:
        sh(XL, "destroy", str(self.domid), check=False)


def start_peer(timeout: float = 300.0) -> Peer:
    """Create the peer domU and wait for its shell."""
    t0 = time.monotonic()
    # A copy in dom0's tmpfs first: libxenguest mmaps the ramdisk, and over the results
    # share (9p, no cache) that reads page by page -- ~60 s for 85 MB under TCG.
    ramdisk = Path("/tmp/xenlab-peer-initrd.cpio")
    shutil.copyfile(os.environ["XENLAB_PEER_INITRD"], ramdisk)
    timings = {"initrd copied": time.monotonic() - t0}
    cfg = Path("/tmp/xenlab-peer.cfg")
    _xl_config(cfg, ramdisk)
    try:
        sh(XL, "create", str(cfg), timeout=180)
    finally:
        ramdisk.unlink()
    domid = int(sh(XL, "domid", NAME).strip())
    timings["xl create"] = time.monotonic() - t0
    try:
        tty_path = None
        while tty_path is None:
            tty_path = xenstore_read(f"/local/domain/{domid}/console/tty")
            if tty_path is None:
                if time.monotonic() > t0 + timeout:
                    raise DomuError(f"no console tty for domain {domid}")
                time.sleep(0.2)
        console = Console(tty_path, RESULTS / "peer-console-driver.log")
        console.sync(max(t0 + timeout - time.monotonic(), 1.0))
        timings["shell"] = time.monotonic() - t0
        (RESULTS / "peer-timings.txt").write_text(
            "".join(f"{k}: {v:.1f}s\n" for k, v in timings.items())
        )
    except BaseException:
        sh(XL, "destroy", str(domid), check=False)
        raise
    return Peer(
        domid, console, os.environ["XENLAB_PEER_PYTHON"], os.environ["XENLAB_PEER_PYTHONPATH"],
        timings,
    )  # fmt: skip
