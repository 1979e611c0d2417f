"""Three "hosts" as network namespaces on one machine, a nats-server per host in a JetStream
cluster of three, and the shmbroker processes around them: the pieces of the mirror's cluster
tests (test_mirror_cluster.py). Needs root (ip netns); traffic stays inside the namespaces.

Topology: namespaces shmbt-a, shmbt-b, shmbt-c (the hosts) and shmbt-br (a bridge), a veth pair
from each host into the bridge, addresses 10.231.7.1-3/24. A host's link is cut by setting its
bridge-side veth down."""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Sources" / "python"))
import shmbroker  # noqa: E402

BIN = pathlib.Path(os.environ.get("SHMBROKER_BIN", ROOT / ".build" / "debug"))
HOSTS = {"a": "10.231.7.1", "b": "10.231.7.2", "c": "10.231.7.3"}
PREFIX = "shmbt"


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def netns(host):
    return f"{PREFIX}-{host}"


def payload(seq, length):
    """The bytes of the publisher's `seq`-th version: an 16-byte header (seq, length) and a body
    derived from seq, so any reader can tell torn or wrong bytes from right ones."""
    body_length = max(0, length - 16)
    digest = hashlib.sha256(seq.to_bytes(8, "little")).digest()
    body = (digest * (body_length // 32 + 1))[:body_length]
    return struct.pack("<QQ", seq, length) + body


def check_payload(data):
    """The seq a payload claims, after checking every byte of it; raises if it is wrong."""
    if len(data) < 16:
        raise AssertionError(f"a version of {len(data)} bytes is shorter than the test's header")
    seq, length = struct.unpack_from("<QQ", data)
    if length != len(data) or payload(seq, length) != bytes(data):
        raise AssertionError(f"torn or wrong bytes served: claims seq {seq}, length {length}, has {len(data)} bytes")
    return seq


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Process:
    """A child process in a namespace, its output in a file."""

    def __init__(self, name, argv, directory, host=None, env=None):
        self.name = name
        self.log = pathlib.Path(directory) / f"{name}.log"
        prefix = ["ip", "netns", "exec", netns(host)] if host else []
        self.handle = open(self.log, "ab")
        self.process = subprocess.Popen(prefix + argv, stdout=self.handle, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def kill(self, sig=signal.SIGKILL):
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def stop(self):
        self.kill(signal.SIGTERM)

    def text(self):
        return self.log.read_text(errors="replace")


class Certificates:
    """A CA, a server certificate per host (for its address) and a client certificate per NATS
    user (CN=<host>), made with openssl."""

    def __init__(self, directory, clients):
        self.directory = pathlib.Path(directory) / "tls"
        self.directory.mkdir()
        self.ca = self._make("ca", "/CN=shmbroker test CA", ca=True)
        for host, address in HOSTS.items():
            self._make(f"server-{host}", f"/CN=nats-{host}", san=f"IP:{address}")
        for client in clients:
            self._make(f"client-{client}", f"/CN={client}")

    def _run(self, *args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    def _make(self, name, subject, ca=False, san=None):
        key, cert = self.directory / f"{name}.key", self.directory / f"{name}.pem"
        if ca:
            self._run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                      "-subj", subject)
        else:
            request = self.directory / f"{name}.csr"
            self._run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request), "-subj", subject)
            extensions = self.directory / f"{name}.ext"
            extensions.write_text(f"subjectAltName={san}\n" if san else "extendedKeyUsage=clientAuth\n")
            self._run("x509", "-req", "-in", str(request), "-CA", str(self.directory / "ca.pem"), "-CAkey", str(self.directory / "ca.key"),
                      "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions))
        os.chmod(key, 0o600)
        return cert

    def pem(self, name):
        return str(self.directory / f"{name}.pem")

    def key(self, name):
        return str(self.directory / f"{name}.key")


class Cluster:
    def __init__(self, server="/usr/sbin/nats-server", secure=False):
        self.server = server
        self.secure = secure
        self.directory = tempfile.mkdtemp(prefix="shmbroker-mirror-cluster-", dir="/tmp")
        os.chmod(self.directory, 0o755)
        self.servers = {}
        self.processes = []
        # With `secure`: TLS with client certificates, and per-host users mapped from them.
        self.certificates = Certificates(self.directory, list(HOSTS)) if secure else None

    # Network

    def up(self):
        self.down_network()
        sh("ip", "netns", "add", netns("br"))
        sh("ip", "netns", "exec", netns("br"), "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", "br0", "up")
        for host, address in HOSTS.items():
            sh("ip", "netns", "add", netns(host))
            sh("ip", "link", "add", f"{PREFIX}{host}0", "type", "veth", "peer", "name", f"{PREFIX}{host}1")
            sh("ip", "link", "set", f"{PREFIX}{host}0", "netns", netns(host))
            sh("ip", "link", "set", f"{PREFIX}{host}1", "netns", netns("br"))
            sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", f"{PREFIX}{host}1", "master", "br0")
            sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", f"{PREFIX}{host}1", "up")
            sh("ip", "netns", "exec", netns(host), "ip", "addr", "add", f"{address}/24", "dev", f"{PREFIX}{host}0")
            sh("ip", "netns", "exec", netns(host), "ip", "link", "set", f"{PREFIX}{host}0", "up")
            sh("ip", "netns", "exec", netns(host), "ip", "link", "set", "lo", "up")

    def down_network(self):
        for name in list(HOSTS) + ["br"]:
            sh("ip", "netns", "del", netns(name), check=False)

    def link(self, host, up):
        """Cuts a host off the others (or heals it)."""
        sh("ip", "netns", "exec", netns("br"), "ip", "link", "set", f"{PREFIX}{host}1", "up" if up else "down")

    # NATS servers

    def server_config(self, host):
        routes = ",".join(f'"nats-route://{address}:6222"' for other, address in HOSTS.items() if other != host)
        store = pathlib.Path(self.directory) / f"js-{host}"
        store.mkdir(exist_ok=True)
        text = f"""
server_name: {host}
listen: {HOSTS[host]}:4222
http: 127.0.0.1:8222
jetstream {{ store_dir: "{store}" }}
cluster {{ name: shmbt, listen: {HOSTS[host]}:6222, routes: [{routes}] }}
"""
        path = pathlib.Path(self.directory) / f"nats-{host}.conf"
        path.write_text(text)
        return path

    def start_server(self, host):
        if self.certificates:
            # The secured cluster runs docs/examples/nats-server.conf as it is, filled in from the
            # environment as that file says.
            tls = self.certificates
            store = pathlib.Path(self.directory) / f"js-{host}"
            store.mkdir(exist_ok=True)
            others = [HOSTS[other] for other in HOSTS if other != host]
            env = dict(os.environ, NATS_NAME=host, NATS_LISTEN=f"{HOSTS[host]}:4222", NATS_ROUTE=f"{HOSTS[host]}:6222",
                       NATS_ROUTE_1=f"nats-route://{others[0]}:6222", NATS_ROUTE_2=f"nats-route://{others[1]}:6222",
                       NATS_STORE=str(store), NATS_CA=tls.pem("ca"), NATS_CERT=tls.pem(f"server-{host}"), NATS_KEY=tls.key(f"server-{host}"))
            argv = [self.server, "-c", str(ROOT / "docs" / "examples" / "nats-server.conf")]
            self.servers[host] = Process(f"nats-{host}", argv, self.directory, host=host, env=env)
            return
        config = self.server_config(host)
        self.servers[host] = Process(f"nats-{host}", [self.server, "-c", str(config)], self.directory, host=host)

    def monitor(self, host, path):
        """GET on a server's monitor port, from inside its namespace."""
        code = f"import urllib.request,sys;sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8222{path}',timeout=2).read().decode())"
        result = sh("ip", "netns", "exec", netns(host), sys.executable, "-c", code, check=False)
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    def healthy(self, host):
        answer = self.monitor(host, "/healthz")
        return answer is not None and answer.get("status") == "ok"

    def start_servers(self):
        for host in HOSTS:
            self.start_server(host)
        wait_for(lambda: all(self.healthy(host) for host in HOSTS), 60, "a healthy three-server cluster")

    def stream_leader(self, stream="KV_shmbroker"):
        for host in HOSTS:
            if host not in self.servers or self.servers[host].process.poll() is not None:
                continue
            answer = self.monitor(host, "/jsz?streams=true")
            for account in (answer or {}).get("account_details", []):
                for detail in account.get("stream_detail", []):
                    if detail.get("name") == stream:
                        leader = detail.get("cluster", {}).get("leader")
                        if leader:
                            return leader
        return None

    # shmbroker processes

    def spawn(self, name, argv, host=None):
        process = Process(name, argv, self.directory, host=host)
        self.processes.append(process)
        return process

    def path(self, name):
        return str(pathlib.Path(self.directory) / name)

    def write_json(self, name, value):
        path = self.path(name)
        with open(path, "w") as handle:
            json.dump(value, handle)
        return path

    def teardown(self):
        for process in self.processes + list(self.servers.values()):
            process.kill()
        self.down_network()

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_socket(path, timeout=30):
    def connects():
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            probe.connect(path)
            probe.close()
            return True
        except OSError:
            return False
    wait_for(connects, timeout, f"a control socket at {path}")


class Publisher(threading.Thread):
    """Publishes stamped versions to a segment of the owner on host A, every `interval`,
    recording which seq each version number carried."""

    def __init__(self, socket_path, segment, length, interval=0.03):
        super().__init__(daemon=True)
        self.socket_path, self.segment, self.length, self.interval = socket_path, segment, length, interval
        self.seq_of_version = {}
        self.latest = 0
        self.running = True
        self.failures = 0
        self.lock = threading.Lock()

    def run(self):
        client = None
        seq = int(time.time() * 1000) << 16
        while self.running:
            try:
                if client is None:
                    client = shmbroker.Client(self.socket_path, "mirror-test-publisher")
                seq += 1
                receipt = client.publish(self.segment, payload(seq, self.length))
                with self.lock:
                    self.seq_of_version[(receipt.version)] = seq
                    self.latest = receipt.version
            except (OSError, shmbroker.ShmBrokerError):
                self.failures += 1
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
                client = None
                time.sleep(0.1)
            time.sleep(self.interval)
        if client is not None:
            client.close()

    def stop(self):
        self.running = False
        self.join(timeout=10)


class Checker(threading.Thread):
    """A reader on host B through the mirror's socket: reads every version it can, checks every
    byte, that versions never go backwards within an epoch of the local segment, and records
    when it saw the stale flag."""

    def __init__(self, socket_path, segment):
        super().__init__(daemon=True)
        self.socket_path, self.segment = socket_path, segment
        self.running = True
        self.errors = []
        self.seen = []  # (monotonic time, version, seq)
        self.stale_changes = []  # (monotonic time, stale)
        self.latest = 0
        self.reopened = 0

    def run(self):
        client = segment = None
        last = 0
        stale = False
        alive_checked = time.monotonic()
        while self.running:
            try:
                if segment is None:
                    client = shmbroker.Client(self.socket_path, "mirror-test-checker")
                    segment = client.open(self.segment)
                    alive_checked = time.monotonic()
                if time.monotonic() - alive_checked > 1:
                    # The mirror's owner may have died with its segments (kill -9): a request on
                    # the connection tells; then the segment is opened again from the new one.
                    alive_checked = time.monotonic()
                    client.status()
                if segment.retired:
                    # The mirror started the segment over (a new source epoch): versions may start lower.
                    segment.close()
                    client.close()
                    segment = client = None
                    last = 0
                    self.reopened += 1
                    continue
                now_stale = segment.stale
                if now_stale != stale:
                    stale = now_stale
                    self.stale_changes.append((time.monotonic(), stale))
                snapshot = segment.read()
                if snapshot is not None and snapshot.version != last:
                    seq = check_payload(snapshot.data)
                    if snapshot.version < last:
                        self.errors.append(f"version went backwards: {last} then {snapshot.version}")
                    last = snapshot.version
                    self.latest = last
                    self.seen.append((time.monotonic(), snapshot.version, seq))
                segment.wait(last, timeout=0.05)
            except AssertionError as error:
                self.errors.append(str(error))
                time.sleep(0.05)
            except (OSError, shmbroker.ShmBrokerError):
                segment = client = None
                time.sleep(0.1)
        if client is not None:
            client.close()

    def stale_at(self, after):
        """When the stale flag first rose after `after` (monotonic), or None."""
        for moment, stale in self.stale_changes:
            if stale and moment >= after:
                return moment
        return None

    def stop(self):
        self.running = False
        self.join(timeout=10)
