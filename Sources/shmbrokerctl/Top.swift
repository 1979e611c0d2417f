import ArgumentParser
import Foundation
import ShmBrokerClient
import ShmBrokerProtocol

/// `shmbrokerctl top`: a live view, refreshed every interval, from STATUS (versions, readers,
/// clients, counters) and METRICS (per-segment publish and byte totals, from which the rates come).
struct Top: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A live view of the owner: segments with publishes/s and bytes/s, clients, counters.",
        discussion: """
            In a terminal the screen is redrawn in place every interval; when standard output is \
            not a terminal, each refresh is printed as a block of lines, for logs and pipes. \
            Ctrl-C ends it.
            """)
    @OptionGroup var connection: ConnectionOptions
    @Option(name: .long, help: "Seconds between refreshes.") var interval: Double = 1
    @Option(name: .long, help: "Exit after this many refreshes (default: run until interrupted).") var count: Int?

    func validate() throws {
        guard interval >= 0.1 else { throw ValidationError("--interval must be at least 0.1 s") }
    }

    func run() async throws {
        let client = try await connection.connect()
        defer { client.close() }
        let terminal = isatty(STDOUT_FILENO) != 0
        var previous: (time: Double, totals: [String: (publishes: Double, bytes: Double)])?
        var shown = 0
        while count.map({ shown < $0 }) ?? true {
            let report = try await client.status()
            let totals = Self.segmentTotals(try await client.metrics())
            let now = Date().timeIntervalSince1970
            let screen = Self.render(report, totals: totals, previous: previous, now: now, width: terminal ? Self.terminalWidth() : 200)
            if terminal {
                FileHandle.standardOutput.write(Data(("\u{1B}[H\u{1B}[2J" + screen).utf8))
            } else {
                FileHandle.standardOutput.write(Data((screen + "\n").utf8))
            }
            previous = (now, totals)
            shown += 1
            if let count, shown >= count { break }
            try await Task.sleep(nanoseconds: UInt64(interval * 1e9))
        }
    }

    /// Per-segment publish and byte totals from the Prometheus text.
    static func segmentTotals(_ text: String) -> [String: (publishes: Double, bytes: Double)] {
        var totals: [String: (publishes: Double, bytes: Double)] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            for (metric, isBytes) in [("shmbroker_segment_publishes_total{segment=\"", false), ("shmbroker_segment_published_bytes_total{segment=\"", true)] {
                guard line.hasPrefix(metric), let end = line.dropFirst(metric.count).firstIndex(of: "\""),
                      let value = Double(line.split(separator: " ").last ?? "") else { continue }
                let name = String(line[line.index(line.startIndex, offsetBy: metric.count)..<end])
                var entry = totals[name] ?? (0, 0)
                if isBytes { entry.bytes = value } else { entry.publishes = value }
                totals[name] = entry
            }
        }
        return totals
    }

    static func render(_ report: StatusReport, totals: [String: (publishes: Double, bytes: Double)],
                       previous: (time: Double, totals: [String: (publishes: Double, bytes: Double)])?, now: Double, width: Int) -> String {
        var lines = ["shmbroker \(report.daemon.version) pid \(report.daemon.pid), socket \(report.daemon.socketPath), \(formatTime(now))", ""]
        let header = ["SEGMENT", "VERSION", "PUBLISHES/S", "BYTES/S", "READERS", "SUBSCRIBERS", "LAST PUBLISH"]
        var rows: [[String]] = []
        for segment in report.segments {
            var publishRate = "-", byteRate = "-"
            if let previous, let now_ = totals[segment.name], let then = previous.totals[segment.name], now > previous.time {
                let seconds = now - previous.time
                publishRate = String(format: "%.1f", max(0, now_.publishes - then.publishes) / seconds)
                byteRate = humanBytes(max(0, now_.bytes - then.bytes) / seconds)
            }
            let age = segment.lastPublishedAt.map { ageText(now - $0) + " ago" } ?? "never"
            rows.append([segment.name + mirrorMark(segment.mirror), "\(segment.version)", publishRate, byteRate, "\(segment.readers)", "\(segment.subscribers)", age])
        }
        let widths = header.indices.map { column in ([header] + rows).map { $0[column].count }.max() ?? 0 }
        for row in [header] + rows {
            lines.append(String(row.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  ").prefix(width)))
        }
        let c = report.counters
        lines += ["", "\(report.clients.count) client(s) shown; \(c.clientsAccepted) accepted, \(c.clientsRefused) refused",
                  "publishes \(c.publishes), events sent \(c.eventsSent) (coalesced \(c.eventsCoalesced)), slow subscribers dropped \(c.slowSubscribersDisconnected)",
                  "error replies \(c.errorReplies) (malformed \(c.malformedRequests)), reloads \(c.reloads) (failed \(c.failedReloads))"]
        for client in report.clients.prefix(10) {
            lines.append(String("  client \(client.id) \(client.name) pid \(client.pid) uid \(client.uid) opened \(client.opened.joined(separator: ",")) subscribed \(client.subscriptions.joined(separator: ","))".prefix(width)))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    static func humanBytes(_ value: Double) -> String {
        for (size, unit) in [(1e9, "GB"), (1e6, "MB"), (1e3, "kB")] where value >= size { return String(format: "%.1f %@", value / size, unit) }
        return String(format: "%.0f B", value)
    }

    static func ageText(_ seconds: Double) -> String {
        seconds < 120 ? String(format: "%.1f s", max(0, seconds)) : seconds < 7200 ? "\(Int(seconds / 60)) min" : "\(Int(seconds / 3600)) h"
    }

    static func terminalWidth() -> Int {
        var size = winsize()
        return ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 20 ? Int(size.ws_col) : 120
    }
}
