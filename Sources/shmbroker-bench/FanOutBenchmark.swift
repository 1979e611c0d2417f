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
        report.row(["readers", "ring p50", "ring p99", "owner p50", "owner p99", "socket p50", "socket p99", "ring ratio", "owner ratio"])
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
            rows["\(readers)"] = FanOutRow(shm: shm, owner: ownerSummary, socket: socket, p50Ratio: Measured(shm.p50 / socket.p50),
                                           ownerP50Ratio: Measured(ownerSummary.p50 / socket.p50))
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
}
