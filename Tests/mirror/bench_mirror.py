"""The mirror benchmark: host A to host B through a JetStream cluster of three (network
namespaces, as in the cluster tests), the mirror and raw libnats on the same cluster in the same
run, interleaved: latency p50/p99 at 64 B and 4 KiB (the mirror against KV put -> watch and core
publish -> subscribe), throughput at 64 KiB, 1 MiB and 16 MiB (against KV put -> watch, one put
in flight, large values as chunks plus a commit as the mirror sends them). Needs root.

    sudo python3 Tests/mirror/bench_mirror.py [--quick] [--output DIR] [--server PATH]

The mirror's path includes the local hop on each side: a producer publishing through shmbrokerd
on A, and a reader on B woken by the futex of the mirror's segment. The raw baselines are C
(Tests/mirror/raw_nats.c). Goals: mirror latency <= 1.2x raw KV put -> watch; throughput >= 0.8x
raw KV at each size."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, HOSTS, ROOT, Cluster, netns, shmbroker, wait_for, wait_socket  # noqa: E402

SIZES = {"lat64": 64, "lat4k": 4096, "tp64k": 64 << 10, "tp1m": 1 << 20, "tp16m": 16 << 20}


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else float("nan")


class Bench:
    def __init__(self, server, quick):
        self.quick = quick
        self.cluster = Cluster(server)
        c = self.cluster
        c.up()
        c.start_servers()
        self.raw = c.path("raw_nats")
        subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Werror", "-o", self.raw, str(ROOT / "Tests" / "mirror" / "raw_nats.c"), "-lnats"],
                       check=True)
        library = c.path("lib")
        subprocess.run(["make", "-s", "-C", str(ROOT / "Sources" / "libshmbroker"), f"BUILD={library}"], check=True)
        self.shm = c.path("shm_latency")
        subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "Sources" / "libshmbroker" / "include"), "-o", self.shm,
                        str(ROOT / "Tests" / "mirror" / "shm_latency.c"), f"-L{library}", "-lshmbroker", f"-Wl,-rpath,{library}"], check=True)
        self.a_socket, self.b_socket = c.path("a.sock"), c.path("b.sock")
        segments = [{"name": name, "size": max(size, 4096), "readers": {"users": ["*"]}, "publishers": {"users": ["*"]}}
                    for name, size in SIZES.items()]
        daemon = c.write_json("daemon.json", {"socket": {"path": self.a_socket, "mode": "0666"}, "segments": segments})
        servers_a = [f"nats://{HOSTS[h]}:4222" for h in ("a", "b", "c")]
        servers_b = [f"nats://{HOSTS[h]}:4222" for h in ("b", "a", "c")]
        mirror_a = c.write_json("mirror-a.json", {"host": "a", "nats": {"servers": servers_a, "createBucket": {"replicas": 3}},
                                                  "export": {"socket": self.a_socket, "segments": list(SIZES)}})
        mirror_b = c.write_json("mirror-b.json", {"host": "b", "nats": {"servers": servers_b}, "import": {
            "socket": {"path": self.b_socket, "mode": "0666"},
            "segments": [{"from": "a", "name": name, "size": max(size, 4096), "readers": {"users": ["*"]}} for name, size in SIZES.items()]}})
        c.spawn("shmbrokerd", [str(BIN / "shmbrokerd"), "--config", daemon, "--log-level", "warning"], host="a")
        wait_socket(self.a_socket)
        c.spawn("mirror-a", [str(BIN / "shmbroker-mirror"), "--config", mirror_a, "--log-level", "warning"], host="a")
        c.spawn("mirror-b", [str(BIN / "shmbroker-mirror"), "--config", mirror_b, "--log-level", "warning"], host="b")
        wait_socket(self.b_socket)
        self.publisher = shmbroker.Client(self.a_socket, "bench-publisher")
        self.reader = shmbroker.Client(self.b_socket, "bench-reader")
        # Warm the bucket and the mirrors up.
        for name in SIZES:
            self.publisher.publish(name, b"\0" * 16)
        segment = self.reader.open("lat64")
        wait_for(lambda: segment.latest_version > 0, 60, "the mirrors to carry a first version")

    def close(self):
        self.publisher.close()
        self.reader.close()
        self.cluster.teardown()
        self.cluster.remove()

    # The mirror

    def mirror_latency(self, name, size, count, spacing):
        """The mirror's latency, measured by C programs as the raw baselines are: a publisher
        through shmbrokerd on A, a futex-waiting reader of the mirror's segment on B."""
        reader = subprocess.Popen(["ip", "netns", "exec", netns("b"), self.shm, "read", self.b_socket, name, str(count), "120"],
                                  stdout=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", netns("a"), self.shm, "publish", self.a_socket, name, str(size), str(count),
                        str(int(spacing * 1e6))], check=True, timeout=600)
        time.sleep(2)
        reader.terminate()
        out = reader.communicate(timeout=30)[0].splitlines()
        return [int(line.split()[0]) for line in out if line and line[0].isdigit() and len(line.split()) == 2]

    def mirror_arrivals(self, name, size, seconds, spacing):
        """The mirror's throughput run: a C producer publishes through shmbrokerd on A every
        `spacing` s for `seconds`; a C program on B records when each new version arrived."""
        watcher = subprocess.Popen(["ip", "netns", "exec", netns("b"), self.shm, "arrivals", self.b_socket, name, str(1 << 30),
                                    str(int(seconds + 30))], stdout=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", netns("a"), self.shm, "publish", self.a_socket, name, str(size), str(-int(seconds)),
                        str(int(spacing * 1e6))], check=True, timeout=600)
        time.sleep(0.5)
        watcher.terminate()
        out = watcher.communicate(timeout=30)[0].splitlines()
        return [int(line.split()[0]) for line in out if line and line[0].isdigit() and len(line.split()) == 2]

    # Raw libnats

    def raw_run(self, kind, key, size, count, spacing, seconds=None):
        """The raw baseline; returns (latencies_ns, arrivals_ns)."""
        watch_mode, put_mode = ("kv-watch", "kv-put") if kind == "kv" else ("sub", "pub")
        watcher = subprocess.Popen(["ip", "netns", "exec", netns("b"), self.raw, watch_mode, f"nats://{HOSTS['b']}:4222", key,
                                    str(count if not seconds else 1 << 30), str(int(seconds + 30) if seconds else 120)],
                                   stdout=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", netns("a"), self.raw, put_mode, f"nats://{HOSTS['a']}:4222", key, str(size),
                        str(-int(seconds) if seconds else count), str(int(spacing * 1e6))], check=True, timeout=600)
        time.sleep(0.5 if seconds else 2)
        watcher.terminate()
        out = watcher.communicate(timeout=30)[0].splitlines()
        rows = [row for row in (line.split() for line in out if line and line[0].isdigit()) if len(row) == 3]
        return [int(row[0]) for row in rows], [int(row[2]) for row in rows]


