"""Linux's own xen-blkfront and xen-netfront, in a PV domU, against aioxen's blkback and
netback in dom0 — real Xen, real Linux frontends, aioxen's command-line backends.

One domU serves the whole module (:mod:`domu` explains the set-up): a 64 MiB image file
on dom0's tmpfs served by ``aioxen blkback`` as the domU's ``xvda``, and a vif served by
``aioxen netback --tap`` whose TAP carries dom0's end of a /24.  Disk layout of the tests:
``[0, 16 MiB)`` an ext2 file system, ``[32, 40 MiB)`` a pattern dom0 wrote before the domU
booted, ``[48, 57 MiB)`` what the domU writes.  The last test unplugs both devices by
stopping the backends and checks Linux's frontends let go.

These tests are synchronous: they drive processes (``xl``, the backends, the domU's
shell) and run once, not once per event loop.
"""

from __future__ import annotations

import hashlib
import http.server
import random
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from domu import DOM0_IP, DOMU_IP, MIB, RESULTS, TAP, Domu, diagnose, sh, start_domu, xenstore_read

IMAGE = Path("/tmp/xenlab-domu.img")
IMAGE_BYTES = 64 * MIB
XVDA = 51712
DOM0_PATTERN = random.Random(0xA10).randbytes(8 * MIB)  # at 32 MiB, read by the domU
# Bytes moved over the vif.  Under TCG dom0 -> domU runs at ~0.2-0.5 MB/s and domU ->
# dom0 at ~0.05-0.1 MB/s (latency-bound: the domU's TCP sends few segments per round trip).
TRANSFER_DOWN = 2 * MIB
TRANSFER_UP = 1 * MIB


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def image_range(offset: int, length: int) -> bytes:
    with open(IMAGE, "rb") as f:
        f.seek(offset)
        return f.read(length)


def domu_md5(out: str) -> str:
    m = re.search(r"\b([0-9a-f]{32})\b", out)
    assert m, f"no md5sum in the domU's output: {out!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def domu() -> Iterator[Domu]:
    with open(IMAGE, "wb") as f:
        f.truncate(IMAGE_BYTES)
        f.seek(32 * MIB)
        f.write(DOM0_PATTERN)
    d = start_domu(IMAGE)
    try:
        # The frontends probe as the modules load; wait (bounded) for both devices.
        d.console.run(
            "i=0; while [ ! -b /dev/xvda ] || [ ! -e /sys/class/net/eth0 ]; do"
            " [ $i -ge 1200 ] && break; sleep 0.1; i=$((i+1)); done;"
            " [ -b /dev/xvda ] && [ -e /sys/class/net/eth0 ]",
            timeout=150,
        )
        d.console.run(
            "echo 1 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6 && ip link set eth0 up"
            f" && ip addr add {DOMU_IP}/24 dev eth0"
        )
        d.mark("devices up, eth0 configured")
        yield d
    finally:
        d.mark("tests done")
        (RESULTS / "domu-diagnosis.txt").write_text(diagnose(d))
        d.console.close()
        d.destroy()
        d.blkback.stop()
        d.netback.stop()
        d.mark("domU destroyed")
        (RESULTS / "domu-timings.txt").write_text(
            "".join(f"{k}: {v:.1f}s\n" for k, v in d.timings.items())
        )


def test_linux_frontends_connect_to_aioxen_backends(domu: Domu) -> None:
    d = domu.domid
    for dev in (f"vbd/{d}/{XVDA}", f"vif/{d}/0"):
        assert xenstore_read(f"/local/domain/0/backend/{dev}/state") == "4", dev
    assert xenstore_read(f"/local/domain/{d}/device/vbd/{XVDA}/state") == "4"
    assert xenstore_read(f"/local/domain/{d}/device/vif/0/state") == "4"
    # Linux's drivers are the frontends; dom0's kernel backends are not even loaded.
    out = domu.console.run(
        "readlink /sys/block/xvda/device/driver; readlink /sys/class/net/eth0/device/driver;"
        " cat /sys/block/xvda/size /sys/class/net/eth0/address"
    )
    blk_driver, net_driver, sectors, mac = out.split()
    assert blk_driver.endswith("/vbd") and net_driver.endswith("/vif"), out
    assert int(sectors) * 512 == IMAGE_BYTES
    assert mac == xenstore_read(f"/local/domain/{d}/device/vif/0/mac")
    dom0_modules = Path("/proc/modules").read_text()
    assert "xen_blkback" not in dom0_modules and "xen_netback" not in dom0_modules


