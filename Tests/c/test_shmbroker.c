/* Tests of libshmbroker against the real daemon. `test_shmbroker root SOCKET` runs everything a
 * privileged client may do; `test_shmbroker other SOCKET` (run as another uid) checks that access
 * lists hold. Built and run by Tests/c/run.sh under AddressSanitizer and UBSan. */
#define _GNU_SOURCE
#include <shmbroker.h>

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures, checks;

#define CHECK(condition, ...) do { \
    checks++; \
    if (!(condition)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); \
                        fprintf(stderr, " (last error: %s)\n", shmb_error_message()); } \
} while (0)

struct waiter { shmb_segment *segment; uint64_t after, latest; int status; };

static void *wait_thread(void *argument) {
    struct waiter *w = argument;
    w->status = shmb_wait(w->segment, w->after, 20000000000LL, &w->latest);
    return NULL;
}

/* Gathers the blocks of shmb_read_blocks into `out`, checking they come in order. */
struct gather { unsigned char *out; size_t received; int calls, out_of_order; };

static int gather_block(const void *block, size_t length, uint64_t offset, void *context) {
    struct gather *g = context;
    if (offset == 0) g->received = 0, g->calls = 0;  /* a read that started over */
    if (offset != g->received) g->out_of_order++;
    memcpy(g->out + offset, block, length);
    g->received += length;
    g->calls++;
    return 0;
}

static int stop_at_second(const void *block, size_t length, uint64_t offset, void *context) {
    (void)block; (void)length; (void)context;
    return offset > 0 ? -7 : 0;
}

