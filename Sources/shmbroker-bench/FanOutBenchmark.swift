import Atomics
import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// Fan-out: until the last of N readers holds a version.
extension Run {
    func fanOutBenchmark(_ daemon: BenchDaemon, _ owner: BenchOwner, _ report: inout Report) async throws -> [String: FanOutRow] {
        let rounds: UInt64 = quick ? 50 : 300
        report.section("Fan-out: publish (through a publish ring) -> last of N readers holds it (µs, p50 / p99 over \(rounds) rounds)")
        report.text += "(futex: the floor, a bare FUTEX_WAKE of N processes that wait on one word of shared memory and note when they run)\n"
        report.row(["readers", "ring p50", "ring p99", "owner p50", "owner p99", "socket p50", "socket p99", "futex p50", "futex p99",
                    "ring ratio", "owner ratio", "owner/futex"])
        let client = try await daemon.connect()
        var rows: [String: FanOutRow] = [:]
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
            let floor = LatencySummary(try futexWakeAllFloor(readers: readers, rounds: rounds, spacingMicroseconds: spacing))
            rows["\(readers)"] = FanOutRow(shm: shm, owner: ownerSummary, socket: socket, futexFloor: floor, p50Ratio: Measured(shm.p50 / socket.p50),
                                           ownerP50Ratio: Measured(ownerSummary.p50 / socket.p50),
                                           ownerOverFloor: Measured(ownerSummary.p50 / floor.p50))
            report.row(["\(readers)", fmt(shm.p50), fmt(shm.p99), fmt(ownerSummary.p50), fmt(ownerSummary.p99), fmt(socket.p50), fmt(socket.p99),
                        fmt(floor.p50), fmt(floor.p99), fmt(shm.p50 / socket.p50) + "x", fmt(ownerSummary.p50 / socket.p50) + "x",
                        fmt(ownerSummary.p50 / floor.p50) + "x"])
            if readers == 64 { report.goal("fan-out to 64 readers <= 0.7x socket-per-reader (p50)", value: shm.p50 / socket.p50, target: 0.7, lowerIsBetter: true) }
            if readers == 1 {
                report.goal("owner fan-out, last of 1 reader <= 1x socket (p50)", value: ownerSummary.p50 / socket.p50, target: 1, lowerIsBetter: true)
            }
            if readers == 64 {
                report.goal("owner fan-out, last of 64 readers <= 0.6x socket-per-reader (p50)", value: ownerSummary.p50 / socket.p50,
                            target: 0.6, lowerIsBetter: true)
                report.goal("owner fan-out, last of 64 readers <= 1.2x a bare futex wake-all of 64 processes (p50)",
                            value: ownerSummary.p50 / floor.p50, target: 1.2, lowerIsBetter: true)
            }
        }
        return rows
    }

    /// The fan-out floor: `readers` processes wait on one word of a shared memfd with
    /// `FUTEX_WAIT`; each round this process stores the round in the word and makes one
    /// `FUTEX_WAKE` of all of them; each notes the monotonic time when it runs again. Returns, per
    /// round, when the last of them ran (ns after the store): what any futex-based fan-out pays.
    func futexWakeAllFloor(readers: Int, rounds: UInt64, spacingMicroseconds: UInt32) throws -> [UInt64] {
        let size = 64 + readers * Int(rounds) * 8
        let file = try MemoryFile.create(name: "bench-futex-floor", size: size, mode: 0o600)
        defer { file.closeQuietly() }
        let region = try MappedRegion(mapping: file, length: size, writable: true, populate: true)
        let word = UnsafeAtomic<UInt32>(at: region.base.assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
        let path = "/proc/\(getpid())/fd/\(file.rawValue)"
        let agents = try (0..<readers).map { index in
            try AgentProcess(["futex-waiter", "--memory-file", path, "--index", "\(index)", "--rounds", "\(rounds)"])
        }
        for agent in agents { try agent.waitUntilReady() }
        var sentAt = [UInt64](repeating: 0, count: Int(rounds))
        for round in 0..<rounds {
            usleep(spacingMicroseconds)
            sentAt[Int(round)] = Clock.monotonicNanoseconds()
            word.store(UInt32(truncatingIfNeeded: round + 1), ordering: .releasing)
            _ = Futex.wakeAll(UnsafePointer(region.base.assumingMemoryBound(to: UInt32.self)))
        }
        for agent in agents { _ = try agent.result() }
        let stamps = (region.base + 64).assumingMemoryBound(to: UInt64.self)
        return (0..<Int(rounds)).compactMap { round in
            let woken = (0..<readers).map { stamps[$0 * Int(rounds) + round] }
            guard !woken.contains(0) else { return nil }
            return woken.max()! &- sentAt[round]
        }
    }
}
