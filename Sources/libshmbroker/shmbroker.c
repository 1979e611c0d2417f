/* libshmbroker: see include/shmbroker.h. Written from docs/PROTOCOL.md and docs/LAYOUT.md. */
#define _GNU_SOURCE
#include "shmbroker.h"

#include "CShmBrokerCRC.h"
#include "shmbroker_wire.h"  /* every offset and code, generated from the Swift definitions */

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME WIRE_MAX_FRAME
#define HEADER WIRE_FRAME_HEADER_SIZE
#define SEGMENT_MAGIC WIRE_SEGMENT_MAGIC
#define RING_MAGIC WIRE_RING_MAGIC
#define MAX_QUEUED_EVENTS 64

/* ---- errors ---------------------------------------------------------------------------- */

static _Thread_local char last_message[512] = "no error";

static int fail(int code, const char *format, ...) {
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(last_message, sizeof last_message, format, arguments);
    va_end(arguments);
    return code;
}

static int fail_errno(const char *what) { return fail(SHMB_ERR_SYSTEM, "%s: %s", what, strerror(errno)); }

const char *shmb_error_message(void) { return last_message; }

const char *shmb_error_name(int code) {
    static const char *const protocol[] = {
        "ok", "malformed-frame", "unknown-message-type", "unsupported-protocol-version", "handshake-required",
        "no-such-segment", "permission-denied", "payload-too-large", "unexpected-descriptor", "frame-too-large",
        "missing-descriptor", "bad-descriptor", "not-subscribed", "segment-retired", "internal-error",
        "invalid-segment-name", "too-many-clients", "invalid-ring", "connection-lost", "descriptor-limit",
        "owner-publishes",
    };
    static const char *const local[] = {
        "system-error", "corrupt", "contended", "never-published", "timeout", "bad-segment", "buffer-too-small",
        "protocol-violation", "invalid-argument",
    };
    if (code >= 0 && code < (int)(sizeof protocol / sizeof *protocol)) return protocol[code];
    if (code >= 1000 && code < 1000 + (int)(sizeof local / sizeof *local)) return local[code - 1000];
    return "unknown-error";
}

uint64_t shmb_crc64_update(uint64_t crc, const void *data, size_t length) {
    return ~shmb_crc64_update_path(shmb_crc64_best_path(), ~crc, data, length);
}

uint64_t shmb_crc64(const void *data, size_t length) { return shmb_crc64_update(0, data, length); }

/* ---- little-endian fields and atomics (LAYOUT.md: one aligned load per 8-byte field) ------ */

static inline uint64_t load64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE); }
static inline uint32_t load32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline void store64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); }
static inline void store32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST); }
static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int64_t monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* FUTEX_WAIT (not _PRIVATE: the word is shared with another process) with a relative timeout. */
static void futex_wait(const void *word, uint32_t expected, int64_t timeout_ns) {
    struct timespec timeout = { (time_t)(timeout_ns / 1000000000), (long)(timeout_ns % 1000000000) };
    syscall(SYS_futex, word, FUTEX_WAIT, expected, timeout_ns >= 0 ? &timeout : NULL, NULL, 0);
}

/* ---- frames (PROTOCOL.md) --------------------------------------------------------------- */

struct shmb_client {
    int fd;
    int request_timeout_ms;  /* < 0: no limit */
    int broken;              /* a request timed out: its reply may still come */
    uint32_t next_id;
    uint8_t frame[MAX_FRAME + 1];
    shmb_event queued[MAX_QUEUED_EVENTS];
    int queued_head, queued_count;
};

static size_t put_string(uint8_t *out, const char *text) {
    size_t n = strlen(text);
    put16(out, (uint16_t)n);
    memcpy(out + 2, text, n);
    return 2 + n;
}

static int check_name(const char *segment) {
    if (!segment || strlen(segment) == 0 || strlen(segment) > WIRE_SEGMENT_MAX_NAME) {
        return fail(SHMB_ERR_INVALID_ARGUMENT, "a segment name is 1 to 64 bytes");
    }
    return SHMB_OK;
}

/* Sends one frame with up to two descriptors. */
static int send_frame(shmb_client *c, uint16_t type, uint32_t id, const uint8_t *body, size_t length, const int *fds, int nfds) {
    uint8_t header[HEADER];
    put16(header, type);
    put16(header + 2, 0);
    put32(header + 4, id);
    put32(header + 8, (uint32_t)length);
    struct iovec parts[2] = { { header, HEADER }, { (void *)body, length } };
    char control[CMSG_SPACE(2 * sizeof(int))];
    struct msghdr message = { .msg_iov = parts, .msg_iovlen = length ? 2 : 1 };
    if (nfds > 0) {
        memset(control, 0, sizeof control);
        message.msg_control = control;
        message.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(cmsg), fds, (size_t)nfds * sizeof(int));
    }
    ssize_t sent;
    do sent = sendmsg(c->fd, &message, MSG_NOSIGNAL); while (sent < 0 && errno == EINTR);
    if (sent < 0) return errno == EPIPE || errno == ECONNRESET ? fail(SHMB_CONNECTION_LOST, "the daemon closed the connection") : fail_errno("sendmsg");
    return SHMB_OK;
}

