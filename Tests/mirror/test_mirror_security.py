"""shmbroker-mirror against a cluster secured as docs/MIRROR.md recommends: TLS with client
certificates, and per-host NATS users (mapped from the certificates) that may write only their
own keys and heartbeats. Needs root and nats-server, like test_mirror_cluster.py."""
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, HOSTS, Checker, Cluster, Publisher, payload, wait_for, wait_socket  # noqa: E402
from test_mirror_cluster import SERVER, pytestmark  # noqa: E402,F401


def tls_servers(host):
    order = [host] + [other for other in HOSTS if other != host]
    return [f"tls://{HOSTS[name]}:4222" for name in order]


def nats_settings(cluster, host, certificate=None):
    certificate = certificate or host
    tls = cluster.certificates
    return {"servers": tls_servers(host), "createBucket": {"replicas": 3},
            "tls": {"caFile": tls.pem("ca"), "certificateFile": tls.pem(f"client-{certificate}"), "keyFile": tls.key(f"client-{certificate}")}}


@pytest.fixture(scope="module")
def secure():
    cluster = Cluster(SERVER, secure=True)
    cluster.up()
    cluster.start_servers()
    a_socket, b_socket = cluster.path("a.sock"), cluster.path("b.sock")
    daemon = cluster.write_json("daemon-a.json", {
        "socket": {"path": a_socket, "mode": "0666"},
        "segments": [{"name": "small", "size": "4KiB", "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}}]})
    mirror_a = cluster.write_json("mirror-a.json", {"host": "a", "nats": nats_settings(cluster, "a"),
                                                    "export": {"socket": a_socket, "segments": ["small"]}})
    mirror_b = cluster.write_json("mirror-b.json", {"host": "b", "nats": nats_settings(cluster, "b"), "import": {
        "socket": {"path": b_socket, "mode": "0666"},
        "segments": [{"from": "a", "segment": "small", "name": "small", "size": "4KiB", "readers": {"users": ["*"]}}]}})
    cluster.spawn("shmbrokerd-a", [str(BIN / "shmbrokerd"), "--config", daemon], host="a")
    wait_socket(a_socket)
    cluster.spawn("mirror-a", [str(BIN / "shmbroker-mirror"), "--config", mirror_a], host="a")
    cluster.spawn("mirror-b", [str(BIN / "shmbroker-mirror"), "--config", mirror_b], host="b")
    wait_socket(b_socket)
    yield cluster, a_socket, b_socket
    cluster.teardown()
    cluster.remove()


def test_segments_flow_over_tls_with_client_certificates(secure):
    cluster, a_socket, b_socket = secure
    publisher, checker = Publisher(a_socket, "small", 4096), Checker(b_socket, "small")
    publisher.start()
    checker.start()
    try:
        wait_for(lambda: publisher.latest > 0, 30, "A's first publish")
        target = publisher.latest
        wait_for(lambda: checker.latest >= target, 30, "B to read A's versions over TLS")
    finally:
        publisher.stop()
        checker.stop()
    assert not checker.errors, checker.errors[:3]


def test_a_host_cannot_write_another_hosts_keys_and_says_why(secure):
    cluster, a_socket, b_socket = secure
    # Host C's certificate, exporting under host A's name: the servers refuse its puts and its
    # heartbeats, and the mirror reports the refusal in NATS's own words.
    rogue = cluster.write_json("mirror-rogue.json", {"host": "a", "nats": nats_settings(cluster, "c", certificate="c"),
                                                     "export": {"socket": a_socket, "segments": ["small"]}})
    before = Checker(b_socket, "small")
    before.start()
    process = cluster.spawn("mirror-rogue", [str(BIN / "shmbroker-mirror"), "--config", rogue], host="c")
    client = __import__("shmbroker").Client(a_socket, "rogue-test")
    try:
        for seq in range(20):
            client.publish("small", payload(seq, 4096))  # something for the rogue to try to export
            time.sleep(0.1)
        wait_for(lambda: "Permissions Violation" in process.text(), 30, "the permission refusal in the rogue's log")
    finally:
        client.close()
        process.kill()
        before.stop()
    text = process.text()
    assert '"$KV.shmbroker.a.seg.small"' in text or "$KV.shmbroker.a.seg.small" in text, text[-2000:]
    # What B served meanwhile came from A's own mirror, every byte checked, and A's mirror kept
    # its key: the rogue's puts never landed.
    assert not before.errors, before.errors[:3]
    assert before.seen, "B kept receiving A's versions"
    mirror_a = next(p for p in cluster.processes if p.name == "mirror-a")
    assert "fenced" not in mirror_a.text()


def test_a_plain_connection_to_a_tls_server_fails_clearly(secure):
    cluster, a_socket, _ = secure
    plain = cluster.write_json("mirror-plain.json", {"host": "c", "nats": {"servers": [f"nats://{HOSTS['c']}:4222"],
                                                                            "requestTimeoutSeconds": 1},
                                                     "export": {"socket": a_socket, "segments": ["small"]}})
    process = cluster.spawn("mirror-plain", [str(BIN / "shmbroker-mirror"), "--config", plain], host="c")
    try:
        try:
            wait_for(lambda: "cannot connect to NATS yet" in process.text() and "SSL" in process.text(), 30, "the mirror to say it cannot use the servers")
        except AssertionError:
            print(process.text())
            raise
    finally:
        process.kill()


def test_a_key_file_others_can_read_is_refused(secure):
    cluster, a_socket, _ = secure
    exposed = cluster.path("exposed.key")
    with open(cluster.certificates.key("client-c"), "rb") as source, open(exposed, "wb") as target:
        target.write(source.read())
    os.chmod(exposed, 0o644)
    settings = nats_settings(cluster, "c")
    settings["tls"]["keyFile"] = exposed
    config = cluster.write_json("mirror-exposed.json", {"host": "c", "nats": settings, "export": {"socket": a_socket, "segments": ["small"]}})
    result = subprocess.run([str(BIN / "shmbroker-mirror"), "--config", config, "--check-config"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "$.nats.tls.keyFile" in result.stderr and "accessible by other users" in result.stderr, result.stderr
