#!/usr/bin/env python3
"""A hostile owner: answers the handshake like shmbrokerd, then hands clients descriptors and
replies built to crash a client that trusts them (issue 17, items 4 and 5).

    server.py SOCKET SCENARIO

Scenarios (every OPEN is answered with the segment below; every STATUS as said):
  short-file      OPENED announces a 128 KiB mapping; the memfd holds 4 KiB (unsealed)
  short-sealed    the same, but the 4 KiB memfd is sealed against any size change
  huge-capacity   the header claims a capacity of 2^64-32 (the slot stride wraps to 64) and a
                  version of 1 MB in a 4 KiB memfd
  unsealed        a correct segment whose memfd is not sealed against shrinking
  short-board     a correct segment whose wait board is 0 bytes long
  status-overflow STATUS_REPORT_FILE says 2^64-1 bytes and attaches a 10-byte memfd
  status-long     STATUS_REPORT_FILE says 2^40 bytes and attaches a 10-byte memfd
  pipe            OPENED attaches a pipe instead of a memfd
  bad-blocks      a segment whose header announces block checksum tables with a block size that
                  is not a power of two, and tables that would end past the mapping
  corrupt-block   a valid segment with block checksum tables (4 KiB blocks) whose version 1 has
                  a second block that does not match its table entry (the whole CRC is right)
  silent          answers the handshake, then never another request
  wrong-replies   answers OPEN with a reply to another request id, SUBSCRIBE with a truncated
                  SUBSCRIBED plus two descriptors, and STATUS with a frame whose length lies

Serves until killed. Standard library only; the layout is docs/LAYOUT.md's.
"""
import array
import fcntl
import os
import socket
import struct
import sys

HEADER = struct.Struct("<HHII")
MAGIC = 0x524B4F52424D4853
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def memfd(size, seal=True):
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def segment_header(capacity, slots, stride, name=b"hostile"):
    header = bytearray(256)
    struct.pack_into("<QIIQIIQQ", header, 0, MAGIC, 2, 256, capacity, slots, 0, stride, 0)
    header[0x40:0x40 + len(name)] = name
    struct.pack_into("<Q", header, 0x80, 1)  # latest version 1
    return header


