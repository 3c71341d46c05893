/*
 * ringpeer: one end of an io/ring.h ring, built from the real Xen macros
 * (DEFINE_RING_TYPES via <xen/io/netif.h> and <xen/io/blkif.h>), driven line by line
 * from stdin so that a test can interleave it with the Python implementation.
 *
 *   ringpeer front|back tx|rx|blk FILE BYTES START
 *
 * FILE is mmap'd MAP_SHARED (BYTES long).  The front initialises the shared ring
 * (SHARED_RING_INIT, then moves all indices to START for wrap-around tests) and attaches
 * with FRONT_RING_ATTACH(START); the back attaches with BACK_RING_ATTACH(START).
 *
 * Commands (one reply line each):
 *   put N    front: produce requests number k, k+1, ... (content is a function of k)
 *            back:  answer the N oldest consumed requests (content is a function of
 *                   the request)                                      -> "ok"
 *   push     RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY          -> "notify 0|1"
 *   take     consume everything RING_HAS_UNCONSUMED_* reports, copying each entry with
 *            RING_COPY_*                                              -> "got N f f f ..."
 *   final    RING_FINAL_CHECK_FOR_{RESPONSES,REQUESTS}                -> "more 0|1"
 *   info     the shared header                 -> "info req_prod req_event rsp_prod rsp_event"
 *   quit
 * Content rules are mirrored in tests/rings/c_peer.py.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define wmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#include <xen/io/blkif.h>
#include <xen/io/netif.h>

#define MAXQ 4096

static int is_front;
static char kind;
static uint32_t next_k;

/* Requests consumed by the back end and not yet answered (FIFO of ids etc.). */
static struct { uint64_t id; uint8_t op; } q[MAXQ];
static unsigned qh, qt;

static void die(const char *m) { fprintf(stderr, "ringpeer: %s (%s)\n", m, strerror(errno)); exit(2); }

static void tx_req(uint32_t k, netif_tx_request_t *r)
{
    r->gref = k * 7u + 1u; r->offset = k & 0xfff; r->flags = k & 0xf;
    r->id = k & 0xffff; r->size = (k * 3u) & 0xffff;
}
static void rx_req(uint32_t k, netif_rx_request_t *r)
{
    r->id = k & 0xffff; r->pad = 0; r->gref = k * 5u + 3u;
}
static void blk_req(uint32_t k, blkif_request_t *r)
{
    memset(r, 0, sizeof(*r));
    r->operation = k % 2; r->nr_segments = k % 12; r->handle = 0x1234;
    r->id = (uint64_t)k * 0x100000001ull; r->sector_number = (uint64_t)k * 8u;
    for (int i = 0; i < r->nr_segments; i++) {
        r->seg[i].gref = k * 16u + i; r->seg[i].first_sect = i % 8; r->seg[i].last_sect = 7;
    }
}

