"""aioxen's front ends in a real domU against aioxen's back ends in dom0: block, network
and the PV console across real domains.

One peer domU serves the module (:mod:`peerdomu`, as in ``test_crossdomain.py``).  For
each device, dom0 runs the toolstack step for the peer's domid (``aioxen.xenbus.toolstack``
/ ``aioxen.console.create_console`` / ``Netback.add``: both XenStore directories, xl's keys
and permissions) and serves the back end on its ``xen`` platform (the ``plat`` fixture);
the domU opens the front end as ``python -m peer_devices ACTION`` (:mod:`peer_devices`),
on the same kind of event loop as the test.  The domU reaches XenStore only through
``/dev/xen/xenbus`` with a guest's permissions; its rings and data pages are its own
grants, mapped by dom0, and the event channels are interdomain ports.

* Block: dom0's blkback serves a 4 MiB image file of pseudo-random bytes; the domU's
  blkfront reads the whole device (its SHA-256 is the image's), writes sectors that dom0
  then finds in the file, flushes; a read-only device is refused a write by blkfront and,
  for a raw write request, by blkback.
* Network: dom0's netback (a callback as its port) and the domU's netfront transport
  exchange frames of 60 to 9014 bytes (multi-slot) both ways, each checked byte for byte.
* Console: the domU is the guest side of ``console/N`` and dom0 its back end; 64 KiB +
  a few bytes go each way, checked, and the guest's close is EOF in dom0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shlex
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from crossdomain import field, loop_name, sha
from peer import stream
from peer_devices import DOM0_MAC, ETHERTYPE, NET_SIZES, net_frame
from peerdomu import Peer, Spawned

from aioxen.blk.source import FileSource
from aioxen.blk.vbd import Blkback
from aioxen.console import ConsoleBackend, create_console, remove_console
from aioxen.net import FrameInfo, Netback, Vif
from aioxen.net.tap import TapDevice, TapPort
from aioxen.net.tap_glue import attach_tap_to_vif
from aioxen.platforms.xen import XenPlatform
from aioxen.xenbus.toolstack import add_device, remove_device

HANG = 180.0  # hang guard only: the domU's Python under TCG is slow to start
MIB = 1 << 20
SECTOR = 512
IMAGE_BYTES = 4 * MIB
WRITE_SECTOR = 2049  # not page aligned
WRITE_BYTES = 256 * 1024 + 3 * SECTOR  # crosses pages and request boundaries
_ids = itertools.count()
VBD_IDS = itertools.count(51728, 16)  # xvdb, xvdc, ...: a fresh device per test
VIF_IDS = itertools.count(1)
CONSOLE_IDS = itertools.count(1)


def domu_command(peer: Peer, loop: str, action: str, *args: object) -> str:
    argv = " ".join(shlex.quote(str(a)) for a in (loop, action, *args))
    return f"{peer.python_command()} -m peer_devices {argv}"


async def in_domu(peer: Peer, action: str, *args: object, timeout: float = 300.0) -> str:
    """Run a ``peer_devices`` action in the domU (foreground) while dom0's loop runs."""
    cmd = domu_command(peer, loop_name(), action, *args)
    return await asyncio.to_thread(peer.console.run, cmd, timeout)


async def spawn(peer: Peer, action: str, *args: object) -> Spawned:
    """Start a ``peer_devices`` action in the background (see :meth:`Peer.spawn`)."""
    out = f"/tmp/peer-devices-{next(_ids)}.out"
    cmd = domu_command(peer, loop_name(), action, *args)
    pid = await asyncio.to_thread(peer.console.run, f"( {cmd} >{out} 2>&1 & echo $! )")
    return Spawned(peer, int(pid.strip()), out)


# --------------------------------------------------------------------------- block


@contextlib.asynccontextmanager
async def served_vbd(
    plat: XenPlatform, peer: Peer, image: Path, *, readonly: bool
) -> AsyncIterator[int]:
    """vbd N of the peer: created by the toolstack step in dom0 (xl's keys, as
    ``aioxen blkback`` writes them), served by dom0's blkback from ``image``."""
    modules = Path("/proc/modules").read_text()
    assert "xen_blkback" not in modules, "Linux's blkback would take the device from aioxen's"
    devid = next(VBD_IDS)
    source = FileSource(image, readonly=readonly)
    await add_device(
        plat.store, "vbd", peer.domid, plat.domid, devid,
        backend_keys={"mode": "r" if readonly else "w", "type": "aioxen", "params": str(image)},
        frontend_keys={"virtual-device": str(devid), "device-type": "disk"},
    )  # fmt: skip
    bk = Blkback(source, peer.domid, devid, platform=plat)
    task = asyncio.ensure_future(bk.run())
    try:
        yield devid
        assert not task.done(), f"blkback stopped: {task}"
    finally:
        await bk.close(timeout=30)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(FileNotFoundError):
            await remove_device(plat.store, "vbd", peer.domid, plat.domid, devid, force=True)
        await source.close()