/* Receives one frame into c->frame; descriptors into fds (closed if more than room). */
static int receive_frame(shmb_client *c, int timeout_ms, uint16_t *type, uint32_t *id, size_t *length, int *fds, int *nfds) {
    if (timeout_ms >= 0) {
        struct pollfd poller = { c->fd, POLLIN, 0 };
        int ready;
        do ready = poll(&poller, 1, timeout_ms); while (ready < 0 && errno == EINTR);
        if (ready < 0) return fail_errno("poll");
        if (ready == 0) return fail(SHMB_ERR_TIMEOUT, "no message within %d ms", timeout_ms);
    }
    char control[CMSG_SPACE(4 * sizeof(int))];
    struct iovec io = { c->frame, sizeof c->frame };
    struct msghdr message = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    ssize_t n;
    do n = recvmsg(c->fd, &message, MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
    if (n < 0) return fail_errno("recvmsg");
    int received = 0;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message); cmsg; cmsg = CMSG_NXTHDR(&message, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof fd);
            if (fds && received < 2) fds[received++] = fd; else close(fd);
        }
    }
    if (nfds) *nfds = received; else for (int i = 0; i < received; i++) close(fds[i]);
    if (n == 0) return fail(SHMB_CONNECTION_LOST, "the daemon closed the connection");
    if (n < HEADER || (message.msg_flags & MSG_TRUNC)) return fail(SHMB_ERR_PROTOCOL, "a malformed frame from the daemon");
    *type = get16(c->frame);
    *id = get32(c->frame + 4);
    *length = get32(c->frame + 8);
    if (*length != (size_t)n - HEADER) return fail(SHMB_ERR_PROTOCOL, "a frame whose length field is wrong");
    return SHMB_OK;
}

/* Types 0x4000-0x7FFF are events (PROTOCOL.md, "Message types"): sent unasked, request id 0. */
static int is_event(uint16_t type) { return type >= 0x4000 && type < 0x8000; }

/* Decodes an event frame into the queue (or `out`). */
static void decode_event(shmb_client *c, uint16_t type, size_t length, shmb_event *out) {
    const uint8_t *body = c->frame + HEADER;
    shmb_event event;
    memset(&event, 0, sizeof event);
    if (length < 2) return;
    size_t name = get16(body);
    if (name > WIRE_SEGMENT_MAX_NAME || 2 + name > length) return;
    memcpy(event.segment, body + 2, name);
    event.retired = type == WIRE_MSG_RETIRED;
    if (type == WIRE_MSG_VERSION && length >= 2 + name + 32) {
        const uint8_t *info = body + 2 + name;
        event.info = (shmb_version_info){ get64(info), get64(info + 8), get64(info + 16), get64(info + 24) };
    } else if (type != WIRE_MSG_RETIRED) {
        return;
    }
    if (out) { *out = event; return; }
    if (c->queued_count == MAX_QUEUED_EVENTS) {  /* coalesce: drop the oldest, the newest matters */
        c->queued_head = (c->queued_head + 1) % MAX_QUEUED_EVENTS;
        c->queued_count--;
    }
    c->queued[(c->queued_head + c->queued_count) % MAX_QUEUED_EVENTS] = event;
    c->queued_count++;
}

/* One request, one reply: events that arrive first are queued; ERROR replies become their code. */
static int request(shmb_client *c, uint16_t type, const uint8_t *body, size_t length, const int *fds, int nfds,
                   uint16_t *reply_type, size_t *reply_length, int *reply_fds, int *reply_nfds) {
    if (c->broken) return fail(SHMB_CONNECTION_LOST, "an earlier request timed out; reconnect");
    uint32_t id = c->next_id++;
    int status = send_frame(c, type, id, body, length, fds, nfds);
    if (status) return status;
    int64_t deadline = c->request_timeout_ms < 0 ? -1 : monotonic_ns() + (int64_t)c->request_timeout_ms * 1000000;
    for (;;) {
        uint16_t got;
        uint32_t got_id;
        int local_fds[2], local_n = 0;
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - monotonic_ns();
            wait = left > 0 ? (int)((left + 999999) / 1000000) : 0;
        }
        status = receive_frame(c, wait, &got, &got_id, reply_length, local_fds, &local_n);
        if (status == SHMB_ERR_TIMEOUT) {
            c->broken = 1;
            return fail(SHMB_ERR_TIMEOUT, "no reply within %d ms; the connection is no longer usable", c->request_timeout_ms);
        }
        if (status) return status;
        if (is_event(got)) {
            for (int i = 0; i < local_n; i++) close(local_fds[i]);
            decode_event(c, got, *reply_length, NULL);
            continue;
        }
        if (got_id != id) {
            for (int i = 0; i < local_n; i++) close(local_fds[i]);
            return fail(SHMB_ERR_PROTOCOL, "a reply to request %u, expected %u", got_id, id);
        }
        if (got == WIRE_MSG_ERROR) {
            for (int i = 0; i < local_n; i++) close(local_fds[i]);
            const uint8_t *b = c->frame + HEADER;
            if (*reply_length < 4) return fail(SHMB_ERR_PROTOCOL, "a short ERROR");
            int code = get16(b);
            size_t n = get16(b + 2);
            if (4 + n > *reply_length) n = *reply_length - 4;
            return fail(code, "%s: %.*s", shmb_error_name(code), (int)n, (const char *)b + 4);
        }
        *reply_type = got;
        if (reply_fds && reply_nfds) {
            for (int i = 0; i < local_n; i++) reply_fds[i] = local_fds[i];
            *reply_nfds = local_n;
        } else {
            for (int i = 0; i < local_n; i++) close(local_fds[i]);
        }
        return SHMB_OK;
    }
}