def test_domu_reads_what_dom0_wrote(domu: Domu) -> None:
    out = domu.console.run("dd if=/dev/xvda bs=1M skip=32 count=8 iflag=direct | md5sum")
    assert domu_md5(out) == md5(DOM0_PATTERN)
    # the same through the page cache, and single unaligned sectors (first_sect > 0)
    out = domu.console.run("dd if=/dev/xvda bs=1M skip=32 count=8 | md5sum")
    assert domu_md5(out) == md5(DOM0_PATTERN)
    out = domu.console.run(
        f"dd if=/dev/xvda bs=512 skip={32 * 2048 + 3} count=5 iflag=direct | md5sum"
    )
    assert domu_md5(out) == md5(DOM0_PATTERN[3 * 512 : 8 * 512])


def test_domu_writes_reach_the_image(domu: Domu) -> None:
    c = domu.console
    want = domu_md5(c.run("dd if=/dev/urandom of=/tmp/w bs=1M count=8 && md5sum /tmp/w"))
    c.run("dd if=/tmp/w of=/dev/xvda bs=1M seek=48 conv=fsync")
    assert md5(image_range(48 * MIB, 8 * MIB)) == want
    # O_DIRECT sectors at an offset inside a page, then a flush
    c.run(f"dd if=/tmp/w of=/dev/xvda bs=512 count=7 seek={56 * 2048 + 3} oflag=direct")
    c.run("sync")
    small = domu_md5(c.run("dd if=/tmp/w bs=512 count=7 | md5sum"))
    assert md5(image_range(56 * MIB + 3 * 512, 7 * 512)) == small


def test_flushes_reach_the_backend(domu: Domu) -> None:
    """fsync on the domU's xvda sends Linux's empty flush (BLKIF_OP_FLUSH_DISKCACHE, no
    segments; Linux puts sector_number = (u64)-1 in it).  The backend must answer it OKAY:
    on an error Linux's blkfront turns flushing off for good ("empty flush op failed",
    the queue becomes "write through") and later fsyncs no longer reach the disk."""
    c = domu.console
    c.run("dd if=/dev/urandom of=/dev/xvda bs=4k count=4 seek=15000 conv=fsync && sync")
    assert c.run("cat /sys/block/xvda/queue/write_cache").strip() == "write back"
    assert "empty flush op failed" not in c.run("dmesg")
    assert "refusing" not in domu.blkback.output(), domu.blkback.output()


def test_ext2_made_in_domu_checks_clean_in_dom0(domu: Domu, tmp_path: Path) -> None:
    c = domu.console
    blob = domu_md5(c.run("dd if=/dev/urandom of=/tmp/blob bs=64k count=40 && md5sum /tmp/blob"))
    c.run(
        "mke2fs -F -L aioxen /dev/xvda 16384 && mount -t ext2 /dev/xvda /mnt"
        " && cp /tmp/blob /mnt/blob && mkdir /mnt/dir && echo hello-from-domU >/mnt/dir/hello"
        " && umount /mnt"
    )
    # dom0: a full check of the file system the domU's ext4 driver wrote through blkfront
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(IMAGE)], capture_output=True, text=True, timeout=120
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sh("debugfs", "-R", f"dump /blob {tmp_path / 'blob'}", str(IMAGE), timeout=120)
    assert md5((tmp_path / "blob").read_bytes()) == blob
    assert "hello-from-domU" in sh("debugfs", "-R", "cat /dir/hello", str(IMAGE))
    # dom0 adds a file; the domU drops its caches, mounts again and reads both back
    src = tmp_path / "from-dom0"
    data = random.Random(7).randbytes(300_000)
    src.write_bytes(data)
    sh("debugfs", "-w", "-R", f"write {src} from-dom0", str(IMAGE))
    c.run("blockdev --flushbufs /dev/xvda && echo 3 >/proc/sys/vm/drop_caches")
    out = c.run("mount -t ext2 /dev/xvda /mnt && md5sum /mnt/from-dom0 /mnt/blob && umount /mnt")
    assert md5(data) in out and blob in out, out


def net_counters(domu: Domu) -> dict[str, int]:
    """Packet counters of the domU's eth0 and of dom0's TAP, once the link is quiet (two
    equal readings; IPv6 is off on both ends, so there is no background traffic)."""
    last: dict[str, int] = {}
    for _ in range(10):
        now = _read_counters(domu)
        if now == last:
            break
        last = now
        time.sleep(0.5)
    return last