def stride_of(capacity):
    return (64 + ((capacity + 63) // 64) * 64) % (1 << 64)


def segment(scenario):
    """(fds, announced mapping size, capacity)"""
    if scenario in ("short-file", "short-sealed"):
        capacity, slots = 65536, 2
        total = 256 + slots * stride_of(capacity)
        fd = memfd(4096, seal=scenario == "short-sealed")
        os.pwrite(fd, segment_header(capacity, slots, stride_of(capacity)), 0)
        return [fd, memfd(4096)], total, capacity
    if scenario == "huge-capacity":
        capacity, slots = (1 << 64) - 32, 2
        fd = memfd(4096)
        os.pwrite(fd, segment_header(capacity, slots, stride_of(capacity)), 0)
        slot = 256 + 1 * stride_of(capacity)
        os.pwrite(fd, struct.pack("<QQQQ", 1, 1_000_000, 0, 0), slot)
        return [fd, memfd(4096)], 4096, 4096
    if scenario in ("bad-blocks", "corrupt-block"):
        return block_segment(scenario)
    capacity, slots = 64, 2
    total = 256 + slots * stride_of(capacity)
    if scenario == "pipe":
        read_end, write_end = os.pipe()
        os.close(write_end)
        return [read_end, memfd(4096)], total, capacity
    fd = memfd(total, seal=scenario != "unsealed")
    os.pwrite(fd, segment_header(capacity, slots, stride_of(capacity)), 0)
    slot = 256 + 1 * stride_of(capacity)
    os.pwrite(fd, struct.pack("<QQQQ", 1, 0, 0, 0), slot)
    board = memfd(0) if scenario == "short-board" else memfd(4096)
    return [fd, board], total, capacity


def crc64_xz(data):
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xC96C5795D7870F42 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFFFFFFFFFF


def block_segment(scenario):
    """A segment with block checksum tables (LAYOUT.md, "Block checksums"), 4 KiB blocks."""
    capacity, slots, block = 8192 + 100, 2, 4096
    stride = stride_of(capacity)
    tables = 256 + slots * stride
    table_stride = ((capacity + block - 1) // block * 8 + 63) // 64 * 64
    total = tables + slots * table_stride
    header = segment_header(capacity, slots, stride)
    struct.pack_into("<I", header, 0x1C, 2 | 8)  # sleeper board, block checksums
    struct.pack_into("<I", header, 0x30, 3000 if scenario == "bad-blocks" else block)
    fd = memfd(total)
    os.pwrite(fd, header, 0)
    data = bytes((index * 31 + 7) & 0xFF for index in range(capacity))
    slot = 256 + 1 * stride
    os.pwrite(fd, struct.pack("<QQQQ", 1, len(data), crc64_xz(data), 0), slot)
    os.pwrite(fd, data, slot + 64)
    entries = [crc64_xz(data[:offset + block]) for offset in range(0, len(data), block)]  # prefixes
    entries[1] ^= 0x5A  # the second block's entry is wrong
    os.pwrite(fd, struct.pack(f"<{len(entries)}Q", *entries), tables + 1 * table_stride)
    return [fd, memfd(4096)], total - (64 if scenario == "bad-blocks" else 0), capacity


def string(text):
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def send(connection, msg_type, request_id, body, fds=()):
    frame = HEADER.pack(msg_type, 0, request_id, len(body)) + body
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    connection.sendmsg([frame], ancillary)
    for fd in fds:
        os.close(fd)


def serve(connection, scenario):
    while True:
        data, ancillary, _, _ = connection.recvmsg(70000, socket.CMSG_SPACE(16))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
        if len(data) < 12:
            return
        msg_type, _, request_id, _ = HEADER.unpack_from(data)
        if scenario == "silent" and msg_type != 0x0001:
            continue
        if scenario == "wrong-replies" and msg_type in (0x0002, 0x0003, 0x0006):
            if msg_type == 0x0002:
                send(connection, 0x8002, request_id + 7, struct.pack("<QIIQQ", 64, 2, 2, 4096, 0))
            elif msg_type == 0x0003:
                send(connection, 0x8003, request_id, b"\x01\x02", [memfd(16), memfd(16)])
            else:
                connection.send(HEADER.pack(0x8006, 0, request_id, 1000) + b"{}")
            continue
        if msg_type == 0x0001:  # HELLO
            send(connection, 0x8001, request_id, struct.pack("<II", 1, 65536) + string("hostile 0"))
        elif msg_type == 0x0002:  # OPEN
            fds, size, capacity = segment(scenario)
            send(connection, 0x8002, request_id, struct.pack("<QIIQQ", capacity, 2, 2, size, 1), fds)
        elif msg_type == 0x0003:  # SUBSCRIBE
            send(connection, 0x8003, request_id, struct.pack("<QQQQ", 1, 0, 0, 0))
        elif msg_type == 0x0006:  # STATUS
            length = (1 << 64) - 1 if scenario == "status-overflow" else 1 << 40
            fd = memfd(10, seal=False)
            os.pwrite(fd, b'{"x": 1}  ', 0)
            send(connection, 0x8007, request_id, struct.pack("<Q", length), [fd])
        else:
            send(connection, 0x80FF, request_id, struct.pack("<H", 2) + string("not served here"))


def main():
    path, scenario = sys.argv[1], sys.argv[2]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(16)
    print("listening", flush=True)
    while True:
        connection, _ = listener.accept()
        try:
            serve(connection, scenario)
        except OSError:
            pass
        finally:
            connection.close()


if __name__ == "__main__":
    main()
