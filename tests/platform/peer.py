"""A second domain for cross-process tests of the ``unix`` platform.

Run as ``python peer.py`` with ``XEN_ROOT`` and ``AIOXEN_DOMID`` in the environment (and
``PEER_LOOP=asyncio|uvloop``, default uvloop).  It prints ``ready``, then reads one command
per line on stdin and answers each with one line on stdout: ``ok [values...]`` or
``err <ExceptionName> <message>``.  It holds at most one channel, one share and one mapping
(the latest).

Commands::

    listen REMOTE              -> ok PORT
    connect REMOTE PORT        -> ok LOCALPORT   (the bind event already consumed)
    listen-many REMOTE N       -> ok PORT,PORT,...   (kept open until exit)
    notify                     -> ok
    wait [TIMEOUT]             -> ok
    pong N                     -> ok COUNT   answers N events one for one (handler path)
    block SECONDS              -> ok         blocks the event loop (time.sleep)
    share REMOTE NPAGES RW     -> ok REF,REF,...   page i filled with byte i+1
    map REMOTE REFS RW         -> ok
    read OFFSET LEN            -> ok HEX     from the mapping
    write OFFSET HEX           -> ok         into the mapping
    sread OFFSET LEN / swrite OFFSET HEX     the same on the share
    mnotify OFFSET / snotify OFFSET  -> ok  unmap notify (clear OFFSET, event on the channel)
                                         on the mapping / the share
    unshare / unmap / close    -> ok
    exit                       -> ok, then closes everything and exits 0
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import aioxen
from aioxen import PAGE_SIZE


class Peer:
    def __init__(self, plat: aioxen.Platform) -> None:
        self.plat = plat
        self.ch: Any = None
        self.share: Any = None
        self.mapping: Any = None
        self.extra: list[Any] = []

    async def run(self, words: list[str]) -> str:
        cmd, args = words[0], words[1:]
        p = self.plat
        if cmd == "listen":
            self.ch = await p.events.listen(int(args[0]))
            return f"ok {self.ch.port}"
        if cmd == "connect":
            self.ch = await p.events.connect(int(args[0]), int(args[1]))
            await self.ch.wait(timeout=10)  # every connector starts with one event
            return f"ok {self.ch.port}"
        if cmd == "listen-many":
            chans = [await p.events.listen(int(args[0])) for _ in range(int(args[1]))]
            self.extra += chans
            return "ok " + ",".join(str(c.port) for c in chans)
        if cmd == "notify":
            self.ch.notify()
            return "ok"
        if cmd == "wait":
            await self.ch.wait(timeout=float(args[0]) if args else 10.0)
            return "ok"
        if cmd == "pong":
            return f"ok {await self.pong(int(args[0]))}"
        if cmd == "block":
            time.sleep(float(args[0]))
            return "ok"
        if cmd == "share":
            self.share = p.grants.share(int(args[0]), int(args[1]), writable=args[2] == "rw")
            for i in range(int(args[1])):
                self.share.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes([i + 1]) * PAGE_SIZE
            return "ok " + ",".join(map(str, self.share.refs))
        if cmd == "map":
            refs = [int(r) for r in args[1].split(",")]
            self.mapping = p.grants.map(int(args[0]), refs, writable=args[2] == "rw")
            return "ok"
        if cmd in ("read", "sread"):
            buf = (self.mapping if cmd == "read" else self.share).buf
            off, n = int(args[0]), int(args[1])
            return "ok " + bytes(buf[off : off + n]).hex()
        if cmd in ("write", "swrite"):
            buf = (self.mapping if cmd == "write" else self.share).buf
            data = bytes.fromhex(args[1])
            buf[int(args[0]) : int(args[0]) + len(data)] = data
            return "ok"
        if cmd in ("mnotify", "snotify"):
            memory = self.mapping if cmd == "mnotify" else self.share
            memory.set_unmap_notify(int(args[0]), self.ch)
            return "ok"
        if cmd == "unshare":
            self.share.close()
            return "ok"
        if cmd == "unmap":
            self.mapping.close()
            return "ok"
        if cmd == "close":
            self.ch.close()
            return "ok"
        raise ValueError(f"unknown command {cmd!r}")

    async def pong(self, n: int) -> int:
        ch = self.ch
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        count = 0

        def on_event() -> None:
            nonlocal count
            if ch.peer_lost:
                if not done.done():
                    done.set_result(count)
                return
            count += 1
            ch.notify()
            if count >= n and not done.done():
                done.set_result(count)

        ch.set_handler(on_event)
        try:
            return await done
        finally:
            ch.set_handler(None)


async def main() -> int:
    plat = aioxen.platform("unix")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    peer = Peer(plat)
    print("ready", flush=True)
    async with plat:
        while True:
            line = (await reader.readline()).decode()
            if not line:
                return 0
            words = line.split()
            if not words:
                continue
            if words[0] == "exit":
                print("ok", flush=True)
                return 0
            try:
                reply = await peer.run(words)
            except Exception as exc:
                reply = f"err {type(exc).__name__} {exc}".replace("\n", " ")
            print(reply, flush=True)


if __name__ == "__main__":
    factory: Callable[[], asyncio.AbstractEventLoop]
    if os.environ.get("PEER_LOOP", "uvloop") == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(main()))
