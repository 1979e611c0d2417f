/* A C reader of a mirrored segment, for the cluster tests: every `interval_ms` it reads the
 * latest version verified and prints "version stale" (one line each), until `seconds` pass. */
#define _POSIX_C_SOURCE 200809L
#include <shmbroker.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET SEGMENT SECONDS INTERVAL_MS\n", argv[0]);
        return 2;
    }
    shmb_client *client;
    shmb_segment *segment;
    if (shmb_connect(argv[1], "mirror-c-reader", &client) != 0 || shmb_open(client, argv[2], &segment) != 0) {
        fprintf(stderr, "%s\n", shmb_error_message());
        return 1;
    }
    size_t size = shmb_capacity(segment);
    void *buffer = malloc(size);
    struct timespec start, now, pause = {0, atol(argv[4]) * 1000000L};
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        shmb_version_info info;
        int rc = shmb_read(segment, buffer, size, &info);
        if (rc == 0) printf("%llu %d\n", (unsigned long long)info.version, shmb_stale(segment));
        else if (rc != SHMB_ERR_NEVER_PUBLISHED) fprintf(stderr, "read: %s\n", shmb_error_message());
        fflush(stdout);
        nanosleep(&pause, NULL);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec - start.tv_sec < atol(argv[3]));
    free(buffer);
    shmb_segment_close(segment);
    shmb_close(client);
    return 0;
}
