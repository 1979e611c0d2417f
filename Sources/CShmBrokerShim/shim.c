#define _GNU_SOURCE
#include "CShmBrokerShim.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

int shmb_memfd_create(const char *name) {
    return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
}

long long shmb_first_hole(int fd) { return (long long)lseek(fd, 0, SEEK_HOLE); }

int shmb_seal_size(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
}

int shmb_add_seals(int fd, int seals) { return fcntl(fd, F_ADD_SEALS, seals); }
int shmb_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }
int shmb_seal_bit_shrink(void) { return F_SEAL_SHRINK; }
int shmb_seal_bit_grow(void) { return F_SEAL_GROW; }
int shmb_seal_bit_write(void) { return F_SEAL_WRITE; }
int shmb_seal_bit_future_write(void) { return F_SEAL_FUTURE_WRITE; }
int shmb_seal_bit_seal(void) { return F_SEAL_SEAL; }

#define SHMB_MAX_FDS 253

ssize_t shmb_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int extra_flags) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
        char buf[CMSG_SPACE(sizeof(int) * SHMB_MAX_FDS)];
        struct cmsghdr align;
    } control;
    if (nfds > 0) {
        if (nfds > SHMB_MAX_FDS) { errno = EINVAL; return -1; }
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL | extra_flags);
}

ssize_t shmb_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                           int *msg_flags, int extra_flags) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union {
        char buf[CMSG_SPACE(sizeof(int) * SHMB_MAX_FDS)];
        struct cmsghdr align;
    } control;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    *nfds = 0;
    *msg_flags = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | extra_flags);
    if (n < 0) return n;
    *msg_flags = msg.msg_flags;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *received = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, &received[i], sizeof fd);
            if (*nfds < max_fds) {
                fds[(*nfds)++] = fd;
            } else {
                // More than the caller takes: closed, and reported like the kernel's truncation.
                close(fd);
                *msg_flags |= MSG_CTRUNC;
            }
        }
    }
    return n;
}

int shmb_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred cred;
    socklen_t size = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &size) != 0) return -1;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int shmb_peer_groups(int sock, uint32_t *groups, int max) {
    gid_t buffer[1024];
    socklen_t size = sizeof buffer;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS, buffer, &size) != 0) return -1;
    int count = (int)(size / sizeof(gid_t));
    for (int i = 0; i < count && i < max; i++) groups[i] = buffer[i];
    return count;
}

int shmb_accept(int listener) {
    return accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int shmb_futex_wait(const uint32_t *word, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tsp = &ts;
    }
    long r = syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
    return r == 0 ? 0 : -errno;
}

int shmb_futex_wake(const uint32_t *word, int count) {
    long r = syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
    return r >= 0 ? (int)r : -errno;
}

int shmb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = token;
    return epoll_ctl(epfd, op, fd, &ev);
}

int shmb_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms) {
    struct epoll_event ready[256];
    if (max > 256) max = 256;
    int n = epoll_wait(epfd, ready, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        tokens[i] = ready[i].data.u64;
        events[i] = ready[i].events;
    }
    return n;
}

int shmb_signalfd_create(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

int shmb_signalfd_read(int fd) {
    struct signalfd_siginfo info;
    ssize_t n = read(fd, &info, sizeof info);
    if (n == (ssize_t)sizeof info) return (int)info.ssi_signo;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return -1;
}

void shmb_unblock_all_signals(void) {
    sigset_t set;
    sigfillset(&set);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

void shmb_ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

int shmb_timerfd_periodic(uint64_t interval_ns) {
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0) return -1;
    struct itimerspec spec;
    spec.it_interval.tv_sec = (time_t)(interval_ns / 1000000000);
    spec.it_interval.tv_nsec = (long)(interval_ns % 1000000000);
    spec.it_value = spec.it_interval;
    if (timerfd_settime(fd, 0, &spec, NULL) != 0) { close(fd); return -1; }
    return fd;
}

int64_t shmb_timerfd_read(int fd) {
    uint64_t expirations = 0;
    ssize_t n = read(fd, &expirations, sizeof expirations);
    if (n == (ssize_t)sizeof expirations) return (int64_t)expirations;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return -1;
}

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int shmb_pin_current_thread(int cpu) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) {
        errno = EINVAL;
        return -1;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

int shmb_current_cpu(void) { return sched_getcpu(); }

uint64_t shmb_realtime_ns(void) { return clock_ns(CLOCK_REALTIME); }
uint64_t shmb_monotonic_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
