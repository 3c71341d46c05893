"""Drive ring ends line by line: the C ``ringpeer`` (real ``io/ring.h`` macros) and the
same command language implemented over :mod:`aioxen.rings.sring`.

Content rules mirror ``tests/c/ringpeer.c`` exactly: the k-th request and the response to a
request are pure functions, so any pairing of C and Python ends must produce the same
transcript.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

from aioxen.blk import blkif as B
from aioxen.net import netif as N
from aioxen.rings.sring import BackRing, FrontRing

C_DIR = Path(__file__).resolve().parent.parent / "c"
U32 = 0xFFFFFFFF

FORMATS: dict[str, tuple[Any, Any]] = {
    "tx": (N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE),
    "rx": (N.NETIF_RX_REQUEST, N.NETIF_RX_RESPONSE),
    "blk": (B.BLKIF_REQUEST, B.BLKIF_RESPONSE),
}


def build_ringpeer(out_dir: Path) -> Path:
    exe = out_dir / "ringpeer"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(C_DIR / "ringpeer.c")],
        check=True,
    )
    return exe


def request_for(kind: str, k: int) -> Any:
    k &= U32
    if kind == "tx":
        return N.NetifTxRequest((k * 7 + 1) & U32, k & 0xFFF, k & 0xF, k & 0xFFFF, (k * 3) & 0xFFFF)
    if kind == "rx":
        return N.NetifRxRequest(k & 0xFFFF, (k * 5 + 3) & U32)
    nseg = k % 12
    segs = tuple(B.BlkifSegment((k * 16 + i) & U32, i % 8, 7) for i in range(nseg))
    return B.BlkifRequest(k % 2, nseg, 0x1234, k * 0x100000001, k * 8, segs)


def response_for(kind: str, req: Any) -> Any:
    if kind == "tx":
        return N.NetifTxResponse(req.id, req.id % 3 - 1)
    if kind == "rx":
        return N.NetifRxResponse(req.id, req.id & 0xFF, 1, req.id % 1500)
    return B.BlkifResponse(req.id, req.operation, -(req.id % 3))


def fmt_request(kind: str, r: Any) -> str:
    if kind == "tx":
        return f"{r.gref}:{r.offset}:{r.flags}:{r.id}:{r.size}"
    if kind == "rx":
        return f"{r.id}:{r.gref}"
    s = f"{r.operation}:{r.nr_segments}:{r.handle}:{r.id}:{r.sector_number}"
    return s + "".join(f":{g.gref}/{g.first_sect}/{g.last_sect}" for g in r.seg)


def fmt_response(kind: str, r: Any) -> str:
    if kind == "tx":
        return f"{r.id}:{r.status}"
    if kind == "rx":
        return f"{r.id}:{r.offset}:{r.flags}:{r.status}"
    return f"{r.id}:{r.operation}:{r.status}"


class CPeer:
    """The C program as one ring end."""

    def __init__(self, exe: Path, role: str, kind: str, path: Path, nbytes: int, start: int):
        self.proc = subprocess.Popen(
            [str(exe), role, kind, str(path), str(nbytes), str(start)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        ready = self._line()
        assert ready.startswith("ready "), ready
        self.nr_ents = int(ready.split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ringpeer exited with {self.proc.wait()}")
        return line.rstrip("\n")

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class PyPeer:
    """aioxen's ring as one end, speaking the same command language."""

    def __init__(self, role: str, kind: str, path: Path, nbytes: int, start: int):
        self.kind = kind
        self.fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, nbytes)
        req, rsp = FORMATS[kind]
        self.ring: Any
        if role == "front":
            self.ring = FrontRing(self.mm, req, rsp, start=start)
        else:
            self.ring = BackRing(self.mm, req, rsp, start=start)
        self.role = role
        self.next_k = start
        self.pending: deque[Any] = deque()
        self.nr_ents = self.ring.nr_ents

    def cmd(self, line: str) -> str:
        words = line.split()
        op, n = words[0], int(words[1]) if len(words) > 1 else 0
        r = self.ring
        if op == "info":
            hdr = [int.from_bytes(self.mm[i : i + 4], "little") for i in (0, 4, 8, 12)]
            return "info " + " ".join(map(str, hdr))
        if op == "put" and self.role == "front":
            for _ in range(n):
                r.put_request(request_for(self.kind, self.next_k))
                self.next_k = (self.next_k + 1) & U32
            return "ok"
        if op == "put":
            for _ in range(n):
                r.put_response(response_for(self.kind, self.pending.popleft()))
            return "ok"
        if op == "push":
            notify = r.push_requests() if self.role == "front" else r.push_responses()
            return f"notify {int(notify)}"
        if op == "final":
            more = (
                r.final_check_for_responses()
                if self.role == "front"
                else r.final_check_for_requests()
            )
            return f"more {int(more)}"
        if op == "take":
            if self.role == "front":
                return "got" + "".join(" " + fmt_response(self.kind, x) for x in r.take_responses())
            got = r.take_requests()
            self.pending.extend(got)
            return "got" + "".join(" " + fmt_request(self.kind, x) for x in got)
        raise ValueError(line)

    def close(self) -> None:
        self.ring.close()
        self.mm.close()
        os.close(self.fd)


def scenario(seed: int, nr_ents: int, steps: int) -> list[tuple[str, str]]:
    """A random but valid interleaving of front (``F``) and back (``B``) commands."""
    rnd = random.Random(seed)
    fput = fpush = btake = bput = bpush = ftake = 0
    ops: list[tuple[str, str]] = []
    big = max(1, nr_ents // 4)
    for _ in range(steps):
        choice = rnd.choice(
            ["fput", "fput", "fpush", "btake", "bput", "bput", "bpush", "ftake", "ffinal",
             "bfinal", "info"]
        )  # fmt: skip
        if choice == "fput":
            room = nr_ents - (fput - ftake)
            if room:
                n = rnd.randint(1, min(room, big))
                fput += n
                ops.append(("F", f"put {n}"))
        elif choice == "fpush":
            fpush = fput
            ops.append(("F", "push"))
        elif choice == "btake":
            btake = fpush
            ops.append(("B", "take"))
        elif choice == "bput":
            if btake - bput:
                n = rnd.randint(1, btake - bput)
                bput += n
                ops.append(("B", f"put {n}"))
        elif choice == "bpush":
            bpush = bput
            ops.append(("B", "push"))
        elif choice == "ftake":
            ftake = bpush
            ops.append(("F", "take"))
        elif choice == "ffinal":
            ops.append(("F", "final"))
        elif choice == "bfinal":
            ops.append(("B", "final"))
        else:
            ops.append(("F", "info"))
    ops.append(("F", "info"))
    return ops


def run_scenario(front: Any, back: Any, ops: list[tuple[str, str]]) -> list[str]:
    """Apply ``ops``; return the transcript of replies."""
    return [f"{who} {line} -> {(front if who == 'F' else back).cmd(line)}" for who, line in ops]
