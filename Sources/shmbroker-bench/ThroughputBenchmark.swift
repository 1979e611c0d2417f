import ArgumentParser
import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Producer to reader throughput: publish rings, requests, the embedded owner and a raw socket.
extension Run {
    func throughputBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: ThroughputRow] {
        let trials = self.trials ?? (quick ? 1 : 5)
        report.section("Producer -> reader throughput (MB/s delivered to readers; median of \(trials) interleaved trials; "
                       + "requests: \(Self.publishWindow) PUBLISH requests in flight)")
        report.row(["payload", "readers", "ring copy", "ring 0-copy", "reqs 0-copy", "owner 0-copy", "owner spin", "socket",
                    "ratio ring", "ratio reqs", "ratio owner", "owner spin"])
        report.text += "(owner spin: the owner's zero-copy readers spin up to \(Self.streamingSpinMicroseconds) µs for each version before sleeping on the futex)\n"
        let client = try await daemon.connect()
        var rows: [String: ThroughputRow] = [:]
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
            rows["\(sizeName(size))x\(readers)"] = ThroughputRow(
                ringCopy: Measured(copying), ringZeroCopy: Measured(zeroCopy), requestsZeroCopy: Measured(requests),
                socket: Measured(socket), ratio: Measured(copying / socket), ratioZeroCopy: Measured(zeroCopy / socket),
                ratioRequestsZeroCopy: Measured(requests / socket), published: count,
                owner: Measured(ownerRate), ratioOwner: Measured(ownerRate / socket),
                ownerSpin: Measured(ownerSpinRate), ratioOwnerSpin: Measured(ownerSpinRate / socket),
                ratioOwnerPerTrial: ratios.map(Measured.init), ratioRingOverRequestsPerTrial: ringLead.map(Measured.init),
                cpuCores: [
                    "ring_copy": copyingTrial?.cpu, "ring_zero_copy": zeroCopyTrial?.cpu,
                    "requests_zero_copy": requestsTrial?.cpu, "socket": socketTrial?.cpu, "owner": ownerTrial?.cpu,
                    "owner_spin": ownerSpinTrial?.cpu,
                ].compactMapValues { $0 })
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
    func throughputTrial(_ results: [AgentReport], began: UInt64, producerCPU: UInt64, daemonCPU: UInt64) -> ThroughputTrial {
        let finished = results.compactMap(\.finishedAt).max() ?? began
        let delivered = results.compactMap(\.bytes).reduce(0, +)
        let readersCPU = results.compactMap(\.cpuNanoseconds).reduce(0, +)
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
}
