/*
 * libshmbroker: read and publish shmbroker shared-memory segments from C (C11, libc only).
 *
 * Written from docs/PROTOCOL.md (the control socket) and docs/LAYOUT.md (segment memory). Build:
 * `make -C Sources/libshmbroker` (libshmbroker.so.0, libshmbroker.a, shmbroker.pc in its build/);
 * install: `PREFIX=/usr/local systemd/install.sh`; use: `cc app.c $(pkg-config --cflags --libs shmbroker)`.
 *
 * Every function returns SHMB_OK (0) or an error code: the protocol's codes 1-20 (a refusal by the
 * daemon) or this library's 1000 and up. shmb_error_message() gives the message of the calling
 * thread's last error.
 *
 * Threads: a shmb_client (and the rings opened through it) is used by one thread at a time;
 * a shmb_segment may be read and waited on by any number of threads at once; shmb_error_name and
 * shmb_error_message are thread-safe (the message is per thread).
 */
#ifndef SHMBROKER_H
#define SHMBROKER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHMB_PROTOCOL_VERSION 1
#define SHMB_LAYOUT_VERSION 2

/** Error codes. 1-20 mirror the protocol (docs/PROTOCOL.md, "Error codes"); 1000+ are local. */
enum shmb_error {
    SHMB_OK = 0,
    SHMB_MALFORMED_FRAME = 1, SHMB_UNKNOWN_MESSAGE_TYPE = 2, SHMB_UNSUPPORTED_PROTOCOL_VERSION = 3,
    SHMB_HANDSHAKE_REQUIRED = 4, SHMB_NO_SUCH_SEGMENT = 5, SHMB_PERMISSION_DENIED = 6,
    SHMB_PAYLOAD_TOO_LARGE = 7, SHMB_UNEXPECTED_DESCRIPTOR = 8, SHMB_FRAME_TOO_LARGE = 9,
    SHMB_MISSING_DESCRIPTOR = 10, SHMB_BAD_DESCRIPTOR = 11, SHMB_NOT_SUBSCRIBED = 12,
    SHMB_SEGMENT_RETIRED = 13, SHMB_INTERNAL_ERROR = 14, SHMB_INVALID_SEGMENT_NAME = 15,
    SHMB_TOO_MANY_CLIENTS = 16, SHMB_INVALID_RING = 17, SHMB_CONNECTION_LOST = 18,
    SHMB_DESCRIPTOR_LIMIT = 19, SHMB_OWNER_PUBLISHES = 20,
    /** A system call failed (errno is in the message). */
    SHMB_ERR_SYSTEM = 1000,
    /** A stable copy of a version failed its CRC-64: corruption, not a race. */
    SHMB_ERR_CORRUPT = 1001,
    /** The writer kept replacing the version during every attempt. */
    SHMB_ERR_CONTENDED = 1002,
    /** Nothing was ever published to the segment (an empty version is not this). */
    SHMB_ERR_NEVER_PUBLISHED = 1003,
    /** The timeout passed. */
    SHMB_ERR_TIMEOUT = 1004,
    /** The mapping is not a segment of a layout this library reads. */
    SHMB_ERR_BAD_SEGMENT = 1005,
    /** The caller's buffer is shorter than the version (info->length says how long it is). */
    SHMB_ERR_BUFFER_TOO_SMALL = 1006,
    /** The daemon sent something the protocol does not allow here. */
    SHMB_ERR_PROTOCOL = 1007,
    /** An argument is invalid (a NULL pointer, a name longer than 64 bytes, ...). */
    SHMB_ERR_INVALID_ARGUMENT = 1008,
};

/** A version's metadata: what PUBLISHED, SUBSCRIBED and VERSION events carry. */
typedef struct shmb_version_info {
    uint64_t version;          /**< counting from 1; 0: never published */
    uint64_t length;           /**< content bytes */
    uint64_t crc64;            /**< CRC-64/XZ of the content */
    uint64_t published_at_ns;  /**< ns since the Unix epoch */
} shmb_version_info;

/** A subscription event. */
typedef struct shmb_event {
    int retired;                /**< 1: a RETIRED event (the segment left the config); 0: VERSION */
    char segment[65];           /**< NUL-terminated segment name */
    shmb_version_info info;     /**< the new version (VERSION events) */
} shmb_event;

typedef struct shmb_client shmb_client;
typedef struct shmb_segment shmb_segment;
typedef struct shmb_ring shmb_ring;

/** The stable name of an error code ("permission-denied", ...). Thread-safe. */
const char *shmb_error_name(int code);
/** The message of the calling thread's last error (never NULL). Thread-safe. */
const char *shmb_error_message(void);

/** Connects to an owner's control socket and performs the HELLO handshake. Each request then
 *  waits at most 30 s for its reply (see shmb_set_request_timeout). */
int shmb_connect(const char *socket_path, const char *client_name, shmb_client **client);
/** How long each request waits for its reply, in milliseconds (< 0: no limit; default 30000).
 *  A request that times out returns SHMB_ERR_TIMEOUT and leaves the connection unusable (a late
 *  reply would answer the wrong request): later requests return SHMB_CONNECTION_LOST. */
void shmb_set_request_timeout(shmb_client *client, int timeout_ms);
/** Closes the connection and frees the client. Opened segments stay valid until closed. */
void shmb_close(shmb_client *client);
/** The connection's socket, for poll/epoll in the caller's own loop: readable when an event (or
 *  a reply) waits; then call shmb_next_event(client, 0, ...). */
int shmb_fd(const shmb_client *client);

