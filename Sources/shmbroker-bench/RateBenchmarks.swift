import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Publishes per second, the in-process publish cost, and the daemon at scale (memory).
extension Run {
    func publishRateBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> PublishRateResult {
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
        return PublishRateResult(sequential: Measured(sequentialRate), pipelined: Measured(pipelinedRate), window: window,
                                 ring: Measured(ringRate), ownerZeroCopy: Measured(zeroCopyRate), ownerCopy: Measured(copyRate))
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

    func scaleBenchmark(_ report: inout Report) async throws -> ScaleResult {
        report.section("Scale")
        var rows = ScaleResult()
        for count in [1, 100, 1000] {
            let daemon = try BenchDaemon(segmentCount: count)
            rows.readyMilliseconds[count] = Measured(daemon.readyMilliseconds)
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
                rows.idleClients = idle.count
                rows.rssBeyondSegmentsMiB = Measured(ownMiB)
                rows.segmentMemoryMiB = Measured(Double(memory.shared) / 1024)
                rows.rateWithoutIdleClients = Measured(withoutClients)
                rows.rateWithIdleClients = Measured(withClients)
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
}
