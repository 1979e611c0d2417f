"""The Python package against the real daemon: `.build/debug/shmbrokerd` (run `swift build` first,
or set SHMBROKER_BIN to the directory holding shmbrokerd and shmbrokerctl)."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Sources" / "python"))
import shmbroker  # noqa: E402

BIN = pathlib.Path(os.environ.get("SHMBROKER_BIN", ROOT / ".build" / "debug"))


@pytest.fixture
def daemon():
    if not (BIN / "shmbrokerd").exists():
        pytest.skip(f"no shmbrokerd in {BIN}: run `swift build` first")
    directory = tempfile.mkdtemp(prefix="shmbroker-py-", dir="/tmp")
    os.chmod(directory, 0o755)
    sock = os.path.join(directory, "control.sock")
    config = {
        "socket": {"path": sock, "mode": "0666"},
        "segments": [
            {"name": "small", "size": 4096, "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}},
            {"name": "big", "size": "1MiB", "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}},
            {"name": "private", "size": 64, "readers": {"users": [0]}},
        ],
    }
    path = os.path.join(directory, "config.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    process = subprocess.Popen([str(BIN / "shmbrokerd"), "--config", path, "--log-level", "warning"],
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            probe.connect(sock)
            probe.close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the daemon did not start: " + process.stderr.read().decode())
            time.sleep(0.02)
    yield sock
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    shutil.rmtree(directory, ignore_errors=True)


def test_crc64_check_value_and_lengths():
    assert shmbroker.crc64_xz(b"123456789") == 0x995DC9BBDF1939FA
    assert shmbroker.crc64_xz(b"") == 0
    reference = 0xFFFFFFFFFFFFFFFF
    data = bytes((index * 37 + 11) & 0xFF for index in range(300))
    for length in range(len(data) + 1):
        if length:
            reference ^= data[length - 1]
            for _ in range(8):
                reference = (reference >> 1) ^ 0xC96C5795D7870F42 if reference & 1 else reference >> 1
        assert shmbroker.crc64_xz(data[:length]) == reference ^ 0xFFFFFFFFFFFFFFFF, length


def test_the_pure_and_the_native_crc_agree(tmp_path):
    data = bytes((index * 131 + 7) & 0xFF for index in range(100_003))
    pure = shmbroker.crc64_xz_pure(data)
    assert shmbroker.crc64_xz(data) == pure
    assert shmbroker.crc64_xz_pure(data[40_000:], shmbroker.crc64_xz_pure(data[:40_000])) == pure, "a CRC continued"
    if not shutil.which("make") or not shutil.which("cc"):
        pytest.skip("make and cc are needed to build libshmbroker")
    subprocess.run(["make", "-s", "-C", str(ROOT / "Sources" / "libshmbroker"), f"BUILD={tmp_path}"], check=True)
    script = ("import sys, shmbroker\n"
              "assert shmbroker._NATIVE_CRC is not None, 'libshmbroker was not loaded'\n"
              "data = bytes((i * 131 + 7) & 0xFF for i in range(100_003))\n"
              "print(shmbroker.crc64_xz(data), shmbroker.crc64_xz(memoryview(bytearray(data))[5:]), shmbroker.crc64_xz_pure(data[5:]),\n"
              "      shmbroker.crc64_xz(data[9:], shmbroker.crc64_xz(data[:9])))\n")
    environment = dict(os.environ, SHMBROKER_LIBRARY=str(tmp_path / "libshmbroker.so.0"),
                       PYTHONPATH=str(ROOT / "Sources" / "python"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 0, result.stderr
    native, native_slice, pure_slice, native_continued = map(int, result.stdout.split())
    assert native == pure and native_slice == pure_slice and native_continued == pure


def test_read_publish_and_never_published(daemon):
    with shmbroker.connect(daemon) as client:
        assert client.protocol_version == 1
        with client.open("small") as segment:
            assert segment.read() is None, "never published is not an empty version"
            receipt = client.publish("small", b"hello from python")
            assert receipt.version == 1 and receipt.length == 17
            snapshot = segment.read()
            assert snapshot.version == 1
            assert snapshot.data == b"hello from python"
            assert snapshot.crc64 == receipt.crc64 == shmbroker.crc64_xz(b"hello from python")
            empty = client.publish("small", b"")
            assert empty.version == 2 and segment.read().data == b""


def test_large_publish_travels_in_a_memfd_and_borrow_is_zero_copy(daemon):
    payload = bytes((index * 7) & 0xFF for index in range(300_000))
    with shmbroker.connect(daemon) as client:
        receipt = client.publish("big", payload)
        with client.open("big") as segment:
            with segment.borrow() as view:
                assert isinstance(view, memoryview)
                assert len(view) == len(payload) and bytes(view[:1000]) == payload[:1000]
            assert segment.read().version == receipt.version


def test_read_blocks_yields_verified_blocks_in_order(daemon):
    payload = bytes((index * 13) & 0xFF for index in range(300_000))
    with shmbroker.connect(daemon) as client:
        receipt = client.publish("big", payload)
        with client.open("big") as segment:
            assert segment.checksum_block_size == 16384
            blocks = list(segment.read_blocks())
            assert [block.offset for block in blocks] == list(range(0, 300_000, 16384))
            assert all(block.version == receipt.version and block.length == len(payload) for block in blocks)
            assert b"".join(block.data for block in blocks) == payload
            client.publish("big", b"")
            assert list(segment.read_blocks()) == []


def test_a_corrupt_block_is_reported_before_it_is_yielded(hostile):
    with shmbroker.connect(hostile("corrupt-block")) as client:
        with client.open("hostile") as segment:
            assert segment.checksum_block_size == 4096
            handed = []
            with pytest.raises(shmbroker.ShmBrokerError) as raised:
                for block in segment.read_blocks():
                    handed.append(block.offset)
            assert raised.value.code == shmbroker.CORRUPT and "block 1" in str(raised.value)
            assert handed == [0], "only the block before the corrupt one was yielded"
            assert len(segment.read().data) == 8192 + 100, "a whole read checks the whole CRC, which is right"


def test_errors_carry_the_protocol_codes(daemon):
    with shmbroker.connect(daemon) as client:
        with pytest.raises(shmbroker.ShmBrokerError) as missing:
            client.open("nope")
        assert missing.value.code == 5 and missing.value.name == "no-such-segment"
        with pytest.raises(shmbroker.ShmBrokerError) as large:
            client.publish("small", b"x" * 5000)
        assert large.value.name == "payload-too-large"
        with pytest.raises(shmbroker.ShmBrokerError) as name:
            client.open("bad name")
        assert name.value.name == "invalid-segment-name"
        assert client.status()["segments"][0]["name"] == "small", "the connection is still usable"


def test_events_follow_versions(daemon):
    with shmbroker.connect(daemon) as reader, shmbroker.connect(daemon) as writer:
        seen = []
        def publish_later():
            time.sleep(0.2)
            for index in range(3):
                writer.publish("small", b"event %d" % index)
        thread = threading.Thread(target=publish_later)
        thread.start()
        for event in reader.events("small", timeout=10):
            assert event.kind == "version"
            seen.append(event.version)
            if event.version >= 3:
                break
        thread.join()
        assert seen[-1] == 3


def test_futex_wait_wakes_on_a_publish_and_times_out(daemon):
    with shmbroker.connect(daemon) as client:
        segment = client.open("small")
        start = time.monotonic()
        assert segment.wait(after=0, timeout=0.2) == 0
        assert time.monotonic() - start >= 0.19
        result = {}
        def wait():
            result["version"] = segment.wait(after=0, timeout=20)
        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.2)
        client.publish("small", b"wake up")
        thread.join(30)
        assert result["version"] == 1
        segment.close()


def test_status_and_permissions_as_another_user(daemon):
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as nobody")
    script = (
        "import sys, shmbroker\n"
        "c = shmbroker.connect(sys.argv[1])\n"
        "try:\n    c.open('private')\nexcept shmbroker.ShmBrokerError as e:\n    print(e.name)\n"
        "print(sorted(s['name'] for s in c.status()['segments']))\n"
    )
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "Sources" / "python"))
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script, daemon],
                            capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 0, result.stderr
    # A segment nobody may not read is answered like an absent one, and STATUS leaves it out.
    assert result.stdout.splitlines() == ["no-such-segment", "['big', 'small']"]


# --- Against a hostile owner (issue 17, items 4, 11, 12, 22) ------------------------------------

HOSTILE = ROOT / "Tests" / "hostile" / "server.py"


@pytest.fixture
def hostile():
    """Starts Tests/hostile/server.py for a scenario; yields a function that does so."""
    started = []

    def start(scenario):
        directory = tempfile.mkdtemp(prefix="shmbroker-hostile-", dir="/tmp")
        path = os.path.join(directory, "control.sock")
        process = subprocess.Popen([sys.executable, str(HOSTILE), path, scenario], stdout=subprocess.PIPE)
        started.append((process, directory))
        assert process.stdout.readline().strip() == b"listening"
        return path

    yield start
    for process, directory in started:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def run_client(code, socket_path):
    """Runs `code` in a child interpreter (a SIGBUS there must not take pytest down)."""
    script = f"import sys; sys.path.insert(0, {str(ROOT / 'Sources' / 'python')!r}); import shmbroker\n" + code
    return subprocess.run([sys.executable, "-c", script, socket_path], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scenario", ["short-file", "short-sealed", "huge-capacity", "unsealed", "short-board", "pipe", "bad-blocks"])
def test_a_hostile_segment_descriptor_is_refused_not_mapped(hostile, scenario):
    result = run_client(
        "client = shmbroker.connect(sys.argv[1])\n"
        "try:\n"
        "    segment = client.open('hostile')\n"
        "    segment.read(); segment.wait(5, timeout=0.01)\n"
        "    with segment.borrow() as view: pass\n"
        "    print('accepted')\n"
        "except shmbroker.ShmBrokerError as error:\n"
        "    print('refused', error.code, error.name)\n",
        hostile(scenario))
    assert result.returncode == 0, f"{scenario}: the client died ({result.returncode}): {result.stderr}"
    assert result.stdout.split()[:2] in (["refused", "1007"], ["refused", "1005"]), result.stdout + result.stderr


@pytest.mark.parametrize("scenario", ["status-overflow", "status-long"])
def test_a_status_file_shorter_than_announced_is_refused(hostile, scenario):
    with shmbroker.connect(hostile(scenario)) as client:
        with pytest.raises(shmbroker.ShmBrokerError) as refused:
            client.status()
        assert refused.value.name == "protocol-violation"


def test_a_silent_owner_times_out_instead_of_hanging(hostile):
    client = shmbroker.connect(hostile("silent"), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(shmbroker.ShmBrokerError) as waited:
        client.open("anything")
    assert waited.value.name == "timeout" and time.monotonic() - started < 5


def test_wrong_replies_raise_library_errors_and_leak_no_descriptor(hostile):
    path = hostile("wrong-replies")
    before = len(os.listdir("/proc/self/fd"))
    for request in (lambda c: c.open("x"), lambda c: c.subscribe("x"), lambda c: c.status()):
        with shmbroker.connect(path) as client:
            with pytest.raises(shmbroker.ShmBrokerError) as refused:
                request(client)
            assert refused.value.name == "protocol-violation", refused.value
    assert len(os.listdir("/proc/self/fd")) == before, "descriptors that came with bad replies are closed"


def test_borrowed_views_are_read_only_and_events_are_bounded(daemon):
    with shmbroker.connect(daemon) as client:
        client.publish("small", b"read only")
        segment = client.open("small")
        borrow = segment.borrow()
        with borrow as view:
            assert view.readonly and bytes(view) == b"read only"
            with pytest.raises(TypeError):
                view[0] = 1
            assert borrow.valid
        client.subscribe("small")
        for index in range(200):
            client.publish("small", bytes([index]))
        # Events that arrived while publishing were coalesced: one VERSION per segment, the latest.
        events = []
        while True:
            event = client.next_event(timeout=0.5)
            if event is None:
                break
            events.append(event)
        assert 1 <= len(events) <= shmbroker.MAX_QUEUED_EVENTS
        assert events[-1].version == segment.latest_version
        segment.close()
