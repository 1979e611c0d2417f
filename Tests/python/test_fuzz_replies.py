"""Property-based fuzzing (hypothesis) of the Python package's reply parsing: whatever an owner
sends back — any frame type, request id, length and body, with or without descriptors — a request
ends in a result or a ShmBrokerError, never another exception, and no descriptor is leaked."""
import array
import collections
import os
import pathlib
import socket
import struct
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Sources" / "python"))
import shmbroker  # noqa: E402

TYPES = [0x8000, 0x8001, 0x8002, 0x8003, 0x8005, 0x8006, 0x8007, 0x80FF, 0x4001, 0x4002, 0x4999, 0x0001, 0xFFFF]

frames = st.lists(st.tuples(
    st.sampled_from(TYPES) | st.integers(0, 0xFFFF),       # type
    st.integers(0, 3) | st.integers(0, 2**32 - 1),          # request id (the library expects 1)
    st.binary(max_size=96),                                 # body
    st.booleans(),                                          # the length field tells the truth
    st.integers(0, 2),                                      # descriptors attached
), max_size=4)


def client_over(pair_end, timeout):
    """A Client on one end of a socket pair, as if the handshake had happened."""
    client = shmbroker.Client.__new__(shmbroker.Client)
    client._socket = pair_end
    client._timeout = timeout
    client._next_id = 1
    client._events = collections.deque()
    return client


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=int(os.environ.get("SHMBROKER_FUZZ_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames=frames, request=st.sampled_from(["open", "subscribe", "publish", "status", "event"]))
def test_any_reply_ends_in_a_result_or_a_library_error(frames, request):
    before = open_descriptors()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for kind, request_id, body, honest, count in frames:
            length = len(body) if honest else (len(body) * 7 + 3) & 0xFFFFFFFF
            frame = struct.pack("<HHII", kind & 0xFFFF, 0, request_id, length) + body
            fds = [os.memfd_create("fuzz", os.MFD_CLOEXEC) for _ in range(count)]
            try:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                theirs.sendmsg([frame], ancillary)
            finally:
                for fd in fds:
                    os.close(fd)
        theirs.shutdown(socket.SHUT_WR)
        client = client_over(ours, timeout=0.2)
        try:
            if request == "open":
                client.open("fuzz").close()
            elif request == "subscribe":
                client.subscribe("fuzz")
            elif request == "publish":
                client.publish("fuzz", b"payload")
            elif request == "status":
                client.status()
            else:
                client.next_event(timeout=0.05)
        except shmbroker.ShmBrokerError:
            pass
        assert len(client._events) <= shmbroker.MAX_QUEUED_EVENTS
    finally:
        ours.close()
        theirs.close()
    assert open_descriptors() == before, "descriptors that came with replies are closed"
