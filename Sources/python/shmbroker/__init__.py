"""Read and publish shmbroker shared-memory segments (standard library only, Linux).

``connect(socket_path)`` returns a :class:`Client`; ``client.open(name)`` a :class:`Segment`
whose ``read()`` gives ``None`` (never published) or a :class:`Snapshot`; ``client.publish(name,
data)`` a :class:`Receipt`. The wire format is ``docs/PROTOCOL.md``, the memory ``docs/LAYOUT.md``.

Thread safety: a :class:`Client` may be used from one thread at a time (requests and events share
its socket); a :class:`Segment` may be read from any number of threads at once.
"""
from __future__ import annotations

import array
import collections
import ctypes
import ctypes.util
import fcntl
import json
import mmap
import os
import platform
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from . import _wire as W  # every offset and code, generated from the Swift definitions

__all__ = [
    "connect", "Client", "Segment", "Snapshot", "Block", "Receipt", "Event", "ShmBrokerError", "crc64_xz", "crc64_xz_pure",
    "ERROR_NAMES", "LOCAL_ERROR_NAMES",
]

__version__ = "0.2.0"  # the release version; a test checks it against Sources/ShmBrokerProtocol/Version.swift
PROTOCOL_VERSION = W.PROTOCOL_VERSION
LAYOUT_VERSION = W.SEGMENT_LAYOUT_VERSION
MAX_FRAME = W.MAX_FRAME
_HEADER = struct.Struct("<HHII")
_MAGIC = W.SEGMENT_MAGIC

#: The protocol's stable error codes (docs/PROTOCOL.md, "Error codes").
ERROR_NAMES = {
    1: "malformed-frame", 2: "unknown-message-type", 3: "unsupported-protocol-version",
    4: "handshake-required", 5: "no-such-segment", 6: "permission-denied", 7: "payload-too-large",
    8: "unexpected-descriptor", 9: "frame-too-large", 10: "missing-descriptor", 11: "bad-descriptor",
    12: "not-subscribed", 13: "segment-retired", 14: "internal-error", 15: "invalid-segment-name",
    16: "too-many-clients", 17: "invalid-ring", 18: "connection-lost", 19: "descriptor-limit",
    20: "owner-publishes",
}


#: This library's own codes, the same numbers as libshmbroker's (docs/PROTOCOL.md, "Client-library
#: error codes").
LOCAL_ERROR_NAMES = {
    1000: "system-error", 1001: "corrupt", 1002: "contended", 1003: "never-published", 1004: "timeout",
    1005: "bad-segment", 1006: "buffer-too-small", 1007: "protocol-violation", 1008: "invalid-argument",
}
SYSTEM_ERROR, CORRUPT, CONTENDED, TIMEOUT, BAD_SEGMENT, PROTOCOL_VIOLATION = 1000, 1001, 1002, 1004, 1005, 1007

#: Events kept for ``next_event`` at most; older ones are dropped, as the daemon coalesces them.
MAX_QUEUED_EVENTS = 64


class ShmBrokerError(Exception):
    """An error the daemon (or the segment memory) reported, with a stable code.

    Codes 1–20 are the protocol's (``ERROR_NAMES``); 1000 and up are this library's own
    (``LOCAL_ERROR_NAMES``, shared with libshmbroker): for example 1001 ``corrupt`` (a stable copy
    failed its CRC), 1002 ``contended`` (the writer kept replacing the version), 1005
    ``bad-segment`` (the mapping is not a segment this library can read safely) and 1007
    ``protocol-violation`` (the owner sent a reply this library does not accept).
    """

    def __init__(self, code: int, message: str):
        self.code = code
        self.name = ERROR_NAMES.get(code) or LOCAL_ERROR_NAMES.get(code, "error")
        self.message = message
        super().__init__(f"{self.name} ({code}): {message}")


# --- CRC-64/XZ (LAYOUT.md, "CRC-64/XZ") -------------------------------------------------------

_POLY = 0xC96C5795D7870F42


