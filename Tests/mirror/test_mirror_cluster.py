"""shmbroker-mirror across three hosts (network namespaces), with a real JetStream cluster of
three nats-servers: the daemon and an exporting mirror on host A, an importing mirror on host B,
readers on B (Python here, shmbrokerctl and the C library in places). Every scenario checks that
no torn or wrong bytes are served, that versions never go backwards, that the stale flag rises
within its bound, and that B converges to A's latest version after the fault.

Needs root (network namespaces) and nats-server (Debian's, or NATS_SERVER=/path). Run:
    python3 -m pytest -q Tests/mirror
"""
import ctypes  # noqa: F401  (used in the hostile writer's code, run in a namespace)
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cluster import (BIN, HOSTS, ROOT, Checker, Cluster, Publisher, check_payload, netns, payload, sh,  # noqa: E402
                     wait_for, wait_socket)

STALE_AFTER = 1.0
HEARTBEAT = 0.25
# The stale flag must rise within staleAfter, plus one heartbeat interval (the last one heard may
# be that old), plus the importer's evaluation tick and scheduling slack on a shared 2-vCPU VM.
STALE_BOUND = STALE_AFTER + HEARTBEAT + 0.75
SERVER = os.environ.get("NATS_SERVER", shutil.which("nats-server") or "/usr/sbin/nats-server")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(SERVER), reason=f"no nats-server at {SERVER}"),
    pytest.mark.skipif(not (BIN / "shmbroker-mirror").exists(), reason=f"no shmbroker-mirror in {BIN}: run swift build"),
]


def servers_for(host):
    """A host's own server first, then the others."""
    order = [host] + [other for other in HOSTS if other != host]
    return [f"nats://{HOSTS[name]}:4222" for name in order]


