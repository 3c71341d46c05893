/*
 * xenvchan_peer: the real libxenvchan (libxen-dev's libxenvchan.a, unmodified), linked
 * against a small emulation of the Xen libraries it calls, so that a test can run it
 * against aioxen's vchan in another process.
 *
 * Emulation (environment):
 *   SHIM_DIR    grants: one 4096-byte file per grant ref, "SHIM_DIR/g<ref>", mapped with
 *               mmap(MAP_SHARED|MAP_FIXED) into contiguous regions; unsharing unlinks them.
 *               XenStore: "SHIM_DIR/xs/<path, '/' -> '_'>" files.  Every xs_write,
 *               xs_set_permissions and xs_rm is also logged on stderr ("XS ...").
 *   SHIM_EVFD   the event channel: a connected Unix socket; notify writes one byte,
 *               pending reads one (EOF = peer gone -> -1).  Default 3.
 *   SHIM_DOMID  the domid reported for the relative key "domid".  Default 1.
 *   SHIM_REF    first grant ref this process allocates.  Default 8.
 *
 * Modes:
 *   layout                       print the header layout and, for size pairs read from
 *                                stdin ("LEFT RIGHT" per line), what libxenvchan_server_init
 *                                puts in the control page
 *   server PEER PATH LMIN RMIN   libxenvchan_server_init; print "READY"; then echo
 *   client PEER PATH             libxenvchan_client_init; print "READY"; then echo
 *   server-blast PEER PATH LMIN RMIN N / client-blast PEER PATH N
 *                                as above, but write N pattern bytes (byte i is
 *                                (i * 131 + (i >> 9)) & 0xff) and close at once
 *
 * Echo: blocking libxenvchan_read of up to 64 KiB, libxenvchan_write of all of it, until
 * read fails (peer closed and drained); then print "ECHOED <bytes>" and libxenvchan_close.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libxenvchan.h>
#include <xenstore.h>

#define PAGE 4096

static const char *shim_dir(void)
{
    const char *d = getenv("SHIM_DIR");
    if (!d) { fprintf(stderr, "SHIM_DIR not set\n"); exit(2); }
    return d;
}

static int evfd(void) { const char *s = getenv("SHIM_EVFD"); return s ? atoi(s) : 3; }

/* ---- grants ------------------------------------------------------------------------ */

struct region { void *addr; uint32_t count; uint32_t refs[256]; int notify_off; int notify_port; int owner; };
#define NREGIONS 1024
static struct region regions[NREGIONS];

static struct region *new_region(void)
{
    for (int i = 0; i < NREGIONS; i++) if (!regions[i].addr) return &regions[i];
    errno = ENOSPC;
    return NULL;
}

static struct region *find_region(void *addr)
{
    for (int i = 0; i < NREGIONS; i++) if (regions[i].addr == addr) return &regions[i];
    return NULL;
}

static void ref_path(char *buf, size_t n, uint32_t ref) { snprintf(buf, n, "%s/g%u", shim_dir(), ref); }