static void as_root(const char *socket_path) {
    shmb_client *client = NULL, *other = NULL;
    CHECK(shmb_connect(socket_path, "c-test", &client) == SHMB_OK, "connect");
    CHECK(shmb_connect(socket_path, "c-test-2", &other) == SHMB_OK, "second connect");
    CHECK(shmb_crc64("123456789", 9) == 0x995DC9BBDF1939FAull, "CRC check value");

    shmb_segment *small = NULL;
    CHECK(shmb_open(client, "small", &small) == SHMB_OK, "open small");
    char buffer[4096];
    shmb_version_info info;
    CHECK(shmb_read(small, buffer, sizeof buffer, &info) == SHMB_ERR_NEVER_PUBLISHED, "never published");

    shmb_version_info receipt;
    CHECK(shmb_publish(client, "small", "hello from C", 12, &receipt) == SHMB_OK && receipt.version == 1, "publish inline");
    CHECK(shmb_read(small, buffer, sizeof buffer, &info) == SHMB_OK, "read");
    CHECK(info.version == 1 && info.length == 12 && memcmp(buffer, "hello from C", 12) == 0, "read content");
    CHECK(info.crc64 == receipt.crc64 && info.crc64 == shmb_crc64("hello from C", 12), "read CRC");
    CHECK(shmb_read(small, buffer, 4, &info) == SHMB_ERR_BUFFER_TOO_SMALL && info.length == 12, "buffer too small");
    const void *view = NULL;
    CHECK(shmb_read_borrowed(small, &view, &info) == SHMB_OK && memcmp(view, "hello from C", 12) == 0, "borrowed read");
    CHECK(shmb_still_current(small, &info), "still current");
    CHECK(shmb_publish(client, "small", "", 0, &receipt) == SHMB_OK && receipt.version == 2, "empty version");
    CHECK(shmb_read(small, buffer, sizeof buffer, &info) == SHMB_OK && info.length == 0, "an empty version reads as empty");

    /* Large payloads travel in a sealed memfd. */
    size_t big_length = 300000;
    unsigned char *big = malloc(big_length), *copy = malloc(1 << 20);
    for (size_t i = 0; i < big_length; i++) big[i] = (unsigned char)(i * 7);
    CHECK(shmb_publish(client, "big", big, big_length, &receipt) == SHMB_OK && receipt.length == big_length, "publish memfd");
    shmb_segment *bigseg = NULL;
    CHECK(shmb_open(client, "big", &bigseg) == SHMB_OK, "open big");
    CHECK(shmb_read(bigseg, copy, 1 << 20, &info) == SHMB_OK && info.length == big_length && memcmp(copy, big, big_length) == 0, "big content");

    /* Block by block: every block verified before it is handed on, in order, in place. */
    CHECK(shmb_checksum_block_size(bigseg) == 16384, "the daemon's segments have 16 KiB checksum blocks");
    struct gather g = { copy, 0, 0, 0 };
    CHECK(shmb_read_blocks(bigseg, gather_block, &g, &info) == SHMB_OK, "block read");
    CHECK(info.length == big_length && g.received == big_length && g.calls == 19 && g.out_of_order == 0
          && memcmp(copy, big, big_length) == 0, "blocks: %zu bytes in %d calls", g.received, g.calls);
    CHECK(shmb_read_blocks(bigseg, stop_at_second, &g, &info) == -7, "a consumer's non-zero value stops the read and is returned");
    shmb_segment_close(bigseg);

    /* Errors carry the protocol's codes and names. */
    shmb_segment *missing = NULL;
    int code = shmb_open(client, "nope", &missing);
    CHECK(code == SHMB_NO_SUCH_SEGMENT && strcmp(shmb_error_name(code), "no-such-segment") == 0, "no such segment: %d", code);
    CHECK(strstr(shmb_error_message(), "nope") != NULL, "the message names the segment");
    CHECK(shmb_publish(client, "small", big, 5000, NULL) == SHMB_PAYLOAD_TOO_LARGE, "payload too large");
    CHECK(shmb_open(client, "bad name", &missing) == SHMB_INVALID_SEGMENT_NAME, "invalid name");

    /* Futex wait: woken by a publish from another connection, and a timeout. */
    uint64_t latest = 0;
    CHECK(shmb_wait(small, 2, 100000000, &latest) == SHMB_ERR_TIMEOUT && latest == 2, "wait times out");
    struct waiter w = { small, 2, 0, -1 };
    pthread_t thread;
    pthread_create(&thread, NULL, wait_thread, &w);
    usleep(150000);
    CHECK(shmb_publish(other, "small", "wake", 4, NULL) == SHMB_OK, "publish to wake");
    pthread_join(thread, NULL);
    CHECK(w.status == SHMB_OK && w.latest == 3, "the waiter was woken: %d %llu", w.status, (unsigned long long)w.latest);

    /* Events, through a pollable descriptor. */
    shmb_version_info at;
    CHECK(shmb_subscribe(client, "small", &at) == SHMB_OK && at.version == 3, "subscribe");
    CHECK(shmb_publish(other, "small", "event", 5, NULL) == SHMB_OK, "publish an event");
    struct pollfd poller = { shmb_fd(client), POLLIN, 0 };
    CHECK(poll(&poller, 1, 10000) == 1, "the client's descriptor becomes readable");
    shmb_event event;
    CHECK(shmb_next_event(client, 10000, &event) == SHMB_OK && !event.retired && event.info.version == 4
          && strcmp(event.segment, "small") == 0, "a VERSION event");
    CHECK(shmb_next_event(client, 50, &event) == SHMB_ERR_TIMEOUT, "no more events");
    CHECK(shmb_unsubscribe(client, "small") == SHMB_OK, "unsubscribe");

    /* A publish ring: many versions, no request each. */
    shmb_ring *ring = NULL;
    CHECK(shmb_ring_open(client, "small", &ring) == SHMB_OK, "ring open");
    if (ring) {
        char entry[64];
        for (int i = 0; i < 1000; i++) {
            int n = snprintf(entry, sizeof entry, "ring entry %d", i);
            if (shmb_ring_publish(ring, entry, (size_t)n, 10000000000LL) != SHMB_OK) { CHECK(0, "ring publish %d", i); break; }
        }
        shmb_version_info last;
        CHECK(shmb_ring_flush(ring, 30000000000LL, &last) == SHMB_OK && last.version == 1004, "ring flush: %llu", (unsigned long long)last.version);
        CHECK(shmb_read(small, buffer, sizeof buffer, &info) == SHMB_OK && info.version == 1004 && memcmp(buffer, "ring entry 999", 14) == 0, "the last entry is the latest version");
        CHECK(shmb_ring_publish(ring, big, 5000, 0) == SHMB_PAYLOAD_TOO_LARGE, "ring refuses oversize payloads");
        CHECK(shmb_ring_refused(ring) == 0, "no refusals");
        shmb_ring_close(ring);
    }

    char *json = NULL;
    size_t length = 0;
    CHECK(shmb_status(client, &json, &length) == SHMB_OK && json && strstr(json, "\"small\"") != NULL, "status");
    free(json);
    free(big);
    free(copy);
    shmb_segment_close(small);
    shmb_close(other);
    shmb_close(client);
}

