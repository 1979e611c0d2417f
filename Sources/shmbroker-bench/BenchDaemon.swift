import Foundation
import Glibc
import Logging
import ShmBroker
import ShmBrokerClient
import ShmBrokerPlatform

/// A real `shmbrokerd` (built beside this executable) on a private socket, timed to READY=1.
final class BenchDaemon {
    let directory: String
    let socketPath: String
    let process = Process()
    let readyMilliseconds: Double

    /// The daemon for the transport benchmarks, with one segment per benchmark.
    convenience init(quick: Bool) throws {
        var segments: [[String: Any]] = [
            ["name": "lat64", "size": 64], ["name": "lat4k", "size": 4096], ["name": "rate", "size": 64],
            ["name": "fan1", "size": 64], ["name": "fan8", "size": 64], ["name": "fan64", "size": 64],
        ]
        for size in [4 << 10, 64 << 10, 1 << 20, 16 << 20] {
            segments.append(["name": "tp-\(sizeName(size))", "size": size, "slots": 3])
        }
        try self.init(segments: segments)
    }

    /// A daemon with `segmentCount` 4 KiB segments, for start-up and memory measurements.
    convenience init(segmentCount: Int) throws {
        try self.init(segments: (0..<segmentCount).map { ["name": "s\($0)", "size": 4096] })
    }