static void *map_refs(uint32_t count, const uint32_t *refs, int prot, int create)
{
    void *base = mmap(NULL, (size_t)count * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return NULL;
    for (uint32_t i = 0; i < count; i++) {
        char p[512];
        ref_path(p, sizeof p, refs[i]);
        int fd = open(p, create ? (O_RDWR | O_CREAT | O_EXCL) : ((prot & PROT_WRITE) ? O_RDWR : O_RDONLY), 0600);
        if (fd < 0) { int e = errno; munmap(base, (size_t)count * PAGE); errno = e; return NULL; }
        if (create && ftruncate(fd, PAGE) < 0) { close(fd); return NULL; }
        void *m = mmap((char *)base + (size_t)i * PAGE, PAGE, prot, MAP_SHARED | MAP_FIXED, fd, 0);
        close(fd);
        if (m == MAP_FAILED) { int e = errno; munmap(base, (size_t)count * PAGE); errno = e; return NULL; }
    }
    return base;
}

static uint32_t next_ref;

xengntshr_handle *xengntshr_open(struct xentoollog_logger *l, unsigned f)
{
    (void)l; (void)f;
    if (!next_ref) next_ref = getenv("SHIM_REF") ? (uint32_t)atoi(getenv("SHIM_REF")) : 8;
    return (xengntshr_handle *)regions;
}
int xengntshr_close(xengntshr_handle *h) { (void)h; return 0; }

static void *share(uint32_t count, uint32_t *refs, int notify_off, int notify_port)
{
    struct region *r = new_region();
    if (!r) return NULL;
    for (uint32_t i = 0; i < count; i++) refs[i] = next_ref++;
    void *a = map_refs(count, refs, PROT_READ | PROT_WRITE, 1);
    if (!a) return NULL;
    r->addr = a; r->count = count; memcpy(r->refs, refs, count * 4);
    r->notify_off = notify_off; r->notify_port = notify_port; r->owner = 1;
    return a;
}

void *xengntshr_share_pages(xengntshr_handle *h, uint32_t domid, int count, uint32_t *refs, int writable)
{
    (void)h; (void)domid; (void)writable;
    return share((uint32_t)count, refs, -1, -1);
}

void *xengntshr_share_page_notify(xengntshr_handle *h, uint32_t domid, uint32_t *ref, int writable,
                                  uint32_t notify_offset, evtchn_port_t notify_port)
{
    (void)h; (void)domid; (void)writable;
    return share(1, ref, (int)notify_offset, (int)notify_port);
}

static void ev_send(void)
{
    char b = 1;
    (void)send(evfd(), &b, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static int unmap_region(void *start, uint32_t count)
{
    struct region *r = find_region(start);
    if (r && r->notify_off >= 0) ((volatile uint8_t *)start)[r->notify_off] = 0;
    if (r && r->notify_port >= 0) ev_send();
    if (r && r->owner) {
        for (uint32_t i = 0; i < r->count; i++) {
            char p[512];
            ref_path(p, sizeof p, r->refs[i]);
            unlink(p);
        }
    }
    if (r) memset(r, 0, sizeof *r);
    return munmap(start, (size_t)count * PAGE);
}

int xengntshr_unshare(xengntshr_handle *h, void *start, uint32_t count) { (void)h; return unmap_region(start, count); }

xengnttab_handle *xengnttab_open(struct xentoollog_logger *l, unsigned f) { (void)l; (void)f; return (xengnttab_handle *)regions; }
int xengnttab_close(xengnttab_handle *h) { (void)h; return 0; }

void *xengnttab_map_domain_grant_refs(xengnttab_handle *h, uint32_t count, uint32_t domid, uint32_t *refs, int prot)
{
    (void)h; (void)domid;
    struct region *r = new_region();
    if (!r) return NULL;
    void *a = map_refs(count, refs, prot, 0);
    if (!a) return NULL;
    r->addr = a; r->count = count; r->notify_off = -1; r->notify_port = -1; r->owner = 0;
    return a;
}

void *xengnttab_map_grant_ref_notify(xengnttab_handle *h, uint32_t domid, uint32_t ref, int prot,
                                     uint32_t notify_offset, evtchn_port_t notify_port)
{
    void *a = xengnttab_map_domain_grant_refs(h, 1, domid, &ref, prot);
    if (!a) return NULL;
    struct region *r = find_region(a);
    r->notify_off = (int)notify_offset; r->notify_port = (int)notify_port;
    return a;
}

int xengnttab_unmap(xengnttab_handle *h, void *start, uint32_t count) { (void)h; return unmap_region(start, count); }

/* ---- event channels ---------------------------------------------------------------- */

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *l, unsigned f) { (void)l; (void)f; return (xenevtchn_handle *)regions; }
int xenevtchn_close(xenevtchn_handle *h) { (void)h; return 0; }
int xenevtchn_fd(xenevtchn_handle *h) { (void)h; return evfd(); }
xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *h, uint32_t domid) { (void)h; (void)domid; return 5; }
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *h, uint32_t domid, evtchn_port_t p) { (void)h; (void)domid; (void)p; return 6; }
int xenevtchn_unbind(xenevtchn_handle *h, evtchn_port_t p) { (void)h; (void)p; return 0; }
int xenevtchn_unmask(xenevtchn_handle *h, evtchn_port_t p) { (void)h; (void)p; return 0; }
int xenevtchn_notify(xenevtchn_handle *h, evtchn_port_t p) { (void)h; (void)p; ev_send(); return 0; }

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *h)
{
    (void)h;
    char buf[256];
    ssize_t n = recv(evfd(), buf, sizeof buf, 0); /* coalesce everything queued */
    if (n <= 0) { errno = EPIPE; return -1; }
    return 5;
}

