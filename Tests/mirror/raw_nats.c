/* The raw libnats baselines of the mirror benchmark (Tests/mirror/bench_mirror.py): what the NATS
 * cluster itself does, host A to host B, with no shmbroker in the way.
 *
 *   raw_nats kv-put  URL KEY SIZE COUNT SPACING_US   put COUNT stamped values (one in flight);
 *                                                     a negative COUNT: put for -COUNT seconds
 *   raw_nats kv-watch URL KEY COUNT SECONDS          watch KEY; print each value's latency
 *   raw_nats pub     URL SUBJECT SIZE COUNT SPACING_US
 *   raw_nats sub     URL SUBJECT COUNT SECONDS
 *
 * A value's first 16 bytes are CLOCK_MONOTONIC at the put (the hosts are namespaces of one
 * machine: one clock) and its sequence number. Values larger than CHUNK go as the mirror sends
 * them: chunks under KEY.c<i>, then a small commit under KEY, and the watcher reads the chunks
 * back with kvStore_Get, as the importer does. Output: one "latency_ns bytes arrival_ns" line per
 * value received, then "done VALUES BYTES FIRST_NS LAST_NS". */
#define _POSIX_C_SOURCE 200809L
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHUNK ((1 << 20) - 4096)

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void check(natsStatus s, const char *what) {
    if (s == NATS_OK) return;
    fprintf(stderr, "%s: %s (%s)\n", what, natsStatus_GetText(s), nats_GetLastError(NULL));
    exit(1);
}

static void pause_us(long us) {
    if (us <= 0) return;
    struct timespec t = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&t, NULL);
}

static kvStore *bucket(natsConnection *nc) {
    jsCtx *js;
    kvStore *kv;
    check(natsConnection_JetStream(&js, nc, NULL), "jetstream");
    for (int tries = 0;; tries++) {
        natsStatus s = js_KeyValue(&kv, js, "shmbroker");
        if (s == NATS_OK) return kv;
        if (tries > 100) check(s, "bucket");
        pause_us(100000);
    }
}

static void put_retrying(kvStore *kv, const char *key, const void *data, int length) {
    uint64_t revision;
    for (int tries = 0;; tries++) {
        natsStatus s = kvStore_Put(&revision, kv, key, data, length);
        if (s == NATS_OK) return;
        if (tries > 50) check(s, "put");
        pause_us(20000);
    }
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: see the comment at the top of raw_nats.c\n");
        return 2;
    }
    const char *mode = argv[1], *url = argv[2], *name = argv[3];
    setvbuf(stdout, NULL, _IOLBF, 0);  /* the driver stops a watcher with SIGTERM: lose no line */
    natsConnection *nc;
    check(natsConnection_ConnectTo(&nc, url), "connect");
    if (strcmp(mode, "kv-put") == 0 || strcmp(mode, "pub") == 0) {
        long size = atol(argv[4]), count = atol(argv[5]), spacing = argc > 6 ? atol(argv[6]) : 0;
        char *value = calloc(1, (size_t)size < 16 ? 16 : (size_t)size);
        kvStore *kv = strcmp(mode, "kv-put") == 0 ? bucket(nc) : NULL;
        char key[256];
        uint64_t until = count < 0 ? now_ns() + (uint64_t)(-count) * 1000000000u : 0;
        for (long seq = 0; count < 0 ? now_ns() < until : seq < count; seq++) {
            uint64_t stamp[2] = {now_ns(), (uint64_t)seq};
            if (!kv) {
                memcpy(value, stamp, sizeof stamp);
                check(natsConnection_Publish(nc, name, value, (int)size), "publish");
                natsConnection_Flush(nc);
            } else if (size <= CHUNK) {
                memcpy(value, stamp, sizeof stamp);
                put_retrying(kv, name, value, (int)size);
            } else {
                long chunks = (size + CHUNK - 1) / CHUNK;
                for (long i = 0; i < chunks; i++) {
                    snprintf(key, sizeof key, "%s.c%ld", name, i);
                    long length = size - i * CHUNK < CHUNK ? size - i * CHUNK : CHUNK;
                    put_retrying(kv, key, value + i * CHUNK, (int)length);
                }
                uint64_t commit[3] = {stamp[0], stamp[1], (uint64_t)chunks};
                put_retrying(kv, name, commit, sizeof commit);
            }
            pause_us(spacing);
        }
        natsConnection_Destroy(nc);
        return 0;
    }
    long count = atol(argv[4]), seconds = atol(argv[5]);
    uint64_t deadline = now_ns() + (uint64_t)seconds * 1000000000u, first = 0, last = 0, bytes = 0;
    long received = 0;
    if (strcmp(mode, "kv-watch") == 0) {
        kvStore *kv = bucket(nc);
        kvWatcher *watcher;
        check(kvStore_Watch(&watcher, kv, name, NULL), "watch");
        printf("ready\n");
        fflush(stdout);
        while (received < count && now_ns() < deadline) {
            kvEntry *entry = NULL;
            natsStatus s = kvWatcher_Next(&entry, watcher, 200);
            if (s == NATS_TIMEOUT || entry == NULL) continue;
            check(s, "watch next");
            const uint64_t *stamp = kvEntry_Value(entry);
            int length = kvEntry_ValueLen(entry);
            uint64_t got = (uint64_t)length;
            if (length == 24) {  /* a commit: read the chunks back, as the importer does */
                char key[256];
                for (uint64_t i = 0; i < stamp[2]; i++) {
                    kvEntry *chunk;
                    snprintf(key, sizeof key, "%s.c%llu", name, (unsigned long long)i);
                    if (kvStore_Get(&chunk, kv, key) == NATS_OK) {
                        got += (uint64_t)kvEntry_ValueLen(chunk);
                        kvEntry_Destroy(chunk);
                    }
                }
            }
            uint64_t at = now_ns();
            if (length >= 16) {
                printf("%llu %llu %llu\n", (unsigned long long)(at - stamp[0]), (unsigned long long)got, (unsigned long long)at);
                if (!first) first = at;
                last = at;
                bytes += got;
                received++;
            }
            kvEntry_Destroy(entry);
        }
    } else {
        natsSubscription *sub;
        check(natsConnection_SubscribeSync(&sub, nc, name), "subscribe");
        natsConnection_Flush(nc);
        printf("ready\n");
        fflush(stdout);
        while (received < count && now_ns() < deadline) {
            natsMsg *msg;
            if (natsSubscription_NextMsg(&msg, sub, 200) != NATS_OK) continue;
            uint64_t at = now_ns(), stamp;
            memcpy(&stamp, natsMsg_GetData(msg), sizeof stamp);
            printf("%llu %d %llu\n", (unsigned long long)(at - stamp), natsMsg_GetDataLength(msg), (unsigned long long)at);
            if (!first) first = at;
            last = at;
            bytes += (uint64_t)natsMsg_GetDataLength(msg);
            received++;
            natsMsg_Destroy(msg);
        }
    }
    printf("done %ld %llu %llu %llu\n", received, (unsigned long long)bytes, (unsigned long long)first, (unsigned long long)last);
    natsConnection_Destroy(nc);
    return 0;
}
