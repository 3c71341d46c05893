"""The PV console device: streams in one process on inheap and unix, and ``aioxen console``
between real processes (back end and guest), including a guest that is killed and comes
back (its stale ``Connected`` state is taken over: its owner record names a dead process),
and a front end that refuses a device another front end (a kernel driver) holds."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "xenbus"))

from support.unread_pipe import leftover, small_pipe
from support.xenstored import XenstoredProcess
from xenbus_world import World, world, xenstored_proc

from aioxen import ProtocolError
from aioxen.console.device import (
    ConsoleBackend,
    ConsoleFrontend,
    create_console,
    remove_console,
)
from aioxen.console.inuse import (
    FrontendInUse,
    check_frontend_free,
    kernel_driver,
    kernel_driver_error,
)
from aioxen.rings.byte import CONSOLE
from aioxen.xenbus import XenbusState, list_devices
from aioxen.xenbus.driver import frontend_device

__all__ = ["world", "xenstored_proc"]  # fixtures used by the tests below

S = XenbusState
T = 20  # hang guard (seconds)


async def pair(world: World, devid: int = 1) -> tuple[ConsoleBackend, ConsoleFrontend, int]:
    dom0 = await world.platform(0)
    guest = world.dom(1)
    await create_console(guest, devid, platform=dom0)
    be = await ConsoleBackend.start(guest, devid, platform=dom0)
    fe = await ConsoleFrontend.open(0, devid, platform=await world.platform(guest), timeout=T)
    return be, fe, guest


async def greet_and_close(be: ConsoleBackend, fe: ConsoleFrontend, line: bytes) -> None:
    """The back end's next connection is ``fe``'s: ``line`` typed into the guest arrives;
    then both ends close."""
    _reader, writer = await be.accept(timeout=T)
    writer.write(line)
    assert await asyncio.wait_for(fe.reader.readline(), T) == line
    await fe.close()
    await be.close()


async def test_both_directions_and_flow_control(world: World) -> None:
    be, fe, _guest = await pair(world)
    reader, writer = await be.accept(timeout=T)
    fe.writer.write(b"login: ")
    assert await asyncio.wait_for(reader.readexactly(7), T) == b"login: "
    writer.write(b"root\n")
    assert await asyncio.wait_for(fe.reader.readline(), T) == b"root\n"
    # far more than either ring holds, both ways at once: flow control, index wrap
    out = bytes(range(256)) * 1200  # 300 KiB guest -> host (2 KiB ring)
    inp = os.urandom(150_000)  # host -> guest (1 KiB ring)
    assert len(out) > 100 * CONSOLE.out.size and len(inp) > 100 * CONSOLE.in_.size

    async def send(w: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), 7000):
            w.write(data[i : i + 7000])
            await w.drain()

    got_out, got_in, _, _ = await asyncio.wait_for(
        asyncio.gather(
            reader.readexactly(len(out)), fe.reader.readexactly(len(inp)),
            send(fe.writer, out), send(writer, inp),
        ),
        T,
    )  # fmt: skip
    assert got_out == out and got_in == inp
    await fe.close()
    await be.close()


async def test_a_reader_that_does_not_read_holds_the_writer_back(world: World) -> None:
    be, fe, _guest = await pair(world)
    reader, _writer = await be.accept(timeout=T)
    data = os.urandom(400_000)
    fe.writer.write(data)
    for _ in range(200):  # let the transports move whatever can move
        await asyncio.sleep(0)
    transport = fe.writer.transport
    # At most the ring, one read chunk and the StreamReader's pause threshold got through.
    assert transport.get_write_buffer_size() >= len(data) - 2 * 65536 - 65536 - CONSOLE.out.size
    drain = asyncio.ensure_future(fe.writer.drain())
    for _ in range(50):
        await asyncio.sleep(0)
    assert not drain.done()  # paused: above the high-water mark
    assert await asyncio.wait_for(reader.readexactly(len(data)), T) == data
    await asyncio.wait_for(drain, T)
    assert transport.get_write_buffer_size() == 0
    await fe.close()
    await be.close()


async def test_guest_close_gives_eof_and_a_new_guest_reconnects(world: World) -> None:
    be, fe, guest = await pair(world)
    reader, _writer = await be.accept(timeout=T)
    fe.writer.write(b"bye")
    await fe.writer.drain()
    await fe.close()  # orderly xenbus close
    assert await asyncio.wait_for(reader.read(), T) == b"bye"  # drained, then EOF
    assert fe.runner.dev.state == S.CLOSED
    fe2 = await ConsoleFrontend.open(0, 1, platform=await world.platform(guest), timeout=T)
    await greet_and_close(be, fe2, b"welcome back\n")


async def test_back_end_close_gives_the_guest_eof(world: World) -> None:
    be, fe, _guest = await pair(world)
    _reader, writer = await be.accept(timeout=T)
    writer.write(b"shutting down\n")
    await writer.drain()
    await be.close()
    assert await asyncio.wait_for(fe.reader.read(), T) == b"shutting down\n"
    await fe.close()


async def test_toolstack_removal_while_connected(world: World) -> None:
    be, fe, guest = await pair(world)
    reader, _writer = await be.accept(timeout=T)
    dom0 = world.platforms[0]
    assert await remove_console(guest, 1, platform=dom0)
    assert await asyncio.wait_for(reader.read(), T) == b""
    assert await asyncio.wait_for(fe.reader.read(), T) == b""
    assert [d for d in await list_devices(dom0.store, guest) if d.type == "console"] == []
    await fe.close()
    await be.close()


async def test_scribbling_guest_gets_a_protocol_error_then_a_fresh_session(world: World) -> None:
    be, fe, _guest = await pair(world)
    reader, _writer = await be.accept(timeout=T)
    fe.writer.write(b"ok so far")
    assert await asyncio.wait_for(reader.readexactly(9), T) == b"ok so far"
    session = fe.driver._session
    assert session is not None and session.memory is not None and session.channel is not None
    page = session.memory.buf  # the guest's own view of the shared page
    page[CONSOLE.out.prod : CONSOLE.out.prod + 4] = (5000).to_bytes(4, "little")
    session.channel.notify()
    with pytest.raises(ProtocolError) as e:
        await asyncio.wait_for(reader.read(), T)
    assert e.value.field == "out_prod"
    # The back end dropped that session and offered a new one; the guest took it.
    reader2, writer2 = await be.accept(timeout=T)
    fe.reader, fe.writer = await fe.reconnected(timeout=T)
    writer2.write(b"fresh\n")
    assert await asyncio.wait_for(fe.reader.readline(), T) == b"fresh\n"
    fe.writer.write(b"ack\n")
    assert await asyncio.wait_for(reader2.readline(), T) == b"ack\n"
    await fe.close()
    await be.close()


# ------------------------------------------------------------------ between processes


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    async def line(self) -> bytes:
        assert self.proc.stdout is not None
        return await asyncio.wait_for(self.proc.stdout.readline(), T)

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def stderr_until(self, text: str) -> str:
        assert self.proc.stderr is not None
        seen = ""
        while text not in seen:
            chunk = await asyncio.wait_for(self.proc.stderr.readline(), T)
            if not chunk:
                raise AssertionError(f"{self.name} exited before saying {text!r}: {seen}")
            seen += chunk.decode()
        return seen

    async def finish(self, sig: int | None = signal.SIGTERM) -> int:
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), T)


Spawn = Callable[..., Awaitable[Proc]]
_guests = itertools.count(900)


@pytest.fixture
async def spawn(xenstored_proc: XenstoredProcess) -> AsyncIterator[Spawn]:
    """``await spawn(domid, *args)``: ``python -m aioxen ARGS`` playing ``domid`` on the
    unix platform of the module's xenstored."""
    procs: list[Proc] = []

    async def start(domid: int, *args: str, name: str = "aioxen") -> Proc:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aioxen", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=xenstored_proc.env(domid),
        )  # fmt: skip
        proc = Proc(p, name)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


