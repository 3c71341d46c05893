"""The ``xen`` platform's ABI against the real headers, and its pure port dispatch.

A small C program is compiled against ``libxen-dev``'s ``/usr/include/xen/sys/*.h`` (the
Linux evtchn/gntdev/gntalloc uapi) and prints every ioctl number, every struct's size and
field offsets, and byte images of filled-in structs; each is compared with
:mod:`aioxen.platforms.xen_abi`.  No Xen is needed; the Xen lab (``tests/xenlab``) runs the
same code against real devices.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import aioxen
from aioxen.errors import PlatformError
from aioxen.platforms import xen_abi as abi
from aioxen.platforms._channel import ChannelCore
from aioxen.platforms._xen_dispatch import PortDispatcher
from aioxen.platforms.xen import XenPlatform

HEADERS = ("xen/sys/evtchn.h", "xen/sys/gntdev.h", "xen/sys/gntalloc.h")

IOCTLS = [
    "IOCTL_EVTCHN_BIND_VIRQ",
    "IOCTL_EVTCHN_BIND_INTERDOMAIN",
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
    "IOCTL_EVTCHN_UNBIND",
    "IOCTL_EVTCHN_NOTIFY",
    "IOCTL_EVTCHN_RESET",
    "IOCTL_EVTCHN_RESTRICT_DOMID",
    "IOCTL_GNTDEV_MAP_GRANT_REF",
    "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR",
    "IOCTL_GNTDEV_SET_MAX_GRANTS",
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
    "IOCTL_GNTDEV_GRANT_COPY",
    "IOCTL_GNTALLOC_ALLOC_GREF",
    "IOCTL_GNTALLOC_DEALLOC_GREF",
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
]

# The numbers measured on x86_64 (reference xen-wire.md §3): a cross-check of _IOC itself.
REFERENCE_NUMBERS = {
    "IOCTL_EVTCHN_BIND_VIRQ": 0x00044500,
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": 0x00084501,
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": 0x00044502,
    "IOCTL_EVTCHN_UNBIND": 0x00044503,
    "IOCTL_EVTCHN_NOTIFY": 0x00044504,
    "IOCTL_EVTCHN_RESET": 0x00004505,
    "IOCTL_EVTCHN_RESTRICT_DOMID": 0x00024506,
    "IOCTL_GNTDEV_MAP_GRANT_REF": 0x00184700,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": 0x00104701,
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR": 0x00184702,
    "IOCTL_GNTDEV_SET_MAX_GRANTS": 0x00044703,
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": 0x00104707,
    "IOCTL_GNTDEV_GRANT_COPY": 0x00104708,
    "IOCTL_GNTALLOC_ALLOC_GREF": 0x00184705,
    "IOCTL_GNTALLOC_DEALLOC_GREF": 0x00104706,
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY": 0x00104707,
}

# C struct -> (Python layout, its named fields in order).  The Python layout of a
# variable-length struct is the C declaration with one array element.
STRUCTS: dict[str, tuple[struct.Struct, list[str]]] = {
    "ioctl_evtchn_bind_virq": (abi.EVTCHN_BIND_VIRQ, ["virq"]),
    "ioctl_evtchn_bind_interdomain": (
        abi.EVTCHN_BIND_INTERDOMAIN,
        ["remote_domain", "remote_port"],
    ),
    "ioctl_evtchn_bind_unbound_port": (abi.EVTCHN_BIND_UNBOUND_PORT, ["remote_domain"]),
    "ioctl_evtchn_unbind": (abi.EVTCHN_UNBIND, ["port"]),
    "ioctl_evtchn_notify": (abi.EVTCHN_NOTIFY, ["port"]),
    "ioctl_evtchn_restrict_domid": (abi.EVTCHN_RESTRICT_DOMID, ["domid"]),
    "ioctl_gntdev_grant_ref": (abi.GNTDEV_GRANT_REF, ["domid", "ref"]),
    "ioctl_gntdev_map_grant_ref": (
        abi.GNTDEV_MAP_GRANT_REF_C,
        ["count", "pad", "index", "refs[0].domid", "refs[0].ref"],
    ),
    "ioctl_gntdev_unmap_grant_ref": (abi.GNTDEV_UNMAP_GRANT_REF, ["index", "count"]),
    "ioctl_gntdev_get_offset_for_vaddr": (
        abi.GNTDEV_GET_OFFSET_FOR_VADDR,
        ["vaddr", "offset", "count"],
    ),
    "ioctl_gntdev_set_max_grants": (abi.GNTDEV_SET_MAX_GRANTS, ["count"]),
    "ioctl_gntdev_unmap_notify": (
        abi.GNTDEV_UNMAP_NOTIFY,
        ["index", "action", "event_channel_port"],
    ),
    "ioctl_gntdev_grant_copy_segment": (
        abi.GNTDEV_GRANT_COPY_SEGMENT,
        ["source", "dest", "len", "flags", "status"],
    ),
    "ioctl_gntdev_grant_copy": (abi.GNTDEV_GRANT_COPY, ["count", "segments"]),
    "ioctl_gntalloc_alloc_gref": (
        abi.GNTALLOC_ALLOC_GREF_C,
        ["domid", "flags", "count", "index", "gref_ids[0]"],
    ),
    "ioctl_gntalloc_dealloc_gref": (abi.GNTALLOC_DEALLOC_GREF, ["index", "count"]),
    "ioctl_gntalloc_unmap_notify": (
        abi.GNTALLOC_UNMAP_NOTIFY,
        ["index", "action", "event_channel_port"],
    ),
}

# Fields inside the grant-copy segment's unions.
UNION_FIELDS = {
    "source.foreign.ref": 0,
    "source.foreign.offset": 4,
    "source.foreign.domid": 6,
    "dest.virt": 8,
    "dest.foreign.ref": 8,
}

CONSTANTS = {
    "UNMAP_NOTIFY_CLEAR_BYTE": abi.UNMAP_NOTIFY_CLEAR_BYTE,
    "UNMAP_NOTIFY_SEND_EVENT": abi.UNMAP_NOTIFY_SEND_EVENT,
    "GNTALLOC_FLAG_WRITABLE": abi.GNTALLOC_FLAG_WRITABLE,
    "GNTCOPY_source_gref": abi.GNTCOPY_SOURCE_GREF,
    "GNTCOPY_dest_gref": abi.GNTCOPY_DEST_GREF,
    "GNTST_okay": abi.GNTST_OKAY,
    "GNTST_general_error": abi.GNTST_GENERAL_ERROR,
    "GNTST_bad_domain": abi.GNTST_BAD_DOMAIN,
    "GNTST_bad_gntref": abi.GNTST_BAD_GNTREF,
    "GNTST_permission_denied": abi.GNTST_PERMISSION_DENIED,
    "GNTST_bad_page": abi.GNTST_BAD_PAGE,
    "GNTST_eagain": abi.GNTST_EAGAIN,
    "GNTST_no_space": abi.GNTST_NO_SPACE,
}

# Byte images: C fills a struct (memset 0 first), Python packs the same values.
IMAGES_C = r"""
static void dump(const char *name, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("image %s ", name);
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

static void images(void)
{
    { struct ioctl_evtchn_bind_interdomain s; memset(&s, 0, sizeof s);
      s.remote_domain = 0x7fef; s.remote_port = 0x12345678;
      dump("bind_interdomain", &s, sizeof s); }
    { struct ioctl_evtchn_restrict_domid s; memset(&s, 0, sizeof s);
      s.domid = 0x1234; dump("restrict_domid", &s, sizeof s); }
    { unsigned char buf[sizeof(struct ioctl_gntdev_map_grant_ref)
                        + 2 * sizeof(struct ioctl_gntdev_grant_ref)];
      struct ioctl_gntdev_map_grant_ref *s = (void *)buf; memset(buf, 0, sizeof buf);
      s->count = 3; s->refs[0].domid = 7; s->refs[0].ref = 0x101;
      s->refs[1].domid = 7; s->refs[1].ref = 0x202;
      s->refs[2].domid = 7; s->refs[2].ref = 0xfffffffe;
      dump("map_grant_ref3", buf, sizeof(struct ioctl_gntdev_map_grant_ref) + 2 * 8); }
    { struct ioctl_gntdev_unmap_grant_ref s; memset(&s, 0, sizeof s);
      s.index = 0x1122334455667000ULL; s.count = 9; dump("unmap_grant_ref", &s, sizeof s); }
    { struct ioctl_gntdev_unmap_notify s; memset(&s, 0, sizeof s);
      s.index = 0x0000000500001014ULL; s.action = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT;
      s.event_channel_port = 0xabcdef; dump("gntdev_unmap_notify", &s, sizeof s); }
    { struct ioctl_gntalloc_unmap_notify s; memset(&s, 0, sizeof s);
      s.index = 0x15; s.action = UNMAP_NOTIFY_SEND_EVENT; s.event_channel_port = 33;
      dump("gntalloc_unmap_notify", &s, sizeof s); }
    { struct ioctl_gntalloc_alloc_gref s; memset(&s, 0, sizeof s);
      s.domid = 0x7fef; s.flags = GNTALLOC_FLAG_WRITABLE; s.count = 1;
      dump("alloc_gref1", &s, sizeof s); }
    { struct ioctl_gntalloc_dealloc_gref s; memset(&s, 0, sizeof s);
      s.index = 0x3000; s.count = 3; dump("dealloc_gref", &s, sizeof s); }
    { struct ioctl_gntdev_grant_copy_segment s; memset(&s, 0, sizeof s);
      s.source.foreign.ref = 0x99; s.source.foreign.offset = 0; s.source.foreign.domid = 4;
      s.dest.virt = (void *)0x00007f0012345678ULL; s.len = 1; s.flags = GNTCOPY_source_gref;
      dump("copy_probe", &s, sizeof s); }
    { struct ioctl_gntdev_grant_copy s; memset(&s, 0, sizeof s);
      s.count = 1; s.segments = (void *)0x00005555deadbeefULL; dump("grant_copy", &s, sizeof s); }
}
"""

IMAGES_PY: dict[str, bytes] = {
    "bind_interdomain": bytes(abi.pack_arg(abi.EVTCHN_BIND_INTERDOMAIN, 0x7FEF, 0x12345678)),
    "restrict_domid": bytes(abi.pack_arg(abi.EVTCHN_RESTRICT_DOMID, 0x1234)),
    "map_grant_ref3": bytes(abi.map_grant_ref_request(7, [0x101, 0x202, 0xFFFFFFFE])),
    "unmap_grant_ref": bytes(abi.pack_arg(abi.GNTDEV_UNMAP_GRANT_REF, 0x1122334455667000, 9)),
    "gntdev_unmap_notify": bytes(
        abi.pack_arg(
            abi.GNTDEV_UNMAP_NOTIFY,
            0x0000000500001014,
            abi.unmap_notify_action(True, True),
            0xABCDEF,
        )
    ),
    "gntalloc_unmap_notify": bytes(
        abi.pack_arg(abi.GNTALLOC_UNMAP_NOTIFY, 0x15, abi.unmap_notify_action(False, True), 33)
    ),
    "alloc_gref1": bytes(abi.alloc_gref_request(0x7FEF, 1, writable=True)),
    "dealloc_gref": bytes(abi.pack_arg(abi.GNTALLOC_DEALLOC_GREF, 0x3000, 3)),
    "copy_probe": bytes(abi.grant_copy_probe_segment(4, 0x99, 0x00007F0012345678, 1)),
    "grant_copy": bytes(abi.pack_arg(abi.GNTDEV_GRANT_COPY, 1, 0x00005555DEADBEEF)),
}


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stdint.h>",
        "#include <stddef.h>",
        "#include <string.h>",
        "#include <sys/ioctl.h>",
        "#include <xen/xen.h>  /* domid_t: xen/sys/evtchn.h does not compile without it */",
        "#include <xen/grant_table.h>",
        *(f"#include <{h}>" for h in HEADERS),
        IMAGES_C,
        "int main(void) {",
    ]
    for name in IOCTLS:
        lines.append(f'  printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    for name in CONSTANTS:
        lines.append(f'  printf("const {name} %ld\\n", (long)({name}));')
    for sname, (_fmt, fields) in STRUCTS.items():
        lines.append(f'  printf("sizeof {sname} %zu\\n", sizeof(struct {sname}));')
        for field in fields:
            lines.append(
                f'  printf("offsetof {sname} {field} %zu\\n", offsetof(struct {sname}, {field}));'
            )
    for field in UNION_FIELDS:
        sname = "ioctl_gntdev_grant_copy_segment"
        lines.append(
            f'  printf("offsetof {sname} {field} %zu\\n", offsetof(struct {sname}, {field}));'
        )
    lines += ["  images();", "  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Compile and run the probe program; ``{"<kind> <name...>": value}``."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed (Makefile TEST_DEBS installs it)"
    for h in HEADERS:
        assert Path("/usr/include", h).exists(), f"/usr/include/{h} missing: install libxen-dev"
    d = tmp_path_factory.mktemp("xenabi")
    src = d / "probe.c"
    src.write_text(_c_program())
    exe = d / "probe"
    subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-o", exe, src], check=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    facts: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        facts[key] = value
    return facts


def _python_offsets(fmt: struct.Struct) -> list[int]:
    """Byte offset of each non-padding field of a ``=``-prefixed struct format."""
    offsets: list[int] = []
    pos = 0
    for count, code in re.findall(r"(\d*)([xcbB?hHiIlLqQnNefdsp])", fmt.format):
        n = int(count) if count else 1
        size = struct.calcsize("=" + code)
        if code == "x":
            pos += n
        elif code in "sp":
            offsets.append(pos)
            pos += n
        else:
            for _ in range(n):
                offsets.append(pos)
                pos += size
    return offsets


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_header(c_facts: dict[str, str], name: str) -> None:
    assert getattr(abi, name) == int(c_facts[f"ioctl {name}"])
    assert getattr(abi, name) == REFERENCE_NUMBERS[name]


@pytest.mark.parametrize("sname", list(STRUCTS))
def test_struct_layout_matches_header(c_facts: dict[str, str], sname: str) -> None:
    fmt, fields = STRUCTS[sname]
    assert fmt.size == int(c_facts[f"sizeof {sname}"]), sname
    named = [int(c_facts[f"offsetof {sname} {f}"]) for f in fields]
    py = _python_offsets(fmt)
    # "pad" members are spelled as padding in Python formats: drop them from the C side.
    c_named = [off for f, off in zip(fields, named, strict=True) if f != "pad"]
    assert py == c_named, f"{sname}: python offsets {py} != C offsets {c_named}"


def test_grant_copy_union_members(c_facts: dict[str, str]) -> None:
    for field, expected in UNION_FIELDS.items():
        assert int(c_facts[f"offsetof ioctl_gntdev_grant_copy_segment {field}"]) == expected
    assert abi.GNTDEV_COPY_FOREIGN.size == 8 == abi.GNTDEV_COPY_PTR.size


@pytest.mark.parametrize("name", list(CONSTANTS))
def test_constant_matches_header(c_facts: dict[str, str], name: str) -> None:
    assert CONSTANTS[name] == int(c_facts[f"const {name}"])


@pytest.mark.parametrize("name", list(IMAGES_PY))
def test_packed_bytes_match_c(c_facts: dict[str, str], name: str) -> None:
    assert IMAGES_PY[name].hex() == c_facts[f"image {name}"]


def test_variable_length_requests() -> None:
    req = abi.map_grant_ref_request(3, list(range(10)))
    assert len(req) == abi.GNTDEV_MAP_GRANT_REF.size + 10 * abi.GNTDEV_GRANT_REF.size
    req[8:16] = (0x5000).to_bytes(8, "little")
    assert abi.map_grant_ref_index(req) == 0x5000
    alloc = abi.alloc_gref_request(1, 5, writable=False)
    assert len(alloc) == abi.GNTALLOC_ALLOC_GREF.size + 5 * 4
    assert struct.unpack_from("=HHI", alloc) == (1, 0, 5)
    struct.pack_into("=Q5I", alloc, 8, 0x7000, 11, 12, 13, 14, 0xFFFFFFFF)
    assert abi.alloc_gref_result(alloc, 5) == (0x7000, [11, 12, 13, 14, 0xFFFFFFFF])
    with pytest.raises(ValueError):
        abi.map_grant_ref_request(1, [])
    with pytest.raises(ValueError):
        abi.alloc_gref_request(1, 0, writable=True)
    with pytest.raises(ValueError):
        abi._IOC(0, "G", 0, 1 << 14)


# --- the pure port dispatcher ------------------------------------------------------------


class Recorder:
    """A sink that counts what it was given."""

    def __init__(self) -> None:
        self.batches = 0
        self.lost = 0

    def _events_arrived(self) -> None:
        self.batches += 1

    def _peer_gone(self) -> None:
        self.lost += 1


def test_dispatch_routes_ports_and_drops_stale() -> None:
    d = PortDispatcher()
    a, b = Recorder(), Recorder()
    d.add(5, a)
    d.add(9, b)
    with pytest.raises(ValueError, match="port 5"):
        d.add(5, Recorder())
    data = d.encode([5, 9, 5, 77])
    ports = d.parse(data)
    assert ports == [5, 9, 5, 77]
    assert d.to_unmask(ports) == [5, 9]
    assert [d.dispatch(p) for p in ports] == [True, True, True, False]
    assert (a.batches, b.batches) == (2, 1)
    assert d.remove(5) is a
    assert not d.dispatch(5)
    assert sorted(d.ports()) == [9] and 9 in d and 5 not in d and len(d) == 1


def test_overflow_and_failure_reach_every_port() -> None:
    d = PortDispatcher()
    sinks = [Recorder() for _ in range(50)]
    for port, sink in enumerate(sinks, start=1):
        d.add(port, sink)
    d.fire_all()
    d.lose_all()
    assert all(s.batches == 1 and s.lost == 1 for s in sinks)


@given(st.binary(max_size=64))
def test_parse_never_fails_and_ignores_partial_words(data: bytes) -> None:
    ports = PortDispatcher.parse(data)
    assert len(ports) == len(data) // 4
    assert PortDispatcher.encode(ports) == data[: 4 * len(ports)]


@given(st.lists(st.integers(0, 2**32 - 1), max_size=32))
def test_encode_parse_round_trip(ports: list[int]) -> None:
    assert PortDispatcher.parse(PortDispatcher.encode(ports)) == ports


async def test_dispatch_into_channel_cores_coalesces() -> None:
    """The dispatcher feeding the shared ChannelCore: n events -> one wait(), none lost."""
    loop = asyncio.get_running_loop()
    d = PortDispatcher()
    cores = {p: ChannelCore(loop, p, remote_domid=0, local_domid=0) for p in (3, 4)}
    for p, core in cores.items():
        d.add(p, core)
    for p in [3, 3, 3, 4]:
        d.dispatch(p)
    await asyncio.wait_for(cores[3].wait(), 5)
    await asyncio.wait_for(cores[4].wait(), 5)
    with pytest.raises(TimeoutError):
        await cores[3].wait(timeout=0.01)
    waiter = asyncio.ensure_future(cores[4].wait(timeout=5))
    await asyncio.sleep(0)
    d.dispatch(4)
    await waiter
    calls: list[int] = []
    cores[3].set_handler(lambda: calls.append(1))
    d.dispatch(3)
    assert calls == [1]


# --- opening without Xen -----------------------------------------------------------------


async def test_open_without_devices_names_the_device(tmp_path: Path) -> None:
    plat = aioxen.platform("xen", device_dir=str(tmp_path))
    assert isinstance(plat, XenPlatform)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/evtchn")):
        async with plat:
            pass
    with pytest.raises(PlatformError, match="domid"):
        _ = plat.domid


async def test_grants_without_devices_name_the_device(tmp_path: Path) -> None:
    plat = XenPlatform(domid=3, device_dir=str(tmp_path))
    assert plat.domid == 3
    with pytest.raises(FileNotFoundError, match="gntalloc"):
        plat.grants.share(0, 1)
    with pytest.raises(FileNotFoundError, match="gntdev"):
        plat.grants.map(0, [8])
    with pytest.raises(FileNotFoundError, match="evtchn"):
        await plat.events.listen(0)
    await plat.close()
