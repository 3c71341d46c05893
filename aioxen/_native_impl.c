/* The C half of aioxen._native, compiled by aioxen/_native_build.py (cffi, API mode).
 *
 * cffi reads this file and compiles it into the extension module: every function here is
 * declared in _native_build.py's CDEF (the interface Python sees) and called through
 * aioxen/native.py.  What it does:
 *
 *  - atomics on shared memory: acquire loads, release stores, fetch-or/fetch-and,
 *    exchange, a full fence (what Python cannot express);
 *  - byte rings (vchan, console, xenstore): wrap-aware copies with each shared index read
 *    once and validated (XSA-155), run without the GIL;
 *  - io/ring.h rings: push-and-check-notify and RING_FINAL_CHECK_FOR_* with the peer's
 *    event index (the ring protocol's notification decision, not just a primitive);
 *  - vchan: the libxenvchan data-path steps with the notify-bit protocol fused in
 *    (publish an index, test-and-clear our notify byte, arm the peer's, re-read the ring);
 *    the state machine around them stays in Python (aioxen/vchan/wire.py);
 *  - the xen platform: fixed mmap(2)/mprotect(2) for composing grant mappings, ioctl(2)
 *    with a struct argument;
 *  - benchmark references (memcpy_repeat, xring_produce/consume).
 *
 * Every function is static: cffi generates one wrapper per CDEF entry in the same
 * translation unit, so the compiler can inline these into the wrappers (dense on purpose:
 * these are the hot paths).
 */

#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/ioctl.h>

#define AX_PTR(T, base, off) ((T *)((char *)(base) + (off)))

static uint8_t  ax_load_u8(const void *b, size_t o)  { return __atomic_load_n(AX_PTR(const uint8_t, b, o), __ATOMIC_ACQUIRE); }
static uint16_t ax_load_u16(const void *b, size_t o) { return __atomic_load_n(AX_PTR(const uint16_t, b, o), __ATOMIC_ACQUIRE); }
static uint32_t ax_load_u32(const void *b, size_t o) { return __atomic_load_n(AX_PTR(const uint32_t, b, o), __ATOMIC_ACQUIRE); }
static void ax_store_u8(void *b, size_t o, uint8_t v)   { __atomic_store_n(AX_PTR(uint8_t, b, o), v, __ATOMIC_RELEASE); }
static void ax_store_u16(void *b, size_t o, uint16_t v) { __atomic_store_n(AX_PTR(uint16_t, b, o), v, __ATOMIC_RELEASE); }
static void ax_store_u32(void *b, size_t o, uint32_t v) { __atomic_store_n(AX_PTR(uint32_t, b, o), v, __ATOMIC_RELEASE); }
static uint8_t ax_fetch_or_u8(void *b, size_t o, uint8_t v)  { return __atomic_fetch_or(AX_PTR(uint8_t, b, o), v, __ATOMIC_SEQ_CST); }
static uint8_t ax_fetch_and_u8(void *b, size_t o, uint8_t v) { return __atomic_fetch_and(AX_PTR(uint8_t, b, o), v, __ATOMIC_SEQ_CST); }
static uint32_t ax_exchange_u32(void *b, size_t o, uint32_t v) { return __atomic_exchange_n(AX_PTR(uint32_t, b, o), v, __ATOMIC_SEQ_CST); }
static void ax_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Byte rings (vchan, console, xenstore): free-running u32 indices, power-of-two size.
 * Each shared index is loaded exactly once and validated (XSA-155, XSA-86); a ring whose
 * indices claim more than `size` bytes in flight is reported as -1. */
static int64_t ax_bring_used(const void *idx, size_t cons_off, size_t prod_off, uint32_t size)
{
    uint32_t prod = __atomic_load_n(AX_PTR(const uint32_t, idx, prod_off), __ATOMIC_ACQUIRE);
    uint32_t cons = __atomic_load_n(AX_PTR(const uint32_t, idx, cons_off), __ATOMIC_ACQUIRE);
    uint32_t used = prod - cons;
    return used > size ? -1 : (int64_t)used;
}