def _read_counters(domu: Domu) -> dict[str, int]:
    names = ("rx_packets", "tx_packets", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")
    out = domu.console.run(
        "cd /sys/class/net/eth0/statistics && cat " + " ".join(names), check=False
    ).split()
    counters = {f"domU {n}": int(v) for n, v in zip(names, out, strict=False) if v.isdigit()}
    for n in names:
        path = Path(f"/sys/class/net/{TAP}/statistics/{n}")
        if path.exists():
            counters[f"dom0 tap {n}"] = int(path.read_text())
    return counters


def pings(n: int, size: int, ip: str) -> str:
    """A shell loop of ``n`` single busybox pings, each waiting up to 10 s for its reply
    (a ping run's final replies are only awaited for two round trips, too short under a
    loaded TCG); it stops at the first unanswered one and prints how many were answered."""
    return (
        f"ok=0; i=0; while [ $i -lt {n} ]; do i=$((i+1));"
        f" busybox ping -c 1 -W 10 -s {size} {ip} >/dev/null || break; ok=$((ok+1)); done;"
        f' echo "answered $ok of {n}"'
    )


def test_ping_both_ways(domu: Domu) -> None:
    """Small and full-size (1500-byte IP packet) echo requests each way: every one is
    answered, and every frame one end sent reached the other (interface counters)."""
    before = net_counters(domu)
    outs = {
        "dom0 -> domU, 56 B": sh("sh", "-c", pings(20, 56, DOMU_IP), timeout=300),
        "dom0 -> domU, 1472 B": sh("sh", "-c", pings(20, 1472, DOMU_IP), timeout=300),
        "domU -> dom0, 56 B": domu.console.run(pings(20, 56, DOM0_IP), timeout=300),
        "domU -> dom0, 1472 B": domu.console.run(pings(20, 1472, DOM0_IP), timeout=300),
    }
    after = net_counters(domu)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    report = "".join(f"{k}: {v.strip()}\n" for k, v in outs.items()) + f"counters: {delta}"
    for out in outs.values():
        assert "answered 20 of 20" in out, report
    assert delta["domU tx_packets"] == delta["dom0 tap rx_packets"] >= 40, report
    assert delta["dom0 tap tx_packets"] == delta["domU rx_packets"] >= 40, report
    for k, v in delta.items():
        assert not (("errors" in k or "dropped" in k) and v), report


class _Blob(http.server.BaseHTTPRequestHandler):
    data = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_transfer_dom0_to_domu(domu: Domu) -> None:
    data = random.Random(11).randbytes(TRANSFER_DOWN)
    handler = type("Handler", (_Blob,), {"data": data})
    server = http.server.ThreadingHTTPServer((DOM0_IP, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        out = domu.console.run(
            f"timeout 90 wget -q -O /tmp/dl http://{DOM0_IP}:{port}/blob && md5sum /tmp/dl"
            " && rm /tmp/dl",
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert domu_md5(out) == md5(data)


def test_transfer_domu_to_dom0(domu: Domu) -> None:
    c = domu.console
    want = domu_md5(
        c.run(
            "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/up bs=1M"
            f" count={TRANSFER_UP // MIB} && md5sum /tmp/www/up && httpd -p 8080 -h /tmp/www"
        )
    )
    with urllib.request.urlopen(f"http://{DOMU_IP}:8080/up", timeout=30) as resp:
        got = resp.read()
    assert len(got) == TRANSFER_UP
    assert md5(got) == want


def test_backends_unplug_cleanly(domu: Domu) -> None:
    """SIGTERM to each backend: an orderly close that Linux's frontends follow to Closed;
    the devices disappear from the domU and from XenStore, and the backends exit 143 (the
    CLI standard: SIGTERM after a clean stop)."""
    d = domu.domid
    assert domu.blkback.stop() == 143, domu.blkback.output()
    assert domu.netback.stop() == 143, domu.netback.output()
    for path in (
        f"/local/domain/0/backend/vbd/{d}/{XVDA}",
        f"/local/domain/0/backend/vif/{d}/0",
        f"/local/domain/{d}/device/vbd/{XVDA}",
        f"/local/domain/{d}/device/vif/0",
    ):
        assert xenstore_read(path) is None, f"{path} still exists"
    left = domu.console.run(
        "i=0; while [ -e /sys/block/xvda ] || [ -e /sys/class/net/eth0 ]; do"
        " [ $i -ge 300 ] && break; sleep 0.1; i=$((i+1)); done;"
        " ls -d /sys/block/xvda /sys/class/net/eth0 2>/dev/null; true",
        timeout=60,
    )
    assert not left.strip(), f"still present in the domU 30 s after the unplug: {left.split()}"
