"""Linux's own ``xen-blkback`` and ``xen-netback`` in the Xen lab's dom0, serving devices
whose front end is dom0 itself (aioxen's blkfront and netfront).

Theory of operation
-------------------
Xen lets a domain map its own grants and bind an interdomain event channel to itself, and
Linux lets dom0 attach its own backends (what ``xl block-attach 0`` does).  So one dom0
holds both ends: :class:`LinuxBackends` loads the two kernel modules (``modprobe`` from
the host root that dom0 is chrooted into, whose ``/lib/modules`` is the running kernel's)
and unloads them again, and :func:`add_vbd` / :func:`add_vif` play the toolstack with
:func:`aioxen.xenbus.toolstack.add_device`: both XenStore directories with front end
domain 0 and back end domain 0, plus the keys a hotplug script would write
(``physical-device`` for blkback, ``hotplug-status`` for netback).

While the modules are loaded, Linux's xenbus backend bus hands *every* ``backend/vbd``
and ``backend/vif`` directory of dom0 to them, including the ones aioxen's own backends
serve in ``test_domu.py``.  So loading refuses to start while such devices exist, and
unloading removes every device created here first, then ``rmmod``s both modules.
Linux's ``xen-blkfront``/``xen-netfront`` must not be loaded in dom0: they would claim
the front end directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import os
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aioxen.xenbus.toolstack import add_device, remove_device

RESULTS = Path("/tmp/xenlab-results")
BACKENDS = ("xen_blkback", "xen_netback")  # names as /proc/modules spells them
FRONTENDS = ("xen_blkfront", "xen_netfront")
SYSFS_BACKEND = Path("/sys/bus/xen-backend/devices")
MIB = 1 << 20


class LabError(AssertionError):
    """A dom0 command or a Linux backend misbehaved (reported as a test failure)."""


def sh(*cmd: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run a dom0 command; its stdout (``LabError`` with its output if it fails)."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise LabError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return out.stdout


def loaded_modules() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}


def dmesg(lines: int = 40) -> str:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    return "\n".join(out.splitlines()[-lines:])


def xenstore_ls(path: str) -> str:
    out = subprocess.run(["xenstore-ls", "-f", path], capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


def diagnosis(*paths: str) -> str:
    """XenStore under ``paths`` and the end of dmesg (for failure messages)."""
    parts = [f"--- xenstore {p}\n{xenstore_ls(p)}" for p in paths]
    parts.append(f"--- dmesg\n{dmesg()}")
    return "\n".join(parts)


def log(text: str) -> None:
    """Append to the run's ``linux-backends.log`` (the results share)."""
    with contextlib.suppress(OSError), open(RESULTS / "linux-backends.log", "a") as f:
        f.write(f"[{time.monotonic():10.3f}] {text}\n")


