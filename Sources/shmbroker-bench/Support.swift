import Foundation
import Glibc
import Histogram
import ShmBrokerPlatform

/// A spawned agent (this same executable) with captured output.
final class AgentProcess {
    let process = Process()
    private let output: URL
    private let errors: URL

    init(_ arguments: [String]) throws {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("shmbroker-bench-\(UUID().uuidString)")
        output = base.appendingPathExtension("out")
        errors = base.appendingPathExtension("err")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errors.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: CommandLine.executablePath)
        process.arguments = ["agent"] + arguments
        process.standardOutput = try FileHandle(forWritingTo: output)
        process.standardError = try FileHandle(forWritingTo: errors)
        try process.run()
    }

    var errorText: String { (try? String(contentsOf: errors, encoding: .utf8)) ?? "" }

    func waitUntilReady(timeout: Double = 60) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while !errorText.contains("ready") {
            guard process.isRunning, Date() < deadline else { throw BenchError("agent did not start: \(errorText)") }
            usleep(2_000)
        }
    }

    /// Waits for the agent's JSON result.
    func result(timeout: Double = 120) throws -> AgentReport {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(2_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        let text = (try? String(contentsOf: output, encoding: .utf8)) ?? ""
        try? FileManager.default.removeItem(at: output)
        try? FileManager.default.removeItem(at: errors)
        guard let line = text.split(separator: "\n").last,
              let report = try? JSONDecoder().decode(AgentReport.self, from: Data(line.utf8)) else {
            throw BenchError("agent produced no result: \(text) \(errorText)")
        }
        return report
    }

    /// The per-round latencies an agent reported, by round.
    func latencies(timeout: Double = 120) throws -> [UInt64: UInt64] {
        try latencyResult(timeout: timeout).latencies
    }

    /// Per-round latencies plus, for segment readers, the median split of each latency into
    /// producer -> daemon publish and daemon publish -> reader (ns).
    func latencyResult(timeout: Double = 120) throws -> (latencies: [UInt64: UInt64], toDaemon: UInt64, toReader: UInt64) {
        let report = try result(timeout: timeout)
        var result: [UInt64: UInt64] = [:]
        for (round, latency) in report.latencies ?? [:] {
            if let round = UInt64(round) { result[round] = latency }
        }
        return (result, report.medianToDaemon ?? 0, report.medianDaemonToReader ?? 0)
    }
}

extension CommandLine {
    static var executablePath: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? arguments[0]
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Percentiles of latencies in nanoseconds, through HdrHistogram.
struct LatencySummary {
    var count: Int
    var p50: Double
    var p99: Double
    var p999: Double

    init(_ values: [UInt64]) {
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        for value in values { _ = histogram.record(max(value, 1)) }
        count = values.count
        p50 = Double(histogram.valueAtPercentile(50)) / 1000
        p99 = Double(histogram.valueAtPercentile(99)) / 1000
        p999 = Double(histogram.valueAtPercentile(99.9)) / 1000
    }
}

/// The median of `values` (the upper one of an even count; 0 for none).
func median(_ values: [UInt64]) -> UInt64 { values.isEmpty ? 0 : values.sorted()[values.count / 2] }

/// How long `work` ran, in nanoseconds (at least 1, so that a rate never divides by zero).
func elapsedNanoseconds(_ work: () -> Void) -> Double {
    let start = Clock.monotonicNanoseconds()
    work()
    return Double(max(Clock.monotonicNanoseconds() - start, 1))
}

/// Runs `body` repeatedly and returns the median throughput in GB/s for `bytes` per run.
func medianThroughput(bytes: Int, runs: Int, _ body: () -> Void) -> Double {
    body()  // warm-up: page faults and caches
    let rates = (0..<runs).map { _ in Double(bytes) / elapsedNanoseconds(body) }.sorted()
    return rates[rates.count / 2]
}

/// The median ratio of `body`'s throughput to `baseline`'s over `runs` pairs run back to back, so
/// that a noisy moment on a shared machine hits both sides of one pair rather than all of one
/// side.
func medianPairedRatio(runs: Int, _ body: () -> Void, over baseline: () -> Void) -> Double {
    body()
    baseline()  // warm-up
    let ratios = (0..<max(runs, 1)).map { _ in elapsedNanoseconds(baseline) / elapsedNanoseconds(body) }.sorted()
    return ratios[ratios.count / 2]
}

/// Other libraries' CRC-64/XZ, loaded at run time so that only the benchmark depends on them:
/// liblzma's `lzma_crc64` and isa-l's `crc64_ecma_refl` (Debian `liblzma5`, `libisal2`).
enum CRCBaseline {
    typealias Function = @Sendable (UnsafePointer<UInt8>?, Int) -> UInt64