/* Copy to or from memory another CPU is using (a shared ring), with plain unaligned
 * 16-byte vector moves rather than memcpy.  For mid-sized and large copies glibc's memcpy
 * uses `rep movsb` on CPUs with ERMS/FSRM, and on the AMD EPYC we benchmark on that runs at
 * ~2.5-3 GiB/s when source and destination are not 16-byte aligned relative to each other
 * and the other core is using the ring's cache lines -- 3-5x slower than these moves
 * (which match memcpy when both are aligned).  A byte stream's ring position is
 * arbitrary (any write of n % 16 != 0 shifts every later one), so this is the common
 * case, not a corner: docs/benchmarks.md ("the protocol rows with 1 MiB rings").  The
 * empty asm keeps the compiler from turning the loop back into a memcpy call. */
typedef unsigned char ax_v16 __attribute__((vector_size(16), aligned(1), may_alias));

static void ax_copy_to_shared(void *dst, const void *src, size_t n)
{
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    while (n >= 64) {
        ax_v16 a = *(const ax_v16 *)s, b = *(const ax_v16 *)(s + 16);
        ax_v16 c = *(const ax_v16 *)(s + 32), e = *(const ax_v16 *)(s + 48);
        *(ax_v16 *)d = a;
        *(ax_v16 *)(d + 16) = b;
        *(ax_v16 *)(d + 32) = c;
        *(ax_v16 *)(d + 48) = e;
        d += 64;
        s += 64;
        n -= 64;
        __asm__ __volatile__("" : "+r"(d), "+r"(s));
    }
    if (n) memcpy(d, s, n);
}

static void ax_ring_copy_in(void *ring, uint32_t size, uint32_t i, const void *src, size_t n)
{
    uint32_t off = i & (size - 1);
    size_t first = size - off;
    if (first > n) first = n;
    ax_copy_to_shared((char *)ring + off, src, first);
    if (n > first) ax_copy_to_shared(ring, (const char *)src + first, n - first);
}

static void ax_ring_copy_out(const void *ring, uint32_t size, uint32_t i, void *dst, size_t n)
{
    uint32_t off = i & (size - 1);
    size_t first = size - off;
    if (first > n) first = n;
    ax_copy_to_shared(dst, (const char *)ring + off, first);
    if (n > first) ax_copy_to_shared((char *)dst + first, ring, n - first);
}

static int64_t ax_bring_write(void *idx, size_t cons_off, size_t prod_off,
                              void *ring, uint32_t size, const void *src, size_t n)
{
    uint32_t cons = __atomic_load_n(AX_PTR(uint32_t, idx, cons_off), __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(AX_PTR(uint32_t, idx, prod_off), __ATOMIC_RELAXED);
    uint32_t used = prod - cons;
    if (used > size) return -1;
    size_t space = size - used;
    if (n > space) n = space;
    if (n == 0) return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* indices read before data written */
    ax_ring_copy_in(ring, size, prod, src, n);
    __atomic_store_n(AX_PTR(uint32_t, idx, prod_off), prod + (uint32_t)n, __ATOMIC_RELEASE);
    return (int64_t)n;
}

static int64_t ax_bring_read(void *idx, size_t cons_off, size_t prod_off,
                             const void *ring, uint32_t size, void *dst, size_t n)
{
    uint32_t prod = __atomic_load_n(AX_PTR(uint32_t, idx, prod_off), __ATOMIC_ACQUIRE);
    uint32_t cons = __atomic_load_n(AX_PTR(uint32_t, idx, cons_off), __ATOMIC_RELAXED);
    uint32_t used = prod - cons;
    if (used > size) return -1;
    if (n > used) n = used;
    if (n == 0) return 0;
    ax_ring_copy_out(ring, size, cons, dst, n);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* data read before space released */
    __atomic_store_n(AX_PTR(uint32_t, idx, cons_off), cons + (uint32_t)n, __ATOMIC_RELEASE);
    return (int64_t)n;
}

static void ax_memcpy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }

static uintptr_t ax_address(const void *p) { return (uintptr_t)p; }

static int ax_mmap_fixed(uintptr_t addr, size_t len, int prot, int fd, int64_t offset)
{
    void *p = mmap((void *)addr, len, prot, MAP_SHARED | MAP_FIXED, fd, (off_t)offset);
    if (p == MAP_FAILED) return errno;
    return 0;
}

