"""cffi (API mode) build script for ``aioxen._native``.

The C lives in ``aioxen/_native_impl.c`` (a real C file: compilers, editors and linters
read it as such); this script gives cffi its interface ([`CDEF`][], the declarations
Python sees) and the source.  ``setup.py`` names ``ffibuilder`` in ``cffi_modules``, so
``pip install`` (editable or not) compiles the extension; ``python aioxen/_native_build.py``
builds it by hand.

What the C does, truthfully: besides primitives Python cannot express (atomic loads,
stores and read-modify-writes with explicit ordering, fences, fixed ``mmap``, ``ioctl``
with a struct) and bulk ring copies that run without the GIL, it holds protocol logic on
the hot paths -- the io/ring.h notify decision and final check (event indices), and the
vchan data-path steps with libxenvchan's notify-bit protocol (test-and-clear our notify
byte, arm the peer's, re-read and validate the ring, each shared index read once).  The
state machines around those steps, and every layout, stay in Python.

No Xen headers are needed to build it: struct layouts for the ``xen`` platform live in
Python and are checked against ``libxen-dev``'s headers by the test-suite.
"""

import os

from cffi import FFI

CDEF = r"""
uint8_t  ax_load_u8(const void *base, size_t off);
uint16_t ax_load_u16(const void *base, size_t off);
uint32_t ax_load_u32(const void *base, size_t off);
void     ax_store_u8(void *base, size_t off, uint8_t v);
void     ax_store_u16(void *base, size_t off, uint16_t v);
void     ax_store_u32(void *base, size_t off, uint32_t v);
uint8_t  ax_fetch_or_u8(void *base, size_t off, uint8_t v);
uint8_t  ax_fetch_and_u8(void *base, size_t off, uint8_t v);
uint32_t ax_exchange_u32(void *base, size_t off, uint32_t v);
void     ax_fence(void);

int64_t  ax_bring_used(const void *idx, size_t cons_off, size_t prod_off, uint32_t size);
int64_t  ax_bring_write(void *idx, size_t cons_off, size_t prod_off,
                        void *ring, uint32_t size, const void *src, size_t n);
int64_t  ax_bring_read(void *idx, size_t cons_off, size_t prod_off,
                       const void *ring, uint32_t size, void *dst, size_t n);
void     ax_ring_copy_in(void *ring, uint32_t size, uint32_t idx, const void *src, size_t n);
void     ax_ring_copy_out(const void *ring, uint32_t size, uint32_t idx, void *dst, size_t n);
void     ax_memcpy(void *dst, const void *src, size_t n);

uintptr_t ax_address(const void *p);
int      ax_mmap_fixed(uintptr_t addr, size_t len, int prot, int fd, int64_t offset);
int      ax_mprotect(uintptr_t addr, size_t len, int prot);
int      ax_ioctl(int fd, unsigned long request, void *arg);
void     ax_memcpy_repeat(void *dst, const void *src, size_t n, uint64_t times);
/* io/ring.h rings (aioxen.rings.rpc) */
int      ax_ring_push(void *base, size_t prod_off, size_t event_off, uint32_t old, uint32_t nw);
void     ax_store_fence(void *base, size_t off, uint32_t v);
int      ax_ring_push_checked(void *base, size_t prod_off, size_t event_off, uint32_t old,
                              uint32_t nw);
uint32_t ax_ring_final_check(void *base, size_t prod_off, size_t event_off, uint32_t cons,
                             uint32_t ahead);
/* vchan byte rings with the notify-bit protocol fused in (aioxen.vchan.wire) */
int64_t  ax_vchan_poll(const void *ctrl, size_t cons_off, size_t prod_off, size_t notify_off,
                       uint8_t eof_bit, uint32_t size);
int      ax_vchan_consume(void *ctrl, size_t cons_off, size_t notify_off, uint32_t cons,
                          uint8_t bit);
int64_t  ax_vchan_send(void *ctrl, size_t cons_off, size_t prod_off, size_t notify_off,
                       void *ring, uint32_t size, const void *src, size_t n);
int64_t  ax_vchan_recv(void *ctrl, size_t cons_off, size_t prod_off, size_t notify_off,
                       const void *ring, uint32_t size, void *dst, size_t n);
int64_t  ax_vchan_arm(void *ctrl, size_t peer_notify_off, uint8_t bit, size_t cons_off,
                      size_t prod_off, uint32_t size);
int64_t  ax_vchan_poll_arm(void *ctrl, size_t cons_off, size_t prod_off, size_t notify_off,
                           uint8_t eof_bit, size_t live_off, size_t peer_notify_off,
                           uint8_t arm_bit, uint32_t size);
/* benchmark reference: a cross-process byte stream through a shared ring, all in C */
int64_t  ax_xring_produce(void *hdr, void *ring, uint32_t size, const void *src, size_t chunk,
                          uint64_t total, double timeout);
int64_t  ax_xring_consume(void *hdr, const void *ring, uint32_t size, void *dst, size_t room,
                          uint64_t total, double timeout);
/* vchan reader step: release, check both rings, maybe arm -- one call (aioxen.vchan.wire) */
int64_t  ax_vchan_step(void *ctrl, const uint32_t *cfg, int64_t new_cons, uint8_t arm_bit);
/* vchan bulk spin-wait (issue 18): spin while prod - cons == stuck, at most max_ns;
   -1, or ns taken | ns off the CPU << 24 */
int64_t  ax_vchan_spin(const void *ctrl, size_t cons_off, size_t prod_off, uint32_t stuck,
                       int64_t max_ns);
"""

SOURCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native_impl.c")
"""The C source, a real ``.c`` file (beside this script; shipped in the sdist and wheel)."""

with open(SOURCE_FILE, encoding="utf-8") as _f:
    SOURCE = _f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("aioxen._native", SOURCE, extra_compile_args=["-O2"], depends=[SOURCE_FILE])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