/* ---- xenstore ------------------------------------------------------------------------- */

struct xs_handle *xs_open(unsigned long flags) { (void)flags; return (struct xs_handle *)regions; }
void xs_close(struct xs_handle *h) { (void)h; }
xs_transaction_t xs_transaction_start(struct xs_handle *h) { (void)h; return 1; }
bool xs_transaction_end(struct xs_handle *h, xs_transaction_t t, bool abort) { (void)h; (void)t; (void)abort; return true; }

static void xs_file(char *buf, size_t n, const char *path)
{
    char flat[400];
    size_t i;
    for (i = 0; path[i] && i < sizeof flat - 1; i++) flat[i] = path[i] == '/' ? '_' : path[i];
    flat[i] = 0;
    snprintf(buf, n, "%s/xs/%s", shim_dir(), flat);
}

void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len)
{
    (void)h; (void)t;
    char *out = malloc(64);
    if (strcmp(path, "domid") == 0) {
        snprintf(out, 64, "%s", getenv("SHIM_DOMID") ? getenv("SHIM_DOMID") : "1");
    } else {
        char p[512];
        xs_file(p, sizeof p, path);
        int fd = open(p, O_RDONLY);
        if (fd < 0) { free(out); errno = ENOENT; return NULL; }
        ssize_t n = read(fd, out, 63);
        close(fd);
        out[n < 0 ? 0 : n] = 0;
    }
    if (len) *len = (unsigned)strlen(out);
    return out;
}

bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data, unsigned int len)
{
    (void)h; (void)t;
    fprintf(stderr, "XS write %s %.*s\n", path, (int)len, (const char *)data);
    char p[512];
    xs_file(p, sizeof p, path);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return false;
    ssize_t n = write(fd, data, len);
    close(fd);
    return n == (ssize_t)len;
}

bool xs_set_permissions(struct xs_handle *h, xs_transaction_t t, const char *path,
                        struct xs_permissions *perms, unsigned int num)
{
    (void)h; (void)t;
    fprintf(stderr, "XS perms %s", path);
    for (unsigned i = 0; i < num; i++) {
        char c = perms[i].perms == XS_PERM_NONE ? 'n' : perms[i].perms == XS_PERM_READ ? 'r'
               : perms[i].perms == XS_PERM_WRITE ? 'w' : 'b';
        fprintf(stderr, " %c%u", c, perms[i].id);
    }
    fprintf(stderr, "\n");
    return true;
}

bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    (void)h; (void)t;
    fprintf(stderr, "XS rm %s\n", path);
    return true;
}

/* ---- modes ---------------------------------------------------------------------------- */

