/* The shmbroker ends of the mirror benchmark's latency runs (Tests/mirror/bench_mirror.py), in C
 * like the raw libnats baselines, so that both paths are measured by the same kind of program:
 *
 *   shm_latency publish SOCKET SEGMENT SIZE COUNT SPACING_US   publish stamped versions on host A
 *                                                              (a negative COUNT: for -COUNT seconds)
 *   shm_latency read    SOCKET SEGMENT COUNT SECONDS           on host B: wait on the futex, read
 *                                                              verified, print each latency
 *   shm_latency arrivals SOCKET SEGMENT COUNT SECONDS          on host B: wait on the futex, print
 *                                                              "arrival_ns version" per new version
 *
 * A version's first 8 bytes are CLOCK_MONOTONIC when the publish call began. Output of `read`:
 * "ready", then one "latency_ns version" line per version seen, then "done". */
#define _POSIX_C_SOURCE 200809L
#include <shmbroker.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: see the comment at the top of shm_latency.c\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    shmb_client *client;
    if (shmb_connect(argv[2], "mirror-bench", &client) != 0) {
        fprintf(stderr, "connect: %s\n", shmb_error_message());
        return 1;
    }
    if (strcmp(argv[1], "publish") == 0) {
        long size = atol(argv[4]), count = atol(argv[5]), spacing = argc > 6 ? atol(argv[6]) : 0;
        char *value = calloc(1, (size_t)size < 16 ? 16 : (size_t)size);
        struct timespec pause = {spacing / 1000000, (spacing % 1000000) * 1000};
        uint64_t until = count < 0 ? now_ns() + (uint64_t)(-count) * 1000000000u : 0;
        for (long seq = 0; count < 0 ? now_ns() < until : seq < count; seq++) {
            uint64_t stamp = now_ns();
            memcpy(value, &stamp, sizeof stamp);
            memcpy(value + 8, &seq, sizeof seq);
            if (shmb_publish(client, argv[3], value, (size_t)size, NULL) != 0) {
                fprintf(stderr, "publish: %s\n", shmb_error_message());
                return 1;
            }
            if (spacing > 0) nanosleep(&pause, NULL);
        }
        shmb_close(client);
        return 0;
    }
    shmb_segment *segment;
    if (shmb_open(client, argv[3], &segment) != 0) {
        fprintf(stderr, "open: %s\n", shmb_error_message());
        return 1;
    }
    long count = atol(argv[4]);
    uint64_t deadline = now_ns() + (uint64_t)atol(argv[5]) * 1000000000u, last = shmb_latest_version(segment);
    size_t capacity = shmb_capacity(segment);
    char *buffer = malloc(capacity);
    int arrivals = strcmp(argv[1], "arrivals") == 0;
    printf("ready\n");
    for (long seen = 0; seen < count && now_ns() < deadline;) {
        uint64_t latest;
        int rc = shmb_wait(segment, last, 200000000, &latest);
        if (rc != 0 || latest <= last) continue;
        if (arrivals) {
            printf("%llu %llu\n", (unsigned long long)now_ns(), (unsigned long long)latest);
            last = latest;
            seen++;
            continue;
        }
        shmb_version_info info;
        if (shmb_read(segment, buffer, capacity, &info) != 0) continue;
        uint64_t at = now_ns(), stamp;
        memcpy(&stamp, buffer, sizeof stamp);
        printf("%llu %llu\n", (unsigned long long)(at - stamp), (unsigned long long)info.version);
        last = info.version;
        seen++;
    }
    printf("done\n");
    shmb_segment_close(segment);
    shmb_close(client);
    return 0;
}
