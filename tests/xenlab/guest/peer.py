"""The peer domU's half of the cross-domain tests: aioxen in a PV domU, talking to dom0.

Theory of operation
-------------------
This module runs *inside the peer domU* (``xenlab/domu-init`` with the host's Python and
the tree in its initramfs, :func:`xenlab.lab.build_peer_initrd`), one process per action:
``python -S -m peer ACTION ARGS...``, started by ``test_crossdomain.py`` in dom0 through
the domU's console (:class:`domu.Console`).  Each action uses aioxen's ``xen`` platform as
any guest program would (``/dev/xen/{evtchn,gntdev,gntalloc,xenbus}``, no xenstored
socket) and reports on stdout in ``KEY=VALUE`` lines that dom0 parses:

* ``READY`` once it has set up what dom0 then acts on (a long-running action is started
  in the background and killed from dom0 for the crash tests);
* ``RESULT ...`` at the end; an exception is printed as ``ERROR <type>: <message>`` with
  exit status 1.

Bulk data is a pseudo-random stream named by a seed (:func:`stream`) on both sides, so
each side checks the other's bytes by SHA-256 without moving them twice.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

T0 = time.monotonic()
HANG = 120.0  # hang guard only (TCG is slow)
CHUNK = 1 << 16


def stream(seed: int, n: int) -> bytes:
    """``n`` pseudo-random bytes named by ``seed`` (the same in dom0 and the domU)."""
    return random.Random(seed).randbytes(n)


def say(*parts: object) -> None:
    print(*parts, flush=True)


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nbytes: int, seed: int
) -> tuple[int, str]:
    """Send ``stream(seed, nbytes)`` then EOF while reading the peer's bytes to EOF;
    (bytes received, their SHA-256)."""
    data = stream(seed, nbytes)

    async def send() -> None:
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            writer.write(view[i : i + CHUNK])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    h = hashlib.sha256()
    got = 0
    while chunk := await asyncio.wait_for(reader.read(CHUNK), HANG):
        h.update(chunk)
        got += len(chunk)
    await asyncio.wait_for(sender, HANG)
    return got, h.hexdigest()


async def act_info(plat: Any) -> None:
    say(f"RESULT domid={plat.domid} started={time.monotonic() - T0:.2f}s")


async def act_vchan_client(plat: Any, domid: str, port: str, size: str, n: str, seed: str) -> None:
    from aioxen import vchan

    reader, writer = await vchan.open_connection(
        int(domid), port, platform=plat, read_size=int(size), write_size=int(size), timeout=HANG
    )
    say("READY")
    got, digest = await exchange(reader, writer, int(n), int(seed))
    writer.close()
    await writer.wait_closed()
    say(f"RESULT received={got} sha256={digest}")


async def act_vchan_server(plat: Any, domid: str, port: str, size: str, n: str, seed: str) -> None:
    from aioxen import vchan

    done: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            done.set_result(await exchange(reader, writer, int(n), int(seed)))
        except BaseException as exc:  # reported by the awaiting action
            done.set_exception(exc)
        finally:
            writer.close()

    server = await vchan.start_server(
        on_client, int(domid), port, platform=plat, read_size=int(size), write_size=int(size)
    )
    async with server:
        say("READY")
        got, digest = await asyncio.wait_for(done, HANG)
    say(f"RESULT received={got} sha256={digest}")


async def act_vchan_hold(plat: Any, role: str, domid: str, port: str) -> None:
    """Connect (``client``) or accept one client (``server``), send ``hello``, then wait
    to be killed -- or report what the reader saw if dom0's end went away first."""
    from aioxen import vchan

    if role == "client":
        reader, writer = await vchan.open_connection(int(domid), port, platform=plat, timeout=HANG)
    else:
        got: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await got.put((r, w))

        server = await vchan.start_server(on_client, int(domid), port, platform=plat)
        say("LISTENING")
        reader, writer = await asyncio.wait_for(got.get(), HANG)
        server.close()  # one client: stop listening, keep its connection
    writer.write(b"hello from the domU\n")
    await writer.drain()
    say("READY")
    try:
        rest = await asyncio.wait_for(reader.read(), 600)
        say(f"RESULT eof rest={len(rest)}")
    except ConnectionResetError as exc:
        say(f"RESULT reset {exc}")