class HangReporter:
    """If a test runs longer than ``after`` seconds, write what dom0 is doing to the
    results share: Python's stacks (faulthandler, which needs no GIL), every task's
    kernel stack in D state, and dmesg.  A kernel-side hang cannot be interrupted, so
    this is the only way to see it."""

    def __init__(self, name: str, after: float = 100.0) -> None:
        self.name = name
        self.after = after
        self._done = threading.Event()
        # two files: appends to one file from two writers get lost on the 9p share
        self._file = open(RESULTS / "linux-backends-hang.txt", "w")  # noqa: SIM115
        self._pyfile = open(RESULTS / "linux-backends-hang-python.txt", "w")  # noqa: SIM115
        faulthandler.dump_traceback_later(after, file=self._pyfile)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        if self._done.wait(self.after + 1):
            return
        out = [f"=== {self.name} still running after {self.after:.0f} s"]
        for stat_file in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat_file.read_text().split(") ")[-1].split()
                if fields[0] == "D" or str(os.getpid()) in stat_file.parts[2]:
                    task = stat_file.parent
                    comm = (task / "comm").read_text().strip()
                    out.append(
                        f"--- {task} {comm} state {fields[0]}\n{(task / 'stack').read_text()}"
                    )
        if self._loop is not None:  # where each task awaits (racy, but only a diagnosis)
            with contextlib.suppress(Exception):
                for t in list(asyncio.all_tasks(self._loop)):
                    buf = io.StringIO()
                    t.print_stack(file=buf)
                    out.append(f"--- task {t.get_name()}\n{buf.getvalue()}")
        out.append(f"--- dmesg\n{dmesg(120)}")
        self._file.write("\n".join(out) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._done.set()
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        self._pyfile.close()


def backend_devices(type_: str) -> list[str]:
    """dom0's ``backend/<type_>`` entries as ``<frontend domid>/<devid>``."""
    out = subprocess.run(
        ["xenstore-list", f"/local/domain/0/backend/{type_}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    found = []
    for fe in out.stdout.split():
        sub = subprocess.run(
            ["xenstore-list", f"/local/domain/0/backend/{type_}/{fe}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        found += [f"{fe}/{n}" for n in sub.stdout.split()]
    return found


class LinuxBackends:
    """Load ``xen-blkback``/``xen-netback`` (and ``loop``) for the module; unload them."""

    def __init__(self) -> None:
        self.loaded_loop = False

    def load(self) -> None:
        mods = loaded_modules()
        front = sorted(m for m in FRONTENDS if m in mods)
        assert not front, f"Linux frontends loaded in dom0 (they would claim our devices): {front}"
        stale = sorted(m for m in BACKENDS if m in mods)
        assert not stale, f"Linux backends already loaded in dom0: {stale}"
        others = {t: backend_devices(t) for t in ("vbd", "vif")}
        assert not any(others.values()), (
            f"dom0 serves other devices (test_domu's?), which Linux's backends would claim: "
            f"{others}"
        )
        self.loaded_loop = "loop" not in mods
        try:
            sh("modprobe", "loop")
            sh("modprobe", "xen-blkback")
            sh("modprobe", "xen-netback")
            mods = loaded_modules()
            assert all(m in mods for m in BACKENDS), f"modprobe did not load {BACKENDS}"
        except BaseException:  # no device exists yet: just unload what did load
            for mod in ("xen-netback", "xen-blkback"):
                subprocess.run(["rmmod", mod], capture_output=True, timeout=30)
            raise
        log(f"loaded {BACKENDS}; loop was {'not ' if self.loaded_loop else ''}loaded before")

    def unload(self) -> list[str]:
        """Remove what is left, ``rmmod`` both backends; problems found (empty: clean)."""
        problems = []
        for type_ in ("vbd", "vif"):
            for entry in backend_devices(type_):
                fe, devid = entry.split("/")
                problems.append(f"backend/{type_}/{entry} was left over")
                subprocess.run(["xenstore-rm", f"/local/domain/0/backend/{type_}/{entry}"],
                               timeout=30)  # fmt: skip
                subprocess.run(["xenstore-rm", f"/local/domain/{fe}/device/{type_}/{devid}"],
                               timeout=30)  # fmt: skip
        deadline = time.monotonic() + 30
        while list_sysfs_backends() and time.monotonic() < deadline:
            time.sleep(0.1)
        if list_sysfs_backends():
            problems.append(f"Linux backend devices remain: {list_sysfs_backends()}")
        for mod in ("xen-netback", "xen-blkback"):
            for _ in range(100):  # a just-removed device may still hold a reference
                if mod.replace("-", "_") not in loaded_modules():
                    break
                if subprocess.run(["rmmod", mod], capture_output=True, timeout=30).returncode:
                    time.sleep(0.1)
        left = sorted(m for m in BACKENDS if m in loaded_modules())
        if left:
            problems.append(f"rmmod failed, still loaded: {left}")
        if self.loaded_loop:
            subprocess.run(["rmmod", "loop"], capture_output=True, timeout=30)
        log(f"unloaded; problems: {problems}")
        return problems


def list_sysfs_backends() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(p.name for p in SYSFS_BACKEND.iterdir())
    return []


async def wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate()`` until true (a hang guard: ``LabError`` after ``timeout``)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- block


@dataclass
class LoopDisk:
    """A file in dom0's tmpfs behind a loop device."""

    path: Path
    size: int
    device: str = ""
    major: int = 0
    minor: int = 0

    def attach(self) -> None:
        with open(self.path, "wb") as f:
            f.truncate(self.size)
        self.device = sh("losetup", "--find", "--show", str(self.path)).strip()
        rdev = os.stat(self.device).st_rdev
        assert stat.S_ISBLK(os.stat(self.device).st_mode), self.device
        self.major, self.minor = os.major(rdev), os.minor(rdev)

    @property
    def sysfs(self) -> Path:
        return Path("/sys/block") / Path(self.device).name

    def backing_file(self) -> str | None:
        try:
            return (self.sysfs / "loop" / "backing_file").read_text().strip()
        except FileNotFoundError:
            return None

    def detach(self) -> None:
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True, timeout=30)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def pread(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def pwrite(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)


def vbd_dirs(devid: int) -> tuple[str, str]:
    return (f"/local/domain/0/device/vbd/{devid}", f"/local/domain/0/backend/vbd/0/{devid}")


async def add_vbd(store: object, devid: int, disk: LoopDisk, *, mode: str = "w") -> None:
    """The toolstack's and the hotplug script's part of a vbd served by Linux blkback in
    dom0 to dom0: ``type=phy``, ``params`` and ``physical-device`` (``major:minor`` in
    hex, which blkback waits for)."""
    await add_device(
        store,  # type: ignore[arg-type]
        "vbd", 0, 0, devid,
        frontend_keys={"virtual-device": str(devid), "device-type": "disk"},
        backend_keys={
            "type": "phy", "mode": mode, "params": disk.device, "removable": "0",
            "bootable": "1", "dev": "xvdb", "device-type": "disk",
            "physical-device": f"{disk.major:x}:{disk.minor:x}",
            "physical-device-path": disk.device,
        },
    )  # fmt: skip


async def remove(store: object, type_: str, devid: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return await remove_device(store, type_, 0, 0, devid, timeout=10)  # type: ignore[arg-type]
    return True


# --------------------------------------------------------------------------- network


def vif_name(devid: int) -> str:
    return f"vif0.{devid}"


def vif_dirs(devid: int) -> tuple[str, str]:
    return (f"/local/domain/0/device/vif/{devid}", f"/local/domain/0/backend/vif/0/{devid}")


async def add_vif(store: object, devid: int, mac: str, mtu: int = 1500) -> None:
    """A vif served by Linux netback in dom0 to dom0.  ``hotplug-status=connected`` is
    what the hotplug script writes when the interface is set up; netback waits for it
    before it reports ``Connected``."""
    link = {"mac": mac, "mtu": str(mtu), "handle": str(devid)}
    await add_device(
        store,  # type: ignore[arg-type]
        "vif", 0, 0, devid,
        frontend_keys=link,
        backend_keys={**link, "type": "vif", "hotplug-status": "connected",
                      "script": "/bin/true"},
    )  # fmt: skip


def net_stat(ifname: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/{name}").read_text())


@dataclass
class Counters:
    values: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, ifname: str) -> Counters:
        names = ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "rx_errors",
                 "tx_errors")  # fmt: skip
        return cls({n: net_stat(ifname, n) for n in names})

    def delta(self, later: Counters) -> dict[str, int]:
        return {k: later.values[k] - v for k, v in self.values.items()}
