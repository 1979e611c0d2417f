import CoreMetrics
import Foundation
import Prometheus
import ShmBrokerProtocol

/// The owner's metrics, kept with swift-metrics on a Prometheus registry of its own (no global
/// `MetricsSystem` bootstrap, so an embedding application keeps its own). The event loop counts as
/// it goes; ``refresh(from:)`` brings the per-segment and client figures up to date before each
/// scrape, so no publish pays for a metric it does not need.
final class BrokerMetrics {
    let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory

    /// A counter fed from a running total: it is increased by what the total grew since last time.
    private final class TotalCounter {
        let counter: CoreMetrics.Counter
        var reported: UInt64 = 0
        init(_ counter: CoreMetrics.Counter) { self.counter = counter }
        func update(to total: UInt64) {
            guard total > reported else { return }
            counter.increment(by: Int64(clamping: total - reported))
            reported = total
        }
    }

    private final class SegmentSeries {
        let publishes, bytes, eventsSent, eventsCoalesced, slowDropped: TotalCounter
        let version, readers, subscribers: CoreMetrics.Gauge
        init(_ name: String, _ factory: MetricsFactory) {
            let labels = [("segment", name)]
            func counter(_ label: String) -> TotalCounter { TotalCounter(CoreMetrics.Counter(label: label, dimensions: labels, factory: factory)) }
            publishes = counter("shmbroker_segment_publishes_total")
            bytes = counter("shmbroker_segment_published_bytes_total")
            eventsSent = counter("shmbroker_segment_events_sent_total")
            eventsCoalesced = counter("shmbroker_segment_events_coalesced_total")
            slowDropped = counter("shmbroker_segment_slow_subscribers_dropped_total")
            version = CoreMetrics.Gauge(label: "shmbroker_segment_version", dimensions: labels, factory: factory)
            readers = CoreMetrics.Gauge(label: "shmbroker_segment_readers", dimensions: labels, factory: factory)
            subscribers = CoreMetrics.Gauge(label: "shmbroker_segment_subscribers", dimensions: labels, factory: factory)
        }
    }

    private var segments: [String: SegmentSeries] = [:]
    private var errors: [UInt16: CoreMetrics.Counter] = [:]
    private var detaches: [String: CoreMetrics.Counter] = [:]
    private let clients: CoreMetrics.Gauge
    private let accepted, refused: TotalCounter
    private let ringsAttached: CoreMetrics.Counter
    private let iterations: CoreMetrics.Counter
    private let longestTurn: CoreMetrics.Gauge
    private var pendingIterations: Int64 = 0
    private var longestTurnNanoseconds: UInt64 = 0

    init() {
        factory = PrometheusMetricsFactory(registry: registry)
        clients = CoreMetrics.Gauge(label: "shmbroker_clients", factory: factory)
        accepted = TotalCounter(CoreMetrics.Counter(label: "shmbroker_clients_accepted_total", factory: factory))
        refused = TotalCounter(CoreMetrics.Counter(label: "shmbroker_clients_refused_total", factory: factory))
        ringsAttached = CoreMetrics.Counter(label: "shmbroker_rings_attached_total", factory: factory)
        iterations = CoreMetrics.Counter(label: "shmbroker_event_loop_iterations_total", factory: factory)
        longestTurn = CoreMetrics.Gauge(label: "shmbroker_event_loop_longest_turn_seconds", factory: factory)
    }

    /// One error reply sent, by its protocol code.
    func errorReply(_ code: ErrorCode) {
        let counter = errors[code.rawValue] ?? {
            let made = CoreMetrics.Counter(label: "shmbroker_error_replies_total", dimensions: [("code", code.name)], factory: factory)
            errors[code.rawValue] = made
            return made
        }()
        counter.increment()
    }

    func ringAttached() { ringsAttached.increment() }

    /// A ring detached: `reason` is a protocol code's name, or "producer" when the producer asked.
    func ringDetached(reason: String) {
        let counter = detaches[reason] ?? {
            let made = CoreMetrics.Counter(label: "shmbroker_rings_detached_total", dimensions: [("reason", reason)], factory: factory)
            detaches[reason] = made
            return made
        }()
        counter.increment()
    }

    /// One turn of the event loop took `nanoseconds`.
    @inline(__always)
    func loopTurn(nanoseconds: UInt64) {
        pendingIterations &+= 1
        if nanoseconds > longestTurnNanoseconds { longestTurnNanoseconds = nanoseconds }
    }

    /// Figures for one segment, as the loop keeps them.
    struct SegmentFigures {
        var name: String
        var publishes: UInt64
        var bytes: UInt64
        var version: UInt64
        var readers: Int
        var subscribers: Int
        var eventsSent: UInt64
        var eventsCoalesced: UInt64
        var slowDropped: UInt64
    }

    /// Brings every series up to date; segments no longer served stop being reported.
    func refresh(segments figures: [SegmentFigures], clients connected: Int, accepted totalAccepted: UInt64, refused totalRefused: UInt64) {
        for figure in figures {
            let series = segments[figure.name] ?? {
                let made = SegmentSeries(figure.name, factory)
                segments[figure.name] = made
                return made
            }()
            series.publishes.update(to: figure.publishes)
            series.bytes.update(to: figure.bytes)
            series.eventsSent.update(to: figure.eventsSent)
            series.eventsCoalesced.update(to: figure.eventsCoalesced)
            series.slowDropped.update(to: figure.slowDropped)
            series.version.record(Double(figure.version))
            series.readers.record(Double(figure.readers))
            series.subscribers.record(Double(figure.subscribers))
        }
        let served = Set(figures.map(\.name))
        for (name, series) in segments where !served.contains(name) {
            for counter in [series.publishes, series.bytes, series.eventsSent, series.eventsCoalesced, series.slowDropped] {
                counter.counter.destroy()
            }
            for gauge in [series.version, series.readers, series.subscribers] { gauge.destroy() }
            segments.removeValue(forKey: name)
        }
        clients.record(Double(connected))
        accepted.update(to: totalAccepted)
        refused.update(to: totalRefused)
        if pendingIterations > 0 {
            iterations.increment(by: pendingIterations)
            pendingIterations = 0
        }
        longestTurn.record(Double(longestTurnNanoseconds) / 1e9)
    }

    /// Series that add up every user's activity (loop turns, error replies, rings): shown only to
    /// a peer that may see every segment, since their changes time publishes of the others.
    static let daemonWideActivity: Set<Substring> = [
        "shmbroker_event_loop_iterations_total", "shmbroker_event_loop_longest_turn_seconds",
        "shmbroker_error_replies_total", "shmbroker_rings_attached_total", "shmbroker_rings_detached_total",
    ]

    /// The Prometheus text format. For a peer that may not read every segment, the series of the
    /// segments it may not read, and the daemon-wide activity series, are left out (the same rule
    /// as STATUS).
    func text(visibleSegments visible: Set<String>?) -> String {
        let all = registry.emitToString()
        guard let visible else { return all }
        return all.split(separator: "\n", omittingEmptySubsequences: false).filter { line in
            let series = line.hasPrefix("# ") ? line.split(separator: " ").dropFirst(2).first ?? "" : line.prefix { $0 != "{" && $0 != " " }
            if Self.daemonWideActivity.contains(series) { return false }
            guard !line.hasPrefix("#"), let start = line.range(of: "segment=\"") else { return true }
            let rest = line[start.upperBound...]
            guard let end = rest.firstIndex(of: "\"") else { return false }
            return visible.contains(String(rest[..<end]))
        }.joined(separator: "\n")
    }
}
