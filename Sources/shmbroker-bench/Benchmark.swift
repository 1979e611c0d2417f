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
        Run only these benchmarks (comma-separated: crc, read, latency, throughput, fanout, rate, \
        scale); the JSON, text and plot then hold only those.
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
        var results: [String: Any] = ["machine": machineDescription(), "quick": quick,
                                      "crcHardwareAccelerated": CRC64.isHardwareAccelerated,
                                      "crcPath": CRC64.activePath.description,
                                      "crcPathsSupported": CRC64.supportedPaths.map(\.description)]
        var report = Report()
        report.text += "machine: \(machineDescription())\n"
        report.text += "CRC-64 path: \(CRC64.activePath) (supported here: \(CRC64.supportedPaths.map(\.description).joined(separator: ", ")))\n"
        if selected("crc") { results["crc64"] = crcBenchmark(&report) }
        if selected("read") { results["verifiedRead"] = verifiedReadBenchmark(&report) }
        let daemon = try BenchDaemon(quick: quick)
        defer { daemon.stop() }
        let owner = try BenchOwner()
        defer { owner.stop() }
        if selected("latency") { results["latency"] = try await latencyBenchmark(daemon, owner, &report) }
        if selected("throughput") { results["throughput"] = try await throughputBenchmark(daemon, owner, &report) }
        if selected("fanout") { results["fanOut"] = try await fanOutBenchmark(daemon, owner, &report) }
        if selected("rate") { results["publishRate"] = try await publishRateBenchmark(daemon, owner, &report) }
        if selected("scale") { results["scale"] = try await scaleBenchmark(&report) }
        results["goals"] = report.goals

        let json = try JSONSerialization.data(withJSONObject: results, options: [.prettyPrinted, .sortedKeys])
        try json.write(to: URL(fileURLWithPath: output + "/results.json"))
        try report.text.write(toFile: output + "/results.txt", atomically: true, encoding: .utf8)
        print(report.text)
        plot()
    }

    var repetitions: Int { quick ? 3 : 15 }
    static let publishWindow = 4

    // MARK: CRC and verified reads

    func crcBenchmark(_ report: inout Report) -> [String: Any] {
        let paths = CRC64.supportedPaths
        report.section("CRC-64/XZ throughput (GB/s, median of \(repetitions)); active path \(CRC64.activePath)")
        report.row(["size"] + paths.map(\.description) + ["liblzma", "isa-l", "active/liblzma", "active/isa-l"])
        var rows: [String: Any] = [:]
        for size in [4 << 10, 1 << 20, 16 << 20] {
            let data = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
            var sink: UInt64 = 0
            let inner = max(4, (64 << 20) / size)
            var perPath: [String: Double] = [:]
            for path in paths {
                perPath[path.description] = data.withUnsafeBytes { bytes in
                    let runs = path == .portable ? max(3, repetitions / 3) : repetitions
                    let count = path == .portable ? 1 : inner
                    return medianThroughput(bytes: size * count, runs: runs) {
                        for _ in 0..<count { sink ^= CRC64.checksum(bytes, path: path) }
                    }
                }
            }
            let expected = CRC64.checksum(data)
            func external(_ function: CRCBaseline.Function?, _ name: String) -> Double {
                guard let function else { return .nan }
                precondition(data.withUnsafeBufferPointer { function($0.baseAddress, size) } == expected, "CRC disagrees with \(name)")
                return data.withUnsafeBufferPointer { buffer in
                    medianThroughput(bytes: size * inner, runs: repetitions) {
                        for _ in 0..<inner { sink ^= function(buffer.baseAddress, size) }
                    }
                }
            }
            let lzma = external(CRCBaseline.liblzma, "liblzma")
            let isal = external(CRCBaseline.isal, "isa-l")
            // The goal compares the active path with isa-l in back-to-back pairs: the columns above
            // run one implementation after another, so a burst of noise can hit only one of them.
            let paired = CRCBaseline.isal.map { isalFunction in
                data.withUnsafeBufferPointer { buffer in
                    medianPairedRatio(runs: repetitions, {
                        for _ in 0..<inner { sink ^= CRC64.checksum(UnsafeRawBufferPointer(buffer)) }
                    }, over: {
                        for _ in 0..<inner { sink ^= isalFunction(buffer.baseAddress, size) }
                    })
                }
            } ?? .nan
            if sink == 42 { print("") }
            let ours = perPath[CRC64.activePath.description] ?? .nan
            rows[sizeName(size)] = ["paths_GBps": perPath, "active": CRC64.activePath.description, "shmbroker_GBps": ours,
                                    "portable_GBps": json(perPath["portable"] ?? .nan), "liblzma_GBps": json(lzma),
                                    "isal_GBps": json(isal), "ratio": json(ours / lzma), "ratio_isal": json(ours / isal),
                                    "ratio_isal_paired": json(paired)]
            report.row([sizeName(size)] + paths.map { fmt(perPath[$0.description] ?? .nan) }
                       + [fmt(lzma), fmt(isal), ratioCell(ours / lzma), ratioCell(ours / isal)])
            if size == 1 << 20 { report.goal("CRC-64 >= 1.5x liblzma at 1 MiB", value: ours / lzma, target: 1.5) }
            if !paired.isNaN { report.note("active/isa-l in \(repetitions) back-to-back pairs (median): \(fmt(paired))x") }
            report.goal("CRC-64 >= 0.8x isa-l crc64_ecma_refl at \(sizeName(size))", value: paired, target: 0.8)
        }
        if CRCBaseline.isal == nil { report.note("isa-l not found (apt-get install libisal2): its column is n/a") }
        return rows
    }

    func verifiedReadBenchmark(_ report: inout Report) -> [String: Any] {
        report.section("Verified read (copy-out + CRC check) vs memcpy (GB/s)")
        report.row(["size", "verified read", "memcpy", "ratio"])
        var rows: [String: Any] = [:]
        for size in [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20] {
            let layout = SegmentLayout(capacity: size, slotCount: 2)
            guard let file = try? MemoryFile.create(name: "bench", size: layout.totalSize),
                  let region = try? MappedRegion(mapping: file, length: layout.totalSize, writable: true) else { continue }
            defer { file.closeQuietly() }
            let writer = SegmentWriter(formatting: region, layout: layout, name: "bench")
            _ = try? writer.publish((0..<size).map { UInt8(truncatingIfNeeded: $0) })
            guard let reader = try? SegmentReader(region: region) else { continue }
            let source = (0..<size).map { UInt8(truncatingIfNeeded: $0) }
            var destination = [UInt8](repeating: 0, count: size)
            let inner = max(1, (8 << 20) / size)
            let verified = destination.withUnsafeMutableBytes { buffer in
                medianThroughput(bytes: size * inner, runs: repetitions) {
                    for _ in 0..<inner { _ = try? reader.readOnce(into: buffer) }
                }
            }
            let memcpyRate = destination.withUnsafeMutableBytes { buffer in
                source.withUnsafeBytes { from in
                    medianThroughput(bytes: size * inner, runs: repetitions) {
                        for _ in 0..<inner { memcpy(buffer.baseAddress!, from.baseAddress!, size) }
                    }
                }
            }
            rows[sizeName(size)] = ["verified_GBps": verified, "memcpy_GBps": memcpyRate, "ratio": verified / memcpyRate]
            report.row([sizeName(size), fmt(verified), fmt(memcpyRate), fmt(verified / memcpyRate) + "x"])
            if size == 1 << 20 { report.goal("verified read >= 0.45x memcpy at 1 MiB", value: verified / memcpyRate, target: 0.45) }
            if size == 16 << 20 { report.goal("verified read >= 0.8x memcpy at 16 MiB", value: verified / memcpyRate, target: 0.8) }
        }
        return rows
    }

    // MARK: Through the daemon

    /// The CPU a spinning reader agent pins its thread to: the last one this process may use.
    static let spinningReaderCPU = ProcessInfo.processInfo.activeProcessorCount - 1

    /// One producer publish per round, spaced so each is read alone; vs the same payload over a
    /// raw Unix stream socket between two processes.
    func latencyBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: Any] {
        let rounds: UInt64 = quick ? 300 : 3000
        report.section("End-to-end latency, publish call -> reader holds the verified version (µs; \(rounds) rounds; "
                       + "the owner-spin reader's thread pinned to CPU \(Self.spinningReaderCPU))")
        report.row(["payload", "path", "shm p50", "p99", "p99.9", "socket p50", "p99", "p99.9", "p50 ratio"])
        let client = try await daemon.connect()
        var rows: [String: Any] = [:]
        for (size, segment) in [(64, "lat64"), (4096, "lat4k")] {
            let socket = LatencySummary(try socketLatency(size: size, rounds: rounds, readers: 1).perRound)
            // The same messages through a relay process: two socket hops, the floor of any design
            // that puts a broker process between producer and reader (the daemon's paths do).
            let relayed = LatencySummary(try socketLatency(size: size, rounds: rounds, readers: 1, relayed: true).perRound)
            var row: [String: Any] = ["socket": socket.json, "socket_relay": relayed.json]
            report.latencyRow(size: size, path: "socket-relay", relayed, against: socket)
            for path in [ProducerPath.requests, .ring] {
                let agent = try AgentProcess(["segment-latency", "--socket", daemon.socketPath, "--segment", segment, "--rounds", "\(rounds)"])
                try agent.waitUntilReady()
                var payload = [UInt8](repeating: 0xA5, count: size)
                let publisher = path == .ring ? try await client.openPublisher(segment) : nil
                for round in 0..<rounds {
                    Stamp.write(&payload, sentAt: Clock.monotonicNanoseconds(), round: round)
                    if let publisher {
                        try publisher.publish(payload)
                    } else {
                        try await client.publish(segment, bytes: payload)
                    }
                    usleep(200)
                }
                await publisher?.close()
                let measured = try agent.latencyResult()
                let shm = LatencySummary(Array(measured.latencies.values))
                let split = (toDaemon: Double(measured.toDaemon) / 1000, toReader: Double(measured.toReader) / 1000)
                let name = path == .ring ? "ring" : "requests"
                row[name] = ["shm": shm.json, "p50_ratio": shm.p50 / socket.p50,
                             "median_producer_to_daemon_us": split.toDaemon, "median_daemon_to_reader_us": split.toReader]
                report.latencyRow(size: size, path: name, shm, against: socket)
                report.text += "   split (medians): producer call -> daemon publish \(fmt(split.toDaemon)) µs, daemon publish -> reader holds it \(fmt(split.toReader)) µs\n"
                if path == .ring {
                    row["ring_over_relay"] = shm.p50 / relayed.p50
                    report.text += "   against the socket relay (two hops through a third process, same run): \(fmt(shm.p50 / relayed.p50))x its p50\n"
                    report.goal("end-to-end p50 <= 2x raw socket one-way p50 (\(sizeName(size)), publish ring)",
                                value: shm.p50 / socket.p50, target: 2, lowerIsBetter: true)
                }
            }
            // The embedded owner publishes in-process; readers wait three ways.
            for mode in WaitMode.allCases {
                // A spinning reader owns a core: its thread is pinned to the last CPU.
                let agent = try AgentProcess(["segment-latency", "--socket", owner.socketPath, "--segment", segment,
                                              "--rounds", "\(rounds)", "--wait", mode.rawValue]
                                             + (mode == .spin ? ["--pin-cpu", "\(Self.spinningReaderCPU)"] : []))
                try agent.waitUntilReady()
                var payload = [UInt8](repeating: 0xA5, count: size)
                let owned = owner[segment]
                // How long each publish call ran in the publishing thread (which slept 200 µs
                // before it, as a periodic producer does): the split of the end-to-end latency.
                var callDurations = [UInt64](repeating: 0, count: Int(rounds))
                for round in 0..<rounds {
                    let sentAt = Clock.monotonicNanoseconds()
                    Stamp.write(&payload, sentAt: sentAt, round: round)
                    try owned.publish(payload)
                    callDurations[Int(round)] = Clock.monotonicNanoseconds() - sentAt
                    usleep(200)
                }
                let latencies = try agent.latencyResult().latencies
                let shm = LatencySummary(Array(latencies.values))
                let call = median(callDurations)
                let afterCall = median(latencies.map { round, latency in latency &- min(latency, callDurations[Int(round)]) })
                let name = "owner-\(mode.rawValue)"
                row[name] = ["shm": shm.json, "p50_ratio": shm.p50 / socket.p50,
                             "median_publish_call_us": Double(call) / 1000, "median_after_call_us": Double(afterCall) / 1000]
                report.latencyRow(size: size, path: name, shm, against: socket)
                report.text += "   split (medians): the publish call \(fmt(Double(call) / 1000)) µs (its thread had slept 200 µs), "
                    + "its return -> reader holds it \(fmt(Double(afterCall) / 1000)) µs\n"
                switch mode {
                case .futex:
                    report.goal("owner -> futex-waiting reader p50 <= 0.8x socket one-way p50 (\(sizeName(size)))",
                                value: shm.p50 / socket.p50, target: 0.8, lowerIsBetter: true)
                case .spin:
                    report.goal("owner -> busy-polling reader p50 <= 0.1x socket one-way p50 (\(sizeName(size)))",
                                value: shm.p50 / socket.p50, target: 0.1, lowerIsBetter: true)
                case .events: break
                }
            }
            rows[sizeName(size)] = row
        }
        return rows
    }

    /// Sends `rounds` stamped messages to `readers` socket-latency agents, one message per reader
    /// per round; returns the latency of the last reader in each round.
    /// - Parameter relayed: whether the one reader gets the messages through a relay process (a
    ///   socket-latency agent behind a socket-relay agent) instead of straight from this process.
    func socketLatency(size: Int, rounds: UInt64, readers: Int, spacingMicroseconds: UInt32 = 200,
                       relayed: Bool = false) throws -> (perRound: [UInt64], all: [UInt64]) {
        let path = NSTemporaryDirectory() + "shmbroker-bench-\(getpid()).sock"
        let relayPath = path + ".relay"
        let listener = try RawStream.listen(path)
        defer { close(listener); unlink(path) }
        var connections: [Int32] = []
        defer { connections.forEach { close($0) } }
        var relay: AgentProcess?
        if relayed {
            precondition(readers == 1, "a relayed run has one reader")
            relay = try AgentProcess(["socket-relay", "--upstream", path, "--downstream", relayPath,
                                      "--size", "\(size)", "--rounds", "\(rounds)"])
            // The relay listens downstream before it connects here, so its reader can connect next.
            connections = [accept(listener, nil, nil)]
        }
        let agents = try (0..<readers).map { _ in
            try AgentProcess(["socket-latency", "--path", relayed ? relayPath : path, "--size", "\(size)", "--rounds", "\(rounds)"])
        }
        if !relayed { connections = (0..<readers).map { _ in accept(listener, nil, nil) } }
        try relay?.waitUntilReady()
        for agent in agents { try agent.waitUntilReady() }
        var payload = [UInt8](repeating: 0x5A, count: size)
        for round in 0..<rounds {
            Stamp.write(&payload, sentAt: Clock.monotonicNanoseconds(), round: round)
            payload.withUnsafeBytes { bytes in connections.forEach { RawStream.writeAll($0, bytes) } }
            usleep(spacingMicroseconds)
        }
        let perAgent = try agents.map { try $0.latencies() }
        _ = try relay?.result()
        return (lastArrivals(perAgent, rounds: rounds), perAgent.flatMap { $0.values })
    }

    /// For each round every reader saw, the latest arrival.
    func lastArrivals(_ perAgent: [[UInt64: UInt64]], rounds: UInt64) -> [UInt64] {
        (0..<rounds).compactMap { round in
            let seen = perAgent.compactMap { $0[round] }
            return seen.count == perAgent.count ? seen.max() : nil
        }
    }

    /// How the benchmark's producer hands versions to the daemon.
    enum ProducerPath {
        /// PUBLISH requests, each answered by a reply, a few in flight.
        case requests
        /// A publish ring (`SegmentPublisher`): no request or reply per version.
        case ring
    }

    func throughputBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: Any] {
        let trials = self.trials ?? (quick ? 1 : 5)
        report.section("Producer -> reader throughput (MB/s delivered to readers; median of \(trials) interleaved trials; "
                       + "requests: \(Self.publishWindow) PUBLISH requests in flight)")
        report.row(["payload", "readers", "ring copy", "ring 0-copy", "reqs 0-copy", "owner 0-copy", "owner spin", "socket",
                    "ratio ring", "ratio reqs", "ratio owner", "owner spin"])
        report.text += "(owner spin: the owner's zero-copy readers spin up to \(Self.streamingSpinMicroseconds) µs for each version before sleeping on the futex)\n"
        let client = try await daemon.connect()
        var rows: [String: Any] = [:]
        let standardCases: [(Int, Int)] = [(4 << 10, 1), (64 << 10, 1), (1 << 20, 1), (16 << 20, 1), (64 << 10, 8), (1 << 20, 8)]
        let cases = try throughputCases.map(Self.parseCases) ?? standardCases
        for (size, readers) in cases {
            let segment = "tp-\(sizeName(size))"
            let totalBytes = quick ? 64 << 20 : (size >= 16 << 20 ? 1 << 30 : 256 << 20)
            let count = max(16, min(20_000, totalBytes / size))
            // The transports take turns, so a noisy moment on this shared machine hits one trial
            // of each rather than all of one.
            var ringCopying: [ThroughputTrial] = [], ringZeroCopy: [ThroughputTrial] = []
            var requestsZeroCopy: [ThroughputTrial] = [], socketTrials: [ThroughputTrial] = [], ownerTrials: [ThroughputTrial] = []
            var ownerSpinTrials: [ThroughputTrial] = []
            let paths = selectedPaths
            for _ in 0..<trials {
                if paths.contains("ring-copy") {
                    ringCopying.append(try await segmentThroughput(client, daemon, segment: segment, size: size, count: count,
                                                                   readers: readers, zeroCopy: false, via: .ring))
                }
                if paths.contains("ring") {
                    ringZeroCopy.append(try await segmentThroughput(client, daemon, segment: segment, size: size, count: count,
                                                                    readers: readers, zeroCopy: true, via: .ring))
                }
                if paths.contains("requests") {
                    requestsZeroCopy.append(try await segmentThroughput(client, daemon, segment: segment, size: size, count: count,
                                                                        readers: readers, zeroCopy: true, via: .requests))
                }
                if paths.contains("owner") {
                    ownerTrials.append(try ownerThroughput(owner, segment: segment, size: size, count: count, readers: readers))
                }
                if paths.contains("owner-spin") {
                    ownerSpinTrials.append(try ownerThroughput(owner, segment: segment, size: size, count: count, readers: readers,
                                                               spinMicroseconds: Self.streamingSpinMicroseconds))
                }
                if paths.contains("socket") { socketTrials.append(try socketThroughput(size: size, count: count, readers: readers)) }
            }
            /// The median trial by throughput (nil for a transport left out).
            func median(_ trials: [ThroughputTrial]) -> ThroughputTrial? {
                trials.isEmpty ? nil : trials.sorted { $0.megabytesPerSecond < $1.megabytesPerSecond }[trials.count / 2]
            }
            let copyingTrial = median(ringCopying), zeroCopyTrial = median(ringZeroCopy)
            let requestsTrial = median(requestsZeroCopy), socketTrial = median(socketTrials), ownerTrial = median(ownerTrials)
            let ownerSpinTrial = median(ownerSpinTrials)
            // A transport left out reads as NaN ("n/a" in the table, null in the JSON).
            let copying = copyingTrial?.megabytesPerSecond ?? .nan, zeroCopy = zeroCopyTrial?.megabytesPerSecond ?? .nan
            let requests = requestsTrial?.megabytesPerSecond ?? .nan, socket = socketTrial?.megabytesPerSecond ?? .nan
            let ownerRate = ownerTrial?.megabytesPerSecond ?? .nan, ownerSpinRate = ownerSpinTrial?.megabytesPerSecond ?? .nan
            /// The ratios of two transports' trials, pair by pair (each pair ran back to back), sorted.
            func perTrial(_ trials: [ThroughputTrial], over baseline: [ThroughputTrial]) -> [Double] {
                zip(trials, baseline).map { $0.megabytesPerSecond / $1.megabytesPerSecond }.sorted()
            }
            let ratios = perTrial(ownerTrials, over: socketTrials)
            // Ring against requests, trial by trial: how stable the ring's lead is.
            let ringLead = perTrial(ringZeroCopy, over: requestsZeroCopy)
            rows["\(sizeName(size))x\(readers)"] = [
                "shm_MBps": json(copying), "shm_zero_copy_MBps": json(zeroCopy), "shm_requests_zero_copy_MBps": json(requests),
                "socket_MBps": json(socket), "ratio": json(copying / socket), "ratio_zero_copy": json(zeroCopy / socket),
                "ratio_requests_zero_copy": json(requests / socket), "published": count,
                "owner_zero_copy_MBps": json(ownerRate), "ratio_owner_zero_copy": json(ownerRate / socket),
                "owner_spin_zero_copy_MBps": json(ownerSpinRate), "ratio_owner_spin_zero_copy": json(ownerSpinRate / socket),
                "ratio_owner_per_trial": ratios, "ratio_ring_over_requests_per_trial": ringLead,
                "cpu_cores_median_trial": [
                    "ring_copy": copyingTrial?.cpu.json, "ring_zero_copy": zeroCopyTrial?.cpu.json,
                    "requests_zero_copy": requestsTrial?.cpu.json, "socket": socketTrial?.cpu.json, "owner": ownerTrial?.cpu.json,
                    "owner_spin": ownerSpinTrial?.cpu.json,
                ].compactMapValues { $0 },
            ]
            report.row([sizeName(size), "\(readers)", fmt(copying, 0), fmt(zeroCopy, 0), fmt(requests, 0), fmt(ownerRate, 0), fmt(ownerSpinRate, 0),
                        fmt(socket, 0), ratioCell(zeroCopy / socket), ratioCell(requests / socket), ratioCell(ownerRate / socket),
                        ratioCell(ownerSpinRate / socket)])
            if ratios.count > 1 {
                report.note("owner/socket per interleaved trial: " + ratios.map { fmt($0) }.joined(separator: ", "))
            }
            let spinRatios = perTrial(ownerSpinTrials, over: socketTrials)
            if spinRatios.count > 1 {
                report.note("owner spin/socket per interleaved trial: " + spinRatios.map { fmt($0) }.joined(separator: ", "))
            }
            if ringLead.count > 1 {
                report.note("ring/requests per interleaved trial: " + ringLead.map { fmt($0) }.joined(separator: ", "))
            }
            let shares = [("ring 0-copy", zeroCopyTrial), ("owner", ownerTrial), ("owner spin", ownerSpinTrial), ("socket", socketTrial)].compactMap { name, trial in
                trial.map { "\(name) \($0.cpu.cell)" }
            }
            if !shares.isEmpty { report.note("CPU, cores (daemon / producer / readers): " + shares.joined(separator: "; ")) }
            if readers == 1 && size >= 64 << 10 {
                report.goal("throughput >= 1x raw socket at \(sizeName(size)) (publish ring, zero-copy verified reader)",
                            value: zeroCopy / socket, target: 1)
                report.goal("publish ring >= requests throughput at \(sizeName(size))", value: zeroCopy / requests, target: 1)
                let target = size == 64 << 10 ? 3.0 : size == 1 << 20 ? 2.0 : 1.5
                report.goal("owner -> 1 zero-copy reader >= \(fmt(target, 1))x socket at \(sizeName(size))", value: ownerRate / socket, target: target)
                report.goal("owner -> 1 zero-copy reader spinning <= \(Self.streamingSpinMicroseconds) µs per version >= \(fmt(target, 1))x socket at \(sizeName(size))",
                            value: ownerSpinRate / socket, target: target)
            }
            if readers == 8 {
                report.goal("throughput with 8 readers >= 3x raw socket (\(sizeName(size)), publish ring, zero-copy verified readers)",
                            value: zeroCopy / socket, target: 3)
                report.goal("owner -> 8 zero-copy readers >= 6x socket writer to 8 sockets (\(sizeName(size)))",
                            value: ownerRate / socket, target: 6)
            }
        }
        return rows
    }

    /// Parses `payloadKiB:readers,...` into (bytes, readers) pairs of sizes the bench daemon serves.
    static func parseCases(_ text: String) throws -> [(Int, Int)] {
        try text.split(separator: ",").map { pair in
            let parts = pair.split(separator: ":").compactMap { Int($0) }
            guard parts.count == 2, [4, 64, 1024, 16384].contains(parts[0]), parts[1] > 0 else {
                throw ValidationError("a throughput case is payloadKiB:readers with payloadKiB 4, 64, 1024 or 16384, not '\(pair)'")
            }
            return (parts[0] << 10, parts[1])
        }
    }

    /// Publishes `count` versions while `readers` drain agents read every version they can;
    /// returns MB/s delivered to all readers together and the CPU each party used meanwhile.
    func segmentThroughput(_ client: ShmBrokerClient, _ daemon: BenchDaemon, segment: String, size: Int, count: Int,
                           readers: Int, zeroCopy: Bool, via path: ProducerPath) async throws -> ThroughputTrial {
        let start = try await client.status().segments.first { $0.name == segment }?.version ?? 0
        let agents = try (0..<readers).map { _ in
            try AgentProcess(["segment-drain", "--socket", daemon.socketPath, "--segment", segment,
                              "--until", "\(start + UInt64(count))"] + (zeroCopy ? ["--zero-copy"] : []))
        }
        for agent in agents { try agent.waitUntilReady() }
        let payload = [UInt8](repeating: 0x33, count: size)
        var began: UInt64 = 0
        var daemonCPU = cpuNanoseconds(ofProcess: daemon.pid), producerCPU = ownCPUNanoseconds()
        switch path {
        case .ring:
            let publisher = try await client.openPublisher(segment)
            // The clocks start once the ring is attached, as the wall clock does.
            daemonCPU = cpuNanoseconds(ofProcess: daemon.pid)
            producerCPU = ownCPUNanoseconds()
            began = Clock.monotonicNanoseconds()
            for _ in 0..<count { try publisher.publish(payload) }
            try publisher.flush(timeoutNanoseconds: 120_000_000_000)
            await publisher.close()
        case .requests:
            began = Clock.monotonicNanoseconds()
            // Like the socket writer, whose kernel buffer lets it run ahead, the producer keeps a
            // few publishes in flight.
            let window = Self.publishWindow
            try await withThrowingTaskGroup(of: Void.self) { group in
                for lane in 0..<window {
                    group.addTask {
                        for _ in stride(from: lane, to: count, by: window) {
                            try await client.publish(segment, bytes: payload)
                        }
                    }
                }
                try await group.waitForAll()
            }
        }
        producerCPU = ownCPUNanoseconds() - producerCPU
        let results = try agents.map { try $0.result() }
        daemonCPU = cpuNanoseconds(ofProcess: daemon.pid) - daemonCPU
        return throughputTrial(results, began: began, producerCPU: producerCPU, daemonCPU: daemonCPU)
    }

    /// MB/s and CPU shares from the agents' reports; the wall time runs from the first publish
    /// until the last reader had the last version.
    func throughputTrial(_ results: [[String: Any]], began: UInt64, producerCPU: UInt64, daemonCPU: UInt64) -> ThroughputTrial {
        let finished = results.compactMap { ($0["finishedAt"] as? NSNumber)?.uint64Value }.max() ?? began
        let delivered = results.compactMap { $0["bytes"] as? Int }.reduce(0, +)
        let readersCPU = results.compactMap { ($0["cpuNanoseconds"] as? NSNumber)?.uint64Value }.reduce(0, +)
        let wall = Double(max(finished - began, 1))
        return ThroughputTrial(megabytesPerSecond: Double(delivered) / wall * 1000,
                               cpu: CPUShares(daemon: Double(daemonCPU) / wall, producer: Double(producerCPU) / wall,
                                              readers: Double(readersCPU) / wall))
    }

    /// The embedded owner publishes `count` versions in-process while `readers` zero-copy drain
    /// agents read every version they can. "producer" CPU is this whole process (publisher and
    /// the owner's event loop); there is no daemon.
    /// - Parameter spinMicroseconds: how long each reader spins for a version before it sleeps on
    ///   the futex (0: it sleeps at once).
    func ownerThroughput(_ owner: BenchOwner, segment: String, size: Int, count: Int, readers: Int,
                         spinMicroseconds: UInt64 = 0) throws -> ThroughputTrial {
        let owned = owner[segment]
        let start = owned.latestVersion
        let agents = try (0..<readers).map { _ in
            try AgentProcess(["segment-drain", "--socket", owner.socketPath, "--segment", segment,
                              "--until", "\(start + UInt64(count))", "--zero-copy", "--spin-microseconds", "\(spinMicroseconds)"])
        }
        for agent in agents { try agent.waitUntilReady() }
        let payload = [UInt8](repeating: 0x55, count: size)
        let producerCPU = ownCPUNanoseconds()
        let began = Clock.monotonicNanoseconds()
        try payload.withUnsafeBytes { bytes in
            for _ in 0..<count { try owned.publish(bytes) }
        }
        let producer = ownCPUNanoseconds() - producerCPU
        return throughputTrial(try agents.map { try $0.result() }, began: began, producerCPU: producer, daemonCPU: 0)
    }

    func socketThroughput(size: Int, count: Int, readers: Int) throws -> ThroughputTrial {
        let path = NSTemporaryDirectory() + "shmbroker-bench-tp-\(getpid()).sock"
        let listener = try RawStream.listen(path)
        defer { close(listener); unlink(path) }
        let agents = try (0..<readers).map { _ in try AgentProcess(["socket-drain", "--path", path, "--total", "\(size * count)"]) }
        let connections = (0..<readers).map { _ in accept(listener, nil, nil) }
        defer { connections.forEach { close($0) } }
        for agent in agents { try agent.waitUntilReady() }
        let payload = [UInt8](repeating: 0x44, count: size)
        let writerCPU = ownCPUNanoseconds()
        let began = Clock.monotonicNanoseconds()
        for _ in 0..<count {
            payload.withUnsafeBytes { bytes in connections.forEach { RawStream.writeAll($0, bytes) } }
        }
        let writer = ownCPUNanoseconds() - writerCPU
        return throughputTrial(try agents.map { try $0.result() }, began: began, producerCPU: writer, daemonCPU: 0)
    }

    func fanOutBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: Any] {
        let rounds: UInt64 = quick ? 50 : 300
        report.section("Fan-out: publish (through a publish ring) -> last of N readers holds it (µs, p50 / p99 over \(rounds) rounds)")
        report.row(["readers", "ring p50", "ring p99", "owner p50", "owner p99", "socket p50", "socket p99", "ring ratio", "owner ratio"])
        let client = try await daemon.connect()
        var rows: [String: Any] = [:]
        for readers in [1, 8, 64] {
            let segment = "fan\(readers)"
            let agents = try (0..<readers).map { _ in
                try AgentProcess(["segment-latency", "--socket", daemon.socketPath, "--segment", segment, "--rounds", "\(rounds)"])
            }
            for agent in agents { try agent.waitUntilReady() }
            let spacing = UInt32(2_000 + readers * 150)
            let publisher = try await client.openPublisher(segment)
            var payload = [UInt8](repeating: 1, count: 64)
            for round in 0..<rounds {
                Stamp.write(&payload, sentAt: Clock.monotonicNanoseconds(), round: round)
                try publisher.publish(payload)
                usleep(spacing)
            }
            await publisher.close()
            let shm = LatencySummary(lastArrivals(try agents.map { try $0.latencies() }, rounds: rounds))
            let ownerAgents = try (0..<readers).map { _ in
                try AgentProcess(["segment-latency", "--socket", owner.socketPath, "--segment", segment, "--rounds", "\(rounds)"])
            }
            for agent in ownerAgents { try agent.waitUntilReady() }
            let owned = owner[segment]
            for round in 0..<rounds {
                Stamp.write(&payload, sentAt: Clock.monotonicNanoseconds(), round: round)
                try owned.publish(payload)
                usleep(spacing)
            }
            let ownerSummary = LatencySummary(lastArrivals(try ownerAgents.map { try $0.latencies() }, rounds: rounds))
            let socket = LatencySummary(try socketLatency(size: 64, rounds: rounds, readers: readers, spacingMicroseconds: spacing).perRound)
            rows["\(readers)"] = ["shm": shm.json, "owner": ownerSummary.json, "socket": socket.json, "p50_ratio": shm.p50 / socket.p50,
                                  "owner_p50_ratio": ownerSummary.p50 / socket.p50]
            report.row(["\(readers)", fmt(shm.p50), fmt(shm.p99), fmt(ownerSummary.p50), fmt(ownerSummary.p99), fmt(socket.p50), fmt(socket.p99),
                        fmt(shm.p50 / socket.p50) + "x", fmt(ownerSummary.p50 / socket.p50) + "x"])
            if readers == 64 { report.goal("fan-out to 64 readers <= 0.7x socket-per-reader (p50)", value: shm.p50 / socket.p50, target: 0.7, lowerIsBetter: true) }
            if readers == 1 {
                report.goal("owner fan-out, last of 1 reader <= 1x socket (p50)", value: ownerSummary.p50 / socket.p50, target: 1, lowerIsBetter: true)
            }
            if readers == 64 {
                report.goal("owner fan-out, last of 64 readers <= 0.6x socket-per-reader (p50)", value: ownerSummary.p50 / socket.p50,
                            target: 0.6, lowerIsBetter: true)
            }
        }
        return rows
    }

    func publishRateBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: Any] {
        report.section("Publishes per second, 64 B, one producer through the control channel")
        let client = try await daemon.connect()
        let payload = [UInt8](repeating: 7, count: 64)
        let seconds = quick ? 0.5 : 2.0
        var sequential = 0
        let began = Date()
        while Date().timeIntervalSince(began) < seconds {
            try await client.publish("rate", bytes: payload)
            sequential += 1
        }
        let sequentialRate = Double(sequential) / Date().timeIntervalSince(began)
        let pipelinedStart = Date()
        let window = 64
        let pipelined = try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<window {
                group.addTask {
                    var count = 0
                    while Date().timeIntervalSince(pipelinedStart) < seconds {
                        try await client.publish("rate", bytes: payload)
                        count += 1
                    }
                    return count
                }
            }
            return try await group.reduce(0, +)
        }
        let pipelinedRate = Double(pipelined) / Date().timeIntervalSince(pipelinedStart)
        report.row(["one at a time", fmt(sequentialRate, 0) + "/s"])
        report.row(["\(window) in flight", fmt(pipelinedRate, 0) + "/s"])
        report.goal("at least 100,000 publishes/s of 64 B (\(window) in flight)", value: pipelinedRate, target: 100_000)
        // The same producer through a publish ring: each publish is an append, published by the
        // daemon in batches; flushed at the end so every counted publish is a version.
        let publisher = try await client.openPublisher("rate")
        let ringStart = Date()
        var appended = 0
        while Date().timeIntervalSince(ringStart) < seconds {
            for _ in 0..<256 { try publisher.publish(payload) }
            appended += 256
        }
        try publisher.flush(timeoutNanoseconds: 60_000_000_000)
        let ringRate = Double(appended) / Date().timeIntervalSince(ringStart)
        await publisher.close()
        report.row(["through a publish ring (flushed)", fmt(ringRate, 0) + "/s"])
        // In-process, by the embedded owner, with no reader asleep on the segment: no system call.
        let owned = owner["rate"]
        func inProcessRate(_ publish: () throws -> Void) rethrows -> Double {
            let began = Clock.monotonicNanoseconds()
            var published = 0
            while Clock.monotonicNanoseconds() - began < UInt64(seconds * 1e9) {
                for _ in 0..<4096 { try publish() }
                published += 4096
            }
            return Double(published) / (Double(Clock.monotonicNanoseconds() - began) / 1e9)
        }
        let zeroCopyRate = try inProcessRate { try owned.publish(length: 64) { slot in slot.storeBytes(of: 7, toByteOffset: 0, as: UInt64.self) } }
        let copyRate = try payload.withUnsafeBytes { bytes in try inProcessRate { try owned.publish(bytes) } }
        report.row(["in-process owner, zero-copy publish(length:)", fmt(zeroCopyRate, 0) + "/s"])
        report.row(["in-process owner, publish(bytes)", fmt(copyRate, 0) + "/s"])
        report.goal("in-process zero-copy publishes of 64 B >= 10 M/s (no reader asleep)", value: zeroCopyRate / 1e6, target: 10)
        let costs = try publishCosts()
        report.note("where an in-process 64 B publish goes (ns each): " + costs.map { "\($0.0) \(fmt($0.1, 1))" }.joined(separator: "; "))
        return ["sequential_per_s": sequentialRate, "pipelined_per_s": pipelinedRate, "window": window, "ring_per_s": ringRate,
                "owner_zero_copy_per_s": zeroCopyRate, "owner_copy_per_s": copyRate]
    }

    /// The parts of an in-process publish of 64 bytes, each timed alone over a million calls:
    /// what bounds the publish rate.
    func publishCosts() throws -> [(String, Double)] {
        func nanoseconds(_ body: () -> Void) -> Double {
            let count = quick ? 200_000 : 1_000_000
            body()
            let began = Clock.monotonicNanoseconds()
            for _ in 0..<count { body() }
            return Double(Clock.monotonicNanoseconds() - began) / Double(count)
        }
        let layout = SegmentLayout(capacity: 64, slotCount: 3)
        let file = try MemoryFile.create(name: "bench-costs", size: layout.totalSize)
        let boardFile = try MemoryFile.create(name: "bench-costs-board", size: SegmentLayout.WaitBoard.size, mode: 0o600)
        defer { file.closeQuietly(); boardFile.closeQuietly() }
        let withBoard = SegmentWriter(formatting: try MappedRegion(mapping: file, length: layout.totalSize, writable: true),
                                      layout: layout, name: "costs",
                                      board: try MappedRegion(mapping: boardFile, length: SegmentLayout.WaitBoard.size, writable: true))
        let alwaysWaking = SegmentWriter(formatting: try MappedRegion(mapping: file, length: layout.totalSize, writable: true),
                                         layout: layout, name: "costs")
        var sink: UInt64 = 0
        let payload = [UInt8](repeating: 3, count: 64)
        var destination = [UInt8](repeating: 0, count: 64)
        let costs = payload.withUnsafeBytes { bytes in
            destination.withUnsafeMutableBytes { target in
                [("clock_gettime(REALTIME)", nanoseconds { sink &+= Clock.realtimeNanoseconds() }),
                 ("copy+CRC", nanoseconds { sink &+= CRC64.copyAndChecksum(from: bytes, to: target.baseAddress!) }),
                 ("SegmentWriter.publish, no sleeper", nanoseconds { sink &+= (try? withBoard.publish(bytes))?.version ?? 0 }),
                 ("the same with a FUTEX_WAKE (layout 1)", nanoseconds { sink &+= (try? alwaysWaking.publish(bytes))?.version ?? 0 })]
            }
        }
        if sink == 42 { print("") }
        return costs
    }

    func scaleBenchmark(_ report: inout Report) async throws -> [String: Any] {
        report.section("Scale")
        var rows: [String: Any] = [:]
        for count in [1, 100, 1000] {
            let daemon = try BenchDaemon(segmentCount: count)
            rows["readyMs_\(count)"] = daemon.readyMilliseconds
            report.row(["start to READY=1 with \(count) segments", fmt(daemon.readyMilliseconds, 1) + " ms"])
            if count == 1000 {
                let idleRate = try await quickPublishRate(daemon)
                var limit = rlimit()
                getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                limit.rlim_cur = limit.rlim_max
                setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
                var idle: [FileDescriptor] = []
                for _ in 0..<1000 {
                    guard let fd = try? SeqpacketSocket.connect(path: daemon.socketPath) else { break }
                    _ = Request.hello(protocolVersion: ControlProtocol.version, clientName: "idle").encode(requestID: 1)
                        .withUnsafeBytes { try? SeqpacketSocket.send(fd, $0) }
                    idle.append(fd)
                }
                usleep(500_000)
                let memory = residentMemory(of: daemon.pid)
                // Measured twice each way, before, during and after the idle clients, so that a
                // slow moment of this shared machine does not pass for a cost of idle clients.
                let busyRates = [try await quickPublishRate(daemon), try await quickPublishRate(daemon)]
                idle.forEach { $0.closeQuietly() }
                usleep(500_000)
                let idleRates = [idleRate, try await quickPublishRate(daemon)]
                let withoutClients = idleRates.reduce(0, +) / 2, withClients = busyRates.reduce(0, +) / 2
                let ownMiB = Double(memory.anonymous + memory.file) / 1024
                rows["idleClients"] = idle.count
                rows["rssBeyondSegments_MiB"] = ownMiB
                rows["segmentMemory_MiB"] = Double(memory.shared) / 1024
                rows["publishRate_noIdleClients"] = withoutClients
                rows["publishRate_1000IdleClients"] = withClients
                report.row(["daemon memory beyond segments, 1000 segments + \(idle.count) clients", fmt(ownMiB, 1) + " MiB"])
                report.row(["publishes/s with 0 vs \(idle.count) idle clients (1000 segments; means of 2)",
                            "\(fmt(withoutClients, 0)) vs \(fmt(withClients, 0))"])
                report.goal("daemon memory beyond segments < 32 MiB (1000 segments, 1000 clients)", value: ownMiB, target: 32, lowerIsBetter: true)
            }
            daemon.stop()
        }
        return rows
    }

    func quickPublishRate(_ daemon: BenchDaemon) async throws -> Double {
        let client = try await daemon.connect()
        defer { client.close() }
        let began = Date()
        var count = 0
        while Date().timeIntervalSince(began) < (quick ? 0.3 : 1.0) {
            try await client.publish("s0", bytes: [1, 2, 3])
            count += 1
        }
        return Double(count) / Date().timeIntervalSince(began)
    }

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
func json(_ value: Double) -> Any { value.isNaN ? NSNull() : value }

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
    var goals: [[String: Any]] = []

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
        goals.append(["goal": name, "value": value, "target": target, "met": met])
        text += "   goal: \(name): \(fmt(value)) -> \(met ? "met" : "NOT met")\n"
    }
}
