#!/usr/bin/env python3
"""A shmbroker reader written from docs/PROTOCOL.md and docs/LAYOUT.md alone (standard library only).

    reader.py SOCKET SEGMENT            print the latest version as JSON, content as hex
    reader.py SOCKET SEGMENT --watch N  then wait for N more versions (VERSION events) and print each
"""
import array
import json
import mmap
import os
import socket
import struct
import sys

# --- CRC-64/XZ (LAYOUT.md, "CRC-64/XZ") ---
_POLY = 0xC96C5795D7870F42
_TABLE = []
for _b in range(256):
    _c = _b
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc64_xz(data):
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


# --- Frames (PROTOCOL.md, "Frames") ---
MAX_FRAME = 65536


class Connection:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.next_id = 1

    def send(self, msg_type, body):
        request_id = self.next_id
        self.next_id += 1
        self.sock.send(struct.pack("<HHII", msg_type, 0, request_id, len(body)) + body)
        return request_id

    def receive(self):
        fds = array.array("i")
        data, ancdata, flags, _ = self.sock.recvmsg(MAX_FRAME + 1, socket.CMSG_SPACE(4 * fds.itemsize))
        if not data:
            raise ConnectionError("daemon closed the connection")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        msg_type, _, request_id, length = struct.unpack_from("<HHII", data)
        return msg_type, request_id, data[12:12 + length], list(fds)

    def request(self, msg_type, body):
        request_id = self.send(msg_type, body)
        while True:
            reply_type, reply_id, reply, fds = self.receive()
            if 0x4000 <= reply_type < 0x8000:
                continue  # an event; this simple client ignores them here
            if reply_id != request_id:
                raise RuntimeError("reply to another request")
            if reply_type == 0x80FF:
                code, length = struct.unpack_from("<HH", reply)
                raise RuntimeError("error %d: %s" % (code, reply[4:4 + length].decode()))
            return reply_type, reply, fds


def string(text):
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


# --- Reading (LAYOUT.md, "How to read") ---
def read_latest(mem):
    magic, layout_version, header_size, capacity, slot_count = struct.unpack_from("<QIIQI", mem, 0)
    if magic != 0x524B4F52424D4853 or layout_version != 2:
        raise RuntimeError("not a layout-2 shmbroker segment")
    (stride,) = struct.unpack_from("<Q", mem, 0x20)
    for _ in range(10000):
        (version,) = struct.unpack_from("<Q", mem, 0x80)
        if version == 0:
            return None
        slot = header_size + (version % slot_count) * stride
        sequence, length, crc, published = struct.unpack_from("<QQQQ", mem, slot)
        if sequence != version or length > capacity:
            continue
        content = bytes(mem[slot + 64: slot + 64 + length])
        (after,) = struct.unpack_from("<Q", mem, slot)
        if after != version:
            continue
        if crc64_xz(content) != crc:
            raise RuntimeError("version %d fails its CRC" % version)
        return {"version": version, "length": length, "crc64": "%016x" % crc, "publishedAtNs": published,
                "content": content.hex()}
    raise RuntimeError("contended; retry")


def main():
    if len(sys.argv) not in (3, 5):
        sys.exit(__doc__)
    path, segment = sys.argv[1], sys.argv[2]
    watch = int(sys.argv[4]) if len(sys.argv) == 5 else 0
    conn = Connection(path)
    conn.request(0x0001, struct.pack("<I", 1) + string("reader.py"))
    _, opened, fds = conn.request(0x0002, string(segment))
    capacity, slots, layout, mapping_size, latest = struct.unpack("<QIIQQ", opened)
    mem = mmap.mmap(fds[0], mapping_size, mmap.MAP_SHARED, mmap.PROT_READ)
    for fd in fds:  # the mapping stays; this reader follows events, so it needs no wait board (fds[1])
        os.close(fd)
    print(json.dumps({"latest": read_latest(mem), "capacity": capacity, "slots": slots}), flush=True)
    if watch:
        conn.request(0x0003, string(segment))
        seen = 0
        while seen < watch:
            msg_type, _, body, _ = conn.receive()
            if msg_type == 0x4001:
                (length,) = struct.unpack_from("<H", body)
                version, size, crc, published = struct.unpack_from("<QQQQ", body, 2 + length)
                snapshot = read_latest(mem)
                print(json.dumps({"event": version, "read": snapshot}), flush=True)
                seen += 1
            elif msg_type == 0x4002:
                sys.exit("segment retired")


if __name__ == "__main__":
    main()
