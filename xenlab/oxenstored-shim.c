/* LD_PRELOAD shim that lets Xen's oxenstored run beside the C xenstored in the lab's dom0
 * (tests/xenlab/guest/test_xenstore.py).  oxenstored binds the global VIRQ_DOM_EXC at
 * start-up even with --no-domain-init; a domain can bind a global VIRQ only once and the
 * C daemon already has, so oxenstored would die ("evtchn bind_virq failed").  Here
 * IOCTL_EVTCHN_BIND_VIRQ becomes IOCTL_EVTCHN_BIND_UNBOUND_PORT offered to dom0 itself:
 * a valid local port that never fires.  Every other ioctl is passed on unchanged.
 * Compiled on the host by xenlab/lab.py into each run's results directory. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/ioctl.h>

typedef uint16_t domid_t; /* the kernel's UAPI header uses it without defining it */
#include <xen/sys/evtchn.h>

int ioctl(int fd, unsigned long request, ...)
{
    static int (*next)(int, unsigned long, ...);
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (!next)
        next = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    if (request == IOCTL_EVTCHN_BIND_VIRQ) {
        struct ioctl_evtchn_bind_unbound_port self = { .remote_domain = 0 };
        return next(fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &self);
    }
    return next(fd, request, arg);
}
