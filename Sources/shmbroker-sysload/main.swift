import ArgumentParser
import Foundation
import ShmBroker

/// `shmbroker-sysload`: an example owner. It *is* the owner of its segment — no daemon in
/// between — and publishes the machine's load every interval; readers open the segment through
/// its control socket exactly as they would with `shmbrokerd` (`shmbrokerctl read sysload`).
struct SysLoad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shmbroker-sysload",
        abstract: "Publishes the system load (JSON) to a shared-memory segment it owns, once per interval.")

    @Option(help: "The config file (the shmbrokerd format): socket, limits, segments.")
    var config = "/etc/shmbroker/sysload.json"

    @Option(help: "The segment to publish to.")
    var segment = "sysload"

    @Option(help: "Milliseconds between two versions.")
    var intervalMs = 1000

    func run() throws {
        // First, before any thread exists: the owner takes SIGTERM/SIGINT (stop) and SIGHUP (reload).
        let owner = try ShmBrokerOwner(configPath: config)
        let load = try owner.segment(segment)  // claimed before start: clients may only read it
        try owner.start()                      // segments exist, socket listens, READY=1 sent
        var sequence = load.latestVersion      // after a restart, carry on from the stored version
        // Until SIGTERM or SIGINT: a stop that races a publish ends the loop, not the process.
        try owner.run(every: .milliseconds(intervalMs)) {
            sequence += 1
            let sample = Array(Self.sample(sequence: sequence).utf8)
            // Zero-copy: the bytes are written straight into the segment's next slot.
            try load.publish(length: sample.count) { slot in slot.copyBytes(from: sample) }
        }
    }

    /// One JSON sample: the time, the load averages and the available memory.
    static func sample(sequence: UInt64) -> String {
        let loadavg = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?
            .split(separator: " ").prefix(3).compactMap { Double($0) } ?? []
        let available = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }?
            .split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? -1
        return "{\"sequence\":\(sequence),\"time\":\(Date().timeIntervalSince1970),\"loadavg\":\(loadavg),\"memAvailableKiB\":\(available)}"
    }
}

SysLoad.main()