static int layout(void)
{
    printf("sizeof %zu\n", sizeof(struct vchan_interface));
    printf("left.cons %zu\nleft.prod %zu\nright.cons %zu\nright.prod %zu\n",
           offsetof(struct vchan_interface, left.cons), offsetof(struct vchan_interface, left.prod),
           offsetof(struct vchan_interface, right.cons), offsetof(struct vchan_interface, right.prod));
    printf("left_order %zu\nright_order %zu\n", offsetof(struct vchan_interface, left_order),
           offsetof(struct vchan_interface, right_order));
    printf("cli_live %zu\nsrv_live %zu\ncli_notify %zu\nsrv_notify %zu\ngrants %zu\n",
           offsetof(struct vchan_interface, cli_live), offsetof(struct vchan_interface, srv_live),
           offsetof(struct vchan_interface, cli_notify), offsetof(struct vchan_interface, srv_notify),
           offsetof(struct vchan_interface, grants));
    printf("VCHAN_NOTIFY_WRITE %d\nVCHAN_NOTIFY_READ %d\n", VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ);
    fflush(stdout);
    unsigned long l, r;
    while (scanf("%lu %lu", &l, &r) == 2) {
        struct libxenvchan *c = libxenvchan_server_init(NULL, 2, "data/vchan/2/layout", l, r);
        if (!c) { printf("fail %lu %lu\n", l, r); fflush(stdout); continue; }
        struct vchan_interface *v = c->ring;
        printf("orders %lu %lu %u %u live %u %u notify %u %u idx %u %u %u %u\n", l, r,
               v->left_order, v->right_order, v->cli_live, v->srv_live, v->cli_notify,
               v->srv_notify, v->left.cons, v->left.prod, v->right.cons, v->right.prod);
        fflush(stdout);
        libxenvchan_close(c);
    }
    return 0;
}

static int echo(struct libxenvchan *c)
{
    static char buf[65536];
    unsigned long long total = 0;
    c->blocking = 1;
    printf("READY\n");
    fflush(stdout);
    for (;;) {
        int n = libxenvchan_read(c, buf, sizeof buf);
        if (n <= 0) break;
        total += (unsigned)n;
        if (libxenvchan_write(c, buf, n) != n) break;
    }
    printf("ECHOED %llu\n", total);
    fflush(stdout);
    libxenvchan_close(c);
    return 0;
}

static int blast(struct libxenvchan *c, unsigned long long n)
{
    static unsigned char buf[65536];
    unsigned long long i = 0;
    c->blocking = 1;
    printf("READY\n");
    fflush(stdout);
    while (i < n) {
        size_t k = n - i < sizeof buf ? (size_t)(n - i) : sizeof buf;
        for (size_t j = 0; j < k; j++) buf[j] = (unsigned char)(((i + j) * 131 + ((i + j) >> 9)) & 0xff);
        if (libxenvchan_write(c, buf, k) != (int)k) { printf("WRITE FAILED at %llu\n", i); break; }
        i += k;
    }
    printf("SENT %llu\n", i);
    fflush(stdout);
    libxenvchan_close(c);
    return 0;
}

int main(int argc, char **argv)
{
    char p[512];
    snprintf(p, sizeof p, "%s/xs", shim_dir());
    mkdir(p, 0700);
    if (argc >= 2 && strcmp(argv[1], "layout") == 0) return layout();
    if (argc == 6 && strcmp(argv[1], "server") == 0) {
        struct libxenvchan *c = libxenvchan_server_init(NULL, atoi(argv[2]), argv[3],
                                                        strtoul(argv[4], NULL, 0),
                                                        strtoul(argv[5], NULL, 0));
        if (!c) { perror("libxenvchan_server_init"); return 1; }
        return echo(c);
    }
    if (argc == 4 && strcmp(argv[1], "client") == 0) {
        struct libxenvchan *c = libxenvchan_client_init(NULL, atoi(argv[2]), argv[3]);
        if (!c) { perror("libxenvchan_client_init"); return 1; }
        return echo(c);
    }
    if (argc == 7 && strcmp(argv[1], "server-blast") == 0) {
        struct libxenvchan *c = libxenvchan_server_init(NULL, atoi(argv[2]), argv[3],
                                                        strtoul(argv[4], NULL, 0),
                                                        strtoul(argv[5], NULL, 0));
        if (!c) { perror("libxenvchan_server_init"); return 1; }
        return blast(c, strtoull(argv[6], NULL, 0));
    }
    if (argc == 5 && strcmp(argv[1], "client-blast") == 0) {
        struct libxenvchan *c = libxenvchan_client_init(NULL, atoi(argv[2]), argv[3]);
        if (!c) { perror("libxenvchan_client_init"); return 1; }
        return blast(c, strtoull(argv[4], NULL, 0));
    }
    fprintf(stderr, "usage: xenvchan_peer layout | server PEER PATH LMIN RMIN | client PEER PATH\n");
    return 2;
}