static int expect(uint16_t got, uint16_t wanted, size_t length, size_t minimum) {
    if (got != wanted || length < minimum) return fail(SHMB_ERR_PROTOCOL, "unexpected reply 0x%04x", got);
    return SHMB_OK;
}

int shmb_connect(const char *socket_path, const char *client_name, shmb_client **out) {
    if (!socket_path || !out) return fail(SHMB_ERR_INVALID_ARGUMENT, "socket_path and client are required");
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    if (strlen(socket_path) >= sizeof address.sun_path) return fail(SHMB_ERR_INVALID_ARGUMENT, "the socket path is too long");
    strcpy(address.sun_path, socket_path);
    shmb_client *c = calloc(1, sizeof *c);
    if (!c) return fail(SHMB_ERR_SYSTEM, "out of memory");
    c->next_id = 1;
    c->request_timeout_ms = 30000;
    c->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { free(c); return fail_errno("socket"); }
    if (connect(c->fd, (struct sockaddr *)&address, sizeof address) != 0) {
        int status = fail(SHMB_ERR_SYSTEM, "cannot connect to %s: %s", socket_path, strerror(errno));
        close(c->fd); free(c);
        return status;
    }
    uint8_t body[4 + 2 + 128];
    put32(body, SHMB_PROTOCOL_VERSION);
    char name[129];
    snprintf(name, sizeof name, "%s", client_name ? client_name : "libshmbroker");
    size_t n = 4 + put_string(body + 4, name);
    uint16_t type; size_t length;
    int status = request(c, WIRE_MSG_HELLO, body, n, NULL, 0, &type, &length, NULL, NULL);
    if (!status) status = expect(type, WIRE_MSG_HELLO_OK, length, 8);
    if (status) { shmb_close(c); return status; }
    *out = c;
    return SHMB_OK;
}

void shmb_close(shmb_client *client) {
    if (!client) return;
    close(client->fd);
    free(client);
}

int shmb_fd(const shmb_client *client) { return client->fd; }

void shmb_set_request_timeout(shmb_client *client, int timeout_ms) { if (client) client->request_timeout_ms = timeout_ms; }

/* ---- segments (LAYOUT.md) ------------------------------------------------------------- */

struct shmb_segment {
    const uint8_t *base;
    size_t size;
    uint32_t *sleepers;  /* the wait board's count, or NULL */
    uint64_t capacity, stride;
    uint32_t slots;
    /* Block checksum tables (LAYOUT.md, "Block checksums"): block_size 0 when there are none. */
    uint64_t block_size, tables, table_stride;
};

/* A descriptor from the owner may be mapped for `length` bytes: a regular file that long, sealed
 * against shrinking so that it stays that long. */
static int check_mappable(int fd, size_t length, const char *name, const char *what) {
    struct stat info;
    if (fstat(fd, &info) != 0) return fail_errno("fstat of a received descriptor");
    if (!S_ISREG(info.st_mode)) return fail(SHMB_ERR_PROTOCOL, "OPENED for \"%s\": the %s descriptor is not a memory file", name, what);
    if ((uint64_t)info.st_size < (uint64_t)length) {
        return fail(SHMB_ERR_PROTOCOL, "OPENED for \"%s\": the %s holds %lld bytes, not the %zu announced", name, what,
                    (long long)info.st_size, length);
    }
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        return fail(SHMB_ERR_PROTOCOL, "OPENED for \"%s\": the %s is not sealed against shrinking", name, what);
    }
    return SHMB_OK;
}

