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
import threading
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

    def mirror_run(self, name, size, count, spacing):
        """Publishes `count` stamped versions on A (`spacing` s apart, 0: back to back) and
        records when each version B sees arrived. Returns (latencies_ns, arrivals, bytes)."""
        segment = self.reader.open(name)
        start = segment.latest_version
        latencies, arrivals = [], []
        done = threading.Event()

        def read():
            last = start
            while not done.is_set():
                latest = segment.wait(last, timeout=0.2)
                if latest <= last:
                    continue
                at = time.monotonic_ns()
                last = latest
                if size <= 4096:  # latency runs: the stamp says when A published it
                    snapshot = segment.read()
                    latencies.append(at - int.from_bytes(snapshot.data[:8], "little"))
                arrivals.append(at)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        payload = bytearray(size)
        for seq in range(count):
            payload[0:8] = time.monotonic_ns().to_bytes(8, "little")
            payload[8:16] = seq.to_bytes(8, "little")
            self.publisher.publish(name, bytes(payload))
            if spacing:
                time.sleep(spacing)
        time.sleep(3 if size < (16 << 20) else 8)  # the last versions in flight
        done.set()
        thread.join()
        segment.close()
        return latencies, arrivals, len(arrivals) * size

    # Raw libnats

    def raw_run(self, kind, key, size, count, spacing):
        watch_mode, put_mode = ("kv-watch", "kv-put") if kind == "kv" else ("sub", "pub")
        watcher = subprocess.Popen(["ip", "netns", "exec", netns("b"), self.raw, watch_mode, f"nats://{HOSTS['b']}:4222", key,
                                    str(count), "120"], stdout=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", netns("a"), self.raw, put_mode, f"nats://{HOSTS['a']}:4222", key, str(size), str(count),
                        str(int(spacing * 1e6))], check=True, timeout=600)
        time.sleep(2)
        watcher.terminate()
        out = watcher.communicate(timeout=30)[0].splitlines()
        latencies = [int(line.split()[0]) for line in out if line and line[0].isdigit()]
        done = [line for line in out if line.startswith("done")]
        if done:
            _, values, total, first, last = done[0].split()
            return latencies, int(total), int(first), int(last)
        return latencies, 0, 0, 0


def rate(total_bytes, first, last):
    return total_bytes / ((last - first) / 1e9) / 1e6 if last > first else float("nan")


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
                rows["mirror"].append(bench.mirror_run(name, size, count, 0.02)[0])
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
        report.append(f"\n## Throughput, host A -> host B (MB/s delivered to B; one put in flight; median of {trials} interleaved trials)")
        report.append(f"{'size':>9} {'mirror':>9} {'raw KV':>9} {'ratio':>7}")
        for name, size, values in (("tp64k", 64 << 10, 200), ("tp1m", 1 << 20, 60), ("tp16m", 16 << 20, 8)):
            if arguments.quick:
                values = max(4, values // 4)
            mirror_rates, raw_rates = [], []
            for _ in range(trials):
                _, arrivals, total = bench.mirror_run(name, size, values, 0)
                mirror_rates.append(rate(total - size, arrivals[0], arrivals[-1]) if len(arrivals) > 1 else float("nan"))
                _, raw_total, first, last = bench.raw_run("kv", f"bench.{name}", size, values, 0)
                raw_rates.append(rate(raw_total - size, first, last))
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