def steady_rate(arrivals, size, skip=1.0):
    """MB/s delivered at B in the steady state: versions that arrived after the first `skip`
    seconds of arrivals, over the time from then to the last arrival."""
    if len(arrivals) < 2:
        return float("nan")
    start = arrivals[0] + int(skip * 1e9)
    counted = [at for at in arrivals if at > start]
    if len(counted) < 2:
        counted = arrivals
        start = arrivals[0]
    return (len(counted) * size) / ((counted[-1] - start) / 1e9) / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=tempfile.mkdtemp(prefix="shmbroker-mirror-bench-"))
    parser.add_argument("--server", default="/usr/sbin/nats-server")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the mirror benchmark needs root (network namespaces)")
    server_version = subprocess.run([arguments.server, "--version"], capture_output=True, text=True).stdout.strip()
    report = [f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {server_version}; three hosts as network namespaces, "
              "all on this machine's CPUs (read latencies as software cost, not a LAN's)"]
    results = {"machine": cpu_model(), "server": server_version, "latency": {}, "throughput": {}, "goals": []}
    bench = Bench(arguments.server, arguments.quick)
    trials = 1 if arguments.quick else 3
    try:
        count = 60 if arguments.quick else 300
        report.append(f"\n## Latency, host A publish -> host B holds it (µs; {count} values 20 ms apart; median of {trials} interleaved trials)")
        report.append(f"{'size':>6} {'path':<28} {'p50':>9} {'p99':>9}")
        for name, size in (("lat64", 64), ("lat4k", 4096)):
            rows = {"mirror": [], "raw KV put -> watch": [], "raw core pub -> sub": []}
            for _ in range(trials):
                rows["mirror"].append(bench.mirror_latency(name, size, count, 0.02))
                rows["raw KV put -> watch"].append(bench.raw_run("kv", f"bench.{name}", size, count, 0.02)[0])
                rows["raw core pub -> sub"].append(bench.raw_run("core", f"bench.core.{name}", size, count, 0.02)[0])
            summary = {}
            for path, runs in rows.items():
                p50 = statistics.median(percentile(run, 50) for run in runs) / 1000
                p99 = statistics.median(percentile(run, 99) for run in runs) / 1000
                summary[path] = {"p50_us": p50, "p99_us": p99}
                report.append(f"{size:>6} {path:<28} {p50:>9.0f} {p99:>9.0f}")
            ratio = summary["mirror"]["p50_us"] / summary["raw KV put -> watch"]["p50_us"]
            report.append(f"   mirror / raw KV p50: {ratio:.2f}x (goal <= 1.2x): {'met' if ratio <= 1.2 else 'NOT met'}")
            results["latency"][str(size)] = summary
            results["goals"].append({"goal": f"mirror latency p50 <= 1.2x raw KV put -> watch ({size} B)", "value": ratio, "met": ratio <= 1.2})
        seconds = 4 if arguments.quick else 8
        report.append(f"\n## Throughput, host A -> host B (MB/s delivered to B in the steady state of {seconds} s of back-to-back "
                      f"publishing; one put in flight; median of {trials} interleaved trials)")
        report.append(f"{'size':>9} {'mirror':>9} {'raw KV':>9} {'ratio':>7}")
        for name, size in (("tp64k", 64 << 10), ("tp1m", 1 << 20), ("tp16m", 16 << 20)):
            mirror_rates, raw_rates = [], []
            for _ in range(trials):
                # Raw libnats: back-to-back puts (one in flight) for `seconds`. Then A publishes
                # new versions at 1.5 times the rate raw puts reached, so that a new version is
                # always waiting when the mirror's put returns (the mirror sends the newest), without
                # the producer itself taking the machine's two CPUs. B counts what it receives.
                raw = steady_rate(bench.raw_run("kv", f"bench.{name}", size, 0, 0, seconds=seconds)[1], size)
                raw_rates.append(raw)
                spacing = size / (1.5 * raw * 1e6) if raw == raw and raw > 0 else 0.001
                mirror_rates.append(steady_rate(bench.mirror_arrivals(name, size, seconds, spacing), size))
            mirror_rate, raw_rate = statistics.median(mirror_rates), statistics.median(raw_rates)
            ratio = mirror_rate / raw_rate
            label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
            report.append(f"{label:>9} {mirror_rate:>9.1f} {raw_rate:>9.1f} {ratio:>6.2f}x   (mirror trials: "
                          + ", ".join(f"{r:.1f}" for r in mirror_rates) + "; raw: " + ", ".join(f"{r:.1f}" for r in raw_rates) + ")")
            results["throughput"][label] = {"mirror_MBps": mirror_rate, "raw_kv_MBps": raw_rate, "ratio": ratio}
            results["goals"].append({"goal": f"mirror throughput >= 0.8x raw KV ({label})", "value": ratio, "met": ratio >= 0.8})
    finally:
        bench.close()
    report.append("\ngoals: " + "; ".join(f"{g['goal']}: {g['value']:.2f} {'met' if g['met'] else 'NOT met'}" for g in results["goals"]))
    text = "\n".join(report)
    print(text)
    os.makedirs(arguments.output, exist_ok=True)
    with open(os.path.join(arguments.output, "mirror.txt"), "w") as handle:
        handle.write(text + "\n")
    with open(os.path.join(arguments.output, "mirror.json"), "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