static int ax_mprotect(uintptr_t addr, size_t len, int prot)
{
    return mprotect((void *)addr, len, prot) == 0 ? 0 : errno;
}

static int ax_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* Benchmark reference: `times` back-to-back copies of n bytes (the physical limit). */
static void ax_memcpy_repeat(void *dst, const void *src, size_t n, uint64_t times)
{
    for (uint64_t i = 0; i < times; i++) {
        memcpy(dst, src, n);
        __asm__ __volatile__("" : : "r"(dst) : "memory");
    }
}

/* io/ring.h push-and-check-notify in one call: publish `nw` at prod_off (release), full
 * fence, read the peer's event index once, and report whether it lies in (old, nw]. */
static int ax_ring_push(void *b, size_t prod_off, size_t event_off, uint32_t old, uint32_t nw)
{
    __atomic_store_n(AX_PTR(uint32_t, b, prod_off), nw, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t ev = __atomic_load_n(AX_PTR(uint32_t, b, event_off), __ATOMIC_ACQUIRE);
    return (uint32_t)(nw - ev) < (uint32_t)(nw - old);
}

/* Store an event index, then a full fence (the first half of a ring final check). */
static void ax_store_fence(void *b, size_t off, uint32_t v)
{
    __atomic_store_n(AX_PTR(uint32_t, b, off), v, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* ax_ring_push, but first check that our own producer index still holds `old` (the peer
 * must never write it): -1 if it was overwritten, else the notify decision. */
static int ax_ring_push_checked(void *b, size_t prod_off, size_t event_off, uint32_t old,
                                uint32_t nw)
{
    if (__atomic_load_n(AX_PTR(uint32_t, b, prod_off), __ATOMIC_RELAXED) != old) return -1;
    return ax_ring_push(b, prod_off, event_off, old, nw);
}

/* RING_FINAL_CHECK_FOR_*: read the peer's producer once; if it equals `cons` (nothing
 * new), ask for an event at cons + ahead, fence, and read it again.  Returns the producer
 * index last read; the caller validates it. */
static uint32_t ax_ring_final_check(void *b, size_t prod_off, size_t event_off, uint32_t cons,
                                    uint32_t ahead)
{
    uint32_t prod = __atomic_load_n(AX_PTR(uint32_t, b, prod_off), __ATOMIC_ACQUIRE);
    if (prod != cons) return prod;
    __atomic_store_n(AX_PTR(uint32_t, b, event_off), cons + ahead, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(AX_PTR(uint32_t, b, prod_off), __ATOMIC_ACQUIRE);
}

/* vchan: one call per step of the data path.  Notify bits: the caller's own notify byte
 * is test-and-cleared after producing/consuming (1 << 32 in the result = send an event);
 * the peer's byte gets a bit OR-ed in to ask for an event, then the ring is re-read. */

/* Own notify byte first, then prod and cons (acquire, each once).  -1 if corrupt, else
 * used | cons << 21 | (own byte & eof_bit ? 1 << 53 : 0). */
static int64_t ax_vchan_poll(const void *ctrl, size_t cons_off, size_t prod_off,
                             size_t notify_off, uint8_t eof_bit, uint32_t size)
{
    uint8_t note = __atomic_load_n(AX_PTR(const uint8_t, ctrl, notify_off), __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(AX_PTR(const uint32_t, ctrl, prod_off), __ATOMIC_ACQUIRE);
    uint32_t cons = __atomic_load_n(AX_PTR(const uint32_t, ctrl, cons_off), __ATOMIC_ACQUIRE);
    uint32_t used = prod - cons;
    if (used > size) return -1;
    return (int64_t)used | ((int64_t)cons << 21) | ((note & eof_bit) ? ((int64_t)1 << 53) : 0);
}

/* Publish a new consumer index (release), then test-and-clear `bit` in our notify byte. */
static int ax_vchan_consume(void *ctrl, size_t cons_off, size_t notify_off, uint32_t cons,
                            uint8_t bit)
{
    __atomic_store_n(AX_PTR(uint32_t, ctrl, cons_off), cons, __ATOMIC_RELEASE);
    return (__atomic_fetch_and(AX_PTR(uint8_t, ctrl, notify_off), (uint8_t)~bit,
                               __ATOMIC_SEQ_CST) & bit) != 0;
}

static int64_t ax_vchan_send(void *ctrl, size_t cons_off, size_t prod_off, size_t notify_off,
                             void *ring, uint32_t size, const void *src, size_t n)
{
    int64_t put = ax_bring_write(ctrl, cons_off, prod_off, ring, size, src, n);
    if (put <= 0) return put;
    if (__atomic_fetch_and(AX_PTR(uint8_t, ctrl, notify_off), (uint8_t)~1u, __ATOMIC_SEQ_CST) & 1u)
        put |= (int64_t)1 << 32;
    return put;
}

static int64_t ax_vchan_recv(void *ctrl, size_t cons_off, size_t prod_off, size_t notify_off,
                             const void *ring, uint32_t size, void *dst, size_t n)
{
    int64_t got = ax_bring_read(ctrl, cons_off, prod_off, ring, size, dst, n);
    if (got <= 0) return got;
    if (__atomic_fetch_and(AX_PTR(uint8_t, ctrl, notify_off), (uint8_t)~2u, __ATOMIC_SEQ_CST) & 2u)
        got |= (int64_t)1 << 32;
    return got;
}

/* Ask the peer for an event (OR `bit` into its byte; a full barrier), then re-read the
 * ring: bytes used, or -1 if corrupt. */
static int64_t ax_vchan_arm(void *ctrl, size_t peer_notify_off, uint8_t bit, size_t cons_off,
                            size_t prod_off, uint32_t size)
{
    __atomic_fetch_or(AX_PTR(uint8_t, ctrl, peer_notify_off), bit, __ATOMIC_SEQ_CST);
    return ax_bring_used(ctrl, cons_off, prod_off, size);
}

/* The reader's whole check in one call: own notify byte (EOF bit), peer live byte, then
 * prod and cons (acquire, each once).  If the ring is empty, the EOF bit is clear and
 * arm_bit is non-zero, OR arm_bit into the peer's notify byte (full barrier) and re-read
 * prod.  -1 if corrupt, else
 * used | cons << 21 | (EOF ? 1 << 53 : 0) | live << 54. */
static int64_t ax_vchan_poll_arm(void *ctrl, size_t cons_off, size_t prod_off,
                                 size_t notify_off, uint8_t eof_bit, size_t live_off,
                                 size_t peer_notify_off, uint8_t arm_bit, uint32_t size)
{
    uint8_t note = __atomic_load_n(AX_PTR(const uint8_t, ctrl, notify_off), __ATOMIC_ACQUIRE);
    uint8_t live = __atomic_load_n(AX_PTR(const uint8_t, ctrl, live_off), __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(AX_PTR(const uint32_t, ctrl, prod_off), __ATOMIC_ACQUIRE);
    uint32_t cons = __atomic_load_n(AX_PTR(const uint32_t, ctrl, cons_off), __ATOMIC_ACQUIRE);
    uint32_t used = prod - cons;
    if (used > size) return -1;
    if (used == 0 && arm_bit && !(note & eof_bit)) {
        __atomic_fetch_or(AX_PTR(uint8_t, ctrl, peer_notify_off), arm_bit, __ATOMIC_SEQ_CST);
        prod = __atomic_load_n(AX_PTR(const uint32_t, ctrl, prod_off), __ATOMIC_ACQUIRE);
        used = prod - cons;
        if (used > size) return -1;
    }
    return (int64_t)used | ((int64_t)cons << 21) | ((note & eof_bit) ? ((int64_t)1 << 53) : 0)
           | ((int64_t)live << 54);
}

/* Benchmark reference (aioxen.bench.suites.memcpy): the fastest a cross-process byte
 * stream can be with this design -- a producer process copies `chunk`-byte writes from a
 * private, cache-hot buffer into a shared power-of-two ring, a consumer process copies out
 * up to `room` bytes at a time into a private buffer; u32 free-running indices, `prod` at
 * hdr+0 and `cons` at hdr+64 (separate cache lines).  Both wait by spinning with a CPU
 * pause hint and yield the CPU after a few hundred empty spins (so two processes sharing
 * one CPU still make progress), and give up after `timeout` seconds without progress
 * (-1).  The consumer returns the nanoseconds from the first byte seen to the last byte
 * consumed; the producer returns 0. */
#include <sched.h>
#include <time.h>

static inline void ax_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t ax_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* One empty spin; returns non-zero once `timeout` passed since *since. */
static int ax_spin(uint32_t *spins, int64_t *since, double timeout)
{
    ax_cpu_relax();
    if (++*spins % 256 == 0) {
        sched_yield();
        if (ax_now_ns() - *since > (int64_t)(timeout * 1e9)) return 1;
    }
    return 0;
}

static int64_t ax_xring_produce(void *hdr, void *ring, uint32_t size, const void *src,
                                size_t chunk, uint64_t total, double timeout)
{
    uint32_t *prodp = AX_PTR(uint32_t, hdr, 0), *consp = AX_PTR(uint32_t, hdr, 64);
    uint32_t prod = __atomic_load_n(prodp, __ATOMIC_RELAXED), spins = 0;
    uint64_t done = 0;
    size_t in_chunk = 0;
    int64_t since = ax_now_ns();
    while (done < total) {
        uint32_t cons = __atomic_load_n(consp, __ATOMIC_ACQUIRE);
        size_t space = size - (uint32_t)(prod - cons);
        if (space == 0) {
            if (ax_spin(&spins, &since, timeout)) return -1;
            continue;
        }
        size_t n = chunk - in_chunk;
        if (n > space) n = space;
        if (n > total - done) n = (size_t)(total - done);
        ax_ring_copy_in(ring, size, prod, (const char *)src + in_chunk, n);
        prod += (uint32_t)n;
        __atomic_store_n(prodp, prod, __ATOMIC_RELEASE);
        done += n;
        in_chunk = (in_chunk + n) % chunk;
        since = ax_now_ns();
    }
    return 0;
}

static int64_t ax_xring_consume(void *hdr, const void *ring, uint32_t size, void *dst,
                                size_t room, uint64_t total, double timeout)
{
    uint32_t *prodp = AX_PTR(uint32_t, hdr, 0), *consp = AX_PTR(uint32_t, hdr, 64);
    uint32_t cons = __atomic_load_n(consp, __ATOMIC_RELAXED), spins = 0;
    uint64_t done = 0;
    int64_t since = ax_now_ns(), first = 0;
    while (done < total) {
        uint32_t prod = __atomic_load_n(prodp, __ATOMIC_ACQUIRE);
        size_t used = (uint32_t)(prod - cons);
        if (used == 0) {
            if (ax_spin(&spins, &since, timeout)) return -1;
            continue;
        }
        if (!first) first = ax_now_ns();
        size_t n = used < room ? used : room;
        ax_ring_copy_out(ring, size, cons, dst, n);
        cons += (uint32_t)n;
        __atomic_store_n(consp, cons, __ATOMIC_RELEASE);
        done += n;
        since = ax_now_ns();
    }
    return ax_now_ns() - first;
}

/* The vchan reader's whole step in one call.  cfg (u32 each): [0] read cons offset,
 * [1] read prod offset, [2] own notify offset, [3] peer live offset, [4] peer notify offset,
 * [5] write cons offset, [6] write prod offset, [7] read ring size, [8] write ring size.
 * 1. If new_cons >= 0: publish it as the read ring's cons (release) and test-and-clear
 *    NOTIFY_READ (0x2) in our notify byte (bit 55 of the result: send an event).
 * 2. Load our notify byte (EOF bit 0x80), the peer's live byte, read prod and cons (acquire,
 *    each once); validate used <= size.  Validate the write ring the same way.
 * 3. If the read ring is empty, EOF is not set and arm_bit != 0: OR arm_bit into the peer's
 *    notify byte (full barrier) and re-read prod (validated again).
 * Result: -1 read ring corrupt, -2 write ring corrupt, -3 peer live byte > 1, else
 * used | cons << 21 | EOF << 53 | live << 54 | notify << 55. */
static int64_t ax_vchan_step(void *ctrl, const uint32_t *cfg, int64_t new_cons, uint8_t arm_bit)
{
    int64_t notify = 0;
    if (new_cons >= 0) {
        __atomic_store_n(AX_PTR(uint32_t, ctrl, cfg[0]), (uint32_t)new_cons, __ATOMIC_RELEASE);
        if (__atomic_fetch_and(AX_PTR(uint8_t, ctrl, cfg[2]), (uint8_t)~2u, __ATOMIC_SEQ_CST) & 2u)
            notify = (int64_t)1 << 55;
    }
    uint8_t note = __atomic_load_n(AX_PTR(const uint8_t, ctrl, cfg[2]), __ATOMIC_ACQUIRE);
    uint8_t live = __atomic_load_n(AX_PTR(const uint8_t, ctrl, cfg[3]), __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(AX_PTR(const uint32_t, ctrl, cfg[1]), __ATOMIC_ACQUIRE);
    uint32_t cons = __atomic_load_n(AX_PTR(const uint32_t, ctrl, cfg[0]), __ATOMIC_ACQUIRE);
    uint32_t used = prod - cons;
    if (used > cfg[7]) return -1;
    if (ax_bring_used(ctrl, cfg[5], cfg[6], cfg[8]) < 0) return -2;
    if (live > 1) return -3;
    if (used == 0 && arm_bit && !(note & 0x80)) {
        __atomic_fetch_or(AX_PTR(uint8_t, ctrl, cfg[4]), arm_bit, __ATOMIC_SEQ_CST);
        prod = __atomic_load_n(AX_PTR(const uint32_t, ctrl, cfg[1]), __ATOMIC_ACQUIRE);
        used = prod - cons;
        if (used > cfg[7]) return -1;
    }
    return (int64_t)used | ((int64_t)cons << 21) | ((note & 0x80) ? ((int64_t)1 << 53) : 0)
           | ((int64_t)live << 54) | notify;
}

/* ==== vchan bulk spin-wait (issue 18, data path) ====================================
 * A bulk transfer through a small ring waits, every ring's worth, for the peer to copy it
 * (a few microseconds), while a sleep and an event-channel wake-up cost tens.  So before
 * asking for a notification the transport may spin here, briefly:
 *
 * Spin while `prod - cons` (u32, both loaded with acquire, each once per look) equals
 * `stuck` -- 0 for a reader waiting for data, the ring size for a writer waiting for
 * space -- for at most `max_ns` nanoseconds.  Returns -1 on timeout, else the nanoseconds
 * it took (bits 0..23, capped) | the nanoseconds of that we spent off the CPU (bits
 * 24..47, capped; thread CPU time against wall time: a spin that had to give its CPU away
 * means the CPUs are contended, where spinning only takes time from others).  The looks
 * only decide whether to stop spinning: the caller then goes through the ordinary
 * validated step/send path, which reads the indices again once and checks them, so a peer
 * scribbling on the page gets nothing here but a bounded wait.  The CPU is yielded every
 * 256 looks (about 10 us), so a peer that shares our CPU gets to run. */
static int64_t ax_thread_cpu_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t ax_vchan_spin(const void *ctrl, size_t cons_off, size_t prod_off, uint32_t stuck,
                             int64_t max_ns)
{
    const uint32_t *pp = AX_PTR(const uint32_t, ctrl, prod_off);
    const uint32_t *cp = AX_PTR(const uint32_t, ctrl, cons_off);
    int64_t start = ax_now_ns(), cpu0 = ax_thread_cpu_ns();
    for (uint32_t looks = 1;; looks++) {
        uint32_t used = __atomic_load_n(pp, __ATOMIC_ACQUIRE) - __atomic_load_n(cp, __ATOMIC_ACQUIRE);
        if (used != stuck) {
            int64_t took = ax_now_ns() - start;
            int64_t off = took - (ax_thread_cpu_ns() - cpu0);
            if (off < 0) off = 0;
            if (took > 0xFFFFFF) took = 0xFFFFFF;
            if (off > 0xFFFFFF) off = 0xFFFFFF;
            return took | (off << 24);
        }
        ax_cpu_relax();
        if ((looks & 31) == 0) {
            if (ax_now_ns() - start >= max_ns) return -1;
            if ((looks & 255) == 0) sched_yield();
        }
    }
}