    /// - Parameters:
    ///   - segments: the config's segments (readable by everyone).
    ///   - publishRingSpinMicroseconds: the config's `publishRings.spinMicroseconds` (0: the
    ///     daemon sleeps between ring entries).
    init(segments: [[String: Any]], publishRingSpinMicroseconds: Int = 0) throws {
        directory = NSTemporaryDirectory() + "shmbroker-bench-\(getpid())-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socketPath = directory + "/control.sock"
        let config: [String: Any] = [
            "socket": ["path": socketPath, "mode": "0600"],
            "limits": ["maxClients": 4096, "subscriberStallTimeoutSeconds": 30],
            "segments": segments.map { $0.merging(["readers": ["users": ["*"]]]) { a, _ in a } },
            "publishRings": ["spinMicroseconds": publishRingSpinMicroseconds],
        ]
        let configPath = directory + "/config.json"
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: configPath))
        let ready = try ReadyListener(path: directory + "/notify.sock")
        let binary = URL(fileURLWithPath: CommandLine.executablePath).deletingLastPathComponent().appendingPathComponent("shmbrokerd")
        process.executableURL = binary
        process.arguments = ["--config", configPath, "--log-level", "warning"]
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = ready.path
        process.environment = environment
        let started = Clock.monotonicNanoseconds()
        try process.run()
        guard ready.waitForReady(timeout: 120) else { throw BenchError("the daemon never sent READY=1") }
        readyMilliseconds = Double(Clock.monotonicNanoseconds() - started) / 1e6
    }

    var pid: Int32 { process.processIdentifier }

    func connect() async throws -> ShmBrokerClient {
        try await ShmBrokerClient.connect(socketPath: socketPath, clientName: "bench")
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Draws latency percentiles and throughput against their baselines (matplotlib).
let plotScript = #"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

r = json.load(open(sys.argv[1]))
if not all(k in r for k in ("latency", "throughput", "fanOut")):
    sys.exit("the plot needs the latency, throughput and fanout results (run without --only)")
one_pass = r.get("onePass")
fig, axes = plt.subplots(1, 4 if one_pass else 3, figsize=(21 if one_pass else 16, 5))

ax = axes[0]
labels = []
series = {"owner, spinning reader": [], "owner, futex reader": [], "daemon, publish ring": [],
          "daemon, ring, daemon spinning": [], "daemon, PUBLISH request": [], "raw Unix socket, one way": []}
keys = {"owner, spinning reader": "owner-spin", "owner, futex reader": "owner-futex",
        "daemon, publish ring": "ring", "daemon, ring, daemon spinning": "ring-spin", "daemon, PUBLISH request": "requests"}
series = {name: values for name, values in series.items() if name.startswith("raw") or keys[name] in r["latency"]["64B"]}
for size in ("64B", "4KiB"):
    for p in ("p50_us", "p99_us", "p999_us"):
        labels.append(f"{size}\n{p[:-3]}")
        for name, values in series.items():
            row = r["latency"][size]["socket"] if name.startswith("raw") else r["latency"][size][keys[name]]["shm"]
            values.append(row[p])
x = range(len(labels))
w = 0.8 / len(series)
for k, (name, values) in enumerate(series.items()):
    ax.bar([i + (k - (len(series) - 1) / 2) * w for i in x], values, w, label=name)
ax.set_xticks(list(x)); ax.set_xticklabels(labels); ax.set_yscale("log")
ax.set_ylabel("latency (µs)"); ax.set_title("End-to-end latency: publish -> verified read"); ax.legend(fontsize=8)

ax = axes[1]
order = ["4KiBx1", "64KiBx1", "1MiBx1", "16MiBx1", "64KiBx8", "1MiBx8"]
cases = [c for c in order if c in r["throughput"]]
x = range(len(cases))
w = 0.16
columns = [("owner_zero_copy_MBps", "owner, zero-copy reader"), ("shm_zero_copy_MBps", "ring, zero-copy reader"),
           ("shm_MBps", "ring, copying reader"), ("shm_requests_zero_copy_MBps", "requests, zero-copy reader"),
           ("socket_MBps", "raw Unix socket")]
for k, (key, name) in enumerate(columns):
    ax.bar([i + (k - 2) * w for i in x], [r["throughput"][c].get(key) or 0 for c in cases], w, label=name)
ax.set_xticks(list(x)); ax.set_xticklabels([c.replace("x", "\nx") + " readers" for c in cases], fontsize=8)
ax.set_ylabel("MB/s delivered"); ax.set_title("Producer -> reader throughput"); ax.legend(fontsize=7)

ax = axes[2]
readers = sorted(r["fanOut"].keys(), key=int)
ax.plot([int(n) for n in readers], [r["fanOut"][n]["owner"]["p50_us"] for n in readers], "^-", label="owner (futex wake-all)")
ax.plot([int(n) for n in readers], [r["fanOut"][n]["shm"]["p50_us"] for n in readers], "o-", label="daemon, ring producer")
ax.plot([int(n) for n in readers], [r["fanOut"][n]["socket"]["p50_us"] for n in readers], "s-", label="one socket message per reader")
if all("futex_floor" in r["fanOut"][n] for n in readers):
    ax.plot([int(n) for n in readers], [r["fanOut"][n]["futex_floor"]["p50_us"] for n in readers], "k:", label="floor: bare futex wake-all")
ax.set_xscale("log", base=2); ax.set_yscale("log")
ax.set_xlabel("readers"); ax.set_ylabel("p50 until the last reader has it (µs)"); ax.set_title("Fan-out"); ax.legend(fontsize=8)

if one_pass:
    ax = axes[3]
    cases = [c for c in ("1MiB", "16MiB") if c in one_pass]
    x = range(len(cases))
    w = 0.25
    for k, (key, name) in enumerate([("floor", "floor: no checksum"), ("onePass", "integrity in one pass"), ("twoPass", "integrity in two passes")]):
        ax.bar([i + (k - 1) * w for i in x], [one_pass[c].get(key) or 0 for c in cases], w, label=name)
    ax.set_xticks(list(x)); ax.set_xticklabels([c + ", 1 reader" for c in cases])
    ax.set_ylabel("MB/s delivered"); ax.set_title("Large versions: owner -> spinning reader"); ax.legend(fontsize=8)

fig.suptitle(f"shmbroker-bench on {r['machine']}")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""#

/// The benchmark process as an embedded owner (`ShmBrokerOwner`): the same segments as the bench
/// daemon, published in-process, served to the reader agents on a socket of its own.
final class BenchOwner {
    let directory: String
    let socketPath: String
    let owner: ShmBrokerOwner
    private(set) var segments: [String: OwnedSegment] = [:]

    init() throws {
        directory = NSTemporaryDirectory() + "shmbroker-bench-owner-\(getpid())-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socketPath = directory + "/owner.sock"
        var names = ["lat64": 64, "lat4k": 4096, "rate": 64, "fan1": 64, "fan8": 64, "fan64": 64]
        for size in [4 << 10, 64 << 10, 1 << 20, 16 << 20] { names["tp-\(sizeName(size))"] = size }
        let config: [String: Any] = [
            "socket": ["path": socketPath, "mode": "0600"],
            "limits": ["maxClients": 4096, "subscriberStallTimeoutSeconds": 30],
            "segments": names.sorted { $0.key < $1.key }.map { ["name": $0.key, "size": $0.value, "slots": 3, "readers": ["users": ["*"]]] },
        ]
        let configPath = directory + "/owner.json"
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: configPath))
        var logger = Logger(label: "bench-owner") { JournalLogHandler(label: $0) }
        logger.logLevel = .warning
        owner = try ShmBrokerOwner(configPath: configPath, options: .init(handlesSignals: false, logger: logger, adoptsSystemdDescriptors: false))
        for name in names.keys { segments[name] = try owner.segment(name) }
        try owner.start()
    }

    subscript(name: String) -> OwnedSegment { segments[name]! }

    func stop() {
        owner.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
