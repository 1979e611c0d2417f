import Foundation
import Logging
import Synchronization

/// The mirror's counts, per mirrored segment, shared by its threads; written as Prometheus text
/// (`metricsTextfile`, for node_exporter's textfile collector) and summarised in the log.
public final class MirrorMetrics: Sendable {
    /// One mirrored segment's numbers.
    public struct Segment: Sendable, Equatable {
        public var direction: String
        public var puts: UInt64 = 0
        public var bytes: UInt64 = 0
        public var chunks: UInt64 = 0
        public var imported: UInt64 = 0
        public var failures: [String: UInt64] = [:]
        public var rejected: [String: UInt64] = [:]
        public var lagVersions: UInt64 = 0
        public var lagSeconds: Double = 0
        public var stale = false
        public var sourceVersion: UInt64 = 0
        public var localVersion: UInt64 = 0
    }

    private let state = Mutex<[String: Segment]>([:])
    private let reconnects = Mutex<UInt64>(0)
    private let loggedCauses = Mutex<Set<String>>([])

    public init() {}

    /// Changes one segment's numbers (`direction`: "export" or "import").
    public func update(_ name: String, direction: String, _ change: (inout Segment) -> Void) {
        state.withLock { segments in
            var segment = segments[name] ?? Segment(direction: direction)
            change(&segment)
            segments[name] = segment
        }
    }

    public func setReconnects(_ count: UInt64) { reconnects.withLock { $0 = count } }

    public func snapshot() -> [String: Segment] { state.withLock { $0 } }

    /// Whether `cause` for `segment` is seen for the first time: each cause is logged once per
    /// segment (and counted every time), so a hostile writer cannot flood the journal.
    public func firstTime(_ cause: String, for segment: String) -> Bool {
        loggedCauses.withLock { $0.insert("\(segment)\u{0}\(cause)").inserted }
    }

    /// Forgets that `cause` was logged for `segment` (the condition cleared; log it again next time).
    public func cleared(_ cause: String, for segment: String) {
        _ = loggedCauses.withLock { $0.remove("\(segment)\u{0}\(cause)") }
    }

    /// The Prometheus text format.
    public func text() -> String {
        let segments = snapshot().sorted { $0.key < $1.key }
        var lines: [String] = []
        func family(_ name: String, _ type: String, _ help: String, _ rows: [(labels: String, value: String)]) {
            lines.append("# HELP shmbroker_mirror_\(name) \(help)")
            lines.append("# TYPE shmbroker_mirror_\(name) \(type)")
            for row in rows { lines.append("shmbroker_mirror_\(name){\(row.labels)} \(row.value)") }
        }
        func label(_ name: String, _ segment: Segment) -> String { "segment=\"\(name)\",direction=\"\(segment.direction)\"" }
        family("puts_total", "counter", "Versions put to the bucket.", segments.map { (label($0.key, $0.value), "\($0.value.puts)") })
        family("bytes_total", "counter", "Payload bytes put or imported.", segments.map { (label($0.key, $0.value), "\($0.value.bytes)") })
        family("chunks_total", "counter", "Chunks put or assembled.", segments.map { (label($0.key, $0.value), "\($0.value.chunks)") })
        family("imported_total", "counter", "Versions published locally from the bucket.", segments.map { (label($0.key, $0.value), "\($0.value.imported)") })
        family("failures_total", "counter", "Failed puts, watches and reads, by reason.",
               segments.flatMap { name, segment in segment.failures.sorted { $0.key < $1.key }.map { ("\(label(name, segment)),reason=\"\($0.key)\"", "\($0.value)") } })
        family("rejected_total", "counter", "Values from the bucket rejected, by reason; never served.",
               segments.flatMap { name, segment in segment.rejected.sorted { $0.key < $1.key }.map { ("\(label(name, segment)),reason=\"\($0.key)\"", "\($0.value)") } })
        family("lag_versions", "gauge", "Source versions not yet served here.", segments.map { (label($0.key, $0.value), "\($0.value.lagVersions)") })
        family("lag_seconds", "gauge", "How long the segment has been behind its source.", segments.map { (label($0.key, $0.value), "\($0.value.lagSeconds)") })
        family("stale", "gauge", "1 when the segment is stale.", segments.map { (label($0.key, $0.value), $0.value.stale ? "1" : "0") })
        family("source_version", "gauge", "The source's latest version as last announced.", segments.map { (label($0.key, $0.value), "\($0.value.sourceVersion)") })
        family("local_version", "gauge", "The latest version served (import) or put (export).", segments.map { (label($0.key, $0.value), "\($0.value.localVersion)") })
        lines.append("# HELP shmbroker_mirror_reconnects_total Reconnections to NATS.")
        lines.append("# TYPE shmbroker_mirror_reconnects_total counter")
        lines.append("shmbroker_mirror_reconnects_total \(reconnects.withLock { $0 })")
        return lines.joined(separator: "\n") + "\n"
    }
}
