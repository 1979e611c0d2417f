import ArgumentParser
import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// `shmbroker-bench`: measures shmbroker against baselines measured in the same run (memcpy,
/// liblzma, a raw Unix stream socket) and writes a table, a JSON file and a PNG plot.
@main
struct ShmBrokerBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shmbroker-bench",
        abstract: "Benchmark shmbroker against same-run baselines.",
        subcommands: [Run.self, Agent.self], defaultSubcommand: Run.self)
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run every benchmark (build with -c release).")

    @Option(help: "Where to write results.json, results.txt and plot.png.") var output = "shmbroker-bench-results"
    @Flag(help: "Fewer repetitions: a smoke run, not for reporting.") var quick = false
    @Option(help: """
        Run only these benchmarks (comma-separated: crc, read, latency, throughput, onepass, fanout, \
        rate, scale); the JSON, text and plot then hold only those.
        """) var only: String?
    @Option(help: """
        Throughput cases to run instead of the standard six, as payloadKiB:readers pairs \
        (for example 64:1,1024:8), for investigating one case.
        """) var throughputCases: String?
    @Option(help: "Interleaved trials per throughput case (default 5; 1 with --quick).") var trials: Int?
    @Option(help: """
        Throughput transports to run (comma-separated: ring-copy, ring, requests, owner, owner-spin, socket; \
        default all), for profiling one alone; ratios need ring and socket.
        """) var throughputPaths: String?

    func validate() throws {
        if let trials, trials < 1 { throw ValidationError("--trials must be at least 1") }
        if let throughputCases { _ = try Self.parseCases(throughputCases) }
        let unknown = Set(selectedPaths).subtracting(Self.allPaths)
        if !unknown.isEmpty { throw ValidationError("unknown throughput paths \(unknown.sorted()); known: \(Self.allPaths.joined(separator: ", "))") }
    }

    static let allPaths = ["ring-copy", "ring", "requests", "owner", "owner-spin", "socket"]
    /// How long the `owner-spin` path's readers spin for each version before they sleep on the
    /// futex (`SegmentReader.WaitStrategy.spinThenFutex`): a streaming reader that would rather
    /// burn a little CPU than make the owner pay a `FUTEX_WAKE` per version.
    static let streamingSpinMicroseconds: UInt64 = 50

    /// The throughput transports asked for (all, without `--throughput-paths`).
    var selectedPaths: [String] {
        throughputPaths.map(commaSeparatedList) ?? Self.allPaths
    }

    /// Whether the benchmark `name` was asked for (all are, without `--only`).
    func selected(_ name: String) -> Bool {
        guard let only else { return true }
        return commaSeparatedList(only).contains(name)
    }

    func run() async throws {
        #if DEBUG
        FileHandle.standardError.write(Data("warning: a debug build; numbers are meaningless. Use: swift run -c release shmbroker-bench\n".utf8))
        #endif
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        var results = BenchmarkResults(machine: machineDescription(), quick: quick,
                                       crcHardwareAccelerated: CRC64.isHardwareAccelerated,
                                       crcPath: CRC64.activePath.description,
                                       crcPathsSupported: CRC64.supportedPaths.map(\.description))
        var report = Report()
        report.text += "machine: \(machineDescription())\n"
        report.text += "CRC-64 path: \(CRC64.activePath) (supported here: \(CRC64.supportedPaths.map(\.description).joined(separator: ", ")))\n"
        if selected("crc") { results.crc64 = crcBenchmark(&report) }
        if selected("read") { results.verifiedRead = verifiedReadBenchmark(&report) }
        let daemon = try BenchDaemon(quick: quick)
        defer { daemon.stop() }
        let owner = try BenchOwner()
        defer { owner.stop() }
        if selected("latency") { results.latency = try await latencyBenchmark(daemon, owner, &report) }
        if selected("throughput") { results.throughput = try await throughputBenchmark(daemon, owner, &report) }
        if selected("onepass") { results.onePass = try onePassBenchmark(owner, &report) }
        if selected("fanout") { results.fanOut = try await fanOutBenchmark(daemon, owner, &report) }
        if selected("rate") { results.publishRate = try await publishRateBenchmark(daemon, owner, &report) }
        if selected("scale") { results.scale = try await scaleBenchmark(&report) }
        results.goals = report.goals

        try results.encoded().write(to: URL(fileURLWithPath: output + "/results.json"))
        try report.text.write(toFile: output + "/results.txt", atomically: true, encoding: .utf8)
        print(report.text)
        plot()
    }

    var repetitions: Int { quick ? 3 : 15 }
    static let publishWindow = 4

    func plot() {
        guard only == nil else {
            print("no plot: it needs the full run (without --only)")
            return
        }
        let script = NSTemporaryDirectory() + "shmbroker-bench-plot-\(getpid()).py"
        try? plotScript.write(toFile: script, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: script) }
        // Debian's python3-matplotlib lives with /usr/bin/python3, which may not be first on PATH.
        for interpreter in [["/usr/bin/python3"], ["/usr/bin/env", "python3"]] {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: interpreter[0])
            process.arguments = Array(interpreter.dropFirst()) + [script, output + "/results.json", output + "/plot.png"]
            process.standardError = FileHandle.nullDevice
            guard (try? process.run()) != nil else { continue }
            process.waitUntilExit()
            if process.terminationStatus == 0 {
                print("wrote \(output)/plot.png")
                return
            }
        }
        print("no plot: needs python3 with matplotlib (apt-get install python3-matplotlib)")
    }
}