def _tables() -> Tuple[List[int], List[int]]:
    byte = []
    for value in range(256):
        crc = value
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        byte.append(crc)
    # Two bytes per step: the table for a 16-bit chunk (64 Ki entries, built once, ~0.1 s).
    wide = [0] * 65536
    for value in range(65536):
        crc = byte[value & 0xFF]
        crc = byte[(crc ^ (value >> 8)) & 0xFF] ^ (crc >> 8)
        wide[value] = crc
    return byte, wide


_BYTE_TABLE: List[int] = []
_WIDE_TABLE: List[int] = []


def _native_crc():
    """libshmbroker's ``shmb_crc64_update`` (carry-less multiply, GB/s) when the C library is installed."""
    for name in (os.environ.get("SHMBROKER_LIBRARY"), "libshmbroker.so.0", ctypes.util.find_library("shmbroker")):
        if not name:
            continue
        try:
            function = ctypes.CDLL(name).shmb_crc64_update
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_uint64
        function.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        return function
    return None


_NATIVE_CRC = _native_crc()


def crc64_xz(data, crc: int = 0) -> int:
    """CRC-64/XZ of a bytes-like object (check value: ``crc64_xz(b"123456789") == 0x995DC9BBDF1939FA``).
    Given ``crc``, the CRC of earlier bytes, it continues it: the CRC of those bytes followed by
    ``data`` (like ``zlib.crc32``).

    Uses libshmbroker when it is installed (or named by ``SHMBROKER_LIBRARY``), else pure Python."""
    if _NATIVE_CRC is not None:
        view = memoryview(data).cast("B")
        if len(view) == 0:
            return crc
        if view.readonly:
            buffer = (ctypes.c_char * len(view)).from_buffer_copy(view) if not isinstance(data, bytes) else data
            return _NATIVE_CRC(crc, buffer, len(view))
        return _NATIVE_CRC(crc, (ctypes.c_char * len(view)).from_buffer(view), len(view))
    return crc64_xz_pure(data, crc)