async def test_aioxen_console_between_processes(spawn: Spawn) -> None:
    start = spawn
    guest = next(_guests)
    add = await start(0, "device", "add", "console", str(guest), "--devid", "1")
    assert await add.finish(None) == 0
    back = await start(0, "console", str(guest), "--devid", "1", "--follow", name="back")
    await back.stderr_until("waiting for domain")
    front = await start(guest, "console", "--frontend", "0", "--devid", "1", name="guest")
    await front.stderr_until("connected")
    await back.stderr_until("connected")
    await back.send(b"hello guest\n")
    assert await front.line() == b"hello guest\n"
    await front.send(b"hello host\n")
    assert await back.line() == b"hello host\n"
    ls = await start(0, "device", "ls", str(guest))
    assert await ls.finish(None) == 0
    assert ls.proc.stdout is not None
    listing = (await ls.proc.stdout.read()).decode()
    assert "console" in listing and listing.count("Connected") == 2, listing

    # The guest process is killed: no xenbus update, its memory and channel vanish.
    assert await front.finish(signal.SIGKILL) == -signal.SIGKILL
    await back.stderr_until("disconnected")
    # A new guest process connects to the same (following) back end.
    front2 = await start(guest, "console", "--frontend", "0", "--devid", "1", name="guest2")
    await front2.stderr_until("connected")
    await back.stderr_until("connected")
    await front2.send(b"again\n")
    assert await back.line() == b"again\n"
    # Orderly shutdown of both.
    assert await front2.finish() == 143  # 128 + SIGTERM after a clean stop
    assert await back.finish() == 143
    rm = await start(0, "device", "rm", "console", str(guest), "--devid", "1", "--force")
    assert await rm.finish(None) == 0


