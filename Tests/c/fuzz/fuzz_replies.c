/* libFuzzer harness for libshmbroker's reply parsing: whatever an owner sends back (HELLO_OK,
 * OPENED, SUBSCRIBED, PUBLISHED, STATUS_REPORT, events, ERRORs, malformed frames) must be answered
 * with an error code, never a crash, an out-of-bounds access (ASan) or undefined behaviour.
 *
 * The input's first byte chooses the request; the rest is a sequence of frames, each a little-endian u16 then that many bytes (bits 0-14: the
 * length; bit 15: attach a 16-byte memfd to the frame, as OPENED and STATUS_REPORT_FILE carry
 * descriptors); they are queued on one end of a SOCK_SEQPACKET pair, and the library's request functions read them
 * from the other end as the owner's replies. The library is compiled into this harness
 * (#include) so that its internal client can be built on the socket pair without a daemon.
 * Built and run by Tests/c/fuzz/fuzz.sh. */
#define _GNU_SOURCE
#include "../../../Sources/libshmbroker/shmbroker.c"

#include <sys/socket.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) return 0;
    /* Frames for the library to read, then a close: every read ends (no request waits). */
    size_t offset = 1;  /* data[0] chooses the request */
    while (offset + 2 <= size) {
        size_t word = (size_t)data[offset] | ((size_t)data[offset + 1] << 8);
        size_t length = word & 0x7FFF;
        offset += 2;
        if (length > size - offset) length = size - offset;
        struct iovec part = { (void *)(data + offset), length };
        char control[CMSG_SPACE(sizeof(int))];
        struct msghdr message = { .msg_iov = &part, .msg_iovlen = 1 };
        int memfd = -1;
        if (word & 0x8000) {
            memfd = memfd_create("fuzz", MFD_CLOEXEC);
            if (memfd >= 0 && ftruncate(memfd, 16) == 0) {
                memset(control, 0, sizeof control);
                message.msg_control = control;
                message.msg_controllen = sizeof control;
                struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
                cmsg->cmsg_level = SOL_SOCKET;
                cmsg->cmsg_type = SCM_RIGHTS;
                cmsg->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(cmsg), &memfd, sizeof memfd);
            }
        }
        ssize_t sent = sendmsg(pair[1], &message, MSG_DONTWAIT);
        if (memfd >= 0) close(memfd);
        if (sent < 0) break;
        offset += length;
    }
    shutdown(pair[1], SHUT_WR);

    shmb_client *client = calloc(1, sizeof *client);
    if (!client) { close(pair[0]); close(pair[1]); return 0; }
    client->fd = pair[0];
    client->next_id = 1;
    client->request_timeout_ms = 0;  /* the replies are queued already: never wait */

    shmb_segment *segment = NULL;
    shmb_version_info info;
    shmb_event event;
    char *json = NULL;
    uint8_t selector = size ? data[0] : 0;
    /* The reply ids the library expects are 1, 2, 3 …: the fuzzer finds them in the frames. */
    switch (selector % 6) {
    case 0: (void)shmb_open(client, "fuzz", &segment); break;
    case 1: (void)shmb_subscribe(client, "fuzz", &info); break;
    case 2: (void)shmb_publish(client, "fuzz", "payload", 7, &info); break;
    case 3: if (shmb_status(client, &json, NULL) == SHMB_OK) free(json); break;
    case 4: (void)shmb_next_event(client, 0, &event); break;
    default: (void)shmb_unsubscribe(client, "fuzz"); break;
    }
    while (client->queued_count > 0 && shmb_next_event(client, 0, &event) == SHMB_OK) {}
    if (segment) shmb_segment_close(segment);
    shmb_close(client);
    close(pair[1]);
    return 0;
}