    static func symbol(_ name: String, in libraries: [String]) -> UnsafeMutableRawPointer? {
        for library in libraries {
            if let handle = dlopen(library, RTLD_NOW), let symbol = dlsym(handle, name) { return symbol }
        }
        return nil
    }

    static let liblzma: Function? = {
        typealias C = @convention(c) (UnsafePointer<UInt8>?, Int, UInt64) -> UInt64
        guard let found = symbol("lzma_crc64", in: ["liblzma.so.5", "liblzma.so"]) else { return nil }
        let function = unsafeBitCast(found, to: C.self)
        return { function($0, $1, 0) }
    }()

    /// isa-l's reflected ECMA-182 CRC: with seed 0 it is CRC-64/XZ (it inverts on entry and exit).
    static let isal: Function? = {
        typealias C = @convention(c) (UInt64, UnsafePointer<UInt8>?, UInt64) -> UInt64
        guard let found = symbol("crc64_ecma_refl", in: ["libisal.so.2", "libisal.so"]) else { return nil }
        let function = unsafeBitCast(found, to: C.self)
        return { function(0, $0, UInt64($1)) }
    }()
}

/// CPU time this process has used so far (user and system, all threads), in nanoseconds.
func ownCPUNanoseconds() -> UInt64 {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    func nanoseconds(_ time: timeval) -> UInt64 { UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_usec) * 1000 }
    return nanoseconds(usage.ru_utime) + nanoseconds(usage.ru_stime)
}

/// CPU time another process has used so far, summed over its threads from
/// /proc/PID/task/*/schedstat (nanosecond resolution, unlike the tick counts in /proc/PID/stat).
func cpuNanoseconds(ofProcess pid: Int32) -> UInt64 {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.reduce(0) { total, task in
        let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/schedstat", encoding: .utf8)) ?? ""
        return total + (text.split(separator: " ").first.flatMap { UInt64($0) } ?? 0)
    }
}

/// Where the CPU went during one throughput trial, in cores (CPU time over wall time).
struct CPUShares: Encodable {
    var daemon: Double
    var producer: Double
    var readers: Double

    var cell: String { "\(fmt(daemon)) / \(fmt(producer)) / \(fmt(readers))" }
}

/// One throughput trial: MB/s delivered to all readers together, and who used the CPU for it.
struct ThroughputTrial {
    var megabytesPerSecond: Double
    var cpu: CPUShares
}

/// Resident memory of a process from /proc/PID/status, in KiB.
func residentMemory(of pid: Int32) -> (anonymous: Int, file: Int, shared: Int) {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    func field(_ name: String) -> Int {
        status.split(separator: "\n").first { $0.hasPrefix(name + ":") }
            .flatMap { Int($0.split(whereSeparator: { $0 == " " || $0 == "\t" })[1]) } ?? 0
    }
    return (field("RssAnon"), field("RssFile"), field("RssShmem"))
}

/// A datagram socket standing in for systemd's notify socket, to time READY=1.
final class ReadyListener {
    let path: String
    let fd: Int32

    init(path: String) throws {
        self.path = path
        unlink(path)
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var address = RawStream.address(path)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else { throw BenchError("cannot bind \(path)") }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// Waits for a datagram with READY=1.
    func waitForReady(timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 1000) == 1 else { continue }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n > 0, String(decoding: buffer[..<n], as: UTF8.self).contains("READY=1") { return true }
        }
        return false
    }
}