def test_console_is_its_own_package_and_the_old_path_still_imports() -> None:
    """Issue 15: the console moved from ``aioxen.devices`` (a folder holding only it) to
    ``aioxen.console``; the documented ``aioxen.devices.console`` path keeps working."""
    import aioxen.console as console
    import aioxen.console.device as device
    import aioxen.devices.console as old

    for name in ("ConsoleBackend", "ConsoleFrontend", "create_console", "remove_console"):
        assert getattr(console, name) is getattr(device, name) is getattr(old, name)
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "aioxen", "console", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.startswith("usage: aioxen console") and "--frontend" in out


# ------------------------------------------------------------- a front end already at work


async def test_foreign_front_end_state_is_refused_then_forced(world: World) -> None:
    """The guest's ``console/1`` state says ``Connected`` but no aioxen process claims it
    (what a kernel driver such as ``hvc_xen`` leaves): the front end refuses with EBUSY,
    naming the state key, and writes nothing; ``force=True`` takes the device over."""
    dom0 = await world.platform(0)
    guest = world.dom(1)
    gplat = await world.platform(guest)
    await create_console(guest, 1, platform=dom0)
    be = await ConsoleBackend.start(guest, 1, platform=dom0)
    state = f"/local/domain/{guest}/device/console/1/state"
    await gplat.store.write(state, b"4")  # a foreign front end, Connected
    await gplat.store.write(f"/local/domain/{guest}/device/console/1/ring-ref", b"8")
    with pytest.raises(FrontendInUse) as info:
        await ConsoleFrontend.open(0, 1, platform=gplat, timeout=T)
    assert info.value.errno == errno.EBUSY and info.value.path == state
    assert info.value.driver is None
    text = str(info.value)
    assert f"console/1 of domain {guest} is in use by another front end" in text, text
    assert f"{state} is 4 (Connected)" in text and "force=True" in text, text
    assert await gplat.store.read(state) == b"4"  # touched nothing
    assert await gplat.store.read(f"/local/domain/{guest}/device/console/1/ring-ref") == b"8"
    fe = await ConsoleFrontend.open(0, 1, platform=gplat, timeout=T, force=True)
    await greet_and_close(be, fe, b"taken over\n")


async def test_an_idle_or_closed_state_is_free(world: World) -> None:
    """Only a session state (Initialised, Connected, Reconfigur*) counts as in use: a
    foreign front end that said ``Closed`` left the device free."""
    dom0 = await world.platform(0)
    guest = world.dom(1)
    gplat = await world.platform(guest)
    await create_console(guest, 1, platform=dom0)
    be = await ConsoleBackend.start(guest, 1, platform=dom0)
    await gplat.store.write(f"/local/domain/{guest}/device/console/1/state", b"6")
    fe = await ConsoleFrontend.open(0, 1, platform=gplat, timeout=T)
    await greet_and_close(be, fe, b"free\n")