/// The CPU's model name with its family and model numbers (a VM often shows only "AMD EPYC", and
/// the numbers tell Zen 4 from Zen 5), and the number of cores.
func machineDescription() -> String {
    let lines = ((try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? "").split(separator: "\n")
    func field(_ name: String) -> String? {
        // "model\t\t: 2" is the field "model"; "model name\t: ..." is not.
        lines.lazy.map { $0.split(separator: ":", maxSplits: 1) }
            .first { $0.count == 2 && $0[0].trimmingCharacters(in: .whitespaces) == name }?[1].trimmingCharacters(in: .whitespaces)
    }
    let cpu = field("model name") ?? "unknown CPU"
    let numbers = [field("cpu family").map { "family \($0)" }, field("model").map { "model \($0)" }].compactMap { $0 }
    let identity = numbers.isEmpty ? cpu : "\(cpu) (\(numbers.joined(separator: " ")))"
    return "\(identity), \(ProcessInfo.processInfo.activeProcessorCount) cores"
}

/// The items of an option like `--only crc, read`, spaces trimmed.
func commaSeparatedList(_ text: String) -> [String] {
    text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
}

/// A number for results.json: null when it was not measured (NaN), which JSON cannot hold.

/// A ratio for the table: "1.23x", or "n/a" when one side was not measured.
func ratioCell(_ ratio: Double) -> String { ratio.isNaN ? "n/a" : fmt(ratio) + "x" }

func sizeName(_ size: Int) -> String {
    size >= 1 << 20 ? "\(size >> 20)MiB" : size >= 1 << 10 ? "\(size >> 10)KiB" : "\(size)B"
}

func fmt(_ value: Double, _ digits: Int = 2) -> String {
    value.isFinite ? String(format: "%.\(digits)f", value) : "n/a"
}

/// The text report and the goal verdicts.
struct Report {
    var text = ""
    var goals: [GoalResult] = []

    mutating func section(_ title: String) { text += "\n## \(title)\n" }

    mutating func row(_ cells: [String]) {
        text += cells.enumerated().map { index, cell in
            let width = index == 0 ? max(cells.count == 2 ? 68 : 10, cell.count + 2) : max(12, cell.count + 2)
            return cell.padding(toLength: width, withPad: " ", startingAt: 0)
        }.joined() + "\n"
    }

    /// An indented line under the last row.
    mutating func note(_ line: String) { text += "   \(line)\n" }

    /// One row of the latency table: a path's p50, p99 and p99.9 beside the direct socket's, and
    /// the ratio of the p50s.
    mutating func latencyRow(size: Int, path: String, _ measured: LatencySummary, against socket: LatencySummary) {
        row([sizeName(size), path, fmt(measured.p50), fmt(measured.p99), fmt(measured.p999), fmt(socket.p50), fmt(socket.p99),
             fmt(socket.p999), fmt(measured.p50 / socket.p50) + "x"])
    }

    mutating func goal(_ name: String, value: Double, target: Double, lowerIsBetter: Bool = false) {
        guard !value.isNaN else { return }  // not measured in this run
        let met = lowerIsBetter ? value <= target : value >= target
        goals.append(GoalResult(goal: name, value: Measured(value), target: target, met: met))
        text += "   goal: \(name): \(fmt(value)) -> \(met ? "met" : "NOT met")\n"
    }
}