async def test_blk_domu_reads_and_writes_a_dom0_image(
    plat: XenPlatform, peer: Peer, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    original = stream(11, IMAGE_BYTES)
    image.write_bytes(original)
    async with served_vbd(plat, peer, image, readonly=False) as devid:
        out = await in_domu(peer, "blk", devid, 12, WRITE_SECTOR, WRITE_BYTES)
        data = image.read_bytes()  # what the domU wrote, seen in dom0's file
    assert field(out, "size") == str(IMAGE_BYTES)
    assert field(out, "readonly") == "False"
    assert field(out, "sha256") == sha(original), "the domU read other bytes than the image"
    assert field(out, "write") == "done" and field(out, "flush") == "True"
    assert field(out, "readback") == "True"
    at = WRITE_SECTOR * SECTOR
    assert data[at : at + WRITE_BYTES] == stream(12, WRITE_BYTES)
    assert data[:at] == original[:at] and data[at + WRITE_BYTES :] == original[at + WRITE_BYTES :]


async def test_blk_readonly_device_refuses_writes_from_domu(
    plat: XenPlatform, peer: Peer, tmp_path: Path
) -> None:
    image = tmp_path / "ro.img"
    original = stream(13, IMAGE_BYTES)
    image.write_bytes(original)
    image.chmod(0o444)
    async with served_vbd(plat, peer, image, readonly=True) as devid:
        out = await in_domu(peer, "blk", devid, 14, WRITE_SECTOR, WRITE_BYTES)
    assert field(out, "readonly") == "True"
    assert field(out, "sha256") == sha(original)
    assert field(out, "write") == "refused:PermissionError"  # blkfront's own check
    assert field(out, "backend") == "refused:BlkError:EIO"  # blkback's, across domains
    assert image.read_bytes() == original


async def test_blk_killed_domu_frontend_then_a_new_one_connects(
    plat: XenPlatform, peer: Peer, tmp_path: Path
) -> None:
    """kill -9 of the domU's blkfront with reads in flight: nothing on real Xen tells
    dom0 (the domU's XenStore state stays Connected, its claim is judged in the domU);
    the next blkfront in the domU takes the device over (Initialising), blkback resets,
    unmaps the dead one's rings and pages and serves the new one."""
    image = tmp_path / "disk.img"
    original = stream(15, IMAGE_BYTES)
    image.write_bytes(original)
    async with served_vbd(plat, peer, image, readonly=False) as devid:
        proc = await spawn(peer, "blk-hold", devid)
        await asyncio.to_thread(proc.wait_for, "^READY", HANG)
        await asyncio.to_thread(proc.kill9)
        out = await in_domu(peer, "blk", devid, 16, WRITE_SECTOR, WRITE_BYTES)
        data = image.read_bytes()
    assert field(out, "sha256") == sha(original)
    assert field(out, "write") == "done" and field(out, "readback") == "True"
    at = WRITE_SECTOR * SECTOR
    assert data[at : at + WRITE_BYTES] == stream(16, WRITE_BYTES)


# --------------------------------------------------------------------------- network

ECHO_FRAMES = 3 * len(NET_SIZES)  # dom0 -> domU -> dom0
DOMU_FRAMES = 3 * len(NET_SIZES)  # domU -> dom0
ECHO_MAC = b"\xfe\xee\xee\xee\xee\x01"  # dom0's source address for frames to be echoed
PACKET_OUTGOING = 4  # sockaddr_ll pkttype of a frame this host sent
WINDOW = 8  # dom0's frames in flight: well below the domU's posted RX buffers


async def check_net_exchange(
    proc: Spawned,
    sent: list[bytes],
    echoes: list[bytes],
    own: dict[int, bytes],
    seed: int,
    mac: bytes,
) -> None:
    """Byte for byte: each frame dom0 sent came back with its MACs swapped, the domU's
    own frames (``stream(seed)``) all arrived, and the domU's ``RESULT`` line has the
    SHA-256 of what it echoed."""
    for i, (s, e) in enumerate(zip(sent, echoes, strict=True)):
        assert e == s[6:12] + s[0:6] + s[12:], f"echo {i} ({len(s)} bytes) differs"
    assert sorted(own) == list(range(DOMU_FRAMES))
    for i, f in own.items():
        assert f == net_frame(seed, i, mac, DOM0_MAC), f"domU frame {i} ({len(f)} bytes) differs"
    done = await asyncio.to_thread(proc.wait_for, r"^RESULT echoed=(\d+) sha256=(\S+)", HANG)
    assert done.group(2) == sha(b"".join(sent))


async def test_net_frames_both_ways(plat: XenPlatform, peer: Peer) -> None:
    assert "xen_netback" not in Path("/proc/modules").read_text(), "it would take the vif"
    devid = next(VIF_IDS)
    from_domu: asyncio.Queue[bytes] = asyncio.Queue()
    vifs: asyncio.Queue[Vif] = asyncio.Queue()

    def deliver(frame: bytes, info: FrameInfo) -> None:
        from_domu.put_nowait(bytes(frame))

    def connect(vif: Vif) -> Callable[[bytes, FrameInfo], None]:
        vifs.put_nowait(vif)
        return deliver

    netback = Netback(plat, connect=connect)
    await netback.add(peer.domid, devid, mtu=9000)  # the toolstack step, then serve
    try:
        proc = await spawn(peer, "net", devid, 21, DOMU_FRAMES, ECHO_FRAMES)
        m = await asyncio.to_thread(proc.wait_for, r"^READY mac=(\S+)", HANG)
        vif = await asyncio.wait_for(vifs.get(), HANG)
        mac = bytes.fromhex(m.group(1).replace(":", ""))
        sent: list[bytes] = []
        own: dict[int, bytes] = {}
        echoes: list[bytes] = []

        def take(frame: bytes) -> None:
            if frame[:6] == DOM0_MAC:  # the domU's own frames (peer_devices.act_net)
                own[int.from_bytes(frame[14:18], "big")] = frame
            else:  # echoes of ours, to ECHO_MAC
                echoes.append(frame)

        async with asyncio.timeout(HANG):
            while len(echoes) < ECHO_FRAMES or len(own) < DOMU_FRAMES:
                if len(sent) < ECHO_FRAMES and len(sent) - len(echoes) < WINDOW:
                    frame = net_frame(22, len(sent), ECHO_MAC, mac)
                    assert vif.send(frame), f"netback dropped frame {len(sent)}"
                    sent.append(frame)
                    continue
                take(await from_domu.get())
        # byte for byte, in order: what dom0 sent came back with the MACs swapped
        assert [len(f) for f in echoes] == [len(f) for f in sent]
        await check_net_exchange(proc, sent, echoes, own, 21, mac)
        assert max(map(len, sent)) == 9014
    finally:
        await netback.close(remove=True)


async def test_net_through_a_dom0_tap(plat: XenPlatform, peer: Peer) -> None:
    """netback cross-connected to a TAP in dom0 (as ``aioxen netback --tap``): the same
    exchange, with dom0's end an ``AF_PACKET`` socket on the TAP, so every frame passes
    dom0's kernel."""
    devid = next(VIF_IDS)
    name = f"aioxd{peer.domid}v{devid}"
    tap = TapDevice(name)
    ports: list[TapPort] = []

    def connect(vif: Vif) -> Callable[[bytes, FrameInfo], None]:
        ports.append(attach_tap_to_vif(vif, tap))
        return tap.write_frame

    def disconnect(vif: Vif) -> None:
        for port in ports:
            port.pause_reading()

    netback = Netback(plat, connect=connect, disconnect=disconnect)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    loop = asyncio.get_running_loop()
    try:
        for cmd in (["sysctl", "-q", f"net.ipv6.conf.{name}.disable_ipv6=1"],  # a quiet link
                    ["ip", "link", "set", name, "mtu", "9000", "up"]):  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        sock.bind((name, ETHERTYPE))
        sock.setblocking(False)
        from_domu: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            while True:
                try:
                    frame, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    return
                if addr[2] != PACKET_OUTGOING:  # not our own sends
                    from_domu.put_nowait(frame)

        loop.add_reader(sock.fileno(), readable)
        await netback.add(peer.domid, devid, mtu=9000)
        proc = await spawn(peer, "net", devid, 23, DOMU_FRAMES, ECHO_FRAMES)
        m = await asyncio.to_thread(proc.wait_for, r"^READY mac=(\S+)", HANG)
        mac = bytes.fromhex(m.group(1).replace(":", ""))
        sent: list[bytes] = []
        own: dict[int, bytes] = {}
        echoes: list[bytes] = []
        async with asyncio.timeout(HANG):
            while len(echoes) < ECHO_FRAMES or len(own) < DOMU_FRAMES:
                if len(sent) < ECHO_FRAMES and len(sent) - len(echoes) < WINDOW:
                    frame = net_frame(24, len(sent), ECHO_MAC, mac)
                    sock.send(frame)
                    sent.append(frame)
                    continue
                frame = await from_domu.get()
                if frame[:6] == DOM0_MAC:
                    own[int.from_bytes(frame[14:18], "big")] = frame
                elif frame[:6] == ECHO_MAC:
                    echoes.append(frame)
        await check_net_exchange(proc, sent, echoes, own, 23, mac)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
        await netback.close(remove=True)
        tap.close()


# --------------------------------------------------------------------------- console

TO_GUEST = 64 * 1024 + 5
FROM_GUEST = 64 * 1024 + 7


@contextlib.asynccontextmanager
async def console_backend(
    plat: XenPlatform, peer: Peer, *, autoprobe: bool
) -> AsyncIterator[tuple[int, ConsoleBackend]]:
    """A fresh ``console/N`` of the peer (the toolstack step) served by dom0's back end:
    ``(N, back end)``.  ``autoprobe`` is the domU's ``/sys/bus/xen/drivers_autoprobe``
    meanwhile: off keeps Linux's ``hvc_xen`` away from the device, on lets it bind.
    Afterwards the back end is closed, the device removed and autoprobe back on (the
    kernel's default)."""
    devid = next(CONSOLE_IDS)
    flag = "/sys/bus/xen/drivers_autoprobe"
    await asyncio.to_thread(peer.console.run, f"echo {int(autoprobe)} > {flag}")
    try:
        await create_console(peer.domid, devid, platform=plat, replace=True)
        be = await ConsoleBackend.start(peer.domid, devid, platform=plat)
        try:
            yield devid, be
        finally:
            await be.close(timeout=30)
            await remove_console(peer.domid, devid, platform=plat, force=True)
    finally:
        await asyncio.to_thread(peer.console.run, f"echo 1 > {flag}")


async def test_console_domu_guest_side_against_dom0_back_end(plat: XenPlatform, peer: Peer) -> None:
    """aioxen's console front end in the domU, its back end in dom0.  Linux's own
    ``hvc_xen`` front end (built into the kernel) would take any ``console/N`` (N > 0)
    that appears for the domU, so the xen bus's driver autoprobe is off meanwhile."""
    async with console_backend(plat, peer, autoprobe=False) as (devid, be):
        proc = await spawn(peer, "console", devid, 31, TO_GUEST, 32, FROM_GUEST)
        reader, writer = await be.accept(timeout=HANG)
        writer.write(stream(31, TO_GUEST))
        got = await asyncio.wait_for(reader.readexactly(FROM_GUEST), HANG)
        await asyncio.wait_for(writer.drain(), HANG)
        assert got == stream(32, FROM_GUEST)
        done = await asyncio.to_thread(proc.wait_for, r"^RESULT received=(\d+) match=(\S+)", HANG)
        assert done.groups() == (str(TO_GUEST), "True")
        assert await asyncio.wait_for(reader.read(), HANG) == b""  # the guest closed


async def test_console_cli_frontend_in_domu(plat: XenPlatform, peer: Peer) -> None:
    """``aioxen console --frontend 0`` in the domU, stdin and stdout regular files, with
    dom0's back end: the guest's stdin reaches dom0, dom0's bytes reach its stdout, and
    the back end's close ends the command (exit 0)."""
    n = next(_ids)
    src, dst, err = f"/tmp/cons-in-{n}", f"/tmp/cons-out-{n}", f"/tmp/cons-err-{n}"
    await in_domu(peer, "write-file", src, 33, FROM_GUEST)
    async with console_backend(plat, peer, autoprobe=False) as (devid, be):
        cli = f"{peer.python_command()} -m aioxen console --frontend 0 --devid {devid}"
        line = f"( {cli} --timeout 120 <{src} >{dst} 2>{err}; echo rc=$? >>{err} ) & echo $!"
        pid = int((await asyncio.to_thread(peer.console.run, f"( {line} )")).strip())
        proc = Spawned(peer, pid, err)
        reader, writer = await be.accept(timeout=HANG)
        writer.write(stream(34, TO_GUEST))
        got = await asyncio.wait_for(reader.readexactly(FROM_GUEST), HANG)
        assert got == stream(33, FROM_GUEST)
        await asyncio.wait_for(writer.drain(), HANG)
        size = f"wc -c <{dst}"
        async with asyncio.timeout(HANG):  # until the guest's stdout has it all
            while int(await asyncio.to_thread(peer.console.run, size)) < TO_GUEST:
                await asyncio.sleep(0.5)
        await be.close(timeout=30)  # the console ends: the command exits
        m = await asyncio.to_thread(proc.wait_for, r"^rc=(\d+)", HANG)
        assert m.group(1) == "0", proc.output()
        digest = await asyncio.to_thread(peer.console.run, f"sha256sum {dst}")
        assert digest.split()[0] == sha(stream(34, TO_GUEST))


async def test_console_frontend_refuses_the_kernels_hvc_xen(plat: XenPlatform, peer: Peer) -> None:
    """With the xen bus's driver autoprobe on (the kernel's default), Linux's ``hvc_xen``
    (xenbus driver ``xenconsole``) binds a ``console/N`` that appears for the domU and
    connects to dom0's back end.  aioxen's front end then refuses the device with EBUSY
    naming the driver, the module and the unbind file (from sysfs), and touches nothing;
    ``aioxen console --frontend`` prints that and exits 1.  After the unbind the kernel
    leaves the device ``Closed`` and aioxen's front end connects to the same back end."""
    async with console_backend(plat, peer, autoprobe=True) as (devid, be):
        name = f"console-{devid}"
        state = f"/local/domain/{peer.domid}/device/console/{devid}/state"
        kernel_reader, _ = await be.accept(timeout=HANG)  # hvc_xen's ring, mapped by dom0
        wait_bound = (
            f"for i in $(seq 600); do readlink /sys/bus/xen/devices/{name}/driver && break;"
            " sleep 0.1; done"
        )
        link = await asyncio.to_thread(peer.console.run, wait_bound, HANG)
        assert link.strip().endswith("/xenconsole"), link
        assert await plat.store.read(state) == b"4"  # the kernel's front end: Connected

        out = await in_domu(peer, "console-open", devid)
        assert field(out, "errno") == "EBUSY", out
        assert field(out, "type") == "FrontendInUse", out
        assert (field(out, "driver"), field(out, "module")) == ("xenconsole", "hvc_xen"), out
        msg = next(ln for ln in out.splitlines() if ln.startswith("MESSAGE "))
        busy = f"console/{devid} of domain {peer.domid} is in use by the kernel driver"
        assert f"{busy} xenconsole (hvc_xen): /sys/bus/xen/devices/{name}/driver" in msg, msg
        assert f"echo {name} > /sys/bus/xen/drivers/xenconsole/unbind" in msg, msg
        cli = f"{peer.python_command()} -m aioxen console --frontend 0 --devid {devid}"
        got = await asyncio.to_thread(
            peer.console.run, f"{cli} --timeout 60 </dev/null 2>&1; echo rc=$?", HANG, False
        )
        assert got.strip().endswith("rc=1"), got
        assert f"aioxen console: {busy} xenconsole (hvc_xen)" in got, got
        assert "Traceback" not in got, got
        assert await plat.store.read(state) == b"4"  # still the kernel's

        unbind = f"echo {name} > /sys/bus/xen/drivers/xenconsole/unbind"
        await asyncio.to_thread(peer.console.run, unbind)
        await asyncio.wait_for(kernel_reader.read(), HANG)  # the kernel's session ends
        proc = await spawn(peer, "console", devid, 41, 1000, 42, 2000)
        reader, writer = await be.accept(timeout=HANG)
        writer.write(stream(41, 1000))
        assert await asyncio.wait_for(reader.readexactly(2000), HANG) == stream(42, 2000)
        done = await asyncio.to_thread(proc.wait_for, r"^RESULT received=(\d+) match=(\w+)", HANG)
        assert done.groups() == ("1000", "True"), proc.output()
        assert await asyncio.wait_for(reader.read(), HANG) == b""  # the guest closed
