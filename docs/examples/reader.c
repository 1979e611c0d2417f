/*
 * A shmbroker reader in C, written from docs/PROTOCOL.md and docs/LAYOUT.md alone (libc only).
 * It waits for new versions on the segment's futex word: no socket traffic after OPEN.
 *
 *     cc -O2 -o reader docs/examples/reader.c
 *     ./reader SOCKET SEGMENT        print the latest version (a line of JSON, content in hex)
 *     ./reader SOCKET SEGMENT N      then wait for N newer versions and print each
 *
 * Exit status: 0 done, 1 usage or I/O error, 2 the daemon refused (its message on stderr),
 * 3 a version failed its CRC, 4 the segment was retired.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* --- CRC-64/XZ (LAYOUT.md, "CRC-64/XZ") --- */
static uint64_t crc_table[256];

static void crc_init(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t c = (uint64_t)b;
        for (int i = 0; i < 8; i++) c = (c & 1) ? (c >> 1) ^ 0xC96C5795D7870F42ull : c >> 1;
        crc_table[b] = c;
    }
}

static uint64_t crc64_xz(const uint8_t *p, size_t n) {
    uint64_t crc = ~0ull;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* --- Frames (PROTOCOL.md, "Frames"); x86-64 and arm64 are little-endian, as the wire is. --- */
#define MAX_FRAME 65536
static uint8_t frame[MAX_FRAME + 1];
static uint32_t next_request = 1;

static void fail(int status, const char *what) {
    fprintf(stderr, "reader: %s\n", what);
    exit(status);
}

static size_t put_string(uint8_t *out, const char *text) {
    uint16_t n = (uint16_t)strlen(text);
    memcpy(out, &n, 2);
    memcpy(out + 2, text, n);
    return 2 + (size_t)n;
}

/* Sends one request and returns the reply's type; body and length of the reply in `frame`. */
/* Descriptors of the reply go to fds[0], fds[1] (-1 when absent). */
static uint16_t request(int sock, uint16_t type, const uint8_t *body, uint32_t length, uint32_t *reply_length, int *fds) {
    uint8_t out[12 + 256];
    uint32_t id = next_request++;
    uint16_t flags = 0;
    memcpy(out, &type, 2);
    memcpy(out + 2, &flags, 2);
    memcpy(out + 4, &id, 4);
    memcpy(out + 8, &length, 4);
    memcpy(out + 12, body, length);
    if (send(sock, out, 12 + length, 0) != (ssize_t)(12 + length)) fail(1, "send failed");
    for (;;) {
        char control[CMSG_SPACE(4 * sizeof(int))];
        struct iovec io = { frame, sizeof frame };
        struct msghdr msg = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n <= 0) fail(1, "the daemon closed the connection");
        if (n < 12 || (msg.msg_flags & MSG_TRUNC)) fail(1, "malformed frame from the daemon");
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int received[4];
            memcpy(received, CMSG_DATA(c), count * sizeof(int));
            for (size_t i = 0; i < count; i++) {
                if (fds && i < 2) fds[i] = received[i];
                else close(received[i]);
            }
        }
        uint16_t reply_type;
        uint32_t reply_id;
        memcpy(&reply_type, frame, 2);
        memcpy(&reply_id, frame + 4, 4);
        memcpy(reply_length, frame + 8, 4);
        if (reply_type >= 0x4000 && reply_type < 0x8000) continue; /* an event: not subscribed, ignore */
        if (reply_id != id) fail(1, "a reply to another request");
        if (reply_type == 0x80FF) {
            uint16_t code, n_message;
            memcpy(&code, frame + 12, 2);
            memcpy(&n_message, frame + 14, 2);
            fprintf(stderr, "reader: error %u: %.*s\n", code, (int)n_message, (const char *)frame + 16);
            exit(2);
        }
        return reply_type;
    }
}

/* --- Reading (LAYOUT.md, "How to read" and "Waiting for a new version without polling") --- */
struct segment {
    const uint8_t *base;
    uint64_t capacity, stride;
    uint32_t header_size, slot_count;
};

static uint64_t load_acquire64(const uint8_t *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE); }
static uint32_t load_acquire32(const uint8_t *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }

/* Copies the latest version into `out`; returns its version (0: never published). */
static uint64_t read_latest(const struct segment *s, uint8_t *out, uint64_t *length, uint64_t *crc) {
    for (int attempt = 0; attempt < 10000; attempt++) {
        uint64_t v = load_acquire64(s->base + 0x80);
        if (v == 0) return 0;
        const uint8_t *slot = s->base + s->header_size + (v % s->slot_count) * s->stride;
        if (load_acquire64(slot) != v) continue;
        uint64_t len, stored;
        memcpy(&len, slot + 8, 8);
        memcpy(&stored, slot + 16, 8);
        if (len > s->capacity) continue;
        memcpy(out, slot + 64, len);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n((const uint64_t *)slot, __ATOMIC_RELAXED) != v) continue;
        if (crc64_xz(out, len) != stored) {
            fprintf(stderr, "reader: version %llu fails its CRC\n", (unsigned long long)v);
            exit(3);
        }
        *length = len;
        *crc = stored;
        return v;
    }
    fail(1, "contended: the writer replaced the version during every attempt");
    return 0;
}

static void print_version(uint64_t version, const uint8_t *content, uint64_t length, uint64_t crc) {
    printf("{\"version\": %llu, \"length\": %llu, \"crc64\": \"%016llx\", \"content\": \"",
           (unsigned long long)version, (unsigned long long)length, (unsigned long long)crc);
    for (uint64_t i = 0; i < length; i++) printf("%02x", content[i]);
    printf("\"}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) fail(1, "usage: reader SOCKET SEGMENT [N]");
    long more = argc == 4 ? strtol(argv[3], NULL, 10) : 0;
    crc_init();

    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    if (strlen(argv[1]) >= sizeof address.sun_path) fail(1, "socket path too long");
    strcpy(address.sun_path, argv[1]);
    if (connect(sock, (struct sockaddr *)&address, sizeof address) != 0) fail(1, "cannot connect to the daemon");

    uint8_t body[256];
    uint32_t version_1 = 1, reply_length;
    memcpy(body, &version_1, 4);
    size_t n = 4 + put_string(body + 4, "reader.c");
    if (request(sock, 0x0001, body, (uint32_t)n, &reply_length, NULL) != 0x8001) fail(1, "no HELLO_OK");

    if (strlen(argv[2]) > 64) fail(1, "segment names are at most 64 bytes");
    int fds[2] = { -1, -1 };
    n = put_string(body, argv[2]);
    if (request(sock, 0x0002, body, (uint32_t)n, &reply_length, fds) != 0x8002 || fds[0] < 0 || fds[1] < 0)
        fail(1, "no OPENED with the segment and its wait board");
    uint64_t mapping_size;
    memcpy(&mapping_size, frame + 12 + 16, 8); /* after capacity, slotCount, layoutVersion */
    const uint8_t *base = mmap(NULL, mapping_size, PROT_READ, MAP_SHARED, fds[0], 0);
    if (base == MAP_FAILED) fail(1, "mmap failed");
    /* The wait board, read-write: we count ourselves in its u32 at offset 0 while we sleep. */
    uint32_t *sleepers = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
    if (sleepers == MAP_FAILED) fail(1, "mmap of the wait board failed");
    close(fds[0]);
    close(fds[1]);

    struct segment s = { .base = base };
    uint64_t magic;
    uint32_t layout;
    memcpy(&magic, base, 8);
    memcpy(&layout, base + 0x08, 4);
    if (magic != 0x524B4F52424D4853ull || layout != 2) fail(1, "not a layout-2 shmbroker segment");
    memcpy(&s.header_size, base + 0x0C, 4);
    memcpy(&s.capacity, base + 0x10, 8);
    memcpy(&s.slot_count, base + 0x18, 4);
    memcpy(&s.stride, base + 0x20, 8);

    uint8_t *content = malloc(s.capacity ? s.capacity : 1);
    uint64_t length = 0, crc = 0;
    uint64_t mine = read_latest(&s, content, &length, &crc);
    if (mine == 0) printf("{\"version\": 0}\n"); else print_version(mine, content, length, crc);
    fflush(stdout);

    /* Registered for the whole wait loop: the writer wakes us only while sleepers > 0. The add
     * is sequentially consistent and comes before the re-check of the version below. */
    __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
    for (long seen = 0; seen < more;) {
        uint32_t word = load_acquire32(base + 0x88);
        uint32_t flags = load_acquire32(base + 0x1C);
        if (load_acquire64(base + 0x80) > mine) {
            mine = read_latest(&s, content, &length, &crc);
            print_version(mine, content, length, crc);
            seen++;
            continue;
        }
        if (flags & 1) fail(4, "the segment was retired");
        struct timespec timeout = { 10, 0 };
        /* FUTEX_WAIT, not FUTEX_WAIT_PRIVATE: the word is in memory shared with the daemon. */
        if (syscall(SYS_futex, base + 0x88, FUTEX_WAIT, word, &timeout, NULL, 0) != 0 && errno == ETIMEDOUT)
            fail(1, "no new version within 10 s");
    }
    __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
    return 0;
}