class Environment:
    def __init__(self):
        self.cluster = Cluster(SERVER)
        c = self.cluster
        c.up()
        c.start_servers()
        self.a_socket = c.path("a.sock")
        self.b_socket = c.path("b.sock")
        self.daemon_config = c.write_json("daemon-a.json", {
            "socket": {"path": self.a_socket, "mode": "0666"},
            "segments": [
                {"name": "small", "size": "4KiB", "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}},
                {"name": "frames", "size": "16MiB", "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}},
            ]})
        self.mirror_a_config = c.write_json("mirror-a.json", {
            "host": "a",
            "nats": {"servers": servers_for("a"), "createBucket": {"replicas": 3, "storage": "file"}},
            "heartbeatIntervalSeconds": HEARTBEAT, "staleAfterSeconds": STALE_AFTER,
            "export": {"socket": self.a_socket, "segments": ["small", "frames"]},
        })
        self.mirror_b_config = c.write_json("mirror-b.json", {
            "host": "b",
            "nats": {"servers": servers_for("b")},
            "heartbeatIntervalSeconds": HEARTBEAT, "staleAfterSeconds": STALE_AFTER,
            "import": {
                "socket": {"path": self.b_socket, "mode": "0666"},
                "segments": [
                    {"from": "a", "segment": "small", "name": "small", "size": "4KiB", "readers": {"users": ["*"]}},
                    {"from": "a", "segment": "frames", "name": "frames", "size": "16MiB", "readers": {"users": ["*"]}},
                    {"from": "x", "segment": "hostile", "name": "hostile", "size": "64KiB", "readers": {"users": ["*"]}},
                    {"from": "s", "segment": "kept", "name": "kept", "size": "4KiB", "readers": {"users": ["*"]}},
                ],
            },
        })
        self.start_daemon()
        self.start_mirror_a()
        self.start_mirror_b()

    def start_daemon(self):
        self.daemon = self.cluster.spawn("shmbrokerd-a", [str(BIN / "shmbrokerd"), "--config", self.daemon_config], host="a")
        wait_socket(self.a_socket)

    def start_mirror_a(self):
        self.mirror_a = self.cluster.spawn("mirror-a", [str(BIN / "shmbroker-mirror"), "--config", self.mirror_a_config], host="a")

    def start_mirror_b(self):
        self.mirror_b = self.cluster.spawn("mirror-b", [str(BIN / "shmbroker-mirror"), "--config", self.mirror_b_config,
                                                        "--metrics-textfile", self.cluster.path("mirror-b.prom")], host="b")
        wait_socket(self.b_socket)

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in self.cluster.processes + list(self.cluster.servers.values()))


@pytest.fixture(scope="module")
def env():
    environment = Environment()
    yield environment
    environment.cluster.teardown()
    if not os.environ.get("SHMBROKER_KEEP"):
        environment.cluster.remove()


@pytest.fixture
def small(env):
    """A publisher of 4 KiB versions on A and a checking reader on B, for one scenario."""
    publisher = Publisher(env.a_socket, "small", 4096)
    checker = Checker(env.b_socket, "small")
    publisher.start()
    checker.start()
    yield publisher, checker
    publisher.stop()
    checker.stop()
    assert not checker.errors, checker.errors[:5]


def converged(env, publisher, checker, timeout, what):
    """B reaches the version A had when this was called (or a later one), with A's bytes for
    every version B showed."""
    try:
        wait_for(lambda: publisher.latest > 0, timeout, "A's first publish")
        target = publisher.latest
        wait_for(lambda: checker.latest >= target, timeout, f"B to reach A's version {target} ({what})")
    except AssertionError:
        print(env.logs())
        raise
    with publisher.lock:
        known = dict(publisher.seq_of_version)
    for _, version, seq in checker.seen:
        if version in known:
            assert known[version] == seq, f"B served A's version {version} with another version's bytes"


def test_versions_and_bytes_are_the_sources(env, small):
    publisher, checker = small
    converged(env, publisher, checker, 20, "start")
    # (At start-up it may be stale until the first heartbeat: that is what READY waits for.)
    wait_for(lambda: not checker.stale_changes or not checker.stale_changes[-1][1], 10, "the segment to be fresh")
    settled = time.monotonic()
    time.sleep(2)
    converged(env, publisher, checker, 5, "steady state")
    versions = [version for _, version, _ in checker.seen]
    assert versions == sorted(versions)
    # shmbrokerctl on B: the same version and bytes, and STATUS's mirror fields.
    read = subprocess.run([str(BIN / "shmbrokerctl"), "read", "small", "--socket", env.b_socket, "--verbose"],
                          capture_output=True, timeout=30)
    assert read.returncode == 0, read.stderr
    check_payload(read.stdout)
    status = subprocess.run([str(BIN / "shmbrokerctl"), "status", "--socket", env.b_socket], capture_output=True, text=True, timeout=30)
    assert "mirror of a/small" in status.stdout and "fresh" in status.stdout, status.stdout
    assert not any(stale for moment, stale in checker.stale_changes if moment > settled), \
        "a fresh segment was flagged stale (the mirrors' logs say why):\n" + env.logs()


def test_a_16_mib_segment_arrives_whole(env):
    checker = Checker(env.b_socket, "frames")
    checker.start()
    client = __import__("shmbroker").Client(env.a_socket, "frames-publisher")
    try:
        for seq in range(3):
            receipt = client.publish("frames", payload(1000 + seq, 16 << 20))
            wait_for(lambda: checker.latest >= receipt.version, 60, f"version {receipt.version} of 16 MiB on B")
    finally:
        client.close()
        checker.stop()
    assert not checker.errors, checker.errors[:5]
    assert [seq for _, _, seq in checker.seen][-1] == 1002


@pytest.fixture(scope="module")
def c_reader(env):
    """Tests/mirror/c_reader.c built against libshmbroker."""
    build = env.cluster.path("c")
    subprocess.run(["make", "-s", "-C", str(ROOT / "Sources" / "libshmbroker"), f"BUILD={build}"], check=True)
    binary = os.path.join(build, "c_reader")
    subprocess.run(["cc", "-std=c11", "-Wall", "-Werror", "-I", str(ROOT / "Sources" / "libshmbroker" / "include"),
                    "-o", binary, str(ROOT / "Tests" / "mirror" / "c_reader.c"), f"-L{build}", "-lshmbroker",
                    f"-Wl,-rpath,{build}"], check=True)
    return binary


@pytest.mark.parametrize("seconds", [5, 15])
def test_a_cut_link_raises_the_stale_flag_and_heals(env, small, c_reader, seconds):
    publisher, checker = small
    converged(env, publisher, checker, 20, "before the cut")
    # Readers in C and shmbrokerctl watch beside the Python checker: each must see the flag.
    c_lines = subprocess.Popen([c_reader, env.b_socket, "small", str(seconds + 6), "100"], stdout=subprocess.PIPE, text=True)
    watch = subprocess.Popen([str(BIN / "shmbrokerctl"), "watch", "small", "--json", "--socket", env.b_socket],
                             stdout=subprocess.PIPE, text=True)
    events = __import__("shmbroker").Client(env.b_socket, "mirror-test-events")
    events.subscribe("small")
    time.sleep(0.5)
    cut = time.monotonic()
    env.cluster.link("b", up=False)
    try:
        stale = wait_for(lambda: checker.stale_at(cut), STALE_BOUND + 2, "the stale flag on B")
        assert stale - cut <= STALE_BOUND, f"the stale flag rose {stale - cut:.2f}s after the cut (bound {STALE_BOUND}s)"
        time.sleep(max(0, seconds - (time.monotonic() - cut)))
        before = checker.latest
        assert before > 0, "the last good version stays readable while stale"
    finally:
        env.cluster.link("b", up=True)
    converged(env, publisher, checker, 45, f"after a {seconds}s cut")
    wait_for(lambda: checker.stale_changes and not checker.stale_changes[-1][1], 15, "the stale flag to clear")
    watch.terminate()
    watched = watch.communicate(timeout=10)[0]
    assert '"stale":true' in watched and '"stale":false' in watched, watched[-2000:]
    kinds = set()
    deadline = time.monotonic() + 10
    while not {"stale", "fresh"} <= kinds and time.monotonic() < deadline:
        # The Python client's events: VERSION (A keeps publishing), and STALENESS as "stale" and "fresh".
        event = events.next_event(timeout=0.2)
        if event is not None:
            kinds.add(event.kind)
    events.close()
    assert {"stale", "fresh"} <= kinds, kinds
    c_out = c_lines.communicate(timeout=60)[0].split()
    pairs = list(zip(map(int, c_out[0::2]), map(int, c_out[1::2])))
    assert any(stale for _, stale in pairs), "the C reader saw the stale flag"
    versions = [version for version, _ in pairs]
    assert versions == sorted(versions), "the C reader's versions never went backwards"


def test_killing_the_stream_leader(env, small):
    publisher, checker = small
    converged(env, publisher, checker, 20, "before the kill")
    leader = wait_for(env.cluster.stream_leader, 10, "the stream leader")
    env.cluster.servers[leader].kill()
    try:
        converged(env, publisher, checker, 45, f"after kill -9 of the stream leader on {leader}")
    finally:
        env.cluster.start_server(leader)
        wait_for(lambda: env.cluster.healthy(leader), 30, f"server {leader} back")
    converged(env, publisher, checker, 45, "after the leader came back")


def test_killing_bs_own_server(env, small):
    publisher, checker = small
    converged(env, publisher, checker, 20, "before the kill")
    env.cluster.servers["b"].kill()
    try:
        converged(env, publisher, checker, 45, "after kill -9 of B's server")
    finally:
        env.cluster.start_server("b")
        wait_for(lambda: env.cluster.healthy("b"), 30, "server b back")
    converged(env, publisher, checker, 45, "after B's server came back")


def test_killing_either_mirror(env, small):
    publisher, checker = small
    converged(env, publisher, checker, 20, "before the kills")
    env.mirror_a.kill()
    killed = time.monotonic()
    stale = wait_for(lambda: checker.stale_at(killed), STALE_BOUND + 2, "the stale flag once A's mirror is gone")
    assert stale - killed <= STALE_BOUND
    env.start_mirror_a()
    converged(env, publisher, checker, 30, "after A's mirror restarted")
    env.mirror_b.kill()
    env.start_mirror_b()
    converged(env, publisher, checker, 30, "after B's mirror restarted")
    assert "fenced" not in env.mirror_a.text(), "a restarted exporter must take its own key back"


def test_a_recreated_source_starts_a_new_epoch(env, small):
    publisher, checker = small
    converged(env, publisher, checker, 20, "before the restart")
    reopened = checker.reopened
    env.daemon.kill()
    env.start_daemon()  # no fd store here: the segments are new, their versions start again at 1
    wait_for(lambda: checker.reopened > reopened, 30, "B's segment to be started over (retired, reopened)")
    converged(env, publisher, checker, 30, "in the new epoch")


HOSTILE_WRITER = r"""
import ctypes, sys, time
nats = ctypes.CDLL("libnats.so.3.4")
conn, js, kv = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
assert nats.natsConnection_ConnectTo(ctypes.byref(conn), sys.argv[1].encode()) == 0
assert nats.natsConnection_JetStream(ctypes.byref(js), conn, None) == 0
data = open(sys.argv[3], "rb").read()
revision = ctypes.c_uint64()
deadline = time.monotonic() + 20
while True:  # the bucket may still be electing its leader
    status = nats.js_KeyValue(ctypes.byref(kv), js, b"shmbroker")
    if status == 0:
        status = nats.kvStore_Put(ctypes.byref(revision), kv, sys.argv[2].encode(), data, len(data))
    if status == 0 or time.monotonic() > deadline:
        break
    time.sleep(0.2)
if status != 0:
    nats.natsStatus_GetText.restype = ctypes.c_char_p
    nats.nats_GetLastError.restype = ctypes.c_char_p
    sys.stderr.write("put failed: %s %s\n" % (nats.natsStatus_GetText(status), nats.nats_GetLastError(None)))
sys.exit(status)
"""


def hostile_put(env, key, data):
    path = env.cluster.path("hostile.bin")
    with open(path, "wb") as handle:
        handle.write(data)
    script = env.cluster.path("hostile.py")
    with open(script, "w") as handle:
        handle.write(HOSTILE_WRITER)
    result = sh("ip", "netns", "exec", netns("c"), sys.executable, script, f"nats://{HOSTS['c']}:4222", key, path, check=False)
    assert result.returncode == 0, f"the hostile writer failed ({result.returncode}): {result.stderr}"


def value(kind=1, epoch=7, version=5, crc=None, length=None, body=b"hello", count=0, index=0, magic=b"SHMBMIR1"):
    import struct
    sys.path.insert(0, str(ROOT / "Sources" / "python"))
    from shmbroker import crc64_xz as crc64
    length = len(body) if length is None else length
    crc = crc64(body) if crc is None else crc
    return magic + struct.pack("<IIQQQQQIIQ", 72, kind, epoch, version, crc, length, 0, index, count, 99) + body


def rejected(env):
    text = open(env.cluster.path("mirror-b.prom")).read() if os.path.exists(env.cluster.path("mirror-b.prom")) else ""
    counts = {}
    for line in text.splitlines():
        if line.startswith("shmbroker_mirror_rejected_total{") and 'segment="hostile"' in line:
            reason = line.split('reason="')[1].split('"')[0]
            counts[reason] = int(line.rsplit(" ", 1)[1])
    return counts


def test_hostile_values_are_rejected_counted_and_never_served(env):
    key = "x.seg.hostile"
    good = value(version=5)
    hostile = {
        "bad-magic": value(magic=b"NOTSHMB!"),
        "crc-mismatch": value(version=6, crc=1234),
        "too-large": value(version=7, length=1 << 40, body=b""),
        "truncated": b"SHMBMIR1\x48\x00",
        "length-mismatch": value(version=8, length=99),
        "bad-chunking": value(kind=3, version=9, length=10, body=b"", count=1000),
        "zero-version": value(version=0),
        "unknown-kind": value(kind=9, version=10),
    }
    hostile_put(env, key, good)
    client = __import__("shmbroker").Client(env.b_socket, "hostile-check")
    try:
        segment = client.open("hostile")
        wait_for(lambda: segment.latest_version == 5, 20, "the good value to be served")
        for cause, data in hostile.items():
            hostile_put(env, key, data)
        hostile_put(env, key, value(version=4, body=b"older"))  # a version from the past
        wait_for(lambda: len(rejected(env)) >= len(hostile) + 1, 20, "every cause to be counted")
        counts = rejected(env)
        for cause in list(hostile) + ["version-from-the-past"]:
            assert counts.get(cause, 0) >= 1, (cause, counts)
        snapshot = segment.read()
        assert snapshot.version == 5 and snapshot.data == b"hello", "only the good value is served"
    finally:
        client.close()
    log = env.mirror_b.text()
    assert log.count("reason=bad-magic") == 1, "each cause is logged once"


def test_a_second_exporter_of_the_same_key_is_fenced(env, small):
    publisher, checker = small
    converged(env, publisher, checker, 20, "before the second exporter")
    second = env.cluster.spawn("mirror-a-twin", [str(BIN / "shmbroker-mirror"), "--config", env.mirror_a_config], host="c")
    try:
        wait_for(lambda: "fenced" in second.text() or "fenced" in env.mirror_a.text(), 30, "one of the two exporters to be fenced")
        converged(env, publisher, checker, 30, "with a fenced twin")
    finally:
        second.kill()
    if "fenced" in env.mirror_a.text():
        # The original lost the key to the twin: restart it so later scenarios have an exporter.
        env.mirror_a.kill()
        env.start_mirror_a()
        converged(env, publisher, checker, 30, "after restarting the fenced exporter")


BOOT = """#!/bin/sh
# PID 1 of new PID and mount namespaces: a real systemd (docs/SYSTEMD.md's recipe), with private
# /tmp, /var/tmp and unit directory so that nothing of the host's is touched or started.
set -e
mount -t tmpfs tmpfs /etc/systemd/system
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp
ln -s /dev/null /etc/systemd/system/systemd-tmpfiles-setup.service
ln -s /dev/null /etc/systemd/system/systemd-tmpfiles-clean.timer
cp "$1" /etc/systemd/system/shmbroker-kept.service
exec env container=unshare /lib/systemd/systemd --system --log-target=console
"""


def test_a_daemon_restarted_from_the_fd_store_keeps_its_epoch(env):
    """kill -9 of A's daemon under a real systemd: its segment comes back from the fd store, the
    same memory with the same epoch, so B's segment carries on (no retirement, no version going
    back) and converges."""
    if not os.path.exists("/lib/systemd/systemd") or shutil.which("unshare") is None:
        pytest.skip("needs systemd and unshare to boot a systemd of its own")
    # Outside /tmp: the namespace's /tmp is its own.
    work = f"/var/lib/shmbroker-mirror-test-{os.getpid()}"
    os.makedirs(work, mode=0o755, exist_ok=True)
    socket_path = f"{work}/kept.sock"
    daemon_config = f"{work}/daemon.json"
    with open(daemon_config, "w") as handle:
        json.dump({"socket": {"path": socket_path, "mode": "0666"},
                   "segments": [{"name": "kept", "size": "4KiB", "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}}]}, handle)
    # The binary too: a checkout under /tmp is out of the namespace's sight.
    daemon = f"{work}/shmbrokerd"
    shutil.copy2(BIN / "shmbrokerd", daemon)
    unit = f"{work}/shmbroker-kept.service"
    with open(unit, "w") as handle:
        handle.write(f"""[Service]
Type=notify
NotifyAccess=main
ExecStart={daemon} --config {daemon_config}
Restart=always
RestartSec=200ms
FileDescriptorStoreMax=16
""")
    boot = f"{work}/boot.sh"
    with open(boot, "w") as handle:
        handle.write(BOOT)
    os.chmod(boot, 0o755)
    unshare = subprocess.Popen(["setsid", "unshare", "--fork", "--pid", "--mount", "--mount-proc", "--propagation", "private",
                                boot, unit], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    systemd = None
    mirror = None
    try:
        def booted():
            children = open(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read().split()
            if children and os.path.realpath(f"/proc/{children[0]}/exe").endswith("/systemd"):
                return int(children[0])
            return None
        systemd = wait_for(booted, 30, "systemd to start in its namespace")

        def inside(*argv):
            return subprocess.run(["nsenter", "-t", str(systemd), "-m", "-p", *argv], capture_output=True, text=True, timeout=60)
        wait_for(lambda: inside("systemctl", "is-system-running").stdout.strip() in ("running", "degraded"), 60, "systemd to boot")
        started = inside("systemctl", "start", "shmbroker-kept.service")
        assert started.returncode == 0, started.stderr + inside("journalctl", "-u", "shmbroker-kept", "--no-pager").stdout[-2000:]
        wait_socket(socket_path)
        mirror_config = env.cluster.write_json("mirror-s.json", {
            "host": "s", "nats": {"servers": servers_for("a")}, "heartbeatIntervalSeconds": HEARTBEAT, "staleAfterSeconds": STALE_AFTER,
            "export": {"socket": socket_path, "segments": ["kept"]}})
        mirror = env.cluster.spawn("mirror-s", [str(BIN / "shmbroker-mirror"), "--config", mirror_config], host="a")
        publisher, checker = Publisher(socket_path, "kept", 1024), Checker(env.b_socket, "kept")
        publisher.start()
        checker.start()
        try:
            converged(env, publisher, checker, 30, "before the kill")
            pid = inside("systemctl", "show", "-p", "MainPID", "--value", "shmbroker-kept.service").stdout.strip()
            assert inside("systemctl", "kill", "-s", "KILL", "shmbroker-kept.service").returncode == 0
            wait_for(lambda: inside("systemctl", "show", "-p", "MainPID", "--value", "shmbroker-kept.service").stdout.strip() not in ("", "0", pid),
                     30, "systemd to restart the daemon")
            before = publisher.latest
            wait_for(lambda: publisher.latest > before + 5, 30, "A's publishes to resume on the restarted daemon")
            converged(env, publisher, checker, 30, "after the daemon came back from the fd store")
        finally:
            publisher.stop()
            checker.stop()
        assert not checker.errors, checker.errors[:5]
        assert checker.reopened == 0, "the same epoch: B's segment was not started over"
        versions = [version for _, version, _ in checker.seen]
        assert versions == sorted(versions)
        assert publisher.seq_of_version and max(publisher.seq_of_version) > before, "the restarted daemon went on numbering"
    finally:
        if mirror is not None:
            mirror.kill()
        if systemd is not None:
            subprocess.run(["nsenter", "-t", str(systemd), "-m", "-p", "systemctl", "poweroff", "--no-block"], capture_output=True)
            try:
                unshare.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(systemd, signal.SIGKILL)
        if unshare.poll() is None:
            unshare.kill()
        shutil.rmtree(work, ignore_errors=True)
