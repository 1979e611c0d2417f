// Linux calls that Swift's Glibc module cannot see, wrapped with fixed arities.
// _GNU_SOURCE is defined only in shim.c; this header must stay free of it.
#ifndef C_SHMBROKER_SHIM_H
#define C_SHMBROKER_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>

/// memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING). Returns the fd or -1 with errno set.
int shmb_memfd_create(const char *name);

/// Adds F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL. Returns 0 or -1 with errno set.
int shmb_seal_size(int fd);
/// The offset of the first hole at or after offset 0 (`lseek(fd, 0, SEEK_HOLE)`), or -1 with errno.
long long shmb_first_hole(int fd);

/// Adds the given F_SEAL_* bits (F_ADD_SEALS). Returns 0 or -1 with errno set.
int shmb_add_seals(int fd, int seals);

/// Returns the seals (F_GET_SEALS) or -1 with errno set.
int shmb_get_seals(int fd);
/// The F_SEAL_* bits, for callers that inspect shmb_get_seals.
int shmb_seal_bit_shrink(void);
int shmb_seal_bit_grow(void);
int shmb_seal_bit_write(void);
int shmb_seal_bit_future_write(void);
int shmb_seal_bit_seal(void);

/// sendmsg with MSG_NOSIGNAL (plus extra_flags) and nfds descriptors as SCM_RIGHTS (nfds may be 0).
ssize_t shmb_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int extra_flags);

/// recvmsg with MSG_CMSG_CLOEXEC (plus extra_flags). Received descriptors go to fds (at most max_fds;
/// any beyond are closed, and MSG_CTRUNC is set as if the kernel had truncated them); *nfds gets
/// their count and *msg_flags the kernel's msg_flags (MSG_TRUNC / MSG_CTRUNC tell of truncation).
ssize_t shmb_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                           int *msg_flags, int extra_flags);

/// SO_PEERCRED of a connected Unix socket. Returns 0 or -1 with errno set.
int shmb_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);

/// SO_PEERGROUPS: the peer's supplementary groups at connect(). Returns the count (possibly larger
/// than max, in which case only max are stored) or -1 with errno set.
int shmb_peer_groups(int sock, uint32_t *groups, int max);

/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC.
int shmb_accept(int listener);

/// FUTEX_WAIT (shared, not private) on *word while it equals expected. timeout_ns < 0 waits forever.
/// Returns 0 on wake, or -errno (EAGAIN: value differed, ETIMEDOUT, EINTR).
int shmb_futex_wait(const uint32_t *word, uint32_t expected, int64_t timeout_ns);

/// FUTEX_WAKE (shared) of up to count waiters. Returns the number woken or -errno.
int shmb_futex_wake(const uint32_t *word, int count);

/// epoll_ctl with the event's data set to a 64-bit token (avoids the packed struct in Swift).
int shmb_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token);

/// epoll_wait that unpacks events into parallel arrays. Returns count or -1 with errno set.
int shmb_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max, int timeout_ms);

/// Blocks the given signals in this thread (and threads it creates later) and returns a
/// non-blocking, close-on-exec signalfd for them, or -1 with errno set.
int shmb_signalfd_create(const int *signals, int count);

/// Reads one siginfo from a signalfd: returns the signal number, 0 if none pending, -1 on error.
int shmb_signalfd_read(int fd);

/// Unblocks every signal in the calling thread (for child processes after fork/exec defaults).
void shmb_unblock_all_signals(void);

/// Ignores SIGPIPE process-wide (writes to closed sockets then return EPIPE).
void shmb_ignore_sigpipe(void);

/// A periodic CLOCK_MONOTONIC timerfd (non-blocking, close-on-exec), or -1 with errno set.
int shmb_timerfd_periodic(uint64_t interval_ns);

/// Reads the expiry count of a timerfd (0 if none) or -1 on error.
int64_t shmb_timerfd_read(int fd);

/// Restricts the calling thread to CPU `cpu` (sched_setaffinity of thread 0 with one bit set):
/// 0, or -1 with errno set (EINVAL for a CPU that does not exist or is not allowed).
int shmb_pin_current_thread(int cpu);

/// The CPU the calling thread last ran on (sched_getcpu), or -1 with errno set.
int shmb_current_cpu(void);

/// Current CLOCK_REALTIME in nanoseconds since the epoch.
uint64_t shmb_realtime_ns(void);
/// Current CLOCK_MONOTONIC in nanoseconds.
uint64_t shmb_monotonic_ns(void);

/// A hint to the CPU that the caller is spinning on a memory location (x86 PAUSE, arm64 YIELD):
/// it saves power and frees the core's shared resources without leaving user space.
static inline void shmb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

#endif