static void as_other_uid(const char *socket_path) {
    shmb_client *client = NULL;
    CHECK(shmb_connect(socket_path, "c-test-other", &client) == SHMB_OK, "connect");
    shmb_segment *segment = NULL;
    CHECK(shmb_open(client, "private", &segment) == SHMB_NO_SUCH_SEGMENT, "private is not readable, and looks absent");
    CHECK(shmb_open(client, "small", &segment) == SHMB_OK, "small is readable");
    char buffer[4096];
    shmb_version_info info;
    CHECK(shmb_read(segment, buffer, sizeof buffer, &info) == SHMB_OK && info.version >= 1004, "reads what root published");
    CHECK(shmb_publish(client, "small", "x", 1, NULL) == SHMB_PERMISSION_DENIED, "may not publish");
    char *json = NULL;
    CHECK(shmb_status(client, &json, NULL) == SHMB_OK && strstr(json, "\"private\"") == NULL, "status hides the private segment");
    free(json);
    shmb_segment_close(segment);
    shmb_close(client);
}

/* Against Tests/hostile/server.py: every descriptor and length it sends is refused with an error,
 * never mapped or trusted (a crash, or an ASan report, fails the test run). */
static void against_hostile(const char *socket_path, const char *scenario) {
    shmb_client *client = NULL;
    CHECK(shmb_connect(socket_path, "c-test-hostile", &client) == SHMB_OK, "connect");
    if (!client) return;
    if (strcmp(scenario, "silent") == 0) {  /* an owner that never answers: the request times out */
        shmb_set_request_timeout(client, 300);
        shmb_segment *segment = NULL;
        CHECK(shmb_open(client, "anything", &segment) == SHMB_ERR_TIMEOUT, "a silent owner times out");
        CHECK(shmb_open(client, "anything", &segment) == SHMB_CONNECTION_LOST, "and the connection is not reused");
    } else if (strncmp(scenario, "status-", 7) == 0) {
        char *json = NULL;
        int status = shmb_status(client, &json, NULL);
        CHECK(status == SHMB_ERR_PROTOCOL, "%s: STATUS refused (got %d)", scenario, status);
        free(json);
    } else if (strcmp(scenario, "corrupt-block") == 0) {  /* valid, but its second block is corrupt */
        shmb_segment *segment = NULL;
        CHECK(shmb_open(client, "hostile", &segment) == SHMB_OK, "a segment with block checksums opens");
        if (segment) {
            unsigned char out[8192 + 100];
            struct gather g = { out, 0, 0, 0 };
            shmb_version_info info;
            int status = shmb_read_blocks(segment, gather_block, &g, &info);
            CHECK(status == SHMB_ERR_CORRUPT && strstr(shmb_error_message(), "block 1") != NULL,
                  "the corrupt block is reported (got %d)", status);
            CHECK(g.calls == 1 && g.received == 4096, "only the block before it was handed on (%d calls)", g.calls);
            char whole[8192 + 100];
            CHECK(shmb_read(segment, whole, sizeof whole, &info) == SHMB_OK, "a whole read checks the whole CRC, which is right");
            shmb_segment_close(segment);
        }
    } else {
        shmb_segment *segment = NULL;
        int status = shmb_open(client, "hostile", &segment);
        CHECK(status == SHMB_ERR_PROTOCOL || status == SHMB_ERR_BAD_SEGMENT, "%s: OPEN refused (got %d)", scenario, status);
        if (status == SHMB_OK) {  /* what a trusting client would go on to do */
            const void *view = NULL;
            char buffer[64];
            shmb_version_info info;
            uint64_t latest;
            (void)shmb_read_borrowed(segment, &view, &info);
            (void)shmb_read(segment, buffer, sizeof buffer, &info);
            (void)shmb_wait(segment, 5, 1000000, &latest);
            shmb_segment_close(segment);
        }
    }
    shmb_close(client);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "hostile") == 0) {
        against_hostile(argv[2], argv[3]);
    } else if (argc != 3) {
        fprintf(stderr, "usage: test_shmbroker root|other SOCKET, or test_shmbroker hostile SOCKET SCENARIO\n");
        return 2;
    } else if (strcmp(argv[1], "root") == 0) {
        as_root(argv[2]);
    } else {
        as_other_uid(argv[2]);
    }
    printf("libshmbroker (%s): %d passed, %d failed\n", argc == 4 ? argv[3] : argv[1], checks - failures, failures);
    return failures ? 1 : 0;
}