def test_kernel_driver_is_read_from_the_sysfs_links(tmp_path: Path) -> None:
    """The xen bus in sysfs: ``devices/console-1/driver`` links to ``drivers/xenconsole``,
    whose ``module`` link (or, for a built-in driver without one, a table) names
    ``hvc_xen``; the error names both and the unbind file.
    (A directory tree with Linux's link layout; the lab test meets the real one.)"""
    bus = tmp_path / "bus" / "xen"
    drv = bus / "drivers" / "xenconsole"
    (tmp_path / "module" / "hvc_xen").mkdir(parents=True)
    drv.mkdir(parents=True)
    (drv / "module").symlink_to("../../../../module/hvc_xen")
    dev = tmp_path / "devices" / "console-1"
    dev.mkdir(parents=True)
    (bus / "devices").mkdir()
    (bus / "devices" / "console-1").symlink_to("../../../devices/console-1")
    (bus / "devices" / "console-2").symlink_to("../../../devices/console-1")
    sysfs = str(bus)
    assert kernel_driver("console", 1, sysfs) is None  # present, not bound
    assert kernel_driver("console", 7, sysfs) is None  # no such device
    assert kernel_driver("console", 1, str(tmp_path / "nowhere")) is None
    (dev / "driver").symlink_to("../../bus/xen/drivers/xenconsole")
    assert kernel_driver("console", 1, sysfs) == ("xenconsole", "hvc_xen")
    (drv / "module").unlink()  # built in, as in Debian's kernel: Linux's name from a table
    assert kernel_driver("console", 1, sysfs) == ("xenconsole", "hvc_xen")
    other = bus / "drivers" / "otherfront"
    other.mkdir()
    (dev / "driver").unlink()
    (dev / "driver").symlink_to("../../bus/xen/drivers/otherfront")
    assert kernel_driver("console", 1, sysfs) == ("otherfront", None)
    err = kernel_driver_error("console/1 of domain 3", "console", 1, "xenconsole", "hvc_xen", sysfs)
    assert err.errno == errno.EBUSY and err.driver == "xenconsole" and err.module == "hvc_xen"
    text = str(err)
    busy = "console/1 of domain 3 is in use by the kernel driver"
    assert text.startswith(f"{busy} xenconsole (hvc_xen): {sysfs}/devices/console-1/driver"), text
    assert f"echo console-1 > {sysfs}/drivers/xenconsole/unbind" in text, text
    assert err.path == f"{sysfs}/devices/console-1/driver"
    text = str(kernel_driver_error("console/1 of domain 3", "console", 1, "otherfront", None))
    assert text.startswith(f"{busy} otherfront: /sys/bus/xen/devices/console-1/driver"), text


async def test_sysfs_is_consulted_only_on_xen(world: World, tmp_path: Path) -> None:
    """On ``unix``/``inheap`` the host's sysfs says nothing about the simulated guest:
    a bound driver in a sysfs tree given to the check is ignored there."""
    bus = tmp_path / "xen"
    (bus / "drivers" / "xenconsole").mkdir(parents=True)
    (bus / "devices" / "console-1").mkdir(parents=True)
    (bus / "devices" / "console-1" / "driver").symlink_to("../../drivers/xenconsole")
    dom0 = await world.platform(0)
    guest = world.dom(1)
    await create_console(guest, 1, platform=dom0)
    dev = await frontend_device(await world.platform(guest), "console", 1, timeout=T)
    await check_frontend_free(dev, sysfs=str(bus))  # no error
    assert kernel_driver("console", 1, str(bus)) == ("xenconsole", "hvc_xen")
    dev.platform.kernel_xenbus_drivers = True  # what the xen platform says: now it counts
    with pytest.raises(FrontendInUse):
        await check_frontend_free(dev, sysfs=str(bus))