def crc64_xz_pure(data, crc: int = 0) -> int:
    """CRC-64/XZ in pure Python (a 64 Ki-entry table, two bytes per step); ``crc`` continues
    an earlier CRC, as in ``crc64_xz``."""
    global _BYTE_TABLE, _WIDE_TABLE
    if not _BYTE_TABLE:
        _BYTE_TABLE, _WIDE_TABLE = _tables()
    view = memoryview(data).cast("B")
    crc ^= 0xFFFFFFFFFFFFFFFF
    wide, byte = _WIDE_TABLE, _BYTE_TABLE
    pairs = len(view) // 2
    if pairs:
        # Native u16s (little-endian on every Linux this runs on): the first byte is the low half.
        chunks = array.array("H")
        chunks.frombytes(view[: pairs * 2])
        for chunk in chunks:
            crc = wide[(crc & 0xFFFF) ^ chunk] ^ (crc >> 16)
    if len(view) % 2:
        crc = byte[(crc ^ view[-1]) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


# --- Memory: mappings by address, 8-byte loads, the futex (LAYOUT.md) -------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


def _atomic_add():
    """``__atomic_fetch_add_4`` from libatomic, for counting this process in a wait board."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
        function = library.__atomic_fetch_add_4
        function.restype = ctypes.c_uint32
        function.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        return function
    except (OSError, AttributeError):
        return None


_ATOMIC_ADD = _atomic_add()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check_mappable(fd: int, size: int) -> None:
    """Refuses a descriptor that mapping ``size`` bytes of could crash this process: not a
    regular file, shorter than ``size``, or not sealed against shrinking (SIGBUS on a read)."""
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if stat.S_ISREG(info.st_mode) else 0
    except OSError as error:
        raise ShmBrokerError(PROTOCOL_VIOLATION, f"a descriptor from the owner cannot be examined: {error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ShmBrokerError(PROTOCOL_VIOLATION, "a descriptor from the owner is not a memory file")
    if info.st_size < size:
        raise ShmBrokerError(PROTOCOL_VIOLATION, f"a descriptor from the owner holds {info.st_size} bytes, not the {size} announced")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ShmBrokerError(PROTOCOL_VIOLATION, "a descriptor from the owner is not sealed against shrinking")


class _Mapping:
    """A shared mapping of a descriptor, addressed directly so that 4- and 8-byte fields are read
    with single loads (a ``struct.unpack`` of a memoryview may copy byte by byte)."""

    def __init__(self, fd: int, size: int, writable: bool):
        _check_mappable(fd, size)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        address = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            error = ctypes.get_errno()
            raise OSError(error, f"mmap: {os.strerror(error)}")
        self.address, self.size = address, size
        view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        # A read-only mapping gets a read-only view: a store through it would kill the interpreter.
        self.view = view if writable else view.toreadonly()

    def u64(self, offset: int) -> int:
        return ctypes.c_uint64.from_address(self.address + offset).value

    def u32(self, offset: int) -> int:
        return ctypes.c_uint32.from_address(self.address + offset).value

    def close(self) -> None:
        if self.address:
            self.view.release()
            _libc.munmap(self.address, self.size)
            self.address = 0


# --- Frames (PROTOCOL.md, "Frames") -----------------------------------------------------------


def _is_event(msg_type: int) -> bool:
    """Types 0x4000-0x7FFF are events (PROTOCOL.md, "Message types"): sent unasked, request id 0."""
    return 0x4000 <= msg_type < 0x8000


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def _read_string(body: bytes, offset: int) -> Tuple[str, int]:
    (length,) = struct.unpack_from("<H", body, offset)
    return body[offset + 2: offset + 2 + length].decode(), offset + 2 + length


@dataclass(frozen=True)
class Snapshot:
    """One verified version of a segment."""
    version: int
    data: bytes
    crc64: int
    published_at_ns: int


@dataclass(frozen=True)
class Block:
    """One verified block of a version (``Segment.read_blocks``): ``data`` starts ``offset``
    bytes into the version, which is ``length`` bytes long."""
    version: int
    offset: int
    data: bytes
    length: int


@dataclass(frozen=True)
class Receipt:
    """What a publish became: the new version, its length, CRC-64 and publish time."""
    version: int
    length: int
    crc64: int
    published_at_ns: int


@dataclass(frozen=True)
class Event:
    """A subscription event: ``kind`` is ``"version"`` (with the version's receipt), ``"retired"``,
    or, for a mirrored segment (docs/MIRROR.md), ``"stale"`` (its source went quiet) and
    ``"fresh"`` (heard again; ``published_at_ns`` then holds when it changed)."""
    kind: str
    segment: str
    version: int = 0
    length: int = 0
    crc64: int = 0
    published_at_ns: int = 0


def _receipt(body: bytes, offset: int = 0) -> Receipt:
    return Receipt(*struct.unpack_from("<QQQQ", body, offset))


class Segment:
    """An opened segment: a read-only mapping read lock-free, as ``docs/LAYOUT.md`` says.

    Reads never talk to the daemon and stay valid after the client closes; ``close()`` (or the
    ``with`` block) unmaps. Safe to read from several threads at once.
    """

    _HEADER_SIZE = W.SEGMENT_HEADER_SIZE
    _SLOT_HEADER = W.SEGMENT_SLOT_HEADER_SIZE

    def __init__(self, name: str, fds: List[int], mapping_size: int):
        self.name = name
        self._memory = self._board = None
        try:
            if not self._HEADER_SIZE <= mapping_size <= 1 << 48:
                raise ShmBrokerError(PROTOCOL_VIOLATION, f"OPENED for {name!r} announced a mapping of {mapping_size} bytes")
            self._memory = _Mapping(fds[0], mapping_size, writable=False)
            self._board = _Mapping(fds[1], W.BOARD_SIZE, writable=True) if len(fds) > 1 else None
            memory = self._memory
            if memory.u64(W.SEG_MAGIC) != _MAGIC:
                raise ShmBrokerError(BAD_SEGMENT, f"segment {name!r}: no SHMBROKR magic")
            if memory.u32(W.SEG_LAYOUT_VERSION) != LAYOUT_VERSION or memory.u32(W.SEG_HEADER_SIZE) != self._HEADER_SIZE:
                raise ShmBrokerError(BAD_SEGMENT, f"segment {name!r}: layout version {memory.u32(W.SEG_LAYOUT_VERSION)}, this library reads {LAYOUT_VERSION}")
            self.capacity = memory.u64(W.SEG_CAPACITY)
            self.slot_count = memory.u32(W.SEG_SLOT_COUNT)
            self._stride = memory.u64(W.SEG_SLOT_STRIDE)
            expected_stride = self._SLOT_HEADER + (self.capacity + W.SEGMENT_ALIGNMENT - 1) // W.SEGMENT_ALIGNMENT * W.SEGMENT_ALIGNMENT
            if not (1 <= self.capacity <= mapping_size and W.SEGMENT_MIN_SLOTS <= self.slot_count <= W.SEGMENT_MAX_SLOTS and self._stride == expected_stride
                    and self._HEADER_SIZE + self.slot_count * self._stride <= mapping_size):
                raise ShmBrokerError(BAD_SEGMENT, f"segment {name!r}: header does not match the mapping")
            # Block checksum tables (LAYOUT.md, "Block checksums"), after the slots.
            self.checksum_block_size = 0
            if memory.u32(W.SEG_FLAGS) & W.SEG_FLAG_BLOCK_CHECKSUMS:
                block = memory.u32(W.SEG_CHECKSUM_BLOCK_SIZE)
                self._tables = self._HEADER_SIZE + self.slot_count * self._stride
                self._table_stride = ((self.capacity + block - 1) // max(block, 1) * 8 + 63) // 64 * 64
                if not (W.SEGMENT_MIN_CHECKSUM_BLOCK <= block <= W.SEGMENT_MAX_CHECKSUM_BLOCK and block & (block - 1) == 0
                        and self._tables + self.slot_count * self._table_stride <= mapping_size):
                    raise ShmBrokerError(BAD_SEGMENT, f"segment {name!r}: the checksum tables do not match the mapping")
                self.checksum_block_size = block
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmaps the segment (and its wait board)."""
        if self._memory:
            self._memory.close()
        if self._board:
            self._board.close()

    @property
    def latest_version(self) -> int:
        """The newest complete version (0: never published)."""
        return self._memory.u64(W.SEG_LATEST_VERSION)

    @property
    def retired(self) -> bool:
        """Whether the owner removed the segment from its config."""
        return bool(self._memory.u32(W.SEG_FLAGS) & W.SEG_FLAG_RETIRED)

    @property
    def stale(self) -> bool:
        """Whether the segment mirrors another host's segment whose source has gone quiet
        (docs/MIRROR.md): the latest version stays readable but may be behind the source's."""
        return bool(self._memory.u32(W.SEG_FLAGS) & W.SEG_FLAG_STALE)

    def _slot(self, version: int) -> int:
        return self._HEADER_SIZE + (version % self.slot_count) * self._stride

    def _latest_slot(self):
        """How every read begins (LAYOUT.md): ``(version, slot, length, crc, published)`` of the
        latest version, ``"never"`` if nothing was published, ``None`` to look again."""
        memory = self._memory
        version = memory.u64(W.SEG_LATEST_VERSION)
        if version == 0:
            return "never"
        slot = self._slot(version)
        if memory.u64(slot) != version:
            return None
        length, crc, published = memory.u64(slot + 8), memory.u64(slot + 16), memory.u64(slot + 24)
        if length > self.capacity:  # a torn header read
            return None
        return version, slot, length, crc, published

    def _attempt(self, copy: bool):
        memory = self._memory
        latest = self._latest_slot()
        if latest is None or latest == "never":
            return latest
        version, slot, length, crc, published = latest
        start = slot + self._SLOT_HEADER
        data = memory.view[start: start + length]
        if copy:
            data = bytes(data)
        computed = crc64_xz(data)
        if memory.u64(slot) != version:  # the writer reused the slot meanwhile
            return None
        if computed != crc:
            raise ShmBrokerError(CORRUPT, f"segment {self.name!r} version {version}: CRC {computed:016x}, stored {crc:016x}")
        return version, data, crc, published

    def read(self, attempts: int = 10_000) -> Optional[Snapshot]:
        """The latest version, copied and verified; ``None`` if nothing was ever published."""
        for _ in range(attempts):
            outcome = self._attempt(copy=True)
            if outcome == "never":
                return None
            if outcome is not None:
                return Snapshot(*outcome)
        raise ShmBrokerError(CONTENDED, f"segment {self.name!r}: the writer replaced the version during {attempts} attempts")

    def read_blocks(self, attempts: int = 10_000) -> Iterator[Block]:
        """The latest version block by block: each block is copied and verified against the
        slot's checksum table before it is yielded (LAYOUT.md, "Block checksums"), so a large
        version is processed as it is checked, never whole in memory. Blocks come in order; if
        the writer overtakes the read, it starts over on the newer version and yields a block at
        offset 0 again, so reset what you accumulate when ``block.offset == 0``. Yields nothing if
        nothing was ever published. A segment without tables is verified whole first."""
        memory = self._memory
        size = self.checksum_block_size or W.SEGMENT_DEFAULT_CHECKSUM_BLOCK
        for _ in range(attempts):
            latest = self._latest_slot()
            if latest == "never":
                return
            if latest is None:
                continue
            version, slot, length, crc, _ = latest
            start = slot + self._SLOT_HEADER
            table = self._tables + (version % self.slot_count) * self._table_stride if self.checksum_block_size else None
            if table is None:
                whole = self._attempt(copy=False)
                if whole is None or whole == "never" or whole[0] != version:
                    continue
            running, overtaken = 0, False
            for index, offset in enumerate(range(0, length, size)):
                entry = memory.u64(table + index * 8) if table is not None else None
                data = bytes(memory.view[start + offset: start + min(length, offset + size)])
                if memory.u64(slot) != version:  # the writer reused the slot meanwhile
                    overtaken = True
                    break
                if table is not None:  # entry k: the CRC of everything up to the end of block k
                    running = crc64_xz(data, running)
                    if running != entry:
                        raise ShmBrokerError(CORRUPT, f"segment {self.name!r} version {version} block {index}: CRC {running:016x}, stored {entry:016x}")
                    if offset + len(data) == length and entry != crc:
                        raise ShmBrokerError(CORRUPT, f"segment {self.name!r} version {version}: its last block's checksum is not its CRC-64")
                yield Block(version, offset, data, length)
            if not overtaken:
                return
        raise ShmBrokerError(CONTENDED, f"segment {self.name!r}: the writer replaced the version during {attempts} attempts")

    def borrow(self, attempts: int = 10_000) -> "_Borrow":
        """Zero-copy: ``with segment.borrow() as view:`` gives a verified, read-only
        ``memoryview`` of the latest version in place (``None`` if never published), for example
        for ``numpy.frombuffer(view, dtype=...)``. Keep the borrow (``borrow = segment.borrow()``,
        ``with borrow as view:``) to ask ``borrow.valid``, whether the writer left the version
        alone meanwhile; leaving the block re-checks and raises ``contended`` if not. The view is
        released when the block ends."""
        return _Borrow(self, attempts)

    def wait(self, after: int, timeout: Optional[float] = None) -> int:
        """Blocks until a version newer than ``after`` exists, the segment is retired, or the
        timeout passes, sleeping on the segment's futex word; returns the latest version."""
        memory, board = self._memory, self._board
        deadline = None if timeout is None else time.monotonic() + timeout
        registered = bool(board and _ATOMIC_ADD and _SYS_FUTEX)
        if registered:
            _ATOMIC_ADD(board.address, 1, 5)  # seq_cst, then re-check below
        try:
            while True:
                word = memory.u32(W.SEG_FUTEX_WORD)
                latest = memory.u64(W.SEG_LATEST_VERSION)
                if latest > after or self.retired:
                    return latest
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return latest
                if not registered or _SYS_FUTEX is None:
                    # Without the board the writer may skip the wake-up: look again every millisecond.
                    time.sleep(min(0.001, remaining) if remaining is not None else 0.001)
                    continue
                spec = None
                if remaining is not None:
                    spec = _Timespec(int(remaining), int((remaining % 1) * 1e9))
                _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(memory.address + W.SEG_FUTEX_WORD), _FUTEX_WAIT, ctypes.c_uint32(word),
                              ctypes.byref(spec) if spec else None, None, 0)
        finally:
            if registered:
                _ATOMIC_ADD(board.address, 0xFFFFFFFF, 5)


class _Borrow:
    def __init__(self, segment: Segment, attempts: int):
        self._segment, self._attempts = segment, attempts
        self._version = 0
        self.view: Optional[memoryview] = None

    def __enter__(self) -> Optional[memoryview]:
        for _ in range(self._attempts):
            outcome = self._segment._attempt(copy=False)
            if outcome == "never":
                return None
            if outcome is not None:
                self._version, self.view = outcome[0], outcome[1]
                return self.view
        raise ShmBrokerError(CONTENDED, f"segment {self._segment.name!r}: contended")

    @property
    def valid(self) -> bool:
        return self._version != 0 and self._segment._memory.u64(self._segment._slot(self._version)) == self._version

    def __exit__(self, exc_type, exc, tb) -> None:
        still = self.valid
        if self.view is not None:
            self.view.release()
        if exc_type is None and self._version and not still:
            raise ShmBrokerError(CONTENDED, f"segment {self._segment.name!r}: version {self._version} was replaced while borrowed")


class Client:
    """A connection to an owner's control socket (``shmbrokerd``, or an application embedding it).

    Every reply is checked before it is used: its request id and type, its length, and the
    descriptors it carries (unexpected ones are closed). A request waits at most ``timeout``
    seconds for its reply (``None``: forever), then raises ``timeout`` (1004) and the connection
    is closed, since a late reply would answer the wrong request.
    """

    #: The reply each request expects, and how many descriptors may come with it.
    _REPLIES = {W.MSG_HELLO: (W.MSG_HELLO_OK, 0), W.MSG_OPEN: (W.MSG_OPENED, 2), W.MSG_SUBSCRIBE: (W.MSG_SUBSCRIBED, 0),
                W.MSG_UNSUBSCRIBE: (W.MSG_OK, 0), W.MSG_PUBLISH: (W.MSG_PUBLISHED, 0), W.MSG_STATUS: (W.MSG_STATUS_REPORT, 0)}

    def __init__(self, socket_path: str, client_name: str = "python", timeout: Optional[float] = 30.0):
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._timeout = timeout
        self._next_id = 1
        self._events: "collections.deque[Event]" = collections.deque()
        try:
            self._socket.connect(socket_path)
            _, body, _ = self._request(W.MSG_HELLO, struct.pack("<I", PROTOCOL_VERSION) + _string(client_name))
            with _parsing("HELLO_OK"):
                self.protocol_version, self.max_frame_size = struct.unpack_from("<II", body)
                self.daemon_version, _ = _read_string(body, 8)
        except BaseException:
            self._socket.close()
            raise

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection; opened segments stay mapped until closed themselves."""
        self._socket.close()

    # Frames

    def _receive(self, timeout: Optional[float] = None):
        """One frame: (type, request id, body, descriptors), or ``None`` after ``timeout``."""
        if timeout is not None:
            ready, _, _ = select.select([self._socket], [], [], timeout)
            if not ready:
                return None
        fds = array.array("i")
        try:
            data, ancillary, flags, _ = self._socket.recvmsg(MAX_FRAME + 1, socket.CMSG_SPACE(4 * fds.itemsize))
        except OSError as error:
            raise ShmBrokerError(18, f"the connection failed: {error}") from None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        problem = None
        if not data:
            problem = ShmBrokerError(18, "the daemon closed the connection")
        elif flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            problem = ShmBrokerError(1, "a frame from the daemon was truncated")
        elif len(data) < _HEADER.size or _HEADER.unpack_from(data)[3] != len(data) - _HEADER.size:
            problem = ShmBrokerError(PROTOCOL_VIOLATION, "a frame from the owner whose length field is wrong")
        if problem:
            for fd in fds:
                os.close(fd)
            raise problem
        msg_type, _, request_id, length = _HEADER.unpack_from(data)
        return msg_type, request_id, data[12:12 + length], list(fds)

    def _request(self, msg_type: int, body: bytes, fds: Tuple[int, ...] = ()):
        request_id = self._next_id
        self._next_id += 1
        frame = _HEADER.pack(msg_type, 0, request_id, len(body)) + body
        try:
            if fds:
                self._socket.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self._socket.send(frame)
        except OSError as error:
            raise ShmBrokerError(18, f"the connection failed: {error}") from None
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        expected, allowed_fds = self._REPLIES.get(msg_type, (None, 0))
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            received = self._receive(remaining)
            if received is None:
                self._socket.close()
                raise ShmBrokerError(TIMEOUT, f"no reply within {self._timeout} s; the connection is closed")
            reply_type, reply_id, reply, reply_fds = received
            if _is_event(reply_type):
                for fd in reply_fds:
                    os.close(fd)
                self._keep_event(reply_type, reply)
                continue
            if reply_id != request_id:
                for fd in reply_fds:
                    os.close(fd)
                raise ShmBrokerError(PROTOCOL_VIOLATION, f"a reply to request {reply_id}, expected {request_id}")
            if reply_type == W.MSG_ERROR:
                for fd in reply_fds:
                    os.close(fd)
                with _parsing("ERROR"):
                    code, = struct.unpack_from("<H", reply)
                    message, _ = _read_string(reply, 2)
                raise ShmBrokerError(code, message)
            # STATUS may come as a file (one descriptor); everything else as its one reply type.
            if msg_type == W.MSG_STATUS and reply_type == W.MSG_STATUS_REPORT_FILE:
                allowed_fds = 1
            elif expected is not None and reply_type != expected:
                for fd in reply_fds:
                    os.close(fd)
                raise ShmBrokerError(PROTOCOL_VIOLATION, f"reply 0x{reply_type:04x} to request 0x{msg_type:04x}")
            for fd in reply_fds[allowed_fds:]:
                os.close(fd)
            return reply_type, reply, reply_fds[:allowed_fds]

    def _keep_event(self, msg_type: int, body: bytes) -> None:
        """Queues an event; a newer VERSION of a segment replaces an older one still queued (the
        daemon coalesces the same way), and at most ``MAX_QUEUED_EVENTS`` are kept."""
        try:
            name, offset = _read_string(body, 0)
            if msg_type == W.MSG_VERSION:
                receipt = _receipt(body, offset)
                event = Event("version", name, receipt.version, receipt.length, receipt.crc64, receipt.published_at_ns)
            elif msg_type == W.MSG_RETIRED:
                event = Event("retired", name)
            elif msg_type == W.MSG_STALENESS:
                stale, changed_at = struct.unpack_from("<IQ", body, offset)
                if stale > 1:
                    return
                event = Event("stale" if stale else "fresh", name, published_at_ns=changed_at)
            else:
                return  # an event type from a newer owner: ignored
        except (struct.error, UnicodeDecodeError):
            return  # a malformed event is dropped; the next one, or a read, tells the latest version
        if event.kind == "version":
            for queued in list(self._events):
                if queued.kind == "version" and queued.segment == name:
                    self._events.remove(queued)
        self._events.append(event)
        while len(self._events) > MAX_QUEUED_EVENTS:
            self._events.popleft()

    # Requests

    def open(self, name: str) -> Segment:
        """Opens (maps) a segment; needs read permission."""
        _, body, fds = self._request(W.MSG_OPEN, _string(name))
        try:
            with _parsing("OPENED"):
                capacity, slots, layout, mapping_size, latest = struct.unpack_from("<QIIQQ", body)
            if not fds:
                raise ShmBrokerError(10, "OPENED carried no descriptor")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Segment(name, fds, mapping_size)

    def publish(self, name: str, data) -> Receipt:
        """Publishes ``data`` (bytes-like) as the segment's next version; large payloads travel
        in a sealed memfd. Needs publish permission; refused with ``payload-too-large`` (nothing
        written) when longer than the capacity."""
        data = memoryview(data).cast("B")
        inline_limit = MAX_FRAME - 12 - 2 - len(name.encode()) - 1
        if len(data) <= inline_limit:
            _, body, _ = self._request(W.MSG_PUBLISH, _string(name) + b"\x00" + bytes(data))
            return _checked_receipt(body, "PUBLISHED")
        fd = os.memfd_create("shmbroker-python", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            # Sealed against every change: the daemon publishes exactly these bytes.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
            _, body, _ = self._request(W.MSG_PUBLISH, _string(name) + b"\x01" + struct.pack("<Q", len(data)), (fd,))
            return _checked_receipt(body, "PUBLISHED")
        finally:
            os.close(fd)

    def subscribe(self, name: str) -> Receipt:
        """Subscribes to VERSION events; returns the latest version at subscription (version 0: never published)."""
        _, body, _ = self._request(W.MSG_SUBSCRIBE, _string(name))
        return _checked_receipt(body, "SUBSCRIBED")

    def unsubscribe(self, name: str) -> None:
        self._request(W.MSG_UNSUBSCRIBE, _string(name))

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event of any subscription, or ``None`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            received = self._receive(remaining)
            if received is None:
                return None
            msg_type, _, body, fds = received
            for fd in fds:
                os.close(fd)
            if _is_event(msg_type):
                self._keep_event(msg_type, body)
        return self._events.popleft()

    def events(self, name: str, timeout: Optional[float] = None) -> Iterator[Event]:
        """Subscribes to ``name`` and yields its events; ends after a ``retired`` event or when
        ``timeout`` seconds pass without one."""
        self.subscribe(name)
        while True:
            event = self.next_event(timeout)
            if event is None:
                return
            if event.segment != name:
                continue
            yield event
            if event.kind == "retired":
                return

    def fileno(self) -> int:
        """The socket, for a caller's own event loop (readable: an event or reply is waiting)."""
        return self._socket.fileno()

    def status(self) -> dict:
        """The owner's STATUS report (docs/PROTOCOL.md, "STATUS_REPORT JSON")."""
        reply_type, body, fds = self._request(W.MSG_STATUS, b"")
        try:
            if reply_type == W.MSG_STATUS_REPORT_FILE:
                with _parsing("STATUS_REPORT_FILE"):
                    (length,) = struct.unpack_from("<Q", body)
                if not fds:
                    raise ShmBrokerError(10, "STATUS_REPORT_FILE carried no descriptor")
                info = os.fstat(fds[0])
                if not stat.S_ISREG(info.st_mode) or length > info.st_size or length > 1 << 30:
                    raise ShmBrokerError(PROTOCOL_VIOLATION, f"STATUS_REPORT_FILE announced {length} bytes that its file does not hold")
                body = os.pread(fds[0], length, 0)
            with _parsing("STATUS_REPORT"):
                report = json.loads(body)
            if not isinstance(report, dict):
                raise ShmBrokerError(PROTOCOL_VIOLATION, "the STATUS report is not a JSON object")
            return report
        finally:
            for fd in fds:
                os.close(fd)


class _parsing:
    """Turns what a malformed reply makes the standard library raise into ``protocol-violation``."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, (struct.error, UnicodeDecodeError, ValueError, IndexError)):
            raise ShmBrokerError(PROTOCOL_VIOLATION, f"a malformed {self.what} from the owner: {exc}") from None
        return False


def _checked_receipt(body: bytes, what: str) -> Receipt:
    with _parsing(what):
        return _receipt(body)


def connect(socket_path: str, client_name: str = "python", timeout: Optional[float] = 30.0) -> Client:
    """Connects to an owner's control socket and performs the handshake; each request then waits
    at most ``timeout`` seconds for its reply (``None``: forever)."""
    return Client(socket_path, client_name, timeout)
