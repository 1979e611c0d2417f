import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// End-to-end latency: publish call to the reader holding the verified version, on every path.
extension Run {
    // MARK: Through the daemon

    /// The CPU a spinning reader agent pins its thread to: the last one this process may use.
    static let spinningReaderCPU = ProcessInfo.processInfo.activeProcessorCount - 1

    /// One producer publish per round, spaced so each is read alone; vs the same payload over a
    /// raw Unix stream socket between two processes.
    /// The spinning daemon's window (`publishRings.spinMicroseconds`): longer than the 200 µs
    /// between the latency run's publishes, so it never sleeps during the run.
    static let daemonSpinMicroseconds = 1000

    func latencyBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: LatencyRow] {
        let rounds: UInt64 = quick ? 300 : 3000
        report.section("End-to-end latency, publish call -> reader holds the verified version (µs; \(rounds) rounds; "
                       + "the owner-spin reader's thread pinned to CPU \(Self.spinningReaderCPU))")
        report.row(["payload", "path", "shm p50", "p99", "p99.9", "socket p50", "p99", "p99.9", "p50 ratio"])
        let client = try await daemon.connect()
        // A second daemon told to spin on its rings ("a core for latency") for longer than the
        // 200 µs between publishes: it polls its rings throughout the run.
        let spinning = try BenchDaemon(segments: [["name": "lat64", "size": 64], ["name": "lat4k", "size": 4096]],
                                       publishRingSpinMicroseconds: Self.daemonSpinMicroseconds)
        defer { spinning.stop() }
        let spinningClient = try await spinning.connect()
        report.text += "(ring-spin: a daemon with publishRings.spinMicroseconds = \(Self.daemonSpinMicroseconds), which polls its rings instead of sleeping; its CPU is printed)\n"
        var rows: [String: LatencyRow] = [:]
        for (size, segment) in [(64, "lat64"), (4096, "lat4k")] {
            let socket = LatencySummary(try socketLatency(size: size, rounds: rounds, readers: 1).perRound)
            // The same messages through a relay process: two socket hops, the floor of any design
            // that puts a broker process between producer and reader (the daemon's paths do).
            let relayed = LatencySummary(try socketLatency(size: size, rounds: rounds, readers: 1, relayed: true).perRound)
            var row = LatencyRow(socket: socket, socketRelay: relayed)
            report.latencyRow(size: size, path: "socket-relay", relayed, against: socket)
            for (name, path, target) in [("requests", ProducerPath.requests, daemon), ("ring", .ring, daemon), ("ring-spin", .ring, spinning)] {
                let agent = try AgentProcess(["segment-latency", "--socket", target.socketPath, "--segment", segment, "--rounds", "\(rounds)"])
                try agent.waitUntilReady()
                var payload = [UInt8](repeating: 0xA5, count: size)
                let publisher = path == .ring ? try await (target === spinning ? spinningClient : client).openPublisher(segment) : nil
                let daemonCPU = cpuNanoseconds(ofProcess: target.pid), began = Clock.monotonicNanoseconds()
                for round in 0..<rounds {
                    Stamp.write(&payload, sentAt: Clock.monotonicNanoseconds(), round: round)
                    if let publisher {
                        try publisher.publish(payload)
                    } else {
                        try await client.publish(segment, bytes: payload)
                    }
                    usleep(200)
                }
                let daemonCores = Double(cpuNanoseconds(ofProcess: target.pid) - daemonCPU) / Double(Clock.monotonicNanoseconds() - began)
                await publisher?.close()
                let measured = try agent.latencyResult()
                let shm = LatencySummary(Array(measured.latencies.values))
                let split = (toDaemon: Double(measured.toDaemon) / 1000, toReader: Double(measured.toReader) / 1000)
                row.paths[name] = LatencyPath(shm: shm, p50Ratio: Measured(shm.p50 / socket.p50),
                                              producerToDaemon: Measured(split.toDaemon), daemonToReader: Measured(split.toReader),
                                              daemonCores: Measured(daemonCores))
                report.latencyRow(size: size, path: name, shm, against: socket)
                report.text += "   split (medians): producer call -> daemon publish \(fmt(split.toDaemon)) µs, daemon publish -> reader holds it \(fmt(split.toReader)) µs; "
                    + "daemon CPU \(fmt(daemonCores)) cores\n"
                if name == "ring-spin" {
                    report.goal("daemon ring with spinning enabled: p50 <= 1.5x raw socket one-way p50 (\(sizeName(size)))",
                                value: shm.p50 / socket.p50, target: 1.5, lowerIsBetter: true)
                }
                if name == "ring" {
                    row.ringOverRelay = Measured(shm.p50 / relayed.p50)
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
                row.paths[name] = LatencyPath(shm: shm, p50Ratio: Measured(shm.p50 / socket.p50),
                                              publishCall: Measured(Double(call) / 1000), afterCall: Measured(Double(afterCall) / 1000))
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
}