int shmb_open(shmb_client *c, const char *name, shmb_segment **out) {
    int status = check_name(name);
    if (status) return status;
    uint8_t body[2 + 64];
    size_t n = put_string(body, name);
    uint16_t type; size_t length; int fds[2], nfds = 0;
    status = request(c, WIRE_MSG_OPEN, body, n, NULL, 0, &type, &length, fds, &nfds);
    if (status) return status;
    status = expect(type, WIRE_MSG_OPENED, length, 32);
    if (!status && nfds < 1) status = fail(SHMB_MISSING_DESCRIPTOR, "OPENED carried no descriptor");
    shmb_segment *s = NULL;
    if (!status) {
        s = calloc(1, sizeof *s);
        if (!s) status = fail(SHMB_ERR_SYSTEM, "out of memory");
    }
    if (!status) {
        /* Nothing the owner sent is trusted before it is checked: a descriptor shorter than the
         * mapping it announced, or one it could still shrink, would kill this process (SIGBUS). */
        uint64_t announced = get64(c->frame + HEADER + 16);
        if (announced < WIRE_SEGMENT_HEADER_SIZE || announced > (uint64_t)SIZE_MAX / 2) {
            status = fail(SHMB_ERR_PROTOCOL, "OPENED for \"%s\" announced a mapping of %llu bytes", name, (unsigned long long)announced);
        } else {
            s->size = (size_t)announced;
            status = check_mappable(fds[0], s->size, name, "segment");
        }
    }
    if (!status && nfds >= 2) status = check_mappable(fds[1], WIRE_BOARD_SIZE, name, "wait board");
    if (!status) {
        void *base = mmap(NULL, s->size, PROT_READ, MAP_SHARED, fds[0], 0);
        if (base == MAP_FAILED) status = fail_errno("mmap of the segment");
        else s->base = base;
    }
    if (!status && nfds >= 2) {
        void *board = mmap(NULL, WIRE_BOARD_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
        if (board != MAP_FAILED) s->sleepers = board;
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    if (!status) {
        if (load64(s->base) != SEGMENT_MAGIC || load32(s->base + WIRE_SEG_LAYOUT_VERSION) != SHMB_LAYOUT_VERSION
            || load32(s->base + WIRE_SEG_HEADER_SIZE) != WIRE_SEGMENT_HEADER_SIZE) {
            status = fail(SHMB_ERR_BAD_SEGMENT, "segment \"%s\" is not a layout-%d segment", name, SHMB_LAYOUT_VERSION);
        } else {
            s->capacity = load64(s->base + WIRE_SEG_CAPACITY);
            s->slots = load32(s->base + WIRE_SEG_SLOT_COUNT);
            s->stride = load64(s->base + WIRE_SEG_SLOT_STRIDE);
            /* Every field bounded before any arithmetic: a capacity near 2^64 would wrap the stride. */
            if (s->capacity < 1 || s->capacity > s->size || s->slots < WIRE_SEGMENT_MIN_SLOTS || s->slots > WIRE_SEGMENT_MAX_SLOTS
                || s->stride != WIRE_SEGMENT_SLOT_HEADER_SIZE + ((s->capacity + 63) / WIRE_SEGMENT_ALIGNMENT) * WIRE_SEGMENT_ALIGNMENT
                || s->stride > s->size || WIRE_SEGMENT_HEADER_SIZE + (uint64_t)s->slots * s->stride > s->size) {
                status = fail(SHMB_ERR_BAD_SEGMENT, "segment \"%s\": the header does not match the mapping", name);
            } else if (load32(s->base + WIRE_SEG_FLAGS) & WIRE_SEG_FLAG_BLOCK_CHECKSUMS) {
                uint64_t block = load32(s->base + WIRE_SEG_CHECKSUM_BLOCK_SIZE);
                uint64_t tables = WIRE_SEGMENT_HEADER_SIZE + (uint64_t)s->slots * s->stride;
                uint64_t table_stride = ((s->capacity + block - 1) / (block ? block : 1) * 8 + 63) / 64 * 64;
                if (block < WIRE_SEGMENT_MIN_CHECKSUM_BLOCK || block > WIRE_SEGMENT_MAX_CHECKSUM_BLOCK || (block & (block - 1))
                    || tables + (uint64_t)s->slots * table_stride > s->size) {
                    status = fail(SHMB_ERR_BAD_SEGMENT, "segment \"%s\": the checksum tables do not match the mapping", name);
                } else {
                    s->block_size = block; s->tables = tables; s->table_stride = table_stride;
                }
            }
        }
    }
    if (status) { shmb_segment_close(s); return status; }
    *out = s;
    return SHMB_OK;
}

void shmb_segment_close(shmb_segment *s) {
    if (!s) return;
    if (s->base) munmap((void *)s->base, s->size);
    if (s->sleepers) munmap(s->sleepers, WIRE_BOARD_SIZE);
    free(s);
}

uint64_t shmb_latest_version(const shmb_segment *s) { return load64(s->base + WIRE_SEG_LATEST_VERSION); }
uint64_t shmb_capacity(const shmb_segment *s) { return s->capacity; }
int shmb_retired(const shmb_segment *s) { return (load32(s->base + WIRE_SEG_FLAGS) & WIRE_SEG_FLAG_RETIRED) != 0; }
int shmb_stale(const shmb_segment *s) { return (load32(s->base + WIRE_SEG_FLAGS) & WIRE_SEG_FLAG_STALE) != 0; }

static const uint8_t *slot_of(const shmb_segment *s, uint64_t version) { return s->base + WIRE_SEGMENT_HEADER_SIZE + (version % s->slots) * s->stride; }

/* The start of LAYOUT.md's read: the latest version's slot and its header in `info`. 0 = found,
 * 1 = retry (the writer is rewriting it), else an error. */
static int latest_slot(shmb_segment *s, const uint8_t **slot_out, shmb_version_info *info) {
    uint64_t version = load64(s->base + WIRE_SEG_LATEST_VERSION);
    if (version == 0) return fail(SHMB_ERR_NEVER_PUBLISHED, "nothing was ever published");
    const uint8_t *slot = slot_of(s, version);
    if (load64(slot) != version) return 1;
    uint64_t length = load64(slot + 8), crc = load64(slot + 16), published = load64(slot + 24);
    if (length > s->capacity) return 1;
    info->version = version; info->length = length; info->crc64 = crc; info->published_at_ns = published;
    *slot_out = slot;
    return 0;
}

/* One attempt of LAYOUT.md's read: 0 = done, 1 = retry, else an error. `buffer` NULL: in place. */
static int attempt(shmb_segment *s, void *buffer, size_t size, const void **borrowed, shmb_version_info *info) {
    const uint8_t *slot;
    int found = latest_slot(s, &slot, info);
    if (found) return found;
    uint64_t version = info->version, length = info->length, crc = info->crc64;
    uint64_t computed;
    if (buffer) {
        if (length > size) {
            if (load64(slot) != version) return 1;
            return fail(SHMB_ERR_BUFFER_TOO_SMALL, "the version holds %llu bytes, the buffer %zu", (unsigned long long)length, size);
        }
        computed = ~shmb_crc64_copy_path(shmb_crc64_best_path(), ~0ull, buffer, slot + WIRE_SLOT_DATA, (size_t)length);
    } else {
        computed = shmb_crc64(slot + WIRE_SLOT_DATA, (size_t)length);
        *borrowed = slot + WIRE_SLOT_DATA;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (load64(slot) != version) return 1;  /* the writer reused the slot during the copy */
    if (computed != crc) return fail(SHMB_ERR_CORRUPT, "version %llu fails its CRC-64", (unsigned long long)version);
    return 0;
}

static int read_latest(shmb_segment *s, void *buffer, size_t size, const void **borrowed, shmb_version_info *info) {
    if (!s || !info) return fail(SHMB_ERR_INVALID_ARGUMENT, "segment and info are required");
    for (int tries = 0; tries < 10000; tries++) {
        int status = attempt(s, buffer, size, borrowed, info);
        if (status != 1) return status;
    }
    return fail(SHMB_ERR_CONTENDED, "the writer replaced the version during 10000 attempts");
}

int shmb_read(shmb_segment *s, void *buffer, size_t size, shmb_version_info *info) {
    if (!buffer && size) return fail(SHMB_ERR_INVALID_ARGUMENT, "no buffer");
    static uint8_t empty;
    return read_latest(s, buffer ? buffer : &empty, size, NULL, info);
}

int shmb_read_borrowed(shmb_segment *s, const void **data, shmb_version_info *info) {
    if (!data) return fail(SHMB_ERR_INVALID_ARGUMENT, "data is required");
    return read_latest(s, NULL, 0, data, info);
}

/* ---- block by block (LAYOUT.md, "Block checksums") ------------------------------------ */

/* One attempt of a block read: 0 = done, 1 = retry, else an error or the consumer's value. */
static int blocks_attempt(shmb_segment *s, shmb_block_fn consume, void *context, shmb_version_info *info) {
    const uint8_t *slot;
    int found = latest_slot(s, &slot, info);
    if (found) return found;
    uint64_t version = info->version, length = info->length, crc = info->crc64;
    const uint8_t *data = slot + WIRE_SLOT_DATA;
    uint64_t block = s->block_size ? s->block_size : WIRE_SEGMENT_DEFAULT_CHECKSUM_BLOCK;
    const uint8_t *table = s->block_size ? s->base + s->tables + (version % s->slots) * s->table_stride : NULL;
    if (!table) {  /* no table: the whole version is verified before its first block is handed on */
        uint64_t computed = shmb_crc64(data, (size_t)length);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (load64(slot) != version) return 1;
        if (computed != crc) return fail(SHMB_ERR_CORRUPT, "version %llu fails its CRC-64", (unsigned long long)version);
    }
    uint64_t running = 0;  /* the CRC of the bytes up to the end of the current block */
    for (uint64_t offset = 0, index = 0; offset < length; offset += block, index++) {
        size_t n = (size_t)(length - offset < block ? length - offset : block);
        if (table) {  /* entry k: the CRC of everything up to the end of block k */
            uint64_t entry = load64(table + index * 8);
            running = shmb_crc64_update(running, data + offset, n);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (load64(slot) != version) return 1;
            if (running != entry) {
                return fail(SHMB_ERR_CORRUPT, "version %llu block %llu fails its CRC-64", (unsigned long long)version, (unsigned long long)index);
            }
            if (offset + n == length && entry != crc) {
                return fail(SHMB_ERR_CORRUPT, "version %llu: its last block's checksum is not its CRC-64", (unsigned long long)version);
            }
        }
        int verdict = consume(data + offset, n, offset, context);
        if (verdict) return verdict == 1 ? fail(SHMB_ERR_INVALID_ARGUMENT, "the consumer returned 1, which is reserved") : verdict;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (load64(slot) != version) return 1;  /* overtaken while consumed: start over */
    }
    if (table && length == 0 && crc != 0) return fail(SHMB_ERR_CORRUPT, "version %llu fails its CRC-64", (unsigned long long)version);
    return 0;
}

int shmb_read_blocks(shmb_segment *s, shmb_block_fn consume, void *context, shmb_version_info *info) {
    if (!s || !consume || !info) return fail(SHMB_ERR_INVALID_ARGUMENT, "segment, consumer and info are required");
    for (int tries = 0; tries < 10000; tries++) {
        int status = blocks_attempt(s, consume, context, info);
        if (status != 1) return status;
    }
    return fail(SHMB_ERR_CONTENDED, "the writer replaced the version during 10000 attempts");
}

uint64_t shmb_checksum_block_size(const shmb_segment *s) { return s->block_size; }

int shmb_still_current(const shmb_segment *s, const shmb_version_info *info) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return info->version != 0 && load64(slot_of(s, info->version)) == info->version;
}

int shmb_wait(shmb_segment *s, uint64_t after, int64_t timeout_ns, uint64_t *latest) {
    int64_t deadline = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    if (s->sleepers) __atomic_add_fetch(s->sleepers, 1, __ATOMIC_SEQ_CST);  /* then re-check below */
    int status = SHMB_OK;
    for (;;) {
        uint32_t word = load32(s->base + WIRE_SEG_FUTEX_WORD);
        uint64_t now_version = load64(s->base + WIRE_SEG_LATEST_VERSION);
        if (latest) *latest = now_version;
        if (now_version > after || shmb_retired(s)) break;
        int64_t remaining = -1;
        if (deadline >= 0) {
            remaining = deadline - monotonic_ns();
            if (remaining <= 0) { status = fail(SHMB_ERR_TIMEOUT, "no version after %llu in time", (unsigned long long)after); break; }
        }
        /* Without a board the writer may skip the wake-up: look again every millisecond. */
        if (!s->sleepers && (remaining < 0 || remaining > 1000000)) remaining = 1000000;
        futex_wait(s->base + WIRE_SEG_FUTEX_WORD, word, remaining);
    }
    if (s->sleepers) __atomic_sub_fetch(s->sleepers, 1, __ATOMIC_SEQ_CST);
    return status;
}

/* ---- subscriptions and events ------------------------------------------------------------ */

/* A request whose body is one segment name, answered by `reply` with at least `minimum` bytes. */
static int segment_request(shmb_client *c, uint16_t type, const char *name, uint16_t reply, size_t minimum) {
    int status = check_name(name);
    if (status) return status;
    uint8_t body[2 + 64];
    size_t n = put_string(body, name);
    uint16_t got; size_t length;
    status = request(c, type, body, n, NULL, 0, &got, &length, NULL, NULL);
    return status ? status : expect(got, reply, length, minimum);
}

int shmb_subscribe(shmb_client *c, const char *name, shmb_version_info *latest) {
    int status = segment_request(c, WIRE_MSG_SUBSCRIBE, name, WIRE_MSG_SUBSCRIBED, 32);
    if (!status && latest) {
        const uint8_t *b = c->frame + HEADER;
        *latest = (shmb_version_info){ get64(b), get64(b + 8), get64(b + 16), get64(b + 24) };
    }
    return status;
}

int shmb_unsubscribe(shmb_client *c, const char *name) { return segment_request(c, WIRE_MSG_UNSUBSCRIBE, name, WIRE_MSG_OK, 0); }

int shmb_next_event(shmb_client *c, int timeout_ms, shmb_event *event) {
    if (!event) return fail(SHMB_ERR_INVALID_ARGUMENT, "event is required");
    int64_t deadline = timeout_ms < 0 ? -1 : monotonic_ns() + (int64_t)timeout_ms * 1000000;
    while (c->queued_count == 0) {
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - monotonic_ns();
            wait = left > 0 ? (int)(left / 1000000) : 0;
        }
        uint16_t type; uint32_t id; size_t length;
        int status = receive_frame(c, wait, &type, &id, &length, NULL, NULL);
        if (status) return status;
        if (is_event(type)) decode_event(c, type, length, NULL);
    }
    *event = c->queued[c->queued_head];
    c->queued_head = (c->queued_head + 1) % MAX_QUEUED_EVENTS;
    c->queued_count--;
    return SHMB_OK;
}

/* ---- publishing --------------------------------------------------------------------------- */

static int receipt_from(shmb_client *c, uint16_t type, size_t length, shmb_version_info *receipt) {
    int status = expect(type, WIRE_MSG_PUBLISHED, length, 32);
    if (!status && receipt) {
        const uint8_t *b = c->frame + HEADER;
        *receipt = (shmb_version_info){ get64(b), get64(b + 8), get64(b + 16), get64(b + 24) };
    }
    return status;
}

int shmb_publish(shmb_client *c, const char *name, const void *data, size_t length, shmb_version_info *receipt) {
    int status = check_name(name);
    if (status) return status;
    if (!data && length) return fail(SHMB_ERR_INVALID_ARGUMENT, "no data");
    size_t prefix = 2 + strlen(name) + 1;
    uint16_t type; size_t reply;
    if (HEADER + prefix + length <= MAX_FRAME) {
        uint8_t *body = malloc(prefix + length + 1);
        if (!body) return fail(SHMB_ERR_SYSTEM, "out of memory");
        put_string(body, name);
        body[prefix - 1] = 0;  /* mode 0: inline */
        if (length) memcpy(body + prefix, data, length);
        status = request(c, WIRE_MSG_PUBLISH, body, prefix + length, NULL, 0, &type, &reply, NULL, NULL);
        free(body);
        return status ? status : receipt_from(c, type, reply, receipt);
    }
    /* Mode 1: a memfd sealed against every change, so the daemon publishes exactly these bytes. */
    int fd = memfd_create("libshmbroker", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return fail_errno("memfd_create");
    size_t written = 0;
    while (written < length) {
        ssize_t n = write(fd, (const uint8_t *)data + written, length - written);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { status = fail_errno("write to the payload memfd"); close(fd); return status; }
        written += (size_t)n;
    }
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
    uint8_t body[2 + 64 + 1 + 8];
    put_string(body, name);
    body[prefix - 1] = 1;
    put64(body + prefix, length);
    status = request(c, WIRE_MSG_PUBLISH, body, prefix + 8, &fd, 1, &type, &reply, NULL, NULL);
    close(fd);
    return status ? status : receipt_from(c, type, reply, receipt);
}

int shmb_status(shmb_client *c, char **json, size_t *length) {
    if (!json) return fail(SHMB_ERR_INVALID_ARGUMENT, "json is required");
    uint16_t type; size_t reply; int fds[2], nfds = 0;
    int status = request(c, WIRE_MSG_STATUS, NULL, 0, NULL, 0, &type, &reply, fds, &nfds);
    if (status) return status;
    size_t size;
    char *text = NULL;
    if (type == WIRE_MSG_STATUS_REPORT) {
        size = reply;
        text = malloc(size + 1);
        if (text) memcpy(text, c->frame + HEADER, size);
    } else if (type == WIRE_MSG_STATUS_REPORT_FILE && reply >= 8 && nfds == 1) {
        /* The length is the owner's word: it must fit the file and leave room for the NUL. */
        uint64_t announced = get64(c->frame + HEADER);
        struct stat info;
        if (fstat(fds[0], &info) != 0 || !S_ISREG(info.st_mode) || announced > (uint64_t)info.st_size
            || announced > ((uint64_t)1 << 30)) {
            close(fds[0]);
            return fail(SHMB_ERR_PROTOCOL, "STATUS_REPORT_FILE announced %llu bytes that its file does not hold",
                        (unsigned long long)announced);
        }
        size = (size_t)announced;
        text = malloc(size + 1);
        if (text && pread(fds[0], text, size, 0) != (ssize_t)size) { free(text); text = NULL; }
    } else {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        return fail(SHMB_ERR_PROTOCOL, "unexpected reply 0x%04x to STATUS", type);
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    if (!text) return fail(SHMB_ERR_SYSTEM, "cannot read the status report");
    text[size] = 0;
    *json = text;
    if (length) *length = size;
    return SHMB_OK;
}

/* ---- publish rings (LAYOUT.md, "Publish rings") ----------------------------------------- */

struct shmb_ring {
    shmb_client *client;
    char segment[65];
    uint8_t *base;
    size_t file_size;
    uint64_t data_size, max_payload, head, entries;
    int file, doorbell;
};

static uint64_t round_up(uint64_t value, uint64_t unit) { return (value + unit - 1) / unit * unit; }

static int make_ring(shmb_ring *r, uint64_t capacity) {
    uint64_t wanted = 2 * round_up(16 + capacity, 64);
    r->data_size = round_up(wanted > (1u << 20) ? wanted : (1u << 20), 4096);
    r->max_payload = r->data_size / 2 - 16;
    r->file_size = (size_t)(WIRE_RING_HEADER_SIZE + r->data_size);
    r->file = memfd_create("libshmbroker-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (r->file < 0) return fail_errno("memfd_create");
    if (ftruncate(r->file, (off_t)r->file_size) != 0 || fcntl(r->file, F_ADD_SEALS, F_SEAL_SHRINK) != 0) return fail_errno("sizing the ring");
    /* Every page allocated and mapped now: no page faults on the first lap, here or in the
     * daemon (which prefaults a ring file without holes). */
    int reserved = posix_fallocate(r->file, 0, (off_t)r->file_size);
    if (reserved != 0) {
        errno = reserved;
        return fail_errno("allocating the ring");
    }
    void *base = mmap(NULL, r->file_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->file, 0);
    if (base == MAP_FAILED) return fail_errno("mmap of the ring");
    r->base = base;
    store64(r->base + WIRE_RING_MAGIC_OFFSET, RING_MAGIC);
    store32(r->base + WIRE_RING_LAYOUT_VERSION_OFFSET, WIRE_RING_LAYOUT_VERSION);
    store64(r->base + WIRE_RING_DATA_SIZE, r->data_size);
    store32(r->base + WIRE_RING_CONSUMER_IDLE, 1);  /* consumerIdle: ring the doorbell for the first entry */
    r->doorbell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->doorbell < 0) return fail_errno("eventfd");
    r->head = 0;
    return SHMB_OK;
}

static void unmake_ring(shmb_ring *r) {
    if (r->base) munmap(r->base, r->file_size);
    if (r->file >= 0) close(r->file);
    if (r->doorbell >= 0) close(r->doorbell);
    r->base = NULL; r->file = r->doorbell = -1;
}

static int attach(shmb_ring *r, uint64_t *capacity) {
    uint8_t body[2 + 64];
    size_t n = put_string(body, r->segment);
    int fds[2] = { r->file, r->doorbell };
    uint16_t type; size_t length;
    int status = request(r->client, WIRE_MSG_ATTACH_RING, body, n, fds, 2, &type, &length, NULL, NULL);
    if (!status) status = expect(type, WIRE_MSG_RING_ATTACHED, length, 16);
    if (!status) *capacity = get64(r->client->frame + HEADER);
    return status;
}

static int detach(shmb_ring *r) { return segment_request(r->client, WIRE_MSG_DETACH_RING, r->segment, WIRE_MSG_OK, 0); }

int shmb_ring_open(shmb_client *c, const char *name, shmb_ring **out) {
    int status = check_name(name);
    if (status) return status;
    shmb_ring *r = calloc(1, sizeof *r);
    if (!r) return fail(SHMB_ERR_SYSTEM, "out of memory");
    r->client = c;
    r->file = r->doorbell = -1;
    snprintf(r->segment, sizeof r->segment, "%s", name);
    /* A ring for 64 KiB first; the reply tells the capacity, and a larger segment gets a larger ring. */
    uint64_t capacity = 0;
    status = make_ring(r, 64 << 10);
    if (!status) status = attach(r, &capacity);
    if (!status && capacity > r->max_payload) {
        status = detach(r);
        unmake_ring(r);
        if (!status) status = make_ring(r, capacity);
        if (!status) status = attach(r, &capacity);
    }
    if (status) { unmake_ring(r); free(r); return status; }
    if (capacity < r->max_payload) r->max_payload = capacity;
    *out = r;
    return SHMB_OK;
}

/* Sleeps until the daemon advanced `tail` past `old_tail` (or detached the ring). */
static int wait_for_tail(shmb_ring *r, uint64_t old_tail, int64_t deadline) {
    uint32_t word = load32(r->base + WIRE_RING_TAIL_FUTEX);
    store32(r->base + WIRE_RING_PRODUCER_WAITING, 1);  /* producerWaiting, then re-check (both sequentially consistent) */
    if (load64(r->base + WIRE_RING_TAIL) == old_tail && load32(r->base + WIRE_RING_DETACHED_CODE) == 0) {
        int64_t remaining = deadline < 0 ? 100000000 : deadline - monotonic_ns();
        if (remaining > 100000000) remaining = 100000000;
        if (remaining > 0) futex_wait(r->base + WIRE_RING_TAIL_FUTEX, word, remaining);
    }
    store32(r->base + WIRE_RING_PRODUCER_WAITING, 0);
    uint32_t detached = load32(r->base + WIRE_RING_DETACHED_CODE);
    if (detached) return fail((int)detached, "the daemon detached the ring: %s", shmb_error_name((int)detached));
    if (deadline >= 0 && monotonic_ns() >= deadline) return fail(SHMB_ERR_TIMEOUT, "the ring stayed full");
    return SHMB_OK;
}

int shmb_ring_publish(shmb_ring *r, const void *data, size_t length, int64_t timeout_ns) {
    if (!data && length) return fail(SHMB_ERR_INVALID_ARGUMENT, "no data");
    if (length > r->max_payload) return fail(SHMB_PAYLOAD_TOO_LARGE, "%zu bytes do not fit segment \"%s\" (at most %llu)",
                                             length, r->segment, (unsigned long long)r->max_payload);
    uint64_t size = round_up(16 + length, 64);
    uint64_t offset = r->head % r->data_size;
    uint64_t skip = r->data_size - offset < size ? r->data_size - offset : 0;
    int64_t deadline = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    for (;;) {
        uint64_t tail = load64(r->base + WIRE_RING_TAIL);
        if (r->data_size - (r->head - tail) >= skip + size) break;
        int status = wait_for_tail(r, tail, deadline);
        if (status) return status;
    }
    uint8_t *area = r->base + WIRE_RING_HEADER_SIZE;
    if (skip) {
        store32(area + offset, WIRE_RING_WRAP_MARKER);  /* wrap marker */
        r->head += skip;
    }
    uint8_t *entry = area + r->head % r->data_size;
    put32(entry, (uint32_t)length);
    put32(entry + 4, 0);
    put64(entry + 8, r->entries++);
    if (length) memcpy(entry + 16, data, length);
    r->head += size;
    store64(r->base + WIRE_RING_HEAD, r->head);  /* sequentially consistent, then consumerIdle */
    if (load32(r->base + WIRE_RING_CONSUMER_IDLE) == 1) {
        uint64_t one = 1;
        if (write(r->doorbell, &one, 8) < 0 && errno != EAGAIN) return fail_errno("ringing the doorbell");
    }
    return SHMB_OK;
}

int shmb_ring_flush(shmb_ring *r, int64_t timeout_ns, shmb_version_info *last) {
    int64_t deadline = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    for (;;) {
        uint64_t tail = load64(r->base + WIRE_RING_TAIL);
        if (tail == r->head) break;
        int status = wait_for_tail(r, tail, deadline);
        if (status) return status;
    }
    if (last) {
        *last = (shmb_version_info){ load64(r->base + WIRE_RING_LAST_VERSION), load64(r->base + WIRE_RING_LAST_LENGTH),
                                    load64(r->base + WIRE_RING_LAST_CRC64), load64(r->base + WIRE_RING_LAST_PUBLISHED_AT) };
    }
    return SHMB_OK;
}

uint64_t shmb_ring_refused(const shmb_ring *r) { return load64(r->base + WIRE_RING_REFUSED_ENTRIES); }

void shmb_ring_close(shmb_ring *r) {
    if (!r) return;
    (void)detach(r);
    unmake_ring(r);
    free(r);
}