/** Opens a segment (read permission): maps it read-only, and its wait board. */
int shmb_open(shmb_client *client, const char *segment, shmb_segment **out);
/** Unmaps and frees a segment. */
void shmb_segment_close(shmb_segment *segment);
/** The newest complete version (0: never published). Thread-safe. */
uint64_t shmb_latest_version(const shmb_segment *segment);
/** The most bytes one version may hold. Thread-safe. */
uint64_t shmb_capacity(const shmb_segment *segment);
/** Whether the owner retired the segment. Thread-safe. */
int shmb_retired(const shmb_segment *segment);
/** Whether the segment is a mirror of another host's segment whose source has gone quiet
 *  (docs/MIRROR.md): the latest version stays readable but may be behind the source's. 0 for a
 *  segment published on this host. Thread-safe. */
int shmb_stale(const shmb_segment *segment);

/** Copies the latest version into `buffer` and verifies its CRC-64 (retrying while the writer
 *  races the copy). SHMB_ERR_NEVER_PUBLISHED if nothing was published; SHMB_ERR_BUFFER_TOO_SMALL
 *  (info->length set) if it does not fit. Thread-safe. */
int shmb_read(shmb_segment *segment, void *buffer, size_t buffer_size, shmb_version_info *info);
/** Zero-copy: points `*data` at the latest version inside the mapping, verified in place. The
 *  view is valid while shmb_still_current(segment, info) is true: check it after using the data,
 *  and discard what you derived if it is not. Thread-safe. */
int shmb_read_borrowed(shmb_segment *segment, const void **data, shmb_version_info *info);
/** Receives one verified block of a version for shmb_read_blocks: `length` bytes starting
 *  `offset` bytes into the version, in place in the mapping (valid during the call only).
 *  Return 0 to go on; any other value except 1 stops the read and shmb_read_blocks returns it
 *  (use values that are not SHMB_ codes, e.g. negative ones). */
typedef int (*shmb_block_fn)(const void *block, size_t length, uint64_t offset, void *context);
/** Reads the latest version block by block in place, verifying each block against the slot's
 *  checksum table just before handing it to `consume`, so a large version costs one pass over
 *  memory and no block reaches the consumer unverified (LAYOUT.md, "Block checksums"). If the
 *  writer reuses the slot meanwhile, the read starts over at offset 0 on the newer version: a
 *  consumer that accumulates state resets it when offset is 0. `info` gets the version read.
 *  SHMB_ERR_CORRUPT for a block or version that fails its check; SHMB_ERR_NEVER_PUBLISHED.
 *  A segment without tables is verified whole before the first block. Thread-safe. */
int shmb_read_blocks(shmb_segment *segment, shmb_block_fn consume, void *context, shmb_version_info *info);
/** Bytes per checksummed block (16 KiB from shmbrokerd), or 0 for a segment without tables. */
uint64_t shmb_checksum_block_size(const shmb_segment *segment);
/** Whether the slot still holds the version `info` describes (see shmb_read_borrowed). */
int shmb_still_current(const shmb_segment *segment, const shmb_version_info *info);
/** Sleeps on the segment's futex (counted in its wait board) until a version newer than `after`
 *  exists or the segment is retired; SHMB_ERR_TIMEOUT after `timeout_ns` (< 0: no limit).
 *  `*latest` (may be NULL) gets the latest version. Thread-safe. */
int shmb_wait(shmb_segment *segment, uint64_t after, int64_t timeout_ns, uint64_t *latest);

/** Subscribes to VERSION events for `segment`; `latest` (may be NULL) gets the version then. */
int shmb_subscribe(shmb_client *client, const char *segment, shmb_version_info *latest);
/** Ends a subscription. */
int shmb_unsubscribe(shmb_client *client, const char *segment);
/** The next event of any subscription, waiting up to `timeout_ms` (< 0: no limit, 0: poll). */
int shmb_next_event(shmb_client *client, int timeout_ms, shmb_event *event);

/** Publishes `length` bytes (publish permission) as the segment's next version: inline when they
 *  fit a frame, else in a sealed memfd. `receipt` may be NULL. */
int shmb_publish(shmb_client *client, const char *segment, const void *data, size_t length,
                 shmb_version_info *receipt);
/** The STATUS report: a malloc'd, NUL-terminated JSON document (free it); its length in `*length`. */
int shmb_status(shmb_client *client, char **json, size_t *length);

/** Attaches a publish ring to `segment` (publish permission): many versions with no request each. */
int shmb_ring_open(shmb_client *client, const char *segment, shmb_ring **ring);
/** Appends a payload; returns once it is in the ring (waiting up to `timeout_ns` while it is
 *  full, < 0: no limit). The daemon publishes it shortly after. */
int shmb_ring_publish(shmb_ring *ring, const void *data, size_t length, int64_t timeout_ns);
/** Waits until every appended entry is consumed; `last` (may be NULL) gets the last version. */
int shmb_ring_flush(shmb_ring *ring, int64_t timeout_ns, shmb_version_info *last);
/** Entries the daemon refused (longer than the capacity, say). */
uint64_t shmb_ring_refused(const shmb_ring *ring);
/** Detaches the ring (the daemon first publishes what it holds) and frees it. */
void shmb_ring_close(shmb_ring *ring);

/** CRC-64/XZ of `length` bytes (the project's CRC, with the CPU's widest carry-less multiply). */
uint64_t shmb_crc64(const void *data, size_t length);
/** Continues a CRC-64/XZ: given `crc` of some bytes, the CRC of those bytes followed by these
 *  (`crc` 0 starts afresh; like zlib's crc32()). */
uint64_t shmb_crc64_update(uint64_t crc, const void *data, size_t length);

#ifdef __cplusplus
}
#endif
#endif
