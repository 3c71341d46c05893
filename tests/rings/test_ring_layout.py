"""Offsets, sizes and entry counts checked against the real headers.

A C file of ``offsetof``/``sizeof``/``__CONST_RING_SIZE`` constants is compiled to assembly
(``gcc -S``) for x86_64 and for i386 (``-m32 -ffreestanding``: compile only, so no 32-bit
libc is needed) and the values are read back from the ``.long`` directives.  Python-side
offsets are found by packing probe records, so the check covers the codecs themselves.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from aioxen.blk import blkif as BK
from aioxen.net import netif as N
from aioxen.rings import byte as B
from aioxen.rings import formats as F
from aioxen.rings.sring import HEADER_SIZE, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, ring_entries

PRELUDE = """
#include <stdint.h>
#include <stddef.h>
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/netif.h>
#include <xen/io/blkif.h>
#include <xen/io/console.h>
#include <xen/io/xs_wire.h>
#define MSIZE(S, m) sizeof(((S *)0)->m)
"""


def c_constants(exprs: list[str], tmp: Path, m32: bool) -> list[int]:
    src = tmp / ("layout32.c" if m32 else "layout64.c")
    body = ",\n".join(f"  (unsigned int)({e})" for e in exprs)
    src.write_text(PRELUDE + f"const unsigned int ax_values[] = {{\n{body}\n}};\n")
    flags = ["-m32", "-ffreestanding"] if m32 else []
    asm = subprocess.run(
        ["gcc", *flags, "-S", "-o", "-", str(src)], check=True, capture_output=True, text=True
    ).stdout
    block = asm[asm.index("ax_values:") :]
    values = [int(v) for v in re.findall(r"^\s*\.long\s+(-?\d+)", block, re.M)][: len(exprs)]
    assert len(values) == len(exprs)
    return values


def probe(fmt: Any, record: Any, field: str) -> tuple[int, int]:
    """(offset, width) of ``field`` in ``fmt``'s encoding, found by packing a probe."""
    base = record
    current = getattr(base, field)
    if isinstance(current, bytes):
        value: Any = b"\x01" * len(current)
    else:
        for width in (8, 4, 2, 1):
            value = int.from_bytes(b"\x01" * width, "little")
            try:
                buf = bytearray(fmt.size)
                fmt.pack_into(buf, 0, base._replace(**{field: value}))
                break
            except struct.error:
                continue
    ref, buf = bytearray(fmt.size), bytearray(fmt.size)
    fmt.pack_into(ref, 0, base)
    fmt.pack_into(buf, 0, base._replace(**{field: value}))
    hot = [i for i, (a, b) in enumerate(zip(ref, buf, strict=True)) if a != b]
    assert hot == list(range(hot[0], hot[-1] + 1))
    return hot[0], len(hot)


STRUCTS: list[tuple[str, Any, Any, list[str]]] = [
    ("struct netif_tx_request", N.NETIF_TX_REQUEST, N.NetifTxRequest(0, 0, 0, 0, 0),
     ["gref", "offset", "flags", "id", "size"]),
    ("struct netif_tx_response", N.NETIF_TX_RESPONSE, N.NetifTxResponse(0, 0), ["id", "status"]),
    ("struct netif_rx_request", N.NETIF_RX_REQUEST, N.NetifRxRequest(0, 0), ["id", "gref"]),
    ("struct netif_rx_response", N.NETIF_RX_RESPONSE, N.NetifRxResponse(0, 0, 0, 0),
     ["id", "offset", "flags", "status"]),
    ("struct netif_extra_info", N.NETIF_EXTRA_INFO, N.NetifExtraInfo(0, 0, bytes(6)),
     ["type", "flags"]),
]  # fmt: skip


def blkif_structs(abi: str) -> list[tuple[str, Any, Any, list[str]]]:
    req, rsp = BK.blkif_request_format(abi), BK.blkif_response_format(abi)
    return [
        ("struct blkif_request", req, BK.BlkifRequest(0, 0, 0, 0, 0, ()),
         ["operation", "nr_segments", "handle", "id", "sector_number"]),
        ("struct blkif_request_discard", req,
         BK.BlkifRequestDiscard(BK.BLKIF_OP_DISCARD, 0, 0, 0, 0, 0),
         ["flag", "handle", "id", "sector_number", "nr_sectors"]),
        ("struct blkif_request_indirect", req,
         BK.BlkifRequestIndirect(BK.BLKIF_OP_INDIRECT, 0, 0, 0, 0, 0, ()),
         ["indirect_op", "nr_segments", "id", "sector_number", "handle"]),
        ("struct blkif_response", rsp, BK.BlkifResponse(0, 0, 0), ["id", "operation", "status"]),
    ]  # fmt: skip