async def act_map(plat: Any, domid: str, refs: str, writable: str, port: str) -> None:
    """Map dom0's grant refs, report their SHA-256; if writable, write a marker; with an
    event channel port, set an unmap notify (clear byte 0, notify) and wait to be killed."""
    ref_list = [int(r) for r in refs.split(",")]
    m = plat.grants.map(int(domid), ref_list, writable=writable == "1")
    digest = hashlib.sha256(m.buf).hexdigest()
    if writable == "1":
        m.buf[1:6] = b"domU!"
    if port != "-":
        ch = await plat.events.connect(int(domid), int(port))
        m.set_unmap_notify(0 if writable == "1" else None, ch)
        say(f"READY sha256={digest} readonly={m.buf.readonly}")
        await asyncio.sleep(600)
    say(f"RESULT sha256={digest} readonly={m.buf.readonly}")
    m.close()


async def act_share(plat: Any, domid: str, npages: str, writable: str, seed: str) -> None:
    """Share ``npages`` filled with ``stream(seed)`` to ``domid``, offer an event channel,
    print the refs and port, wait for dom0's notify, report byte 0 of each page."""
    share = plat.grants.share(int(domid), int(npages), writable=writable == "1")
    share.buf[:] = stream(int(seed), len(share.buf))
    ch = await plat.events.listen(int(domid))
    say(f"READY refs={','.join(map(str, share.refs))} port={ch.port}")
    await ch.wait(timeout=HANG)
    first = bytes(share.buf[i] for i in range(0, len(share.buf), 4096))
    ch.notify()
    say(f"RESULT first={first.hex()}")
    await asyncio.sleep(1)  # let dom0 see the notify before the port goes
    ch.close()
    share.close()


async def act_events(plat: Any, domid: str, port: str, rounds: str) -> None:
    """Bind to dom0's unbound ``port`` and ping-pong ``rounds`` notifies."""
    ch = await plat.events.connect(int(domid), int(port))
    await ch.wait(timeout=HANG)  # Xen's bind event on the connecting side
    say(f"READY local={ch.port}")
    for _ in range(int(rounds)):
        await ch.wait(timeout=HANG)
        ch.notify()
    say(f"RESULT rounds={rounds}")


async def act_xenstore(plat: Any) -> None:
    """What a guest may and may not do in XenStore, one ``name=outcome`` per line."""
    store = plat.store
    me = plat.domid

    async def attempt(name: str, coro: Awaitable[Any]) -> None:
        try:
            value = await coro
            say(f"{name}=ok:{value!r}")
        except OSError as exc:  # errno name, and whether it is a PermissionError
            code = errno.errorcode.get(exc.errno or 0)
            say(f"{name}=err:{code}:{isinstance(exc, PermissionError)}")

    await attempt("own_domid", store.read("domid"))
    await attempt("own_path", store.get_domain_path(me))
    await attempt("write_data", store.write(f"/local/domain/{me}/data/aioxen-test", b"from-domU"))
    await attempt("read_data", store.read(f"/local/domain/{me}/data/aioxen-test"))
    await attempt("read_relative", store.read("data/aioxen-test"))
    await attempt("read_dom0_name", store.read("/local/domain/0/name"))
    await attempt("write_dom0", store.write("/local/domain/0/aioxen-from-domU", b"x"))
    await attempt("write_root", store.write("/aioxen-from-domU", b"x"))
    await attempt("ls_dom0", store.directory("/local/domain/0"))
    await attempt("read_dom0_granted", store.read("/local/domain/0/data/aioxen-granted"))
    await attempt("read_dom0_private", store.read("/local/domain/0/data/aioxen-private"))
    await attempt("rm_dom0_granted", store.rm("/local/domain/0/data/aioxen-granted"))
    say("RESULT done")


async def act_watch(plat: Any, path: str, count: str) -> None:
    """Watch ``path``; report each event's path until ``count`` events after the first."""
    async with plat.store.watch(path) as w:
        first = await w.next(timeout=HANG)  # fired on registration
        say(f"READY first={first}")
        for _ in range(int(count)):
            say(f"EVENT {await w.next(timeout=HANG)}")
    say("RESULT done")


ACTIONS: dict[str, Callable[..., Awaitable[None]]] = {
    "info": act_info,
    "vchan-client": act_vchan_client,
    "vchan-server": act_vchan_server,
    "vchan-hold": act_vchan_hold,
    "map": act_map,
    "share": act_share,
    "events": act_events,
    "xenstore": act_xenstore,
    "watch": act_watch,
}


async def main(action: str, args: list[str]) -> None:
    import aioxen

    plat = aioxen.platform("xen")
    async with plat:
        await ACTIONS[action](plat, *args)


def run(argv: list[str]) -> int:
    loop, action, args = argv[0], argv[1], argv[2:]
    try:
        if loop == "uvloop":
            import uvloop

            uvloop.run(main(action, args))
        else:
            asyncio.run(main(action, args))
    except Exception as exc:
        say(f"ERROR {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AIOXEN_PLATFORM", "xen")
    sys.exit(run(sys.argv[1:]))