int main(int argc, char **argv)
{
    if (argc != 6) { fprintf(stderr, "usage: ringpeer front|back tx|rx|blk FILE BYTES START\n"); return 2; }
    is_front = strcmp(argv[1], "front") == 0;
    kind = argv[2][0];
    size_t bytes = strtoul(argv[4], NULL, 0);
    uint32_t start = (uint32_t)strtoul(argv[5], NULL, 0);
    int fd = open(argv[3], O_RDWR);
    if (fd < 0) die("open");
    void *page = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (page == MAP_FAILED) die("mmap");
    next_k = start;

    netif_tx_front_ring_t txf; netif_tx_back_ring_t txb;
    netif_rx_front_ring_t rxf; netif_rx_back_ring_t rxb;
    blkif_front_ring_t bf; blkif_back_ring_t bb;

#define SETUP(F, B, S)                                                         \
    if (is_front) {                                                            \
        SHARED_RING_INIT((S *)page);                                           \
        ((S *)page)->req_prod = ((S *)page)->rsp_prod = start;                 \
        ((S *)page)->req_event = ((S *)page)->rsp_event = start + 1;           \
        FRONT_RING_ATTACH(&F, (S *)page, start, bytes);                        \
    } else {                                                                   \
        BACK_RING_ATTACH(&B, (S *)page, start, bytes);                         \
    }
    if (kind == 't') { SETUP(txf, txb, netif_tx_sring_t) }
    else if (kind == 'r') { SETUP(rxf, rxb, netif_rx_sring_t) }
    else { SETUP(bf, bb, blkif_sring_t) }

    char line[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %u\n", kind == 't' ? (is_front ? RING_SIZE(&txf) : RING_SIZE(&txb))
                       : kind == 'r' ? (is_front ? RING_SIZE(&rxf) : RING_SIZE(&rxb))
                       : (is_front ? RING_SIZE(&bf) : RING_SIZE(&bb)));
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16]; unsigned n = 0;
        if (sscanf(line, "%15s %u", cmd, &n) < 1) continue;
        if (!strcmp(cmd, "quit")) break;
        if (!strcmp(cmd, "info")) {
            netif_tx_sring_t *s = page;
            printf("info %u %u %u %u\n", s->req_prod, s->req_event, s->rsp_prod, s->rsp_event);
        } else if (!strcmp(cmd, "put") && is_front) {
            for (unsigned i = 0; i < n; i++, next_k++) {
                if (kind == 't') { if (RING_FULL(&txf)) die("full"); tx_req(next_k, RING_GET_REQUEST(&txf, txf.req_prod_pvt)); txf.req_prod_pvt++; }
                else if (kind == 'r') { if (RING_FULL(&rxf)) die("full"); rx_req(next_k, RING_GET_REQUEST(&rxf, rxf.req_prod_pvt)); rxf.req_prod_pvt++; }
                else { if (RING_FULL(&bf)) die("full"); blk_req(next_k, RING_GET_REQUEST(&bf, bf.req_prod_pvt)); bf.req_prod_pvt++; }
            }
            printf("ok\n");
        } else if (!strcmp(cmd, "put")) {
            for (unsigned i = 0; i < n; i++) {
                if (qh == qt) die("no request to answer");
                uint64_t id = q[qh % MAXQ].id; uint8_t op = q[qh % MAXQ].op; qh++;
                if (kind == 't') {
                    netif_tx_response_t *r = RING_GET_RESPONSE(&txb, txb.rsp_prod_pvt++);
                    r->id = (uint16_t)id; r->status = (int16_t)((int)(id % 3) - 1);
                } else if (kind == 'r') {
                    netif_rx_response_t *r = RING_GET_RESPONSE(&rxb, rxb.rsp_prod_pvt++);
                    r->id = (uint16_t)id; r->offset = id & 0xff; r->flags = 1; r->status = (int16_t)(id % 1500);
                } else {
                    blkif_response_t *r = RING_GET_RESPONSE(&bb, bb.rsp_prod_pvt++);
                    r->id = id; r->operation = op; r->status = (int16_t)(-(int)(id % 3));
                }
            }
            printf("ok\n");
        } else if (!strcmp(cmd, "push")) {
            int notify;
            if (is_front) {
                if (kind == 't') RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&txf, notify);
                else if (kind == 'r') RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&rxf, notify);
                else RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&bf, notify);
            } else {
                if (kind == 't') RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&txb, notify);
                else if (kind == 'r') RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&rxb, notify);
                else RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&bb, notify);
            }
            printf("notify %d\n", notify ? 1 : 0);
        } else if (!strcmp(cmd, "final")) {
            int more;
            if (is_front) {
                if (kind == 't') RING_FINAL_CHECK_FOR_RESPONSES(&txf, more);
                else if (kind == 'r') RING_FINAL_CHECK_FOR_RESPONSES(&rxf, more);
                else RING_FINAL_CHECK_FOR_RESPONSES(&bf, more);
            } else {
                if (kind == 't') RING_FINAL_CHECK_FOR_REQUESTS(&txb, more);
                else if (kind == 'r') RING_FINAL_CHECK_FOR_REQUESTS(&rxb, more);
                else RING_FINAL_CHECK_FOR_REQUESTS(&bb, more);
            }
            printf("more %d\n", more ? 1 : 0);
        } else if (!strcmp(cmd, "take")) {
            unsigned got = 0;
            printf("got");
            if (is_front) {
                if (kind == 't') {
                    RING_IDX prod = txf.sring->rsp_prod; rmb();
                    for (; txf.rsp_cons != prod; txf.rsp_cons++, got++) {
                        netif_tx_response_t r; RING_COPY_RESPONSE(&txf, txf.rsp_cons, &r);
                        printf(" %u:%d", r.id, r.status);
                    }
                } else if (kind == 'r') {
                    RING_IDX prod = rxf.sring->rsp_prod; rmb();
                    for (; rxf.rsp_cons != prod; rxf.rsp_cons++, got++) {
                        netif_rx_response_t r; RING_COPY_RESPONSE(&rxf, rxf.rsp_cons, &r);
                        printf(" %u:%u:%u:%d", r.id, r.offset, r.flags, r.status);
                    }
                } else {
                    RING_IDX prod = bf.sring->rsp_prod; rmb();
                    for (; bf.rsp_cons != prod; bf.rsp_cons++, got++) {
                        blkif_response_t r; RING_COPY_RESPONSE(&bf, bf.rsp_cons, &r);
                        printf(" %" PRIu64 ":%u:%d", r.id, r.operation, r.status);
                    }
                }
            } else {
                if (kind == 't') {
                    RING_IDX prod = txb.sring->req_prod; rmb();
                    if (RING_REQUEST_PROD_OVERFLOW(&txb, prod)) die("req_prod overflow");
                    for (; txb.req_cons != prod; txb.req_cons++, got++) {
                        netif_tx_request_t r; RING_COPY_REQUEST(&txb, txb.req_cons, &r);
                        printf(" %u:%u:%u:%u:%u", r.gref, r.offset, r.flags, r.id, r.size);
                        q[qt % MAXQ].id = r.id; q[qt % MAXQ].op = 0; qt++;
                    }
                } else if (kind == 'r') {
                    RING_IDX prod = rxb.sring->req_prod; rmb();
                    if (RING_REQUEST_PROD_OVERFLOW(&rxb, prod)) die("req_prod overflow");
                    for (; rxb.req_cons != prod; rxb.req_cons++, got++) {
                        netif_rx_request_t r; RING_COPY_REQUEST(&rxb, rxb.req_cons, &r);
                        printf(" %u:%u", r.id, r.gref);
                        q[qt % MAXQ].id = r.id; q[qt % MAXQ].op = 0; qt++;
                    }
                } else {
                    RING_IDX prod = bb.sring->req_prod; rmb();
                    if (RING_REQUEST_PROD_OVERFLOW(&bb, prod)) die("req_prod overflow");
                    for (; bb.req_cons != prod; bb.req_cons++, got++) {
                        blkif_request_t r; RING_COPY_REQUEST(&bb, bb.req_cons, &r);
                        printf(" %u:%u:%u:%" PRIu64 ":%" PRIu64, r.operation, r.nr_segments,
                               r.handle, r.id, r.sector_number);
                        for (int i = 0; i < r.nr_segments && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
                            printf(":%u/%u/%u", r.seg[i].gref, r.seg[i].first_sect, r.seg[i].last_sect);
                        q[qt % MAXQ].id = r.id; q[qt % MAXQ].op = r.operation; qt++;
                    }
                }
            }
            printf("\n");
            (void)got;
        } else {
            printf("error unknown command %s\n", cmd);
        }
    }
    return 0;
}