@pytest.mark.parametrize("abi", [BK.ABI_X86_64, BK.ABI_X86_32])
def test_entry_fields_match_c(abi: str, tmp_path: Path) -> None:
    structs = STRUCTS + blkif_structs(abi)
    exprs: list[str] = []
    expected: list[tuple[str, int]] = []
    for cname, fmt, record, fields in structs:
        for field in fields:
            off, width = probe(fmt, record, field)
            exprs += [f"offsetof({cname}, {field})", f"MSIZE({cname}, {field})"]
            expected += [(f"offsetof({cname}, {field})", off), (f"sizeof {field}", width)]
    for cname, fmt, _r, _f in structs:
        if "blkif_request_" in cname:
            continue  # the variants share the request slot; their own sizes are below
        exprs.append(f"sizeof({cname})")
        expected.append((f"sizeof({cname})", fmt.size))
    req = BK.blkif_request_format(abi)
    exprs += ["offsetof(struct blkif_request, seg)", "sizeof(struct blkif_request_segment)",
              "offsetof(struct blkif_request_indirect, indirect_grefs)"]  # fmt: skip
    grefs_off = 28 if abi == BK.ABI_X86_64 else 24
    expected += [("seg", req.segments_offset), ("segment size", 8), ("grefs", grefs_off)]
    got = c_constants(exprs, tmp_path, m32=abi == BK.ABI_X86_32)
    for (what, want), value in zip(expected, got, strict=True):
        assert value == want, f"{abi}: {what}: C says {value}, aioxen says {want}"


RINGS: list[tuple[str, Any, Any]] = [
    ("netif_tx", N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE),
    ("netif_rx", N.NETIF_RX_REQUEST, N.NETIF_RX_RESPONSE),
]


@pytest.mark.parametrize("abi", [BK.ABI_X86_64, BK.ABI_X86_32])
def test_ring_header_slot_and_entry_counts(abi: str, tmp_path: Path) -> None:
    rings: list[tuple[str, Any, Any]] = [
        *RINGS,
        ("blkif", BK.blkif_request_format(abi), BK.blkif_response_format(abi)),
    ]
    exprs: list[str] = []
    expected: list[int] = []
    for name, req, rsp in rings:
        s = f"struct {name}_sring"
        exprs += [f"offsetof({s}, {f})" for f in ("req_prod", "req_event", "rsp_prod",
                                                  "rsp_event", "pvt", "ring")]  # fmt: skip
        expected += [REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT, 16, HEADER_SIZE]
        exprs.append(f"sizeof(union {name}_sring_entry)")
        expected.append(F.slot_size(req, rsp))
        for order in range(5):
            nbytes = 4096 << order
            exprs.append(f"__CONST_RING_SIZE({name}, {nbytes})")
            expected.append(ring_entries(nbytes, F.slot_size(req, rsp)))
    got = c_constants(exprs, tmp_path, m32=abi == BK.ABI_X86_32)
    assert dict(zip(exprs, got, strict=True)) == dict(zip(exprs, expected, strict=True))


def test_documented_entry_counts() -> None:
    assert ring_entries(4096, F.slot_size(N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE)) == 256
    assert ring_entries(4096, F.slot_size(N.NETIF_RX_REQUEST, N.NETIF_RX_RESPONSE)) == 256
    blk = F.slot_size(BK.BLKIF_REQUEST, BK.BLKIF_RESPONSE)
    assert [ring_entries(4096 << o, blk) for o in range(5)] == [32, 64, 128, 256, 512]


def test_byte_ring_pages_match_c(tmp_path: Path) -> None:
    fields = {
        "struct xencons_interface": (B.CONSOLE, ["in", "out", "in_cons", "in_prod",
                                                  "out_cons", "out_prod"]),
        "struct xenstore_domain_interface": (B.XENSTORE, ["req", "rsp", "req_cons", "req_prod",
                                                         "rsp_cons", "rsp_prod"]),
    }  # fmt: skip
    exprs: list[str] = []
    expected: list[int] = []
    for cname, (layout, names) in fields.items():
        data_in, data_out = names[0], names[1]
        exprs += [f"offsetof({cname}, {n})" for n in names]
        front_out, front_in = layout.out, layout.in_
        # names[0] is the ring the back writes for the console ("in"), the one the front
        # writes for xenstore ("req"); map by name.
        by_name = {
            front_out.cons_name: front_out.cons, front_out.prod_name: front_out.prod,
            front_in.cons_name: front_in.cons, front_in.prod_name: front_in.prod,
            front_out.cons_name.split("_")[0]: front_out.data,
            front_in.cons_name.split("_")[0]: front_in.data,
        }  # fmt: skip
        expected += [by_name[n] for n in names]
        exprs += [f"MSIZE({cname}, {data_in})", f"MSIZE({cname}, {data_out})"]
        expected += [
            front_out.size if front_out.cons_name.startswith(data_in) else front_in.size,
            front_out.size if front_out.cons_name.startswith(data_out) else front_in.size,
        ]
    exprs += [f"offsetof(struct xenstore_domain_interface, {n})" for n in
              ("server_features", "connection", "error")]  # fmt: skip
    expected += [B.XENSTORE_SERVER_FEATURES, B.XENSTORE_CONNECTION, B.XENSTORE_ERROR]
    # Xen 4.17's header ends after ``error``; newer ones append ``evtchn_port`` there.
    exprs += ["XENSTORE_RING_SIZE", "sizeof(struct xenstore_domain_interface)"]
    expected += [B.XENSTORE.out.size, B.XENSTORE_EVTCHN_PORT]
    # Likewise console.h gained ``connection`` right after ``out_prod``.
    exprs.append("sizeof(struct xencons_interface)")
    expected.append(B.CONSOLE_CONNECTION)
    got = c_constants(exprs, tmp_path, m32=False)
    assert dict(zip(exprs, got, strict=True)) == dict(zip(exprs, expected, strict=True))