async def test_aioxen_console_frontend_refuses_a_foreign_front_end(spawn: Spawn) -> None:
    """Between processes: the guest's state is ``Initialised`` by a foreign writer;
    ``aioxen console --frontend`` prints why and exits 1 without touching it;
    ``--force`` takes the device over; ``--force`` without ``--frontend`` is a usage error."""
    start = spawn
    guest = next(_guests)
    add = await start(0, "device", "add", "console", str(guest), "--devid", "1")
    assert await add.finish(None) == 0
    state = f"/local/domain/{guest}/device/console/1/state"
    w = await start(guest, "xenstore", "write", state, "3")
    assert await w.finish(None) == 0
    back = await start(0, "console", str(guest), "--devid", "1", name="back")
    await back.stderr_until("waiting for domain")
    front = await start(guest, "console", "--frontend", "0", "--timeout", "20", name="guest")
    assert await front.finish(None) == 1
    assert front.proc.stderr is not None
    err = (await front.proc.stderr.read()).decode()
    assert err.startswith(f"aioxen console: console/1 of domain {guest} is in use by"), err
    assert f"{state} is 3 (Initialised)" in err and "--force" in err, err
    assert "Traceback" not in err, err
    rd = await start(guest, "xenstore", "read", state)
    assert await rd.finish(None) == 0 and rd.proc.stdout is not None
    assert (await rd.proc.stdout.read()).strip() == b"3"
    bad = await start(0, "console", str(guest), "--force")
    assert await bad.finish(None) == 2
    assert bad.proc.stderr is not None
    assert b"--force goes with --frontend" in await bad.proc.stderr.read()
    front2 = await start(guest, "console", "--frontend", "0", "--force", name="guest2")
    await front2.stderr_until("connected")
    await back.stderr_until("connected")
    await front2.send(b"mine now\n")
    assert await back.line() == b"mine now\n"
    assert await front2.finish() == 143
    assert await back.finish(None) == 0  # no --follow: the guest's orderly close ends it


async def test_following_back_end_with_unread_stderr_survives_reconnects(
    xenstored_proc: XenstoredProcess,
) -> None:
    """``aioxen console DOMID --follow`` writes two status lines per guest connection.
    With stderr a pipe nobody reads (4 KiB), a guest that reconnects over and over used to
    block the back end in write(2) for good -- no more connections, SIGTERM ignored.  Now
    the lines queue (bounded) and the back end keeps serving and stops on SIGTERM."""
    import aioxen

    guest = next(_guests)
    env0 = xenstored_proc.env(0)
    add = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioxen", "device", "add", "console", str(guest), "--devid", "1",
        env=env0,
    )  # fmt: skip
    assert await asyncio.wait_for(add.wait(), T) == 0
    r, w = small_pipe()
    back = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioxen", "console", str(guest), "--devid", "1", "--follow",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=w, env=env0,
    )  # fmt: skip
    os.close(w)
    genv = xenstored_proc.env(guest)
    plat = aioxen.platform(
        "unix", domid=guest, root=genv["XEN_ROOT"], xenstored_path=genv["XENSTORED_PATH"]
    )
    try:
        backend_state = f"/local/domain/0/backend/console/{guest}/1/state"
        async with plat:
            for cycle in range(120):  # ~75 bytes of status per cycle: the pipe fills ~50 in
                # a guest that reconnects once the back end has finished the last session
                # (InitWait or Closed, not Connected/Closing)
                seen = b""
                try:
                    async with asyncio.timeout(T):
                        while (seen := await plat.store.read(backend_state)) in (b"4", b"5"):
                            await asyncio.sleep(0.01)
                except TimeoutError:
                    raise AssertionError(f"cycle {cycle}: back end state {seen!r}") from None
                fe = await ConsoleFrontend.open(0, 1, platform=plat, timeout=T)
                await fe.close()
        back.terminate()
        assert await asyncio.wait_for(back.wait(), T) == 143
    finally:
        if back.returncode is None:
            back.kill()
            await back.wait()
        logged = leftover(r)
    assert logged.startswith(b"aioxen console: waiting for domain"), logged[:200]
    assert f"aioxen console: domain {guest} connected".encode() in logged
